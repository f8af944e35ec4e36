"""Seconds per GRPO iteration (rollout + update): lmlab vs TRL's GRPOTrainer, in one run.

Both sides train the same ~8.5M-parameter Llama-style model (one set of weights: built in
transformers, saved, and opened by lmlab.hub) on SortWorld prompts with the world's dense
gold reward: 8 prompts x 8 completions of up to 32 new tokens per iteration, temperature
1, no top-k/top-p, beta 0 (no reference), one update of the 64 completions per rollout
(DAPO's token-level loss, TRL's default). A random model almost never emits EOS, so both
sides generate the full 32 tokens. Each side runs n + 1 iterations; the first is a warm-up
and not timed; the median of the rest is reported.

    PYTHONPATH=src python bench/rl.py            # 5 timed iterations each
    PYTHONPATH=src python bench/rl.py --quick    # 1 each, < 90 s on 2 idle cores
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

VOCAB, D, LAYERS, HEADS, KV, FFN, CTX = 8192, 256, 6, 8, 4, 688, 128
PROMPTS, GROUP, NEW_TOKENS = 8, 8, 32


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def build(tmp: Path):
    """The HF model, its tokenizer (a BPE trained on the world's corpus), the prompts, and
    the same weights opened as an lmlab Transformer."""
    import transformers

    from lmlab.hub import load_model
    from lmlab.tokenizer import train_tokenizer
    from lmlab.worlds.export import export_world

    export_world("sort", tmp / "world", seed=0, n=200)
    texts = [json.loads(line)["text"] for line in (tmp / "world" / "corpus.jsonl").read_text().splitlines()]
    ours_tok = train_tokenizer(texts, vocab_size=1024, min_frequency=1)
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=ours_tok.backend, bos_token="<|bos|>",
                                                  eos_token="<|eos|>", pad_token="<|pad|>")
    hf_tok.padding_side = "left"
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=FFN, num_hidden_layers=LAYERS,
                                   num_attention_heads=HEADS, num_key_value_heads=KV, max_position_embeddings=CTX,
                                   tie_word_embeddings=False, bos_token_id=hf_tok.bos_token_id,
                                   eos_token_id=hf_tok.eos_token_id, pad_token_id=hf_tok.pad_token_id)
    hf = transformers.LlamaForCausalLM(cfg).float()
    hf.save_pretrained(tmp / "hf")
    hf_tok.save_pretrained(tmp / "hf")
    ours = load_model(tmp / "hf")
    # Held-out prompts in the corpus's plain format ("sort: c a b\nanswer:"): no chat template.
    prompts = [json.loads(line)["base_prompt"] for line in (tmp / "world" / "eval.jsonl").read_text().splitlines()]
    return hf, hf_tok, ours, ours_tok, prompts


def gold(prompts, completions) -> list[float]:
    from lmlab.worlds.evaluate import sort_rewards

    return sort_rewards([p.split("\n")[0] for p in prompts], list(completions))["gold_dense"]


class GoldText:
    """lmlab's side of the same reward (a `Reward`)."""

    def score(self, prompts, completions):
        return torch.tensor(gold(prompts, completions), dtype=torch.float32)


def ours_iteration_fn(model, tok, prompts, tmp: Path, iterations: int):
    """Each call runs one GRPO iteration through the one loop (rollout + one optimizer step)."""
    from lmlab.train.config import TrainConfig
    from lmlab.train.objectives.grpo import GRPO, GRPOConfig
    from lmlab.train.rollout import RolloutConfig, Rollouts

    rollout = RolloutConfig(prompts=PROMPTS, group_size=GROUP, max_new_tokens=NEW_TOKENS, temperature=1.0,
                            forward_batch=PROMPTS * GROUP)
    objective = GRPO(model, GRPOConfig(beta=0.0, aggregation="token_mean"), group_size=GROUP,
                     max_new_tokens=NEW_TOKENS)
    source = Rollouts(model, tok, prompts, GoldText(), rollout, objective, template="none")
    cfg = TrainConfig(steps=iterations, batch_size=PROMPTS * GROUP, lr=1e-6, precision="float32", progress=False,
                      schedule="constant", log_every=1, weight_decay=0.0)
    # The loop is a function call that runs to its end: a step-wise driver keeps the same
    # optimizer and source across calls, as the loop does internally.
    from lmlab.train.loop import build_optimizer, to_device

    optimizer = build_optimizer([model], cfg)
    model.train()

    def one() -> tuple[float, float]:
        g0 = source.generate_seconds
        t0 = time.perf_counter()
        batch = to_device(source.next_batch(cfg.batch_size), torch.device("cpu"))
        loss, _ = objective(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, source.generate_seconds - g0

    return one


def trl_times(model, tok, prompts, tmp: Path, steps: int) -> list[float]:
    """Seconds of each GRPOTrainer step (generation of 64 completions + one update), from
    the trainer's own step callbacks, so its set-up is not counted."""
    import datasets
    import transformers
    from trl import GRPOConfig as TRLConfig, GRPOTrainer

    transformers.logging.set_verbosity_error()
    logging.getLogger("trl").setLevel(logging.ERROR)
    args = TRLConfig(output_dir=str(tmp / "trl"), per_device_train_batch_size=PROMPTS * GROUP,
                     num_generations=GROUP, max_completion_length=NEW_TOKENS, temperature=1.0, top_p=1.0,
                     top_k=0, beta=0.0, loss_type="dapo", num_iterations=1, learning_rate=1e-6,
                     max_steps=steps, use_cpu=True, bf16=False, report_to="none", save_strategy="no",
                     logging_steps=10_000, disable_tqdm=True, seed=0, lr_scheduler_type="constant",
                     dataloader_num_workers=0)
    data = datasets.Dataset.from_dict({"prompt": list(prompts)})
    times: list[float] = []

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)

    trainer = GRPOTrainer(model=model, reward_funcs=[lambda prompts, completions, **kw: gold(prompts, completions)],
                          args=args, train_dataset=data, processing_class=tok, callbacks=[Timer()])
    trainer.train()
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="1 timed iteration each (after the warm-up)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n = 1 if args.quick else args.iterations
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        hf, hf_tok, ours, ours_tok, prompts = build(tmp)
        params = sum(p.numel() for p in ours.parameters())
        ours_step = ours_iteration_fn(ours, ours_tok, prompts, tmp, n + 1)
        ours_step()  # warm-up
        ours_t, gen_t = [], []
        for _ in range(n):
            t, g = ours_step()
            ours_t.append(t)
            gen_t.append(g)
        trl_t = trl_times(hf, hf_tok, prompts, tmp, n + 1)[1:]  # the first step is the warm-up
    o, t = statistics.median(ours_t), statistics.median(trl_t)
    result = {"cpu": cpu_model(), "threads": torch.get_num_threads(), "params": params, "prompts": PROMPTS,
              "group_size": GROUP, "new_tokens": NEW_TOKENS, "iterations": n,
              "ours_s": o, "trl_s": t, "speedup": t / o, "ours_generate_share": statistics.median(
                  g / s for g, s in zip(gen_t, ours_t)),
              "ours_all_s": ours_t, "trl_all_s": trl_t}
    print(f"CPU: {result['cpu']} ({result['threads']} torch threads); model {params / 1e6:.2f}M parameters")
    print(f"GRPO iteration ({PROMPTS} prompts x {GROUP}, {NEW_TOKENS} new tokens), median of {n}:")
    print(f"  lmlab {o:.2f} s ({100 * result['ours_generate_share']:.0f}% generating)   TRL GRPOTrainer {t:.2f} s"
          f"   -> {t / o:.1f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
