"""Generation throughput: lmlab's engine vs transformers' generate (dynamic and static
cache) on the same ~8.5M-parameter model and weights, greedy, in one run; plus the cost of
proxy-tuning (three models in lock-step) relative to one model.

    python bench/generate.py [--new-tokens 128] [--repeats 3]
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time

import torch

from lmlab.config import get_preset
from lmlab.decode.generate import generate
from lmlab.decode.proxy import proxy_generate
from lmlab.interop.hf import save_hf
from lmlab.model import build_model


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up (allocations, lazy init)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = get_preset("micro").replace(max_seq_len=args.prompt_len + args.new_tokens)
    ours = build_model(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        save_hf(ours, d)
        hf = AutoModelForCausalLM.from_pretrained(d, attn_implementation="sdpa").eval()
    n = args.new_tokens
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"model: {sum(p.numel() for p in ours.parameters()):,} parameters; {n} new tokens, greedy, prompt {args.prompt_len}")
    print(f"{'batch':>5} {'lmlab tok/s':>12} {'hf dynamic':>11} {'hf static':>10} {'vs dynamic':>10} {'vs static':>9}")
    for batch in (1, 8):
        ids = torch.randint(0, cfg.vocab_size, (batch, args.prompt_len))
        prompts = ids.tolist()

        def run_ours():
            return generate(ours, prompts, n)

        def run_hf(cache):
            kwargs = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                          attention_mask=torch.ones_like(ids))
            if cache:
                kwargs["cache_implementation"] = cache
            with torch.no_grad():
                return hf.generate(ids, **kwargs)

        ours_tokens = [g.tokens for g in run_ours()]
        hf_tokens = run_hf(None)[:, args.prompt_len:].tolist()
        same = ours_tokens == hf_tokens
        t_ours = best_time(run_ours, args.repeats)
        t_dyn = best_time(lambda: run_hf(None), args.repeats)
        t_static = best_time(lambda: run_hf("static"), args.repeats)
        tps = lambda t: batch * n / t  # noqa: E731
        print(f"{batch:>5} {tps(t_ours):>12,.0f} {tps(t_dyn):>11,.0f} {tps(t_static):>10,.0f} "
              f"{t_dyn / t_ours:>9.2f}x {t_static / t_ours:>8.2f}x   identical tokens: {same}")
    expert, anti = build_model(cfg).eval(), build_model(cfg).eval()
    prompts = torch.randint(0, cfg.vocab_size, (1, args.prompt_len)).tolist()
    t_one = best_time(lambda: generate(ours, prompts, n), args.repeats)
    t_proxy = best_time(lambda: proxy_generate(ours, expert, anti, prompts, n), args.repeats)
    print(f"proxy-tuning (3 models) vs one model, batch 1: {t_proxy / t_one:.2f}x the time "
          f"({n / t_proxy:,.0f} vs {n / t_one:,.0f} tok/s)")


if __name__ == "__main__":
    main()
