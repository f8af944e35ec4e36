"""Model configuration: one frozen dataclass that describes every family we support, the
named presets for real checkpoints and micro models, and strict loading from dicts/YAML.

Layer-wise scaling (OpenELM) is expressed here as per-layer tuples; the model code only
ever asks `cfg.layer_heads(i)` and friends, so there is no separate code path for it.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import types
import typing
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping

from lmlab.errors import LmlabError


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. `llama3`: Llama 3.1's smooth low/high-frequency rescale.
    `linear`: positions divided by `factor` (position interpolation).
    `longrope`: Phi-3's long-context variant: each frequency divided by its entry of
    `short_factor`, or of `long_factor` once a position reaches `original_max_seq_len`, and
    cos/sin scaled by `attention_factor` (from `factor`, the context extension ratio)."""

    kind: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("llama3", "linear", "longrope"):
            raise LmlabError(f"rope_scaling.kind must be 'llama3', 'linear' or 'longrope', got {self.kind!r}")
        if self.kind == "longrope" and (self.short_factor is None or self.long_factor is None):
            raise LmlabError("rope_scaling.kind 'longrope' needs short_factor and long_factor (one per frequency)")

    @property
    def attention_factor(self) -> float:
        """The cos/sin multiplier of longrope (LongRoPE paper's default); 1 otherwise."""
        if self.kind != "longrope" or self.factor <= 1.0:
            return 1.0
        return math.sqrt(1 + math.log(self.factor) / math.log(self.original_max_seq_len))


# Upper bounds on model sizes: each is far beyond any published model (Llama 3.1 405B has
# d_model 16384, 126 layers, FFN 53248, a 128k vocabulary and context), so only typos hit them.
SIZE_LIMITS = {
    "vocab_size": 1 << 24, "d_model": 1 << 17, "n_layers": 1 << 12, "n_heads": 1 << 12,
    "n_kv_heads": 1 << 12, "head_dim": 1 << 12, "ffn_hidden": 1 << 20, "max_seq_len": 1 << 24,
    "sliding_window": 1 << 24, "n_experts": 1 << 12, "top_k": 1 << 12,
}


