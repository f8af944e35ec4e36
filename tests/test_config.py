import pytest

from lmlab.config import ModelConfig, RopeScaling, get_preset, load_yaml, resolve_model_config
from lmlab.errors import LmlabError
from lmlab.summary import parameter_counts

PUBLISHED = {
    "tinyllama-1.1b": 1.10e9,
    "llama2-7b": 6.74e9,
    "llama3-8b": 8.03e9,
    "llama3.1-8b": 8.03e9,
    "phi3-mini-4k": 3.82e9,
}


@pytest.mark.parametrize("name,published", PUBLISHED.items())
def test_preset_parameter_counts_match_published(name, published):
    total = parameter_counts(get_preset(name))["total"]
    assert abs(total - published) / published < 0.005


def test_unknown_key_names_closest_valid_key():
    with pytest.raises(LmlabError, match="did you mean 'n_kv_heads'"):
        ModelConfig.from_dict({"n_kv_head": 4})


def test_unknown_preset_suggests():
    with pytest.raises(LmlabError, match="tinyllama-1.1b"):
        get_preset("tinylama-1.1b")


def test_yaml_round_trip_with_nested_rope_scaling(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text(
        "model:\n  preset: nano\n  n_layers: 3\n  norm_eps: 1e-6\n"
        "  rope_scaling: {kind: llama3, factor: 4.0}\n"
    )
    cfg = resolve_model_config(load_yaml(path)["model"])
    assert cfg.n_layers == 3 and cfg.norm_eps == 1e-6
    assert cfg.rope_scaling == RopeScaling(kind="llama3", factor=4.0)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_nested_unknown_key_is_reported_with_its_path():
    with pytest.raises(LmlabError, match=r"model.rope_scaling.'factr'.*'factor'"):
        ModelConfig.from_dict({"rope_scaling": {"factr": 2.0}})


def test_invalid_shapes_are_refused():
    with pytest.raises(LmlabError, match="multiple of n_kv_heads"):
        ModelConfig(n_heads=6, n_kv_heads=4, d_model=48)
    with pytest.raises(LmlabError, match="one value per layer"):
        ModelConfig(n_layers=2, ffn_hidden_per_layer=(1, 2, 3))
    with pytest.raises(LmlabError, match="must be int"):
        ModelConfig.from_dict({"n_layers": "two"})


def test_missing_yaml_file(tmp_path):
    with pytest.raises(LmlabError, match="not found"):
        load_yaml(tmp_path / "nope.yaml")
