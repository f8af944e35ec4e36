"""Outputs built beside their destination: what is replaced, what is kept, what is cleaned."""
from __future__ import annotations

import errno
import json
import os

import pytest

from lmlab.errors import LmlabError
from lmlab.io import STAGING_TAG, atomic_path, os_error_message, staged_dir, write_text_atomic

DOCS = [f"document number {i} " + "word " * (i % 7 + 3) for i in range(40)]


@pytest.fixture(scope="module")
def tok():
    from lmlab.tokenizer import train_tokenizer

    return train_tokenizer(DOCS, 300)


def build(tok, out, **kw):
    from lmlab.data.shards import build_shards

    return build_shards(DOCS, tok, out, seq_len=8, val_fraction=0.0, progress=False, **kw)


def test_rebuild_replaces_a_previous_build_whole(tok, tmp_path):
    first = build(tok, tmp_path / "s", rows_per_shard=4)
    assert len(first["splits"]["train"]["shards"]) > 2
    build(tok, tmp_path / "s", rows_per_shard=10**6)
    names = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert names == ["manifest.json", "train-00000.bin"]  # the stale shards went with the old build
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no staging or old copies left


def test_overwrite_replaces_only_our_files(tok, tmp_path):
    out = tmp_path / "s"
    build(tok, out, rows_per_shard=4)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(LmlabError, match="not empty .*notes.txt"):
        build(tok, out, rows_per_shard=10**6)
    build(tok, out, rows_per_shard=10**6, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "notes.txt", "train-00000.bin"]
    assert (out / "notes.txt").read_text() == "mine"
    from lmlab.data.shards import ShardDataset

    assert len(ShardDataset(out)) == json.loads((out / "manifest.json").read_text())["splits"]["train"]["rows"]


def test_staging_of_a_killed_build_is_removed(tok, tmp_path):
    dead = tmp_path / f".s{STAGING_TAG}999999999-abc"  # no such pid
    alive = tmp_path / f".s{STAGING_TAG}1-abc"  # pid 1 lives: another build in progress
    for d in (dead, alive):
        d.mkdir()
        (d / "train-00000.bin").write_bytes(b"partial")
    build(tok, tmp_path / "s")
    assert not dead.exists() and alive.exists()


def test_failure_inside_the_block_leaves_destination_untouched(tmp_path):
    dest = tmp_path / "d"
    dest.mkdir()
    (dest / "config.json").write_text("old")
    with pytest.raises(RuntimeError):
        with staged_dir(dest, owned=lambda d: ["config.json"]) as stage:
            (stage / "config.json").write_text("new")
            raise RuntimeError("crash mid-build")
    assert (dest / "config.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_files_appearing_during_the_build_are_not_clobbered(tmp_path):
    dest = tmp_path / "d"
    with pytest.raises(LmlabError, match="gained files"):
        with staged_dir(dest) as stage:
            (stage / "a").write_text("ours")
            dest.mkdir()
            (dest / "theirs").write_text("user")
    assert [p.name for p in dest.iterdir()] == ["theirs"]


def test_atomic_write_keeps_the_old_file_on_a_full_disk(tmp_path, monkeypatch):
    path = tmp_path / "f.txt"
    path.write_text("old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(LmlabError, match=r"cannot write .*f\.txt: No space left on device; the disk is full"):
        write_text_atomic(path, "new")
    monkeypatch.undo()
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_os_error_messages_name_the_fix():
    cases = {errno.ENOSPC: "disk is full", errno.EACCES: "permission", errno.EROFS: "read-only",
             errno.EISDIR: "directory is in the way", errno.ENOTDIR: "file is in the way"}
    for code, fix in cases.items():
        msg = os_error_message(OSError(code, os.strerror(code), "/x/y"), "/x")
        assert msg.startswith("cannot write /x: ") and fix in msg and "(/x/y)" in msg


def test_atomic_path_refuses_a_directory(tmp_path):
    with pytest.raises(LmlabError, match="is a directory"):
        with atomic_path(tmp_path):
            pass


def test_tokenizer_save_replaces_tokenizers_only(tok, tmp_path):
    from lmlab.tokenizer import Tokenizer

    path = tmp_path / "tokenizer.json"
    tok.save(path)
    tok.save(path)  # a tokenizer may replace a tokenizer
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(LmlabError, match="already exists"):
        tok.save(tmp_path / "notes.txt")
    tok.save(tmp_path / "notes.txt", overwrite=True)
    assert Tokenizer.load(tmp_path / "notes.txt").vocab_size == tok.vocab_size


def test_world_export_reexports_but_keeps_user_files_only_when_asked(tmp_path):
    from lmlab.worlds.export import export_world

    export_world("fact", tmp_path / "w", n=4)
    export_world("fact", tmp_path / "w", n=6)  # a previous export is replaced without asking
    assert json.loads((tmp_path / "w" / "world.json").read_text())["fact"]["n_keys"] == 6
    (tmp_path / "w" / "mine.txt").write_text("x")
    with pytest.raises(LmlabError, match="not empty"):
        export_world("fact", tmp_path / "w", n=4)
    export_world("fact", tmp_path / "w", n=4, overwrite=True)
    assert (tmp_path / "w" / "mine.txt").read_text() == "x"


def test_convert_and_merge_outputs(tmp_path):
    import torch

    from lmlab.adapters.export import merge_adapter_into
    from lmlab.adapters.inject import AdapterConfig, apply_adapters, save_adapter
    from lmlab.checkpoint import save_model
    from lmlab.hub import load_model
    from lmlab.config import get_preset
    from lmlab.interop.hf import convert_to_hf
    from lmlab.model.transformer import build_model

    base = save_model(build_model(get_preset("nano")), tmp_path / "base")
    model = load_model(base)
    apply_adapters(model, AdapterConfig())
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    save_adapter(model, tmp_path / "ad")
    out = tmp_path / "merged"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    merge_adapter_into(base, tmp_path / "ad", out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    merged, plain = load_model(out), load_model(base)
    ids = torch.arange(10)[None]
    assert not torch.equal(merged(ids), plain(ids))  # the adapter is in it, the base untouched
    convert_to_hf(base, tmp_path / "hf")
    with pytest.raises(LmlabError, match="not empty"):
        convert_to_hf(base, tmp_path / "hf")
    convert_to_hf(base, tmp_path / "hf", overwrite=True)
    assert (tmp_path / "hf" / "config.json").is_file()


def test_curate_refuses_to_replace_and_overwrites_when_asked(tmp_path):
    from lmlab.data.curate import CurateConfig, curate

    out = tmp_path / "o.jsonl"
    out.write_text('{"text": "mine"}\n')
    docs = [{"id": str(i), "text": t} for i, t in enumerate(DOCS)]
    with pytest.raises(LmlabError, match="already exists"):
        curate(docs, out, CurateConfig(clean=None, quality=None))
    assert out.read_text() == '{"text": "mine"}\n'
    curate(docs, out, CurateConfig(clean=None, quality=None), overwrite=True)
    assert "mine" not in out.read_text()
