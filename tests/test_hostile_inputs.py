"""The hostile-input corpus: bad inputs a careless or hostile user gives, each answered
with one clear `lmlab: error: ...` naming the problem, a non-zero exit code, no traceback,
and nothing changed on disk.

Every case runs in a fresh workspace holding a tokenizer, a model directory, a corpus and
user files; the whole workspace (names and bytes) is snapshotted before and compared after,
so "no partial output, nothing clobbered" is checked for every case, not only where an
output path is named. Rows: (name, setup, expected message regex). `setup(ws, mp)` builds
what the case needs (mp: pytest's monkeypatch, for the simulated disk faults) and returns
the CLI argv, or a callable for library cases (which must raise LmlabError)."""
from __future__ import annotations

import errno
import json
import re
import shutil
from pathlib import Path

import pytest

from lmlab.checkpoint import save_model
from lmlab.cli import main
from lmlab.config import get_preset
from lmlab.errors import LmlabError
from lmlab.model.transformer import build_model
from lmlab.tokenizer import train_tokenizer

WORDS = ("alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river stone cloud "
         "forest window garden letter number orange purple silver golden winter summer").split()
CORPUS = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(30)) for i in range(60)]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Built once: a tokenizer, a model that fits it, one whose vocabulary is too small,
    one of another vocabulary (draft/proxy mismatches) and a corpus."""
    root = tmp_path_factory.mktemp("assets")
    tok = train_tokenizer(CORPUS, 400)
    assert tok.vocab_size > 300  # merges exist past id 300, so the small model cannot hold them
    tok.save(root / "tokenizer.json")
    nano = get_preset("nano").replace(vocab_size=tok.vocab_size)
    save_model(build_model(nano), root / "model", tokenizer=tok)
    save_model(build_model(nano.replace(vocab_size=280)), root / "small-vocab", tokenizer=tok)
    save_model(build_model(nano.replace(vocab_size=tok.vocab_size + 8)), root / "other-vocab", tokenizer=tok)
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS))
    return root


def snapshot(root: Path) -> dict[str, bytes | None]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = None if p.is_dir() else p.read_bytes()
    return out


# ---- helpers building bad inputs -------------------------------------------------------------

def write(ws: Path, name: str, data: str | bytes) -> str:
    path = ws / name
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)
    return str(path)


def user_dir(ws: Path, name: str = "out") -> str:
    """A directory holding the user's own files, which no command may touch."""
    write(ws, f"{name}/my-notes.txt", "precious")
    write(ws, f"{name}/train-00000.bin", b"\x01\x02 the user's own bin")
    return str(ws / name)


def model_copy(ws: Path, src: str = "model", name: str = "m") -> Path:
    shutil.copytree(ws / "assets" / src, ws / name)
    return ws / name


def edit_config(ws: Path, **model_fields) -> str:
    m = model_copy(ws)
    meta = json.loads((m / "config.json").read_text())
    for k, v in model_fields.items():
        if v is DELETE:
            meta["model"].pop(k)
        else:
            meta["model"][k] = v
    (m / "config.json").write_text(json.dumps(meta))
    return str(m)


DELETE = object()


def shards(ws, *inputs, out=None, extra=()):
    return ["shards", *inputs, "--tokenizer", str(ws / "assets" / "tokenizer.json"),
            "--out", out or str(ws / "shards"), "--seq-len", "16", *extra]


def gen(ws, model=None, *extra):
    tok = [] if model is not None and str(model).endswith("small-vocab") else [
        "--tokenizer", str(ws / "assets" / "tokenizer.json")]
    return ["generate", str(model or ws / "assets" / "model"), "--prompt", "alpha beta gamma", *tok, *extra]


def fail_with(mp, target: str, err: int, message: str):
    """Monkeypatch `module.attr` to raise OSError(err): a disk fault that cannot be staged
    for real here (the tests run as root, so chmod does not stop writes)."""
    module, attr = target.rsplit(".", 1)

    def boom(*args, **kwargs):
        raise OSError(err, message)

    mp.setattr(f"{module}.{attr}", boom)


