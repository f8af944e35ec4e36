"""The recipe runner behind `lmlab run` and `lmlab pretrain`.

A pipeline is a list of named stages; a stage is a function of a `Context` (the run
directory, the recipe, the artifacts produced so far) that adds artifacts. The default
recipe runs tokenizer -> shards -> pretrain -> sample; later work (SFT, reward models,
DPO, proxy-tuning) registers more stages with `@stage("name")` and recipes list them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from lmlab.config import from_mapping, load_yaml, resolve_model_config
from lmlab.errors import LmlabError
from lmlab.io import write_text_atomic
from lmlab.adapters.inject import AdapterConfig
from lmlab.train.config import TrainConfig, apply_overrides


@dataclass(frozen=True)
class DataConfig:
    source: str = "embedded"  # "embedded" (the shipped corpus) or a path build_shards reads
    tokenizer: str | None = None  # an existing tokenizer.json / .model; None: train one
    vocab_size: int = 4096
    seq_len: int = 128
    val_fraction: float = 0.02
    text_field: str = "text"  # JSONL / Parquet column holding the text


@dataclass(frozen=True)
class SampleConfig:
    prompts: tuple[str, ...] = ("The",)
    max_new_tokens: int = 40
    temperature: float = 0.8
    top_k: int | None = 40
    top_p: float | None = None
    seed: int = 0


@dataclass(frozen=True)
class SFTStageConfig:
    """The `sft` stage: instruction-tune the pretrained model on a gold-reward world's task
    with the fine-tuning code (`lmlab.train.finetune`), then score generated answers with the
    world's gold reward."""
    world: str = "sort"
    seed: int = 0
    n: int = 1000  # conversations exported; 10% are held out for validation
    method: str = "lora"
    adapter: AdapterConfig = AdapterConfig(
        r=8, alpha=16.0,
        # The chat role tokens never occur in the pretraining corpus: their rows must train.
        trainable=("embed", "lm_head"))
    train: TrainConfig = TrainConfig(steps=200, batch_size=8, lr=1e-2, warmup_steps=10, log_every=10)
    eval_prompts: int = 50  # held-out world prompts answered greedily and scored


@dataclass(frozen=True)
class Recipe:
    name: str = "run"
    stages: tuple[str, ...] = ("tokenizer", "shards", "pretrain", "sample")
    data: DataConfig = DataConfig()
    model: Any = "micro"  # preset name or mapping; resolved once the vocabulary is known
    train: TrainConfig = TrainConfig()
    sample: SampleConfig = SampleConfig()
    sft: SFTStageConfig = SFTStageConfig()


SECTIONS = {"data": DataConfig, "train": TrainConfig, "sample": SampleConfig, "sft": SFTStageConfig}
DEFAULT_RECIPE = Path(__file__).parent / "recipes" / "default.yaml"


def load_recipe(path: str | Path | None = None, overrides: list[str] = ()) -> tuple[Recipe, dict]:
    """The recipe at `path` (default: the packaged default) with `--set` overrides applied;
    returns the frozen recipe and the merged mapping (saved into the run directory)."""
    raw = load_yaml(path or DEFAULT_RECIPE)
    merged = apply_overrides(raw, list(overrides), SECTIONS)
    if "model" in merged and isinstance(merged["model"], Mapping):
        from lmlab.config import ModelConfig

        valid = {f.name for f in dataclasses.fields(ModelConfig)} | {"preset"}
        for key in merged["model"]:
            if key not in valid:
                from lmlab.config import _unknown_key_error

                raise _unknown_key_error(key, sorted(valid), "model")
    return from_mapping(Recipe, merged, where="recipe"), merged


@dataclass
class Context:
    run_dir: Path
    recipe: Recipe
    resume: bool = False
    artifacts: dict[str, Any] = field(default_factory=dict)
    echo: Callable[[str], None] = print


Stage = Callable[[Context], None]
STAGES: dict[str, Stage] = {}


def stage(name: str) -> Callable[[Stage], Stage]:
    def register(fn: Stage) -> Stage:
        STAGES[name] = fn
        return fn
    return register


