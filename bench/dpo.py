"""DPO optimizer step time: lmlab's DPO objective vs TRL's DPOTrainer, same Llama, same batch.

Three contestants on one ~8.5M-parameter Llama (d_model 256, 4 layers, vocab 8192), one
batch of 8 pairs x 128 tokens (64 prompt + 64 answer tokens per side), float32 everywhere:
- ours: `lmlab.train.objectives.dpo.DPO` with a frozen reference copy and the per-example
  reference cache, AdamW (fused/foreach) and grad clipping as in the one loop;
- trl-default: `trl.DPOTrainer` with its default settings (reference model forward every
  step; TRL's own defaults such as gradient checkpointing kept) except float32 (bf16=False);
- trl-precompute: the same with `precompute_ref_log_probs=True`, its fastest setting.
Rounds are interleaved (ours, trl-default, trl-precompute, repeated), so load from other
processes hits all three alike; the figure is the median seconds per optimizer step.
Peak memory: each contestant alone in a child process (its peak RSS minus its RSS after
the imports, before its model was built).

    PYTHONPATH=src python bench/dpo.py [--quick] [--rounds 5 --steps 3] [--profile]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from lmlab.config import ModelConfig
from lmlab.data.preference import PreferenceCollator, PreferenceExample
from lmlab.model.transformer import build_model, count_parameters

CFG = ModelConfig(name="bench", vocab_size=8192, d_model=256, n_layers=4, n_heads=4, n_kv_heads=4,
                  ffn_hidden=1024, max_seq_len=256)
PAIRS, PROMPT, ANSWER = 8, 64, 64
BETA = 0.1


def cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def data():
    """Token ids (>= 4: 0-3 are specials) of PAIRS prompts with a chosen and a rejected answer."""
    g = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(4, CFG.vocab_size, (n,), generator=g).tolist()

    return [(ids(PROMPT), ids(ANSWER - 1) + [1], ids(ANSWER - 1) + [1]) for _ in range(PAIRS)]


# ---------------------------------------------------------------- ours

class Ours:
    def __init__(self, pairs) -> None:
        from lmlab.train.config import TrainConfig
        from lmlab.train.loop import build_optimizer
        from lmlab.train.objectives.dpo import DPO, frozen_copy

        torch.manual_seed(0)
        self.model = build_model(CFG).train()
        self.objective = DPO(beta=BETA, reference=frozen_copy(self.model))
        examples = [PreferenceExample(tuple(p + c), tuple(p + r), len(p), len(p), 0.0, "bench", i)
                    for i, (p, c, r) in enumerate(pairs)]
        self.batch = PreferenceCollator(pad_id=0)(examples)
        self.optimizer = build_optimizer(self.model, TrainConfig(lr=1e-6, weight_decay=0.0))
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]

    def step(self) -> None:
        loss, _ = self.objective(self.model, self.batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def run(self, steps: int) -> list[float]:
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            self.step()
            times.append(time.perf_counter() - t0)
        return times


# ---------------------------------------------------------------- TRL

def hf_tokenizer():
    """A word-level tokenizer whose token "t<k>" is id k: TRL tokenizes our exact ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(CFG.vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="t0", eos_token="t1", bos_token="t2")


