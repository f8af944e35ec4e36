"""Stage `eval`: every policy the run trained (sft, and rejection, ppo, grpo, rloo, dpo where
the recipe runs them) answers the same held-out world prompts greedily, at the precision it
was trained in; the world's gold reward scores the answers, each policy's win rate against
the SFT model counts ties half, and KL to the SFT model is estimated from the policy's own
samples. With a pretrain stage in the run, the base's perplexity on the held-out shard too.
-> eval/world_eval.json ("policies": one entry per policy; the SFT model's own fields at the
top level as before)."""
from __future__ import annotations

from dataclasses import dataclass

from lmlab.errors import LmlabError

from lmlab.stages.common import POLICY_STAGES

NEEDS = ("world", "sft")
USES = ("pretrain", "shards", *POLICY_STAGES[1:])
SECTIONS = ("eval", "world")


@dataclass(frozen=True)
class EvalConfig:
    prompts: int = 50  # held-out world prompts answered and scored
    max_new_tokens: int = 32
    kl: bool = True  # estimate each policy's KL to the SFT model (one sampled answer per prompt)
    seed: int = 0


CONFIG = ("eval", EvalConfig)


def policies_in(stages) -> list[str]:
    return [s for s in POLICY_STAGES if s in stages]


def _perplexity(ctx, batch: int = 8, max_rows: int = 64) -> dict | None:
    """The pretrained base's perplexity on (up to `max_rows` rows of) the held-out shard."""
    import math

    import torch

    from lmlab.data.shards import ShardDataset
    from lmlab.hub import load_model
    from lmlab.train.logprobs import masked_logprobs

    model_path = ctx.input("pretrain") / "model"
    if "pretrain" not in ctx.recipe.stages or not model_path.is_dir():
        return None
    data = ShardDataset(ctx.input("shards"), "val")
    rows = min(len(data), max_rows)
    if not rows:
        return None
    model = load_model(model_path).eval()
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for s in range(0, rows, batch):
            x = torch.stack([data[i] for i in range(s, min(rows, s + batch))])
            lp = masked_logprobs(model, x[:, :-1], x[:, 1:])
            nll, tokens = nll - float(lp.sums.sum()), tokens + x[:, 1:].numel()
    return {"rows": rows, "tokens": tokens, "loss": nll / tokens, "perplexity": math.exp(nll / tokens)}


def cost(recipe) -> float:
    from lmlab.stages.common import generated_tokens

    e = recipe.eval
    return len(policies_in(recipe.stages)) * generated_tokens(e.prompts * (2 if e.kl else 1), e.max_new_tokens)


def run(ctx) -> None:
    import json

    from lmlab.data.chat import RoleTokenTemplate
    from lmlab.eval.gold import answer_prompts, sampled_kl
    from lmlab.eval.win_rate import pairwise
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
    eval_file = require(ctx.input("world") / "eval.jsonl", "world")
    rows = [json.loads(line) for line in eval_file.read_text(encoding="utf-8").splitlines()][: e.prompts]
    prompts = [r["prompt"] for r in rows]
    precision = resolve(sft.train.precision, sft.train.device)
    device = sft.train.device
    sft_dir = model_dir(ctx.run_dir, "sft")
    tok = Tokenizer.load(sft_dir)
    template = RoleTokenTemplate(tok)
    prompt_ids = [template.encode_prompt([{"role": "user", "content": p}]) for p in prompts]
    stop = template.stop_ids[0] if template.stop_ids else tok.eos_id
    pad = tok.pad_id if tok.pad_id is not None else 0
    reference = load_model(sft_dir, device=device).eval()

    results, dense = {}, {}
    for name in policies_in(ctx.recipe.stages):
        model = reference if name == "sft" else load_model(model_dir(ctx.run_dir, name), device=device).eval()
        answers, reasons = answer_prompts(model, tok, prompts, template=template, max_new_tokens=e.max_new_tokens,
                                          precision=precision)
        gold = sort_rewards(prompts, answers, reasons)
        dense[name] = gold["gold_dense"]
        entry = {"gold_reward_dense": sum(gold["gold_dense"]) / len(prompts),
                 "gold_reward_sparse": sum(gold["gold_sparse"]) / len(prompts)}
        if name != "sft":
            entry["win_rate_vs_sft"] = pairwise(dense[name], dense["sft"])["win_rate"]
            if e.kl:
                with precision.autocast():
                    entry["kl_to_sft"] = sampled_kl(model, reference, prompt_ids, max_new_tokens=e.max_new_tokens,
                                                    stop=stop, pad=pad, seed=e.seed)
        else:
            entry["kl_to_sft"] = 0.0
        entry["examples"] = [{"prompt": p, "answer": a} for p, a in list(zip(prompts, answers))[:5]]
        results[name] = entry
        ctx.echo(f"eval {name}: gold reward {entry['gold_reward_dense']:.3f} dense, "
                 f"{entry['gold_reward_sparse']:.3f} exact"
                 + (f", win rate vs sft {entry['win_rate_vs_sft']:.3f}" if "win_rate_vs_sft" in entry else "")
                 + (f", KL to sft {entry['kl_to_sft']:.3f}" if name != "sft" and "kl_to_sft" in entry else ""))
        del model  # one policy in memory beside the reference at a time

    report = json.loads((ctx.input("sft") / "finetune_report.json").read_text(encoding="utf-8"))
    summary = {
        "method": report["method"], "steps": report["steps"], "val_loss": report["val_loss"],
        "teacher_forced_exact_match": report["answer_exact_match"], "precision": precision.name,
        "generated": len(prompts),
        "gold_reward_dense": results["sft"]["gold_reward_dense"],
        "gold_reward_sparse": results["sft"]["gold_reward_sparse"],
        "examples": results["sft"]["examples"],
        "policies": results,
    }
    ppl = _perplexity(ctx)
    if ppl is not None:
        summary["pretrain_perplexity"] = ppl
        ctx.echo(f"eval pretrain: held-out perplexity {ppl['perplexity']:.1f} over {ppl['tokens']} tokens")
    write_json_atomic(ctx.out / "world_eval.json", summary)
    for ex in summary["examples"][:3]:
        ctx.echo(f"--- {ex['prompt']!r} -> {ex['answer']!r}")