def full_disk(mp):
    # fsync is where a delayed-allocation file system reports ENOSPC; every atomic write fsyncs.
    fail_with(mp, "os.fsync", errno.ENOSPC, "No space left on device")


def parquet(ws, name, truncate=False):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = ws / name
    pq.write_table(pa.table({"text": CORPUS}), path)
    if truncate:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    return str(path)


def recipe(ws, text: str) -> str:
    return write(ws, "bad.yaml", text)


def lib_build_shards(ws, source, **kw):
    from lmlab.data.shards import build_shards
    from lmlab.tokenizer import Tokenizer

    tok = Tokenizer.load(ws / "assets" / "tokenizer.json")
    out = kw.pop("out", ws / "shards")
    return lambda: build_shards(source, tok, out, seq_len=16, progress=False, **kw)


def lib_chat(ws, *lines: str | bytes):
    from lmlab.data.chat import read_chat_jsonl

    data = b"".join(ln if isinstance(ln, bytes) else (ln + "\n").encode() for ln in lines)
    path = write(ws, "chat.jsonl", data)
    return lambda: read_chat_jsonl(path)


def lib_encode(ws, max_len=512, vocab_size=None, answer="alpha beta"):
    from lmlab.data.chat import Conversation, RoleTokenTemplate, encode_conversations
    from lmlab.tokenizer import Tokenizer

    tok = Tokenizer.load(ws / "assets" / "tokenizer.json")
    conv = Conversation(({"role": "user", "content": "gamma " * 40}, {"role": "assistant", "content": answer}),
                        "chat.jsonl:1")
    return lambda: encode_conversations([conv], RoleTokenTemplate(tok), max_len, vocab_size=vocab_size)


def lib_merge(ws, out_name, overwrite=False):
    from lmlab.adapters.export import merge_adapter_into
    from lmlab.adapters.inject import AdapterConfig, apply_adapters, save_adapter
    from lmlab.hub import load_model

    base = model_copy(ws, name="base")
    model = load_model(base)
    apply_adapters(model, AdapterConfig())
    save_adapter(model, ws / "adapter")
    out = {"base": base, "adapter": ws / "adapter", "inside": base / "merged"}.get(out_name) or user_dir(ws)
    return lambda: merge_adapter_into(base, ws / "adapter", out, overwrite=overwrite)


def lib_model_config(**fields):
    from lmlab.config import ModelConfig

    return lambda: ModelConfig(**fields)


def lib_train_config(**fields):
    from lmlab.train.config import TrainConfig

    return lambda: TrainConfig(**fields)


# ---- the corpus -----------------------------------------------------------------------------

