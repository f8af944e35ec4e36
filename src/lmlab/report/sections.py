"""The report's sections about the run itself: configuration and timings, loss curves,
sample generations, one section per stage directory found (its marker, summaries,
metrics and artifacts) and an experiment's own results. Each builder returns a Section,
or None when its artifacts are absent."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lmlab.report import figures
from lmlab.report.artifacts import HEAVY_DIRS, METRICS, Run, Stage
from lmlab.report.html import details, esc, fmt, image, link, markdown, note, para, pre, table
from lmlab.report.tables import is_number, json_tables

MAX_PANELS = 12  # metric plots per stage
MAX_LOSS_PANELS = 12
MAX_TEXT_BYTES = 100_000  # text artifacts shown inline
MAX_PNG_BYTES = 2_000_000  # an experiment's own plots embedded
MAX_LINKS = 60
# Keys plotted first when a stage logs more than fit.
PRIORITY = ("loss", "val_loss", "reward", "gold", "kl", "kl_ref", "accuracy", "val_accuracy", "margin",
            "val_margin", "lr", "grad_norm", "tokens_per_s", "entropy", "clip_frac", "value_loss", "length")
NOT_PLOTTED = {"step", "tokens", "epoch", "elapsed_s"}


@dataclass
class Section:
    anchor: str
    title: str
    body: str


def _seconds(marker: dict | None) -> float | None:
    s = (marker or {}).get("seconds")
    return float(s) if is_number(s) else None


# ----------------------------------------------------------------------------- overview
def overview(run: Run) -> Section | None:
    if run.info is None and run.recipe_text is None and not run.stages:
        return None
    parts = []
    listed = [str(n) for n in (run.info or {}).get("stages", [])]
    names = listed + [s.name for s in run.stages if s.name not in listed]
    rows, timed = [], []
    for name in names:
        stage = run.stage(name)
        if stage is None:
            rows.append((name, "not started", None, None, None))
            continue
        m = stage.marker
        status = ("complete" if m is not None else "writing this page" if name == "report"
                  else "incomplete (no stage.json: running, failed or killed)")
        secs = _seconds(m)
        rows.append((name, status, secs, (m or {}).get("finished"), (m or {}).get("hash")))
        if secs is not None:
            timed.append((name, secs))
    if rows:
        total = sum(s for _, s in timed)
        parts.append(table(("stage", "status", "seconds", "finished", "settings hash"), rows,
                           caption=f"{sum(1 for r in rows if r[1] == 'complete')} of {len(rows)} stages complete; "
                                   f"{total:.1f} s in the completed stages"))
    if timed:
        parts.append(image(figures.timing_bars(timed), "wall time per stage"))
    precision = []
    for stage in run.stages:
        first = next((r for r in run.metrics(stage) if "precision" in r), None)
        if first is not None:
            precision.append((stage.name, first.get("precision"), first.get("precision_reason")))
    if precision:
        parts.append("<h3>Precision</h3>" + table(("stage", "precision", "why"), precision))
    if run.recipe_text is not None:
        parts.append("<h3>Recipe</h3>" + para("The recipe after --set overrides (recipe.yaml):")
                     + details("recipe.yaml", pre(run.recipe_text)))
    links = [link(n) for n in ("run.json", "recipe.yaml") if (run.root / n).is_file()]
    if links:
        parts.append(f"<p>Files: {' '.join(links)}</p>")
    return Section("overview", "Configuration and timings", "".join(parts))


# -------------------------------------------------------------------------- loss curves
def loose_metrics(run: Run) -> list[Stage]:
    """Training runs that are not stages (an experiment's `seed0/large-base/metrics.jsonl`):
    directories up to three levels down with a metrics.jsonl, outside stages and nested
    runs. Wrapped as pseudo-stages so the same readers apply."""
    stage_dirs = {s.path for s in run.stages}
    found: list[Stage] = []

    def walk(d: Path, depth: int) -> None:
        for child in sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if child in stage_dirs or child.name in HEAVY_DIRS or (child / "run.json").is_file():
                continue
            if (child / METRICS).is_file():
                found.append(Stage(child.relative_to(run.root).as_posix(), child, None, False))
            if depth < 3:
                walk(child, depth + 1)

    walk(run.root, 1)
    return found


def losses(run: Run) -> Section | None:
    curves = []
    for stage in [*run.stages, *loose_metrics(run)]:
        records = run.metrics(stage)
        if any(r.get("loss") is not None for r in records):
            curves.append((stage.name, records))
    if not curves:
        return None
    shown = curves[:MAX_LOSS_PANELS]
    body = para("Training loss per optimizer step (line) and held-out loss (points) for every stage that "
                "trains; each objective has its own scale, so each stage has its own panel.")
    body += image(figures.loss_panels(shown), "loss curves: " + ", ".join(n for n, _ in shown))
    rows = []
    for name, records in curves:
        train = [r["loss"] for r in records if is_number(r.get("loss"))]
        val = [r["val_loss"] for r in records if is_number(r.get("val_loss"))]
        rows.append((name, records[-1]["step"], train[0] if train else None, train[-1] if train else None,
                     val[-1] if val else None))
    body += table(("stage", "last step", "first loss", "last loss", "last val loss"), rows)
    if len(curves) > len(shown):
        body += note(f"{len(curves) - len(shown)} more run(s) not plotted: "
                     + ", ".join(n for n, _ in curves[len(shown):]))
    return Section("losses", "Loss curves", body)


# --------------------------------------------------------------------------- samples
def _jsonl_head(path: Path, n: int) -> list[dict]:
    out = []
    try:
        with path.open(encoding="utf-8", errors="replace") as f:
            for line in f:
                if len(out) >= n:
                    break
                try:
                    value = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(value, dict):
                    out.append(value)
    except OSError:
        pass
    return out


def _examples(obj) -> list[dict]:
    """Prompt/answer records anywhere in a summary (`examples`, `samples`)."""
    found = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in ("examples", "samples") and isinstance(v, list) and v and all(
                    isinstance(x, dict) and "prompt" in x for x in v):
                found += v
            elif isinstance(v, (dict, list)):
                found += _examples(v)
    elif isinstance(obj, list):
        for v in obj[:50]:
            found += _examples(v)
    return found


def _answer_of(record: dict):
    for key in ("answer", "completion", "response", "text", "output"):
        if isinstance(record.get(key), str):
            return record[key]
    return None


POLICY_ORDER = ("sft", "rejection", "ppo", "grpo", "rloo", "dpo")


def _side_by_side(obj) -> tuple[list[str], list[list]] | None:
    """(headers, rows) of a summary's `policies: {name: {examples: [{prompt, answer}]}}`: one
    row per prompt, one column per policy in lifecycle order."""
    policies = obj.get("policies") if isinstance(obj, dict) else None
    if not isinstance(policies, dict):
        return None
    names = sorted((n for n, v in policies.items() if isinstance(v, dict) and _examples(v)),
                   key=lambda n: (POLICY_ORDER.index(n) if n in POLICY_ORDER else len(POLICY_ORDER), n))
    if not names:
        return None
    answers = {n: {e.get("prompt"): _answer_of(e) for e in _examples(policies[n])} for n in names}
    prompts = list(dict.fromkeys(e.get("prompt") for e in _examples(policies[names[0]])))[:6]
    return ["prompt", *names], [[p, *(answers[n].get(p) for n in names)] for p in prompts]


def samples(run: Run) -> Section | None:
    parts = []
    for stage in run.stages:
        blocks = []
        txt = stage.path / "samples.txt"
        if txt.is_file() and txt.stat().st_size <= MAX_TEXT_BYTES:
            texts = [t for t in txt.read_text(encoding="utf-8", errors="replace").split("\n\n") if t.strip()]
            blocks += [pre(t.strip("\n"), "sample") for t in texts[:8]]
        for where, obj in run.summaries(stage).items():
            side = _side_by_side(obj)
            if side is not None:  # the eval stage: every policy's answer to the same prompts
                blocks.append(table(side[0], side[1], caption=f"greedy answers of each policy, from {stage.name}/{where}"))
                continue
            ex = _examples(obj)[:6]
            if ex:
                blocks.append(table(("prompt", "answer"), [(e.get("prompt"), _answer_of(e)) for e in ex],
                                    caption=f"from {stage.name}/{where}"))
        for path in sorted(stage.path.glob("samples*.jsonl")):
            rows = []
            for rec in _jsonl_head(path, 5):
                answers = rec.get("answers")
                if isinstance(answers, list) and answers:
                    best = next((a for a in answers if isinstance(a, dict) and a.get("best")), answers[0])
                    if isinstance(best, dict):
                        rows.append((rec.get("prompt"), best.get("text"), best.get("reward"), best.get("gold"),
                                     len(answers)))
                elif "prompt" in rec:
                    rows.append((rec.get("prompt"), _answer_of(rec), rec.get("reward"), rec.get("gold"), 1))
            if rows:
                blocks.append(table(("prompt", "chosen answer", "reward", "gold", "samples"), rows,
                                    caption=f"from {run.rel(path)}"))
        if blocks:
            parts.append(f"<h3>After {esc(stage.name)}</h3>" + "".join(blocks))
    if not parts:
        return None
    return Section("samples", "Sample generations",
                   note("Generated text, shown as written (escaped; never interpreted).") + "".join(parts))


# ------------------------------------------------------------------------ one stage
def numeric_keys(records: list[dict]) -> list[str]:
    counts: dict[str, int] = {}
    for r in records:
        for k, v in r.items():
            if is_number(v) and k not in NOT_PLOTTED:
                counts[k] = counts.get(k, 0) + 1
    keys = [k for k, c in counts.items() if c >= 2]
    order = {k: i for i, k in enumerate(PRIORITY)}
    return sorted(keys, key=lambda k: (order.get(k, len(order)), k))


def _size(path: Path) -> str:
    n = path.stat().st_size
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def artifact_links(run: Run, directory: Path) -> str:
    entries = sorted((p for p in directory.iterdir() if not p.name.startswith(".")),
                     key=lambda p: (not p.is_dir(), p.name))
    items = []
    for p in entries[:MAX_LINKS]:
        rel = run.rel(p) + ("/" if p.is_dir() else "")
        size = "" if p.is_dir() else f" <span class=\"note\">({esc(_size(p))})</span>"
        items.append(f"<li>{link(rel)}{size}</li>")
    more = note(f"{len(entries) - MAX_LINKS} more entries") if len(entries) > MAX_LINKS else ""
    return f'<ul class="files">{"".join(items)}</ul>{more}' if items else ""


def stage_section(run: Run, stage: Stage) -> Section:
    parts = []
    m = stage.marker
    if m is not None:
        parts.append(f'<p><span class="badge">complete</span> in {esc(fmt(_seconds(m)))} s, finished '
                     f'{esc(m.get("finished", "?"))}, settings hash <code>{esc(m.get("hash", "?"))}</code></p>')
    else:
        parts.append('<p><span class="badge bad">incomplete</span> no stage.json: the stage is running, '
                     "failed or was killed; what it wrote so far is below</p>")
    for name, obj in run.summaries(stage).items():
        parts.append(f"<h3>{esc(name)}</h3>" + json_tables(obj))
    records = run.metrics(stage)
    keys = numeric_keys(records)
    if keys:
        shown = keys[:MAX_PANELS]
        parts.append(f"<h3>{esc(METRICS)}</h3>" + para(f"{len(records)} records up to step {records[-1]['step']}.")
                     + image(figures.metric_panels(records, shown), f"{stage.name} metrics: " + ", ".join(shown)))
        if len(keys) > len(shown):
            parts.append(note("Not plotted: " + ", ".join(keys[len(shown):])))
    for path in sorted([*stage.path.glob("*.txt"), *stage.path.glob("*.md")]):
        if path.stat().st_size <= MAX_TEXT_BYTES:
            parts.append(details(path.name, pre(path.read_text(encoding="utf-8", errors="replace"))))
    links = artifact_links(run, stage.path)
    if links:
        parts.append("<h3>Artifacts</h3>" + links)
    return Section(f"stage-{stage.name}", f"Stage: {stage.name}", "".join(parts))


# ------------------------------------------------------------------ experiment output
def nested_runs(run: Run) -> list[Path]:
    """Run directories inside this one (an experiment's per-seed pipeline runs)."""
    found: list[Path] = []
    stage_dirs = {s.path for s in run.stages}

    def walk(d: Path, depth: int) -> None:
        for child in sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if child in stage_dirs or child.name in HEAVY_DIRS:
                continue
            if (child / "run.json").is_file():
                found.append(child)
            elif depth < 3:
                walk(child, depth + 1)

    walk(run.root, 1)
    return found


def experiment_results(run: Run) -> Section | None:
    from lmlab.report.results import RESULTS_JSON, is_results

    # An experiment.json is the "Claim and verdict" section and its results.md (every seed)
    # is shown here, so the JSON itself is not tabulated a second time.
    unified = is_results(run.json(run.root / RESULTS_JSON))
    parts = []
    for path in sorted(run.root.glob("*.md")):
        if path.stat().st_size <= MAX_TEXT_BYTES:
            parts.append(f"<h3>{esc(path.name)}</h3>"
                         + markdown(path.read_text(encoding="utf-8", errors="replace")))
    for path in sorted(run.root.glob("*.png")):
        if path.stat().st_size <= MAX_PNG_BYTES:
            parts.append(f"<h3>{esc(path.name)}</h3>" + image(path.read_bytes(), path.name))
        else:
            parts.append(para(f"{path.name}: too large to embed; ") + link(path.name))
    for name, obj in run.top_level_json().items():
        if unified and name == RESULTS_JSON:
            continue
        parts.append(details(f"{name} (every value)", json_tables(obj)))
    nested = nested_runs(run)
    if nested:
        items = []
        for d in nested:
            rel = run.rel(d)
            target = f"{rel}/report.html" if (d / "report.html").is_file() else f"{rel}/"
            items.append(f"<li>{link(target, rel)}</li>")
        parts.append("<h3>Runs inside this directory</h3>"
                     + para("Each is a pipeline run; `lmlab report` on it gives it its own page.")
                     + f'<ul class="files">{"".join(items)}</ul>')
    if not parts:
        return None
    return Section("results", "Experiment results", "".join(parts))


__all__ = ["Section", "artifact_links", "experiment_results", "losses", "overview", "samples", "stage_section"]