class Trl:
    def __init__(self, pairs, precompute: bool, out: Path) -> None:
        import logging

        from datasets import Dataset
        from transformers import LlamaForCausalLM, TrainerCallback
        from transformers.utils import logging as hf_logging
        from trl import DPOConfig, DPOTrainer

        from lmlab.interop.hf import save_hf

        hf_logging.set_verbosity_error()
        logging.getLogger("datasets").setLevel(logging.ERROR)
        torch.manual_seed(0)
        save_hf(build_model(CFG), out / "hf")  # the same weights as ours
        model = LlamaForCausalLM.from_pretrained(out / "hf")

        def text(ids):
            return " ".join(f"t{i}" for i in ids)

        # TRL appends EOS (t1) itself: the answers are given without it.
        rows = [{"prompt": text(p), "chosen": text(c[:-1]), "rejected": text(r[:-1])} for p, c, r in pairs]
        self.times: list[float] = []
        times = self.times

        class Clock(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                self.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                times.append(time.perf_counter() - self.t0)

        self.args = DPOConfig(output_dir=str(out / "trl"), per_device_train_batch_size=PAIRS, learning_rate=1e-6,
                              beta=BETA, bf16=False, use_cpu=True, report_to=[], save_strategy="no",
                              logging_strategy="no", disable_tqdm=True, max_length=None, max_steps=1,
                              precompute_ref_log_probs=precompute, dataloader_num_workers=0)
        self.trainer = DPOTrainer(model=model, args=self.args, train_dataset=Dataset.from_list(rows),
                                  processing_class=hf_tokenizer(), callbacks=[Clock()])
        self.gradient_checkpointing = self.args.gradient_checkpointing

    def run(self, steps: int) -> list[float]:
        self.trainer.args.max_steps = steps
        start = len(self.times)
        self.trainer.train()
        return self.times[start:]


# ---------------------------------------------------------------- driver

def build(name: str, pairs, out: Path):
    if name == "ours":
        return Ours(pairs)
    return Trl(pairs, precompute=(name == "trl-precompute"), out=out / name)


NAMES = ("ours", "trl-default", "trl-precompute")


def child(name: str, steps: int, out: Path) -> None:
    """One contestant alone; prints its RSS before building, for the parent's peak minus base."""
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    runner = build(name, data(), out)
    runner.run(steps)
    print(json.dumps({"base_kb": base, "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


def peak_memory(name: str, steps: int, out: Path) -> float:
    """MiB: the child's whole-process peak RSS (imports included: a difference over the
    post-import RSS reads 0 when importing transformers/TRL peaks higher than training)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, __file__, "--child", name, "--steps", str(steps), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
    stdout, _ = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"memory child for {name} failed (status {proc.returncode})")
    rec = json.loads(stdout.strip().splitlines()[-1])
    return rec["peak_kb"] / 1024


def profile_ours(pairs, steps: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    ours = Ours(pairs)
    ours.run(2)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        ours.run(steps)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="1 round of 3 steps, memory children 1 step")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per contestant per round")
    ap.add_argument("--profile", action="store_true", help="also print a torch profile of our step")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--child", choices=NAMES, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    import tempfile

    out = Path(args.out or tempfile.mkdtemp(prefix="bench-dpo-"))
    if args.child:
        child(args.child, args.steps, out)
        return
    if args.quick:
        args.rounds, args.steps = 1, 3
    t_start = time.perf_counter()
    n = count_parameters(build_model(CFG))
    print(f"CPU: {cpu_model()} ({os.cpu_count()} cores), torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"model: Llama d_model {CFG.d_model}, {CFG.n_layers} layers, vocab {CFG.vocab_size}: {n:,} parameters; "
          f"batch {PAIRS} pairs x {PROMPT + ANSWER} tokens, float32")
    pairs = data()
    runners = {name: build(name, pairs, out) for name in NAMES}
    print(f"TRL defaults kept: gradient_checkpointing={runners['trl-default'].gradient_checkpointing}")
    for r in runners.values():  # warm-up (and TRL's precompute pass, done at its first train())
        r.run(1)
    times = {name: [] for name in NAMES}
    for _ in range(args.rounds):
        for name, r in runners.items():
            times[name] += r.run(args.steps)[1:] if name != "ours" else r.run(args.steps)
    med = {name: statistics.median(t) for name, t in times.items()}
    mem_steps = 1 if args.quick else 2
    memory = {} if args.no_memory else {name: peak_memory(name, mem_steps, out / "mem") for name in NAMES}
    print("\n| contestant | s / step (median) | steps timed | peak RSS MiB (process) |")
    print("|---|---:|---:|---:|")
    for name in NAMES:
        mem = f"{memory[name]:.0f}" if name in memory else "-"
        print(f"| {name} | {med[name]:.3f} | {len(times[name])} | {mem} |")
    print(f"\nspeed-up: {med['trl-default'] / med['ours']:.2f}x vs TRL default, "
          f"{med['trl-precompute'] / med['ours']:.2f}x vs TRL precompute_ref_log_probs")
    if args.profile:
        profile_ours(pairs, 3)
    print(f"({time.perf_counter() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
