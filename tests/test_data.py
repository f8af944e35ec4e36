import json

import numpy as np
import pytest

from lmlab.data.corpus import embedded_corpus_texts
from lmlab.data.shards import ShardDataset, build_shards, is_validation, token_dtype
from lmlab.data.sources import read_texts
from lmlab.errors import LmlabError
from lmlab.tokenizer import SPECIAL_TOKENS, Tokenizer, train_tokenizer

DOCS = [f"Document {i}: the quick brown fox jumps over the lazy dog {i * 7}. " * (1 + i % 5) for i in range(60)]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(DOCS * 3, vocab_size=400)


def unpack(ds):
    """The split's token stream: rows overlap by one token."""
    if len(ds) == 0:
        return []
    stream = ds[0].tolist()
    for i in range(1, len(ds)):
        stream += ds[i].tolist()[1:]
    return stream


def test_embedded_corpus_is_real_text():
    texts = embedded_corpus_texts()
    assert len(texts) > 100 and 2_000_000 < sum(map(len, texts)) < 5_000_000
    assert any("Python" in t for t in texts)


def test_tokenizer_round_trip_and_special_ids(tok):
    text = "Héllo, wörld!\n\tcode: x = [1, 2]  # ünïcode ✓"
    assert tok.decode(tok.encode(text)) == text
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    ids = tok.encode("fox", add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id


def test_vocab_too_small_names_minimum():
    with pytest.raises(LmlabError, match="at least 263"):
        train_tokenizer(DOCS, vocab_size=100)


def test_empty_corpus_tokenizer():
    with pytest.raises(LmlabError, match="empty corpus"):
        train_tokenizer([], vocab_size=400)


def test_loader_matches_tokenizers_library_directly(tmp_path):
    from tokenizers import Tokenizer as Raw
    from tokenizers import models, pre_tokenizers, trainers

    raw = Raw(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(DOCS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    raw.save(str(tmp_path / "tokenizer.json"))
    ours = Tokenizer.load(tmp_path)
    text = "the lazy dog jumps 42"
    assert ours.encode(text) == raw.encode(text, add_special_tokens=False).ids
    assert (ours.bos_id, ours.eos_id) == (raw.token_to_id("<s>"), raw.token_to_id("</s>"))


def test_sentencepiece_model_matches_sentencepiece(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(DOCS))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "m"), vocab_size=120,
                                   model_type="bpe", minloglevel=2)
    ref = spm.SentencePieceProcessor(model_file=str(tmp_path / "m.model"))
    ours = Tokenizer.load(tmp_path / "m.model")
    text = "the quick brown fox 17"
    assert ours.encode(text) == ref.encode(text)
    assert ours.decode(ours.encode(text)) == ref.decode(ref.encode(text))
    assert ours.vocab_size == 120 and ours.eos_id == ref.eos_id()
    ours.save(tmp_path / "copy.model")
    assert Tokenizer.load(tmp_path / "copy.model").encode(text) == ref.encode(text)


def test_shard_round_trip_reproduces_documents(tok, tmp_path):
    manifest = build_shards(DOCS, tok, tmp_path, seq_len=16, val_fraction=0.2, rows_per_shard=7, progress=False)
    for split in ("train", "val"):
        ds = ShardDataset(tmp_path, split)
        assert all(row.shape == (17,) for row in (ds[0], ds[len(ds) - 1]))
        pieces = tok.decode(unpack(ds)).split("<|eos|>")
        expected = [d for d in DOCS if is_validation(d, 0.2) == (split == "val")]
        # every complete document of the split, in order; the last one may be cut short
        assert pieces[:-1] == expected[:len(pieces) - 1]
        assert (expected + [""])[len(pieces) - 1].startswith(pieces[-1])
        assert manifest["splits"][split]["rows"] == len(ds)
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"] == len(DOCS)
    assert len(manifest["splits"]["train"]["shards"]) > 1  # exercised shard boundaries


def test_shards_are_exactly_the_token_stream(tok, tmp_path):
    build_shards(DOCS, tok, tmp_path, seq_len=10, val_fraction=0.0, rows_per_shard=3, progress=False)
    expected = [i for d in DOCS for i in tok.encode(d) + [tok.eos_id]]
    stream = unpack(ShardDataset(tmp_path))
    assert stream == expected[:len(stream)]
    assert len(expected) - len(stream) < 10  # only the tail that fills no row is dropped


def test_split_is_deterministic_and_content_based(tok, tmp_path):
    a = build_shards(DOCS, tok, tmp_path / "a", seq_len=8, val_fraction=0.3, progress=False)
    b = build_shards(list(reversed(DOCS)), tok, tmp_path / "b", seq_len=8, val_fraction=0.3, progress=False)
    assert a["splits"]["val"]["documents"] == b["splits"]["val"]["documents"] > 0
    assert a["splits"]["val"]["tokens"] == b["splits"]["val"]["tokens"]


def test_dtype_follows_vocab_size():
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_jsonl_and_parquet_sources(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "one"}) + "\n\n" + json.dumps({"body": "two"}) + "\n")
    pq.write_table(pa.table({"body": ["three", "four"]}), tmp_path / "b.parquet")
    assert list(read_texts(tmp_path, text_field="body")) == ["one", "two", "three", "four"]


def test_hf_datasets_directory(tmp_path):
    import pyarrow as pa

    table = pa.table({"text": ["alpha", "beta"]})
    with pa.OSFile(str(tmp_path / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    (tmp_path / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    assert list(read_texts(tmp_path)) == ["alpha", "beta"]


def test_malformed_jsonl_names_the_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(LmlabError, match=r"bad.jsonl:2: malformed JSON"):
        list(read_texts(tmp_path / "bad.jsonl"))
    (tmp_path / "field.jsonl").write_text('{"content": "x"}\n')
    with pytest.raises(LmlabError, match=r"field.jsonl:1: no field 'text'.*content"):
        list(read_texts(tmp_path / "field.jsonl"))


def test_empty_and_tiny_corpus(tok, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(LmlabError, match="empty"):
        build_shards(tmp_path / "empty.jsonl", tok, tmp_path / "out", seq_len=8, progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()
    with pytest.raises(LmlabError, match="lower seq_len"):
        build_shards(["hi"], tok, tmp_path / "out2", seq_len=64, val_fraction=0.0, progress=False)


def test_missing_paths(tmp_path):
    with pytest.raises(LmlabError, match="does not exist"):
        list(read_texts(tmp_path / "nope"))
    with pytest.raises(LmlabError, match="lmlab shards"):
        ShardDataset(tmp_path)
