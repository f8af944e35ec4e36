"""No code execution from files: pickles are never loaded, YAML tags construct nothing,
chat templates cannot reach Python internals, and the source has no unsafe loader."""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import pytest
import torch

from lmlab.checkpoint import CONFIG_FILE, load_state_dict, save_model
from lmlab.hub import load_model
from lmlab.config import get_preset, load_yaml
from lmlab.data.chat import JinjaTemplate
from lmlab.errors import LmlabError
from lmlab.model.transformer import build_model
from lmlab.tokenizer import Tokenizer

SRC = Path(__file__).resolve().parents[1] / "src" / "lmlab"


class CreatesFile:
    """Unpickling this object opens (so creates) `path`: proof that a loader ran pickle."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


class RunsCommand:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def payloads(marker: Path) -> dict[str, bytes]:
    """Raw pickles and torch.save archives (the zip form torch.load would unpickle)."""
    out = {}
    for name, obj in (("open", CreatesFile(str(marker))), ("system", RunsCommand(str(marker)))):
        out[f"pickle-{name}"] = pickle.dumps({"weight": obj})
        path = marker.parent / f"{name}.pt"
        torch.save({"weight": obj}, path)
        out[f"torch-save-{name}"] = path.read_bytes()
        path.unlink()
    return out


def test_the_payloads_really_execute(tmp_path):
    """The control: unpickling each payload does create the marker, so the refusals below
    are meaningful (a payload that did nothing would prove nothing)."""
    marker = tmp_path / "pwned"
    for name, data in payloads(marker).items():
        if name.startswith("pickle"):
            pickle.loads(data)
        else:
            (tmp_path / "p.pt").write_bytes(data)
            torch.load(tmp_path / "p.pt", weights_only=False)
        assert marker.exists(), name
        marker.unlink()


@pytest.fixture
def model_dir(tmp_path):
    return save_model(build_model(get_preset("nano")), tmp_path / "model")


def _places(model_dir: Path):
    """(description, file to replace, loader) for every place a pickle could be expected."""
    from lmlab.adapters.inject import load_adapter
    from lmlab.data.curate.classifier import QualityClassifier

    def adapter(path):
        from lmlab.adapters.inject import AdapterConfig, apply_adapters, save_adapter

        model = load_model(model_dir)
        apply_adapters(model, AdapterConfig())
        save_adapter(model, path.parent)
        return lambda: load_adapter(load_model(model_dir), path.parent)

    return [
        ("checkpoint weights", model_dir / "model.safetensors", lambda p: (lambda: load_model(model_dir))),
        ("optimizer state", model_dir.parent / "ckpt" / "optimizer.safetensors",
         lambda p: (lambda: load_state_dict(p))),
        ("tokenizer.json", model_dir.parent / "tok" / "tokenizer.json", lambda p: (lambda: Tokenizer.load(p))),
        ("tokenizer.model", model_dir.parent / "spm" / "tokenizer.model", lambda p: (lambda: Tokenizer.load(p))),
        ("tokenizer beside a model", model_dir / "tokenizer.json",
         lambda p: (lambda: Tokenizer.load(model_dir))),
        ("adapter weights", model_dir.parent / "adapter" / "adapter.safetensors", adapter),
        ("quality classifier", model_dir.parent / "clf.safetensors", lambda p: (lambda: QualityClassifier.load(p))),
    ]


@pytest.mark.parametrize("place", range(7))
def test_malicious_pickle_is_refused_and_never_runs(model_dir, tmp_path, place):
    desc, target, make_loader = _places(model_dir)[place]
    marker = tmp_path / "pwned"
    for name, data in payloads(marker).items():
        target.parent.mkdir(parents=True, exist_ok=True)
        loader = make_loader(target)  # builds any genuine files first, then the payload replaces one
        target.write_bytes(data)
        with pytest.raises(LmlabError):
            loader()
        assert not marker.exists(), f"{desc}: {name} was executed"


def test_hf_directory_with_only_pickled_weights_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / CONFIG_FILE).write_text('{"model_type": "llama", "vocab_size": 8, "hidden_size": 8, '
                                  '"num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 8, '
                                  '"max_position_embeddings": 16, "rms_norm_eps": 1e-5}')
    (hf / "pytorch_model.bin").write_bytes(payloads(marker)["torch-save-open"])
    with pytest.raises(LmlabError, match="never unpickles"):
        load_model(hf)
    assert not marker.exists()


def test_yaml_object_tags_construct_nothing(tmp_path):
    marker = tmp_path / "pwned"
    for tag in ("!!python/object/apply:os.system", "!!python/object/new:os.system"):
        path = tmp_path / "evil.yaml"
        path.write_text(f"model:\n  name: x\ntrain: {tag} ['touch {marker}']\n")
        with pytest.raises(LmlabError, match=r"evil\.yaml:3: YAML tags that construct objects are not allowed"):
            load_yaml(path)
        assert not marker.exists()
    path.write_text("x: !!python/name:os.system\n")
    with pytest.raises(LmlabError, match="not allowed"):
        load_yaml(path)


def test_set_overrides_read_tags_as_text(tmp_path):
    """`--set a.b=VALUE` parses VALUE as a YAML scalar: a tag stays an inert string."""
    from lmlab.train.config import _parse_value

    marker = tmp_path / "pwned"
    value = _parse_value(f"!!python/object/apply:os.system ['touch {marker}']")
    assert isinstance(value, str) and not marker.exists()


ESCAPES = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ ''.__class__ }}",
    "{{ raise_exception.__globals__['os'] }}",
    "{{ cycler.__init__.__globals__.os.system('touch MARKER') }}",
    "{{ ''|attr('__class__') }}",
    "{{ '{0.__class__}'.format(1) }}",
    "{% for m in messages %}{{ m.__class__.__subclasses__() }}{% endfor %}",
    "{{ messages.append('x') }}",
    "{{ self.__init__.__globals__ }}",
]


@pytest.mark.parametrize("template", ESCAPES)
def test_chat_template_sandbox_refuses_python_internals(template, tmp_path, monkeypatch):
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from chartok import CharTokenizer

    monkeypatch.chdir(tmp_path)
    with pytest.raises(LmlabError, match="chat template"):
        JinjaTemplate(template, CharTokenizer()).render([{"role": "user", "content": "hi"}])
    assert not (tmp_path / "MARKER").exists()


def test_plain_chat_template_still_renders():
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from chartok import CharTokenizer

    t = JinjaTemplate("{% for m in messages %}[{{ m['role'] }}]{{ m.content }}{% endfor %}"
                      "{% if add_generation_prompt %}[assistant]{% endif %}", CharTokenizer())
    assert t.render([{"role": "user", "content": "hi"}], add_generation_prompt=True) == "[user]hi[assistant]"


# ---- the source never reaches for an unsafe loader ---------------------------------------

FORBIDDEN = [
    (re.compile(r"^\s*(import|from)\s+(c?pickle|dill|joblib|marshal|shelve)\b", re.M | re.I), "a pickle-family import"),
    (re.compile(r"\bpickle\.loads?\("), "pickle.load"),
    (re.compile(r"\byaml\.(load|unsafe_load|full_load|load_all)\("), "yaml.load without SafeLoader"),
    (re.compile(r"Loader\s*=\s*yaml\.(Unsafe|Full)?Loader\b"), "an unsafe YAML Loader"),
    (re.compile(r"trust_remote_code\s*=\s*True"), "trust_remote_code=True"),
    (re.compile(r"(?<![\w.])(eval|exec)\("), "eval/exec"),  # not model.eval()
]


def _sources():
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 40  # the scan really looks at the package
    return files


def test_source_has_no_unsafe_loader():
    found = []
    for path in _sources():
        text = path.read_text(encoding="utf-8")
        for pattern, what in FORBIDDEN:
            for m in pattern.finditer(text):
                found.append(f"{path.relative_to(SRC)}:{text[:m.start()].count(chr(10)) + 1}: {what}")
        for m in re.finditer(r"torch\.load\(", text):
            call = text[m.start(): text.find(")", m.start()) + 1]
            if not re.search(r"weights_only\s*=\s*True", call):
                found.append(f"{path.relative_to(SRC)}:{text[:m.start()].count(chr(10)) + 1}: torch.load "
                             "without weights_only=True")
    assert not found, "\n".join(found)


def test_the_scan_catches_what_it_looks_for():
    """The patterns would fire on the code they forbid."""
    bad = ["import pickle", "from cPickle import loads", "yaml.load(text)", "yaml.load(t, Loader=yaml.Loader)",
           "AutoModel.from_pretrained(p, trust_remote_code=True)", "eval(expr)"]
    for line in bad:
        assert any(p.search(line) for p, _ in FORBIDDEN), line
    for fine in ("yaml.safe_load(text)", "model.eval()", "torch.load(p, weights_only=True)"):
        assert not any(p.search(fine) for p, _ in FORBIDDEN), fine
