"""The recipe runner behind `lmlab run` and `lmlab pretrain`.

A recipe lists stages; each stage (a module of `lmlab.stages`) reads its inputs from the
directories of the stages it needs and writes its outputs under `run_dir/<stage>/`, with a
completion marker `stage.json` written last. Stages never hand each other live objects, so
any stage can run alone on what is on disk:

    run_dir/tokenizer/   tokenizer.json
    run_dir/shards/      manifest.json + memory-mapped shards
    run_dir/pretrain/    metrics.jsonl, checkpoints/, model/, loss.png
    ...

The marker records a hash of the stage's configuration and of everything upstream, so
`--resume` skips a completed stage whose inputs and settings are unchanged, reruns one
whose settings changed, and continues a half-done stage from its own last checkpoint.
`--only`, `--from` and `--skip` choose the stages to run; the others must be complete.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from lmlab.config import from_mapping, load_yaml
from lmlab.errors import LmlabError
from lmlab.io import read_json, write_json_atomic, write_text_atomic
from lmlab.stages.common import DataConfig, referenced_stage
from lmlab.train.config import TrainConfig, apply_overrides

MARKER = "stage.json"
RUN_FILE = "run.json"
# Stage name -> the module that implements it: NEEDS, SECTIONS (the recipe sections it
# reads, hashed into its marker), run(ctx), and optionally CONFIG = (section, dataclass[,
# default factory]) for a recipe section of its own. Adding a stage is one line here.
STAGE_MODULES = {
    "curate": "lmlab.stages.curate",
    "tokenizer": "lmlab.stages.tokenizer",
    "shards": "lmlab.stages.shards",
    "pretrain": "lmlab.stages.pretrain",
    "sample": "lmlab.stages.sample",
    "world": "lmlab.stages.world",
    "sft": "lmlab.stages.sft",
    "eval": "lmlab.stages.eval",
    "dpo": "lmlab.stages.dpo",
    "rejection": "lmlab.stages.rejection",
    "ppo": "lmlab.stages.ppo",
    "grpo": "lmlab.stages.grpo",
    "rloo": "lmlab.stages.rloo",
    "reward": "lmlab.stages.reward",
    "warm": "lmlab.stages.warm",
    "proxy": "lmlab.stages.proxy",
    "export": "lmlab.stages.export",
    "report": "lmlab.stages.report",
}


def stage_module(name: str):
    if name not in STAGE_MODULES:
        raise LmlabError(f"unknown pipeline stage {name!r}; known: {', '.join(STAGE_MODULES)}")
    return importlib.import_module(STAGE_MODULES[name])


def _stage_sections() -> dict[str, tuple[type, Callable[[], Any]]]:
    """Recipe section -> (dataclass, default factory), from the stages' CONFIG."""
    out = {}
    for name in STAGE_MODULES:
        config = getattr(stage_module(name), "CONFIG", None)
        if config is not None:
            section, cls, *factory = config
            out[section] = (cls, factory[0] if factory else cls)
    return out


# Sections shared by several stages (data: tokenizer and shards; model and train: pretrain,
# and sample/eval read train's precision), then one per stage that owns a config.
_SHARED = [("name", str, field(default="run")),
           ("stages", tuple[str, ...], field(default=("tokenizer", "shards", "pretrain", "sample"))),
           ("data", DataConfig, field(default_factory=DataConfig)),
           # a preset name or mapping; resolved once the vocabulary is known
           ("model", Any, field(default="micro")),
           ("train", TrainConfig, field(default_factory=TrainConfig))]
Recipe = dataclasses.make_dataclass(
    "Recipe", _SHARED + [(s, cls, field(default_factory=f)) for s, (cls, f) in _stage_sections().items()],
    frozen=True)
Recipe.__module__ = __name__
Recipe.__doc__ = "A run's settings: shared sections plus one section per configurable stage."
SECTIONS = {"data": DataConfig, "train": TrainConfig, **{s: cls for s, (cls, _) in _stage_sections().items()}}
RECIPES = Path(__file__).parent / "recipes"
DEFAULT_RECIPE = RECIPES / "default.yaml"


