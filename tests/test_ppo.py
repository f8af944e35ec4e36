"""PPO end to end over the rollout source: the first minibatch is on-policy (ratio 1, no
clipping), the score lands on the last real token, the sampler and the training forward
agree, a bandit and a verifiable task are solved, a resumed run equals the uninterrupted
one bit for bit, and bad input gives one clear error. The pure math (GAE, whitening, KL
estimators, clipped losses, EMA) is checked in tests/test_rl.py and tests/test_losses.py."""
from __future__ import annotations

import copy
import shutil

import pytest
import torch

from lmlab.data import IGNORE_INDEX
from lmlab.errors import LmlabError
from lmlab.model.heads import ValueModel
from lmlab.train.loop import train
from lmlab.train.objectives.ppo import PPO, PPOConfig
from lmlab.train.rollout import RolloutConfig, Rollouts, encode_prompts, last_target_index, layout

from rlkit import SYMBOLS, TOK, Bandit, NextSymbol, first_token_probs, metrics, tiny_config, tiny_policy, train_cfg


def source(policy, obj, reward=None, prompts=("a", "b c", "d a b c"), **kw):
    cfg = RolloutConfig(**{"prompts": 3, "group_size": 4, "max_new_tokens": 5, **kw})
    return Rollouts(policy, TOK, list(prompts), reward or Bandit(), cfg, obj)


def test_first_minibatch_has_ratio_one_and_no_clipping():
    policy = tiny_policy()
    obj = PPO(policy, PPOConfig(kl_coef=0.1), temperature=0.8, max_new_tokens=5)
    src = source(policy, obj, temperature=0.8, forward_batch=5)  # scored in chunks unlike the minibatch
    batch = src.next_batch(4)
    _, m = obj(policy, batch)
    assert float(m["clip_fraction"]) == 0.0
    assert float(m["ratio_max_dev"]) < 1e-5
    assert abs(float(m["approx_kl"])) < 1e-7
    # The sampler (KV cache, left-padded prompts) and the training forward agree.
    assert float(batch["stat_max_dlogp"][0]) < 1e-4
    # Before any update the reference is the policy: the KL to it is zero.
    assert abs(float(m["kl_ref"])) < 1e-6


def test_first_step_in_the_loop_is_on_policy(tmp_path):
    policy = tiny_policy()
    obj = PPO(policy, PPOConfig())
    train(policy, obj, source(policy, obj), train_cfg(2, 6, micro_batch_size=3), tmp_path, log=lambda s: None)
    first = metrics(tmp_path)[1]
    assert first["step"] == 1 and first["clip_fraction"] == 0.0 and first["ratio_max_dev"] < 1e-5


def test_score_lands_on_the_last_real_token_under_left_padding():
    # Hand-built rows: prompts of 5 and 7 tokens (left-padded by the sampler), completions
    # of 3 and 1 tokens whose last token is the stop token; pad == eos does not confuse it.
    prompts = [[0, 4, 7, 6, 5], [0, 4, 8, 9, 10, 6, 5]]
    comps = [[7, 8, 6], [6]]
    batch = layout(prompts, comps, pad_id=TOK.eos_id)
    assert last_target_index(batch["targets"]).tolist() == [4 + 2, 6 + 0]
    batch["score"] = torch.tensor([2.0, -1.0])
    batch["old_logp"] = batch["ref_logp"] = torch.zeros(batch["targets"].shape)
    obj = PPO(tiny_policy(), PPOConfig(kl_coef=0.0, ema=False))
    rewards, _ = obj.token_rewards(batch)
    want = torch.zeros(batch["targets"].shape)
    want[0, 6], want[1, 6] = 2.0, -1.0
    assert torch.equal(rewards, want)
    assert batch["targets"][0, 6] == 6 and batch["targets"][1, 6] == 6  # the stop token, not a pad

    # From a real rollout (prompts of 5..8 tokens, left-padded while sampling): every row's
    # score sits on its last completion token, which is the last token it generated.
    policy = tiny_policy()
    obj = PPO(policy, PPOConfig(kl_coef=0.0, ema=False))
    src = source(policy, obj)
    roll = src.make_rollout(0)
    rewards, _ = obj.token_rewards(roll)
    last = last_target_index(roll["targets"])
    lengths = [len(p) for p in encode_prompts(["a", "b c", "d a b c"], TOK)]
    assert len(set(lengths)) == 3
    for i in range(roll["targets"].shape[0]):
        nz = rewards[i].nonzero().flatten().tolist()
        assert nz in ([int(last[i])], []) and float(rewards[i, last[i]]) == float(roll["score"][i])
        assert roll["targets"][i, last[i]] != IGNORE_INDEX
        assert bool((roll["targets"][i, last[i] + 1:] == IGNORE_INDEX).all())


