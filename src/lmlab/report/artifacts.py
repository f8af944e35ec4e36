"""What a run directory holds, read from disk alone and never trusted: the report must
build from a finished run, a half-done one (a torn last metrics line, a stage without its
marker) and an experiment's output directory alike, so an unreadable file becomes a note
in the report instead of an error."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MARKER = "stage.json"  # lmlab.pipeline.MARKER (not imported: the report reads, the pipeline runs)
RUN_FILE = "run.json"
METRICS = "metrics.jsonl"
# Larger JSON files are left out (a report must stay quick to build and small to open).
MAX_JSON_BYTES = 20_000_000
# JSON files that are models' and tokenizers' own configuration, never run summaries.
NOT_SUMMARIES = {MARKER, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json",
                 "generation_config.json", "vocab.json", "added_tokens.json"}
MAX_SUMMARY_BYTES = 1_000_000  # a stage's larger JSON files are linked, not tabulated
# Directories of a stage that hold weights or checkpoints, never summaries to tabulate.
HEAVY_DIRS = {"model", "checkpoints", "adapter", "value", "hf", "gguf"}
# The order stages are shown in when run.json does not give one.
LIFECYCLE = ("tokenizer", "shards", "pretrain", "sample", "world", "sft", "reward", "rewards", "warm", "ens",
             "rejection", "ppo", "grpo", "rloo", "dpo", "proxy", "eval", "export")


@dataclass
class Stage:
    name: str
    path: Path
    marker: dict | None  # stage.json, or None: the stage is running, failed or was killed
    listed: bool  # named in run.json's stage list

    @property
    def complete(self) -> bool:
        return self.marker is not None


@dataclass
class Run:
    root: Path
    info: dict | None  # run.json
    recipe_text: str | None  # recipe.yaml as written
    stages: list[Stage]
    notes: list[str] = field(default_factory=list)  # files that could not be read, and why
    _json: dict[Path, Any] = field(default_factory=dict, repr=False)
    _metrics: dict[Path, list[dict]] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ reading, tolerant
    def rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def json(self, path: Path) -> Any | None:
        """The JSON value of `path`, or None (absent, too large or malformed: noted)."""
        if path in self._json:
            return self._json[path]
        value = None
        if path.is_file():
            try:
                if path.stat().st_size > MAX_JSON_BYTES:
                    self.notes.append(f"{self.rel(path)}: larger than {MAX_JSON_BYTES:,} bytes, left out")
                else:
                    value = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                self.notes.append(f"{self.rel(path)}: unreadable ({type(e).__name__}: {e}), left out")
        self._json[path] = value
        return value

    def metrics(self, stage: Stage) -> list[dict]:
        """The stage's metrics.jsonl records; malformed lines (a line torn by a kill) skipped."""
        path = stage.path / METRICS
        if path in self._metrics:
            return self._metrics[path]
        records: list[dict] = []
        bad = 0
        if path.is_file():
            try:
                lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
            except OSError as e:
                self.notes.append(f"{self.rel(path)}: unreadable ({e}), left out")
                lines = []
            for line in lines:
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    bad += 1
                    continue
                if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
                    records.append(record)
                else:
                    bad += 1
        if bad:
            self.notes.append(f"{self.rel(path)}: {bad} malformed line(s) skipped")
        self._metrics[path] = records
        return records

    def summaries(self, stage: Stage) -> dict[str, Any]:
        """The stage's own *.json files (its reports), by file name; the marker excluded."""
        out = {}
        for path in sorted(stage.path.glob("*.json")):
            if path.name not in NOT_SUMMARIES and path.stat().st_size <= MAX_SUMMARY_BYTES:
                value = self.json(path)
                if value is not None:
                    out[path.name] = value
        return out

    def stage(self, name: str) -> Stage | None:
        return next((s for s in self.stages if s.name == name), None)

    def top_level_json(self) -> dict[str, Any]:
        """The run directory's own JSON files (an experiment's results.json), run.json excluded."""
        out = {}
        for path in sorted(self.root.glob("*.json")):
            if path.name != RUN_FILE:
                value = self.json(path)
                if value is not None:
                    out[path.name] = value
        return out

    def all_json(self) -> list[tuple[str, Any]]:
        """(where, value) for every summary the report reads: top level, then each stage."""
        found = [(name, v) for name, v in self.top_level_json().items()]
        for s in self.stages:
            found += [(f"{s.name}/{name}", v) for name, v in self.summaries(s).items()]
        return found


def _read_marker(path: Path, notes: list[str], root: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        notes.append(f"{path.relative_to(root).as_posix()}: torn or unreadable ({type(e).__name__}); "
                     "the stage counts as incomplete")
        return None
    return value if isinstance(value, dict) else None


def read_run(root: str | Path) -> Run:
    """Everything the report needs to know about `root`: run.json, the recipe, and the stage
    directories (those with a marker, and those run.json names, finished or not), in the
    run's order."""
    root = Path(root)
    notes: list[str] = []
    info = None
    if (root / RUN_FILE).is_file():
        try:
            info = json.loads((root / RUN_FILE).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            notes.append(f"{RUN_FILE}: unreadable ({type(e).__name__}), left out")
    if not isinstance(info, dict):
        info = None
    recipe_text = None
    if (root / "recipe.yaml").is_file():
        try:
            recipe_text = (root / "recipe.yaml").read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            notes.append(f"recipe.yaml: unreadable ({e}), left out")
    listed = [str(n) for n in (info or {}).get("stages", []) if isinstance(n, str)]
    names = [d.name for d in root.iterdir() if d.is_dir() and (d / MARKER).is_file()]
    names += [n for n in listed if (root / n).is_dir() and n not in names]
    order = {n: i for i, n in enumerate([*listed, *(n for n in LIFECYCLE if n not in listed)])}
    names.sort(key=lambda n: (order.get(n, len(order)), n))
    stages = [Stage(n, root / n, _read_marker(root / n / MARKER, notes, root), n in listed) for n in names]
    return Run(root, info, recipe_text, stages, notes)
