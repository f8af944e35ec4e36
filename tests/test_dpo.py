"""DPO over the one loop: the objective against hand values and TRL's DPOTrainer, prompt
masking, the reference (frozen copy, disabled adapters, precomputed cache, TR-DPO),
accumulation and resume through the loop, Xu et al.'s counter-example, bad input, and
the library / stage / iterative DPO end to end on tiny models."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from lmlab.adapters import AdapterConfig, apply_adapters, disabled_adapters
from lmlab.config import ModelConfig
from lmlab.data import IGNORE_INDEX
from lmlab.data.preference import PairEncoder, PreferenceCollator, PreferencePair, encode_pairs
from lmlab.errors import LmlabError
from lmlab.model.transformer import build_model
from lmlab.train.config import TrainConfig
from lmlab.train.data import ShuffledBatches
from lmlab.train.loop import train
from lmlab.train.objectives.dpo import ADAPTERS, DPO, dpo_inputs, frozen_copy

from chartok import CharTokenizer

TOK = CharTokenizer()
CFG = ModelConfig(name="t", vocab_size=TOK.vocab_size, d_model=32, n_layers=2, n_heads=4,
                  n_kv_heads=2, ffn_hidden=64, max_seq_len=48)
PAIRS = [PreferencePair("3+4=", "7", "8"), PreferencePair("sort: cab", "abc", "acb x"),
         PreferencePair("hi", "hello there", "go"), PreferencePair("2*3=", "6", "five"),
         PreferencePair("x", "yes", "no!"), PreferencePair("name?", "bob", "I am"),
         PreferencePair("1,2,", "3", "4,5"), PreferencePair("up", "down", "left right")]


def model(seed=0, cfg=CFG):
    torch.manual_seed(seed)
    m = build_model(cfg)
    with torch.no_grad():  # larger weights than the default init: log-probs that move visibly
        for p in m.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
    return m


def examples(pairs=PAIRS, max_len=48, first_index=0):
    return encode_pairs(pairs, PairEncoder(TOK, "none"), max_len, first_index=first_index)


def batch(pairs=PAIRS, side="right"):
    return PreferenceCollator(TOK.pad_id, side)(examples(pairs))


def naive_sums(m, ids_rows, prompt_lens):
    """Summed completion log-probs, one sequence at a time, unpadded, full logits: an
    implementation independent of masked_logprobs and of the batch layout."""
    out = []
    for ids, plen in zip(ids_rows, prompt_lens):
        x = torch.tensor([ids])
        logp = m(x[:, :-1]).log_softmax(-1)[0]
        out.append(sum(logp[t - 1, ids[t]] for t in range(plen, len(ids))))
    return torch.stack(out)


# ---- the objective's numbers -------------------------------------------------------------

@pytest.mark.parametrize("side", ["right", "left"])
def test_completion_logprobs_equal_a_naive_per_sequence_sum(side):
    m = model()
    b = batch(side=side)
    ex = examples()
    inputs = dpo_inputs(b)
    from lmlab.train.logprobs import masked_logprobs

    lp = masked_logprobs(m, inputs["input_ids"], inputs["targets"], positions=inputs["positions"],
                         attn_mask=inputs["attn_mask"])
    with torch.no_grad():
        want_c = naive_sums(m, [e.chosen_ids for e in ex], [e.chosen_prompt_len for e in ex])
        want_r = naive_sums(m, [e.rejected_ids for e in ex], [e.rejected_prompt_len for e in ex])
    n = len(ex)
    assert torch.allclose(lp.sums[:n], want_c, atol=1e-4)
    assert torch.allclose(lp.sums[n:], want_r, atol=1e-4)
    # Completion token counts by hand: answer characters + EOS.
    assert lp.counts[:n].tolist() == [len(p.chosen) + 1 for p in PAIRS]


@pytest.mark.parametrize("loss", ["sigmoid", "cdpo", "robust"])
def test_loss_is_ln2_when_policy_equals_reference(loss):
    m = model()
    params = {"label_smoothing": 0.1} if loss != "sigmoid" else {}
    obj = DPO(beta=0.1, loss=loss, reference=frozen_copy(m), **params)
    value, metrics = obj(m, batch())
    assert value.item() == pytest.approx(math.log(2), abs=1e-6)
    assert float(metrics["margin"]) == 0.0 and float(metrics["kl_to_ref"]) == 0.0


def test_lora_at_init_is_its_own_reference_and_loss_ln2():
    m = model()
    apply_adapters(m, AdapterConfig(r=4))
    value, _ = DPO(beta=0.5, reference=ADAPTERS)(m, batch())
    assert value.item() == pytest.approx(math.log(2), abs=1e-6)


def test_hand_value_with_nll_term():
    m, ref = model(0), model(1)
    b, ex = batch(), examples()
    obj = DPO(beta=0.3, nll_weight=0.2, reference=ref)
    value, _ = obj(m, b)
    with torch.no_grad():
        pc = naive_sums(m, [e.chosen_ids for e in ex], [e.chosen_prompt_len for e in ex])
        pr = naive_sums(m, [e.rejected_ids for e in ex], [e.rejected_prompt_len for e in ex])
        rc = naive_sums(ref, [e.chosen_ids for e in ex], [e.chosen_prompt_len for e in ex])
        rr = naive_sums(ref, [e.rejected_ids for e in ex], [e.rejected_prompt_len for e in ex])
    n_c = torch.tensor([len(p.chosen) + 1 for p in PAIRS], dtype=torch.float32)
    want = (-F.logsigmoid(0.3 * ((pc - rc) - (pr - rr)))).mean() + 0.2 * (-pc / n_c).mean()
    assert value.item() == pytest.approx(want.item(), rel=1e-5)


def test_prompt_and_padding_positions_get_zero_gradient():
    """Perturb the final hidden state at every position by a leaf `delta`: the loss's
    gradient w.r.t. delta is zero wherever the target is a prompt or padding token, and
    non-zero on completion targets."""
    m = model()
    b = batch()
    delta = {}
    original = m.hidden_states

    def perturbed(*args, **kwargs):
        h = original(*args, **kwargs)
        delta["d"] = torch.zeros_like(h, requires_grad=True)
        return h + delta["d"]

    m.hidden_states = perturbed
    obj = DPO(beta=0.1, reference=model(1))
    loss, _ = obj(m, b)
    loss.backward()
    grad = delta["d"].grad.abs().sum(-1)  # (2B, T-1)
    targets = dpo_inputs(b)["targets"]
    assert (grad[targets == IGNORE_INDEX] == 0).all()
    assert (grad[targets != IGNORE_INDEX] > 0).all()
    # And by hand for pair 0 ("3+4=" -> "7"): BOS + 4 prompt chars, so the only completion
    # targets are "7" and EOS, at input positions 4 and 5.
    assert (grad[0] > 0).nonzero().flatten().tolist() == [4, 5]


def test_one_step_raises_chosen_minus_rejected_log_ratio(tmp_path):
    m = model()
    ref = frozen_copy(m)
    ex = examples()
    obj = DPO(beta=0.1, reference=ref)

    def gap():
        with torch.no_grad():
            inputs = dpo_inputs(batch())
            from lmlab.train.logprobs import masked_logprobs

            s = masked_logprobs(m, inputs["input_ids"], inputs["targets"]).sums
            r = masked_logprobs(ref, inputs["input_ids"], inputs["targets"]).sums
            n = len(ex)
            return ((s[:n] - r[:n]) - (s[n:] - r[n:])).mean().item()

    assert gap() == 0.0
    source = ShuffledBatches(examples(), collate=PreferenceCollator(TOK.pad_id))
    train(m, obj, source, TrainConfig(steps=1, batch_size=8, lr=1e-2, progress=False, precision="float32"),
          tmp_path, log=lambda s: None)
    assert gap() > 0.01


# ---- TRL's DPOTrainer as the oracle -------------------------------------------------------

def _hf_tokenizer():
    from tokenizers import Tokenizer as HFTok, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    back = HFTok(models.WordLevel(TOK.vocab, unk_token="<|pad|>"))
    back.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=back, bos_token="<|bos|>", eos_token="<|eos|>",
                                   pad_token="<|pad|>")


def _trl_batch(ex):
    """Our examples in TRL's collated layout: [chosen rows; rejected rows], right-padded,
    completion_mask 1 on answer tokens (built from the raw lists, not from dpo_inputs)."""
    rows = [e.chosen_ids for e in ex] + [e.rejected_ids for e in ex]
    plens = [e.chosen_prompt_len for e in ex] + [e.rejected_prompt_len for e in ex]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), TOK.pad_id)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    comp = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, p) in enumerate(zip(rows, plens)):
        ids[i, :len(r)] = torch.tensor(r)
        attn[i, :len(r)] = 1
        comp[i, p:len(r)] = 1
    return {"input_ids": ids, "attention_mask": attn, "completion_mask": comp}


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "hinge"])
def test_first_step_loss_and_gradient_match_trl_dpo_trainer(tmp_path, loss):
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer

    from lmlab.interop.hf import save_hf

    policy, ref = model(0), model(1)  # a reference unlike the policy: margins are not 0
    save_hf(policy, tmp_path / "policy")
    save_hf(ref, tmp_path / "ref")
    hf_policy = LlamaForCausalLM.from_pretrained(tmp_path / "policy", attn_implementation="eager")
    hf_ref = LlamaForCausalLM.from_pretrained(tmp_path / "ref", attn_implementation="eager")
    dummy = Dataset.from_list([{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in PAIRS])
    args = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=8, learning_rate=0.0, beta=0.2,
                     loss_type=[loss], report_to=[], use_cpu=True, save_strategy="no", max_length=None, bf16=False)
    trainer = DPOTrainer(model=hf_policy, ref_model=hf_ref, args=args, train_dataset=dummy,
                         processing_class=_hf_tokenizer())
    ex = examples()
    hf_loss = trainer.compute_loss(trainer.model, _trl_batch(ex))
    hf_loss.backward()

    ours, _ = DPO(beta=0.2, loss=loss, reference=ref)(policy, batch())
    ours.backward()
    assert ours.item() == pytest.approx(hf_loss.item(), rel=1e-5, abs=1e-6)
    for mine, theirs in [("layers.0.attn.v_proj.weight", "model.layers.0.self_attn.v_proj.weight"),
                         ("layers.1.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"),
                         ("lm_head.weight", "lm_head.weight")]:
        g_ours = dict(policy.named_parameters())[mine].grad
        g_hf = dict(trainer.model.named_parameters())[theirs].grad
        assert torch.allclose(g_ours, g_hf, atol=1e-5, rtol=1e-4), mine


# ---- the reference ------------------------------------------------------------------------

def test_lora_reference_by_disabled_adapters_equals_a_frozen_copy():
    m = model()
    base_copy = frozen_copy(m)
    apply_adapters(m, AdapterConfig(r=4, method="lora"))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.5)  # the adapted model now differs from its base
    b = batch()
    via_adapters = DPO(reference=ADAPTERS)
    via_copy = DPO(reference=base_copy)
    inputs = dpo_inputs(b)
    a = torch.stack(via_adapters.reference_logps(m, b, inputs))
    c = torch.stack(via_copy.reference_logps(m, b, inputs))
    assert torch.allclose(a, c, atol=1e-5)
    # The policy itself is not the base, and after the block the adapters are on again.
    loss, _ = via_adapters(m, b)
    assert abs(loss.item() - math.log(2)) > 1e-3
    with disabled_adapters(m):
        pass
    assert not any(getattr(mod, "disabled", False) for mod in m.modules())


def test_dora_reference_by_disabled_adapters_is_the_base():
    m = model()
    base_copy = frozen_copy(m)
    apply_adapters(m, AdapterConfig(r=4, method="dora"))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.5)
    ids = torch.tensor([examples()[0].chosen_ids])
    with torch.no_grad(), disabled_adapters(m):
        assert torch.allclose(m(ids), base_copy(ids), atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(m(ids), base_copy(ids), atol=1e-3)


def test_reference_logps_are_cached_once_per_example_and_precomputable():
    m, ref = model(0), model(1)
    calls = []
    original = ref.hidden_states

    def counting(ids, *a, **k):
        calls.append(ids.shape[0])
        return original(ids, *a, **k)

    ref.hidden_states = counting
    obj = DPO(reference=ref)
    b = batch()
    first, _ = obj(m, b)
    second, _ = obj(m, b)
    assert calls == [16] and first.item() == second.item()  # one reference pass, 2 x 8 rows
    part = {k: v[:3] for k, v in PreferenceCollator(TOK.pad_id)(examples(PAIRS + PAIRS[:1])).items()}
    obj(m, part)
    assert calls == [16]  # every index was already cached
    # Precomputed: no reference model at all, the same loss.
    pre = DPO(reference=None)
    assert pre.precompute_reference(ref, [b]) == 8
    assert pre(m, b)[0].item() == pytest.approx(first.item(), abs=1e-6)
    unseen = PreferenceCollator(TOK.pad_id)(examples(PAIRS[:2], first_index=100))
    with pytest.raises(LmlabError, match="precompute"):
        pre(m, unseen)


def test_tr_dpo_alpha_zero_keeps_and_alpha_one_copies_the_policy():
    policy = model(0)
    for alpha, expect in ((0.0, "ref"), (1.0, "policy"), (0.25, "mix")):
        ref = model(1)
        start = copy.deepcopy(ref.state_dict())
        obj = DPO(reference=ref, tr_tau=2, tr_alpha=alpha)
        obj(policy, batch())
        assert len(obj._cache) == 8
        obj.after_step(1)  # not a multiple of tau: nothing happens
        assert torch.equal(ref.lm_head.weight, start["lm_head.weight"]) and len(obj._cache) == 8
        obj.after_step(2)
        assert len(obj._cache) == 0  # the reference changed: cached log-probs are stale
        for name, p in ref.named_parameters():
            want = {"ref": start[name], "policy": policy.state_dict()[name],
                    "mix": 0.25 * policy.state_dict()[name] + 0.75 * start[name]}[expect]
            assert torch.allclose(p, want, atol=1e-7), (alpha, name)


# ---- through the loop: accumulation, resume -------------------------------------------------

def _run(tmp_path, name, steps, micro=None, resume=False, obj=None, policy=None, ckpt=0, lr=5e-3, eps=1e-8, **kw):
    policy = policy if policy is not None else model(0)
    obj = obj if obj is not None else DPO(beta=0.5, reference=frozen_copy(model(0)), **kw)
    source = ShuffledBatches(examples(), seed=3, collate=PreferenceCollator(TOK.pad_id))
    cfg = TrainConfig(steps=steps, batch_size=8, micro_batch_size=micro, lr=lr, eps=eps, schedule="constant",
                      progress=False, precision="float32", checkpoint_every=ckpt, keep_checkpoints=0)
    result = train(policy, obj, source, cfg, tmp_path / name, resume=resume, log=lambda s: None)
    return policy, result


def test_accumulating_4x2_equals_one_batch_of_8(tmp_path):
    # Adam's eps at 1 makes its update about lr * g for small g: weight differences then
    # show gradient differences, not sign(g) of gradients that are zero up to rounding.
    one, r1 = _run(tmp_path, "one", 2, micro=None, nll_weight=0.2, lr=0.5, eps=1.0)
    acc, r2 = _run(tmp_path, "acc", 2, micro=2, nll_weight=0.2, lr=0.5, eps=1.0)
    assert r1.losses == pytest.approx(r2.losses, abs=1e-6)
    for (n, a), b in zip(one.named_parameters(), acc.parameters()):
        assert torch.allclose(a, b, atol=1e-6), n


def test_resume_mid_dpo_reproduces_the_uninterrupted_run(tmp_path):
    """TR-DPO every 2 steps, so the reference weights and the cache are objective state."""
    full, r_full = _run(tmp_path, "full", 4, tr_tau=2, tr_alpha=0.5)
    _run(tmp_path, "part", 3, tr_tau=2, tr_alpha=0.5)
    resumed, r_res = _run(tmp_path, "part", 4, resume=True, tr_tau=2, tr_alpha=0.5)
    assert r_res.losses == pytest.approx(r_full.losses[3:], abs=0)
    for (n, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), n


# ---- Xu et al. 2024, Table 1 ----------------------------------------------------------------

def test_dpo_can_raise_a_response_absent_from_the_data_ppo_cannot():
    """Xu et al. 2024 ("Is DPO superior to PPO for LLM alignment?"), Table 1: one prompt,
    three responses, one preference y1 > y2; y3 is in no pair. DPO's loss depends on the
    policy only through log pi(y1) - log pi(y2), so every policy that separates y1 from y2
    is a DPO solution, whatever mass it puts on y3; PPO maximises E_pi[r] - beta KL(pi||ref)
    and pays for every bit of mass it moves without reward.

    Made concrete with a log-linear policy logits = log ref + phi @ theta, whose features
    share a direction between y2 and y3 (phi(y3) = -phi(y2)): as in a network, pushing y2
    down generalises to an unseen response. From ref = (0.45, 0.45, 0.10), gradient descent
    on DPO's loss raises p(y3) to ~0.18, while gradient ascent on PPO's objective in the
    same family, with a reward 1 on y1 and 0 on y2 and y3 (y3 unseen, so no reward model
    trained on the data ranks it above y1), lowers p(y3)."""
    from lmlab.train.losses import dpo_loss

    phi = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    ref_logits = torch.tensor([0.45, 0.45, 0.10]).log()
    ref = ref_logits.log_softmax(-1)
    beta = 0.1

    def policy(theta):
        return (ref_logits + phi @ theta).log_softmax(-1)

    def descend(loss_fn, steps=300, lr=1.0):
        theta = torch.zeros(2)
        for _ in range(steps):
            theta = theta.clone().requires_grad_(True)
            loss_fn(policy(theta)).backward()
            theta = (theta - lr * theta.grad).detach()
        return policy(theta).exp()

    p_dpo = descend(lambda lp: dpo_loss("sigmoid", lp[0:1], lp[1:2], ref[0:1], ref[1:2], beta).mean())
    reward = torch.tensor([1.0, 0.0, 0.0])
    p_ppo = descend(lambda lp: -((lp.exp() * reward).sum() - beta * (lp.exp() * (lp - ref)).sum()))
    # DPO: y1 and y3 keep their reference ratio while y2 vanishes: p(y3) -> 0.1 / 0.55.
    assert p_dpo[1] < 1e-4 and p_dpo[2].item() == pytest.approx(0.1 / 0.55, abs=1e-3)
    assert p_ppo[2] < 0.01 and p_ppo[0] > 0.95


# ---- bad input: one clear error each ---------------------------------------------------------

def test_prompt_longer_than_the_context_is_refused():
    long = PreferencePair("x" * 60, "a", "b", source="prefs.jsonl:3")
    with pytest.raises(LmlabError, match="prefs.jsonl:3.*exceed the context of 48"):
        examples([long])


def test_empty_completion_is_refused():
    m = model()
    b = batch()
    b["chosen_prompt_len"][2] = int(b["chosen_mask"][2].sum())  # the whole row is prompt
    with pytest.raises(LmlabError, match="chosen completion of pair 2 .* no tokens"):
        DPO(reference=frozen_copy(m))(m, b)


def test_reference_with_another_vocabulary_is_refused():
    other = build_model(ModelConfig(name="o", vocab_size=CFG.vocab_size + 5, d_model=32, n_layers=1, n_heads=4,
                                    n_kv_heads=2, ffn_hidden=64, max_seq_len=48))
    with pytest.raises(LmlabError, match=f"vocabulary of {CFG.vocab_size + 5} tokens but the policy {CFG.vocab_size}"):
        DPO(reference=other)(model(), batch())


def test_bad_settings_are_refused():
    with pytest.raises(LmlabError, match="unknown DPO loss 'dpo'"):
        DPO(loss="dpo")
    with pytest.raises(LmlabError, match="label_smoothing is a parameter"):
        DPO(loss="sigmoid", label_smoothing=0.1)
    with pytest.raises(LmlabError, match="separate reference model"):
        DPO(reference=ADAPTERS, tr_tau=4)
    with pytest.raises(LmlabError, match="no adapters"):
        DPO(reference=ADAPTERS)(model(), batch())
    m = model()
    apply_adapters(m, AdapterConfig(r=2, trainable=("lm_head",)))
    with pytest.raises(LmlabError, match="adapter.trainable"):
        DPO(reference=ADAPTERS)(m, batch())


# ---- the library, the stage's data, the command, iterative DPO ------------------------------

@pytest.fixture(scope="module")
def sort_run(tmp_path_factory):
    """A SortWorld export and a tiny chat model over a BPE tokenizer with lmlab's role tokens."""
    from lmlab.checkpoint import save_model
    from lmlab.tokenizer import train_tokenizer
    from lmlab.worlds.export import export_world

    root = tmp_path_factory.mktemp("sort")
    export_world("sort", root / "world", seed=0, n=20)
    texts = [json.loads(line)["text"] for line in (root / "world" / "corpus.jsonl").read_text().splitlines()]
    tok = train_tokenizer(texts, vocab_size=300, min_frequency=1)
    cfg = CFG.replace(vocab_size=tok.vocab_size, max_seq_len=96)
    torch.manual_seed(0)
    save_model(build_model(cfg), root / "base", tokenizer=tok)
    return root


