"""Preference and policy losses (lmlab.train.losses) against hand-computed values, closed-form
properties, and TRL 1.16's trainers as the oracle (their loss code is called on shared
log-probs through a stub `self`, since TRL computes losses inside trainer methods)."""
from __future__ import annotations

import ast
import math
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lmlab.errors import LmlabError
from lmlab.train.losses import (
    DPO_LOSSES, KL_ESTIMATORS, LOSS_AGGREGATIONS, aggregate_loss, bradley_terry_loss, dpo_loss,
    dpo_metrics, entropy_from_logits, entropy_from_logprobs, kl_penalty, ppo_policy_loss, reward_centering_term,
    value_loss, with_nll,
)

SRC = Path(__file__).resolve().parents[1] / "src" / "lmlab"


def test_losses_and_rl_import_only_errors_from_lmlab():
    # The guard rail: the math must not pull in the loop, checkpoints or models.
    for name in ("losses.py", "rl.py"):
        tree = ast.parse((SRC / "train" / name).read_text())
        found = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
                 and n.module.startswith("lmlab")}
        found |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
                  if a.name.startswith("lmlab")}
        assert found <= {"lmlab.errors"}, f"{name} imports {found}"


# ---------------------------------------------------------------- Bradley-Terry

def test_bradley_terry_equal_scores_is_ln2_and_margin_shifts_it():
    r = torch.tensor([0.0, 3.0, -2.5])
    assert torch.allclose(bradley_terry_loss(r, r), torch.full((3,), math.log(2)))
    # -log sigmoid(2 - 0 - 0.5) = log(1 + e^-1.5) = 0.2014132779827524
    out = bradley_terry_loss(torch.tensor([2.0]), torch.tensor([0.0]), margin=torch.tensor([0.5]))
    assert out.item() == pytest.approx(0.2014132779827524, abs=1e-7)
    # (1 + 3)^2 and (-1 + 0)^2 averaged
    assert reward_centering_term(torch.tensor([1.0, -1.0]), torch.tensor([3.0, 0.0])).item() == 8.5


def _trl_reward_loss(rc, rr, margin, coef):
    from trl.trainer.reward_trainer import RewardTrainer
    logits = torch.cat([rc, rr]).unsqueeze(-1)
    stub = SimpleNamespace(model=SimpleNamespace(training=True), args=SimpleNamespace(center_rewards_coefficient=coef),
                           accelerator=SimpleNamespace(gather_for_metrics=lambda x: x, gather=lambda x: x),
                           _total_train_tokens=0, _tp_size=1, _metrics=defaultdict(lambda: defaultdict(list)))
    inputs = {"input_ids": torch.zeros(2 * len(rc), 3, dtype=torch.long),
              "attention_mask": torch.ones(2 * len(rc), 3, dtype=torch.long)}
    if margin is not None:
        inputs["margin"] = margin
    return RewardTrainer.compute_loss(stub, lambda **kw: SimpleNamespace(logits=logits), inputs)


@pytest.mark.parametrize("with_margin", [False, True])
def test_bradley_terry_and_centering_match_trl_reward_trainer(with_margin):
    pytest.importorskip("trl")
    g = torch.Generator().manual_seed(0)
    rc, rr = torch.randn(6, generator=g), torch.randn(6, generator=g)
    margin = torch.rand(6, generator=g) if with_margin else None
    ours = bradley_terry_loss(rc, rr, margin).mean() + 0.01 * reward_centering_term(rc, rr)
    assert torch.allclose(ours, _trl_reward_loss(rc, rr, margin, 0.01), atol=1e-6)


# ---------------------------------------------------------------- DPO family: closed forms

def _logps(seed=0, n=8):
    g = torch.Generator().manual_seed(seed)
    return [-(torch.rand(n, generator=g) * 30 + 1) for _ in range(4)]


def test_dpo_is_ln2_when_policy_equals_reference():
    pc, pr, _, _ = _logps()
    out = dpo_loss("sigmoid", pc, pr, pc.clone(), pr.clone(), beta=0.1)
    assert torch.allclose(out, torch.full_like(out, math.log(2)))


