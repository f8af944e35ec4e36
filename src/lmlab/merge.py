"""Weight averaging of reward models (WARM, Ramé et al. 2024).

M reward models fine-tuned from one shared initialisation stay linearly mode connected,
so the average of their weights is itself a good reward model, one that costs what a
single model costs at inference. `warm_average` streams the average tensor by tensor
through safetensors' lazy reader: only the running sum and one member's copy of one tensor
are in memory besides the output, so averaging 10 members needs no more than one model.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import SafetensorError, safe_open

from lmlab.checkpoint import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, save_state_dict
from lmlab.errors import LmlabError
from lmlab.io import atomic_path, fsync_dir, write_json_atomic
from lmlab.rewards.io import read_reward_meta

# Parts of a reward config.json that must agree for an average to mean anything.
MUST_MATCH = ("model", "reward", "tokens")


def normalized_weights(weights: Sequence[float] | None, m: int) -> list[float]:
    """Uniform 1/M, or `weights` scaled to sum to 1 (non-negative, not all zero)."""
    if weights is None:
        return [1.0 / m] * m
    weights = [float(w) for w in weights]
    if len(weights) != m:
        raise LmlabError(f"got {len(weights)} weights for {m} members; give one weight per member")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise LmlabError(f"weights must be finite, non-negative and not all zero, got {weights}")
    total = sum(weights)
    return [w / total for w in weights]


def _first_difference(a: Any, b: Any, path: str) -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                return f"{path}.{key}"
            found = _first_difference(a[key], b[key], f"{path}.{key}")
            if found:
                return found
        return None
    return None if a == b else path


def _open(path: Path, stack: ExitStack):
    file = path / WEIGHTS_FILE
    if not file.is_file():
        raise LmlabError(f"{path} has no {WEIGHTS_FILE}; the reward checkpoint is incomplete")
    try:
        return stack.enter_context(safe_open(str(file), framework="pt"))
    except (SafetensorError, OSError) as e:
        raise LmlabError(f"{file} is not a readable safetensors file ({e})") from None


def check_members(member_dirs: Sequence[Path], handles: Sequence[Any]) -> list[dict[str, Any]]:
    """Refuse members that are not reward models, or whose configs, tensor names, shapes or
    dtypes differ from the first member's, naming the first difference. Reads headers only."""
    metas = [read_reward_meta(d) for d in member_dirs]
    ref_dir, ref_meta, ref = member_dirs[0], metas[0], handles[0]
    ref_keys = sorted(ref.keys())
    for d, meta, h in zip(member_dirs[1:], metas[1:], handles[1:]):
        for part in MUST_MATCH:
            diff = _first_difference(ref_meta.get(part), meta.get(part), part)
            if diff:
                raise LmlabError(f"{d} differs from {ref_dir} in its config ({diff}); WARM averages models of "
                                 "one architecture, tokenizer and template fine-tuned from one initialisation")
        keys = set(h.keys())
        for name in ref_keys:
            if name not in keys:
                raise LmlabError(f"{d} has no tensor {name!r}, which {ref_dir} has; the members are different models")
        extra = sorted(keys - set(ref_keys))
        if extra:
            raise LmlabError(f"{d} has tensor {extra[0]!r}, which {ref_dir} lacks; the members are different models")
        for name in ref_keys:
            a, b = ref.get_slice(name), h.get_slice(name)
            if a.get_shape() != b.get_shape() or a.get_dtype() != b.get_dtype():
                raise LmlabError(
                    f"tensor {name!r} is {b.get_dtype()} {b.get_shape()} in {d} but {a.get_dtype()} {a.get_shape()} "
                    f"in {ref_dir}; WARM needs members of the same shapes and dtypes (cast them to one dtype first)")
    if ref_dir.joinpath(TOKENIZER_FILE).is_file():
        ref_tok = ref_dir.joinpath(TOKENIZER_FILE).read_bytes()
        for d in member_dirs[1:]:
            file = d / TOKENIZER_FILE
            if not file.is_file() or file.read_bytes() != ref_tok:
                raise LmlabError(f"{d} has a different (or no) {TOKENIZER_FILE} than {ref_dir}; "
                                 "average reward models that share one tokenizer")
    return metas


def average_tensor(handles: Sequence[Any], name: str, weights: Sequence[float]) -> torch.Tensor:
    """sum_i w_i * member_i[name], accumulated in float64 (so M identical members give the
    tensor back exactly and the order of members does not matter), in the stored dtype."""
    acc = None
    dtype = None
    for h, w in zip(handles, weights):
        t = h.get_tensor(name)
        dtype = t.dtype
        if not (t.is_floating_point()):
            raise LmlabError(f"tensor {name!r} has dtype {t.dtype}; WARM averages floating-point weights only")
        term = t.to(torch.float64) * w
        del t
        acc = term if acc is None else acc.add_(term)
    return acc.to(dtype)


def warm_average(member_dirs: Sequence[str | Path], out_dir: str | Path,
                 weights: Sequence[float] | None = None) -> Path:
    """Average the weights of M >= 2 reward checkpoints into a new reward checkpoint at
    `out_dir` (uniform, or weighted by normalised `weights`). Written into a temporary
    directory and renamed into place, so `out_dir` is complete or absent."""
    from lmlab import __version__

    members = [Path(d) for d in member_dirs]
    if len(members) < 2:
        raise LmlabError(f"WARM averages at least 2 reward models, got {len(members)}; pass --members DIR DIR ...")
    w = normalized_weights(weights, len(members))
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise LmlabError(f"output {out_dir} exists and is not an empty directory; choose a new one")
    with ExitStack() as stack:
        for d in members:
            read_reward_meta(d)  # a non-reward member is refused before any file is opened
        handles = [_open(d, stack) for d in members]
        metas = check_members(members, handles)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=out_dir.parent))
        try:
            state = {name: average_tensor(handles, name, w) for name in sorted(handles[0].keys())}
            save_state_dict(state, tmp / WEIGHTS_FILE)
            del state
            if (members[0] / TOKENIZER_FILE).is_file():
                with atomic_path(tmp / TOKENIZER_FILE) as t:
                    shutil.copyfile(members[0] / TOKENIZER_FILE, t)
            meta = {k: v for k, v in metas[0].items() if k in ("format", "kind", *MUST_MATCH)}
            meta.update(version=__version__,
                        warm={"members": [str(d) for d in members], "weights": w})
            write_json_atomic(tmp / CONFIG_FILE, meta)
            if out_dir.exists():
                out_dir.rmdir()
            os.rename(tmp, out_dir)
            fsync_dir(out_dir.parent)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    return out_dir
