"""Write a world to disk in the formats users' own data use, so every command runs on worlds
and user data alike:
- `corpus.jsonl`: pretraining text, one `{"id": ..., "text": ...}` document per line (the
  curation tools' document format);
- `sft.jsonl`: chat examples, `{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}`;
- `preferences_<split>.jsonl` (SortWorld): `{"prompt", "chosen", "rejected"}`;
- `eval.jsonl`: held-out prompts (`{"prompt", "base_prompt"}` for SortWorld, whose gold
  reward the evaluator computes; `{"prompt", "answer", "base_prompt"}` for FactWorld's exact
  match). `prompt` is the user turn for chat models; `base_prompt` is the same question in
  the pretraining corpus's format, for base models (and the base side of proxy-tuning);
- `world.json`: the name, seed and settings that regenerate all of it.
The directory is built beside `out_dir` and swapped in when complete; a directory holding
anything but a previous world export is refused unless `overwrite=True`.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterable

from lmlab.errors import LmlabError
from lmlab.io import read_json, staged_dir, write_json_atomic, write_jsonl_atomic
from lmlab.worlds import fact, sort
from lmlab.worlds.labeller import LabellerConfig, SplitConfig, preference_splits

WORLDS = ("sort", "fact")
MANIFEST = "world.json"


def documents(world: str, texts: list[str]) -> Iterable[dict]:
    return ({"id": f"{world}-{i}", "text": t} for i, t in enumerate(texts))


def chat(prompt: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def export_sort(out_dir: Path, seed: int, n: int, sort_cfg: sort.SortConfig = sort.SortConfig(),
                labeller: LabellerConfig = LabellerConfig()) -> dict:
    """`n` SFT prompts; a corpus of n/4 documents (8 examples each), n/10 eval prompts, and
    preference pairs on n + n/4 further prompts. All prompt sets are disjoint."""
    n_corpus, n_eval = 8 * max(1, n // 4), max(1, n // 10)
    split = SplitConfig(n_train_prompts=n, n_ood_prompts=max(1, n // 4))
    tasks = sort.sample_tasks(n_corpus + n + n_eval + split.n_train_prompts + split.n_ood_prompts, seed, sort_cfg)
    corpus, rest = tasks[:n_corpus], tasks[n_corpus:]
    sft, rest = rest[:n], rest[n:]
    evals, pref_tasks = rest[:n_eval], rest[n_eval:]
    docs = sort.corpus_documents(corpus, seed)
    counts = {
        "corpus.jsonl": write_jsonl_atomic(out_dir / "corpus.jsonl", documents("sort", docs)),
        "sft.jsonl": write_jsonl_atomic(out_dir / "sft.jsonl", (chat(t.prompt, t.ideal) for t in sft)),
        "eval.jsonl": write_jsonl_atomic(out_dir / "eval.jsonl",
                                         ({"prompt": t.prompt, "base_prompt": t.base_prompt} for t in evals)),
    }
    for name, prefs in preference_splits(pref_tasks, seed, labeller, split).items():
        counts[f"preferences_{name}.jsonl"] = write_jsonl_atomic(
            out_dir / f"preferences_{name}.jsonl", (dataclasses.asdict(p) for p in prefs))
    return {"sort": dataclasses.asdict(sort_cfg), "labeller": dataclasses.asdict(labeller),
            "splits": dataclasses.asdict(split), "files": counts}


def export_fact(out_dir: Path, seed: int, n: int) -> dict:
    """A FactWorld of `n` keys: corpus, SFT on half the keys, exact-match eval on the rest."""
    cfg = fact.FactConfig(n_keys=n)
    world = fact.make_world(seed, cfg)
    docs = fact.corpus_documents(world, seed, cfg)
    counts = {
        "corpus.jsonl": write_jsonl_atomic(out_dir / "corpus.jsonl", documents("fact", docs)),
        "sft.jsonl": write_jsonl_atomic(out_dir / "sft.jsonl", (chat(q, a) for q, a in world.sft_examples())),
        "eval.jsonl": write_jsonl_atomic(out_dir / "eval.jsonl", (
            {"prompt": q, "answer": a, "base_prompt": b}
            for (q, a), b in zip(world.eval_examples(), world.eval_base_prompts()))),
    }
    return {"fact": dataclasses.asdict(cfg), "files": counts}


def previous_export(out_dir: Path) -> list[str]:
    """The files a finished world export wrote: world.json and the files it lists."""
    try:
        manifest = read_json(out_dir / MANIFEST, "")
        if not isinstance(manifest, dict) or manifest.get("world") not in WORLDS:
            return []
        return [MANIFEST, *manifest["files"]]
    except (LmlabError, KeyError, TypeError):
        return []


def export_world(name: str, out_dir, seed: int = 0, n: int | None = None,
                 labeller: LabellerConfig = LabellerConfig(), overwrite: bool = False) -> dict:
    """Write world `name` under `out_dir`; returns the manifest (also saved as world.json)."""
    out_dir = Path(out_dir)
    if n is not None and n < 2:
        raise LmlabError(f"--n must be at least 2, got {n}")
    if name not in WORLDS:
        raise LmlabError(f"unknown world {name!r}; choose one of {', '.join(WORLDS)}")
    with staged_dir(out_dir, overwrite=overwrite, owned=previous_export, marker=MANIFEST,
                    what="world directory") as staging:
        if name == "sort":
            info = export_sort(staging, seed, 2000 if n is None else n, labeller=labeller)
        else:
            info = export_fact(staging, seed, 200 if n is None else n)
        manifest = {"world": name, "seed": seed, **info}
        write_json_atomic(staging / MANIFEST, manifest)
    return manifest
