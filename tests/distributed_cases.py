"""Training cases run both in one process (the oracle) and under torchrun with 2 gloo ranks
(tests/test_distributed.py launches `python -m torch.distributed.run --nproc-per-node 2
tests/distributed_cases.py OUT`). Everything both sides build lives here, so they train
the same models on the same data."""
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from lmlab.config import get_preset
from lmlab.data import IGNORE_INDEX
from lmlab.model.transformer import build_model
from lmlab.train.config import TrainConfig
from lmlab.train.data import ShuffledBatches
from lmlab.train.logprobs import masked_logprobs
from lmlab.train.losses import dpo_loss
from lmlab.train.loop import train
from lmlab.train.objectives.lm import LanguageModeling

CFG = get_preset("nano").replace(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                 ffn_hidden=64, max_seq_len=32)
SEQ = 12


def fresh(seed=0):
    torch.manual_seed(seed)
    return build_model(CFG)


def collate(items):
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def sft_rows(n=16, seed=1):
    """Rows with different numbers of counted targets, so micro-batches (and ranks) carry
    different weights: a step is exact only if every rank weighs by the global count."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, CFG.vocab_size, (n, SEQ + 1), generator=g)
    rows = []
    for i in range(n):
        targets = x[i, 1:].clone()
        targets[: (i * 5) % SEQ] = IGNORE_INDEX
        rows.append({"input_ids": x[i, :-1], "targets": targets})
    return rows


def pair_rows(n=8, seed=2):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        c = torch.randint(0, CFG.vocab_size, (SEQ + 1,), generator=g)
        r = torch.randint(0, CFG.vocab_size, (SEQ + 1,), generator=g)
        ct, rt = c[1:].clone(), r[1:].clone()
        ct[:4], rt[:4] = IGNORE_INDEX, IGNORE_INDEX  # a shared 4-token "prompt"
        rt[: 4 + i % 3] = IGNORE_INDEX
        rows.append({"chosen_ids": c[:-1], "chosen_targets": ct, "rejected_ids": r[:-1], "rejected_targets": rt})
    return rows


class PairwiseWithReference:
    """A DPO step (sigmoid loss) written from the shared primitives: policy and frozen
    reference log-probs of chosen and rejected, two forwards per micro-batch. A stand-in
    until the DPO objective lands on main; it has the same structure (a frozen module)."""

    def __init__(self, reference, beta=0.5):
        self.reference, self.beta = reference, beta

    def frozen_modules(self):
        return {"reference": self.reference}

    def _sums(self, model, batch):
        ids = torch.cat([batch["chosen_ids"], batch["rejected_ids"]])
        targets = torch.cat([batch["chosen_targets"], batch["rejected_targets"]])
        return masked_logprobs(model, ids, targets).sums

    def __call__(self, model, batch):
        n = batch["chosen_ids"].shape[0]
        policy = self._sums(model, batch)
        with torch.no_grad():
            ref = self._sums(self.reference, batch)
        loss = dpo_loss("sigmoid", policy[:n], policy[n:], ref[:n], ref[n:], beta=self.beta).mean()
        return loss, {"loss": loss.detach(), "margin": (policy[:n] - policy[n:]).mean().detach()}

    def weight(self, batch):
        return batch["chosen_ids"].shape[0]


class GreedyRollouts:
    """A generating source: each row is a fixed prompt continued greedily by the model being
    trained (so step 2 samples with step 1's weights). Under torchrun each rank generates
    only its share (`shard`), inside the FSDP2 root's forward."""

    generates = True

    def __init__(self, model, n=8, prompt=6, new=6, seed=3, rank=0, world_size=1):
        g = torch.Generator().manual_seed(seed)
        self.prompts = torch.randint(0, CFG.vocab_size, (n, prompt), generator=g)
        self.model, self.new, self.rank, self.world_size, self.position = model, new, rank, world_size, 0

    def shard(self, rank, world_size):
        shard = GreedyRollouts(self.model, rank=rank, world_size=world_size)
        shard.prompts, shard.new, shard.position = self.prompts, self.new, self.position
        return shard

    @torch.no_grad()
    def next_batch(self, n):
        share = n // self.world_size
        rows = [(self.position + self.rank * share + i) % len(self.prompts) for i in range(share)]
        self.position += n
        idx = self.prompts[rows]
        for _ in range(self.new):
            idx = torch.cat([idx, self.model(idx)[:, -1].argmax(-1, keepdim=True)], dim=1)
        return idx

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = int(state["position"])


def rollout_run(run_dir, **kw):
    model = fresh()
    result = train(model, LanguageModeling(), GreedyRollouts(model), config(steps=2, **kw), run_dir)
    return model, result


def config(**kw):
    return TrainConfig(**{"progress": False, "log_every": 1, "lr": 3e-3, "precision": "float32",
                          "batch_size": 8, "micro_batch_size": 4, "steps": 1, **kw})


def sft_step(run_dir, **kw):
    model = fresh()
    result = train(model, LanguageModeling(), ShuffledBatches(sft_rows(), seed=0, collate=collate),
                   config(**kw), run_dir)
    return model, result


def dpo_step(run_dir, **kw):
    model = fresh()
    objective = PairwiseWithReference(fresh(seed=1))
    result = train(model, objective, ShuffledBatches(pair_rows(), seed=0, collate=collate),
                   config(**kw), run_dir)
    return model, result


def resume_run(run_dir, resume=False, **kw):
    """Three steps of two micro-batches each, a checkpoint after every step."""
    model = fresh()
    result = train(model, LanguageModeling(), ShuffledBatches(sft_rows(), seed=0, collate=collate),
                   config(steps=3, checkpoint_every=1, keep_checkpoints=0, **kw), run_dir, resume=resume)
    return model, result


def copy_step(src_run, step, dst_run):
    """A run directory holding only `src_run`'s step-N checkpoint (as if it stopped there)."""
    dst = Path(dst_run) / "checkpoints"
    dst.mkdir(parents=True)
    shutil.copytree(Path(src_run) / "checkpoints" / f"step-{step}", dst / f"step-{step}")
    (dst / "latest").write_text(f"step-{step}\n")


def main(out):
    """Under torchrun: every case on 2 ranks; rank 0 records the losses."""
    import torch.distributed as dist

    out = Path(out)
    rank = int(os.environ["RANK"])
    losses = {}
    for kind in ("ddp", "fsdp"):
        _, r = sft_step(out / f"sft-{kind}", distributed=kind)
        losses[f"sft-{kind}"] = r.losses
    _, r = dpo_step(out / "dpo-fsdp", distributed="fsdp")
    losses["dpo-fsdp"] = r.losses
    _, r = dpo_step(out / "dpo-ddp-replicated", distributed="ddp")
    losses["dpo-ddp-replicated"] = r.losses
    _, r = rollout_run(out / "rollouts-fsdp", distributed="fsdp")
    losses["rollouts-fsdp"] = r.losses
    # A 1-rank checkpoint (written by the test beforehand) resumed on 2 ranks.
    _, r = resume_run(out / "from-1", resume=True, distributed="fsdp")
    losses["from-1"] = r.losses
    # A 2-rank run with checkpoints, for the test to resume on 1 rank; and its step-1
    # checkpoint (saved by DDP) resumed here under FSDP2.
    _, r = resume_run(out / "two-ranks", distributed="ddp")
    losses["two-ranks"] = r.losses
    if rank == 0:
        copy_step(out / "two-ranks", 1, out / "ddp-to-fsdp")
    dist.barrier()
    _, r = resume_run(out / "ddp-to-fsdp", resume=True, distributed="fsdp")
    losses["ddp-to-fsdp"] = r.losses
    if rank == 0:
        (out / "losses.json").write_text(json.dumps(losses))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
