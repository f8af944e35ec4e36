"""Stage `proxy`: proxy-tuning (Liu et al. 2024) in the run. A LARGER base (pretrained here
on the run's shards and tokenizer, or an existing model named by `proxy.base`) is steered at
decoding time by the run's small tuned model (sft/model, the expert) against its untuned
base (pretrain/model, the anti-expert):

    log p_large + alpha * (log p_sft - log p_pretrain)      (lmlab.decode.proxy)

The world's held-out prompts are answered greedily, in the chat format the expert was
tuned on, and scored with SortWorld's gold reward, for: the large base, the small base,
the small tuned model, the proxy-tuned large base at every alpha and, as the paper's
upper bound, the large base tuned as the sft stage tuned the small one (`proxy.tune`).
Fraction of the gap closed (the paper's definition, as in experiments/proxy_tuning.py):

    (proxy - large base) / (large tuned - large base)

-> proxy/large/ (the pretrained large base: metrics, model/), proxy/large-tuned/ and
proxy/proxy_report.json."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lmlab.errors import LmlabError
from lmlab.train.config import TrainConfig

NEEDS = ("tokenizer", "shards", "pretrain", "sft", "world")
SECTIONS = ("proxy",)
REPORT = "proxy_report.json"
METRIC = "gold_reward_dense"


def _large_model() -> dict:
    return {"preset": "micro", "n_layers": 6, "max_seq_len": 128}


def _large_train() -> TrainConfig:
    return TrainConfig(steps=240, batch_size=16, lr=3e-3, warmup_steps=20, min_lr_ratio=0.1, log_every=10)


@dataclass(frozen=True)
class ProxyConfig:
    base: str = ""  # an existing larger base (any format, the run's tokenizer); "": pretrain `model` here
    model: Any = field(default_factory=_large_model)  # preset name or mapping, as the recipe's `model:`
    train: TrainConfig = field(default_factory=_large_train)  # pretraining of the large base
    tune: bool = True  # also tune the large base as sft tuned the small one: the gap's upper bound
    tune_steps: int = 0  # 0: sft.train.steps
    alphas: tuple[float, ...] = (0.5, 1.0, 1.5)
    prompts: int = 50  # held-out world prompts answered by every model
    max_new_tokens: int = 32

    def __post_init__(self) -> None:
        if not self.alphas:
            raise LmlabError("proxy.alphas is empty: give at least one steering strength, e.g. [1.0]")
        if self.prompts < 1 or self.max_new_tokens < 1 or self.tune_steps < 0:
            raise LmlabError("proxy.prompts and proxy.max_new_tokens must be >= 1, proxy.tune_steps >= 0")
        if not isinstance(self.model, (str, dict)):
            raise LmlabError(f"proxy.model must be a preset name or a mapping, got {type(self.model).__name__}")


CONFIG = ("proxy", ProxyConfig)


def large_config(spec: Any, vocab_size: int, seq_len: int):
    from lmlab.config import resolve_model_config

    spec_map = {"preset": spec} if isinstance(spec, str) else dict(spec)
    if spec_map.get("vocab_size", vocab_size) != vocab_size:
        raise LmlabError(f"proxy.model.vocab_size={spec_map['vocab_size']}: proxy-tuning needs the run's "
                         f"vocabulary ({vocab_size} tokens); drop proxy.model.vocab_size")
    cfg = resolve_model_config({**spec_map, "vocab_size": vocab_size})
    if seq_len > cfg.max_seq_len:
        raise LmlabError(f"the run's sequences ({seq_len} tokens) exceed proxy.model.max_seq_len={cfg.max_seq_len}")
    return cfg


def pretrain_large(ctx, tok):
    """The large base: trained on the run's shards into proxy/large (continued if half done)."""
    import torch

    from lmlab.checkpoint import save_model
    from lmlab.data.shards import ShardDataset
    from lmlab.hub import load_model
    from lmlab.model.transformer import build_model, count_parameters
    from lmlab.stages.common import require
    from lmlab.train.loop import train
    from lmlab.train.objectives.lm import LanguageModeling

    cfg, out = ctx.recipe.proxy, ctx.out / "large"
    if ctx.resume and (out / "model" / "config.json").is_file():
        return load_model(out / "model", device=cfg.train.device)
    shards = require(ctx.input("shards"), "shards")
    train_data, val_data = ShardDataset(shards, split="train"), ShardDataset(shards, split="val")
    torch.manual_seed(cfg.train.seed)
    model = build_model(large_config(cfg.model, tok.vocab_size, train_data.seq_len), device=cfg.train.device)
    ctx.echo(f"proxy: pretraining the large base, {count_parameters(model):,} parameters")
    result = train(model, LanguageModeling(), train_data, cfg.train, out, val_data=val_data, tokenizer=tok,
                   resume="auto" if ctx.resume else False, log=ctx.echo)
    save_model(model, out / "model", tokenizer=tok, extra={"train": {"step": result.step, "val_loss": result.val_loss}})
    return model


def tune_large(ctx, base, tok):
    """The upper bound: a copy of the large base tuned on the world's chat set with the sft
    stage's settings (tune_steps replacing its steps), through the one SFT code path."""
    import copy
    from dataclasses import replace

    from lmlab.hub import load_model
    from lmlab.stages.common import require
    from lmlab.train.finetune import finetune

    cfg, sft, out = ctx.recipe.proxy, ctx.recipe.sft, ctx.out / "large-tuned"
    if ctx.resume and (out / "model" / "config.json").is_file():
        return load_model(out / "model", device=cfg.train.device)
    model = copy.deepcopy(base)
    data = replace(sft.data, train=sft.data.train or str(require(ctx.input("world") / "sft.jsonl", "world")),
                   seq_len=min(sft.data.seq_len or ctx.recipe.data.seq_len, model.config.max_seq_len))
    tuned = replace(sft, data=data, train=replace(sft.train, steps=cfg.tune_steps or sft.train.steps))
    ctx.echo(f"proxy: tuning the large base ({sft.method}, {tuned.train.steps} steps): the upper bound")
    finetune(model, tok, tuned, out, resume="auto" if ctx.resume else False, log=ctx.echo)
    return model


