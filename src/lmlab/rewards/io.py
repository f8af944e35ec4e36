"""Reward-model checkpoints: the model-checkpoint layout with `"kind": "reward"`.

    config.json        {"format": "lmlab", "kind": "reward", "version", "model": {...},
                        "reward": {"template": ...}, "tokens": {...}, ...}   (written last)
    model.safetensors  RewardModel state dict: transformer.* (no lm_head) and score.weight
    tokenizer.json     optional
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lmlab.checkpoint import (
    CONFIG_FILE, FORMAT, TOKENIZER_FILE, WEIGHTS_FILE, load_state_dict, read_config_json, save_state_dict,
)
from lmlab.config import ModelConfig
from lmlab.errors import LmlabError
from lmlab.io import atomic_path, write_json_atomic
from lmlab.model.heads import RewardModel

KIND = RewardModel.kind
TOKEN_KEYS = (("bos_token_id", "bos_id"), ("eos_token_id", "eos_id"), ("pad_token_id", "pad_id"))


def token_ids(tokenizer: Any) -> dict[str, int | None]:
    """The tokenizer's special ids under Hugging Face's config.json names."""
    return {hf: getattr(tokenizer, ours, None) for hf, ours in TOKEN_KEYS}


def save_reward_model(model: RewardModel, out_dir: str | Path, tokenizer: Any = None,
                      extra: dict[str, Any] | None = None) -> Path:
    """Write `model` (and its tokenizer, anything with `.save(path)`) to `out_dir`; the
    config goes last, so a directory with a reward config.json is complete."""
    from lmlab import __version__

    if getattr(model, "kind", None) != KIND:
        raise LmlabError(f"save_reward_model needs a RewardModel, got {type(model).__name__}; "
                         "use lmlab.checkpoint.save_model for language models")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # An older config.json must not vouch for the new weights while they are written.
    (out_dir / CONFIG_FILE).unlink(missing_ok=True)
    save_state_dict(model.state_dict(), out_dir / WEIGHTS_FILE)
    meta: dict[str, Any] = {"format": FORMAT, "kind": KIND, "version": __version__,
                            "model": model.config.to_dict()}
    if tokenizer is not None:
        with atomic_path(out_dir / TOKENIZER_FILE) as tmp:
            tokenizer.save(str(tmp))
        meta["tokens"] = token_ids(tokenizer)
    meta.update(extra or {})
    write_json_atomic(out_dir / CONFIG_FILE, meta)
    return out_dir


def read_reward_meta(path: str | Path) -> dict[str, Any]:
    """config.json of a reward checkpoint; anything else is refused with what it is."""
    path = Path(path)
    if not path.is_dir():
        raise LmlabError(f"reward model directory not found: {path}")
    meta = read_config_json(path)
    if meta.get("format") != FORMAT:
        raise LmlabError(f"{path} is not an lmlab checkpoint; convert a Hugging Face sequence-classification "
                         "model with lmlab.interop.hf_reward.convert_reward_from_hf first")
    if meta.get("kind") != KIND:
        what = meta.get("kind") or "language model"
        raise LmlabError(f"{path} is a {what} checkpoint, not a reward model; train one with "
                         "`lmlab reward train` (it writes RUN/model)")
    return meta


def reward_model_from_state_dict(cfg: ModelConfig, state: dict[str, torch.Tensor], source: str = "checkpoint",
                                 device: torch.device | str = "cpu",
                                 dtype: torch.dtype | None = None) -> RewardModel:
    """Build a RewardModel around `state` without allocating random weights first."""
    with torch.device("meta"):
        model = RewardModel(cfg)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise LmlabError(f"{source} does not hold a reward model of its config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}; the config and weights come from different models")
    for name, param in expected.items():
        if tuple(param.shape) != tuple(state[name].shape):
            raise LmlabError(f"{source}: {name} has shape {tuple(state[name].shape)} but the config implies "
                             f"{tuple(param.shape)}; the config and weights come from different models")
    model.load_state_dict(state, assign=True)
    model.transformer.reset_rope()
    model = model.to(device)
    return model if dtype is None else model.to(dtype)


def load_reward_model(path: str | Path, device: torch.device | str = "cpu",
                      dtype: torch.dtype | None = None) -> RewardModel:
    """Load a reward checkpoint directory (or a Hugging Face sequence-classification one)."""
    path = Path(path)
    if not path.is_dir():
        raise LmlabError(f"reward model directory not found: {path}")
    meta = read_config_json(path)
    if meta.get("format") != FORMAT:
        from lmlab.interop.hf_reward import load_hf_reward_model

        return load_hf_reward_model(path, device=device, dtype=dtype)
    meta = read_reward_meta(path)
    cfg = ModelConfig.from_dict(meta["model"])
    return reward_model_from_state_dict(cfg, load_state_dict(path / WEIGHTS_FILE), str(path), device, dtype)
