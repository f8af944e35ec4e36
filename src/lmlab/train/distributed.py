"""Training on many processes (torchrun) with PyTorch's own engine: DDP or FSDP2.

    torchrun --nproc-per-node 8 -m lmlab train recipe.yaml     # the same command, 8 ranks

`setup(cfg)` reads the env:// variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/PORT). With one process it returns `Local`, whose methods leave everything as
it was; with several it starts the process group (NCCL on CUDA, gloo on CPU) and returns
`Distributed`, through which the loop

- wraps the trained modules (`wrap`): DDP replicates them; FSDP2 (`fully_shard`) shards
  every transformer block, then one root unit around everything the objective trains, with
  a mixed-precision policy from the run's one precision setting. The objective runs inside
  that root's forward, so it may call any method of the model (`hidden_states`, `logits`),
  not only `forward`. Frozen modules are replicated, or sharded in the same root;
- shards the data (`shard`): each rank takes its slice of every global micro-batch, so the
  ranks together see exactly what one process sees (batch sizes stay global);
- weighs each rank's loss by the global loss units and reduces metrics (`total_weight`,
  `reduce`), so a step equals one process's step on the concatenated batch;
- saves and loads checkpoints collectively (`save_checkpoint`, `load_checkpoint`).

Checkpoint of a distributed run (see `lmlab.train.state` for the single-process one):

    step-N/dcp/shard-*.safetensors   torch.distributed.checkpoint: every rank writes its shards
                                     of the trained modules and AdamW moments, with their
                                     offsets in the safetensors header (no pickle), so any
                                     world size reads the slices it needs
    step-N/config.json, model.safetensors, <name>.safetensors, tokenizer.json
                                     written by rank 0 from the gathered full weights: every
                                     lmlab command opens the directory like any model
    step-N/objective.safetensors, rng.safetensors (rank 0), rng-R.safetensors (rank R > 0)
    step-N/trainer.json              as single-process, plus the optimizer's param groups
                                     keyed by parameter name and the world size it ran on

Either format resumes on any world size, one process included (`Local.load_checkpoint`).
"""
from __future__ import annotations

import atexit
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from lmlab.checkpoint import load_state_dict, save_model, save_state_dict
from lmlab.errors import LmlabError
from lmlab.io import fsync_dir, write_json_atomic, write_text_atomic
from lmlab.precision import resolve
from lmlab.train import state as single
from lmlab.train.config import TrainConfig

DCP_DIR = "dcp"
ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
MODULES_KEY, OPTIMIZER_KEY = "modules", "optimizer"


