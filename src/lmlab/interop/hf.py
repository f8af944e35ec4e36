"""Hugging Face checkpoints in and out: config.json + safetensors (single file or sharded).

Each supported family (Llama, Phi-3, ...) lives in its own module and registers a `Family`:
how its config.json maps onto `ModelConfig` and how its tensor names map onto ours, in both
directions. This module owns what every family shares: the registry, the rope fields of
config.json (old `rope_theta`/`rope_scaling` and transformers 5's `rope_parameters`), lazy
reading of safetensors files, sharded writing, and the two conversions.

Adding a family: write `interop/<name>.py` that calls `register_family(Family(...))`, and add
its module name to `FAMILY_MODULES`.
"""
from __future__ import annotations

import importlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lmlab.config import ModelConfig, RopeScaling, from_mapping
from lmlab.errors import LmlabError
from lmlab.io import atomic_path, read_json, staged_dir, write_json_atomic

FAMILY_MODULES = ("lmlab.interop.llama", "lmlab.interop.phi3", "lmlab.interop.mixtral", "lmlab.interop.openelm")

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Files beside the weights that describe the tokenizer and generation defaults; copied as-is.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja", "generation_config.json",
)
# Token ids that config.json carries but ModelConfig does not; kept for the way back.
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # "5GB", transformers' default

Tensors = Iterator[tuple[str, torch.Tensor]]


# ---------------------------------------------------------------------------------------
# Families
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """One Hugging Face model family, in both directions.

    name: the `ModelConfig.family` value it handles.
    model_types / architectures: the config.json values it accepts; the first of each is
        written on export.
    config_from_hf(hf_config) -> ModelConfig; config_to_hf(cfg) -> dict (architecture fields
        only; token ids and dtype are added by the caller).
    weights_from_hf(cfg, checkpoint) yields (our name, tensor), reading the lazily loaded
        `HFCheckpoint` tensor by tensor (fused tensors are split here, stacked ones built).
    weights_to_hf(cfg, state) yields (HF name, tensor) from our state dict.
    """

    name: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    config_from_hf: Callable[[Mapping[str, Any]], ModelConfig]
    config_to_hf: Callable[[ModelConfig], dict[str, Any]]
    weights_from_hf: Callable[[ModelConfig, "HFCheckpoint"], Tensors]
    weights_to_hf: Callable[[ModelConfig, Mapping[str, torch.Tensor]], Tensors]


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    _FAMILIES[family.name] = family
    return family


def families() -> dict[str, Family]:
    for module in FAMILY_MODULES:
        importlib.import_module(module)
    return dict(_FAMILIES)


def _supported() -> str:
    fams = families().values()
    return ", ".join(sorted(a for f in fams for a in f.architectures))


def family_for_hf_config(hf: Mapping[str, Any], where: str = "config.json") -> Family:
    model_type = hf.get("model_type")
    archs = hf.get("architectures") or []
    fams = families().values()
    # model_type names the layout; architectures only decide when it is missing or unknown.
    for fam in fams:
        if model_type in fam.model_types:
            return fam
    for fam in fams:
        if any(a in fam.architectures for a in archs):
            return fam
    raise LmlabError(
        f"{where}: unsupported architecture (model_type={model_type!r}, architectures={archs}); "
        f"lmlab converts: {_supported()}"
    )


def family_for_config(cfg: ModelConfig) -> Family:
    fams = families()
    if cfg.family not in fams:
        raise LmlabError(
            f"model family {cfg.family!r} has no Hugging Face export; supported families: "
            f"{', '.join(sorted(fams))}"
        )
    return fams[cfg.family]


# ---------------------------------------------------------------------------------------
# config.json fields shared by the Llama-like families
# ---------------------------------------------------------------------------------------


def require(hf: Mapping[str, Any], key: str, where: str = "config.json") -> Any:
    if hf.get(key) is None:
        raise LmlabError(f"{where} has no {key!r}; it is not a complete Hugging Face model config")
    return hf[key]


