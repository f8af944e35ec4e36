"""One precision vocabulary; `auto` follows the hardware (both outcomes forced here)."""
import pytest
import torch

import lmlab.precision as precision
from lmlab.errors import LmlabError
from lmlab.pipeline import load_recipe


@pytest.mark.parametrize("spelling, name", [
    ("auto", "auto"), ("float32", "float32"), ("fp32", "float32"), ("bf16", "bf16"), ("bfloat16", "bf16"),
    ("BF16", "bf16"), ("fp16", "fp16"), ("float16", "fp16"), ("half", "fp16"),
])
def test_aliases_parse_to_one_name(spelling, name):
    assert precision.parse(spelling) == name


def test_unknown_precision_names_the_choices():
    with pytest.raises(LmlabError, match="auto, float32, bf16, fp16"):
        precision.parse("int3")


def no_native(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "fma"})


def test_auto_is_float32_on_a_cpu_without_native_bf16(monkeypatch):
    no_native(monkeypatch)
    r = precision.resolve("auto", "cpu")
    assert r.name == "float32" and "AVX512-BF16" in r.reason
    # The default recipe's pretraining and SFT both resolve to float32 there.
    recipe, _ = load_recipe(None)
    for cfg in (recipe.train, recipe.sft.train):
        assert precision.resolve(cfg.precision, cfg.device).name == "float32"


def test_auto_is_bf16_where_the_cpu_has_it_and_it_is_fast(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512_bf16", "avx512f"})
    monkeypatch.setattr(precision, "bf16_speed_ratio", lambda: 2.0)
    r = precision.resolve("auto", "cpu")
    assert r.name == "bf16" and r.dtype is torch.bfloat16
    with r.autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") is torch.bfloat16


def test_a_flag_the_cpu_does_not_honour_is_caught_by_the_probe(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512_bf16"})
    monkeypatch.setattr(precision, "bf16_speed_ratio", lambda: 0.01)  # emulated: 100x slower
    r = precision.resolve("auto", "cpu")
    assert r.name == "float32" and "slower" in r.reason


def test_the_probe_measures_and_is_cached():
    precision.bf16_speed_ratio.cache_clear()
    first = precision.bf16_speed_ratio()
    assert first > 0 and precision.bf16_speed_ratio() == first
    assert precision.bf16_speed_ratio.cache_info().hits >= 1


def test_explicit_settings_are_kept_and_fp16_refused_on_cpu(monkeypatch):
    no_native(monkeypatch)
    assert precision.resolve("bf16", "cpu").name == "bf16"  # the user asked: honoured
    assert precision.resolve("float32", "cpu").autocast().__class__.__name__ == "nullcontext"
    with pytest.raises(LmlabError, match="fp16 autocast is for GPUs"):
        precision.resolve("fp16", "cpu")


def test_train_config_takes_any_spelling():
    from lmlab.train.config import TrainConfig

    assert TrainConfig(precision="bfloat16").precision == "bf16"
    assert TrainConfig().precision == "auto"
    with pytest.raises(LmlabError, match="unknown precision"):
        TrainConfig(precision="bf17")
