"""Reward models in and out of Hugging Face's `*ForSequenceClassification` layout.

A HF sequence classifier with one label is exactly our reward model: the decoder trunk
under `model.*` (no lm_head) plus `score.weight` (1, d_model). The trunk's tensors go
through the family's own key map (`lmlab.interop.<family>`), so every rename is shared
with the causal-LM conversion.

Which token is read: ours is the last position whose attention mask is 1; transformers'
is the rightmost token that is not `pad_token_id`. They agree when the pad id never occurs
inside a sequence. When pad == eos and sequences end with EOS, transformers reads the
token *before* the trailing EOS (it treats the EOS as padding) while we read the EOS: use a
pad token distinct from EOS (the export refuses pad == eos unless told `allow_pad_eos`).
transformers also does not derive positions from the attention mask: feed left-padded
batches with `position_ids` (our `real_positions(mask)`), or pad on the right.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from lmlab.checkpoint import is_lmlab_dir, read_config_json
from lmlab.errors import LmlabError
from lmlab.interop.hf import (
    HFCheckpoint, TOKEN_ID_KEYS, _copy_tokenizer_files, _dtype_name, family_for_config,
    family_for_hf_config, read_hf_config, write_safetensors_shards,
)
from lmlab.io import staged_dir, write_json_atomic
from lmlab.model.heads import RewardModel

SCORE = "score.weight"
TRUNK = "transformer."
# lmlab family -> the HF sequence-classification class of the same trunk (tested: llama).
ARCHITECTURES = {"llama": "LlamaForSequenceClassification", "mistral": "MistralForSequenceClassification"}


class _WithoutScore:
    """An HFCheckpoint view that hides the head, so a family's trunk reader sees only the
    tensors its key map knows."""

    def __init__(self, ckpt: HFCheckpoint) -> None:
        self.ckpt, self.path = ckpt, ckpt.path

    def keys(self) -> list[str]:
        return [k for k in self.ckpt.keys() if k != SCORE]

    def __contains__(self, name: object) -> bool:
        return name != SCORE and name in self.ckpt

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.ckpt[name]


def _architecture(cfg) -> str:
    if cfg.family not in ARCHITECTURES:
        raise LmlabError(f"reward models of family {cfg.family!r} have no Hugging Face sequence-classification "
                         f"export; supported: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[cfg.family]


def checked_token_ids(token_ids: Mapping[str, Any], allow_pad_eos: bool = False) -> dict[str, Any]:
    """bos/eos/pad ids for config.json; a missing pad id, or pad == eos, is refused."""
    ids = {k: token_ids.get(k) for k in TOKEN_ID_KEYS}
    if ids["pad_token_id"] is None:
        raise LmlabError("a Hugging Face sequence classifier needs pad_token_id to find each row's last token; "
                         "save the reward model with its tokenizer or pass token_ids={'pad_token_id': ...}")
    if ids["pad_token_id"] == ids["eos_token_id"] and not allow_pad_eos:
        raise LmlabError(f"pad_token_id == eos_token_id ({ids['pad_token_id']}): transformers would read the "
                         "token before a trailing EOS instead of the EOS lmlab reads, so scores would differ; "
                         "give the tokenizer a distinct pad token, or pass allow_pad_eos=True if your "
                         "sequences never end with EOS")
    return ids


def save_hf_reward(rm: RewardModel, out_dir: str | Path, token_ids: Mapping[str, Any],
                   allow_pad_eos: bool = False) -> Path:
    """Write `rm` as a HF `*ForSequenceClassification` directory (num_labels=1, config.json last)."""
    cfg = rm.config
    arch = _architecture(cfg)
    family = family_for_config(cfg)
    ids = checked_token_ids(token_ids, allow_pad_eos)
    state = rm.state_dict()
    trunk = {k[len(TRUNK):]: v for k, v in state.items() if k.startswith(TRUNK)}
    hf_config = {
        "architectures": [arch], "model_type": family.model_types[0], **family.config_to_hf(cfg),
        **ids, "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0},
        "dtype": _dtype_name(rm.score.weight.dtype),
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = list(family.weights_to_hf(cfg, trunk)) + [(SCORE, state[SCORE])]
    write_safetensors_shards(tensors, out_dir)
    write_json_atomic(out_dir / "config.json", hf_config)
    return out_dir


def convert_reward_to_hf(rm_dir: str | Path, out_dir: str | Path, token_ids: Mapping[str, Any] | None = None,
                         allow_pad_eos: bool = False, overwrite: bool = False) -> Path:
    """lmlab reward checkpoint -> HF directory loadable by AutoModelForSequenceClassification.
    Token ids come from the checkpoint's config (saved with its tokenizer) unless given."""
    from lmlab.rewards.io import load_reward_model, read_reward_meta

    rm_dir, out_dir = Path(rm_dir), Path(out_dir)
    meta = read_reward_meta(rm_dir)
    ids = {**(meta.get("tokens") or {}), **(token_ids or {})}
    checked_token_ids(ids, allow_pad_eos)  # refuse before writing anything
    rm = load_reward_model(rm_dir)
    _architecture(rm.config)
    with staged_dir(out_dir, overwrite=overwrite, marker="config.json", inputs=[rm_dir],
                    what="output directory") as staging:
        _copy_tokenizer_files(rm_dir, staging)
        save_hf_reward(rm, staging, ids, allow_pad_eos)
    return out_dir