def _ppo_run(policy, reward, prompts, rollout, cfg, run_dir, steps, batch_size, **kw):
    obj = PPO(policy, cfg, temperature=rollout.temperature, max_new_tokens=rollout.max_new_tokens)
    src = Rollouts(policy, TOK, prompts, reward, rollout, obj)
    result = train(policy, obj, src, train_cfg(steps, batch_size, **kw), run_dir, log=lambda s: None)
    return obj, result


def test_two_armed_bandit_is_solved(tmp_path):
    policy = tiny_policy()
    rollout = RolloutConfig(prompts=2, group_size=8, max_new_tokens=1)
    _ppo_run(policy, Bandit(), ["a", "b"], rollout, PPOConfig(kl_coef=0.01), tmp_path, 30, 16)
    p_a = float(first_token_probs(policy, "a")[TOK.token_to_id("a")])
    assert p_a > 0.9, p_a
    assert metrics(tmp_path)[-1]["reward"] > 0.9


def test_verifiable_task_is_solved(tmp_path):
    policy = tiny_policy(seed=1)
    rollout = RolloutConfig(prompts=4, group_size=16, max_new_tokens=2)
    _ppo_run(policy, NextSymbol(), list(SYMBOLS), rollout, PPOConfig(kl_coef=0.01), tmp_path, 60, 64, lr=5e-3)
    rows = metrics(tmp_path)
    early = sum(r["reward"] for r in rows[1:6]) / 5
    late = sum(r["reward"] for r in rows[-5:]) / 5
    assert early < 0.3 and late > 0.85, (early, late)