@dataclass(frozen=True)
class ModelConfig:
    name: str = "custom"
    # Which checkpoint layout the interop layer uses for this model.
    family: str = "llama"
    vocab_size: int = 32000
    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: multi-head attention (= n_heads)
    head_dim: int | None = None  # None: d_model // n_heads
    ffn_hidden: int = 11008
    max_seq_len: int = 4096
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_embeddings: bool = False
    attn_bias: bool = False  # bias on q/k/v projections
    attn_out_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm over head_dim on queries and keys (OpenELM)
    sliding_window: int | None = None  # attend to at most this many previous tokens
    # Layer-wise scaling: one entry per layer; None means "the uniform value above".
    n_heads_per_layer: tuple[int, ...] | None = None
    n_kv_heads_per_layer: tuple[int, ...] | None = None
    ffn_hidden_per_layer: tuple[int, ...] | None = None
    # Sparse mixture of experts: n_experts == 0 means a dense SwiGLU FFN in every layer.
    n_experts: int = 0
    top_k: int = 0
    moe_aux_loss_weight: float = 0.0
    moe_z_loss_weight: float = 0.0
    init_std: float = 0.02
    # Free-form provenance shown by `lmlab inspect` (e.g. the published parameter count).
    reference: str = ""

    def __post_init__(self) -> None:
        # Sizes are checked before anything loops over layers or allocates: a typo such as
        # n_layers: 1e30 must be an error, not a hang or an out-of-memory kill.
        for name, top in SIZE_LIMITS.items():
            value = getattr(self, name)
            if value is None and name in ("n_kv_heads", "head_dim", "sliding_window"):
                continue
            low = 0 if name in ("n_experts", "top_k") else 1
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= value <= top:
                raise LmlabError(f"model.{name} must be an integer in {low}..{top:,}, got {value!r}")
        for name in ("n_heads_per_layer", "n_kv_heads_per_layer", "ffn_hidden_per_layer"):
            values = getattr(self, name)
            top = SIZE_LIMITS["ffn_hidden" if name.startswith("ffn") else "n_heads"]
            if values is not None and any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or not 1 <= v <= top
                                          for v in values):
                raise LmlabError(f"model.{name} entries must be integers in 1..{top:,}, got {values!r}")
        for name in ("norm_eps", "rope_theta", "init_std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise LmlabError(f"model.{name} must be a positive finite number, got {value!r}")
        if not 0 <= self.moe_aux_loss_weight < math.inf or not 0 <= self.moe_z_loss_weight < math.inf:
            raise LmlabError("model.moe_aux_loss_weight and moe_z_loss_weight must be finite and non-negative")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise LmlabError(
                f"model.d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                "set head_dim explicitly or choose a divisible pair"
            )
        if self.head_dim is not None and self.head_dim % 2:
            raise LmlabError(f"model.head_dim must be even for RoPE, got {self.head_dim}")
        for name in ("n_heads_per_layer", "n_kv_heads_per_layer", "ffn_hidden_per_layer"):
            values = getattr(self, name)
            if values is not None and len(values) != self.n_layers:
                raise LmlabError(
                    f"model.{name} has {len(values)} entries but n_layers={self.n_layers}; "
                    "give exactly one value per layer"
                )
        for i in range(self.n_layers):
            h, kv = self.layer_heads(i), self.layer_kv_heads(i)
            if h % kv:
                raise LmlabError(
                    f"layer {i}: n_heads={h} is not a multiple of n_kv_heads={kv} "
                    "(grouped-query attention shares each KV head among a whole group)"
                )
        rs = self.rope_scaling
        if rs is not None and rs.kind == "longrope":
            for name in ("short_factor", "long_factor"):
                if len(getattr(rs, name)) != self.dim_per_head // 2:
                    raise LmlabError(
                        f"model.rope_scaling.{name} has {len(getattr(rs, name))} entries but head_dim "
                        f"{self.dim_per_head} has {self.dim_per_head // 2} rotary frequencies"
                    )
        if self.n_experts and not 0 < self.top_k <= self.n_experts:
            raise LmlabError(
                f"model.top_k must be in 1..n_experts={self.n_experts}, got {self.top_k}"
            )

    # ---- per-layer views (layer-wise scaling lives here, not in the model code) ----
    @property
    def dim_per_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    def layer_heads(self, i: int) -> int:
        return self.n_heads_per_layer[i] if self.n_heads_per_layer else self.n_heads

    def layer_kv_heads(self, i: int) -> int:
        if self.n_kv_heads_per_layer:
            return self.n_kv_heads_per_layer[i]
        return self.n_kv_heads if self.n_kv_heads is not None else self.layer_heads(i)

    def layer_ffn(self, i: int) -> int:
        return self.ffn_hidden_per_layer[i] if self.ffn_hidden_per_layer else self.ffn_hidden

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelConfig":
        return from_mapping(cls, data, where="model")

    def replace(self, **changes: Any) -> "ModelConfig":
        return replace(self, **changes)


# ---------------------------------------------------------------------------------------
# Strict mapping -> frozen dataclass (shared by every config in the project)
# ---------------------------------------------------------------------------------------


def _unknown_key_error(key: str, valid: list[str], where: str) -> LmlabError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(sorted(valid))}"
    return LmlabError(f"unknown key {where}.{key!r}: {hint}")


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Turn YAML/JSON values into the annotated type (nested dataclasses, tuples, optionals)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(value, non_none[0], where) if len(non_none) == 1 else value
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, Mapping):
            raise LmlabError(f"{where} must be a mapping, got {type(value).__name__}")
        return from_mapping(annotation, value, where=where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise LmlabError(f"{where} must be a list, got {type(value).__name__}")
        inner = args[0] if args else Any
        return tuple(_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value))
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float) and isinstance(value, bool):
        raise LmlabError(f"{where} must be {annotation.__name__}, got {value!r}")
    if annotation in (int, float, str, bool) and not isinstance(value, annotation):
        if annotation is float and isinstance(value, str):
            try:
                return float(value)  # YAML reads "1e-5" as a string
            except ValueError:
                pass
        raise LmlabError(f"{where} must be {annotation.__name__}, got {value!r}")
    return value