def rope_from_hf(hf: Mapping[str, Any], default_theta: float = 10000.0) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) from either layout: transformers < 5 writes `rope_theta` and
    `rope_scaling` at the top level, transformers 5 writes one `rope_parameters` dict.
    Like transformers 5, a legacy `rope_scaling` takes precedence when both are present."""
    params = hf.get("rope_parameters") or {}
    if params and all(isinstance(v, Mapping) for v in params.values()):
        raise LmlabError(
            "config.json has per-layer-type rope_parameters; lmlab supports one rope for all layers"
        )
    scaling = hf.get("rope_scaling") or params
    theta = float(scaling.get("rope_theta", params.get("rope_theta", hf.get("rope_theta", default_theta))))
    partial = scaling.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise LmlabError(
            f"config.json sets partial_rotary_factor={partial}; lmlab rotates every head dimension, "
            "so this model cannot be converted exactly"
        )
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, RopeScaling(kind="linear", factor=float(scaling["factor"]))
    if kind == "llama3":
        return theta, RopeScaling(
            kind="llama3",
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_seq_len=int(scaling["original_max_position_embeddings"]),
        )
    if kind in ("longrope", "su"):  # "su" is Phi-3's first name for it
        return theta, _longrope_from_hf(hf, scaling)
    raise LmlabError(
        f"config.json uses rope_type={kind!r}; lmlab supports 'default', 'linear', 'llama3' and 'longrope'"
    )


def _longrope_from_hf(hf: Mapping[str, Any], scaling: Mapping[str, Any]) -> RopeScaling:
    # Phi-3 keeps the pretraining length at the top level, and transformers prefers it there.
    original = int(hf.get("original_max_position_embeddings") or scaling.get("original_max_position_embeddings")
                   or hf["max_position_embeddings"])
    factor = float(scaling.get("factor") or hf["max_position_embeddings"] / original)
    rope = RopeScaling(kind="longrope", factor=factor, original_max_seq_len=original,
                       short_factor=tuple(map(float, scaling["short_factor"])),
                       long_factor=tuple(map(float, scaling["long_factor"])))
    given = scaling.get("attention_factor")
    if given is not None and abs(float(given) - rope.attention_factor) > 1e-12:
        raise LmlabError(
            f"config.json sets longrope attention_factor={given}, but lmlab derives it from factor "
            f"({rope.attention_factor}); this model cannot be converted exactly"
        )
    return rope


def rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """Both layouts: transformers 5 reads `rope_parameters`; older versions would silently drop
    a scaling they do not find under `rope_scaling`, so that is written too."""
    s = cfg.rope_scaling
    if s is None:
        return {"rope_theta": cfg.rope_theta, "rope_scaling": None,
                "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}}
    if s.kind == "linear":
        fields = {"factor": s.factor}
    elif s.kind == "llama3":
        fields = {"factor": s.factor, "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
                  "original_max_position_embeddings": s.original_max_seq_len}
    else:  # longrope
        fields = {"short_factor": list(s.short_factor), "long_factor": list(s.long_factor)}
        # Older transformers accept exactly {type, short_factor, long_factor} for Phi-3 and
        # derive `factor` from max_position_embeddings / original_max_position_embeddings.
        if s.factor != cfg.max_seq_len / s.original_max_seq_len:
            fields["factor"] = s.factor
    legacy = {"type": s.kind, **fields}
    params = {"rope_type": s.kind, **fields, "rope_theta": cfg.rope_theta}
    if s.kind == "longrope":
        params["original_max_position_embeddings"] = s.original_max_seq_len
    return {"rope_theta": cfg.rope_theta, "rope_scaling": legacy, "rope_parameters": params}


def base_config_from_hf(hf: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """ModelConfig fields of a Llama-style config.json. `defaults` are the family's
    transformers defaults for keys a config.json may leave out."""
    get = lambda key: hf.get(key, defaults.get(key))  # noqa: E731
    act = get("hidden_act") or "silu"
    if act not in ("silu", "swish"):
        raise LmlabError(f"config.json uses hidden_act={act!r}; lmlab's MLP is SwiGLU (silu)")
    n_heads = int(require(hf, "num_attention_heads"))
    d_model = int(require(hf, "hidden_size"))
    kv = hf.get("num_key_value_heads")
    head_dim = hf.get("head_dim")
    theta, scaling = rope_from_hf(hf, float(defaults.get("rope_theta", 10000.0)))
    name = str(hf.get("_name_or_path") or hf.get("model_type") or "hf-model").rstrip("/").split("/")[-1]
    return {
        "name": name,
        "vocab_size": int(require(hf, "vocab_size")),
        "d_model": d_model,
        "n_layers": int(require(hf, "num_hidden_layers")),
        "n_heads": n_heads,
        "n_kv_heads": None if kv is None or int(kv) == n_heads else int(kv),
        "head_dim": None if head_dim is None or int(head_dim) * n_heads == d_model else int(head_dim),
        "ffn_hidden": int(require(hf, "intermediate_size")),
        "max_seq_len": int(get("max_position_embeddings")),
        "norm_eps": float(get("rms_norm_eps")),
        "rope_theta": theta,
        "rope_scaling": scaling,
        "tie_embeddings": bool(get("tie_word_embeddings") or False),
        # Present-but-null means "no window"; absent means the family's default.
        "sliding_window": hf["sliding_window"] if "sliding_window" in hf else defaults.get("sliding_window"),
    }


def check_exportable(cfg: ModelConfig, family: str, unsupported: Iterable[str]) -> None:
    """Refuse a config that uses features `family`'s HF modelling code does not have."""
    labels = {
        "qk_norm": "q/k normalisation", "n_heads_per_layer": "per-layer head counts",
        "n_kv_heads_per_layer": "per-layer KV head counts", "ffn_hidden_per_layer": "per-layer FFN widths",
        "n_experts": "mixture of experts", "sliding_window": "a sliding attention window",
        "attn_bias": "q/k/v biases", "attn_out_bias": "an output-projection bias", "mlp_bias": "MLP biases",
        "tie_embeddings": "tied embeddings",
    }
    used = [labels[f] for f in unsupported if getattr(cfg, f)]
    if used:
        raise LmlabError(
            f"this model uses {', '.join(used)}, which Hugging Face's {family} format cannot express; "
            "it cannot be exported to that family"
        )