def packaged_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def recipe_path(path: str | Path | None) -> Path:
    """A recipe file, or the name of a packaged one (`default`, `quick`, `llama3-chain`, ...)."""
    if path is None:
        return DEFAULT_RECIPE
    p = Path(path)
    if not p.exists() and p.suffix == "" and p.name == str(path) and (RECIPES / f"{p.name}.yaml").is_file():
        return RECIPES / f"{p.name}.yaml"
    if not p.exists() and p.suffix == "" and p.name == str(path):
        raise LmlabError(f"no recipe file {path!r} and no packaged recipe of that name; packaged: "
                         f"{', '.join(packaged_recipes())} (or give a .yaml path)")
    return p


def load_recipe(path: str | Path | None = None, overrides: list[str] = ()) -> tuple[Recipe, dict]:
    """The recipe at `path` (a file, or a packaged recipe's name; default: the packaged
    default) with `--set` overrides applied; returns the frozen recipe and the merged mapping
    (saved into the run directory)."""
    raw = load_yaml(recipe_path(path))
    merged = apply_overrides(raw, list(overrides), SECTIONS)
    if "model" in merged and isinstance(merged["model"], Mapping):
        from lmlab.config import ModelConfig, _unknown_key_error

        valid = {f.name for f in dataclasses.fields(ModelConfig)} | {"preset"}
        for key in merged["model"]:
            if key not in valid:
                raise _unknown_key_error(key, sorted(valid), "model")
    recipe = from_mapping(Recipe, merged, where="recipe")
    unknown = [n for n in recipe.stages if n not in STAGE_MODULES]
    if unknown:
        raise LmlabError(f"unknown pipeline stage(s) {unknown}; known: {', '.join(STAGE_MODULES)}")
    check_order(recipe)
    return recipe, merged


def with_precision(value: Any, precision: str) -> Any:
    """`value` (the recipe, or any settings dataclass in it) with every `precision` setting
    replaced: `lmlab run --precision float32` runs each stage as an AVX2-only CPU would."""
    from lmlab.precision import parse

    parse(precision)  # refuse an unknown name before anything changes
    if not dataclasses.is_dataclass(value):
        return value
    changes = {}
    for f in dataclasses.fields(value):
        current = getattr(value, f.name)
        if f.name == "precision" and isinstance(current, str):
            changes[f.name] = precision
        elif dataclasses.is_dataclass(current):
            changes[f.name] = with_precision(current, precision)
    return dataclasses.replace(value, **changes) if changes else value


def check_order(recipe: Recipe) -> None:
    """Refuse a recipe whose stage names, by a run-relative path, a stage listed after it."""
    for k, name in enumerate(recipe.stages):
        mod = stage_module(name)
        named = [n for s in mod.SECTIONS for n in run_references(getattr(recipe, s), recipe.stages)]
        later = [n for n in named if n in recipe.stages[k + 1:]]
        if later:
            raise LmlabError(f"stage {name!r} reads the outputs of {', '.join(map(repr, later))}, listed after it in "
                             f"`stages:`; move {name!r} after {later[-1]!r}")


@dataclass
class StageContext:
    """What a stage gets: its own output directory and the directories of the stages it
    reads from (all on disk), the recipe, and whether to continue a half-done run."""
    name: str
    run_dir: Path
    recipe: Recipe
    resume: bool = False
    echo: Callable[[str], None] = print

    @property
    def out(self) -> Path:
        return self.run_dir / self.name

    def input(self, stage: str) -> Path:
        return self.run_dir / stage


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# Settings that change how a stage reports, never what it computes: left out of the hash.
UNHASHED = {"progress", "log_every"}


def _strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in UNHASHED}
    return value


