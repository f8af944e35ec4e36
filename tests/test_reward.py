"""Reward models: the last-real-token read under every padding, the Bradley–Terry loss
against hand-computed values, preference data, training through the one loop, the
Reward interface, and Hugging Face sequence-classification interop (transformers as oracle)."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch

from lmlab.checkpoint import read_config_json, save_model
from lmlab.config import ModelConfig
from lmlab.data.preference import (
    PairEncoder, PreferenceCollator, PreferencePair, encode_pairs, pad_rows, read_preference_jsonl,
)
from lmlab.errors import LmlabError
from lmlab.model.heads import RewardModel, last_real_index, real_positions
from lmlab.model.transformer import build_model
from lmlab.rewards import EnsembleReward, GoldReward, ModelReward, Reward, load_reward_model, save_reward_model
from lmlab.rewards.train import RewardConfig, score_file, train_reward_model, train_reward_on_pairs
from lmlab.train.objectives.reward import BradleyTerry

from chartok import CharTokenizer

TOK = CharTokenizer()
CFG = ModelConfig(name="t", vocab_size=TOK.vocab_size, d_model=32, n_layers=2, n_heads=4,
                  n_kv_heads=2, ffn_hidden=64, max_seq_len=48)


def random_rm(cfg=CFG, seed=0) -> RewardModel:
    torch.manual_seed(seed)
    rm = RewardModel(cfg)
    torch.nn.init.normal_(rm.score.weight, 0.0, 1.0)
    return rm.eval()


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ---- which token is read ----------------------------------------------------------------

def test_last_real_index_hand_values():
    mask = torch.tensor([[1, 1, 1, 0, 0],    # right padded
                         [0, 0, 1, 1, 1],    # left padded
                         [1, 1, 1, 1, 1],
                         [0, 1, 1, 0, 0]])   # padded on both sides
    assert last_real_index(mask).tolist() == [2, 4, 4, 2]
    assert real_positions(mask)[1].tolist() == [0, 0, 0, 1, 2]
    with pytest.raises(LmlabError, match="no real token"):
        last_real_index(torch.tensor([[0, 0]]))


@pytest.mark.parametrize("pad_id", [TOK.pad_id, TOK.eos_id])
def test_score_is_the_same_alone_and_in_padded_batches(pad_id):
    rm = random_rm()
    g = torch.Generator().manual_seed(3)
    # Every sequence ends with EOS; with pad == eos the padding is the same id as the last
    # real token, and one sequence also holds the pad id inside it.
    seqs = [torch.randint(8, CFG.vocab_size, (n,), generator=g).tolist() + [TOK.eos_id] for n in (2, 6, 11)]
    seqs[1][2] = pad_id
    with torch.no_grad():
        alone = torch.cat([rm(torch.tensor([s])) for s in seqs])
        for side in ("right", "left"):
            ids, mask = pad_rows(seqs, pad_id, side, width=15)
            batched = rm(ids, mask)
            assert torch.allclose(batched, alone, atol=1e-5), (side, batched, alone)
    # The read is really at the last real token: changing it changes the score.
    ids, mask = pad_rows(seqs, pad_id, "right")
    other = ids.clone()
    other[0, len(seqs[0]) - 1] = 9
    with torch.no_grad():
        assert not torch.isclose(rm(other, mask)[0], rm(ids, mask)[0])


def test_reward_model_has_no_lm_head_and_from_lm_shares_the_trunk():
    lm = build_model(CFG)
    rm = RewardModel.from_lm(lm)
    assert all("lm_head" not in k for k in rm.state_dict())
    assert rm.transformer is lm and torch.count_nonzero(rm.score.weight) == 0
    with pytest.raises(LmlabError, match="no LM head"):
        rm.transformer(torch.tensor([[1, 2]]))


# ---- Bradley–Terry ----------------------------------------------------------------------

class FixedScores(torch.nn.Module):
    """A 'model' whose scores are given: row i of the concatenated batch scores values[i]."""

    def __init__(self, values):
        super().__init__()
        self.values = torch.tensor(values, dtype=torch.float32)

    def forward(self, ids, mask):
        assert ids.shape[0] == len(self.values)  # chosen and rejected in one forward
        return self.values


def pair_batch(n, width_c=4, width_r=6, margin=None):
    b = {"chosen_ids": torch.ones(n, width_c, dtype=torch.long), "chosen_mask": torch.ones(n, width_c, dtype=torch.bool),
         "rejected_ids": torch.ones(n, width_r, dtype=torch.long),
         "rejected_mask": torch.ones(n, width_r, dtype=torch.bool)}
    if margin is not None:
        b["margin"] = torch.tensor(margin)
    return b


def test_equal_scores_give_ln2_and_untrained_rm_starts_there():
    loss, m = BradleyTerry()(FixedScores([0.7, -1.0, 0.7, -1.0]), pair_batch(2))
    assert float(loss) == pytest.approx(math.log(2), abs=1e-7)
    assert float(m["accuracy"]) == 0.5 and float(m["margin"]) == 0.0
    rm = RewardModel.from_lm(build_model(CFG))  # zero head
    loss, _ = BradleyTerry()(rm, pair_batch(3))
    assert float(loss.detach()) == pytest.approx(math.log(2), abs=1e-7)


def test_bradley_terry_hand_values_margin_and_centring():
    # chosen 2, 0; rejected 1, 3  -> differences 1, -3; margins 0.5, 0
    model = FixedScores([2.0, 0.0, 1.0, 3.0])
    sp = lambda x: math.log1p(math.exp(-x))  # noqa: E731  -log sigmoid
    loss, m = BradleyTerry()(model, pair_batch(2))
    assert float(loss) == pytest.approx((sp(1) + sp(-3)) / 2, rel=1e-6)
    assert float(m["accuracy"]) == 0.5 and float(m["margin"]) == pytest.approx(-1.0)
    assert float(m["reward_mean"]) == pytest.approx(1.5)
    assert float(m["reward_std"]) == pytest.approx(math.sqrt(((0.5) ** 2 + 1.5 ** 2 + 0.5 ** 2 + 1.5 ** 2) / 4))
    loss, m = BradleyTerry(center_weight=0.1)(model, pair_batch(2, margin=[0.5, 0.0]))
    bt = (sp(1 - 0.5) + sp(-3)) / 2
    assert float(m["loss"]) == pytest.approx(bt, rel=1e-6)
    assert float(loss) == pytest.approx(bt + 0.1 * ((2 + 1) ** 2 + (0 + 3) ** 2) / 2, rel=1e-6)
    obj = BradleyTerry()
    assert obj.weight(pair_batch(5)) == 5 and obj.tokens(pair_batch(5)) == 5 * (4 + 6)


def test_objective_matches_separate_forwards_with_different_widths():
    rm = random_rm()
    c = [[0, 9, 10, 11], [0, 12, 13]]
    r = [[0, 9, 10, 11, 14, 15, 16], [0, 17]]
    c_ids, c_mask = pad_rows(c, TOK.pad_id)
    r_ids, r_mask = pad_rows(r, TOK.pad_id)
    obj = BradleyTerry()
    with torch.no_grad():
        rc, rr = obj.scores(rm, {"chosen_ids": c_ids, "chosen_mask": c_mask, "rejected_ids": r_ids,
                                 "rejected_mask": r_mask})
        alone_c = torch.cat([rm(torch.tensor([s])) for s in c])
        alone_r = torch.cat([rm(torch.tensor([s])) for s in r])
    assert torch.allclose(rc, alone_c, atol=1e-5) and torch.allclose(rr, alone_r, atol=1e-5)


# ---- preference data --------------------------------------------------------------------

def test_read_text_and_chat_pairs(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "hi", "chosen": "ab", "rejected": "cd", "margin": 1},
        "",
        {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "yes"}],
         "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "no"}]},
        {"prompt": [{"role": "user", "content": "q2"}], "chosen": [{"role": "assistant", "content": "y"}],
         "rejected": [{"role": "assistant", "content": "n"}]},
        {"prompt": "same", "chosen": "x", "rejected": "x"},
    ])
    prefs = read_preference_jsonl(path)
    assert len(prefs.pairs) == 3 and prefs.skipped_identical == 1 and prefs.has_margin
    assert prefs.pairs[1].prompt == ({"role": "user", "content": "q"},) and prefs.pairs[1].chosen == "yes"
    enc = PairEncoder(TOK, "lmlab")
    ex = encode_pairs(prefs.pairs, enc, 48)
    # <|bos|> <|user|> h i <|end|> <|assistant|> | a b <|end|>
    v = TOK.vocab
    assert list(ex[0].chosen_ids) == [0, v["<|user|>"], v["h"], v["i"], v["<|end|>"], v["<|assistant|>"],
                                      v["a"], v["b"], v["<|end|>"]]
    assert ex[0].chosen_prompt_len == 6 and ex[0].margin == 1.0 and ex[1].margin == 0.0
    plain = encode_pairs(prefs.pairs[:1], PairEncoder(TOK, "none"), 48)[0]
    assert list(plain.rejected_ids) == [0, v["h"], v["i"], v["c"], v["d"], TOK.eos_id]
    assert plain.rejected_prompt_len == 3
    batch = PreferenceCollator(TOK.pad_id, with_margin=True)(ex)
    assert batch["chosen_ids"].shape == batch["rejected_ids"].shape
    assert batch["chosen_mask"].sum(1).tolist() == [len(e.chosen_ids) for e in ex]
    assert batch["margin"].tolist() == [1.0, 0.0, 0.0]


@pytest.mark.parametrize("rows, match", [
    ([], "holds no preference pairs"),
    ([{"prompt": "p", "chosen": "a", "rejected": "a"}] * 3, "chosen equals rejected in all 3"),
    ([{"prompt": "p", "chosen": "a", "rejected": "b"}, "{not json"], r"p\.jsonl:2: malformed JSON"),
    ([{"prompt": "p", "chosen": "a"}], r"p\.jsonl:1: .*missing \['rejected'\]"),
    ([{"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}], "margin"),
    ([{"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "y"}],
       "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "n"}]}],
     "same conversation"),
])
def test_bad_preference_files_are_refused_and_nothing_is_written(tmp_path, rows, match):
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(LmlabError, match=match):
        read_preference_jsonl(path)
    base = tmp_path / "base"
    save_model(build_model(CFG), base)
    with pytest.raises(LmlabError, match=match):
        train_reward_model(base, path, tmp_path / "run", log=lambda s: None)
    assert not (tmp_path / "run").exists()


def test_over_long_pairs_refused_or_truncated_from_the_prompt():
    pair = PreferencePair("x" * 40, "ab", "cd", None, "f:1")
    enc = PairEncoder(TOK, "none")
    with pytest.raises(LmlabError, match="f:1: 44 tokens exceed the context of 20.*truncate"):
        encode_pairs([pair], enc, 20)
    ex = encode_pairs([pair], enc, 20, truncate=True)[0]
    assert len(ex.chosen_ids) == 20 and ex.chosen_ids[-3:] == (TOK.vocab["a"], TOK.vocab["b"], TOK.eos_id)
    assert ex.chosen_prompt_len == 17


# ---- training -------------------------------------------------------------------------

def separable_pairs(n, seed):
    """Chosen answers use letters a-d, rejected ones w-z: separable by any token feature."""
    rng = random.Random(seed)
    return [PreferencePair("".join(rng.choice("mnop") for _ in range(3)),
              "".join(rng.choice("abcd") for _ in range(3)),
              "".join(rng.choice("wxyz") for _ in range(3)), None, f"pair {i}") for i in range(n)]


def config(method, steps=25):
    return RewardConfig.from_dict({
        "method": method, "head_init_std": 0.02,
        "adapter": {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj", "up_proj"]},
        "train": {"steps": steps, "batch_size": 8, "lr": 1e-2, "progress": False, "log_every": 5},
    })


@pytest.mark.parametrize("method", ["full", "lora"])
def test_training_raises_pairwise_accuracy_and_saves_a_reward_checkpoint(tmp_path, method):
    from lmlab.data.preference import PreferenceDataset
    from lmlab.rewards.train import evaluate_pairs

    rm = RewardModel.from_lm(build_model(CFG), head_init_std=0.02)
    val = separable_pairs(32, 1)
    enc = PairEncoder(TOK, "lmlab")
    val_set = PreferenceDataset(encode_pairs(val, enc, 48))
    before = evaluate_pairs(rm, val_set, PreferenceCollator(TOK.pad_id))
    res = train_reward_on_pairs(rm, TOK, separable_pairs(64, 0), val, tmp_path / "run", config(method),
                                log=lambda s: None)
    assert res.val_metrics["accuracy"] >= 0.95 > before["accuracy"] + 0.2
    assert res.val_metrics["loss"] < before["loss"] - 0.3
    trained = [n for n, p in rm.named_parameters() if p.requires_grad]
    assert "score.weight" in trained
    meta = read_config_json(res.model_dir)
    assert meta["kind"] == "reward" and meta["reward"] == {"template": "lmlab"}
    again = load_reward_model(res.model_dir)
    ids, mask = pad_rows([e.chosen_ids for e in val_set.examples[:4]], TOK.pad_id)
    with torch.no_grad():
        assert torch.allclose(again(ids, mask), rm.eval()(ids, mask), atol=1e-6)
    if method == "lora":
        from safetensors.torch import load_file

        assert "score.weight" in load_file(str(tmp_path / "run" / "adapter" / "adapter.safetensors"))
    report = json.loads((tmp_path / "run" / "reward_report.json").read_text())
    assert report["val"]["accuracy"] == res.val_metrics["accuracy"]


def test_train_reward_model_end_to_end_with_bpe_tokenizer_and_score_file(tmp_path):
    from lmlab.tokenizer import train_tokenizer

    texts = ["mnop abcd wxyz " * 4, "the quick brown fox", "abc wxy mno"] * 5
    tok = train_tokenizer(texts, vocab_size=300, min_frequency=1)
    cfg = CFG.replace(vocab_size=tok.vocab_size)
    base = tmp_path / "base"
    save_model(build_model(cfg), base, tokenizer=tok)
    pairs = separable_pairs(48, 0)
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}
                                           for p in pairs])
    rc = config("dora", steps=20)
    res = train_reward_model(base, tmp_path / "train.jsonl", tmp_path / "rm", rc, log=lambda s: None)
    assert res.train_metrics["accuracy"] >= 0.9
    rows = [{"prompt": "mno", "completion": "abc", "id": 1},
            {"prompt": "mno", "chosen": "abd", "rejected": "wxy"},
            {"messages": [{"role": "user", "content": "mno"}, {"role": "assistant", "content": "xyz"}]}]
    write_jsonl(tmp_path / "in.jsonl", rows)
    assert score_file(res.model_dir, tmp_path / "in.jsonl", tmp_path / "out.jsonl", batch_size=2) == 3
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    reward = ModelReward.from_dir(res.model_dir, batch_size=1)
    expect = reward.score(["mno", "mno", "mno", "mno"], ["abc", "abd", "wxy", "xyz"]).tolist()
    got = [out[0]["score"], out[1]["chosen_score"], out[1]["rejected_score"], out[2]["score"]]
    assert got == pytest.approx(expect, abs=1e-5) and out[0]["id"] == 1
    assert out[1]["chosen_score"] > out[1]["rejected_score"]
    write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "completion": "y"}, {"text": "?"}])
    with pytest.raises(LmlabError, match=r"bad\.jsonl:2"):
        score_file(res.model_dir, tmp_path / "bad.jsonl", tmp_path / "bad_out.jsonl")
    assert not (tmp_path / "bad_out.jsonl").exists()


# ---- the Reward interface ---------------------------------------------------------------

class Constant:
    def __init__(self, values):
        self.values = torch.tensor(values)

    def score(self, prompts, completions):
        return self.values[: len(completions)]


def test_model_reward_batches_in_any_order_and_matches_the_model():
    rm = random_rm()
    reward = ModelReward(rm, TOK, batch_size=2)
    prompts, comps = ["ab", "a", "abcdef", "b", "xyz"], ["c", "long answer", "d", "e", "ff"]
    got = reward.score(prompts, comps)
    with torch.no_grad():
        one = [float(rm(torch.tensor([reward.encode(p, c)]))) for p, c in zip(prompts, comps)]
    assert got.tolist() == pytest.approx(one, abs=1e-5)
    with pytest.raises(LmlabError, match="one prompt per completion"):
        reward.score(["a"], ["b", "c"])


def test_ensemble_mean_and_conservative_mean_minus_std():
    members = [Constant([1.0, 0.0]), Constant([3.0, 0.0]), Constant([2.0, 3.0])]
    p, c = ["x", "y"], ["a", "b"]
    assert EnsembleReward(members).score(p, c).tolist() == pytest.approx([2.0, 1.0])
    # population std: [1,3,2] -> sqrt(2/3); [0,0,3] -> sqrt(2)
    got = EnsembleReward(members, "mean_minus_std", k=2.0).score(p, c).tolist()
    assert got == pytest.approx([2.0 - 2 * math.sqrt(2 / 3), 1.0 - 2 * math.sqrt(2)])
    with pytest.raises(LmlabError, match="mode"):
        EnsembleReward(members, "median")


def test_gold_reward_values_and_every_reward_is_interchangeable():
    gold = GoldReward("sort", "dense", ended=True)
    # ideal: 1.0; "a c" for symbols c a b: coverage 2/3, order 1/3 (a<c), ended -> 0.5*2/3+0.3/3+0.2
    assert gold.score(["sort: c a b"] * 2, ["a b c", "a c"]).tolist() == pytest.approx(
        [1.0, 0.5 * 2 / 3 + 0.3 / 3 + 0.2])
    assert GoldReward(kind="sparse").score(["sort: b a"], ["a b <|end|>"]).tolist() == [1.0]

    def best_of(reward: Reward, prompt, answers):
        return answers[int(reward.score([prompt] * len(answers), answers).argmax())]

    rewards = [gold, ModelReward(random_rm(), TOK), EnsembleReward([gold, gold], "mean_minus_std")]
    for r in rewards:
        assert isinstance(r, Reward)
        assert best_of(r, "sort: c a b", ["a b c", "c"]) in ("a b c", "c")
    assert best_of(gold, "sort: c a b", ["c a", "a b c", "b"]) == "a b c"


# ---- Hugging Face sequence classification -----------------------------------------------

transformers = pytest.importorskip("transformers")


def hf_scores(hf, ids, mask, positions=None):
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask.long(), position_ids=positions, use_cache=False).logits[:, 0]


@pytest.fixture
def exported(tmp_path):
    from lmlab.interop.hf_reward import convert_reward_to_hf

    rm = random_rm(CFG.replace(n_kv_heads=2))
    save_reward_model(rm, tmp_path / "rm", extra={"tokens": {"bos_token_id": 0, "eos_token_id": 1,
                                                              "pad_token_id": 2}})
    convert_reward_to_hf(tmp_path / "rm", tmp_path / "hf")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf", attn_implementation="eager")
    return rm, hf.eval(), tmp_path


def test_hf_sequence_classification_scores_equal_ours(exported):
    rm, hf, _ = exported
    assert type(hf).__name__ == "LlamaForSequenceClassification" and hf.config.pad_token_id == 2
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(8, CFG.vocab_size, (n,), generator=g).tolist() + [TOK.eos_id] for n in (3, 7, 12)]
    with torch.no_grad():
        ids, mask = pad_rows(seqs, 2, "right")
        ours = rm(ids, mask)
        assert torch.allclose(hf_scores(hf, ids, mask), ours, atol=1e-5)
        # transformers takes positions from the cache slots; left padding needs them given.
        ids, mask = pad_rows(seqs, 2, "left")
        assert torch.allclose(hf_scores(hf, ids, mask, real_positions(mask)), ours, atol=1e-5)
        assert torch.allclose(rm(ids, mask), ours, atol=1e-5)


def test_hf_round_trip_and_pad_eq_eos(exported):
    from lmlab.interop.hf_reward import convert_reward_from_hf, convert_reward_to_hf

    rm, hf, tmp = exported
    back = load_reward_model(tmp / "hf")  # a HF directory loads directly
    convert_reward_from_hf(tmp / "hf", tmp / "back")
    again = load_reward_model(tmp / "back")
    for k, v in rm.state_dict().items():
        assert torch.equal(back.state_dict()[k], v) and torch.equal(again.state_dict()[k], v)
    assert read_config_json(tmp / "back")["tokens"]["pad_token_id"] == 2
    # pad == eos: transformers treats a trailing EOS as padding and reads the token before it.
    save_reward_model(rm, tmp / "rm_eos", extra={"tokens": {"eos_token_id": 1, "pad_token_id": 1}})
    with pytest.raises(LmlabError, match="pad_token_id == eos_token_id"):
        convert_reward_to_hf(tmp / "rm_eos", tmp / "hf_eos")
    assert not (tmp / "hf_eos").exists()
    convert_reward_to_hf(tmp / "rm_eos", tmp / "hf_eos", allow_pad_eos=True)
    hf_eos = transformers.AutoModelForSequenceClassification.from_pretrained(tmp / "hf_eos").eval()
    seq = [9, 10, 11, TOK.eos_id]
    ids, mask = pad_rows([seq, seq[:2] + [TOK.eos_id]], 1, "right", width=6)
    with torch.no_grad():
        before_eos = rm(torch.tensor([seq[:-1]]))
        assert torch.allclose(hf_scores(hf_eos, ids, mask)[0], before_eos[0], atol=1e-5)
        assert not torch.allclose(rm(ids, mask)[0], before_eos[0], atol=1e-3)


def test_hf_export_refusals(tmp_path):
    from lmlab.interop.hf_reward import convert_reward_to_hf

    save_model(build_model(CFG), tmp_path / "lm")
    with pytest.raises(LmlabError, match="not a reward model"):
        convert_reward_to_hf(tmp_path / "lm", tmp_path / "out")
    save_reward_model(random_rm(), tmp_path / "rm")
    with pytest.raises(LmlabError, match="needs pad_token_id"):
        convert_reward_to_hf(tmp_path / "rm", tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_linear_probe_then_members_start_from_the_probe(tmp_path):
    """WARM's recipe: a head-only probe on the frozen SFT trunk, then members that start
    from the probe's trunk and head."""
    from lmlab.rewards.train import initial_reward_model

    lm = build_model(CFG)
    trunk = {k: v.clone() for k, v in lm.state_dict().items() if "lm_head" not in k}
    rm = RewardModel.from_lm(lm)
    res = train_reward_on_pairs(rm, TOK, separable_pairs(32, 0), None, tmp_path / "probe",
                                config("head", steps=10), log=lambda s: None)
    assert res.report.trainable == CFG.d_model
    probe = load_reward_model(res.model_dir)
    after = probe.state_dict()
    assert all(torch.equal(after["transformer." + k], v) for k, v in trunk.items())
    assert torch.count_nonzero(after["score.weight"]) == CFG.d_model
    start = initial_reward_model(res.model_dir)
    assert all(torch.equal(start.state_dict()[k], v) for k, v in after.items())


def test_moe_trunk_scores_are_padding_invariant_and_router_loss_is_added():
    cfg = CFG.replace(n_experts=4, top_k=2, moe_aux_loss_weight=0.01)
    rm = random_rm(cfg)
    seqs = [[3, 4, 5], [6, 7, 8, 9, 10, 11]]
    with torch.no_grad():
        alone = torch.cat([rm(torch.tensor([s])) for s in seqs])
        ids, mask = pad_rows(seqs, TOK.pad_id, "left")
        assert torch.allclose(rm(ids, mask), alone, atol=1e-5)
        loss, m = BradleyTerry()(rm, {"chosen_ids": ids, "chosen_mask": mask, "rejected_ids": ids,
                                      "rejected_mask": mask})
    assert float(m["loss"]) == pytest.approx(math.log(2))
    assert float(loss) == pytest.approx(math.log(2) + 0.01 * float(m["moe_aux_loss"]), rel=1e-6)