def _cfg(**kw):
    from lmlab.align.dpo import DPOConfig

    base = {"train": {"steps": 3, "batch_size": 4, "lr": 1e-3, "progress": False, "precision": "float32",
                      "log_every": 1},
            "adapter": {"r": 4}}
    for k, v in kw.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return DPOConfig.from_dict(base)


@pytest.mark.parametrize("method,reference", [("lora", "auto"), ("full", "auto"), ("full", "copy")])
def test_train_dpo_writes_model_adapter_and_report(sort_run, tmp_path, method, reference):
    from lmlab.align.dpo import train_dpo
    from lmlab.hub import load_model

    w = sort_run / "world"
    cfg = _cfg(method=method, reference=reference,
               data={"train": str(w / "preferences_train.jsonl"), "val": str(w / "preferences_test_id.jsonl")})
    res = train_dpo(sort_run / "base", tmp_path / "dpo", cfg, log=lambda s: None)
    report = json.loads((tmp_path / "dpo" / "dpo_report.json").read_text())
    assert report["steps"] == 3 and report["reference"] == {"lora": "adapters", "full": reference.replace(
        "auto", "precompute")}[method]
    assert set(report["val"]) >= {"loss", "accuracy", "margin", "rewards_chosen", "rewards_rejected", "kl_to_ref"}
    assert (tmp_path / "dpo" / "adapter").is_dir() == (method == "lora")
    load_model(res.model_dir)  # a plain model that opens like any other
    records = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "accuracy" in r] == [1, 2, 3]