def base_config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.layer_kv_heads(0),
        "head_dim": cfg.dim_per_head,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        **rope_to_hf(cfg),
    }


def config_from_fields(fields: Mapping[str, Any]) -> ModelConfig:
    return from_mapping(ModelConfig, fields, where="converted config")


# ---------------------------------------------------------------------------------------
# Tensor names
# ---------------------------------------------------------------------------------------


class KeyMap:
    """A one-to-one rename table between our parameter names and HF's. Entries are module
    prefixes with `{i}` for the layer index; the `.weight`/`.bias` suffix carries over."""

    def __init__(self, pairs: Iterable[tuple[str, str]]) -> None:
        self._pairs = list(pairs)
        self._to_hf = [(self._regex(ours), hf) for ours, hf in self._pairs]
        self._to_ours = [(self._regex(hf), ours) for ours, hf in self._pairs]

    @staticmethod
    def _regex(template: str) -> re.Pattern[str]:
        body = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)")
        return re.compile(rf"^{body}\.(?P<suffix>weight|bias)$")

    @staticmethod
    def _apply(table, name: str) -> str | None:
        for pattern, target in table:
            m = pattern.match(name)
            if m:
                groups = m.groupdict()
                out = target.replace("{i}", groups["i"]) if "i" in groups and groups["i"] else target
                return f"{out}.{groups['suffix']}"
        return None

    def to_hf(self, name: str) -> str | None:
        return self._apply(self._to_hf, name)

    def to_ours(self, name: str) -> str | None:
        return self._apply(self._to_ours, name)


# Old checkpoints store the rotary table as a buffer; it is recomputed from the config.
IGNORED_HF_KEYS = re.compile(r".*rotary_emb\.inv_freq$")


def renamed_from_hf(keymap: KeyMap, cfg: ModelConfig, ckpt: "HFCheckpoint",
                    skip: Callable[[str], bool] = lambda name: False) -> Tensors:
    """Import every tensor through `keymap`; `skip` consumes names a family handles itself.
    A tied checkpoint may still carry lm_head.weight: it is the embedding, so it is dropped."""
    for hf_name in ckpt.keys():
        if IGNORED_HF_KEYS.match(hf_name) or skip(hf_name):
            continue
        ours = keymap.to_ours(hf_name)
        if ours is None:
            raise LmlabError(
                f"{ckpt.path}: unexpected tensor {hf_name!r} for a {cfg.family} model; "
                "the checkpoint has parts lmlab does not model"
            )
        if ours == "lm_head.weight" and cfg.tie_embeddings:
            continue
        yield ours, ckpt[hf_name]


def renamed_to_hf(keymap: KeyMap, state: Mapping[str, torch.Tensor],
                  skip: Callable[[str], bool] = lambda name: False) -> Tensors:
    for name, tensor in state.items():
        if skip(name):
            continue
        hf_name = keymap.to_hf(name)
        if hf_name is None:
            raise LmlabError(f"no Hugging Face name for parameter {name!r}; this model cannot be exported")
        yield hf_name, tensor


