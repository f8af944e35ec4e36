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


def run(ctx) -> None:
    import json

    import torch

    from lmlab.data.chat import RoleTokenTemplate
    from lmlab.decode.generate import generate
    from lmlab.hub import load_model
    from lmlab.io import write_json_atomic
    from lmlab.precision import resolve
    from lmlab.stages.common import model_dir, require
    from lmlab.tokenizer import Tokenizer
    from lmlab.worlds.evaluate import sort_rewards

    e, world, sft = ctx.recipe.eval, ctx.recipe.world, ctx.recipe.sft
    if world.name != "sort":
        raise LmlabError(f"the eval stage scores answers with SortWorld's gold reward; world.name={world.name!r} "
                         "is not supported here")
    sft_model = model_dir(ctx.run_dir, "sft")
    tok = Tokenizer.load(sft_model)
    model = load_model(sft_model, device=sft.train.device).eval()
    template = RoleTokenTemplate(tok)
    eval_file = require(ctx.input("world") / "eval.jsonl", "world")
    rows = [json.loads(line) for line in eval_file.read_text(encoding="utf-8").splitlines()]
    prompts = [r["prompt"] for r in rows[: e.prompts]]
    ids = [template.encode_prompt([{"role": "user", "content": p}]) for p in prompts]
    precision = resolve(sft.train.precision, sft.train.device)
    with torch.no_grad(), precision.autocast():
        outs = generate(model, ids, e.max_new_tokens, eos_id=template.stop_ids[0])
    answers = [tok.decode(o.tokens[:-1] if o.finish_reason == "eos" else o.tokens) for o in outs]
    rewards = sort_rewards(prompts, answers, [o.finish_reason for o in outs])
    report = json.loads((ctx.input("sft") / "finetune_report.json").read_text(encoding="utf-8"))
    summary = {
        "method": report["method"], "steps": report["steps"], "val_loss": report["val_loss"],
        "teacher_forced_exact_match": report["answer_exact_match"], "precision": precision.name,
        "generated": len(prompts),
        "gold_reward_dense": sum(rewards["gold_dense"]) / len(prompts),
        "gold_reward_sparse": sum(rewards["gold_sparse"]) / len(prompts),
        "examples": [{"prompt": p, "answer": a} for p, a in list(zip(prompts, answers))[:5]],
    }
    write_json_atomic(ctx.out / "world_eval.json", summary)
    for ex in summary["examples"][:3]:
        ctx.echo(f"--- {ex['prompt']!r} -> {ex['answer']!r}")
    ctx.echo(f"eval ({summary['method']}, {summary['steps']} steps): gold reward {summary['gold_reward_dense']:.3f} "
             f"dense, {summary['gold_reward_sparse']:.3f} exact (sparse) on {len(prompts)} held-out prompts")