def run_pipeline(recipe: Recipe, run_dir: str | Path, *, resume: bool = False,
                 stages: tuple[str, ...] | None = None, raw: Mapping[str, Any] | None = None,
                 echo: Callable[[str], None] = print) -> Context:
    names = stages or recipe.stages
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        raise LmlabError(f"unknown pipeline stage(s) {unknown}; known: {', '.join(STAGES)}")
    ctx = Context(Path(run_dir), recipe, resume, echo=echo)
    from lmlab.train.state import latest_checkpoint

    if not resume and "pretrain" in names and latest_checkpoint(ctx.run_dir) is not None:
        # Checked before any stage runs, so a mistaken rerun overwrites nothing.
        raise LmlabError(f"{ctx.run_dir} already holds a trained run: pass --resume to continue it, "
                         "or choose another --run-dir")
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    if raw is not None:
        import yaml

        write_text_atomic(ctx.run_dir / "recipe.yaml", yaml.safe_dump(dict(raw), sort_keys=False))
    import time

    start = time.perf_counter()
    for name in names:
        echo(f"== {name}")
        t = time.perf_counter()
        STAGES[name](ctx)
        echo(f"   ({name}: {time.perf_counter() - t:.1f} s)")
    echo(f"done in {time.perf_counter() - start:.1f} s -> {ctx.run_dir}")
    return ctx


def unique_run_dir(root: str | Path, name: str) -> Path:
    """runs/<name>, or runs/<name>-2, -3, ... if that already exists (never overwrite a run)."""
    base = Path(root) / name
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{name}-{n}")
    return path


# ---- stages ------------------------------------------------------------------------------

def _corpus_texts(data: DataConfig) -> list[str]:
    if data.source == "embedded":
        from lmlab.data.corpus import embedded_corpus_texts

        return embedded_corpus_texts()
    from lmlab.data.sources import read_texts

    return list(read_texts(data.source, text_field=data.text_field))


@stage("tokenizer")
def tokenizer_stage(ctx: Context) -> None:
    from lmlab.tokenizer import Tokenizer, train_tokenizer

    path = ctx.run_dir / "tokenizer.json"
    data = ctx.recipe.data
    if path.is_file() and ctx.resume:
        tok = Tokenizer.load(path)
    elif data.tokenizer:
        tok = Tokenizer.load(data.tokenizer)
        tok.save(path)
    else:
        tok = train_tokenizer(_corpus_texts(data), data.vocab_size)
        tok.save(path)
    ctx.echo(f"tokenizer: {tok.vocab_size} tokens -> {path}")
    ctx.artifacts["tokenizer"] = tok


@stage("shards")
def shards_stage(ctx: Context) -> None:
    from lmlab.data.shards import ShardDataset, build_shards

    data, out = ctx.recipe.data, ctx.run_dir / "data"
    if not (ctx.resume and (out / "manifest.json").is_file()):
        source = _corpus_texts(data) if data.source == "embedded" else data.source
        build_shards(source, ctx.artifacts["tokenizer"], out, seq_len=data.seq_len,
                     val_fraction=data.val_fraction, text_field=data.text_field)
    ctx.artifacts["train_data"] = ShardDataset(out, split="train")
    ctx.artifacts["val_data"] = ShardDataset(out, split="val")
    ctx.echo(f"shards: {len(ctx.artifacts['train_data'])} train / {len(ctx.artifacts['val_data'])} "
             f"val sequences of {data.seq_len} tokens -> {out}")


def model_config_for(spec: Any, vocab_size: int, seq_len: int):
    """The recipe's model with the tokenizer's vocabulary (unless the recipe sets a larger one)."""
    spec_map = {"preset": spec} if isinstance(spec, str) else dict(spec)
    if "vocab_size" in spec_map and spec_map["vocab_size"] < vocab_size:
        raise LmlabError(f"model.vocab_size={spec_map['vocab_size']} is smaller than the tokenizer's "
                         f"{vocab_size} tokens; drop model.vocab_size to use the tokenizer's")
    spec_map.setdefault("vocab_size", vocab_size)
    cfg = resolve_model_config(spec_map)
    if seq_len > cfg.max_seq_len:
        raise LmlabError(f"data.seq_len={seq_len} is longer than the model's context "
                         f"model.max_seq_len={cfg.max_seq_len}; lower one or raise the other")
    return cfg


@stage("pretrain")
def pretrain_stage(ctx: Context) -> None:
    import torch

    from lmlab.checkpoint import load_model
    from lmlab.model.transformer import build_model, count_parameters
    from lmlab.train.loop import train
    from lmlab.train.objectives.lm import LanguageModeling

    tok, train_data = ctx.artifacts["tokenizer"], ctx.artifacts["train_data"]
    cfg = model_config_for(ctx.recipe.model, tok.vocab_size, train_data.seq_len)
    tcfg = ctx.recipe.train
    torch.manual_seed(tcfg.seed)
    model = build_model(cfg, device=tcfg.device)
    ctx.echo(f"model: {count_parameters(model):,} parameters ({cfg.n_layers} layers, d={cfg.d_model})")
    result = train(model, LanguageModeling(), train_data, tcfg, ctx.run_dir,
                   val_data=ctx.artifacts.get("val_data"), tokenizer=tok, resume=ctx.resume)
    ctx.echo(f"trained {result.step} steps, {result.tokens:,} tokens at {result.tokens_per_s:,.0f} tokens/s; "
             f"final loss {result.losses[-1] if result.losses else float('nan'):.3f}"
             + (f", val loss {result.val_loss:.3f}" if result.val_loss is not None else ""))
    from lmlab.train.plot import plot_losses

    png = plot_losses({ctx.recipe.name: ctx.run_dir}, ctx.run_dir / "loss.png",
                      title=f"{ctx.recipe.name}: {cfg.n_layers} layers, d={cfg.d_model}")
    ctx.echo(f"model -> {ctx.run_dir / 'model'}; loss plot -> {png}")
    ctx.artifacts["model"] = load_model(ctx.run_dir / "model")
    ctx.artifacts["train_result"] = result