# ---------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------


def read_hf_config(path: str | Path) -> dict[str, Any]:
    return read_json(Path(path) / "config.json", "expected a Hugging Face model directory (config.json + *.safetensors)")


class HFCheckpoint:
    """The tensors of a HF model directory, opened lazily: `ckpt[name]` reads one tensor
    from its (memory-mapped) safetensors file, so nothing is held twice."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file_of = self._index()
        self._handles: dict[Path, Any] = {}

    def _index(self) -> dict[str, Path]:
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise LmlabError(f"{index} is not a valid safetensors index ({e})") from None
            files = {name: self.path / file for name, file in weight_map.items()}
            for file in sorted(set(files.values())):
                if not file.is_file():
                    raise LmlabError(f"{index} lists {file.name}, which is missing; download the complete checkpoint")
            return files
        single = self.path / SINGLE_FILE
        if single.is_file():
            with self._open(single) as f:
                return {name: single for name in f.keys()}
        if list(self.path.glob("pytorch_model*.bin")) or list(self.path.glob("*.pt")):
            raise LmlabError(
                f"{self.path} holds only pickled PyTorch weights (pytorch_model*.bin); lmlab never "
                "unpickles. Convert them to safetensors first, e.g. with transformers: "
                "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT) (it writes safetensors), "
                "then convert OUT"
            )
        raise LmlabError(f"no {SINGLE_FILE} or {INDEX_FILE} in {self.path}")

    def _open(self, file: Path):
        try:
            return safe_open(str(file), framework="pt")
        except (SafetensorError, OSError) as e:
            raise LmlabError(f"{file} is not a readable safetensors file ({e})") from None

    def keys(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, name: object) -> bool:
        return name in self._file_of

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._file_of:
            raise LmlabError(f"{self.path}: tensor {name!r} is missing; the checkpoint is incomplete")
        file = self._file_of[name]
        if file not in self._handles:
            self._handles[file] = self._open(file).__enter__()
        return self._handles[file].get_tensor(name)

    def close(self) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()

    def __enter__(self) -> "HFCheckpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def hf_config_to_model_config(hf: Mapping[str, Any], where: str = "config.json") -> ModelConfig:
    return family_for_hf_config(hf, where).config_from_hf(hf)


def load_hf_model(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
    """A Hugging Face model directory as an lmlab Transformer. Tensors keep their stored dtype
    unless `dtype` is given; each is cast and moved as it is read."""
    from lmlab.checkpoint import model_from_state_dict

    path = Path(path)
    hf = read_hf_config(path)
    family = family_for_hf_config(hf, str(path / "config.json"))
    cfg = family.config_from_hf(hf)
    state: dict[str, torch.Tensor] = {}
    with HFCheckpoint(path) as ckpt:
        for name, tensor in family.weights_from_hf(cfg, ckpt):
            state[name] = tensor.to(device=device, dtype=dtype or tensor.dtype)
    return model_from_state_dict(cfg, state, source=str(path), device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------


def write_safetensors_shards(tensors: Iterable[tuple[str, torch.Tensor]], out_dir: str | Path,
                             max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """Write `tensors` as model.safetensors, or as model-0000k-of-0000n.safetensors plus an
    index when they exceed `max_shard_bytes` (HF's rule: a tensor that does not fit starts a
    new shard). Only one shard's worth of tensors is held at a time. Returns the file names."""
    out_dir = Path(out_dir)
    shards: list[tuple[Path, list[str]]] = []
    current: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        tmp = out_dir / f".shard-{len(shards):05d}.tmp"
        save_file(current, str(tmp), metadata={"format": "pt"})
        shards.append((tmp, list(current)))
        current.clear()

    try:
        for name, tensor in tensors:
            nbytes = tensor.numel() * tensor.element_size()
            if current and size + nbytes > max_shard_bytes:
                flush()
                size = 0
            current[name] = tensor.detach().contiguous().cpu()
            size += nbytes
            total += nbytes
        flush()
        if len(shards) == 1:
            names = [SINGLE_FILE]
        else:
            n = len(shards)
            names = [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        for (tmp, _), name in zip(shards, names):
            with atomic_path(out_dir / name) as dest:
                tmp.replace(dest)
    finally:
        for tmp, _ in shards:
            tmp.unlink(missing_ok=True)
    if len(shards) > 1:
        weight_map = {key: name for (_, keys), name in zip(shards, names) for key in keys}
        write_json_atomic(out_dir / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return names


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def save_hf(model, out_dir: str | Path, token_ids: Mapping[str, Any] | None = None,
            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write an lmlab Transformer as a Hugging Face model directory (config.json last)."""
    cfg = model.config
    family = family_for_config(cfg)
    hf_config = {
        "architectures": [family.architectures[0]],
        "model_type": family.model_types[0],
        **family.config_to_hf(cfg),
        # Unknown ids are written as null: the family's defaults name another tokenizer's ids.
        **{k: (token_ids or {}).get(k) for k in TOKEN_ID_KEYS},
        "dtype": _dtype_name(model.embed.weight.dtype),
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_safetensors_shards(family.weights_to_hf(cfg, model.state_dict()), out_dir, max_shard_bytes)
    write_json_atomic(out_dir / "config.json", hf_config)
    return out_dir


def _copy_tokenizer_files(src: Path, dest: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            with atomic_path(dest / name) as tmp:
                shutil.copyfile(src / name, tmp)
            copied.append(name)
    return copied


def convert_from_hf(hf_dir: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None,
                    overwrite: bool = False) -> Path:
    """HF model directory -> lmlab checkpoint directory (weights, config, tokenizer files).

    `out_dir` is built beside its destination and swapped in when complete; it may not be
    (or lie inside) `hf_dir`, and a non-empty `out_dir` is refused unless `overwrite`
    (then only the files written here are replaced)."""
    from lmlab.checkpoint import CONFIG_FILE, save_model

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if not hf_dir.is_dir():
        raise LmlabError(f"Hugging Face model directory not found: {hf_dir}")
    with staged_dir(out_dir, overwrite=overwrite, marker=CONFIG_FILE, inputs=[hf_dir],
                    what="output directory") as staging:
        hf = read_hf_config(hf_dir)
        model = load_hf_model(hf_dir, dtype=dtype)
        _copy_tokenizer_files(hf_dir, staging)
        source = {
            "format": "huggingface", "model_type": hf.get("model_type"), "architectures": hf.get("architectures"),
            **{k: hf[k] for k in TOKEN_ID_KEYS if k in hf},
        }
        save_model(model, staging, extra={"source": source})
    return out_dir


def convert_to_hf(lmlab_dir: str | Path, out_dir: str | Path,
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False) -> Path:
    """lmlab checkpoint directory -> HF model directory loadable by AutoModelForCausalLM.
    `out_dir` follows the rules of `convert_from_hf`."""
    from lmlab.checkpoint import is_lmlab_dir, load_lmlab_model, read_config_json

    lmlab_dir, out_dir = Path(lmlab_dir), Path(out_dir)
    if not lmlab_dir.is_dir():
        raise LmlabError(f"lmlab checkpoint directory not found: {lmlab_dir}")
    if not is_lmlab_dir(lmlab_dir):
        raise LmlabError(f"{lmlab_dir} is not an lmlab checkpoint (its config.json has no \"format\": \"lmlab\")")
    with staged_dir(out_dir, overwrite=overwrite, marker="config.json", inputs=[lmlab_dir],
                    what="output directory") as staging:
        meta = read_config_json(lmlab_dir)
        model = load_lmlab_model(lmlab_dir)
        _copy_tokenizer_files(lmlab_dir, staging)
        save_hf(model, staging, token_ids=meta.get("source") or {}, max_shard_bytes=max_shard_bytes)
    return out_dir


def parse_size(text: str) -> int:
    """'5GB', '500MB', '200KB' or a byte count -> bytes (decimal units, as transformers uses)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*", text.upper())
    if not m:
        raise LmlabError(f"cannot read size {text!r}; write e.g. 5GB, 500MB or a byte count")
    unit = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9}[m.group(2)]
    return int(float(m.group(1)) * unit)


__all__ = [
    "Family", "register_family", "families", "family_for_hf_config", "family_for_config", "KeyMap",
    "HFCheckpoint", "rope_from_hf", "rope_to_hf", "base_config_from_hf", "base_config_to_hf",
    "check_exportable", "renamed_from_hf", "renamed_to_hf", "read_hf_config", "hf_config_to_model_config",
    "load_hf_model", "save_hf", "write_safetensors_shards", "convert_from_hf", "convert_to_hf", "parse_size",
]
