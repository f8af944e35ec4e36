"""Seconds per GRPO iteration (rollout + update): lmlab vs TRL's GRPOTrainer, in one run.

One iteration = sample 8 prompts x 8 completions of up to 32 new tokens, score them, and one
optimizer step on the 64 completions. Three contestants train the same ~8.5M-parameter
Llama-style model (one set of weights: built in transformers, saved, and opened by
lmlab.hub; each contestant has its own copy) on SortWorld prompts with the world's dense
gold reward:
- ours: `Rollouts` + `GRPO` through the one training loop (`lmlab.train.loop.train`), timed
  per step from its own metrics log (elapsed_s; generation from the rollout's gen_s);
- trl-default: `GRPOTrainer` with TRL's defaults except the precision (float32 unless
  `--precision bf16`, TRL's own default), timed from the trainer's step callbacks; its
  defaults include gradient_checkpointing=True;
- trl-no-gc: the same with gradient_checkpointing=False (faster on this small model).
The settings both sides share are TRL's defaults: beta 0 (no reference model, no KL),
num_iterations 1 (one update per rollout, so TRL computes no old log-probs and neither do
we: the ratio is exactly 1), DAPO's token-level loss (`loss_type="dapo"`, our
`aggregation="token_mean"`), group-std-scaled advantages with eps 1e-4, clip 0.2, AdamW
(0.9, 0.999), eps 1e-8, no weight decay, grad-norm clip 1, lr 1e-6 constant; sampling at
temperature 1 with no top-k/top-p. A random model almost never emits EOS, so both sides
generate the full 32 tokens. Rounds are interleaved (the order rotates each round), so load
from other processes hits all contestants alike; each round's first step per contestant is
a warm-up and is dropped (optimizer state, data loader); the median of the rest is reported.

    PYTHONPATH=src python bench/rl.py --threads 1              # 3 rounds x 3 steps
    PYTHONPATH=src python bench/rl.py --threads 1 --quick      # 1 round x 2 steps
    PYTHONPATH=src python bench/rl.py --threads 1 --profile    # + a torch profile of ours
    PYTHONPATH=src python bench/rl.py --threads 1 --precision bf16   # both sides bf16 autocast
"""
from __future__ import annotations

import argparse
import copy
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
LR = 1e-6
NAMES = ("ours", "trl-default", "trl-no-gc")


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


# ---------------------------------------------------------------- ours

class Ours:
    """`Rollouts` + `GRPO` in the one loop; each `run` is one `train()` call of `steps` steps."""

    def __init__(self, model, tok, prompts, out: Path, precision: str = "float32") -> None:
        self.model, self.tok, self.prompts, self.out, self.precision = model, tok, prompts, out, precision
        self.rounds = 0
        self.gen_share: list[float] = []
        self.phases: list[dict[str, float]] = []  # per timed step: generate, rest of the rollout, update

    def _parts(self, steps: int):
        from lmlab.train.config import TrainConfig
        from lmlab.train.objectives.grpo import GRPO, GRPOConfig
        from lmlab.train.rollout import RolloutConfig, Rollouts

        rollout = RolloutConfig(prompts=PROMPTS, group_size=GROUP, max_new_tokens=NEW_TOKENS, temperature=1.0,
                                forward_batch=PROMPTS * GROUP, seed=self.rounds)
        objective = GRPO(self.model, GRPOConfig(beta=0.0, aggregation="token_mean", clip_low=0.2, eps=1e-4),
                         group_size=GROUP, max_new_tokens=NEW_TOKENS)
        source = Rollouts(self.model, self.tok, self.prompts, GoldText(), rollout, objective, template="none")
        cfg = TrainConfig(steps=steps, batch_size=PROMPTS * GROUP, lr=LR, beta1=0.9, beta2=0.999, eps=1e-8,
                          weight_decay=0.0, grad_clip=1.0, schedule="constant", precision=self.precision,
                          progress=False, log_every=1, keep_checkpoints=1)
        return objective, source, cfg

    def run(self, steps: int) -> list[float]:
        from lmlab.train.loop import train

        objective, source, cfg = self._parts(steps)
        run_dir = self.out / f"round{self.rounds}"
        self.rounds += 1
        train(self.model, objective, source, cfg, run_dir, log=lambda s: None)
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        rows = [r for r in rows if "elapsed_s" in r]
        elapsed = [0.0] + [r["elapsed_s"] for r in rows]
        times = [b - a for a, b in zip(elapsed, elapsed[1:])]
        self.gen_share += [r["gen_s"] / t for r, t in zip(rows[1:], times[1:])]
        self.phases += [{"generate": r["gen_s"], "score": r["rollout_s"] - r["gen_s"], "update": t - r["rollout_s"]}
                        for r, t in zip(rows[1:], times[1:])]
        return times[1:]  # the first step of a train() call is a warm-up (optimizer state)


# ---------------------------------------------------------------- TRL