def test_dpo_hand_value():
    # h = (-10 - -11) - (-12 - -11) = 2, beta h = 0.2: log(1 + e^-0.2) = 0.5981388693815918
    args = [torch.tensor([v]) for v in (-10.0, -12.0, -11.0, -11.0)]
    assert dpo_loss("sigmoid", *args, beta=0.1).item() == pytest.approx(0.5981388693815918, abs=1e-7)
    # hinge: max(0, 1 - 0.2) = 0.8; ipo_sum: (2 - 1/0.2)^2 = 9
    assert dpo_loss("hinge", *args, beta=0.1).item() == pytest.approx(0.8, abs=1e-7)
    assert dpo_loss("ipo_sum", *args, beta=0.1).item() == pytest.approx(9.0, abs=1e-5)


def _gap_grid(variant, beta, lo=-10.0, hi=30.0, n=40001, **params):
    """Loss along h (the log-ratio gap), realised as policy chosen = h, all else 0."""
    h = torch.linspace(lo, hi, n, dtype=torch.float64)
    zero = torch.zeros_like(h)
    return h, dpo_loss(variant, h, zero, zero, zero, beta=beta, **params)


@pytest.mark.parametrize("variant", ["ipo", "ipo_sum"])
def test_ipo_minimised_at_gap_one_over_two_beta(variant):
    beta = 0.1
    h, loss = _gap_grid(variant, beta)
    assert h[loss.argmin()].item() == pytest.approx(1 / (2 * beta), abs=1e-3)
    at = torch.tensor([1 / (2 * beta)], dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(1, dtype=torch.float64)
    dpo_loss(variant, at, zero, zero, zero, beta=beta).sum().backward()
    assert abs(at.grad.item()) < 1e-12


def test_ipo_length_normalisation():
    # Summed log-ratios 6 and -2 over 3 and 2 tokens: averages 2 and -1, gap 3; beta 0.25: (3 - 2)^2
    pc, pr = torch.tensor([6.0]), torch.tensor([-2.0])
    zero = torch.zeros(1)
    out = dpo_loss("ipo", pc, pr, zero, zero, beta=0.25, chosen_lengths=torch.tensor([3.0]),
                   rejected_lengths=torch.tensor([2.0]))
    assert out.item() == pytest.approx(1.0)
    with pytest.raises(LmlabError, match="both"):
        dpo_loss("ipo", pc, pr, zero, zero, beta=0.25, chosen_lengths=torch.tensor([3.0]))


def test_cdpo_minimiser_and_zero_smoothing():
    beta, eps = 0.5, 0.1
    h, loss = _gap_grid("cdpo", beta, label_smoothing=eps)
    assert h[loss.argmin()].item() == pytest.approx(math.log((1 - eps) / eps) / beta, abs=1e-3)
    args = _logps()
    for variant in ("cdpo", "robust"):
        assert torch.allclose(dpo_loss(variant, *args, beta=0.1, label_smoothing=0.0),
                              dpo_loss("sigmoid", *args, beta=0.1))


def test_robust_is_unbiased_under_label_flips():
    # Chowdhury et al.: averaged over a flip with probability eps, the robust loss is the clean loss.
    pc, pr, rc, rr = _logps()
    eps, beta = 0.2, 0.1
    kept = dpo_loss("robust", pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    flipped = dpo_loss("robust", pr, pc, rr, rc, beta=beta, label_smoothing=eps)
    assert torch.allclose((1 - eps) * kept + eps * flipped, dpo_loss("sigmoid", pc, pr, rc, rr, beta=beta), atol=1e-6)


def test_hinge_is_zero_past_margin():
    h, loss = _gap_grid("hinge", beta=0.5, lo=-4.0, hi=4.0, n=801)
    assert torch.all(loss[h >= 2.0] == 0) and torch.all(loss[h < 2.0] > 0)


def test_dpo_metrics_hand():
    m = dpo_metrics(torch.tensor([-10.0, -5.0]), torch.tensor([-12.0, -4.0]),
                    torch.tensor([-11.0, -5.0]), torch.tensor([-11.0, -5.0]), beta=0.5)
    assert m["rewards_chosen"].tolist() == [0.5, 0.0]
    assert m["rewards_rejected"].tolist() == [-0.5, 0.5]
    assert m["margins"].tolist() == [1.0, -0.5]
    assert m["accuracy"].item() == 0.5


def test_with_nll_adds_weighted_term():
    assert with_nll(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.5]), 0.2).tolist() == pytest.approx([1.6, 2.1])


