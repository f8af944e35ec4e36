"""Curation report arithmetic, the learned filter, mixtures, noise injection and the CLI."""
import json
import random

import numpy as np
import pytest

from lmlab.cli import main
from lmlab.data.curate import (CleanConfig, CurateConfig, LearnedFilterConfig, MixtureSource, NoiseConfig,
                               QualityClassifier, StepReport, TrainConfig, curate, curate_config, filter_learned,
                               inject_noise, mix, read_documents, train_classifier, write_documents)
from lmlab.errors import LmlabError

rng = random.Random(0)
NOUNS = "river town bridge market farmer winter school museum mill valley road forest".split()
VERBS = "crosses builds visits keeps follows opens watches carries".split()


def sentence(r):
    return f"The {r.choice(NOUNS)} {r.choice(VERBS)} the {r.choice(NOUNS)} and the {r.choice(NOUNS)} of the {r.choice(NOUNS)}."


def clean_texts(n, seed=0):
    r = random.Random(seed)
    return [" ".join(sentence(r) for _ in range(r.randint(4, 8))) for _ in range(n)]


def test_report_counts_add_up_and_match_the_output(tmp_path):
    docs = inject_noise(clean_texts(120), NoiseConfig(seed=1))
    out = tmp_path / "out.jsonl"
    report = curate(docs, out, CurateConfig(clean=CleanConfig(boilerplate_min_docs=5)))
    d = report.to_dict()
    assert d["input"] == len(docs)
    assert d["kept"] == sum(1 for _ in open(out))
    assert d["input"] == d["kept"] + sum(d["removed"].values())
    for prev, step in zip(d["steps"], d["steps"][1:]):
        assert step["input"] == prev["kept"]
    for step in d["steps"]:
        assert step["input"] == step["kept"] + sum(step["removed"].values())
    # the injected noise is what goes: no random-character document, no boilerplate, one copy
    # of each text (which copy survives is the smallest-key rule's choice, not the original's)
    survivors = [x for x in read_documents(out)]
    assert not [x for x in survivors if x["noise"] == "random_chars"]
    assert not any("Accept all cookies" in x["text"] for x in survivors)
    assert len({x["text"] for x in survivors}) == len(survivors)


def test_noise_injector_counts_and_labels():
    texts = clean_texts(100)
    docs = inject_noise(texts, NoiseConfig(duplicate_fraction=0.2, boilerplate_fraction=0.3, shuffled_fraction=0.1,
                                           random_fraction=0.05, seed=3))
    labels = [d["noise"] for d in docs]
    assert labels.count("boilerplate") == 30 and labels.count("clean") == 70
    assert labels.count("exact_duplicate") == 10 and labels.count("near_duplicate") == 10
    assert labels.count("shuffled") == 10 and labels.count("random_chars") == 5
    shuffled = next(d for d in docs if d["noise"] == "shuffled")["text"].split()
    assert any(sorted(shuffled) == sorted(t.split()) for t in texts)
    assert docs == inject_noise(texts, NoiseConfig(duplicate_fraction=0.2, boilerplate_fraction=0.3,
                                                   shuffled_fraction=0.1, random_fraction=0.05, seed=3))


def shuffled(text, r):
    ws = text.split()
    r.shuffle(ws)
    return " ".join(ws)


def test_learned_filter_separates_good_from_shuffled_and_round_trips(tmp_path):
    good = clean_texts(300, seed=1)
    r = random.Random(2)
    bad = [shuffled(t, r) for t in clean_texts(300, seed=2)]
    clf = train_classifier(good, bad, TrainConfig(epochs=5))
    test_good = clean_texts(100, seed=3)
    test_bad = [shuffled(t, r) for t in clean_texts(100, seed=4)]
    acc = ((clf.scores(test_good) >= 0.5).sum() + (clf.scores(test_bad) < 0.5).sum()) / 200
    assert acc > 0.9  # word bigrams see the shuffling that unigram counts cannot
    clf.save(tmp_path / "q.safetensors")
    back = QualityClassifier.load(tmp_path / "q.safetensors")
    np.testing.assert_allclose(back.scores(test_bad), clf.scores(test_bad), rtol=0, atol=0)
    docs = [{"id": str(i), "text": t} for i, t in enumerate(test_good + test_bad)]
    step = StepReport("learned")
    kept = list(filter_learned(docs, back, LearnedFilterConfig(model="x", keep_top_fraction=0.25), step))
    assert len(kept) == 50 and step.removed["low_classifier_score"] == 150
    scores = back.scores([d["text"] for d in docs])
    assert min(k["quality"] for k in kept) >= np.sort(scores)[-50] - 1e-6


def test_classifier_logit_is_mean_of_bucket_weights():
    import torch

    from lmlab.data.curate.classifier import features

    w = torch.arange(1 << 6, dtype=torch.float32) / 100
    clf = QualityClassifier(w, torch.tensor(-0.3), ngrams=2, bits=6)
    text = "one two three two"
    f = features(text, 2, 6)
    assert float(clf.logits([text])[0]) == pytest.approx(float(w[f].mean()) - 0.3, abs=1e-6)


def test_classifier_load_rejects_other_files(tmp_path):
    from safetensors.torch import save_file
    import torch

    save_file({"weight": torch.zeros(3)}, str(tmp_path / "m.safetensors"))
    with pytest.raises(LmlabError, match="not an lmlab quality classifier"):
        QualityClassifier.load(tmp_path / "m.safetensors")


