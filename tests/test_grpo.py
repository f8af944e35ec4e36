"""GRPO / Dr. GRPO / DAPO / RLOO end to end: the objective's loss and gradient against a
hand computation of TRL's GRPOTrainer formula (independent full-softmax log-probs), RLOO
with one sample, a bandit and a verifiable task solved, and one clear error for bad input.
The pure pieces (group advantages, clipped surrogate, aggregations) are checked against TRL
in tests/test_losses.py and tests/test_rl.py."""
from __future__ import annotations

import pytest
import torch

from lmlab.data import IGNORE_INDEX
from lmlab.errors import LmlabError
from lmlab.model.heads import RewardModel
from lmlab.rewards import ModelReward
from lmlab.train.loop import train
from lmlab.train.objectives.grpo import GRPO, GRPOConfig
from lmlab.train.rollout import RolloutConfig, Rollouts, layout

from chartok import CharTokenizer
from rlkit import SYMBOLS, TOK, Bandit, NextSymbol, first_token_probs, metrics, tiny_config, tiny_policy, train_cfg


def fixed_batch(policy, seed=1):
    """Two groups of three completions of different lengths, with old/ref log-probs that
    differ from the policy's so that both clip sides and the KL are active."""
    g = torch.Generator().manual_seed(seed)
    prompts = [[0, 4, 7, 6, 5], [0, 4, 8, 6, 5]]
    comps = [[7, 8, 6], [9], [8, 10, 9, 6], [7, 6], [10, 10, 10, 10, 6], [9, 6]]
    batch = layout([prompts[i // 3] for i in range(6)], comps, TOK.pad_id)
    mask = batch["targets"] != IGNORE_INDEX
    with torch.no_grad():
        logp = hand_logp(policy, batch, 1.0)
    noise = lambda s: torch.randn(mask.shape, generator=g) * s  # noqa: E731
    batch["old_logp"] = torch.where(mask, logp + noise(0.3), 0.0)
    batch["ref_logp"] = torch.where(mask, logp + noise(0.5), 0.0)
    batch["score"] = torch.tensor([1.0, 0.0, 0.5, 0.0, 0.0, 1.0])
    return batch


def hand_logp(policy, batch, temperature):
    """Log-probs from the full logits of a plain forward: no masked_logprobs."""
    logits = policy(batch["input_ids"]).float() / temperature
    mask = batch["targets"] != IGNORE_INDEX
    picked = logits.log_softmax(-1).gather(-1, batch["targets"].clamp(min=0)[..., None]).squeeze(-1)
    return torch.where(mask, picked, 0.0)


def trl_grpo_loss(logp, old, ref, adv, mask, eps_low, eps_high, beta, loss_type, max_len):
    """TRL's GRPOTrainer._compute_loss (trl/trainer/grpo_trainer.py), written out by hand."""
    coef_1 = torch.exp(logp - old)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    per_token = -torch.min(coef_1 * adv[:, None], coef_2 * adv[:, None])
    if beta:
        per_token = per_token + beta * (torch.exp(ref - logp) - (ref - logp) - 1)
    m = mask.float()
    if loss_type == "grpo":
        return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()
    if loss_type == "dapo":  # one process, no accumulation: the batch's token count
        return (per_token * m).sum() / m.sum()
    if loss_type == "dr_grpo":
        return (per_token * m).sum() / (per_token.shape[0] * max_len)
    raise ValueError(loss_type)


@pytest.mark.parametrize("aggregation,loss_type", [("seq_mean_token_mean", "grpo"), ("token_mean", "dapo"),
                                                   ("seq_mean_token_sum_norm", "dr_grpo")])
@pytest.mark.parametrize("advantage", ["grpo", "dr_grpo"])
def test_grpo_objective_equals_trl_formula_by_hand(aggregation, loss_type, advantage):
    policy = tiny_policy()
    temperature, beta, max_len = 0.7, 0.04, 8
    cfg = GRPOConfig(advantage=advantage, beta=beta, clip_low=0.2, clip_high=0.28, aggregation=aggregation)
    obj = GRPO(policy, cfg, group_size=3, temperature=temperature, max_new_tokens=max_len)
    batch = fixed_batch(policy)
    batch.update(obj.advantages(batch))
    # Advantages by hand: (r - mean) / (std + 1e-4) per group (Bessel std, as TRL), or r - mean.
    r = batch["score"].view(2, 3)
    want = r - r.mean(1, keepdim=True)
    if advantage == "grpo":
        want = want / (r.std(1, keepdim=True) + 1e-4)
    assert torch.allclose(batch["advantages"], want.view(-1), atol=1e-6)

    loss, m = obj(policy, batch)
    grads = torch.autograd.grad(loss, list(policy.parameters()))
    mask = batch["targets"] != IGNORE_INDEX
    logp = hand_logp(policy, batch, temperature)
    ref = trl_grpo_loss(logp, batch["old_logp"], batch["ref_logp"], batch["advantages"], mask, 0.2, 0.28, beta,
                        loss_type, max_len)
    ref_grads = torch.autograd.grad(ref, list(policy.parameters()))
    assert torch.allclose(loss, ref, atol=1e-6), (float(loss), float(ref))
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-6)
    assert 0 < float(m["clip_fraction"]) < 1  # both branches really exercised


def test_rloo_with_one_sample_gives_zero_advantage_and_no_gradient():
    policy = tiny_policy()
    obj = GRPO(policy, GRPOConfig(advantage="rloo"), group_size=1)
    batch = fixed_batch(policy)
    batch.update(obj.advantages(batch))
    assert torch.equal(batch["advantages"], torch.zeros(6))
    loss, _ = obj(policy, batch)
    assert float(loss.detach()) == 0.0
    grads = torch.autograd.grad(loss, list(policy.parameters()), allow_unused=True)
    assert all(g is None or float(g.abs().max()) == 0.0 for g in grads)
    # With k > 1, RLOO is r minus the mean of the other k - 1 (hand values).
    obj3 = GRPO(policy, GRPOConfig(advantage="rloo"), group_size=3)
    adv = obj3.advantages({"score": torch.tensor([1.0, 0.0, 0.5, 0.0, 0.0, 1.0])})["advantages"]
    assert torch.allclose(adv, torch.tensor([0.75, -0.75, 0.0, -0.5, -0.5, 1.0]))


def _run(policy, reward, prompts, rollout, cfg, tmp_path, steps, batch_size, **kw):
    obj = GRPO(policy, cfg, group_size=rollout.group_size, temperature=rollout.temperature,
               max_new_tokens=rollout.max_new_tokens)
    source = Rollouts(policy, TOK, prompts, reward, rollout, obj)
    train(policy, obj, source, train_cfg(steps, batch_size, **kw), tmp_path, log=lambda s: None)
    return metrics(tmp_path)


@pytest.mark.parametrize("advantage", ["grpo", "rloo"])
def test_two_armed_bandit_is_solved(tmp_path, advantage):
    policy = tiny_policy()
    before = first_token_probs(policy, "a")[TOK.token_to_id("a")]
    rollout = RolloutConfig(prompts=2, group_size=8, max_new_tokens=1)
    rows = _run(policy, Bandit(), ["a", "b"], rollout, GRPOConfig(advantage=advantage), tmp_path, 30, 16)
    after = first_token_probs(policy, "a")[TOK.token_to_id("a")]
    assert float(before) < 0.3 and float(after) > 0.9, (float(before), float(after))
    assert rows[-1]["reward"] > 0.9


def test_verifiable_task_is_solved(tmp_path):
    """Each of four prompts has its own right answer (the next symbol): a sparse 0/1
    checker, solved from a random policy by GRPO with clip-higher."""
    policy = tiny_policy(seed=1)
    rollout = RolloutConfig(prompts=4, group_size=16, max_new_tokens=2)
    cfg = GRPOConfig(advantage="grpo", clip_high=0.28, beta=0.0)
    rows = _run(policy, NextSymbol(), list(SYMBOLS), rollout, cfg, tmp_path, 60, 64, lr=5e-3)
    early = sum(r["reward"] for r in rows[1:6]) / 5
    late = sum(r["reward"] for r in rows[-5:]) / 5
    assert early < 0.3 and late > 0.85, (early, late)


def test_bad_input_gives_one_clear_error():
    policy = tiny_policy()
    obj = GRPO(policy, GRPOConfig(), group_size=2)
    rollout = RolloutConfig(prompts=2, group_size=2, max_new_tokens=2)
    with pytest.raises(LmlabError, match="needs prompts"):
        Rollouts(policy, TOK, [], Bandit(), rollout, obj)
    # A reward model over another vocabulary (a character tokenizer's).
    char = CharTokenizer()
    rm = RewardModel(tiny_config(vocab_size=char.vocab_size))
    with pytest.raises(LmlabError, match="vocabulary"):
        Rollouts(policy, TOK, ["a"], ModelReward(rm, char), rollout, obj)
    with pytest.raises(LmlabError, match="temperature"):
        Rollouts(policy, TOK, ["a"], Bandit(), RolloutConfig(temperature=0.5), obj)
    with pytest.raises(LmlabError, match="group advantage"):
        GRPOConfig(advantage="nope")
    with pytest.raises(LmlabError, match="loss aggregation"):
        GRPO(policy, GRPOConfig(aggregation="mean"), group_size=2)
    with pytest.raises(LmlabError, match="micro-batches"):
        Rollouts(policy, TOK, ["a"], Bandit(), rollout, obj).next_batch(3)