@stage("sample")
def sample_stage(ctx: Context) -> None:
    import torch

    from lmlab.decode.generate import generate

    tok, model, s = ctx.artifacts["tokenizer"], ctx.artifacts["model"], ctx.recipe.sample
    prompts = [tok.encode(p, add_bos=True) for p in s.prompts]
    with torch.no_grad():
        outs = generate(model.eval(), prompts, s.max_new_tokens, temperature=s.temperature,
                        top_k=s.top_k, top_p=s.top_p, eos_id=tok.eos_id, seed=s.seed)
    lines = []
    for prompt, out in zip(s.prompts, outs):
        text = prompt + tok.decode(out.tokens)
        lines.append(text)
        ctx.echo(f"--- sample: {text!r}")
    write_text_atomic(ctx.run_dir / "samples.txt", "\n\n".join(lines) + "\n")
    ctx.artifacts["samples"] = lines


@stage("sft")
def sft_stage(ctx: Context) -> None:
    """Export the world, fine-tune the pretrained model on its chat SFT set, and score
    greedy answers to held-out prompts with the world's gold reward."""
    import json

    import torch

    from lmlab.data.chat import RoleTokenTemplate
    from lmlab.decode.generate import generate
    from lmlab.io import write_json_atomic
    from lmlab.train.finetune import ChatDataConfig, FinetuneConfig, finetune
    from lmlab.worlds.evaluate import sort_rewards
    from lmlab.worlds.export import export_world

    s, tok = ctx.recipe.sft, ctx.artifacts["tokenizer"]
    if s.world != "sort":
        raise LmlabError(f"the sft stage scores answers with SortWorld's gold reward; sft.world={s.world!r} "
                         "is not supported here (use `lmlab finetune` for other data)")
    world_dir = ctx.run_dir / "world"
    export_world(s.world, world_dir, seed=s.seed, n=s.n)
    cfg = FinetuneConfig(
        base="pretrain stage", out=str(ctx.run_dir / "sft"), method=s.method, adapter=s.adapter, train=s.train,
        data=ChatDataConfig(train=str(world_dir / "sft.jsonl"), val_fraction=0.1, seq_len=ctx.recipe.data.seq_len))
    model = ctx.artifacts["model"]
    result = finetune(model, tok, cfg, ctx.run_dir / "sft", resume=ctx.resume, log=ctx.echo)
    template = RoleTokenTemplate(tok)
    rows = [json.loads(line) for line in (world_dir / "eval.jsonl").read_text(encoding="utf-8").splitlines()]
    prompts = [r["prompt"] for r in rows[: s.eval_prompts]]
    ids = [template.encode_prompt([{"role": "user", "content": p}]) for p in prompts]
    with torch.no_grad():
        outs = generate(model.eval(), ids, 32, eos_id=template.stop_ids[0])
    answers = [tok.decode(o.tokens[:-1] if o.finish_reason == "eos" else o.tokens) for o in outs]
    rewards = sort_rewards(prompts, answers, [o.finish_reason for o in outs])
    summary = {
        "method": s.method, "steps": result.train.step, "val_loss": result.val_loss,
        "teacher_forced_exact_match": result.exact_match,
        "generated": len(prompts),
        "gold_reward_dense": sum(rewards["gold_dense"]) / len(prompts),
        "gold_reward_sparse": sum(rewards["gold_sparse"]) / len(prompts),
        "examples": [{"prompt": p, "answer": a} for p, a in list(zip(prompts, answers))[:5]],
    }
    write_json_atomic(ctx.run_dir / "sft" / "world_eval.json", summary)
    for ex in summary["examples"][:3]:
        ctx.echo(f"--- {ex['prompt']!r} -> {ex['answer']!r}")
    ctx.echo(f"sft ({s.method}, {result.train.step} steps): gold reward {summary['gold_reward_dense']:.3f} dense, "
             f"{summary['gold_reward_sparse']:.3f} exact (sparse) on {len(prompts)} held-out prompts")
    ctx.artifacts["sft_eval"] = summary