def test_table_dispatch_rejects_unknown_names_and_parameters():
    args = _logps()
    with pytest.raises(LmlabError, match="sigmoid"):
        dpo_loss("sigmod", *args, beta=0.1)
    with pytest.raises(LmlabError, match="label_smoothing"):
        dpo_loss("sigmoid", *args, beta=0.1, label_smoothing=0.1)
    with pytest.raises(LmlabError, match=r"\[0, 0.5\)"):
        dpo_loss("robust", *args, beta=0.1, label_smoothing=0.5)
    with pytest.raises(LmlabError, match="beta"):
        dpo_loss("sigmoid", *args, beta=0.0)
    assert set(DPO_LOSSES) == {"sigmoid", "ipo", "ipo_sum", "cdpo", "robust", "hinge"}


# ---------------------------------------------------------------- DPO family: TRL as the oracle

def _pair_tokens(seed, lens=(5, 3)):
    """One pair's per-token log-probs (1, T) zero past each completion, its token mask, and
    reference sums: the shapes TRL's DPOTrainer reads."""
    g = torch.Generator().manual_seed(seed)
    T = max(lens) + 1
    out = []
    for n in lens:
        mask = torch.zeros(1, T)
        mask[0, :n] = 1
        out.append(((-torch.rand(1, T, generator=g) * 4) * mask, mask))
    ref = [-(torch.rand(1, generator=g) * 4 * n) for n in lens]
    return out, ref


def _trl_dpo(loss_types, weights, beta, pair, ref, label_smoothing=0.0):
    """TRL 1.16 DPOTrainer._compute_loss on precomputed log-probs: a stub model returns the
    per-token log-probs; the reference sums go in as precomputed (`precompute_ref_logps`)."""
    from trl.trainer.dpo_trainer import DPOTrainer
    (lp_c, m_c), (lp_r, m_r) = pair
    log_probs = torch.cat([lp_c, lp_r])
    T = log_probs.shape[1]
    # TRL's completion mask is over input positions; position 0 is prompt, the shifted one is ours.
    completion_mask = torch.cat([torch.zeros(2, 1), torch.cat([m_c, m_r])], dim=1).long()
    outputs = SimpleNamespace(log_probs=log_probs, entropy=torch.zeros(2, T), mean_logits=torch.zeros(2, T),
                              is_top1=torch.zeros(2, T, dtype=torch.bool))
    model = SimpleNamespace(training=True)
    model_call = lambda **kw: outputs  # noqa: E731
    acc = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x)
    stub = SimpleNamespace(model=model, accelerator=acc, aux_loss_enabled=False, ld_alpha=None,
                           precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=loss_types,
                           loss_weights=weights, beta=beta, label_smoothing=label_smoothing, use_weighting=False,
                           _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(2, T + 1, dtype=torch.long), "attention_mask": torch.ones(2, T + 1),
              "completion_mask": completion_mask, "ref_chosen_logps": ref[0], "ref_rejected_logps": ref[1]}
    loss = DPOTrainer._compute_loss(stub, model_call, inputs, return_outputs=False)
    return loss, stub._metrics["train"]


# ours name -> (TRL loss type, params), for variants TRL has under some name.
# cDPO: TRL 1.16's "sigmoid" no longer takes label smoothing; its "aot" loss on a single pair
# (sorting one element is the identity) is exactly -(1-eps) logsig(beta h) - eps logsig(-beta h).
TRL_NAMES = {"sigmoid": ("sigmoid", 0.0), "hinge": ("hinge", 0.0), "ipo": ("ipo", 0.0),
             "robust": ("robust", 0.2), "cdpo": ("aot", 0.2)}


@pytest.mark.parametrize("variant", sorted(TRL_NAMES))
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_variant_matches_trl(variant, beta):
    pytest.importorskip("trl")
    trl_name, eps = TRL_NAMES[variant]
    for seed, lens in enumerate([(5, 3), (2, 6), (4, 4)]):
        pair, ref = _pair_tokens(seed, lens)
        expected, _ = _trl_dpo([trl_name], [1.0], beta, pair, ref, label_smoothing=eps)
        pc, pr = pair[0][0].sum(1), pair[1][0].sum(1)
        params = {"label_smoothing": eps} if variant in ("robust", "cdpo") else {}
        if variant == "ipo":
            params = {"chosen_lengths": pair[0][1].sum(1), "rejected_lengths": pair[1][1].sum(1)}
        ours = dpo_loss(variant, pc, pr, ref[0], ref[1], beta=beta, **params)
        assert torch.allclose(ours, expected, atol=1e-6), (variant, seed)
        if variant == "ipo":
            # Per-token-averaged inputs, the other documented way to call it.
            n_c, n_r = params["chosen_lengths"], params["rejected_lengths"]
            avg = dpo_loss("ipo", pc / n_c, pr / n_r, ref[0] / n_c, ref[1] / n_r, beta=beta)
            assert torch.allclose(avg, expected, atol=1e-6)


