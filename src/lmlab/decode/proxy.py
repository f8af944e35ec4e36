"""Proxy-tuning (Liu et al., 2024): steer a base model at decoding time with the difference
between a small tuned expert and its untuned anti-expert,

    scores = log p_base + alpha * (log p_expert - log p_anti),

softmaxed and sampled. No weights are touched; only the three next-token distributions over
a shared vocabulary are needed, so any member may be a black box (see `remote.py`).

Log-softmax, not raw logits: the two differ by one constant per model and position, which
the final softmax ignores, so the distribution is the paper's; log-probabilities keep the
arithmetic well scaled and make remote members (which return log-probs) interchangeable.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from lmlab.decode.generate import Decoder, Generation, stream
from lmlab.errors import LmlabError


def proxy_scores(base: torch.Tensor, expert: torch.Tensor, anti: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """Combine three (B, V) score tensors (logits or log-probs) into proxy-tuned log-scores."""
    return base.log_softmax(-1) + alpha * (expert.log_softmax(-1) - anti.log_softmax(-1))


def shared_vocab_size(sizes: dict[str, int], truncate: bool = False) -> int:
    """The vocabulary the members share. Different sizes are refused unless `truncate`:
    then every member is cut to the smallest vocabulary, which is right only when the larger
    vocabularies extend the smaller one (extra tokens appended at the end, as when a tuned
    model adds special tokens) — the caller's responsibility, as in the paper's code."""
    distinct = set(sizes.values())
    if len(distinct) == 1:
        return distinct.pop()
    described = ", ".join(f"{name} has {n}" for name, n in sizes.items())
    if not truncate:
        raise LmlabError(
            f"proxy-tuning needs one shared vocabulary, but {described} tokens; use models with the "
            "same tokenizer, or pass truncate_vocab=True if the larger vocabularies only append tokens"
        )
    return min(distinct)


@dataclass
class ProxyMembers:
    """Three members stepping in lock-step; each has prefill() and step(tokens) -> (B, V)."""
    base: object
    expert: object
    anti: object
    vocab: int
    alpha: float = 1.0

    def scores(self, tokens: torch.Tensor | None) -> torch.Tensor:
        outs = []
        for member in (self.base, self.expert, self.anti):
            logits = member.prefill() if tokens is None else member.step(tokens)
            outs.append(logits[:, : self.vocab].float())
        return proxy_scores(*outs, alpha=self.alpha)


def _vocab(member) -> int:
    model = getattr(member, "model", None)
    return model.config.vocab_size if model is not None else member.vocab_size


def make_members(base, expert, anti, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 alpha: float = 1.0, truncate_vocab: bool = False) -> ProxyMembers:
    """Local models become Decoders; anything with prefill/step (a remote member) is used as is."""
    members = [m if hasattr(m, "prefill") else Decoder(m, prompts, max_new_tokens) for m in (base, expert, anti)]
    vocab = shared_vocab_size({n: _vocab(m) for n, m in zip(("base", "expert", "anti-expert"), members)},
                              truncate_vocab)
    return ProxyMembers(*members, vocab=vocab, alpha=alpha)


def proxy_generate(base, expert, anti, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                   alpha: float = 1.0, truncate_vocab: bool = False, **sampling) -> list[Generation]:
    """Generate from the proxy-tuned distribution; `sampling` takes `generate`'s options.
    The returned log-probs are those of the proxy-tuned distribution (temperature 1)."""
    members = make_members(base, expert, anti, prompts, max_new_tokens, alpha, truncate_vocab)
    results: list[Generation] = []
    local = next((m for m in (base, expert, anti) if hasattr(m, "parameters")), None)
    for _ in stream(local, prompts, max_new_tokens, results=results, next_logits=members.scores, **sampling):
        pass
    return results


def token_influence(base, expert, anti, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]],
                    alpha: float = 1.0, decode=None, top: int = 20) -> list[dict]:
    """Which tokens proxy-tuning shifts most: for every position of each continuation
    (e.g. the proxy-tuned model's own outputs), the change in the chosen token's probability
    from the base to the proxy-tuned distribution, aggregated per token type and sorted by
    the mean shift. The paper found reasoning and style tokens shifted most."""
    stats: dict[int, list[float]] = {}
    for prompt, cont in zip(prompts, continuations):
        ids = torch.tensor([list(prompt) + list(cont)])
        with torch.no_grad():
            outs = [m(ids)[0].float() for m in (base, expert, anti)]
        n = min(o.shape[-1] for o in outs)
        b, e, a = (o[:, :n] for o in outs)
        p_base = b.softmax(-1)
        p_proxy = proxy_scores(b, e, a, alpha).softmax(-1)
        for i, tok in enumerate(cont):
            pos = len(prompt) - 1 + i
            stats.setdefault(int(tok), []).append(float(p_proxy[pos, tok] - p_base[pos, tok]))
    rows = [{"token_id": t, "token": decode([t]) if decode else str(t), "count": len(v),
             "mean_shift": sum(v) / len(v)} for t, v in stats.items()]
    rows.sort(key=lambda r: -r["mean_shift"])
    return rows[:top]


def influence_table(rows: list[dict]) -> str:
    """Markdown table of `token_influence` rows."""
    lines = ["| token | count | mean Δp (proxy − base) |", "|---|---|---|"]
    lines += [f"| {r['token']!r} | {r['count']} | {r['mean_shift']:+.4f} |" for r in rows]
    return "\n".join(lines)