CASES = [
    # missing, unreadable and wrong-kind paths
    ("shards: missing input", lambda ws, mp: shards(ws, str(ws / "nope.jsonl")), r"does not exist.*nope\.jsonl"),
    ("shards: missing tokenizer", lambda ws, mp: ["shards", "--tokenizer", str(ws / "no.json"), "--out",
                                                  str(ws / "s")], r"tokenizer file not found"),
    ("shards: tokenizer is a directory without one", lambda ws, mp: ["shards", "--tokenizer", user_dir(ws, "d"),
                                                                      "--out", str(ws / "s")],
     r"no tokenizer\.json or tokenizer\.model in"),
    ("shards: tokenizer is not a tokenizer", lambda ws, mp: ["shards", "--tokenizer", write(ws, "t.json", "{oops"),
                                                             "--out", str(ws / "s")], r"not a valid tokenizer\.json"),
    ("shards: --out is a file", lambda ws, mp: shards(ws, str(ws / "assets/corpus.jsonl"),
                                                      out=write(ws, "f.txt", "mine")),
     r"exists and is not a directory"),
    ("shards: --out below a file", lambda ws, mp: shards(ws, str(ws / "assets/corpus.jsonl"),
                                                         out=write(ws, "f.txt", "mine") + "/out"),
     r"cannot write .*f\.txt/out.*(file is in the way|exists)"),
    ("generate: model path missing", lambda ws, mp: gen(ws, ws / "nope"), r"model path does not exist"),
    ("generate: model dir without config", lambda ws, mp: gen(ws, user_dir(ws, "d")), r"no config\.json in"),
    ("generate: config.json is a directory", lambda ws, mp: gen(ws, (model_copy(ws) / "config.json").unlink()
                                                                or (ws / "m/config.json").mkdir() or ws / "m"),
     r"config\.json is a directory"),
    ("tokenize: --out is a directory", lambda ws, mp: ["tokenize", str(ws / "assets/corpus.jsonl"), "--vocab-size",
                                                        "300", "--out", user_dir(ws)], r"is a directory"),
    ("data clean: missing input", lambda ws, mp: ["data", "clean", str(ws / "nope.jsonl"), str(ws / "o.jsonl")],
     r"input not found"),
    # an output that already holds a run or the user's files
    ("shards: --out holds user files", lambda ws, mp: shards(ws, str(ws / "assets/corpus.jsonl"), out=user_dir(ws)),
     r"not empty.*my-notes\.txt.*overwrite"),
    ("shards: --out is the input directory", lambda ws, mp: shards(ws, str(ws / "assets"), out=str(ws / "assets")),
     r"also an input"),
    ("library: shards into their own input", lambda ws, mp: lib_build_shards(ws, ws / "assets", overwrite=True,
                                                                             out=ws / "assets"), r"also an input"),
    ("tokenize: --out is a user file", lambda ws, mp: ["tokenize", str(ws / "assets/corpus.jsonl"), "--vocab-size",
                                                        "300", "--out", write(ws, "notes.txt", "mine")],
     r"notes\.txt already exists.*overwrite"),
    ("convert to-hf: OUT is SRC", lambda ws, mp: ["convert", "to-hf", str(model_copy(ws)), str(ws / "m")],
     r"also an input"),
    ("convert to-hf: OUT inside SRC", lambda ws, mp: ["convert", "to-hf", str(model_copy(ws)), str(ws / "m/hf")],
     r"inside the input"),
    ("convert to-hf: OUT holds user files", lambda ws, mp: ["convert", "to-hf", str(model_copy(ws)), user_dir(ws)],
     r"not empty"),
    ("convert from-hf: OUT is SRC", lambda ws, mp: ["convert", "from-hf", str(model_copy(ws)), str(ws / "m")],
     r"also an input"),
    ("adapter merge: OUT is BASE", lambda ws, mp: ["adapter", "merge", str(model_copy(ws)), str(ws / "ad"),
                                                   str(ws / "m")], r"also an input"),
    ("adapter merge: OUT holds user files", lambda ws, mp: ["adapter", "merge", str(model_copy(ws)), str(ws / "ad"),
                                                            user_dir(ws)], r"not empty"),
    ("world export: OUT holds user files", lambda ws, mp: ["world", "export", "fact", user_dir(ws), "--n", "4"],
     r"not empty.*overwrite"),
    ("world export: OUT is a file", lambda ws, mp: ["world", "export", "fact", write(ws, "f.txt", "x"), "--n", "4"],
     r"not a directory"),
    ("data clean: output is an existing user file", lambda ws, mp: ["data", "clean", str(ws / "assets/corpus.jsonl"),
                                                                    write(ws, "mine.jsonl", '{"text": "keep"}\n')],
     r"mine\.jsonl already exists.*overwrite"),
    ("data clean: output is the input", lambda ws, mp: ["data", "clean", str(ws / "assets/corpus.jsonl"),
                                                        str(ws / "assets/corpus.jsonl")], r"already exists"),
    ("data filter-train: output is a user file", lambda ws, mp: [
        "data", "filter-train", str(ws / "assets/corpus.jsonl"), str(ws / "assets/corpus.jsonl"),
        write(ws, "mine.safetensors", "not a classifier")], r"already exists"),
    ("data mix: output is a user file", lambda ws, mp: ["data", "mix", write(ws, "mine.jsonl", "x\n"), "--source",
                                                        f"a={ws / 'assets/corpus.jsonl'}"], r"already exists"),
    # malformed, truncated or non-UTF-8 JSONL / YAML / JSON / Parquet
    ("shards: malformed JSONL", lambda ws, mp: shards(ws, write(ws, "bad.jsonl", '{"text": "a"}\n{"text": \n')),
     r"bad\.jsonl:2: malformed JSON"),
    ("shards: truncated JSONL", lambda ws, mp: shards(ws, write(ws, "cut.jsonl", '{"text": "a"}\n{"text": "b"}\n'
                                                                                 '{"text": "c')),
     r"cut\.jsonl:3: malformed JSON"),
    ("shards: non-UTF-8 JSONL", lambda ws, mp: shards(ws, write(ws, "latin.jsonl", b'{"text": "ok"}\n'
                                                                                    b'{"text": "caf\xe9"}\n')),
     r"latin\.jsonl:2: not UTF-8"),
    ("shards: JSONL without the text field", lambda ws, mp: shards(ws, write(ws, "f.jsonl", '{"body": "x"}\n')),
     r"f\.jsonl:1: no field 'text'.*body"),
    ("shards: JSONL text is a number", lambda ws, mp: shards(ws, write(ws, "n.jsonl", '{"text": 5}\n')),
     r"n\.jsonl:1: field 'text' is int, not text"),
    ("shards: truncated Parquet", lambda ws, mp: shards(ws, parquet(ws, "cut.parquet", truncate=True)),
     r"cut\.parquet: not a readable Parquet file"),
    ("shards: Parquet that is not Parquet", lambda ws, mp: shards(ws, write(ws, "x.parquet", "just text")),
     r"x\.parquet: not a readable Parquet file"),
    ("shards: Parquet without the column", lambda ws, mp: shards(ws, parquet(ws, "p.parquet"), extra=(
        "--text-field", "body")), r"no column 'body'"),
    ("generate: config.json malformed", lambda ws, mp: gen(ws, write(ws, "m/config.json", '{"format": "lmlab",')
                                                           and ws / "m"), r"config\.json:1: not valid JSON"),
    ("generate: config.json not UTF-8", lambda ws, mp: gen(ws, write(ws, "m/config.json", b'{"name": "\xff"}')
                                                           and ws / "m"), r"config\.json:1: not UTF-8"),
    ("data clean: non-UTF-8 input", lambda ws, mp: ["data", "clean", write(ws, "l.jsonl", b'{"text": "\xe9"}\n'),
                                                    str(ws / "o.jsonl")], r"l\.jsonl:1: not UTF-8"),
    ("data clean: malformed YAML config", lambda ws, mp: ["data", "clean", str(ws / "assets/corpus.jsonl"),
                                                          str(ws / "o.jsonl"), "--config",
                                                          recipe(ws, "clean:\n  a: [1, 2\n")],
     r"bad\.yaml:\d+: not valid YAML"),
    ("data clean: non-UTF-8 YAML config", lambda ws, mp: ["data", "clean", str(ws / "assets/corpus.jsonl"),
                                                          str(ws / "o.jsonl"), "--config",
                                                          write(ws, "bad.yaml", b"clean:\n  x: \xff\n")],
     r"bad\.yaml:2: not UTF-8"),
    ("data clean: YAML object tag", lambda ws, mp: ["data", "clean", str(ws / "assets/corpus.jsonl"),
                                                    str(ws / "o.jsonl"), "--config",
                                                    recipe(ws, f"clean: !!python/object/apply:os.system ['touch {ws}/P']\n")],
     r"bad\.yaml:1: YAML tags that construct objects are not allowed"),
    ("inspect: YAML that is a list", lambda ws, mp: ["inspect", recipe(ws, "- a\n- b\n")], r"mapping at the top level"),
    # wrong types and unknown keys (the nearest valid name suggested)
    ("data clean: unknown config section", lambda ws, mp: ["data", "clean", str(ws / "assets/corpus.jsonl"),
                                                           str(ws / "o.jsonl"), "--config", recipe(ws, "clen: {}\n")],
     r"unknown key curate\.'clen'.*did you mean 'clean'"),
    ("data clean: section of the wrong type", lambda ws, mp: ["data", "clean", str(ws / "assets/corpus.jsonl"),
                                                              str(ws / "o.jsonl"), "--config", recipe(ws, "clean: 5\n")],
     r"curate\.clean must be a mapping"),
    ("inspect: unknown model key", lambda ws, mp: ["inspect", recipe(ws, "model:\n  preset: nano\n  n_layer: 4\n")],
     r"unknown key model\.'n_layer'.*did you mean 'n_layers'"),
    ("inspect: string where an int goes", lambda ws, mp: ["inspect", recipe(ws, "model:\n  preset: nano\n  d_model: big\n")],
     r"model\.d_model must be int"),
    ("inspect: bool where an int goes", lambda ws, mp: ["inspect", recipe(ws, "model:\n  preset: nano\n  n_layers: true\n")],
     r"model\.n_layers must be int"),
    ("inspect: unknown preset", lambda ws, mp: ["inspect", "nanoo"], r"unknown model preset 'nanoo'.*(?i:did you mean) 'nano'"),
    ("generate: unknown key in config.json", lambda ws, mp: gen(ws, edit_config(ws, n_layer=2)),
     r"did you mean 'n_layers'"),
    ("shards: --seq-len not a number", lambda ws, mp: shards(ws, extra=("--seq-len", "abc")), r"invalid int value"),
    # empty and whitespace-only corpora, empty answers, sequences over the context
    ("shards: empty corpus", lambda ws, mp: shards(ws, write(ws, "empty.jsonl", "")), r"corpus is empty"),
    ("shards: whitespace-only corpus", lambda ws, mp: shards(ws, write(ws, "ws.txt", "  \n\t\n   \n")),
     r"corpus is empty: only 1 blank"),
    ("shards: whitespace-only JSONL docs", lambda ws, mp: shards(ws, write(ws, "ws.jsonl", '{"text": " "}\n'
                                                                                         '{"text": "\\n"}\n')),
     r"only 2 blank"),
    ("shards: corpus smaller than one row", lambda ws, mp: shards(ws, write(ws, "tiny.txt", "hi"),
                                                                  extra=("--val-fraction", "0")), r"lower seq_len"),
    ("tokenize: empty corpus", lambda ws, mp: ["tokenize", write(ws, "e.jsonl", ""), "--out", str(ws / "t.json")],
     r"empty corpus"),
    ("tokenize: whitespace-only corpus", lambda ws, mp: ["tokenize", write(ws, "w.txt", " \n \n"), "--out",
                                                          str(ws / "t.json")], r"empty corpus"),
    ("tokenize: vocabulary too small", lambda ws, mp: ["tokenize", "--vocab-size", "10", "--out", str(ws / "t.json")],
     r"vocab_size=10 is too small"),
    ("library: whitespace-only documents", lambda ws, mp: lib_build_shards(ws, ["", "  ", "\n"]), r"only 3 blank"),
    ("library: chat record with an empty answer", lambda ws, mp: lib_chat(
        ws, '{"prompt": "hi", "response": "   "}'), r"chat\.jsonl:1: message 1: empty assistant answer"),
    ("library: chat without an answer", lambda ws, mp: lib_chat(
        ws, '{"messages": [{"role": "user", "content": "hi"}]}'), r"chat\.jsonl:1: no assistant message"),
    ("library: chat JSONL truncated", lambda ws, mp: lib_chat(
        ws, '{"prompt": "a", "response": "b"}', b'{"prompt": "a", "resp'), r"chat\.jsonl:2: malformed JSON"),
    ("library: chat JSONL not UTF-8", lambda ws, mp: lib_chat(
        ws, '{"prompt": "a", "response": "b"}', b'{"prompt": "\xe9", "response": "b"}\n'),
     r"chat\.jsonl:2: not UTF-8"),
    ("library: conversation over the context", lambda ws, mp: lib_encode(ws, max_len=16), r"longer than the context"),
    ("generate: prompt + tokens over the context", lambda ws, mp: gen(ws, None, "--max-new-tokens", "1000"),
     r"exceeds the model's context of 128"),
    # mismatched vocabularies: tokenizer vs model, proxy-tuning members, draft vs target
    ("generate: tokenizer larger than the model", lambda ws, mp: gen(ws, ws / "assets/small-vocab"),
     r"token id \d+, outside the model's vocabulary of 280"),
    ("library: chat tokens past the model's vocabulary", lambda ws, mp: lib_encode(ws, vocab_size=280),
     r"outside the model's vocabulary of 280"),
    ("generate: draft of another vocabulary", lambda ws, mp: gen(ws, None, "--draft", str(ws / "assets/other-vocab")),
     r"draft model's vocabulary .* differs"),
    ("generate: proxy members of another vocabulary", lambda ws, mp: gen(
        ws, None, "--proxy-expert", str(ws / "assets/other-vocab"), "--proxy-anti", str(ws / "assets/model")),
     r"one shared vocabulary"),
    # truncated or shape-mismatched safetensors
    ("generate: truncated model.safetensors", lambda ws, mp: gen(ws, (lambda m: (m / "model.safetensors").write_bytes(
        (m / "model.safetensors").read_bytes()[:1000]) and m)(model_copy(ws))), r"not a readable safetensors file"),
    ("generate: weights of another shape", lambda ws, mp: gen(ws, edit_config(ws, d_model=128, ffn_hidden=344)),
     r"has shape .* but the config implies"),
    ("generate: weights of another depth", lambda ws, mp: gen(ws, edit_config(ws, n_layers=3)),
     r"does not match its config: missing"),
    ("data filter: classifier is not safetensors", lambda ws, mp: [
        "data", "filter", str(ws / "assets/corpus.jsonl"), str(ws / "o.jsonl"), "--classifier",
        write(ws, "c.safetensors", b"\x80\x04garbage")], r"not a readable safetensors file"),
    # absurd sizes, refused before any allocation
    ("inspect: 10^30 layers", lambda ws, mp: ["inspect", recipe(ws, "model:\n  preset: nano\n  n_layers: "
                                                                   + "1" + "0" * 30 + "\n")],
     r"model\.n_layers must be an integer in 1\.\.4,096"),
    ("inspect: d_model 0", lambda ws, mp: ["inspect", recipe(ws, "model:\n  preset: nano\n  d_model: 0\n")],
     r"model\.d_model must be an integer in 1\.\."),
    ("inspect: negative heads", lambda ws, mp: ["inspect", recipe(ws, "model:\n  preset: nano\n  n_heads: -4\n")],
     r"model\.n_heads must be an integer"),
    ("inspect: zero KV heads", lambda ws, mp: ["inspect", recipe(ws, "model:\n  preset: nano\n  n_kv_heads: 0\n")],
     r"model\.n_kv_heads must be an integer"),
    ("generate: config.json with 10^30 layers", lambda ws, mp: gen(ws, edit_config(ws, n_layers=10**30)),
     r"n_layers must be an integer"),
    ("library: vocabulary of 10^12", lambda ws, mp: lib_model_config(vocab_size=10**12), r"vocab_size must be"),
    ("library: NaN norm eps", lambda ws, mp: lib_model_config(norm_eps=float("nan")), r"norm_eps must be a positive"),
    ("library: batch 0", lambda ws, mp: lib_train_config(batch_size=0), r"train\.batch_size must be positive"),
    ("library: negative steps", lambda ws, mp: lib_train_config(steps=-5), r"train\.steps must be positive"),
    ("shards: --seq-len 0", lambda ws, mp: shards(ws, str(ws / "assets/corpus.jsonl"), extra=("--seq-len", "0")),
     r"seq_len must be at least 1"),
    ("world export: --n 1", lambda ws, mp: ["world", "export", "sort", str(ws / "w"), "--n", "1"],
     r"--n must be at least 2"),
    # generation parameters out of range
    ("generate: negative --max-new-tokens", lambda ws, mp: gen(ws, None, "--max-new-tokens", "-1"),
     r"max_new_tokens"),
    ("generate: --top-p -1", lambda ws, mp: gen(ws, None, "--top-p", "-1"), r"top_p"),
    ("generate: --min-p 2", lambda ws, mp: gen(ws, None, "--min-p", "2"), r"min_p"),
    ("generate: --temperature -1", lambda ws, mp: gen(ws, None, "--temperature", "-1"), r"temperature"),
    ("generate: --speculate-k 0", lambda ws, mp: gen(ws, None, "--draft", str(ws / "assets/model"),
                                                     "--speculate-k", "0"), r"k .* must be at least 1"),
    # unreadable, read-only and full-disk destinations
    ("shards: full disk", lambda ws, mp: full_disk(mp) or shards(ws, str(ws / "assets/corpus.jsonl")),
     r"cannot write .*shards.*No space left on device; the disk is full"),
    ("shards: full disk over a previous build", lambda ws, mp: (
        lib_build_shards(ws, CORPUS)(), full_disk(mp), shards(ws, str(ws / "assets/corpus.jsonl")))[-1],
     r"disk is full"),
    ("tokenize: full disk", lambda ws, mp: full_disk(mp) or ["tokenize", str(ws / "assets/corpus.jsonl"),
                                                             "--vocab-size", "300", "--out", str(ws / "t.json")],
     r"cannot write .*t\.json.*disk is full"),
    ("world export: full disk", lambda ws, mp: full_disk(mp) or ["world", "export", "fact", str(ws / "w"), "--n", "4"],
     r"disk is full"),
    ("data clean: full disk", lambda ws, mp: full_disk(mp) or ["data", "clean", str(ws / "assets/corpus.jsonl"),
                                                               str(ws / "o.jsonl")], r"disk is full"),
    ("convert to-hf: full disk", lambda ws, mp: full_disk(mp) or ["convert", "to-hf", str(ws / "assets/model"),
                                                                  str(ws / "hf")], r"disk is full"),
    ("shards: read-only destination", lambda ws, mp: fail_with(mp, "tempfile.mkdtemp", errno.EROFS,
                                                               "Read-only file system")
     or shards(ws, str(ws / "assets/corpus.jsonl")), r"file system is read-only: choose a writable location"),
    ("tokenize: permission denied", lambda ws, mp: fail_with(mp, "tempfile.mkstemp", errno.EACCES,
                                                             "Permission denied")
     or ["tokenize", str(ws / "assets/corpus.jsonl"), "--vocab-size", "300", "--out", str(ws / "t.json")],
     r"Permission denied; permission denied: fix the permissions"),
    ("adapter merge: unwritable destination", lambda ws, mp: fail_with(mp, "tempfile.mkdtemp", errno.EACCES,
                                                                       "Permission denied")
     or ["adapter", "merge", str(ws / "assets/model"), str(ws / "ad"), str(ws / "merged")], r"permission denied"),
    ("library: merge into the base even with overwrite", lambda ws, mp: lib_merge(ws, "base", overwrite=True),
     r"also an input"),
    ("library: merge inside the base", lambda ws, mp: lib_merge(ws, "inside", overwrite=True), r"inside the input"),
    ("library: merge into a user directory", lambda ws, mp: lib_merge(ws, "user"), r"not empty.*overwrite"),
]