def test_ipo_sum_against_openrlhf_formula():
    # Not in TRL (its IPO length-normalises). OpenRLHF's DPOLoss: logits = pi_logratios - ref_logratios,
    # losses = (logits - 1 / (2 * beta)) ** 2, on summed log-probs.
    pc, pr, rc, rr = _logps(3)
    logits = (pc - pr) - (rc - rr)
    assert torch.allclose(dpo_loss("ipo_sum", pc, pr, rc, rr, beta=0.1), (logits - 1 / (2 * 0.1)) ** 2)


def test_dpo_metrics_and_nll_term_match_trl():
    pytest.importorskip("trl")
    pair, ref = _pair_tokens(7, (5, 3))
    pc, pr = pair[0][0].sum(1), pair[1][0].sum(1)
    # Llama 3's recipe as TRL expresses it: loss_type ["sigmoid", "sft"], weights [1, 0.2]; TRL's
    # "sft" term is the chosen answer's NLL averaged over its tokens.
    expected, metrics = _trl_dpo(["sigmoid", "sft"], [1.0, 0.2], 0.1, pair, ref)
    chosen_nll = -pc / pair[0][1].sum(1)
    ours = with_nll(dpo_loss("sigmoid", pc, pr, ref[0], ref[1], beta=0.1), chosen_nll, 0.2)
    assert torch.allclose(ours, expected, atol=1e-6)
    m = dpo_metrics(pc, pr, ref[0], ref[1], beta=0.1)
    assert m["rewards_chosen"].mean().item() == pytest.approx(metrics["rewards/chosen"][0], abs=1e-6)
    assert m["rewards_rejected"].mean().item() == pytest.approx(metrics["rewards/rejected"][0], abs=1e-6)
    assert m["margins"].mean().item() == pytest.approx(metrics["rewards/margins"][0], abs=1e-6)
    assert m["accuracy"].item() == metrics["rewards/accuracies"][0]


# ---------------------------------------------------------------- PPO pieces

def test_first_ppo_minibatch_has_ratio_one():
    g = torch.Generator().manual_seed(0)
    logp = (-torch.rand(3, 5, generator=g) * 3).requires_grad_()
    adv = torch.randn(3, 5, generator=g)
    mask = torch.rand(3, 5, generator=g) > 0.3
    loss, clip_frac, approx_kl = ppo_policy_loss(logp, logp.detach(), adv, mask)
    assert clip_frac.item() == 0 and approx_kl.item() == 0
    assert torch.allclose(loss, torch.where(mask, -adv, 0.0))
    loss.sum().backward()
    # d(-A r)/d logp = -A r = -A at r = 1: the plain policy gradient.
    assert torch.allclose(logp.grad, torch.where(mask, -adv, 0.0))


def test_ppo_clipping_hand_values():
    ratio = torch.tensor([[1.5, 0.5, 1.5, 1.25, 0.7]])
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0, 2.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool)
    old = torch.zeros(1, 5)
    loss, clip_frac, _ = ppo_policy_loss(ratio.log(), old, adv, mask, clip_low=0.2)
    # max(-1.5, -1.2) clipped; max(0.5, 0.8) clipped; max(1.5, 1.2) unclipped; max(-1.25, -1.2) clipped; masked
    assert loss.tolist()[0] == pytest.approx([-1.2, 0.8, 1.5, -1.2, 0.0], abs=1e-6)
    assert clip_frac.item() == pytest.approx(3 / 4)
    # DAPO's clip-higher 0.28 lets the 1.25 ratio through and clips 1.5 at 1.28
    loss, clip_frac, _ = ppo_policy_loss(ratio.log(), old, adv, mask, clip_low=0.2, clip_high=0.28)
    assert loss.tolist()[0] == pytest.approx([-1.28, 0.8, 1.5, -1.25, 0.0], abs=1e-6)
    assert clip_frac.item() == pytest.approx(2 / 4)