def from_mapping(cls: type, data: Mapping[str, Any], where: str = "config") -> Any:
    """Build the frozen dataclass `cls` from `data`; unknown keys name the closest valid key."""
    if not isinstance(data, Mapping):
        raise LmlabError(f"{where} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in hints or key not in valid:
            raise _unknown_key_error(str(key), valid, where)
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise LmlabError(f"{where}: {e}") from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if path.is_dir():
        raise LmlabError(f"config file {path} is a directory; give the recipe's .yaml file")
    if not path.is_file():
        raise LmlabError(f"config file not found: {path} (check the path, or list recipes/)")
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8")
    except OSError as e:
        raise LmlabError(f"cannot read {path}: {e.strerror}; check the path and its permissions") from None
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise LmlabError(f"{path}:{line}: not UTF-8 text; re-save the file as UTF-8") from None
    try:
        # safe_load only: a tag such as !!python/object/apply never constructs anything.
        data = yaml.safe_load(text)
    except yaml.constructor.ConstructorError as e:
        line = e.problem_mark.line + 1 if e.problem_mark else "?"
        raise LmlabError(f"{path}:{line}: YAML tags that construct objects are not allowed ({e.problem}); "
                         "write plain values") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e)
        raise LmlabError(f"{where}: not valid YAML ({problem}); fix the syntax there") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LmlabError(f"{path} must contain a mapping at the top level")
    return data


# ---------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------

PRESETS: dict[str, ModelConfig] = {}


def register(cfg: ModelConfig) -> ModelConfig:
    PRESETS[cfg.name] = cfg
    return cfg


register(ModelConfig(
    name="llama2-7b", vocab_size=32000, d_model=4096, n_layers=32, n_heads=32,
    ffn_hidden=11008, max_seq_len=4096, norm_eps=1e-5, rope_theta=10000.0,
    reference="Llama 2 7B: 6.74B parameters",
))
register(ModelConfig(
    name="tinyllama-1.1b", vocab_size=32000, d_model=2048, n_layers=22, n_heads=32,
    n_kv_heads=4, ffn_hidden=5632, max_seq_len=2048, norm_eps=1e-5, rope_theta=10000.0,
    reference="TinyLlama 1.1B: 1.10B parameters",
))
register(ModelConfig(
    name="llama3-8b", vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
    ffn_hidden=14336, max_seq_len=8192, norm_eps=1e-5, rope_theta=500000.0,
    reference="Llama 3 8B: 8.03B parameters",
))
register(PRESETS["llama3-8b"].replace(
    name="llama3.1-8b", max_seq_len=131072,
    rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192),
    reference="Llama 3.1 8B: 8.03B parameters",
))
register(ModelConfig(
    name="phi3-mini-4k", family="phi3", vocab_size=32064, d_model=3072, n_layers=32,
    n_heads=32, ffn_hidden=8192, max_seq_len=4096, norm_eps=1e-5, rope_theta=10000.0,
    sliding_window=2047, reference="Phi-3-mini: 3.82B parameters",
))
register(ModelConfig(
    name="mixtral-8x7b", family="mixtral", vocab_size=32000, d_model=4096, n_layers=32, n_heads=32,
    n_kv_heads=8, ffn_hidden=14336, max_seq_len=32768, norm_eps=1e-5, rope_theta=1e6,
    n_experts=8, top_k=2, moe_aux_loss_weight=0.02,
    reference="Mixtral 8x7B: 46.7B parameters, 12.9B active",
))
register(ModelConfig(
    name="mixtral-8x22b", family="mixtral", vocab_size=32768, d_model=6144, n_layers=56, n_heads=48,
    n_kv_heads=8, ffn_hidden=16384, max_seq_len=65536, norm_eps=1e-5, rope_theta=1e6,
    n_experts=8, top_k=2, moe_aux_loss_weight=0.001,
    reference="Mixtral 8x22B: 141B parameters, 39B active",
))
register(ModelConfig(
    name="micro-moe", family="mixtral", vocab_size=8192, d_model=256, n_layers=6, n_heads=8, n_kv_heads=4,
    ffn_hidden=688, max_seq_len=256, n_experts=8, top_k=2, moe_aux_loss_weight=0.01,
    reference="benchmark MoE: the micro model with 8 experts, top-2",
))


