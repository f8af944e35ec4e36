"""Gold worlds: rewards pinned on hand-made answers, the labeller's noise measured against
its analytic rates, KL against an exact categorical KL, reproducibility from the seed."""
from __future__ import annotations

import ast
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from lmlab.cli import main
from lmlab.errors import LmlabError
from lmlab.worlds import fact, sort
from lmlab.worlds.evaluate import exact_match, kl_estimate, plot_reward_vs_kl, reward_kl_point, sort_rewards
from lmlab.worlds.export import export_world
from lmlab.worlds.labeller import LabellerConfig, SplitConfig, label_pairs, preference_splits

SRC = Path(__file__).resolve().parents[1] / "src" / "lmlab"
S = ("d", "a", "c", "b")  # ideal answer "a b c d"


# ---- gold reward on hand-made answers (values worked out from the documented formula) ----

@pytest.mark.parametrize("answer, ended, dense, sparse", [
    ("a b c d", True, 1.0, 1.0),                     # perfect
    ("a b d", True, 0.5 * 0.75 + 0.3 * 3 / 6 + 0.2, 0.0),  # missing c: C=3/4, O=3/6
    ("a c b d", True, 0.5 + 0.3 * 5 / 6 + 0.2, 0.0),  # b/c swapped: 5 of 6 pairs in order
    ("d c b a", True, 0.5 + 0.0 + 0.2, 0.0),          # reversed: no pair in order
    ("a b um c d", True, 0.9, 0.0),                   # one filler
    ("a b b c d", True, 0.9, 0.0),                    # one repeat
    ("a b c d x", True, 0.9, 0.0),                    # a foreign symbol
    ("a b c d", False, 0.8, 0.0),                     # no EOS
    ("", True, 0.2, 0.0),                             # empty answer that ends
    ("a b c d <|end|>", None, 1.0, 1.0),              # END marker in text = ended
    ("a b c d", None, 0.8, 0.0),                      # no marker = did not end
    ("a b c d <|end|> um um", None, 1.0, 1.0),        # text after END is never generated
])
def test_gold_reward_pinned(answer, ended, dense, sparse):
    assert sort.gold_reward(S, answer, ended) == pytest.approx(dense, abs=1e-12)
    assert sort.gold_reward_sparse(S, answer, ended) == sparse


def test_sort_rewards_reads_finish_reasons():
    prompts = ["sort: d a c b"] * 2
    out = sort_rewards(prompts, ["a b c d", "a b c d"], ["eos", "length"])
    assert out["gold_dense"] == pytest.approx([1.0, 0.8])
    assert out["gold_sparse"] == [1.0, 0.0]
    with pytest.raises(LmlabError, match="SortWorld prompt"):
        sort_rewards(["sort me"], ["a"])
    with pytest.raises(LmlabError, match="one of each"):
        sort_rewards(prompts, ["a"])


def test_edits_do_what_they_say():
    rng = random.Random(0)
    assert sort.apply_edit(["a", "b", "c"], "filler", rng).count(sort.FILLER) == 1
    assert len(sort.apply_edit(["a", "b", "c"], "drop", rng)) == 2
    assert sorted(sort.apply_edit(["a", "b", "c"], "swap", rng)) == ["a", "b", "c"]
    assert len(set(sort.apply_edit(["a", "b", "c"], "repeat", rng))) == 3
    with pytest.raises(LmlabError, match="unknown edit"):
        sort.apply_edit(["a"], "shuffle", rng)


# ---- labeller: flip rate and cue strength on 10k pairs, against analytic values ----

def _sigmoid(z):
    return 1.0 / (1.0 + math.exp(-z))


def _pairs_with(edit_tokens, n=10_000, seed=0):
    """n pairs (task, x, y) where the edited answer is first or second at random; returns
    the pairs and, for each, the edited answer."""
    rng = random.Random(seed)
    tasks = sort.sample_tasks(n, seed=seed)
    pairs, edited = [], []
    for t in tasks:
        base = sorted(t.symbols)
        other = " ".join(edit_tokens(base, rng))
        ideal = " ".join(base)
        pairs.append((t, other, ideal) if rng.random() < 0.5 else (t, ideal, other))
        edited.append(other)
    return pairs, edited


@pytest.mark.parametrize("flip", [0.0, 0.25])
def test_flip_rate_matches_setting(flip):
    # Dropping a symbol costs 0.275 of gold reward; at temperature 0.01 the clean labeller
    # is certain, so every label that prefers the dropped answer is a flip.
    cfg = LabellerConfig(temperature=0.01, length_weight=0.0, filler_weight=0.0, flip_rate=flip)
    pairs, edited = _pairs_with(lambda b, rng: b[:1] + b[2:])
    prefs = label_pairs(pairs, cfg, seed=1)
    rate = np.mean([p.chosen == e for p, e in zip(prefs, edited)])
    se = math.sqrt(flip * (1 - flip) / len(prefs))
    assert abs(rate - flip) <= 4 * se + 1e-12