def test_sft_first_then_dpo(sort_run, tmp_path):
    from lmlab.align.dpo import train_dpo

    w = sort_run / "world"
    cfg = _cfg(sft_first=True, sft_train={"steps": 2, "batch_size": 4, "lr": 1e-3, "progress": False,
                                          "precision": "float32"},
               data={"train": str(w / "preferences_train.jsonl")})
    train_dpo(sort_run / "base", tmp_path / "dpo", cfg, log=lambda s: None)
    sft = json.loads((tmp_path / "dpo" / "sft_first" / "finetune_report.json").read_text())
    assert sft["steps"] == 2
    chosen = [json.loads(line) for line in (tmp_path / "dpo" / "sft_first" / "chosen.jsonl").read_text().splitlines()]
    first = json.loads((w / "preferences_train.jsonl").read_text().splitlines()[0])
    assert chosen[0]["messages"][-1] == {"role": "assistant", "content": first["chosen"]}
    adapter_cfg = json.loads((tmp_path / "dpo" / "adapter" / "config.json").read_text())
    assert adapter_cfg["base"].endswith("sft_first/model")  # DPO's adapter sits on the SFT model


def test_cli_align_dpo_and_empty_answer_error(sort_run, tmp_path):
    import yaml

    from lmlab.cli import main

    w = sort_run / "world"
    recipe = {"base": str(sort_run / "base"), "out": str(tmp_path / "run"), "loss": "ipo", "beta": 0.5,
              "data": {"train": str(w / "preferences_train.jsonl")},
              "train": {"steps": 2, "batch_size": 4, "progress": False, "precision": "float32"}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["align", "dpo", "--config", str(tmp_path / "r.yaml"), "--set", "adapter.r=2"]) == 0
    assert json.loads((tmp_path / "run" / "dpo_report.json").read_text())["loss"] == "ipo"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": " "}) + "\n")
    recipe["data"]["train"], recipe["out"] = str(bad), str(tmp_path / "run2")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    from lmlab.align.dpo import dpo_recipe

    with pytest.raises(LmlabError, match=r"bad.jsonl: no pair to learn from: 0 have chosen equal to rejected and 1 an "
                                         "empty answer"):
        dpo_recipe(tmp_path / "r.yaml")
    bad.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "a"}) + "\n")
    with pytest.raises(LmlabError, match="chosen equals rejected in all 1 pairs"):
        dpo_recipe(tmp_path / "r.yaml")


