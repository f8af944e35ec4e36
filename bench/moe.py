"""Mixture-of-experts training step: lmlab's dropless grouped dispatch vs the dense model
with the same *active* parameters (the practical limit of a dropless dispatch) vs
transformers' Mixtral with the same weights, forward + backward tokens/s, float32 and bf16
autocast, in one run.

    PYTHONPATH=src python bench/moe.py [--rounds 3]
"""
from __future__ import annotations

import argparse
import contextlib
import tempfile
import time

import torch
import torch.nn.functional as F

from lmlab.config import ModelConfig
from lmlab.interop.hf import save_hf
from lmlab.model import build_model
from lmlab.model.moe import collect_aux_losses

CASES = {
    # name: (MoE config, batch, seq)
    "8 experts top-2, d=256": (ModelConfig(name="moe-a", family="mixtral", vocab_size=8192, d_model=256, n_layers=6,
                                           n_heads=8, n_kv_heads=4, ffn_hidden=688, max_seq_len=256,
                                           n_experts=8, top_k=2), 8, 256),
    "64 experts top-8, d=512": (ModelConfig(name="moe-b", family="mixtral", vocab_size=8192, d_model=512, n_layers=2,
                                            n_heads=8, n_kv_heads=4, ffn_hidden=256, max_seq_len=512,
                                            n_experts=64, top_k=8), 8, 512),
}


def step_fn(model, ids, hf: bool, precision: str):
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()

    def step():
        with ctx:
            logits = model(input_ids=ids[:, :-1]).logits if hf else model(ids[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        for p in model.parameters():
            p.grad = None
    return step


def best(fn, rounds: int) -> float:
    fn()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; fwd+bwd tokens/s, best of {args.rounds}")
    print(f"{'case':<24} {'prec':<7} {'lmlab MoE':>10} {'dense (=active)':>16} {'transformers':>13} "
          f"{'MoE/dense':>10} {'vs HF':>7}")
    for name, (cfg, batch, seq) in CASES.items():
        torch.manual_seed(0)
        moe = build_model(cfg)
        dense = build_model(cfg.replace(name="dense", family="llama", n_experts=0, top_k=0,
                                        ffn_hidden=cfg.ffn_hidden * cfg.top_k))
        with tempfile.TemporaryDirectory() as d:
            save_hf(moe, d)
            hf = AutoModelForCausalLM.from_pretrained(d, attn_implementation="sdpa")
        ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
        with torch.no_grad():
            moe(ids[:, :-1])
        imbalance = float(collect_aux_losses(moe)["moe_load_imbalance"])
        for precision in ("float32", "bf16"):
            t_moe = best(step_fn(moe, ids, False, precision), args.rounds)
            t_dense = best(step_fn(dense, ids, False, precision), args.rounds)
            t_hf = best(step_fn(hf, ids, True, precision), args.rounds)
            tps = lambda t: batch * seq / t  # noqa: E731
            print(f"{name:<24} {precision:<7} {tps(t_moe):>10,.0f} {tps(t_dense):>16,.0f} {tps(t_hf):>13,.0f} "
                  f"{t_dense / t_moe:>9.0%} {t_hf / t_moe:>6.2f}x")
        print(f"{'':<24} expert load (max/mean over layers, random init): {imbalance:.2f}")


if __name__ == "__main__":
    main()
