"""Stage `eval`: the SFT model answers held-out world prompts greedily, at the precision it
was trained in, and the world's gold reward scores the answers -> eval/world_eval.json."""
from __future__ import annotations

from dataclasses import dataclass

from lmlab.errors import LmlabError

NEEDS = ("world", "sft")
SECTIONS = ("eval", "world")


@dataclass(frozen=True)
class EvalConfig:
    prompts: int = 50  # held-out world prompts answered and scored
    max_new_tokens: int = 32


CONFIG = ("eval", EvalConfig)


def run(ctx) -> None:
    import json

    from lmlab.data.chat import RoleTokenTemplate
    from lmlab.eval.gold import answer_prompts, world_scores
    from lmlab.hub import load_model
    from lmlab.io import write_json_atomic
    from lmlab.precision import resolve
    from lmlab.stages.common import model_dir, require
    from lmlab.tokenizer import Tokenizer

    e, world, sft = ctx.recipe.eval, ctx.recipe.world, ctx.recipe.sft
    if world.name != "sort":
        raise LmlabError(f"the eval stage scores answers with SortWorld's gold reward; world.name={world.name!r} "
                         "is not supported here")
    sft_model = model_dir(ctx.run_dir, "sft")
    tok = Tokenizer.load(sft_model)
    model = load_model(sft_model, device=sft.train.device).eval()
    eval_file = require(ctx.input("world") / "eval.jsonl", "world")
    rows = [json.loads(line) for line in eval_file.read_text(encoding="utf-8").splitlines()][: e.prompts]
    prompts = [r["prompt"] for r in rows]
    precision = resolve(sft.train.precision, sft.train.device)
    answers, reasons = answer_prompts(model, tok, prompts, template=RoleTokenTemplate(tok),
                                      max_new_tokens=e.max_new_tokens, precision=precision)
    scores = world_scores(rows, answers, reasons)
    report = json.loads((ctx.input("sft") / "finetune_report.json").read_text(encoding="utf-8"))
    summary = {
        "method": report["method"], "steps": report["steps"], "val_loss": report["val_loss"],
        "teacher_forced_exact_match": report["answer_exact_match"], "precision": precision.name,
        "generated": len(prompts),
        "gold_reward_dense": scores["gold_reward_dense"],
        "gold_reward_sparse": scores["gold_reward_sparse"],
        "examples": [{"prompt": p, "answer": a} for p, a in list(zip(prompts, answers))[:5]],
    }
    write_json_atomic(ctx.out / "world_eval.json", summary)
    for ex in summary["examples"][:3]:
        ctx.echo(f"--- {ex['prompt']!r} -> {ex['answer']!r}")
    ctx.echo(f"eval ({summary['method']}, {summary['steps']} steps): gold reward {summary['gold_reward_dense']:.3f} "
             f"dense, {summary['gold_reward_sparse']:.3f} exact (sparse) on {len(prompts)} held-out prompts")
