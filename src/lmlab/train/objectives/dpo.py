"""Direct preference optimisation over the one loop: `objective(policy, batch) -> (loss, metrics)`.

    loss = mean over pairs of DPO_LOSSES[variant](pi_c, pi_r, ref_c, ref_r, beta)
           (+ nll_weight * mean over pairs of the chosen answer's per-token NLL)

`pi_*` / `ref_*` are summed log-probs of each completion (prompt and padding tokens carry
IGNORE_INDEX targets, so they contribute nothing), read through the one masked log-prob
primitive; chosen and rejected rows run as ONE forward of the concatenated (2B, T) batch,
and only completion rows are projected onto the vocabulary.

The reference, one of:
- a frozen module (a copy of the start policy, or another model over the same vocabulary),
  declared through `frozen_modules()` so the loop moves it and never trains it;
- `ADAPTERS`: the policy itself with its LoRA/DoRA adapters bypassed (no second copy of
  the weights; the base is frozen, so it is the start policy for the whole run);
- None: only log-probs given up front (`precompute_reference`), as TRL's
  `precompute_ref_log_probs`.
With `cache`, reference log-probs are computed once per example (keyed by the batch's
`index`) and reused; the cache is cleared whenever the reference changes (TR-DPO), and it is
objective state, so a resumed run reads exactly the values the uninterrupted one did.

TR-DPO (Gorbatovski et al. 2024): every `tr_tau` optimizer steps the reference moves
towards the policy, `ref <- alpha policy + (1 - alpha) ref` (alpha = 1: a hard copy). The
reference weights are then objective state too.

Batches come from `lmlab.data.preference.PreferenceCollator` (with `index`).
"""
from __future__ import annotations

import contextlib
import copy
import math
from typing import Any

import torch
from torch import nn

from lmlab.data import IGNORE_INDEX
from lmlab.errors import LmlabError
from lmlab.model.heads import real_positions
from lmlab.train.logprobs import masked_logprobs
from lmlab.train.losses import DPO_LOSSES, dpo_loss, dpo_metrics, with_nll
from lmlab.train.objectives.lm import with_moe_aux_losses
from lmlab.train.rl import soft_update

ADAPTERS = "adapters"  # the reference is the adapter-disabled policy
# Variants that take label_smoothing (eps); the others reject it.
SMOOTHED = ("cdpo", "robust")


def dpo_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
    """Chosen rows then rejected rows as one (2B, T-1) next-token problem: `input_ids`,
    `targets` (IGNORE_INDEX on prompt and padding), and `positions` / `attn_mask` only where
    a row is left-padded (right padding needs neither: causal attention never looks ahead)."""
    ids = torch.cat([batch["chosen_ids"], batch["rejected_ids"]])
    mask = torch.cat([batch["chosen_mask"], batch["rejected_mask"]]).bool()
    prompt = torch.cat([batch["chosen_prompt_len"], batch["rejected_prompt_len"]]).to(ids.device)
    ordinal = mask.long().cumsum(-1) - 1  # index among the row's real tokens
    completion = mask & (ordinal >= prompt[:, None])
    targets = ids[:, 1:].masked_fill(~completion[:, 1:], IGNORE_INDEX)
    left_padded = bool((mask[:, 1:] & ~mask[:, :-1]).any())
    return {"input_ids": ids[:, :-1], "targets": targets,
            "positions": real_positions(mask)[:, :-1] if left_padded else None,
            "attn_mask": mask[:, :-1] if left_padded else None}


def _rows(inputs: dict[str, torch.Tensor | None], rows: torch.Tensor) -> dict[str, torch.Tensor | None]:
    return {k: (None if v is None else v[rows]) for k, v in inputs.items()}


def _vocab(module: nn.Module) -> int | None:
    cfg = getattr(module, "config", None)
    return getattr(cfg, "vocab_size", None)


