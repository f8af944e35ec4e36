"""The fast paths of an online-RL iteration equal the slow ones they replace:

- an on-policy rollout (read once, in one micro-batch, by an objective without critic or
  reference) skips its scoring forward and takes the update's own detached log-probs as the
  old ones: the same tokens, loss and gradients as the scored rollout, and the same
  training run through the loop;
- a reported-only entropy (`entropy_grad=False`) reads the log-softmax of the log-probs:
  log-probs and gradients bit for bit those of cross_entropy, the entropy equal to float
  rounding."""
from __future__ import annotations

import pytest
import torch

from lmlab.data import IGNORE_INDEX
from lmlab.train.logprobs import masked_logprobs
from lmlab.train.loop import train
from lmlab.train.objectives.grpo import GRPO, GRPOConfig
from lmlab.train.objectives.ppo import PPO, PPOConfig
from lmlab.train.rollout import RolloutConfig, Rollouts, layout

from rlkit import SYMBOLS, TOK, Bandit, NextSymbol, metrics, tiny_policy, train_cfg

PROMPTS = ["a", "b c", "d a b c"]


def grpo_source(policy, temperature=1.0, beta=0.0, **kw):
    obj = GRPO(policy, GRPOConfig(beta=beta), group_size=4, temperature=temperature, max_new_tokens=5)
    cfg = RolloutConfig(**{"prompts": 3, "group_size": 4, "max_new_tokens": 5, "temperature": temperature, **kw})
    return obj, Rollouts(policy, TOK, PROMPTS, Bandit(), cfg, obj)


@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_on_policy_rollout_gives_the_scored_rollouts_loss_and_gradients(temperature):
    policy = tiny_policy()
    obj, src = grpo_source(policy, temperature)
    scored = src.make_rollout(0)
    fast = src.make_rollout(0, on_policy=True)
    assert "old_logp" in scored and "old_logp" not in fast and "sampler_logp" in fast
    for key in ("input_ids", "targets", "score", "advantages"):
        assert torch.equal(scored[key], fast[key]), key
    params = list(policy.parameters())
    loss_a, m_a = obj(policy, scored)
    grads_a = torch.autograd.grad(loss_a, params)
    loss_b, m_b = obj(policy, fast)
    grads_b = torch.autograd.grad(loss_b, params)
    assert torch.allclose(loss_a, loss_b, atol=1e-7, rtol=0), (float(loss_a), float(loss_b))
    for a, b in zip(grads_a, grads_b):
        assert torch.allclose(a, b, atol=1e-7, rtol=1e-6)
    assert float(loss_a.detach()) != 0.0 and max(float(g.abs().max()) for g in grads_a) > 1e-4  # a real signal
    # The ratio is exactly 1; the sampler gap is measured on the update's forward instead.
    assert float(m_b["clip_fraction"]) == 0.0 and float(m_b["approx_kl"]) == 0.0
    assert float(m_b["max_dlogp"]) < 1e-4
    assert abs(float(m_b["max_dlogp"]) - float(scored["stat_max_dlogp"][0])) < 1e-5
    assert abs(float(m_a["entropy"]) - float(m_b["entropy"])) < 1e-6


def test_sampler_gap_is_measured_not_assumed():
    # A sampler log-prob that is off by 0.5 on one token shows up as max_dlogp 0.5.
    policy = tiny_policy()
    obj, src = grpo_source(policy)
    fast = src.make_rollout(0, on_policy=True)
    mask = fast["targets"] != IGNORE_INDEX
    i, j = mask.nonzero()[3].tolist()
    fast["sampler_logp"][i, j] -= 0.5
    _, m = obj(policy, fast)
    assert abs(float(m["max_dlogp"]) - 0.5) < 1e-4


def test_only_a_rollout_read_once_in_one_micro_batch_skips_its_forward():
    policy = tiny_policy()
    _, src = grpo_source(policy)
    rows = src.cfg.rows
    assert src.on_policy(rows) and not src.on_policy(rows // 2)
    assert "old_logp" not in src.next_batch(rows)
    _, src = grpo_source(policy)
    assert "old_logp" in src.next_batch(rows // 2)  # a second micro-batch may follow an update
    _, src = grpo_source(policy, epochs=2)
    assert not src.on_policy(rows) and "old_logp" in src.next_batch(rows)
    _, src = grpo_source(policy, beta=0.1)  # a reference: its forward stays (and so does ours)
    assert not src.on_policy(rows) and {"old_logp", "ref_logp"} <= set(src.next_batch(rows))
    ppo = PPO(policy, PPOConfig(kl_coef=0.0, ema=False), max_new_tokens=5)  # a critic reads the forward
    src = Rollouts(policy, TOK, PROMPTS, Bandit(), RolloutConfig(prompts=3, group_size=4, max_new_tokens=5), ppo)
    assert not src.on_policy(rows) and "old_values" in src.next_batch(rows)


def _grpo_run(tmp_path, monkeypatch, on_policy: bool):
    if not on_policy:
        monkeypatch.setattr(Rollouts, "on_policy", lambda self, n: False)
    policy = tiny_policy(seed=1)
    rollout = RolloutConfig(prompts=4, group_size=8, max_new_tokens=2)
    obj = GRPO(policy, GRPOConfig(clip_high=0.28), group_size=8, max_new_tokens=2)
    src = Rollouts(policy, TOK, list(SYMBOLS), NextSymbol(), rollout, obj)
    train(policy, obj, src, train_cfg(6, 32, lr=5e-3), tmp_path, log=lambda s: None)
    monkeypatch.undo()
    return policy, [r for r in metrics(tmp_path) if "loss" in r]


def test_training_with_the_fast_path_equals_the_scored_path(tmp_path, monkeypatch):
    fast_policy, fast = _grpo_run(tmp_path / "fast", monkeypatch, on_policy=True)
    slow_policy, slow = _grpo_run(tmp_path / "slow", monkeypatch, on_policy=False)
    assert len(fast) == len(slow) == 6
    for a, b in zip(fast, slow):
        assert a["reward"] == b["reward"]  # the same samples, step after step
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-7)
        assert a["max_dlogp"] < 1e-4 and b["max_dlogp"] < 1e-4
    assert len({r["reward"] for r in fast}) > 1  # the policy really moved
    for p, q in zip(fast_policy.parameters(), slow_policy.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("select", [True, False])
def test_reported_entropy_path_equals_cross_entropy_bit_for_bit(temperature, select):
    policy = tiny_policy()
    prompts = [[0, 4, 7, 6, 5], [0, 4, 8, 9, 10, 6, 5]]
    batch = layout(prompts, [[7, 8, 6], [9, 6]], TOK.pad_id)
    params = list(policy.parameters())
    weights = torch.linspace(-1.0, 2.0, batch["targets"].numel()).view(batch["targets"].shape)
    out = {}
    for grad in (True, False):
        lp = masked_logprobs(policy, batch["input_ids"], batch["targets"], temperature=temperature,
                             entropy=True, entropy_grad=grad, select=select)
        out[grad] = lp, torch.autograd.grad((lp.tokens * weights).sum(), params)
    (lp_a, g_a), (lp_b, g_b) = out[True], out[False]
    assert torch.equal(lp_a.tokens, lp_b.tokens)
    assert all(torch.equal(a, b) for a, b in zip(g_a, g_b))
    assert torch.allclose(lp_a.entropy, lp_b.entropy, atol=1e-6)
    assert lp_a.entropy.requires_grad and not lp_b.entropy.requires_grad
    assert bool((lp_b.entropy[lp_b.mask] > 0).all()) and bool((lp_b.entropy[~lp_b.mask] == 0).all())
