"""Greedy decoding throughput on CPU: lmlab float32 / int8 / int4 (weight-only, see
lmlab.decode.quant) against transformers' LlamaForCausalLM in float32 with the same
weights, interleaved in one process, beside the memory-bandwidth roofline.

    python bench/decode.py [--quick] [--threads 1] [--new-tokens 32] [--repeats 3] [--profile] [--compile] [--models micro]

Models (random weights): SmolLM2-135M's shape (30 layers, d_model 576, 9 heads, 3 KV heads,
ffn 1536, vocab 49152, tied embeddings) and the `micro` preset. At batch 1 every step reads
every weight once, so tokens/s <= bandwidth / weight bytes per token ("roofline"; at
batch B, B tokens share one read). Bandwidth is measured here as the best time of a sum
over a 512 MiB float32 array.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from lmlab.config import ModelConfig, get_preset
from lmlab.decode.generate import generate
from lmlab.decode.quant import quantize_model, weight_bytes_per_token
from lmlab.interop.hf import save_hf
from lmlab.model import build_model

SMOLLM2_135M = ModelConfig(
    name="smollm2-135m-shape", vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
    ffn_hidden=1536, max_seq_len=2048, norm_eps=1e-5, rope_theta=100000.0, tie_embeddings=True,
)


def cpu_description() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "lscpu unavailable"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = set(fields.get("Flags", "").split())
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16")
            if f in flags]
    return (f"{fields.get('Model name', '?').strip()}, {fields.get('CPU(s)', '?').strip()} CPUs; "
            f"SIMD flags: {' '.join(simd) or 'none of avx2/avx512'}")


def read_bandwidth(mib: int = 512, repeats: int = 5) -> float:
    """Bytes per second of a streaming read (torch sum over a large float32 array)."""
    a = torch.ones(mib * 2**20 // 4)
    a.sum()
    best = min(_timed(a.sum) for _ in range(repeats))
    return a.numel() * 4 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def hf_twin(model):
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as d:
        save_hf(model, d)
        return AutoModelForCausalLM.from_pretrained(d, attn_implementation="sdpa", dtype=torch.float32).eval()


def lmlab_run(model, compile: bool = False):
    return lambda prompts, n: generate(model, prompts, n, compile=compile)


def variants(model, with_compile: bool):
    """(label, run(prompts, n) -> None, weight bytes per token)."""
    base_bytes = weight_bytes_per_token(model)
    out = [("lmlab float32", model, base_bytes)]
    for label, kw in (("lmlab int8", dict(fmt="int8")), ("lmlab int4 g32", dict(fmt="int4", group_size=32))):
        q = quantize_model(copy.deepcopy(model), **kw)
        out.append((label, q, weight_bytes_per_token(q)))
    runs = [(label, lmlab_run(m), b) for label, m, b in out]
    if with_compile:
        runs += [(f"{label} +compile", lmlab_run(m, compile=True), b) for label, m, b in out]
    hf = hf_twin(model)

    def run_hf(prompts, n):
        ids = torch.tensor(prompts)
        hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                    do_sample=False, pad_token_id=0)

    runs.append(("transformers float32", run_hf, base_bytes))
    runs += llama_cpp_runs(model, base_bytes)
    return runs


def llama_cpp_runs(model, f32_bytes: int):
    """llama.cpp (llama-cpp-python, where installed: tools/build_llama_cpp.sh) on GGUF exports
    of the same weights, f32 and q8_0, greedy through its own KV cache. It decodes one
    sequence: these rows run at batch 1 only. Threads: torch's count, the same for all."""
    try:
        import llama_cpp
    except ImportError:
        print("llama.cpp rows left out: llama_cpp is not installed (tools/build_llama_cpp.sh builds it)")
        return []
    import numpy as np

    from lmlab.checkpoint import save_model
    from lmlab.data.corpus import embedded_corpus_texts
    from lmlab.interop.gguf import export_gguf
    from lmlab.tokenizer import train_tokenizer

    work = Path(tempfile.mkdtemp(prefix="lmlab-bench-gguf-"))
    tok = train_tokenizer(embedded_corpus_texts()[:20], 1024)  # exported vocab is padded to the model's
    save_model(model, work / "model", tokenizer=tok)
    out = []
    for kind, nbytes in (("f32", f32_bytes), ("q8_0", f32_bytes * 34 // 128)):  # q8_0: 34 bytes / 32 weights
        path = export_gguf(work / "model", work / f"model-{kind}.gguf", type=kind)
        llm = llama_cpp.Llama(str(path), n_ctx=model.config.max_seq_len, n_batch=64, n_threads=torch.get_num_threads(),
                              verbose=False)

        def run(prompts, n, llm=llm):
            if len(prompts) != 1:
                return None
            llm.reset()
            llm.eval(prompts[0])
            for _ in range(n):
                llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        out.append((f"llama.cpp {kind}", run, nbytes))
    return out


@torch.no_grad()
def bench_model(cfg: ModelConfig, batches, n: int, prompt_len: int, repeats: int, bandwidth: float,
                with_compile: bool) -> None:
    torch.manual_seed(0)
    model = build_model(cfg).eval().requires_grad_(False)
    runs = variants(model, with_compile)
    print(f"\n{cfg.name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters; greedy, prompt "
          f"{prompt_len}, {n} new tokens; tokens/s = batch x new tokens / wall time (prefill included)")
    print(f"{'variant':<26} {'batch':>5} {'tok/s':>8} {'roofline':>9} {'of roof':>7} {'MB/token':>9}")
    for batch in batches:
        prompts = torch.randint(0, cfg.vocab_size, (batch, prompt_len)).tolist()
        live = [r for r in runs if batch == 1 or not r[0].startswith("llama.cpp")]
        for _, run, _ in live:  # warm-up: lazy init, and the compilation under +compile
            run(prompts, 2)
        times = {label: [] for label, _, _ in live}
        for _ in range(repeats):  # interleaved: a load spike hits every variant alike
            for label, run, _ in live:
                times[label].append(_timed(lambda: run(prompts, n)))
        for label, _, nbytes in live:
            rate = batch * n / statistics.median(times[label])
            roof = batch * bandwidth / nbytes
            print(f"{label:<26} {batch:>5} {rate:>8.1f} {roof:>9.1f} {100 * rate / roof:>6.0f}% {nbytes / 1e6:>9.1f}")


@torch.no_grad()
def profile_int8(cfg: ModelConfig, n: int, rows: int = 12) -> None:
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    q = quantize_model(build_model(cfg).eval(), "int8")
    prompts = [[1] * 8]
    generate(q, prompts, 2)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        generate(q, prompts, n)
    print(f"\nprofile: {cfg.name} int8, batch 1, {n} new tokens (self CPU time)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="micro + SmolLM shape, batch 1 and 8, 8 tokens, 1 repeat")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="torch.profiler top ops of the int8 path")
    parser.add_argument("--compile", action="store_true", help="also time generate(compile=True) (slow to compile)")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads (on a CPU shared with other jobs, 1 avoids threads waiting "
                             "on descheduled peers at every op)")
    parser.add_argument("--models", default="micro,smollm2-135m-shape", help="comma-separated subset")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n, repeats = (8, 1) if args.quick else (args.new_tokens, args.repeats)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(cpu_description())
    bandwidth = read_bandwidth(256 if args.quick else 512)
    print(f"measured read bandwidth: {bandwidth / 1e9:.1f} GB/s (torch sum over a large float32 array)")
    for cfg in (get_preset("micro"), SMOLLM2_135M):
        if cfg.name not in args.models.split(","):
            continue
        bench_model(cfg, (1, 8), n, args.prompt_len, repeats, bandwidth, args.compile and not args.quick)
    if args.profile:
        profile_int8(SMOLLM2_135M, 4 if args.quick else 16)


if __name__ == "__main__":
    main()