class DPO:
    """The DPO family as an objective (see the module docstring).

    loss: a key of `lmlab.train.losses.DPO_LOSSES` (sigmoid, ipo, ipo_sum, cdpo, robust,
        hinge); label_smoothing is eps of cdpo / robust.
    nll_weight: weight of the chosen answer's per-token NLL (Llama 3: 0.2; RPO).
    reference: a module, ADAPTERS, or None (precomputed log-probs only).
    cache: compute reference log-probs once per example index.
    tr_tau / tr_alpha: TR-DPO's refresh period (0: never) and mixing weight.
    loss_chunk: vocabulary projection `loss_chunk` rows at a time (0: all at once).
    """

    name = "dpo"

    def __init__(self, beta: float = 0.1, loss: str = "sigmoid", label_smoothing: float = 0.0,
                 nll_weight: float = 0.0, reference: nn.Module | str | None = ADAPTERS, cache: bool = True,
                 tr_tau: int = 0, tr_alpha: float = 1.0, loss_chunk: int = 0) -> None:
        if loss not in DPO_LOSSES:
            raise LmlabError(f"unknown DPO loss {loss!r}; choose one of {sorted(DPO_LOSSES)}")
        if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
            raise LmlabError(f"dpo beta must be a number > 0, got {beta!r}")
        if label_smoothing and loss not in SMOOTHED:
            raise LmlabError(f"label_smoothing is a parameter of the {' and '.join(SMOOTHED)} losses, not "
                             f"{loss!r}; set loss: cdpo (conservative DPO) or drop label_smoothing")
        if nll_weight < 0:
            raise LmlabError(f"nll_weight must be >= 0, got {nll_weight}")
        if tr_tau < 0 or not 0.0 <= tr_alpha <= 1.0:
            raise LmlabError(f"TR-DPO needs tr_tau >= 0 (0: off) and tr_alpha in [0, 1], got {tr_tau}, {tr_alpha}")
        if tr_tau and not isinstance(reference, nn.Module):
            raise LmlabError("TR-DPO (tr_tau > 0) updates the reference's weights, so it needs a separate "
                             "reference model (reference: copy), not the adapter-disabled or precomputed one")
        if isinstance(reference, str) and reference != ADAPTERS:
            raise LmlabError(f"reference must be a model, {ADAPTERS!r} or None, got {reference!r}")
        if reference is None and not cache:
            raise LmlabError("without a reference model, reference log-probs can only come from the cache "
                             "(precompute_reference); keep cache on")
        self.beta, self.loss, self.label_smoothing = float(beta), loss, label_smoothing
        self.nll_weight, self.reference, self.cache = nll_weight, reference, cache
        self.tr_tau, self.tr_alpha, self.loss_chunk = tr_tau, tr_alpha, loss_chunk
        self._cache: dict[int, tuple[float, float]] = {}
        self._policy: nn.Module | None = None
        self._checked = False

    # ---------------------------------------------------------------- the loop's hooks
    def frozen_modules(self) -> dict[str, nn.Module]:
        return {"reference": self.reference} if isinstance(self.reference, nn.Module) else {}

    def weight(self, batch: dict[str, torch.Tensor]) -> int:
        """Loss units: preference pairs."""
        return int(batch["chosen_ids"].shape[0])

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Real tokens of both sides (padding excluded)."""
        return int(batch["chosen_mask"].sum()) + int(batch["rejected_mask"].sum())

    def state_dict(self) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = {}
        if self._cache:
            keys = sorted(self._cache)
            state["ref_cache.index"] = torch.tensor(keys, dtype=torch.int64)
            state["ref_cache.logps"] = torch.tensor([self._cache[k] for k in keys], dtype=torch.float32)
        if self.tr_tau:  # the reference moves: its weights are state
            for name, p in self.reference.named_parameters():
                state[f"reference.{name}"] = p.detach().clone().contiguous()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._cache = {}
        if "ref_cache.index" in state:
            for k, (c, r) in zip(state["ref_cache.index"].tolist(), state["ref_cache.logps"].tolist()):
                self._cache[int(k)] = (c, r)
        if self.tr_tau:
            with torch.no_grad():
                for name, p in self.reference.named_parameters():
                    key = f"reference.{name}"
                    if key not in state:
                        raise LmlabError(f"the checkpoint holds no TR-DPO reference weights ({key}); it was "
                                         "written by a run without tr_tau, resume with that run's settings")
                    p.copy_(state[key])

    def after_step(self, step: int) -> None:
        """TR-DPO: every tr_tau steps, move the reference towards the policy and forget
        the reference log-probs computed with the old one."""
        if not self.tr_tau or step % self.tr_tau:
            return
        if self._policy is None:
            raise LmlabError("TR-DPO refresh before any training step: the objective has not seen the policy")
        self.refresh_reference(self._policy, self.tr_alpha)

    def refresh_reference(self, policy: nn.Module, alpha: float = 1.0) -> None:
        """`ref <- alpha policy + (1 - alpha) ref`; invalidates the cache."""
        if not isinstance(self.reference, nn.Module):
            raise LmlabError("only a separate reference model can be refreshed")
        soft_update(self.reference.parameters(), policy.parameters(), alpha)
        self._cache.clear()

    def invalidate(self) -> None:
        """Forget every cached reference log-prob (call after changing the reference)."""
        self._cache.clear()

    # ---------------------------------------------------------------- reference log-probs
    def _check(self, policy: nn.Module) -> None:
        if self._checked:
            return
        ref = self.reference
        if isinstance(ref, nn.Module):
            pv, rv = _vocab(policy), _vocab(ref)
            if pv is not None and rv is not None and pv != rv:
                raise LmlabError(f"the reference model has a vocabulary of {rv} tokens but the policy {pv}: "
                                 "log-probs of the same token ids would mean different text; use a reference "
                                 "with the policy's tokenizer (e.g. the SFT model the policy starts from)")
        elif ref == ADAPTERS:
            cfg = getattr(policy, "adapter_config", None)
            if cfg is not None and cfg.trainable:
                raise LmlabError(f"adapter.trainable={list(cfg.trainable)} trains base parameters in place, so the "
                                 "adapter-disabled model is no longer the start policy; drop adapter.trainable or "
                                 "use reference: copy")
        self._checked = True

    def _reference_model(self, policy: nn.Module):
        if isinstance(self.reference, nn.Module):
            return contextlib.nullcontext(self.reference)
        if self.reference == ADAPTERS:
            from lmlab.adapters import disabled_adapters

            return disabled_adapters(policy)
        raise LmlabError("no reference model: reference log-probs must be precomputed for every example "
                         "(DPO.precompute_reference) before training on it")

    @torch.no_grad()
    def _reference_sums(self, policy: nn.Module, inputs: dict[str, torch.Tensor | None]) -> torch.Tensor:
        with self._reference_model(policy) as ref:
            lp = masked_logprobs(ref, inputs["input_ids"], inputs["targets"], positions=inputs["positions"],
                                 attn_mask=inputs["attn_mask"], chunk=self.loss_chunk)
        return lp.sums.float()

    def reference_logps(self, policy: nn.Module, batch: dict[str, torch.Tensor],
                        inputs: dict[str, torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ref_chosen, ref_rejected), each (B,): from the cache where it has the example,
        computed (only for the missing rows) and cached otherwise."""
        b = batch["chosen_ids"].shape[0]
        device = inputs["input_ids"].device
        if not self.cache or "index" not in batch:
            if self.reference is None:
                raise LmlabError("precomputed reference log-probs need the batch's `index` (build batches with "
                                 "lmlab.data.preference.PreferenceCollator)")
            sums = self._reference_sums(policy, inputs)
            return sums[:b], sums[b:]
        keys = [int(k) for k in batch["index"].tolist()]
        missing = [i for i, k in enumerate(keys) if k not in self._cache]
        if missing:
            if self.reference is None:
                raise LmlabError(f"no precomputed reference log-probs for example {keys[missing[0]]}: run "
                                 "precompute_reference over every dataset the objective sees (validation too)")
            rows = torch.tensor(missing + [b + i for i in missing], device=device)
            sums = self._reference_sums(policy, _rows(inputs, rows)).tolist()
            n = len(missing)
            for j, i in enumerate(missing):
                self._cache[keys[i]] = (sums[j], sums[n + j])
        values = torch.tensor([self._cache[k] for k in keys], dtype=torch.float32, device=device)
        return values[:, 0], values[:, 1]

    @torch.no_grad()
    def precompute_reference(self, reference: nn.Module, batches) -> int:
        """Fill the cache with `reference`'s log-probs for every example of `batches` (the
        collated training and validation batches); returns how many examples it added."""
        was_training = reference.training
        reference.eval()
        added = 0
        try:
            for batch in batches:
                device = next(reference.parameters()).device
                batch = {k: v.to(device) for k, v in batch.items()}
                inputs = dpo_inputs(batch)
                lp = masked_logprobs(reference, inputs["input_ids"], inputs["targets"],
                                     positions=inputs["positions"], attn_mask=inputs["attn_mask"],
                                     chunk=self.loss_chunk)
                sums, b = lp.sums.float().tolist(), batch["chosen_ids"].shape[0]
                for j, k in enumerate(batch["index"].tolist()):
                    added += int(k) not in self._cache
                    self._cache[int(k)] = (sums[j], sums[b + j])
        finally:
            reference.train(was_training)
        return added

    # ---------------------------------------------------------------- the loss
    def _variant_params(self, lengths: torch.Tensor, b: int) -> dict[str, Any]:
        if self.loss in SMOOTHED:
            return {"label_smoothing": self.label_smoothing}
        if self.loss == "ipo":  # TRL's length-normalised form
            return {"chosen_lengths": lengths[:b], "rejected_lengths": lengths[b:]}
        return {}

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        self._check(model)
        self._policy = model
        b = batch["chosen_ids"].shape[0]
        inputs = dpo_inputs(batch)
        lp = masked_logprobs(model, inputs["input_ids"], inputs["targets"], positions=inputs["positions"],
                             attn_mask=inputs["attn_mask"], chunk=self.loss_chunk)
        lengths = lp.counts
        if bool((lengths == 0).any()):
            row = int((lengths == 0).nonzero()[0])
            side = "chosen" if row < b else "rejected"
            raise LmlabError(f"the {side} completion of pair {row % b} of this batch has no tokens after its prompt; "
                             "drop empty answers (or pairs truncated to their prompt) from the preference data")
        sums = lp.sums
        pc, pr = sums[:b], sums[b:]
        rc, rr = self.reference_logps(model, batch, inputs)
        per_pair = dpo_loss(self.loss, pc, pr, rc, rr, self.beta, **self._variant_params(lengths, b))
        loss = per_pair.mean()
        metrics: dict[str, Any] = {"loss": loss.detach()}
        if self.nll_weight:
            # Per pair, length-normalised: micro-batches then combine like one batch.
            nll = (-pc / lengths[:b]).mean()
            loss = with_nll(loss, nll, self.nll_weight)
            metrics["nll_chosen"] = nll.detach()
        m = dpo_metrics(pc, pr, rc, rr, self.beta)
        with torch.no_grad():
            tokens = lengths.clamp(min=1).float()
            # log pi - log ref per completion token, on the data's completions (the k1 KL
            # estimator, exact only if they were sampled from the policy).
            kl = ((torch.cat([pc, pr]) - torch.cat([rc, rr])) / tokens).mean()
        metrics.update({"rewards_chosen": m["rewards_chosen"].mean(), "rewards_rejected": m["rewards_rejected"].mean(),
                        "margin": m["margins"].mean(), "accuracy": m["accuracy"], "kl_to_ref": kl,
                        "logps_chosen": pc.detach().mean(), "logps_rejected": pr.detach().mean()})
        return with_moe_aux_losses(model, loss, metrics), metrics


def frozen_copy(model: nn.Module) -> nn.Module:
    """A detached, frozen, eval-mode copy of `model` (a separate reference)."""
    ref = copy.deepcopy(model)
    ref.requires_grad_(False)
    return ref.eval()