def load_hf_reward_model(path: str | Path, device: torch.device | str = "cpu",
                         dtype: torch.dtype | None = None) -> RewardModel:
    """A HF `*ForSequenceClassification` directory with one label as an lmlab RewardModel."""
    from lmlab.rewards.io import reward_model_from_state_dict

    path = Path(path)
    hf = read_hf_config(path)
    archs = hf.get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise LmlabError(f"{path} is not a sequence-classification model (architectures={archs}); a reward model "
                         "converts from *ForSequenceClassification")
    n_labels = len(hf.get("id2label") or {}) or int(hf.get("num_labels", 2))
    if n_labels != 1:
        raise LmlabError(f"{path} has {n_labels} labels; a reward model has exactly one scalar output")
    family = family_for_hf_config(hf, str(path / "config.json"))
    cfg = family.config_from_hf(hf)
    state: dict[str, torch.Tensor] = {}
    with HFCheckpoint(path) as ckpt:
        if SCORE not in ckpt:
            raise LmlabError(f"{path} has no {SCORE!r}; the checkpoint is incomplete")
        for name, tensor in family.weights_from_hf(cfg, _WithoutScore(ckpt)):
            if name == "lm_head.weight":
                continue
            state[TRUNK + name] = tensor.to(dtype=dtype or tensor.dtype)
        state[SCORE] = ckpt[SCORE].to(dtype=dtype or ckpt[SCORE].dtype)
    return reward_model_from_state_dict(cfg, state, source=str(path), device=device, dtype=dtype)


def convert_reward_from_hf(hf_dir: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None,
                           overwrite: bool = False) -> Path:
    """HF sequence-classification directory -> lmlab reward checkpoint (with tokenizer files)."""
    from lmlab.rewards.io import save_reward_model

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if not hf_dir.is_dir():
        raise LmlabError(f"Hugging Face model directory not found: {hf_dir}")
    hf = read_hf_config(hf_dir)
    rm = load_hf_reward_model(hf_dir, dtype=dtype)
    tokens = {k: hf.get(k) for k in TOKEN_ID_KEYS}
    with staged_dir(out_dir, overwrite=overwrite, marker="config.json", inputs=[hf_dir],
                    what="output directory") as staging:
        _copy_tokenizer_files(hf_dir, staging)
        save_reward_model(rm, staging, extra={
            "tokens": tokens, "source": {"format": "huggingface", "architectures": hf.get("architectures")}})
    return out_dir


def is_reward_dir(path: str | Path) -> bool:
    """True for an lmlab reward checkpoint (what `lmlab convert to-hf` should route here)."""
    return is_lmlab_dir(path) and read_config_json(path).get("kind") == RewardModel.kind


def is_hf_reward_dir(path: str | Path) -> bool:
    """True for a Hugging Face sequence-classification directory."""
    path = Path(path)
    if not (path / "config.json").is_file() or is_lmlab_dir(path):
        return False
    return any(a.endswith("ForSequenceClassification") for a in read_config_json(path).get("architectures") or [])