def test_filler_cue_strength_matches_setting():
    # One filler: gold -0.1, cues +length_weight +filler_weight -> score difference +0.05.
    w_len, w_fill, temp, flip = 0.05, 0.1, 0.1, 0.1
    cfg = LabellerConfig(temperature=temp, length_weight=w_len, filler_weight=w_fill, flip_rate=flip)
    n_fill = {}

    def add_fillers(base, rng):
        k = rng.randint(1, 3)
        out = list(base)
        for _ in range(k):
            out.insert(rng.randrange(len(out) + 1), sort.FILLER)
        n_fill[" ".join(out)] = k
        return out

    pairs, edited = _pairs_with(add_fillers, seed=2)
    prefs = label_pairs(pairs, cfg, seed=3)
    won = np.array([p.chosen == e for p, e in zip(prefs, edited)], dtype=float)
    p_clean = np.array([_sigmoid(n_fill[e] * (-0.1 + w_len + w_fill) / temp) for e in edited])
    expected = (1 - flip) * p_clean + flip * (1 - p_clean)
    se = math.sqrt(np.sum(expected * (1 - expected))) / len(won)
    assert abs(won.mean() - expected.mean()) <= 4 * se
    assert won.mean() > 0.6  # the labeller really does like padding that the gold reward charges


def test_length_weight_recovered_from_labels():
    # Repeating a symbol: gold -0.1, length cue +w. Invert the measured win rate back to w.
    w_true, temp, flip = 0.2, 0.1, 0.25
    cfg = LabellerConfig(temperature=temp, length_weight=w_true, filler_weight=0.0, flip_rate=flip)
    pairs, edited = _pairs_with(lambda b, rng: b[:1] + b, seed=4)
    prefs = label_pairs(pairs, cfg, seed=5)
    q = np.mean([p.chosen == e for p, e in zip(prefs, edited)])
    p = (q - flip) / (1 - 2 * flip)
    w_hat = temp * math.log(p / (1 - p)) + 0.1
    p_true = _sigmoid((w_true - 0.1) / temp)
    q_true = flip + (1 - 2 * flip) * p_true
    se_w = temp * math.sqrt(q_true * (1 - q_true) / len(prefs)) / (1 - 2 * flip) / (p_true * (1 - p_true))
    assert abs(w_hat - w_true) <= 4 * se_w


def test_preference_splits_are_disjoint_and_shifted():
    tasks = sort.sample_tasks(500, seed=0)
    splits = preference_splits(tasks, seed=0, split=SplitConfig(n_train_prompts=400, n_ood_prompts=100))
    prompts = {k: {p.prompt for p in v} for k, v in splits.items()}
    assert not (prompts["train"] & prompts["test_id"] or prompts["train"] & prompts["test_ood"]
                or prompts["test_id"] & prompts["test_ood"])
    assert all(p.chosen != p.rejected for v in splits.values() for p in v)

    def mean_gold(prefs):
        return np.mean([sort.gold_reward(sort.parse_prompt(p.prompt).symbols, a, True)
                        for p in prefs for a in (p.chosen, p.rejected)])

    assert mean_gold(splits["test_ood"]) < mean_gold(splits["test_id"]) - 0.1  # the hot policy is worse


# ---- FactWorld ----

def test_fact_world_structure():
    cfg = fact.FactConfig(n_keys=200)
    world = fact.make_world(0, cfg)
    assert set(world.sft_keys).isdisjoint(world.heldout_keys)
    assert len(world.sft_keys) + len(world.heldout_keys) == 200
    docs = fact.corpus_documents(world, 0, cfg)
    text = "\n".join(docs)
    assert all(fact.statement(k, v) in text for k, v in world.facts.items())
    lines = text.split("\n")
    answers = [lines[i + 1] for i, line in enumerate(lines) if line.startswith("question:")]
    answered = np.mean([a.removeprefix("answer: ") in fact.VALUES for a in answers])
    se = math.sqrt(cfg.p_answer * (1 - cfg.p_answer) / len(answers))
    assert abs(answered - cfg.p_answer) <= 4 * se
    assert [a for _, a in world.eval_examples()] == [world.facts[k] for k in world.heldout_keys]


def test_exact_match():
    assert exact_match(["Red.", " blue<|end|>junk", "green\nmore", "red"], ["red", "blue", "green", "blue"]) == 0.75
    with pytest.raises(LmlabError):
        exact_match(["a"], [])


# ---- evaluator: KL and plot ----