def test_iterative_dpo_rounds_resume_and_label_best_vs_worst(sort_run, tmp_path):
    from lmlab.align.iterative import best_vs_worst, iterative_dpo, make_reward, prompts_of

    w = sort_run / "world"
    cfg = _cfg(data={"train": str(w / "preferences_train.jsonl")},
               iterative={"rounds": 1, "samples": 4, "prompts": 6, "max_new_tokens": 6, "temperature": 1.5})
    prompts = prompts_of(w / "preferences_train.jsonl", 6)
    assert len(prompts) == 6
    reward = make_reward("gold")
    first = iterative_dpo(sort_run / "base", prompts, tmp_path / "it", cfg, reward, log=lambda s: None)
    assert len(first.rounds) == 1 and (tmp_path / "it" / "round-1" / "round.json").is_file()
    pairs = [json.loads(line) for line in (tmp_path / "it" / "round-1" / "pairs.jsonl").read_text().splitlines()]
    assert all(p["chosen_reward"] > p["rejected_reward"] for p in pairs)
    # A second round on resume: round 1 is skipped (its marker), round 2 samples from round 1's policy.
    from dataclasses import replace

    cfg2 = replace(cfg, iterative=replace(cfg.iterative, rounds=2))
    logs = []
    second = iterative_dpo(sort_run / "base", prompts, tmp_path / "it", cfg2, reward, resume=True, log=logs.append)
    assert any("round 1: complete" in s for s in logs)
    assert second.rounds[1]["policy"].endswith("round-1/dpo/model") and second.rounds[1]["reference"] == "start"
    assert (tmp_path / "it" / "model" / "config.json").is_file()
    # Labelling by hand: best vs worst per prompt; an all-tied prompt gives no pair.
    rows = best_vs_worst(["a", "b"], ["x", "y", "z", "u", "u", "u"], torch.tensor([0.1, 0.9, 0.5, 1.0, 1.0, 1.0]),
                         3, "r")
    assert rows == [{"prompt": "a", "chosen": "y", "rejected": "x", "chosen_reward": pytest.approx(0.9),
                     "rejected_reward": pytest.approx(0.1)}]
    with pytest.raises(LmlabError, match="all 3 samples scored the same"):
        best_vs_worst(["b"], ["u", "v", "w"], torch.tensor([1.0, 1.0, 1.0]), 3, "r")


def test_dpo_stage_reads_the_sft_model_and_the_worlds_pairs(sort_run, tmp_path):
    import shutil

    from lmlab.pipeline import StageContext, load_recipe, stage_hashes, stage_module

    run_dir = tmp_path / "run"
    shutil.copytree(sort_run / "world", run_dir / "world")
    shutil.copytree(sort_run / "base", run_dir / "sft" / "model")
    recipe, _ = load_recipe("quick", ["dpo.train.steps=2", "dpo.train.batch_size=4", "dpo.train.progress=false",
                                   "dpo.train.precision=float32", "dpo.adapter.r=2"])
    assert "dpo" in stage_hashes(recipe) and "dpo" not in recipe.stages  # not in the quick run
    stage_module("dpo").run(StageContext("dpo", run_dir, recipe, echo=lambda s: None))
    report = json.loads((run_dir / "dpo" / "dpo_report.json").read_text())
    assert report["steps"] == 2 and report["val_pairs"] > 0  # validated on preferences_test_id