class Trl:
    """One `GRPOTrainer`; each `run` is one `train()` call of `steps` steps."""

    def __init__(self, model, tok, prompts, out: Path, gradient_checkpointing: bool | None,
                 bf16: bool = False) -> None:
        import datasets
        import transformers
        from trl import GRPOConfig as TRLConfig, GRPOTrainer

        transformers.logging.set_verbosity_error()
        logging.getLogger("trl").setLevel(logging.ERROR)
        extra = {} if gradient_checkpointing is None else {"gradient_checkpointing": gradient_checkpointing}
        args = TRLConfig(output_dir=str(out), per_device_train_batch_size=PROMPTS * GROUP, num_generations=GROUP,
                         max_completion_length=NEW_TOKENS, temperature=1.0, top_p=1.0, top_k=0, beta=0.0,
                         loss_type="dapo", num_iterations=1, learning_rate=LR, max_steps=1, use_cpu=True,
                         bf16=bf16, report_to="none", save_strategy="no", logging_steps=10_000,
                         disable_tqdm=True, seed=0, lr_scheduler_type="constant", dataloader_num_workers=0, **extra)
        self.gradient_checkpointing = args.gradient_checkpointing
        self.times: list[float] = []
        self.gen: list[float] = []
        times, gen = self.times, self.gen

        class Timer(transformers.TrainerCallback):
            def on_step_begin(self, *a, **k):
                self.t0 = time.perf_counter()
                gen.append(0.0)

            def on_step_end(self, *a, **k):
                times.append(time.perf_counter() - self.t0)

        data = datasets.Dataset.from_dict({"prompt": list(prompts)})
        self.trainer = GRPOTrainer(model=model, reward_funcs=[lambda prompts, completions, **kw: gold(prompts, completions)],
                                   args=args, train_dataset=data, processing_class=tok, callbacks=[Timer()])
        generate = self.trainer._generate

        def timed_generate(*a, **k):  # TRL's generation (all 64 completions), for the share
            t0 = time.perf_counter()
            try:
                return generate(*a, **k)
            finally:
                gen[-1] += time.perf_counter() - t0

        self.trainer._generate = timed_generate
        self.gen_share: list[float] = []

    def run(self, steps: int) -> list[float]:
        self.trainer.args.max_steps = steps
        start = len(self.times)
        self.trainer.train()
        times, gen = self.times[start + 1:], self.gen[start + 1:]  # the first step is a warm-up
        self.gen_share += [g / t for g, t in zip(gen, times)]
        return times


def profile_ours(ours: Ours) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        ours.run(2)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="steps per contestant per round (the first is dropped)")
    ap.add_argument("--quick", action="store_true", help="1 round of 2 steps (1 timed each)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--precision", choices=("float32", "bf16"), default="float32",
                    help="both sides: float32 (TRL bf16=False) or bf16 autocast (TRL's default bf16=True; "
                         "ours train.precision bf16)")
    ap.add_argument("--profile", action="store_true", help="also print a torch profile of our iteration")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.rounds, args.steps = 1, 2
    if args.steps < 2:
        raise SystemExit("--steps must be >= 2 (each round's first step is a warm-up)")
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        hf, hf_tok, ours_model, ours_tok, prompts = build(tmp)
        params = sum(p.numel() for p in ours_model.parameters())
        bf16 = args.precision == "bf16"
        runners = {"ours": Ours(ours_model, ours_tok, prompts, tmp / "ours", args.precision),
                   "trl-default": Trl(hf, hf_tok, prompts, tmp / "trl-default", None, bf16),
                   "trl-no-gc": Trl(copy.deepcopy(hf), hf_tok, prompts, tmp / "trl-no-gc", False, bf16)}
        times: dict[str, list[float]] = {name: [] for name in NAMES}
        for r in range(args.rounds):
            order = NAMES[r % len(NAMES):] + NAMES[:r % len(NAMES)]
            for name in order:
                times[name] += runners[name].run(args.steps)
        med = {name: statistics.median(t) for name, t in times.items()}
        share = {name: statistics.median(r.gen_share) for name, r in runners.items()}
        phases = {k: statistics.median(p[k] for p in runners["ours"].phases) for k in ("generate", "score", "update")}
        if args.profile:
            profile_ours(runners["ours"])
    result = {"cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__, "params": params,
              "precision": args.precision,
              "prompts": PROMPTS, "group_size": GROUP, "new_tokens": NEW_TOKENS, "rounds": args.rounds,
              "steps_per_round": args.steps, "median_s": med, "generate_share": share,
              "speedup_vs_trl_default": med["trl-default"] / med["ours"],
              "speedup_vs_trl_no_gc": med["trl-no-gc"] / med["ours"], "all_s": times,
              "trl_default_gradient_checkpointing": runners["trl-default"].gradient_checkpointing,
              "ours_phases_s": phases}
    print(f"CPU: {result['cpu']} ({result['threads']} torch threads), torch {torch.__version__}; "
          f"model {params / 1e6:.2f}M parameters, {args.precision}")
    print(f"GRPO iteration ({PROMPTS} prompts x {GROUP}, {NEW_TOKENS} new tokens), {args.rounds} interleaved "
          f"rounds x {args.steps - 1} timed steps:")
    print("\n| contestant | s / iteration (median) | iterations timed | share generating |")
    print("|---|---:|---:|---:|")
    for name in NAMES:
        print(f"| {name} | {med[name]:.2f} | {len(times[name])} | {100 * share[name]:.0f}% |")
    ph = result["ours_phases_s"]
    print(f"\nours, median s: generate {ph['generate']:.2f}, rest of the rollout (decode, reward, layout) "
          f"{ph['score']:.2f}, update (forward, backward, optimizer) {ph['update']:.2f}")
    print(f"speed-up: {result['speedup_vs_trl_default']:.2f}x vs TRL default (gradient checkpointing on), "
          f"{result['speedup_vs_trl_no_gc']:.2f}x vs TRL without gradient checkpointing  "
          f"({time.perf_counter() - t_start:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
