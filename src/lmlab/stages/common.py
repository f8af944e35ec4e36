"""What several stages share: the recipe's data section, the corpus it names, and how a
stage opens another's outputs by name."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmlab.errors import LmlabError


@dataclass(frozen=True)
class DataConfig:
    source: str = "embedded"  # "embedded" (the shipped corpus) or a path build_shards reads
    tokenizer: str | None = None  # an existing tokenizer.json / .model; None: train one
    vocab_size: int = 4096
    seq_len: int = 128
    val_fraction: float = 0.02
    text_field: str = "text"  # JSONL / Parquet column holding the text


def corpus_texts(data: DataConfig) -> Any:
    """The embedded corpus as a list of texts, or the path build_shards and the tokenizer
    trainer read."""
    if data.source == "embedded":
        from lmlab.data.corpus import embedded_corpus_texts

        return embedded_corpus_texts()
    return data.source


# The stages that write a policy (model/ of a chat language model), in lifecycle order.
POLICY_STAGES = ("sft", "rejection", "ppo", "grpo", "rloo", "dpo")

CURATED = "curated.jsonl"  # the curate stage's output: one {"id", "text", ...} document per line


def corpus_source(ctx) -> tuple[Any, str]:
    """(source, text_field) of the corpus the tokenizer and shards stages read: the curate
    stage's output when the recipe runs that stage, else the recipe's own corpus."""
    if "curate" in ctx.recipe.stages:
        return str(require(ctx.input("curate") / CURATED, "curate")), "text"
    return corpus_texts(ctx.recipe.data), ctx.recipe.data.text_field


def corpus_text_list(ctx):
    """The texts of `corpus_source(ctx)`: a list, or an iterator over the file's documents."""
    source, text_field = corpus_source(ctx)
    if isinstance(source, list):
        return source
    from lmlab.data.sources import read_texts

    return read_texts(source, text_field=text_field)


def require(path: Path, stage: str) -> Path:
    """`path`, an output of `stage`, or a clear error saying that stage must run first."""
    if not path.exists():
        raise LmlabError(f"{path} not found: the {stage!r} stage has not completed in this run directory; "
                         f"run it first (e.g. `lmlab run --from {stage} --run-dir ...`)")
    return path


def referenced_stage(value: Any, stages) -> str | None:
    """The stage a setting names when it is a run-relative path to that stage's output
    (`warm/model`, `rejection/model`): its first component is one of `stages`. Absolute,
    home- and dot-relative paths name files outside the run."""
    if isinstance(value, str) and "/" in value and not value.startswith(("/", "~", ".")):
        head = value.split("/", 1)[0]
        return head if head in stages else None
    return None


def in_run(ctx, spec: Any) -> Any:
    """A setting that names an earlier stage's output by a run-relative path
    (`referenced_stage`) as the path inside this run; any other value (an absolute path,
    "gold", a path outside the run) unchanged. Lists map item-wise."""
    if isinstance(spec, (list, tuple)):
        return type(spec)(in_run(ctx, s) for s in spec)
    stage = referenced_stage(spec, ctx.recipe.stages)
    return str(require(ctx.run_dir / spec, stage)) if stage else spec


def policy_dir(ctx, setting: str) -> Path:
    """The policy a stage starts from: `setting` (a run-relative path such as ppo/model, or a
    directory) when given, else the sft stage's model."""
    return Path(in_run(ctx, setting)) if setting else model_dir(ctx.run_dir, "sft")


def model_dir(run_dir: Path, stage: str) -> Path:
    return require(run_dir / stage / "model", stage)


def tokenizer_file(run_dir: Path) -> Path:
    return require(run_dir / "tokenizer" / "tokenizer.json", "tokenizer")


def sort_world_preferences(run_dir: Path, world) -> Path:
    """The world stage's directory, checked to hold SortWorld preference pairs."""
    if world.name != "sort":
        raise LmlabError(f"reward models train on SortWorld's preference pairs; world.name={world.name!r} exports "
                         "none: set world.name: sort")
    root = run_dir / "world"
    require(root / "preferences_train.jsonl", "world")
    return root


def preference_eval_sets(run_dir: Path, world, limit: int = 0):
    """WARM's evaluation sets (lmlab.rewards.accuracy.evaluation_sets) from the world stage's
    preference files, split and oriented by SortWorld's gold reward; returns (sets, counts)."""
    from lmlab.data.preference import read_preference_jsonl
    from lmlab.rewards.accuracy import evaluation_sets
    from lmlab.rewards.base import GoldReward

    root = sort_world_preferences(run_dir, world)

    def pairs(split: str):
        path = root / f"preferences_{split}.jsonl"
        return read_preference_jsonl(path).pairs if path.is_file() else None

    return evaluation_sets(pairs("train"), pairs("test_id"), pairs("test_ood"),
                           GoldReward("sort", "dense", ended=True), limit)


# ---- how long a stage takes, roughly: `cost(recipe)` in token passes of the run's model
# (one token forward and backward = 1), from which `lmlab run` estimates the time left.
# The constants are measured shapes of SortWorld, not promises.
PAIR_TOKENS = 2 * 64  # a preference pair: two sequences of about 64 tokens
GENERATED = 5.0  # one sampled token costs about this many training token passes (batched decode)
FORWARD = 1 / 6  # a forward-only token (scoring, reference log-probs)


def train_tokens(train, seq_len: int) -> float:
    return float(train.steps * train.batch_size * seq_len)


def generated_tokens(rows: int, max_new_tokens: int) -> float:
    return GENERATED * rows * max_new_tokens


def layers(model_spec) -> int:
    """The number of layers a recipe's model section gives (its preset's where it sets none)."""
    from lmlab.config import resolve_model_config

    spec = {"preset": model_spec} if isinstance(model_spec, str) else dict(model_spec)
    return resolve_model_config(spec).n_layers