def _row(case):
    name, setup, regex, *marks = case
    return pytest.param(setup, regex, id=name, marks=marks)


def test_corpus_size():
    assert len(CASES) >= 40
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("setup,regex", [_row(c) for c in CASES])
def test_hostile_input(setup, regex, assets, tmp_path, monkeypatch, capsys):
    ws = tmp_path / "ws"
    ws.mkdir()
    shutil.copytree(assets, ws / "assets")
    monkeypatch.chdir(ws)
    action = setup(ws, monkeypatch)
    capsys.readouterr()
    before = snapshot(ws)
    if callable(action):
        with pytest.raises(LmlabError) as info:
            action()
        message = str(info.value)
        assert re.search(regex, message), message
    else:
        try:
            rc = main(action)
        except SystemExit as e:  # argparse's own errors (a value of the wrong type)
            rc = e.code
        out, err = capsys.readouterr()
        assert rc not in (0, None), f"exit code {rc}; stderr: {err}"
        assert "Traceback" not in out + err
        errors = re.findall(r"lmlab(?: [\w-]+)*: error: [^\r\n]*", err)  # (progress bars share stderr)
        assert len(errors) == 1, err
        assert re.search(regex, errors[0]), errors[0]
    monkeypatch.undo()  # restore os.fsync & co. before reading the disk back
    after = snapshot(ws)
    assert after == before, f"changed: {sorted(set(after.items()) ^ set(before.items()))[:5]}"
    # no staging or temporary leftovers beside any output either
    assert not [p for p in ws.rglob("*") if ".lmlab-staging-" in p.name or p.name.endswith(".tmp")]