def run_references(value: Any, stages: tuple[str, ...]) -> list[str]:
    """The stages a section's settings name by a path inside the run, in first-seen order:
    `ppo.policy: rejection/model` or `ppo.reward.paths: [warm/model]` read those stages'
    outputs, so the stage runs after them and reruns when they do."""
    found: list[str] = []

    def visit(v: Any) -> None:
        if isinstance(v, dict):
            for x in v.values():
                visit(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                visit(x)
        else:
            head = referenced_stage(v, stages)
            if head is not None and head not in found:
                found.append(head)

    visit(_jsonable(value))
    return found


def stage_needs(mod, recipe: Recipe) -> tuple[str, ...]:
    """The stages a stage reads: its NEEDS, those of its USES that the recipe runs (e.g. the
    tokenizer reads curate's output when curation is in the run), and those its settings
    name by a run-relative path (`run_references`)."""
    named = [n for s in mod.SECTIONS for n in run_references(getattr(recipe, s), recipe.stages)]
    own = mod.__name__.rsplit(".", 1)[-1]
    needs = [*mod.NEEDS, *(n for n in getattr(mod, "USES", ()) if n in recipe.stages), *named]
    return tuple(dict.fromkeys(n for n in needs if n != own))


def stage_hashes(recipe: Recipe) -> dict[str, str]:
    """Per stage: a hash of its recipe sections and of the hashes of the stages it reads."""
    hashes: dict[str, str] = {}

    def visit(name: str) -> str:  # upstream first, whatever order STAGE_MODULES lists them in
        if name not in hashes:
            mod = stage_module(name)
            own = {s: _strip(_jsonable(getattr(recipe, s))) for s in mod.SECTIONS}
            upstream = {n: visit(n) for n in stage_needs(mod, recipe)}
            text = json.dumps({"stage": name, "config": own, "upstream": upstream}, sort_keys=True)
            hashes[name] = hashlib.sha256(text.encode()).hexdigest()[:16]
        return hashes[name]

    for name in STAGE_MODULES:
        visit(name)
    return hashes


def stage_done(run_dir: Path, name: str) -> dict | None:
    path = run_dir / name / MARKER
    if not path.is_file():
        return None
    try:
        return read_json(path, "")
    except LmlabError:
        return None  # a torn marker: the stage is not complete


def select_stages(recipe: Recipe, only: tuple[str, ...] = (), start: str | None = None,
                  skip: tuple[str, ...] = ()) -> list[str]:
    names = list(recipe.stages)
    for n in (*only, *skip, *([start] if start else [])):
        if n not in names:
            raise LmlabError(f"stage {n!r} is not in this recipe's stages ({', '.join(names)})")
    if only:
        names = [n for n in names if n in only]
    if start:
        names = names[names.index(start):]
    return [n for n in names if n not in skip]


@dataclass
class RunResult:
    run_dir: Path
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def path(self, stage: str) -> Path:
        return self.run_dir / stage


def _holds_other_files(run_dir: Path) -> bool:
    return run_dir.is_dir() and any(run_dir.iterdir())


def stage_cost(name: str, recipe: Recipe) -> float:
    """A stage's rough amount of work (its module's `cost(recipe)`; 0 for the quick ones)."""
    cost = getattr(stage_module(name), "cost", None)
    return float(cost(recipe)) if cost is not None else 0.0


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


@dataclass
class RunClock:
    """The whole run's elapsed and remaining time for the stage headers: the seconds per
    unit of work measured on this machine by the stages run so far, times the work left."""
    costs: dict[str, float]
    done_cost: float = 0.0
    done_seconds: float = 0.0

    def __post_init__(self) -> None:
        self.left = dict(self.costs)

    def skipped(self, name: str) -> None:
        self.left.pop(name, None)

    def finished(self, name: str, seconds: float) -> None:
        cost = self.left.pop(name, 0.0)
        if cost > 0:
            self.done_cost += cost
            self.done_seconds += seconds

    def remaining(self) -> float | None:
        if self.done_cost <= 0:
            return None
        return self.done_seconds / self.done_cost * sum(self.left.values())

    def status(self, elapsed: float) -> str:
        left = self.remaining()
        return f" · {_duration(elapsed)} elapsed" + (f" · about {_duration(left)} left" if left is not None else "")


def run_pipeline(recipe: Recipe, run_dir: str | Path, *, resume: bool = False,
                 only: tuple[str, ...] = (), start: str | None = None, skip: tuple[str, ...] = (),
                 raw: Mapping[str, Any] | None = None, echo: Callable[[str], None] = print,
                 stages: tuple[str, ...] | None = None) -> RunResult:
    """Run the recipe's stages (or the chosen ones) into `run_dir`.

    resume: skip completed stages whose settings are unchanged, continue a half-done one.
    only / start / skip: run just these / from this one on / all but these; the stages not
        run must already be complete in `run_dir` where a chosen stage reads from them.
    stages: replaces the recipe's stage list (a library shortcut, e.g. for `lmlab pretrain`).
    """
    run_dir = Path(run_dir)
    if stages is not None:
        recipe = dataclasses.replace(recipe, stages=tuple(stages))
        for n in recipe.stages:
            stage_module(n)
    chosen = select_stages(recipe, only, start, skip)
    forced = bool(only or start)  # named stages rerun even when complete
    is_run = (run_dir / RUN_FILE).is_file()
    # Checked before any stage runs, so a mistaken rerun overwrites nothing.
    if not resume and not forced and _holds_other_files(run_dir):
        what = "a run" if is_run else "files that are not an lmlab run"
        raise LmlabError(f"{run_dir} already holds {what}: pass --resume to continue it, "
                         "or choose another --run-dir")
    if forced and not resume and _holds_other_files(run_dir) and not is_run:
        raise LmlabError(f"{run_dir} holds files that are not an lmlab run; choose another --run-dir")
    hashes = stage_hashes(recipe)
    for name in chosen:
        for need in stage_needs(stage_module(name), recipe):
            if need not in chosen and stage_done(run_dir, need) is None:
                raise LmlabError(f"stage {name!r} reads the outputs of {need!r}, which is not complete in "
                                 f"{run_dir}; run it too (drop --only/--skip, or start --from {need})")
    run_dir.mkdir(parents=True, exist_ok=True)
    if raw is not None:
        import yaml

        write_text_atomic(run_dir / "recipe.yaml", yaml.safe_dump(dict(raw), sort_keys=False))
    write_json_atomic(run_dir / RUN_FILE, {"name": recipe.name, "stages": list(recipe.stages)})

    result = RunResult(run_dir)
    t_run = time.perf_counter()
    clock = RunClock({n: stage_cost(n, recipe) for n in chosen})
    for k, name in enumerate(chosen, 1):
        done = stage_done(run_dir, name)
        rerun_named = forced and (not only or name in only)
        # A stage that summarises the others (the report) is cheap and never up to date.
        always = getattr(stage_module(name), "ALWAYS_RUN", False)
        if done is not None and done.get("hash") == hashes[name] and not rerun_named and not always:
            echo(f"== [{k}/{len(chosen)}] {name}: complete, settings unchanged (skipped)")
            result.skipped.append(name)
            clock.skipped(name)
            continue
        out = run_dir / name
        fresh = done is not None or rerun_named or not resume
        header = f"== [{k}/{len(chosen)}] {name}{clock.status(time.perf_counter() - t_run)}"
        if fresh and out.exists():
            why = "its settings changed" if done is not None and done.get("hash") != hashes[name] else "asked to rerun"
            echo(f"{header}: {why}; replacing its previous outputs")
            shutil.rmtree(out)  # the stage's own directory, written by an earlier run of it
        else:
            echo(header + (" (continuing)" if out.exists() else ""))
        t = time.perf_counter()
        try:
            stage_module(name).run(StageContext(name, run_dir, recipe, resume=not fresh, echo=echo))
        except BaseException as e:
            kept = ", ".join(result.ran + result.skipped) or "none"
            echo(f"== stage {name!r} failed after {time.perf_counter() - t:.1f} s; completed stages kept: {kept}. "
                 f"After fixing the cause, `lmlab run --resume --run-dir {run_dir}` continues from {name!r}")
            if isinstance(e, LmlabError) and type(e) is LmlabError:
                raise LmlabError(f"stage {name!r}: {e}") from None
            raise
        seconds = time.perf_counter() - t
        write_json_atomic(out / MARKER, {"stage": name, "hash": hashes[name], "seconds": round(seconds, 2),
                                         "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
        result.ran.append(name)
        result.seconds[name] = seconds
        clock.finished(name, seconds)
        echo(f"   ({name}: {seconds:.1f} s)")
    echo(f"done in {time.perf_counter() - t_run:.1f} s -> {run_dir}")
    return result


def unique_run_dir(root: str | Path, name: str) -> Path:
    """runs/<name>, or runs/<name>-2, -3, ... if that already exists (never overwrite a run)."""
    base = Path(root) / name
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{name}-{n}")
    return path