def env_world() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) from torchrun's env:// variables; None when this
    process was not started by torchrun (or by it with a single process)."""
    if not all(v in os.environ for v in ENV_VARS):
        return None
    rank, world, local = (int(os.environ[v]) for v in ENV_VARS)
    return (rank, world, local) if world > 1 else None


def setup(cfg: TrainConfig) -> "Local | Distributed":
    world = env_world()
    if world is None:
        return Local(cfg)
    return Distributed(cfg, *world)


def is_main_process() -> bool:
    """Whether this process should write files after training (exports, samples, reports):
    rank 0 under torchrun, always in a single process."""
    world = env_world()
    return world is None or world[0] == 0


def silent(message: str) -> None:
    """The `log` of ranks other than 0."""


def is_dcp_checkpoint(path: Path) -> bool:
    return (Path(path) / DCP_DIR).is_dir()


# ---- one process: the loop as it always was ------------------------------------------
class Local:
    rank, world_size, is_main, active = 0, 1, True, False

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.device = torch.device(cfg.device)

    def wrap(self, objective: Any, trained: dict[str, nn.Module], frozen: dict[str, nn.Module]) -> Any:
        return objective

    def shard(self, source: Any) -> Any:
        return source

    def total_weight(self, weight: float) -> float:
        return weight

    def reduce(self, loss: float, metrics: dict[str, float], tokens: int) -> tuple[float, dict[str, float], int]:
        return loss, metrics, tokens

    def agree(self, signal: str | None) -> str | None:
        return signal

    def save_checkpoint(self, *args, **kwargs) -> Path:
        return single.save_checkpoint(*args, **kwargs)

    def load_checkpoint(self, path: Path, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer,
                        objective: Any = None) -> dict[str, Any]:
        """A single-process checkpoint as always; a distributed run's (any world size) from
        its DCP shards."""
        if is_dcp_checkpoint(path):
            return load_dcp(path, modules, optimizer, objective, rank=0)
        return single.load_checkpoint(path, modules, optimizer, objective)


# ---- many processes -------------------------------------------------------------------
class Distributed:
    active = True

    def __init__(self, cfg: TrainConfig, rank: int, world_size: int, local_rank: int) -> None:
        import torch.distributed as dist

        self.cfg, self.rank, self.world_size, self.local_rank = cfg, rank, world_size, local_rank
        self.is_main = rank == 0
        self.kind = "ddp" if cfg.distributed == "auto" else cfg.distributed
        frozen = cfg.distributed_frozen
        self.shard_frozen = frozen == "shard" or (frozen == "auto" and self.kind == "fsdp")
        if self.shard_frozen and self.kind != "fsdp":
            raise LmlabError("train.distributed_frozen=shard needs train.distributed=fsdp; "
                             "with ddp set train.distributed_frozen=replicate")
        if cfg.micro % world_size:
            raise LmlabError(f"train.micro_batch_size={cfg.micro} cannot be split over {world_size} ranks: "
                             f"make it a multiple of {world_size} (batch sizes are global; each rank "
                             "takes micro_batch_size / world_size sequences per forward)")
        device = torch.device(cfg.device)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise LmlabError("train.device=cuda but this process sees no CUDA device; "
                                 "check CUDA_VISIBLE_DEVICES or set train.device=cpu")
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        self.device = device
        self.backend = "nccl" if device.type == "cuda" else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(self.backend, device_id=device if device.type == "cuda" else None)
            atexit.register(_destroy)
        elif dist.get_world_size() != world_size:
            raise LmlabError(f"a process group of {dist.get_world_size()} ranks already exists, "
                             f"but WORLD_SIZE is {world_size}")
        self.precision = resolve(cfg.precision, device)
        self.step_module: nn.Module | None = None
        self.runner: Callable[..., Any] | None = None

    # -- modules
    def wrap(self, objective: Any, trained: dict[str, nn.Module], frozen: dict[str, nn.Module]) -> Any:
        """The objective, now running its forward through DDP or the FSDP2 root. Trained
        modules are changed in place (FSDP2 registers sharded parameters on them), so the
        loop builds its optimizer after this."""
        overlap = set(trained) & set(frozen)
        if overlap:
            raise LmlabError(f"the objective names {sorted(overlap)} both trained and frozen")
        sharded_frozen = frozen if self.shard_frozen else {}
        step = ObjectiveStep(objective, {**trained, **sharded_frozen})
        _broadcast_from_rank0(step)
        if self.kind == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.runner = DDP(step, device_ids=ids)
        else:
            from torch.distributed.fsdp import fully_shard

            policy = mixed_precision_policy(self.precision.name)
            for module in step.children():
                for block in transformer_blocks(module):
                    fully_shard(block, mp_policy=policy)
            # The root: embeddings, final norm, heads and anything else outside the blocks.
            fully_shard(step, mp_policy=policy)
            self.runner = step
        self.step_module = step
        return DistributedObjective(objective, self)

    def run(self, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        loss, metrics = self.runner(batch)
        if torch.is_grad_enabled():
            # Every rank must take the same branch (backward or skip): one rank's NaN is all's.
            ok = torch.tensor([float(torch.isfinite(loss.detach()).all())], device=self.device)
            self._all_reduce(ok, "min")
            if ok.item() < 1:
                loss = torch.full_like(loss, float("nan"))
        return loss, metrics

    def generate(self, fn: Callable[[], Any]) -> Any:
        """Call `fn` (a generating source's `next_batch`) with the whole model usable: under
        FSDP2 inside the root's forward, so every unit gathers its weights as it runs."""
        if self.kind == "fsdp" and self.step_module is not None:
            with torch.no_grad():
                return self.step_module(_Call(fn))
        return fn()

    # -- data
    def shard(self, source: Any) -> Any:
        if hasattr(source, "shard"):
            shard = source.shard(self.rank, self.world_size)
        else:
            shard = SlicedSource(source, self.rank, self.world_size)
        return GeneratingSource(shard, self) if getattr(source, "generates", False) else shard

    # -- metrics
    def total_weight(self, weight: float) -> float:
        """The step's loss units over all ranks, divided by the world size: DDP and FSDP2
        average gradients over ranks, so each rank weighs its loss by w / (total / R)."""
        t = torch.tensor([float(weight)], dtype=torch.float64, device=self.device)
        self._all_reduce(t, "sum")
        return t.item() / self.world_size

    def reduce(self, loss: float, metrics: dict[str, float], tokens: int) -> tuple[float, dict[str, float], int]:
        """Step loss and metrics (each rank's share, weighted as `total_weight` says) summed
        into the global means; token counts summed."""
        keys = sorted(metrics)
        t = torch.tensor([loss, *(metrics[k] for k in keys), float(tokens)], dtype=torch.float64,
                         device=self.device)
        self._all_reduce(t, "sum")
        values = t.tolist()
        r = self.world_size
        return values[0] / r, {k: v / r for k, v in zip(keys, values[1:-1])}, int(round(values[-1]))

    def agree(self, signal: str | None) -> str | None:
        """A stop signal seen by any rank stops all of them after the same step."""
        t = torch.tensor([1.0 if signal else 0.0], device=self.device)
        self._all_reduce(t, "max")
        return signal or ("a signal on another rank" if t.item() > 0 else None)

    def _all_reduce(self, t: torch.Tensor, op: str) -> None:
        import torch.distributed as dist

        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
                               "min": dist.ReduceOp.MIN}[op])

    def barrier(self) -> None:
        import torch.distributed as dist

        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    # -- checkpoints
    def save_checkpoint(self, run_dir: str | Path, step: int, modules: dict[str, nn.Module],
                        optimizer: torch.optim.Optimizer, trainer: dict[str, Any], tokenizer: Any = None,
                        keep: int = 0, objective_state: dict[str, torch.Tensor] | None = None) -> Path:
        """Every rank writes its shards; rank 0 writes the consolidated model and the JSON.
        Written into a hidden temporary directory renamed into place when complete, as the
        single-process checkpoint is."""
        root = Path(run_dir) / "checkpoints"
        final = root / f"step-{step}"
        tmp = root / f"{single.TMP_PREFIX}{step}-ranks"
        if self.is_main:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / DCP_DIR).mkdir(parents=True)
        self.barrier()
        try:
            groups = save_dcp(tmp / DCP_DIR, modules, optimizer)
            full = gathered_state_dict(modules)  # collective; only rank 0 receives tensors
            objective_state = {k: _full(v) for k, v in (objective_state or {}).items()}
            rng = "rng.safetensors" if self.is_main else f"rng-{self.rank}.safetensors"
            save_state_dict(single.rng_tensors(), tmp / rng)
            self.barrier()
            if self.is_main:
                for name, module in modules.items():
                    part = {k[len(name) + 1:]: v for k, v in full.items() if k.startswith(name + ".")}
                    if name == "model":
                        save_model(StateView(module, part), tmp, tokenizer=tokenizer)
                    else:
                        save_state_dict(part, tmp / f"{name}.safetensors")
                if objective_state:
                    save_state_dict(objective_state, tmp / single.OBJECTIVE_FILE)
                write_json_atomic(tmp / single.TRAINER_FILE, {
                    **trainer, "step": step, "param_groups": groups,
                    "distributed": {"world_size": self.world_size, "kind": self.kind, "format": "dcp"}})
                if final.exists():
                    shutil.rmtree(final)
                os.rename(tmp, final)
                fsync_dir(root)
                write_text_atomic(root / "latest", final.name + "\n")
                if keep > 0:
                    single._prune(root, keep)
        finally:
            self.barrier()  # no rank reads `latest` before rank 0 has written it
            if self.is_main and tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return final

    def load_checkpoint(self, path: Path, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer,
                        objective: Any = None) -> dict[str, Any]:
        if is_dcp_checkpoint(path):
            return load_dcp(path, modules, optimizer, objective, rank=self.rank)
        return load_single_into_sharded(path, modules, optimizer, objective)


