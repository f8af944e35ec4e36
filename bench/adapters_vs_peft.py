"""LoRA / DoRA training step (forward + backward) time: lmlab vs Hugging Face + peft.

Both sides hold the same Llama weights; the base models differ (our Transformer vs
transformers' LlamaForCausalLM), so the script also times the bare bases and prints each
side's adapter overhead next to the end-to-end ratio.

    PYTHONPATH=src python bench/adapters_vs_peft.py [--steps 10]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_adapters import TARGETS, ours_key  # noqa: E402  (the HF -> lmlab key map of the tests)

import peft  # noqa: E402
import transformers  # noqa: E402

from lmlab.adapters import AdapterConfig, apply_adapters  # noqa: E402
from lmlab.config import ModelConfig  # noqa: E402
from lmlab.model.transformer import build_model  # noqa: E402

CFG = ModelConfig(name="bench", vocab_size=4096, d_model=256, n_layers=4, n_heads=8, n_kv_heads=4,
                  ffn_hidden=688, max_seq_len=256)


def hf_model():
    hf_cfg = transformers.LlamaConfig(
        vocab_size=CFG.vocab_size, hidden_size=CFG.d_model, intermediate_size=CFG.ffn_hidden,
        num_hidden_layers=CFG.n_layers, num_attention_heads=CFG.n_heads,
        num_key_value_heads=CFG.n_kv_heads, max_position_embeddings=CFG.max_seq_len,
        rms_norm_eps=CFG.norm_eps, rope_theta=CFG.rope_theta, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(hf_cfg).float()
    model.config._attn_implementation = "sdpa"
    return model


def make_step(forward, params, idx, targets):
    def one() -> float:
        t0 = time.perf_counter()
        logits = forward(idx)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
        for p in params:
            p.grad = None
        return time.perf_counter() - t0
    return one


def paired_median(a, b, steps: int) -> tuple[float, float]:
    """Median seconds per step of `a` and `b`, alternated step by step so that load from
    other processes on a shared machine hits both sides alike."""
    a(), b()  # warm-up
    times_a, times_b = [], []
    for _ in range(steps):
        times_a.append(a())
        times_b.append(b())
    return statistics.median(times_a), statistics.median(times_b)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    torch.manual_seed(0)
    idx = torch.randint(0, CFG.vocab_size, (args.batch, args.seq))
    targets = torch.randint(0, CFG.vocab_size, (args.batch, args.seq))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}x{args.seq}, "
          f"d={CFG.d_model}, {CFG.n_layers} layers, r=8 on all 7 projections; median seconds per step")
    hf = hf_model()
    ours = build_model(CFG)
    ours.load_state_dict({ours_key(k): v for k, v in hf.state_dict().items()})
    base_ours, base_hf = paired_median(
        make_step(ours, list(ours.parameters()), idx, targets),
        make_step(lambda x: hf(input_ids=x).logits, list(hf.parameters()), idx, targets), args.steps)
    print(f"{'base (all trainable)':<22} lmlab {base_ours:.4f}  hf {base_hf:.4f}  ratio hf/lmlab {base_hf / base_ours:.2f}")
    for method in ("lora", "dora"):
        m_ours = build_model(CFG)
        m_ours.load_state_dict(ours.state_dict())
        apply_adapters(m_ours, AdapterConfig(method=method, r=8, alpha=16, targets=tuple(TARGETS)))
        m_hf = peft.get_peft_model(hf_model(), peft.LoraConfig(
            r=8, lora_alpha=16, target_modules=TARGETS, use_dora=method == "dora"))
        t_ours, t_hf = paired_median(
            make_step(m_ours, [p for p in m_ours.parameters() if p.requires_grad], idx, targets),
            make_step(lambda x: m_hf(input_ids=x).logits, [p for p in m_hf.parameters() if p.requires_grad],
                      idx, targets), args.steps)
        print(f"{method:<22} lmlab {t_ours:.4f}  peft {t_hf:.4f}  ratio peft/lmlab {t_hf / t_ours:.2f}  "
              f"(vs own base: lmlab x{t_ours / base_ours:.2f}, peft x{t_hf / base_hf:.2f})")


if __name__ == "__main__":
    main()