def test_mixture_proportions_match_weights():
    def endless(tag):
        def gen():
            i = 0
            while True:
                i += 1
                yield f"{tag} {i}"
        return gen

    weights = {"a": 0.6, "b": 0.3, "c": 0.1}
    sources = [MixtureSource(k, endless(k), w, epochs=None) for k, w in weights.items()]
    n = 6000
    docs = list(mix(sources, seed=0, max_docs=n))
    for k, w in weights.items():
        frac = sum(d["source"] == k for d in docs) / n
        assert abs(frac - w) < 4 * np.sqrt(w * (1 - w) / n), (k, frac)
    assert docs == list(mix(sources, seed=0, max_docs=n))
    assert docs != list(mix(sources, seed=1, max_docs=n))


def test_mixture_epochs_and_exhaustion():
    small = MixtureSource("small", lambda: [{"id": f"s{i}", "text": f"s {i}"} for i in range(5)], 10.0, epochs=3)
    big = MixtureSource("big", lambda: (f"b {i}" for i in range(40)), 1.0, epochs=1)
    docs = list(mix([small, big], seed=4))
    assert sum(d["source"] == "small" for d in docs) == 15 and sum(d["source"] == "big" for d in docs) == 40
    assert sorted(d["epoch"] for d in docs if d["id"] == "s2") == [0, 1, 2]
    # the heavy source comes out first, then the other one fills the tail
    assert sum(d["source"] == "small" for d in docs[:20]) > 10
    with pytest.raises(LmlabError, match="max_docs"):
        next(mix([MixtureSource("g", lambda: iter(["x"]), 1.0, epochs=None)]))


def test_reader_errors_name_the_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(LmlabError, match="bad.jsonl:2: malformed JSON"):
        list(read_documents(p))
    p.write_text('{"body": "no text"}\n')
    with pytest.raises(LmlabError, match="'text' field"):
        list(read_documents(p))


def test_config_typos_are_errors():
    with pytest.raises(LmlabError, match="did you mean 'threshold'"):
        curate_config({"dedup": {"treshold": 0.5}})
    cfg = curate_config({"quality": None, "dedup": {"threshold": 0.7}})
    assert cfg.quality is None and cfg.dedup.threshold == 0.7 and cfg.clean == CleanConfig()


def test_cli_curate_dedup_filter_mix(tmp_path, capsys):
    docs = inject_noise(clean_texts(60), NoiseConfig(seed=2))
    src = tmp_path / "in.jsonl"
    write_documents(src, docs)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("clean:\n  boilerplate_min_docs: 3\ndedup:\n  threshold: 0.7\n")
    assert main(["data", "curate", str(src), str(tmp_path / "o.jsonl"), "--config", str(cfg),
                 "--report", str(tmp_path / "r.json")]) == 0
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["input"] == len(docs) and rep["kept"] == sum(1 for _ in open(tmp_path / "o.jsonl"))
    assert main(["data", "dedup", str(src), str(tmp_path / "d.jsonl"), "--no-near"]) == 0
    distinct = len({" ".join(d["text"].lower().replace(".", " ").split()) for d in docs})
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["removed"] == {
        "dedup.exact_duplicate": len(docs) - distinct}
    assert main(["data", "mix", str(tmp_path / "m.jsonl"), "--source", f"a={src}:1:2", "--source",
                 f"b={tmp_path / 'd.jsonl'}:3"]) == 0
    n_d = sum(1 for _ in open(tmp_path / "d.jsonl"))
    assert sum(1 for _ in open(tmp_path / "m.jsonl")) == 2 * len(docs) + n_d
    assert main(["data", "filter", str(tmp_path / "missing.jsonl"), str(tmp_path / "x.jsonl")]) == 2


def test_full_pipeline_with_learned_filter_removes_shuffled_documents(tmp_path):
    r = random.Random(5)
    clf = train_classifier(clean_texts(300, seed=6), [shuffled(t, r) for t in clean_texts(300, seed=7)],
                           TrainConfig(epochs=5))
    clf.save(tmp_path / "q.safetensors")
    docs = inject_noise(clean_texts(150, seed=8), NoiseConfig(shuffled_fraction=0.2, seed=9))
    cfg = curate_config({"clean": {"boilerplate_min_docs": 5}, "quality": None, "learned": {"model": str(tmp_path / "q.safetensors")}})
    report = curate(docs, tmp_path / "o.jsonl", cfg).to_dict()
    assert [s["step"] for s in report["steps"]] == ["clean", "dedup", "learned"]
    assert report["input"] == report["kept"] + sum(report["removed"].values())
    survivors = list(read_documents(tmp_path / "o.jsonl"))
    n_shuffled = sum(d["noise"] == "shuffled" for d in docs)
    assert sum(d["noise"] == "shuffled" for d in survivors) <= 0.1 * n_shuffled
    assert sum(d["noise"] in ("clean", "boilerplate") for d in survivors) >= 0.8 * 150


def test_removal_by_label_counts():
    from lmlab.data.curate.noise import removal_by_label

    docs = [{"id": "a", "noise": "clean"}, {"id": "b", "noise": "clean"}, {"id": "c", "noise": "shuffled"}]
    assert removal_by_label(docs, {"a"}) == {"clean": {"input": 2, "kept": 1, "removed_fraction": 0.5},
                                            "shuffled": {"input": 1, "kept": 0, "removed_fraction": 1.0}}