def make_divisible(value: float, divisor: int) -> int:
    """Round to the nearest multiple of `divisor` (at least `divisor`), never more than 10%
    below `value`: the rounding OpenELM's released configs use for every width."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def layerwise_scaling(n_layers: int, d_model: int, head_dim: int, qkv_multipliers: tuple[float, float],
                      ffn_multipliers: tuple[float, float], gqa_groups: int = 4,
                      ffn_divisor: int = 256) -> dict[str, tuple[int, ...]]:
    """OpenELM's layer-wise scaling (Mehta et al. 2024): the attention width and the FFN width
    grow linearly from the first layer to the last (multipliers alpha and beta, rounded to two
    decimals), at constant head size; each width is rounded with `make_divisible`, and every
    layer keeps n_heads / gqa_groups KV heads. Returns the per-layer tuples of ModelConfig."""
    import numpy as np

    qkv = [round(float(v), 2) for v in np.linspace(*qkv_multipliers, num=n_layers, dtype=float)]
    ffn = [round(float(v), 2) for v in np.linspace(*ffn_multipliers, num=n_layers, dtype=float)]
    heads = tuple(make_divisible(d_model * m, head_dim * gqa_groups) // head_dim for m in qkv)
    return {
        "n_heads_per_layer": heads,
        "n_kv_heads_per_layer": tuple(h // gqa_groups for h in heads),
        "ffn_hidden_per_layer": tuple(make_divisible(d_model * m, ffn_divisor) for m in ffn),
    }


def openelm(name: str, n_layers: int, d_model: int, head_dim: int, reference: str) -> ModelConfig:
    dims = layerwise_scaling(n_layers, d_model, head_dim, (0.5, 1.0), (0.5, 4.0))
    return ModelConfig(
        name=name, family="openelm", vocab_size=32000, d_model=d_model, n_layers=n_layers,
        n_heads=max(dims["n_heads_per_layer"]), head_dim=head_dim, ffn_hidden=max(dims["ffn_hidden_per_layer"]),
        max_seq_len=2048, norm_eps=1e-6, rope_theta=10000.0, tie_embeddings=True, qk_norm=True,
        reference=reference, **dims,
    )


register(openelm("openelm-270m", 16, 1280, 64, "OpenELM-270M: 0.27B parameters"))
register(openelm("openelm-450m", 20, 1536, 64, "OpenELM-450M: 0.45B parameters"))
register(openelm("openelm-1.1b", 28, 2048, 64, "OpenELM-1.1B: 1.08B parameters"))
register(openelm("openelm-3b", 36, 3072, 128, "OpenELM-3B: 3.04B parameters"))
# Micro models for tests and CPU runs.
register(ModelConfig(
    name="micro", vocab_size=8192, d_model=256, n_layers=6, n_heads=8, n_kv_heads=4,
    ffn_hidden=688, max_seq_len=256, reference="benchmark model, ~8.5M parameters",
))
register(ModelConfig(
    name="nano", vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
    ffn_hidden=172, max_seq_len=128, reference="unit-test model",
))


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        close = difflib.get_close_matches(name, list(PRESETS), n=1, cutoff=0.4)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise LmlabError(
            f"unknown model preset {name!r}.{hint} Known presets: {', '.join(sorted(PRESETS))}"
        )
    return PRESETS[name]


def resolve_model_config(spec: str | Mapping[str, Any] | ModelConfig) -> ModelConfig:
    """A preset name, a mapping (optionally with `preset:` as the base), or a config."""
    if isinstance(spec, ModelConfig):
        return spec
    if isinstance(spec, str):
        return get_preset(spec)
    data = dict(spec)
    base = data.pop("preset", None)
    if base is None:
        return ModelConfig.from_dict(data)
    merged = {**get_preset(base).to_dict(), **data}
    return ModelConfig.from_dict(merged)


__all__ = [
    "ModelConfig", "RopeScaling", "PRESETS", "get_preset", "register", "from_mapping",
    "load_yaml", "resolve_model_config",
]