def decoded(outs, tok) -> tuple[list[str], list[str]]:
    """Answers without their stop token, and finish reasons (as eval.gold.answer_prompts)."""
    return ([tok.decode(o.tokens[:-1] if o.finish_reason == "eos" else o.tokens) for o in outs],
            [o.finish_reason for o in outs])


def cost(recipe) -> float:
    from lmlab.stages.common import generated_tokens, layers, train_tokens

    p, sft = recipe.proxy, recipe.sft
    scale = layers(p.model) / max(1, layers(recipe.model))  # the large base is deeper than the run's model
    pretrain = 0.0 if p.base else train_tokens(p.train, recipe.data.seq_len) * scale
    tune = train_tokens(sft.train, sft.data.seq_len or recipe.data.seq_len) * scale * (
        (p.tune_steps or sft.train.steps) / max(1, sft.train.steps)) if p.tune else 0.0
    decodes = (4 + len(p.alphas)) * generated_tokens(p.prompts, p.max_new_tokens) * scale
    return pretrain + tune + decodes


def run(ctx) -> None:
    import torch

    from lmlab.data.chat import RoleTokenTemplate
    from lmlab.decode.proxy import proxy_generate
    from lmlab.eval.gold import answer_prompts, read_eval_rows, world_scores
    from lmlab.hub import load_model
    from lmlab.io import write_json_atomic
    from lmlab.model.transformer import count_parameters
    from lmlab.precision import resolve
    from lmlab.stages.common import model_dir, tokenizer_file
    from lmlab.tokenizer import Tokenizer

    cfg = ctx.recipe.proxy
    if ctx.recipe.world.name != "sort":
        raise LmlabError(f"the proxy stage scores answers with SortWorld's gold reward; world.name="
                         f"{ctx.recipe.world.name!r} is not supported here")
    device = cfg.train.device
    tok = Tokenizer.load(tokenizer_file(ctx.run_dir))
    small_base = load_model(model_dir(ctx.run_dir, "pretrain"), device=device).eval()
    expert = load_model(model_dir(ctx.run_dir, "sft"), device=device).eval()
    large = (load_model(cfg.base, device=device) if cfg.base else pretrain_large(ctx, tok)).eval()
    sizes = {"small": count_parameters(small_base), "large": count_parameters(large)}
    if sizes["large"] <= sizes["small"]:
        ctx.echo(f"proxy: note, the 'large' base ({sizes['large']:,} parameters) is not larger than the small one "
                 f"({sizes['small']:,})")
    models = {"large_base": large, "small_base": small_base, "small_tuned": expert}
    if cfg.tune:
        models["large_tuned"] = tune_large(ctx, large, tok).eval()

    rows = read_eval_rows(ctx.input("world"))[: cfg.prompts]
    prompts = [r["prompt"] for r in rows]
    template = RoleTokenTemplate(tok)
    precision = resolve(cfg.train.precision, device)
    scores, examples = {}, {}
    for name, model in models.items():
        answers, reasons = answer_prompts(model, tok, prompts, template=template, max_new_tokens=cfg.max_new_tokens,
                                          precision=precision)
        scores[name] = world_scores(rows, answers, reasons)
        examples[name] = answers[:3]
    ids = [template.encode_prompt([{"role": "user", "content": p}]) for p in prompts]
    proxy = {}
    for alpha in cfg.alphas:
        with torch.no_grad(), precision.autocast():
            outs = proxy_generate(large, expert, small_base, ids, cfg.max_new_tokens, alpha=alpha,
                                  eos_id=template.stop_ids[0], temperature=0.0)
        answers, reasons = decoded(outs, tok)
        proxy[str(alpha)] = world_scores(rows, answers, reasons)
        examples[f"proxy_alpha_{alpha:g}"] = answers[:3]
    base_score = scores["large_base"][METRIC]
    top = scores["large_tuned"][METRIC] if "large_tuned" in scores else None
    gap = None if top is None else top - base_score
    # No gap (tuning did not beat the base, up to float rounding): no fraction to report.
    closable = gap is not None and gap > 1e-6
    gap_closed = {a: (s[METRIC] - base_score) / gap if closable else None for a, s in proxy.items()}
    report = {"metric": METRIC, "prompts": len(rows), "parameters": sizes, "large_base": cfg.base or "proxy/large/model",
              "scores": scores, "proxy": proxy, "gap": gap, "gap_closed": gap_closed,
              "precision": precision.name, "examples": {"prompts": prompts[:3], **examples}}
    write_json_atomic(ctx.out / REPORT, report)
    line = ", ".join(f"{n} {s[METRIC]:.3f}" for n, s in scores.items())
    ctx.echo(f"proxy ({METRIC} on {len(rows)} prompts): {line}; proxy "
             + ", ".join(f"alpha {a} {s[METRIC]:.3f}" for a, s in proxy.items())
             + ("" if not closable else "; gap closed " + ", ".join(
                 f"alpha {a} {g:.0%}" for a, g in gap_closed.items())))