@pytest.mark.parametrize("shared_trunk", [False, True])
def test_resume_mid_rollout_reproduces_the_uninterrupted_run(tmp_path, shared_trunk):
    # 12 rows per rollout, 2 epochs, optimizer batches of 6 in micro-batches of 3: four steps
    # per rollout, so the checkpoint after step 3 falls inside a rollout's buffer.
    rollout = RolloutConfig(prompts=3, group_size=4, max_new_tokens=4, epochs=2)
    cfg = PPOConfig(kl_coef=0.05, kl_estimator="k3", entropy_coef=0.01, shared_trunk=shared_trunk)
    kw = dict(micro_batch_size=3, checkpoint_every=3, keep_checkpoints=0, schedule="cosine")
    prompts = ["a", "b c", "d a b c"]
    full = tmp_path / "full"
    obj_a, _ = _ppo_run(tiny_policy(), Bandit(), prompts, rollout, cfg, full, 6, 6, **kw)
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-3", part / "checkpoints" / "step-3")
    (part / "checkpoints" / "latest").write_text("step-3\n")
    shutil.copy(full / "metrics.jsonl", part / "metrics.jsonl")
    policy_b = tiny_policy(seed=5)  # different weights: everything must come from the checkpoint
    obj_b = PPO(policy_b, cfg, temperature=1.0, max_new_tokens=4)
    src_b = Rollouts(policy_b, TOK, prompts, Bandit(), rollout, obj_b)
    train(policy_b, obj_b, src_b, train_cfg(6, 6, **kw), part, resume=True, log=lambda s: None)

    from lmlab.checkpoint import load_state_dict

    for name in ("model.safetensors", "value_head.safetensors" if shared_trunk else "value.safetensors",
                 "objective.safetensors", "optimizer.safetensors"):
        a = load_state_dict(full / "checkpoints" / "step-6" / name)
        b = load_state_dict(part / "checkpoints" / "step-6" / name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    # Timings differ, and the loop counts `tokens` per session.
    timing = {"tokens", "tokens_per_s", "elapsed_s", "gen_s", "rollout_s"}
    untimed = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    assert untimed(metrics(full)) == untimed(metrics(part))
    # The EMA really moved the reference (so restoring it was needed).
    ref = obj_a.reference.state_dict()
    assert any(not torch.equal(v, obj_a.policy.state_dict()[k]) for k, v in ref.items())


def test_kl_in_the_loss_and_the_estimators_run():
    policy = tiny_policy()
    for est in ("k1", "k2", "k3"):
        obj = PPO(policy, PPOConfig(kl_in="loss", kl_estimator=est, aggregation="seq_mean_token_mean"))
        batch = source(policy, obj).next_batch(4)
        loss, m = obj(policy, batch)
        assert torch.isfinite(loss) and "kl_ref" in m


def test_bad_input_gives_one_clear_error():
    policy = tiny_policy()
    with pytest.raises(LmlabError, match="value model"):
        PPO(policy, PPOConfig(), value_model=ValueModel(tiny_config(vocab_size=TOK.vocab_size + 5)))
    with pytest.raises(LmlabError, match="value model"):
        PPO(policy, PPOConfig(), value_model=copy.deepcopy(policy))  # an LM, not a critic
    with pytest.raises(LmlabError, match="shared_trunk"):
        PPO(policy, PPOConfig(shared_trunk=True), value_model=ValueModel(tiny_config()))
    with pytest.raises(LmlabError, match="needs prompts"):
        source(policy, PPO(policy), prompts=())
    with pytest.raises(LmlabError, match="kl_in"):
        PPOConfig(kl_in="elsewhere")
    with pytest.raises(LmlabError, match="KL estimator"):
        PPO(policy, PPOConfig(kl_estimator="k4"))
    with pytest.raises(LmlabError, match="temperature"):
        RolloutConfig(temperature=0)


# ---- the stage / command: files on disk in, files on disk out ------------------------------

def _base(tmp_path):
    """A tiny SFT-shaped policy with a BPE tokenizer, a SortWorld export, a reward model."""
    import json as _json

    from lmlab.checkpoint import save_model
    from lmlab.model.heads import RewardModel
    from lmlab.model.transformer import build_model
    from lmlab.rewards import save_reward_model
    from lmlab.tokenizer import train_tokenizer
    from lmlab.worlds.export import export_world

    export_world("sort", tmp_path / "world", seed=0, n=20)
    texts = [_json.loads(line)["text"] for line in (tmp_path / "world" / "corpus.jsonl").read_text().splitlines()]
    tok = train_tokenizer(texts, vocab_size=300, min_frequency=1)
    cfg = tiny_config(vocab_size=tok.vocab_size, max_seq_len=64)
    torch.manual_seed(0)
    save_model(build_model(cfg), tmp_path / "sft", tokenizer=tok)
    rm = RewardModel(cfg)
    torch.nn.init.normal_(rm.score.weight, 0.0, 1.0)
    save_reward_model(rm, tmp_path / "rm", tokenizer=tok)
    return tmp_path


@pytest.mark.parametrize("method,reward", [("ppo", {"kind": "gold", "gold": "sparse"}),
                                           ("grpo", {"kind": "model"}), ("rloo", {"kind": "ensemble"})])
def test_align_recipe_end_to_end(tmp_path, method, reward):
    import json as _json

    import yaml

    from lmlab.cli import main
    from lmlab.align.online import align_recipe

    root = _base(tmp_path)
    if reward["kind"] == "model":
        reward["paths"] = [str(root / "rm")]
    elif reward["kind"] == "ensemble":
        reward["paths"] = [str(root / "rm"), str(root / "rm")]
    recipe = {"policy": str(root / "sft"), "prompts": str(root / "world" / "sft.jsonl"),
              "eval_prompts": str(root / "world" / "eval.jsonl"), "eval_n": 2, "out": str(root / "out"),
              "iterations": 2, "rollout": {"prompts": 2, "group_size": 2, "max_new_tokens": 6, "format_penalty": 0.1,
                                           "empty_score": -1.0},
              "reward": reward, "train": {"precision": "float32", "progress": False, "lr": 1e-3}}
    (root / "r.yaml").write_text(yaml.safe_dump(recipe))
    res = align_recipe(method, root / "r.yaml", log=lambda s: None)
    out = root / "out"
    assert (out / "model" / "config.json").is_file()
    assert (out / "value" / "config.json").is_file() == (method == "ppo")
    report = _json.loads((out / "rl_report.json").read_text())
    assert report["method"] == method and report["steps"] == 2 and 0 < report["generate_share"] < 1
    assert set(report["after"]) == {"gold_dense", "gold_sparse", "exact_match", "kl_to_sft"}
    rows = metrics(out)
    assert all(k in rows[-1] for k in ("reward", "gold", "clip_fraction", "max_dlogp"))
    assert _json.loads(_json.dumps(res.report)) == report
    # The command wraps the same function (and rejects a typo with the key named).
    assert main(["align", method, "--config", str(root / "r.yaml"), "--set", "out=" + str(root / "cli"),
                 "--set", "iterations=1"]) == 0
    assert main(["align", method, "--config", str(root / "r.yaml"), "--set", "rollout.group_sise=2"]) == 2


def test_stage_reads_the_sft_model_and_world_by_name(tmp_path):
    import json as _json

    from lmlab.pipeline import Recipe, StageContext, load_recipe
    from lmlab.stages import grpo as grpo_stage

    root = _base(tmp_path / "run")
    (root / "sft" / "model").mkdir()
    for f in (root / "sft").iterdir():
        if f.is_file():
            f.rename(root / "sft" / "model" / f.name)
    recipe, _ = load_recipe(None, ["grpo.iterations=1", "grpo.rollout.prompts=2", "grpo.rollout.group_size=2",
                                   "grpo.rollout.max_new_tokens=4", "grpo.eval_n=2", "grpo.train.progress=false",
                                   "grpo.train.precision=float32"])
    assert isinstance(recipe, Recipe) and recipe.grpo.iterations == 1
    grpo_stage.run(StageContext("grpo", root, recipe, echo=lambda s: None))
    report = _json.loads((root / "grpo" / "rl_report.json").read_text())
    assert report["method"] == "grpo" and "gold_dense" in report["after"]


def test_empty_completions_under_a_reward_model_get_the_rollouts_lowest_score():
    """A reward model cannot render an empty answer (its template refuses one): PPO against
    WARM once crashed on the first empty sample. Such completions now get the lowest score
    of the rollout; a programmatic reward still scores them itself."""
    from types import SimpleNamespace

    from lmlab.train.rollout import RolloutConfig, Rollouts

    class Model:  # refuses empty answers, as ModelReward's template does
        scores_empty = False

        def score(self, prompts, texts):
            assert all(t.strip() for t in texts), "an empty answer reached the reward model"
            return torch.tensor([float(len(t)) for t in texts])

    class Programmatic:
        scores_empty = True

        def score(self, prompts, texts):
            return torch.tensor([-5.0 if not t else 1.0 for t in texts])

    me = SimpleNamespace(cfg=RolloutConfig())
    texts = ["ab", "", "abcd", " "]
    got = Rollouts._score(me, Model(), ["p"] * 4, texts)
    assert got.tolist() == [2.0, 2.0, 4.0, 2.0]
    assert Rollouts._score(me, Programmatic(), ["p"] * 4, ["x", ""]).tolist() == [1.0, -5.0]
    assert Rollouts._score(SimpleNamespace(cfg=RolloutConfig(empty_score=-1.0)), Model(), ["p"] * 2,
                           ["abc", ""]).tolist() == [3.0, -1.0]
    assert Rollouts._score(me, Model(), ["p"] * 2, ["", ""]).tolist() == [0.0, 0.0]
