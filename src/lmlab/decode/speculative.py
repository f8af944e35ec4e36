"""Speculative sampling (Leviathan et al. 2023; Chen et al. 2023): a small draft model
proposes k tokens, the target scores all of them in one forward, and each proposal d is kept
with probability min(1, p(d) / q(d)); the first rejected one is replaced by a draw from
norm(max(0, p - q)). The output follows the target's distribution exactly, whatever the
draft, for any sampling settings (p and q are the processed distributions).

One sequence at a time: rows of a batch would accept different numbers of tokens, and the
cache slots of a batch move together.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lmlab.decode.generate import Decoder, Generation, SamplingParams, check_max_new_tokens
from lmlab.decode.sampling import process_logits
from lmlab.errors import LmlabError


@dataclass
class SpeculativeResult(Generation):
    proposed: int = 0
    accepted: int = 0
    target_forwards: int = 0
    draft_tokens: list[int] = field(default_factory=list, repr=False)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


def _probs(logits: torch.Tensor, temperature: float, top_k, top_p, min_p) -> torch.Tensor:
    """The distribution actually sampled from; greedy is the one-hot of the argmax."""
    if temperature <= 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return process_logits(logits.float(), temperature, top_k, top_p, min_p).softmax(-1)


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def speculative_generate(target, draft, prompt: list[int], max_new_tokens: int, *, k: int = 4,
                         temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                         min_p: float | None = None, eos_id: int | None = None,
                         seed: int | None = None) -> SpeculativeResult:
    if target.config.vocab_size != draft.config.vocab_size:
        raise LmlabError(
            f"the draft model's vocabulary ({draft.config.vocab_size}) differs from the target's "
            f"({target.config.vocab_size}); speculative decoding needs the same tokenizer"
        )
    if k < 1:
        raise LmlabError(f"k (tokens proposed per round) must be at least 1, got {k}")
    check_max_new_tokens(max_new_tokens)
    SamplingParams(temperature, top_k, top_p, min_p)  # validates every field
    generator = None
    if seed is not None:
        generator = torch.Generator(device=next(target.parameters()).device).manual_seed(seed)
    probs = lambda logits: _probs(logits, temperature, top_k, top_p, min_p)  # noqa: E731
    # Room for one full round past the budget: proposals beyond it are discarded at the end.
    budget = max_new_tokens + k + 1
    t_dec, d_dec = Decoder(target, [prompt], budget), Decoder(draft, [prompt], budget)
    result = SpeculativeResult()
    p_next = probs(t_dec.prefill()[0])
    d_logits = d_dec.prefill()
    result.target_forwards = 1
    token = _draw(p_next, generator)  # the first token comes from the target alone
    out = [token]
    target_pending, draft_pending = [token], [token]
    while len(out) < max_new_tokens and not (eos_id is not None and out[-1] == eos_id):
        d_logits = d_dec.extend(torch.tensor([draft_pending]))[:, -1]
        proposals, q = [], []
        for i in range(k):
            q_i = probs(d_logits[0])
            d = _draw(q_i, generator)
            proposals.append(d)
            q.append(q_i)
            if i < k - 1:
                d_logits = d_dec.step(torch.tensor([d]))
        # One target forward scores the pending token's successor and every proposal.
        t_logits = t_dec.extend(torch.tensor([target_pending + proposals]))[0]
        result.target_forwards += 1
        p = [probs(t_logits[i]) for i in range(k + 1)]
        result.proposed += k
        n_ok = 0
        new_token = None
        for i, d in enumerate(proposals):
            ratio = p[i][d] / q[i][d]
            u = torch.rand((), generator=generator, device=ratio.device)
            if u < ratio:
                n_ok += 1
                continue
            residual = (p[i] - q[i]).clamp(min=0)
            new_token = _draw(residual / residual.sum(), generator)
            break
        result.accepted += n_ok
        kept = proposals[:n_ok]
        if new_token is None:  # every proposal accepted: a bonus token from the target
            new_token = _draw(p[k], generator)
            t_dec_roll, d_dec_roll = 0, 0
            draft_pending = [proposals[-1], new_token]  # the draft never fed its last proposal
        else:
            t_dec_roll = k - n_ok  # the target fed all k proposals
            d_dec_roll = (k - 1) - n_ok  # the draft fed all but the last
            draft_pending = [new_token]
        t_dec.rollback(t_dec_roll)
        d_dec.rollback(d_dec_roll)
        target_pending = [new_token]
        out.extend(kept + [new_token])
        if eos_id is not None and eos_id in kept:
            break
    if eos_id is not None and eos_id in out:
        out = out[: out.index(eos_id) + 1]
        result.finish_reason = "eos"
    else:
        result.finish_reason = "length"
    result.tokens = out[:max_new_tokens]
    return result