def test_garbage_on_masked_tokens_does_not_reach_gradients():
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    logp = torch.tensor([[-1.0, -2.0, -math.inf]], requires_grad=True)
    old = torch.tensor([[-1.1, -1.9, -math.inf]])
    loss, clip_frac, approx_kl = ppo_policy_loss(logp, old, torch.tensor([1.0]), mask)
    loss.sum().backward()
    assert torch.isfinite(logp.grad).all() and logp.grad[0, 2] == 0
    assert torch.isfinite(approx_kl) and torch.isfinite(clip_frac)
    values = torch.tensor([[1.0, 2.0, math.inf]], requires_grad=True)
    value_loss(values, torch.tensor([[1.0, 2.0, math.nan]]), torch.tensor([[0.0, 0.0, math.inf]]), mask).sum().backward()
    assert torch.isfinite(values.grad).all() and values.grad[0, 2] == 0


def test_value_loss_hand_values():
    values = torch.tensor([[1.0, 1.0, 2.0, 5.0]])
    old = torch.tensor([[0.5, 0.9, 0.5, 0.0]])
    returns = torch.tensor([[2.0, 0.0, 2.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # (1) V_clip 0.7: 0.5 max(1, 1.69); (2) inside the clip: 0.5 * 1; (3) V exact but V_clip 0.7: 0.5 * 1.69
    out = value_loss(values, old, returns, mask, clip=0.2)
    assert out.tolist()[0] == pytest.approx([0.845, 0.5, 0.845, 0.0], abs=1e-6)
    assert value_loss(values, old, returns, mask, clip=None).tolist()[0] == pytest.approx([0.5, 0.5, 0.0, 0.0])


def test_entropy_hand_and_trl():
    assert entropy_from_logits(torch.zeros(2, 7)).tolist() == pytest.approx([math.log(7)] * 2)
    # A banned token (logit -inf) has probability 0 and contributes nothing.
    assert entropy_from_logits(torch.tensor([3.0, 3.0, -math.inf])).item() == pytest.approx(math.log(2))
    pytest.importorskip("trl")
    from trl.trainer.utils import entropy_from_logits as trl_entropy
    logits = torch.randn(3, 4, 50, generator=torch.Generator().manual_seed(1)) * 3
    assert torch.allclose(entropy_from_logits(logits), trl_entropy(logits), atol=1e-5)


def test_entropy_from_logprobs_hand_values_and_chunks():
    # Uniform over 7: log 7; a banned token (log-prob -inf) contributes 0, not nan.
    assert entropy_from_logprobs(torch.full((2, 7), -math.log(7))).tolist() == pytest.approx([math.log(7)] * 2)
    half = torch.tensor([math.log(0.5), math.log(0.5), -math.inf])
    assert entropy_from_logprobs(half).item() == pytest.approx(math.log(2))
    # p = (0.7, 0.2, 0.1) by hand: -(0.7 ln 0.7 + 0.2 ln 0.2 + 0.1 ln 0.1) = 0.801819...
    p = torch.tensor([0.7, 0.2, 0.1])
    assert entropy_from_logprobs(p.log()).item() == pytest.approx(0.8018185525, abs=1e-6)
    # Rows split over several blocks (and a ragged last one) give what one pass gives.
    logits = torch.randn(2, 37, 50, generator=torch.Generator().manual_seed(2)) * 3
    logits[0, 3, 7] = -math.inf
    want = entropy_from_logits(logits)
    got = entropy_from_logprobs(logits.log_softmax(-1), rows=8)
    assert got.shape == (2, 37) and torch.allclose(got, want, atol=1e-5)
    assert not entropy_from_logprobs(logits.log_softmax(-1).requires_grad_()).requires_grad


# ---------------------------------------------------------------- KL estimators

def _categoricals():
    p = torch.tensor([0.5, 0.2, 0.2, 0.1], dtype=torch.float64)
    q = torch.tensor([0.25, 0.25, 0.4, 0.1], dtype=torch.float64)
    return p, q, (p * (p / q).log()).sum().item()


def test_kl_estimators_hand_values_and_k3_nonnegative():
    logp, logq = torch.tensor([-1.0]), torch.tensor([-2.0])
    assert kl_penalty(logp, logq, "k1").item() == pytest.approx(1.0)
    assert kl_penalty(logp, logq, "k2").item() == pytest.approx(0.5)
    # r = q/p = e^-1: (e^-1 - 1) + 1
    assert kl_penalty(logp, logq, "k3").item() == pytest.approx(math.exp(-1), abs=1e-7)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(10000, generator=g) * 5, torch.randn(10000, generator=g) * 5
    assert torch.all(kl_penalty(a, b, "k3") >= 0)
    assert set(KL_ESTIMATORS) == {"k1", "k2", "k3"}
    with pytest.raises(LmlabError, match="k3"):
        kl_penalty(a, b, "k4")


def test_k1_k3_are_unbiased_for_kl_p_q_under_samples_from_p():
    p, q, exact = _categoricals()
    # Exact expectation over the support, then a seeded Monte Carlo estimate.
    for name in ("k1", "k3"):
        assert (p * kl_penalty(p.log(), q.log(), name)).sum().item() == pytest.approx(exact, abs=1e-12)
    x = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    k3 = kl_penalty(p.log()[x], q.log()[x], "k3")
    se = k3.std().item() / math.sqrt(len(x))
    assert abs(k3.mean().item() - exact) < 4 * se
    assert k3.std() < kl_penalty(p.log()[x], q.log()[x], "k1").std()  # why k3 is preferred


# ---------------------------------------------------------------- aggregation

def test_aggregations_hand_values():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert aggregate_loss(loss, mask, "token_mean").item() == pytest.approx(10 / 4)
    assert aggregate_loss(loss, mask, "seq_mean_token_mean").item() == pytest.approx((2 + 4) / 2)
    assert aggregate_loss(loss, mask, "seq_mean_token_sum_norm", max_len=4).item() == pytest.approx(10 / 8)
    with pytest.raises(LmlabError, match="max_len"):
        aggregate_loss(loss, mask, "seq_mean_token_sum_norm")
    assert set(LOSS_AGGREGATIONS) == {"token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"}


def _trl_grpo(loss_type, logp, old, ref, adv, mask, beta, eps_low, eps_high, max_len):
    """TRL 1.16 GRPOTrainer._compute_loss with a stub that hands back our per-token log-probs."""
    from trl.trainer.grpo_trainer import GRPOTrainer
    B, T = logp.shape
    acc = SimpleNamespace(reduce=lambda x, reduction: x, gather=lambda x: x, num_processes=1)
    stub = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros(B, T), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        beta=beta, loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high,
        args=SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1),
        use_vllm=False, vllm_importance_sampling_correction=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=max_len, _entropy_bonus_enabled=False,
        aux_loss_enabled=False, accelerator=acc, _metrics=defaultdict(lambda: defaultdict(list)))
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum()}
    return GRPOTrainer._compute_loss(stub, None, inputs), stub._metrics["train"]