def test_kl_estimate_matches_exact_categorical_kl():
    rng = np.random.default_rng(0)
    p = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
    q = np.array([0.2, 0.2, 0.2, 0.2, 0.2])
    toks = rng.choice(5, size=(20_000, 3), p=p)  # 3 i.i.d. tokens per sample
    mean, se = kl_estimate(np.log(p)[toks], np.log(q)[toks])
    exact = 3 * float(np.sum(p * np.log(p / q)))
    assert abs(mean - exact) <= 4 * se
    assert kl_estimate([[-1.0, -2.0]], [[-1.0, -2.0]])[0] == 0.0
    with pytest.raises(LmlabError, match="same generated tokens"):
        kl_estimate([[-1.0]], [[-1.0, -2.0]])


def test_reward_kl_point():
    pt = reward_kl_point(["sort: b a", "sort: b a"], ["a b", "b a um"], ["eos", "length"], [1.0, 3.0],
                         [[-0.5, -0.5], [-1.0]], [[-1.0, -1.0], [-1.0]])
    # gold: 1.0 and 0.5*1 + 0 + 0 - 0.1 = 0.4; KL samples: 1.0 and 0.0
    assert pt == pytest.approx({"kl": 0.5, "kl_se": 0.5, "gold": 0.7, "gold_sparse": 0.5, "proxy": 2.0})


def test_plot_is_written_atomically(tmp_path):
    out = tmp_path / "hack.png"
    plot_reward_vs_kl([{"kl": 0.0, "gold": 0.8, "proxy": 1.0}, {"kl": 2.0, "gold": 0.5, "proxy": 3.0}], out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [f.name for f in tmp_path.iterdir()] == ["hack.png"]
    with pytest.raises(LmlabError, match="missing"):
        plot_reward_vs_kl([{"kl": 0.0, "gold": 0.8}], out)


# ---- reproducibility and export ----

def _files(d: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(d.iterdir())}


@pytest.mark.parametrize("name", ["sort", "fact"])
def test_export_reproducible_from_seed(tmp_path, name):
    a = _files(Path(export_world(name, tmp_path / "a", seed=7, n=40) and tmp_path / "a"))
    b = _files(Path(export_world(name, tmp_path / "b", seed=7, n=40) and tmp_path / "b"))
    c = _files(Path(export_world(name, tmp_path / "c", seed=8, n=40) and tmp_path / "c"))
    assert a == b
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a)


def test_export_formats(tmp_path):
    assert main(["world", "export", "sort", str(tmp_path), "--n", "40", "--flip-rate", "0.25"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "sft.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and [m["role"] for m in rows[0]["messages"]] == ["user", "assistant"]
    pref = json.loads((tmp_path / "preferences_train.jsonl").read_text().splitlines()[0])
    assert set(pref) == {"prompt", "chosen", "rejected"}
    assert "text" in json.loads((tmp_path / "corpus.jsonl").read_text().splitlines()[0])
    manifest = json.loads((tmp_path / "world.json").read_text())
    assert manifest["labeller"]["flip_rate"] == 0.25
    # held-out prompts never appear in training files
    eval_rows = [json.loads(x) for x in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert all(r["base_prompt"] == r["prompt"] + "\nanswer:" for r in eval_rows)
    eval_prompts = {r["prompt"] for r in eval_rows}
    corpus = [json.loads(x)["text"] for x in (tmp_path / "corpus.jsonl").read_text().splitlines()]
    seen = {line for doc in corpus for line in doc.split("\n") if line.startswith("sort:")}
    seen |= {r["messages"][0]["content"] for r in rows}
    assert len(seen) == 8 * 10 + 40 and not eval_prompts & seen
    assert main(["world", "export", "sort", str(tmp_path), "--flip-rate", "0.7"]) == 2
    with pytest.raises(LmlabError, match="unknown world"):
        export_world("maze", tmp_path)


def test_sample_tasks_reproducible_and_distinct():
    assert sort.sample_tasks(50, 1) == sort.sample_tasks(50, 1)
    assert sort.sample_tasks(50, 1) != sort.sample_tasks(50, 2)
    assert len(set(sort.sample_tasks(500, 3))) == 500
    with pytest.raises(LmlabError, match="distinct"):
        sort.sample_tasks(10_000, 0, sort.SortConfig(n_symbols=4, min_len=2, max_len=3))


# ---- the gold reward stays hidden from training code ----

GOLD_NAMES = {"gold_reward", "gold_reward_sparse", "reward_parts"}
MAY_SEE_GOLD = {"worlds/sort.py", "worlds/labeller.py", "worlds/evaluate.py"}


def test_only_labeller_and_evaluator_import_the_gold_reward():
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lmlab.worlds"):
                assert not rel.startswith(("train/", "data/", "model/", "adapters/", "decode/")), rel
                assert rel in MAY_SEE_GOLD or not {a.name for a in node.names} & GOLD_NAMES, rel
            if isinstance(node, ast.Import):
                assert rel.startswith("worlds/") or not any(a.name.startswith("lmlab.worlds") for a in node.names), rel
            if isinstance(node, ast.Attribute) and node.attr in GOLD_NAMES:
                assert rel in MAY_SEE_GOLD, f"{rel} reaches the gold reward"
