"""Training throughput (tokens/s) and MFU: lmlab's Transformer vs transformers'
LlamaForCausalLM (and LitGPT's GPT when installed) at the same ~8.5M-parameter config,
float32 and bf16 autocast, one full optimizer step (forward, backward, AdamW) per timing.

MFU = 6 * N * tokens/s / peak, with N the parameters that take part in matmuls (all but
the input embedding lookup) and peak this machine's GEMM throughput for the same dtype,
measured below on square matmuls.

    PYTHONPATH=src python bench/train_throughput.py [--rounds 4] [--threads 2] [--no-compile]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from lmlab.config import get_preset
from lmlab.model.transformer import build_model
from lmlab.train.config import TrainConfig
from lmlab.train.loop import build_optimizer
from lmlab.train.objectives.lm import LanguageModeling

CFG = get_preset("micro")  # d=256, 6 layers, 8 heads, 4 KV heads, FFN 688, vocab 8192
SEQ, BATCH = 256, 8


def gemm_peak(dtype: torch.dtype, n: int = 1024, reps: int = 10) -> float:
    """Best-of GFLOP/s of an n x n x n matmul in `dtype`."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def matmul_params(model: torch.nn.Module) -> int:
    embed = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()) - embed


def ours(compile_: bool = False, loss_chunk: int = 0):
    torch.manual_seed(0)
    model = build_model(CFG)
    objective = LanguageModeling(loss_chunk)
    forward = torch.compile(objective.__call__) if compile_ else objective
    return model, lambda batch: forward(model, batch)[0]


def hf_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaConfig(vocab_size=CFG.vocab_size, hidden_size=CFG.d_model, intermediate_size=CFG.ffn_hidden,
                     num_hidden_layers=CFG.n_layers, num_attention_heads=CFG.n_heads,
                     num_key_value_heads=CFG.n_kv_heads, max_position_embeddings=SEQ,
                     rms_norm_eps=CFG.norm_eps, tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(hf)

    def loss(batch):
        logits = model(input_ids=batch[:, :-1]).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
    return model, loss


def litgpt_gpt():
    from litgpt.config import Config
    from litgpt.model import GPT

    lc = Config(vocab_size=CFG.vocab_size, padded_vocab_size=CFG.vocab_size, n_embd=CFG.d_model,
                n_layer=CFG.n_layers, n_head=CFG.n_heads, n_query_groups=CFG.n_kv_heads,
                intermediate_size=CFG.ffn_hidden, block_size=SEQ, bias=False, norm_class_name="RMSNorm",
                mlp_class_name="LLaMAMLP", rotary_percentage=1.0, parallel_residual=False,
                norm_eps=CFG.norm_eps)
    torch.manual_seed(0)
    model = GPT(lc)

    def loss(batch):
        logits = model(batch[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
    return model, loss


class Trainer:
    """One model + loss + AdamW, stepping on fixed random batches."""

    def __init__(self, build, precision: str) -> None:
        self.model, self.loss_fn = build()
        self.model.train()
        self.precision = precision
        self.opt = build_optimizer(self.model, TrainConfig())
        g = torch.Generator().manual_seed(0)
        self.batches = [torch.randint(0, CFG.vocab_size, (BATCH, SEQ + 1), generator=g) for _ in range(2)]
        self.i = 0

    def step(self) -> float:
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            loss = self.loss_fn(self.batches[self.i % 2])
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.i += 1
        return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=4, help="timed steps per configuration")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-compile", action="store_true", help="skip lmlab under torch.compile (~1 min to compile)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    runs = [("transformers Llama", hf_llama, "float32"), ("transformers Llama", hf_llama, "bf16")]
    import importlib.util

    if importlib.util.find_spec("litgpt") is not None:
        runs += [("LitGPT GPT", litgpt_gpt, "float32"), ("LitGPT GPT", litgpt_gpt, "bf16")]
    else:
        print("LitGPT not installed: skipped")
    runs += [("lmlab", ours, "float32"), ("lmlab", ours, "bf16"),
             ("lmlab chunked CE", lambda: ours(loss_chunk=512), "bf16")]
    if not args.no_compile:
        runs += [("lmlab compiled", lambda: ours(compile_=True), "bf16")]
    trainers = [Trainer(build, precision) for _, build, precision in runs]
    for tr in trainers:  # warm-up: allocator, oneDNN primitive caches, compilation
        tr.step(), tr.step()
    # The CPU is shared, so load comes and goes: time the configurations in interleaved
    # rounds and keep each one's fastest step, which is the least disturbed measurement.
    best = [float("inf")] * len(runs)
    peak = {"float32": 0.0, "bf16": 0.0}
    for _ in range(args.rounds):
        peak = {"float32": max(peak["float32"], gemm_peak(torch.float32)),
                "bf16": max(peak["bf16"], gemm_peak(torch.bfloat16))}
        for j, tr in enumerate(trainers):
            best[j] = min(best[j], tr.step())
    print(f"torch {torch.__version__}, {args.threads} threads, batch {BATCH} x seq {SEQ}; GEMM peak "
          f"(best of rounds): float32 {peak['float32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s")
    results = {}
    print(f"{'model':<20} {'precision':<9} {'params':>9} {'tokens/s':>9} {'MFU':>6}")
    for (name, _, precision), tr, t in zip(runs, trainers, best):
        tps = BATCH * SEQ / t
        n = matmul_params(tr.model)
        results[(name, precision)] = tps
        print(f"{name:<20} {precision:<9} {n:>9,} {tps:>9,.0f} {6 * n * tps / (peak[precision] * 1e9):>6.1%}")

    best_ours = max(v for (n, p), v in results.items() if n.startswith("lmlab") and p == "bf16")
    hf32 = results[("transformers Llama", "float32")]
    refs = {n: v for (n, p), v in results.items() if not n.startswith("lmlab") and p == "bf16"}
    best_ref = max(refs.values())
    print(f"best lmlab bf16 / transformers float32: {best_ours / hf32:.2f}x (target >= 3x)")
    print(f"best lmlab bf16 / best reference bf16 ({max(refs, key=refs.get)}): "
          f"{best_ours / best_ref:.2f}x (target >= 1.3x)")


if __name__ == "__main__":
    main()