def _destroy() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _broadcast_from_rank0(module: nn.Module) -> None:
    """Every rank starts from rank 0's weights, whatever seeds the callers used."""
    import torch.distributed as dist

    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=0)


def mixed_precision_policy(precision: str):
    """FSDP2's policy for a resolved precision: compute in bf16/fp16, keep float32 master
    weights in the optimizer and reduce gradients in float32; float32 casts nothing."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def transformer_blocks(module: nn.Module) -> list[nn.Module]:
    """The FSDP2 units inside `module`: lmlab's transformer blocks (outermost only)."""
    from lmlab.model.transformer import Block

    return [m for m in module.modules() if isinstance(m, Block)]


class _Call:
    """A root-forward input meaning "run this function" (see `Distributed.generate`)."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn


class ObjectiveStep(nn.Module):
    """The trained (and sharded frozen) modules under one root whose forward is the
    objective: what DDP wraps and FSDP2 shards. Children keep their names ("model", and
    the objective's own), so parameter names match the single-process checkpoint's."""

    def __init__(self, objective: Any, modules: dict[str, nn.Module]) -> None:
        super().__init__()
        for name, module in modules.items():
            self.add_module(name, module)
        object.__setattr__(self, "objective", objective)  # not a submodule

    def forward(self, batch: Any) -> Any:
        if isinstance(batch, _Call):
            return batch.fn()
        return self.objective(self.model, batch)


class DistributedObjective:
    """The objective as the loop sees it under torchrun: calls go through DDP/FSDP2; every
    other attribute (weight, tokens, state_dict, after_step, ...) is the objective's own."""

    def __init__(self, objective: Any, dist: Distributed) -> None:
        self.objective, self.dist = objective, dist

    def __call__(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        return self.dist.run(batch)

    def __getattr__(self, name: str) -> Any:
        if name in ("objective", "dist"):
            raise AttributeError(name)
        return getattr(self.objective, name)


class SlicedSource:
    """Any batch source, sharded: every rank draws the same global batch and keeps its
    contiguous slice of the leading dimension. Exact for deterministic sources; a source
    that can draw only its own share should define `shard(rank, world_size)` instead."""

    def __init__(self, source: Any, rank: int, world_size: int) -> None:
        self.source, self.rank, self.world_size = source, rank, world_size

    def next_batch(self, n: int) -> Any:
        batch = self.source.next_batch(n)
        share = n // self.world_size
        lo, hi = self.rank * share, (self.rank + 1) * share

        def cut(v: Any) -> Any:
            if (torch.is_tensor(v) and v.dim() > 0 or isinstance(v, list)) and len(v) == n:
                return v[lo:hi]
            return v

        return {k: cut(v) for k, v in batch.items()} if isinstance(batch, dict) else cut(batch)

    def state_dict(self) -> dict[str, Any]:
        return self.source.state_dict() if hasattr(self.source, "state_dict") else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if hasattr(self.source, "load_state_dict"):
            self.source.load_state_dict(state)


class GeneratingSource:
    """A source that samples with the model (rollouts, `generates = True`): every rank
    generates its own share, with the whole model usable (`Distributed.generate`)."""

    generates = True

    def __init__(self, source: Any, dist: Distributed) -> None:
        self.source, self.dist = source, dist

    def next_batch(self, n: int) -> Any:
        return self.dist.generate(lambda: self.source.next_batch(n))

    def state_dict(self) -> dict[str, Any]:
        return self.source.state_dict() if hasattr(self.source, "state_dict") else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if hasattr(self.source, "load_state_dict"):
            self.source.load_state_dict(state)


class StateView:
    """What `lmlab.checkpoint.save_model` reads from a model (its state dict, config, kind,
    adapter config), with the gathered full state dict in place of the sharded one."""

    def __init__(self, module: nn.Module, state: dict[str, torch.Tensor]) -> None:
        self.module, self.state = module, state
        self.config = module.config

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.state

    def __getattr__(self, name: str) -> Any:
        if name in ("module", "state", "config"):
            raise AttributeError(name)
        return getattr(self.module, name)


# ---- state dicts ----------------------------------------------------------------------
def _container(modules: dict[str, nn.Module]) -> nn.ModuleDict:
    # Parameter names "model.layers.0...", "<name>...": one namespace for every module.
    return nn.ModuleDict(modules)


def gathered_state_dict(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The full (unsharded) weights on CPU, on rank 0 only (others get {}); a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    import torch.distributed as dist

    if not dist.is_initialized():
        return {k: v.detach().cpu() for k, v in _container(modules).state_dict().items()}
    return get_model_state_dict(_container(modules),
                                options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _flat_state(modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer):
    """(flat tensor dict for DCP, optimizer param groups as JSON, model sd, optimizer sd):
    tensors only, so DCP writes safetensors and nothing is pickled."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    container = _container(modules)
    msd = get_model_state_dict(container)
    osd = get_optimizer_state_dict(container, optimizer)  # initialises empty AdamW state
    flat = {f"{MODULES_KEY}.{k}": v for k, v in msd.items()}
    for fqn, slots in osd["state"].items():
        for slot, value in slots.items():
            if not torch.is_tensor(value):
                value = torch.tensor(value)
            flat[f"{OPTIMIZER_KEY}.{fqn}.{slot}"] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in osd["param_groups"]]
    return flat, groups, msd, osd


def save_dcp(path: Path, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer) -> list[dict]:
    """Write the trained modules and optimizer state as DCP shards into `path` (every rank);
    return the optimizer's param groups (parameter names, hyperparameters) for the JSON."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    flat, groups, _, _ = _flat_state(modules, optimizer)
    dcp.save(flat, storage_writer=HuggingFaceStorageWriter(str(path), save_distributed=True))
    return groups


def load_dcp(path: Path, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer,
             objective: Any = None, rank: int = 0) -> dict[str, Any]:
    """Read a distributed checkpoint saved on any number of ranks into this run's modules
    and optimizer, however they are placed now (one process, DDP, FSDP2 on M ranks): each
    rank reads the slices its shards cover."""
    import torch.distributed
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    trainer = single.read_trainer(path)
    flat, _, msd, osd = _flat_state(modules, optimizer)
    try:
        with warnings.catch_warnings():  # one process reading N ranks' shards is intended
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(flat, storage_reader=HuggingFaceStorageReader(str(path / DCP_DIR)),
                     no_dist=not torch.distributed.is_initialized())
    except (RuntimeError, ValueError, KeyError, AssertionError) as e:
        raise LmlabError(f"checkpoint {path} holds a different model or optimizer than this run builds ({e}); "
                         "resume with the recipe the run was started with") from None
    container = _container(modules)
    model_state = {k: flat[f"{MODULES_KEY}.{k}"] for k in msd}
    optim_state = {fqn: {slot: flat[f"{OPTIMIZER_KEY}.{fqn}.{slot}"] for slot in slots}
                   for fqn, slots in osd["state"].items()}
    set_model_state_dict(container, model_state)
    set_optimizer_state_dict(container, optimizer, {"state": optim_state, "param_groups": trainer["param_groups"]})
    _load_objective_and_rng(path, objective, rank)
    return trainer


def load_single_into_sharded(path: Path, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer,
                             objective: Any = None) -> dict[str, Any]:
    """A single-process checkpoint (full safetensors, index-keyed optimizer) into modules
    that are now replicated or sharded: every rank reads the full files and keeps its part."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, set_model_state_dict, set_optimizer_state_dict,
    )

    import torch.distributed as dist

    trainer = single.read_trainer(path)
    container = _container(modules)
    full = {}
    for name in modules:
        file = path / ("model.safetensors" if name == "model" else f"{name}.safetensors")
        full.update({f"{name}.{k}": v for k, v in load_state_dict(file).items()})
    expected = {k for k in container.state_dict()}
    if set(full) != expected:
        raise LmlabError(f"checkpoint {path} holds a different model than the recipe builds; "
                         "resume with the recipe the run was started with")
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(container, full, options=options)
    # The single-process optimizer numbers parameters in param-group order; map to names.
    names = {id(p): n for n, p in container.named_parameters(remove_duplicate=False)}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    tensors = load_state_dict(path / "optimizer.safetensors")
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, slot = key.split(".", 1)
        state.setdefault(order[int(index)], {})[slot] = value.to(_device_of(optimizer))
    groups = [{**g, "params": [order[i] for i in g["params"]]} for g in trainer["param_groups"]]
    set_optimizer_state_dict(container, optimizer, {"state": state, "param_groups": groups}, options=options)
    _load_objective_and_rng(path, objective, dist.get_rank())
    return trainer


def _device_of(optimizer: torch.optim.Optimizer) -> torch.device:
    p = optimizer.param_groups[0]["params"][0]
    return p.device


def _load_objective_and_rng(path: Path, objective: Any, rank: int) -> None:
    if objective is not None and hasattr(objective, "load_state_dict"):
        file = path / single.OBJECTIVE_FILE
        objective.load_state_dict(load_state_dict(file) if file.is_file() else {})
    own = path / f"rng-{rank}.safetensors"
    single.restore_rng(load_state_dict(own if rank > 0 and own.is_file() else path / "rng.safetensors"))
