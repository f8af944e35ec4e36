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
    CONFIG_FILE, FORMAT, WEIGHTS_FILE, load_state_dict, model_from_state_dict, read_config_json, save_model,
)
from lmlab.config import ModelConfig
from lmlab.errors import LmlabError
from lmlab.model.heads import RewardModel

KIND = RewardModel.kind
TOKEN_KEYS = (("bos_token_id", "bos_id"), ("eos_token_id", "eos_id"), ("pad_token_id", "pad_id"))


def token_ids(tokenizer: Any) -> dict[str, int | None]:
    """The tokenizer's special ids under Hugging Face's config.json names."""
    return {hf: getattr(tokenizer, ours, None) for hf, ours in TOKEN_KEYS}


def save_reward_model(model: RewardModel, out_dir: str | Path, tokenizer: Any = None,
                      extra: dict[str, Any] | None = None) -> Path:
    """Write `model` (and its tokenizer) as a checkpoint of kind `reward`, with the
    tokenizer's special ids beside it (the HF export needs the pad id)."""
    if getattr(model, "kind", None) != KIND:
        raise LmlabError(f"save_reward_model needs a RewardModel, got {type(model).__name__}; "
                         "use lmlab.checkpoint.save_model for language models")
    out_dir = Path(out_dir)
    # An older config.json must not vouch for the new weights while they are written.
    (out_dir / CONFIG_FILE).unlink(missing_ok=True)
    tokens = {"tokens": token_ids(tokenizer)} if tokenizer is not None else {}
    return save_model(model, out_dir, tokenizer=tokenizer, extra={**tokens, **(extra or {})})


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
        what = {"lm": "language model"}.get(meta.get("kind", "lm"), meta.get("kind"))
        raise LmlabError(f"{path} is a {what} checkpoint, not a reward model; train one with "
                         "`lmlab reward train` (it writes RUN/model)")
    return meta


def reward_model_from_state_dict(cfg: ModelConfig, state: dict[str, torch.Tensor], source: str = "checkpoint",
                                 device: torch.device | str = "cpu",
                                 dtype: torch.dtype | None = None) -> RewardModel:
    """Build a RewardModel around `state` without allocating random weights first."""
    return model_from_state_dict(cfg, state, source=source, device=device, dtype=dtype, kind=KIND)


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
