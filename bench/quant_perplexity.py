"""What weight-only quantisation costs in perplexity: train a micro model briefly on the
embedded corpus (Python docs), then score held-out documents in float32, int8 and int4.

    python bench/quant_perplexity.py [--steps 100] [--eval-tokens 16384] [--threads 1]

The last 10% of the corpus documents (sorted path order) are held out from both the
tokenizer and the model."""
from __future__ import annotations

import argparse
import copy
import math
import time

import torch
import torch.nn.functional as F
from typing import Sequence

from lmlab.config import get_preset
from lmlab.errors import LmlabError
from lmlab.data.corpus import embedded_corpus_texts
from lmlab.decode.quant import quantize_model, weight_bytes_per_token
from lmlab.model import build_model
from lmlab.tokenizer import train_tokenizer

VARIANTS = [  # (label, quantize_model kwargs or None for float32)
    ("float32", None),
    ("int8, bf16 activations", dict(fmt="int8")),
    ("int8, f32 activations", dict(fmt="int8", compute_dtype="float32")),
    ("int4 g32, zero-point", dict(fmt="int4", group_size=32)),
    ("int4 g64, zero-point", dict(fmt="int4", group_size=64)),
    ("int4 g128, zero-point", dict(fmt="int4", group_size=128)),
    ("int4 g32, symmetric", dict(fmt="int4", group_size=32, zero_point=False)),
]



@torch.no_grad()
def stream_perplexity(model, token_ids: Sequence[int] | torch.Tensor, window: int, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) over `token_ids` cut into windows of `window` tokens (the
    tail shorter than a window is dropped). Each window starts from an empty context, so
    its first token is not scored: window - 1 predictions per window."""
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    if window < 2:
        raise LmlabError(f"perplexity window must be at least 2 tokens, got {window}")
    n = ids.numel() // window
    if n == 0:
        raise LmlabError(f"{ids.numel()} tokens do not fill one window of {window}; pass more text or a smaller window")
    windows = ids[: n * window].view(n, window)
    device = next(model.parameters()).device if any(True for _ in model.parameters()) else torch.device("cpu")
    total, count = 0.0, 0
    for start in range(0, n, batch_size):
        batch = windows[start:start + batch_size].to(device)
        logits = model(batch[:, :-1]).float()
        nll = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        total, count = total + float(nll), count + batch[:, 1:].numel()
    return math.exp(total / count)


def train(model, ids: torch.Tensor, steps: int, batch: int, seq: int, lr: float) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    warmup = max(1, steps // 10)
    model.train()
    for step in range(steps):
        scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        starts = torch.randint(0, ids.numel() - seq - 1, (batch,), generator=gen)
        chunk = torch.stack([ids[s:s + seq + 1] for s in starts.tolist()])
        loss = F.cross_entropy(model(chunk[:, :-1]).flatten(0, 1), chunk[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return float(loss.detach())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (1 on a shared CPU)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    texts = embedded_corpus_texts()
    cut = len(texts) - max(1, len(texts) // 10)
    train_texts, held_out = texts[:cut], texts[cut:]
    tok = train_tokenizer(train_texts, args.vocab)
    train_ids = torch.tensor([i for ids in tok.encode_batch(train_texts) for i in ids + [tok.eos_id]])
    eval_ids = torch.tensor([i for ids in tok.encode_batch(held_out) for i in ids + [tok.eos_id]])[: args.eval_tokens]
    # A narrowed micro model, so that a 2-core CPU trains it in minutes.
    cfg = get_preset("micro").replace(vocab_size=tok.vocab_size, max_seq_len=args.seq, d_model=args.d_model,
                                      n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden=3 * args.d_model)
    model = build_model(cfg)
    start = time.perf_counter()
    loss = train(model, train_ids, args.steps, args.batch, args.seq, args.lr)
    model.eval().requires_grad_(False)
    print(f"model (d_model {cfg.d_model}, {cfg.n_layers} layers, {sum(p.numel() for p in model.parameters()):,} params, vocab {tok.vocab_size}), "
          f"{args.steps} steps x {args.batch} x {args.seq} tokens in {time.perf_counter() - start:.0f} s, "
          f"last train loss {loss:.3f}")
    print(f"held out: {len(held_out)} documents, {eval_ids.numel()} tokens, windows of {args.seq}")
    base = None
    print(f"{'variant':<24} {'perplexity':>10} {'vs float32':>10} {'weight MB/token':>15}")
    for label, kwargs in VARIANTS:
        m = model if kwargs is None else quantize_model(copy.deepcopy(model), **kwargs)
        ppl = stream_perplexity(m, eval_ids, args.seq)
        base = base or ppl
        print(f"{label:<24} {ppl:>10.3f} {100 * (ppl / base - 1):>+9.2f}% {weight_bytes_per_token(m) / 1e6:>15.2f}")


if __name__ == "__main__":
    main()