# TRL loss_type -> our aggregation ("bnpo" and "dapo" are both the token mean on one process).
TRL_AGG = {"grpo": "seq_mean_token_mean", "bnpo": "token_mean", "dapo": "token_mean",
           "dr_grpo": "seq_mean_token_sum_norm"}


@pytest.mark.parametrize("trl_type", sorted(TRL_AGG))
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_with_each_aggregation_matches_trl(trl_type, beta):
    pytest.importorskip("trl")
    g = torch.Generator().manual_seed(3)
    B, T, max_len = 4, 6, 8
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]])
    old = -torch.rand(B, T, generator=g) * 3
    logp = old + torch.randn(B, T, generator=g) * 0.3  # far enough from old that some ratios clip
    ref = old + torch.randn(B, T, generator=g) * 0.3
    adv = torch.randn(B, generator=g)
    expected, metrics = _trl_grpo(trl_type, logp, old, ref, adv, mask, beta, 0.2, 0.28, max_len)
    per_token, clip_frac, _ = ppo_policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    per_token = per_token + beta * kl_penalty(logp, ref, "k3")
    params = {"max_len": max_len} if TRL_AGG[trl_type] == "seq_mean_token_sum_norm" else {}
    ours = aggregate_loss(per_token, mask, TRL_AGG[trl_type], **params)
    assert torch.allclose(ours, expected, atol=1e-6)
    assert 0 < clip_frac.item() < 1
    assert clip_frac.item() == pytest.approx(metrics["clip_ratio/region_mean"][0], abs=1e-6)
    if beta:
        kl = aggregate_loss(kl_penalty(logp, ref, "k3"), mask, "token_mean")
        assert kl.item() == pytest.approx(metrics["kl"][0], abs=1e-6)
