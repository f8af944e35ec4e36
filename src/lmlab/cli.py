"""The `lmlab` command: a thin layer that parses arguments and calls library functions."""
from __future__ import annotations

import argparse
import json
import sys

from lmlab.errors import LmlabError


def cmd_inspect(args: argparse.Namespace) -> None:
    from lmlab.config import PRESETS, get_preset, resolve_model_config, load_yaml
    from lmlab.summary import describe, format_count

    names = sorted(PRESETS) if args.preset == "all" else [args.preset]
    for name in names:
        cfg = resolve_model_config(load_yaml(name).get("model", {})) if name.endswith((".yaml", ".yml")) else get_preset(name)
        info = describe(cfg)
        if args.json:
            print(json.dumps(info))
            continue
        active = "" if info["active_parameters"] == info["parameters"] else f"  active {format_count(info['active_parameters'])}"
        print(f"{info['name']:<18} total {format_count(info['parameters'])} ({info['parameters']:,}){active}"
              f"  [{info['reference']}]")


def cmd_pretrain(args: argparse.Namespace) -> None:
    from lmlab.pipeline import load_recipe, run_pipeline

    recipe, raw = load_recipe(args.config, args.set)
    run_dir = args.run_dir or f"runs/{recipe.name}"
    run_pipeline(recipe, run_dir, resume=args.resume, raw=raw,
                 stages=("tokenizer", "shards", "pretrain"))


def cmd_run(args: argparse.Namespace) -> None:
    from lmlab.pipeline import load_recipe, run_pipeline, unique_run_dir

    recipe, raw = load_recipe(args.config, args.set)
    run_dir = args.run_dir or (f"runs/{recipe.name}" if args.resume else unique_run_dir("runs", recipe.name))
    print(f"run directory: {run_dir}")
    run_pipeline(recipe, run_dir, resume=args.resume, raw=raw)


def _recipe_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--config", required=required, help="recipe YAML (model:, data:, train: sections)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a recipe value, e.g. --set train.lr=3e-4 (repeatable)")
    p.add_argument("--run-dir", help="where metrics, checkpoints and the model go (default runs/<name>)")
    p.add_argument("--resume", action="store_true", help="continue from the run's newest checkpoint")

def cmd_finetune(args: argparse.Namespace) -> None:
    from lmlab.train.finetune import finetune_recipe

    compare = tuple(m.strip() for m in args.compare.split(",")) if args.compare else ()
    result = finetune_recipe(args.config, args.method, args.set, args.resume, compare)
    if not compare:
        print(f"done: {result.train.run_dir} (model/, adapter/ for LoRA/DoRA, finetune_report.json)")


def cmd_convert(args: argparse.Namespace) -> None:
    from lmlab.interop import hf

    if args.direction == "from-hf":
        import torch

        dtype = None if args.dtype == "keep" else getattr(torch, args.dtype)
        out = hf.convert_from_hf(args.src, args.out, dtype=dtype)
    else:
        out = hf.convert_to_hf(args.src, args.out, max_shard_bytes=hf.parse_size(args.max_shard_size))
    print(f"wrote {out}")


def _texts(inputs: list[str], text_field: str):
    from lmlab.data.corpus import embedded_corpus_texts
    from lmlab.data.sources import read_texts

    if not inputs:
        return embedded_corpus_texts()
    return (t for path in inputs for t in read_texts(path, text_field))


def cmd_tokenize(args: argparse.Namespace) -> None:
    from lmlab.tokenizer import train_tokenizer

    tok = train_tokenizer(_texts(args.inputs, args.text_field), args.vocab_size)
    tok.save(args.out)
    print(f"trained a {tok.vocab_size}-token byte-level BPE -> {args.out}")


def cmd_shards(args: argparse.Namespace) -> None:
    from lmlab.data.shards import build_shards
    from lmlab.tokenizer import Tokenizer

    tok = Tokenizer.load(args.tokenizer)
    manifest = build_shards(_texts(args.inputs, args.text_field), tok, args.out, seq_len=args.seq_len,
                            val_fraction=args.val_fraction)
    for split, info in manifest["splits"].items():
        print(f"{split}: {info['documents']} documents, {info['tokens']:,} tokens, {info['rows']} rows")
    print(f"{manifest['tokens_per_second']:,} tokens/s -> {args.out}")


def cmd_generate(args: argparse.Namespace) -> None:
    from lmlab import load_model
    from lmlab.decode.generate import generate, stream
    from lmlab.tokenizer import Tokenizer

    is_url = lambda spec: spec.startswith(("http://", "https://"))  # noqa: E731
    if is_url(args.model) and not args.tokenizer:
        raise LmlabError("a remote base model needs --tokenizer (the vocabulary all members share)")
    tok = Tokenizer.load(args.tokenizer or args.model)
    prompts = [tok.encode(p, add_bos=tok.bos_id is not None) for p in args.prompt]

    def member(spec: str):
        """A local model directory, or a black-box OpenAI-compatible endpoint (URL)."""
        if is_url(spec):
            from lmlab.decode.remote import RemoteMember

            return RemoteMember(spec, args.remote_model, tok, prompts, top_k=args.remote_top_k)
        return load_model(spec).eval()

    model = member(args.model)
    if is_url(args.model) and not (args.proxy_expert or args.proxy_anti):
        raise LmlabError("a URL model works only as a proxy-tuning member; plain and speculative decoding need weights")
    options = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                   eos_id=tok.eos_id, seed=args.seed)
    if args.draft:
        from lmlab.decode.speculative import speculative_generate

        for text, ids in zip(args.prompt, prompts):
            out = speculative_generate(model, load_model(args.draft).eval(), ids, args.max_new_tokens,
                                       k=args.speculate_k, **options)
            body = out.tokens[:-1] if out.finish_reason == "eos" else out.tokens
            print(f"{text}{tok.decode(body)}\n[{out.finish_reason}; {out.accepted}/{out.proposed} draft tokens "
                  f"accepted ({out.acceptance_rate:.0%}), {out.target_forwards} target forwards]")
        return
    options.update(repetition_penalty=args.repetition_penalty, stop=args.stop or None, decode=tok.decode)
    if args.proxy_expert or args.proxy_anti:
        from lmlab.decode.proxy import proxy_generate

        if not (args.proxy_expert and args.proxy_anti):
            raise LmlabError("proxy-tuning needs both --proxy-expert and --proxy-anti (the expert's untuned base)")
        expert, anti = member(args.proxy_expert), member(args.proxy_anti)
        outs = proxy_generate(model, expert, anti, prompts, args.max_new_tokens, alpha=args.alpha,
                              truncate_vocab=args.truncate_vocab, **options)
    elif len(prompts) == 1:  # stream the text as it is generated
        results, shown = [], ""
        print(args.prompt[0], end="", flush=True)
        for _ in stream(model, prompts, args.max_new_tokens, results=results, **options):
            text = tok.decode([t for t in results[0].tokens if t != tok.eos_id])
            print(text[len(shown):], end="", flush=True)
            shown = text
        print()
        return
    else:
        outs = generate(model, prompts, args.max_new_tokens, **options)
    for prompt, g in zip(args.prompt, outs):
        print(f"{prompt}{g.text}\n[{g.finish_reason}, {len(g.tokens)} tokens]")


def cmd_adapter_merge(args: argparse.Namespace) -> None:
    from lmlab.adapters.export import merge_adapter_into

    print(f"wrote {merge_adapter_into(args.base, args.adapter, args.out)}")
def cmd_world_export(args: argparse.Namespace) -> None:
    from lmlab.worlds.export import export_world
    from lmlab.worlds.labeller import LabellerConfig

    labeller = LabellerConfig(temperature=args.label_temperature, length_weight=args.length_weight,
                              filler_weight=args.filler_weight, flip_rate=args.flip_rate)
    manifest = export_world(args.name, args.out_dir, seed=args.seed, n=args.n, labeller=labeller)
    for fname, count in manifest["files"].items():
        print(f"{args.out_dir}/{fname}: {count} rows")


# --- lmlab data clean|dedup|filter|filter-train|mix|curate (lmlab.data.curate) -----------------


def _write_report(path, report) -> None:
    from lmlab.io import write_json_atomic

    data = report.to_dict()
    if path:
        write_json_atomic(path, data)
    print(json.dumps({k: data[k] for k in ("input", "kept", "removed")}))


def _section(args: argparse.Namespace, key: str):
    from lmlab.config import load_yaml
    from lmlab.data.curate import curate_config

    return getattr(curate_config(load_yaml(args.config) if args.config else {}), key)


def _run_steps(args: argparse.Namespace, **sections) -> None:
    from lmlab.data.curate import CurateConfig, curate, read_documents

    report = curate(lambda: read_documents(args.input), args.output,
                    CurateConfig(**{k: None for k in ("clean", "quality", "dedup", "learned")} | sections))
    _write_report(args.report, report)


def cmd_data_clean(args: argparse.Namespace) -> None:
    _run_steps(args, clean=_section(args, "clean"))


def cmd_data_dedup(args: argparse.Namespace) -> None:
    import dataclasses

    cfg = _section(args, "dedup")
    overrides = {k: v for k, v in (("threshold", args.threshold), ("ngram", args.ngram), ("num_perm", args.num_perm))
                 if v is not None}
    cfg = dataclasses.replace(cfg, exact=not args.no_exact and cfg.exact, near=not args.no_near and cfg.near, **overrides)
    _run_steps(args, dedup=cfg)


def cmd_data_filter(args: argparse.Namespace) -> None:
    from lmlab.data.curate import LearnedFilterConfig

    learned = None
    if args.classifier:
        learned = LearnedFilterConfig(model=args.classifier, threshold=args.threshold, keep_top_fraction=args.keep_top)
    _run_steps(args, quality=None if args.no_heuristics else _section(args, "quality"), learned=learned)


def cmd_data_filter_train(args: argparse.Namespace) -> None:
    from lmlab.data.curate import TrainConfig, read_documents, train_classifier

    good = [d["text"] for d in read_documents(args.good)]
    bad = [d["text"] for d in read_documents(args.random)]
    clf = train_classifier(good, bad, TrainConfig(epochs=args.epochs, seed=args.seed))
    clf.save(args.output)
    scores_good, scores_bad = clf.scores(good), clf.scores(bad)
    print(json.dumps({"saved": args.output, "good": len(good), "random": len(bad),
                      "train_accuracy": float(((scores_good >= 0.5).sum() + (scores_bad < 0.5).sum()) / (len(good) + len(bad)))}))


def cmd_data_mix(args: argparse.Namespace) -> None:
    from lmlab.data.curate import MixtureSource, mix, read_documents, write_documents

    sources = []
    for spec in args.source:
        name, _, rest = spec.partition("=")
        path, *nums = rest.split(":")
        if not name or not path or len(nums) > 2:
            raise LmlabError(f"--source {spec!r}: expected NAME=PATH[:WEIGHT[:EPOCHS]], e.g. web=web.jsonl:0.7:1")
        try:
            weight = float(nums[0]) if nums else 1.0
            epochs = int(nums[1]) if len(nums) > 1 else 1
        except ValueError:
            raise LmlabError(f"--source {spec!r}: WEIGHT must be a number and EPOCHS an integer") from None
        sources.append(MixtureSource(name, lambda p=path: read_documents(p), weight, epochs))
    n = write_documents(args.output, mix(sources, seed=args.seed, max_docs=args.max_docs))
    print(json.dumps({"written": n, "output": args.output}))


def cmd_data_curate(args: argparse.Namespace) -> None:
    from lmlab.config import load_yaml
    from lmlab.data.curate import curate, curate_config, read_documents

    report = curate(lambda: read_documents(args.input), args.output,
                    curate_config(load_yaml(args.config) if args.config else {}))
    _write_report(args.report, report)


def add_data_curation_commands(data_sub) -> None:
    def io_parser(name: str, help: str):
        p = data_sub.add_parser(name, help=help)
        p.add_argument("input", help=".jsonl (objects with a 'text' field, other fields kept), or text/Parquet/"
                                     "Arrow files or a directory (as `lmlab shards` reads them)")
        p.add_argument("output", help="output .jsonl")
        p.add_argument("--config", help="curation YAML (sections clean/quality/dedup/learned; see docs/curation.md)")
        p.add_argument("--report", help="write the full JSON report here")
        return p

    io_parser("clean", "normalise text, strip boilerplate lines, drop bad charset/script/length").set_defaults(func=cmd_data_clean)
    p = io_parser("dedup", "exact and MinHash-LSH near-duplicate removal")
    p.add_argument("--threshold", type=float, help="Jaccard threshold over word n-grams (default 0.8)")
    p.add_argument("--ngram", type=int, help="words per shingle (default 5)")
    p.add_argument("--num-perm", type=int, help="MinHash functions (default 128)")
    p.add_argument("--no-exact", action="store_true")
    p.add_argument("--no-near", action="store_true")
    p.set_defaults(func=cmd_data_dedup)
    p = io_parser("filter", "Gopher/C4 heuristic rules and/or a learned quality classifier")
    p.add_argument("--classifier", help="a classifier saved by `lmlab data filter-train`")
    p.add_argument("--threshold", type=float, help="keep P(good) >= this (default 0.5)")
    p.add_argument("--keep-top", type=float, help="keep this best-scoring fraction instead of a threshold")
    p.add_argument("--no-heuristics", action="store_true", help="only the classifier")
    p.set_defaults(func=cmd_data_filter)
    p = data_sub.add_parser("filter-train", help="train the hashed n-gram quality classifier (good vs random web)")
    p.add_argument("good")
    p.add_argument("random")
    p.add_argument("output", help=".safetensors")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_data_filter_train)
    p = data_sub.add_parser("mix", help="weighted, seeded mixture of several sources")
    p.add_argument("output")
    p.add_argument("--source", action="append", required=True, metavar="NAME=PATH[:WEIGHT[:EPOCHS]]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-docs", type=int)
    p.set_defaults(func=cmd_data_mix)
    io_parser("curate", "the whole pipeline: clean, quality, dedup, learned filter").set_defaults(func=cmd_data_curate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmlab", description="A from-scratch lab for language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="print parameter counts of a preset (or 'all', or a recipe YAML)")
    p.add_argument("preset")
    p.add_argument("--json", action="store_true", help="one JSON object per model")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("pretrain", help="train a tokenizer, shard the data and pretrain a model from a recipe")
    _recipe_args(p, required=True)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("run", help="the whole default pipeline on the embedded corpus (a few minutes on CPU)")
    _recipe_args(p, required=False)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("finetune", help="supervised fine-tuning on chat JSONL: full, LoRA or DoRA")
    p.add_argument("--config", required=True, help="recipe YAML (base, out, method, data, adapter, train)")
    p.add_argument("--method", choices=("full", "lora", "dora"), help="overrides the recipe's method")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a recipe value, e.g. --set adapter.r=16 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the run in `out` from its last checkpoint")
    p.add_argument("--compare", metavar="METHODS", help="e.g. full,lora,dora: one run per method into "
                   "out/<method>, then a table in out/comparison.md")
    p.set_defaults(func=cmd_finetune)

    adapter = sub.add_parser("adapter", help="LoRA/DoRA adapters saved by `lmlab finetune`").add_subparsers(
        dest="adapter_command", required=True)
    p = adapter.add_parser("merge", help="fold an adapter into its base and write a plain model directory")
    p.add_argument("base", help="the base model directory the adapter was trained on")
    p.add_argument("adapter", help="the adapter directory (adapter.safetensors + adapter_config.json)")
    p.add_argument("out", help="output model directory")
    p.set_defaults(func=cmd_adapter_merge)

    p = sub.add_parser("tokenize", help="train a byte-level BPE tokenizer (default: on the embedded corpus)")
    p.add_argument("inputs", nargs="*", help="text/JSONL/Parquet files or directories")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--text-field", default="text", help="JSONL/Parquet field holding the text")
    p.add_argument("--out", default="tokenizer.json")
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("shards", help="tokenize and pack documents into memory-mapped training shards")
    p.add_argument("inputs", nargs="*", help="text/JSONL/Parquet files or directories (default: embedded corpus)")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json, sentencepiece .model, or a model dir")
    p.add_argument("--out", required=True)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--val-fraction", type=float, default=0.01)
    p.add_argument("--text-field", default="text")
    p.set_defaults(func=cmd_shards)

    p = sub.add_parser("generate", help="sample text from a model directory (KV-cached, batched)")
    p.add_argument("model", help="an lmlab or Hugging Face model directory (a URL for a remote proxy base)")
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch of prompts")
    p.add_argument("--tokenizer", help="default: the tokenizer in the model directory")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--min-p", type=float)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--seed", type=int)
    p.add_argument("--proxy-expert", help="proxy-tuning: a small tuned model (MODEL is the base); dir or URL")
    p.add_argument("--proxy-anti", help="proxy-tuning: the expert's untuned counterpart; dir or URL")
    p.add_argument("--alpha", type=float, default=1.0, help="proxy-tuning strength")
    p.add_argument("--truncate-vocab", action="store_true",
                   help="proxy-tuning: cut members to the smallest vocabulary (only if larger ones append tokens)")
    p.add_argument("--remote-model", default="default", help="model name sent to remote (URL) members")
    p.add_argument("--remote-top-k", type=int, default=20, help="log-probs asked of remote members")
    p.add_argument("--draft", help="speculative decoding: a small draft model with the same tokenizer")
    p.add_argument("--speculate-k", type=int, default=4, help="draft tokens proposed per target forward")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("convert", help="convert checkpoints between Hugging Face and lmlab formats")
    p.add_argument("direction", choices=["from-hf", "to-hf"],
                   help="from-hf: HF model dir -> lmlab dir; to-hf: lmlab dir -> HF model dir")
    p.add_argument("src", help="directory to read")
    p.add_argument("out", help="new (or empty) directory to write")
    p.add_argument("--dtype", default="keep", choices=["keep", "float32", "bfloat16", "float16"],
                   help="from-hf: cast the weights (default: keep the stored dtype)")
    p.add_argument("--max-shard-size", default="5GB", help="to-hf: shard the weights above this size (default 5GB)")
    p.set_defaults(func=cmd_convert)

    world = sub.add_parser("world", help="gold-reward worlds (SortWorld, FactWorld)").add_subparsers(
        dest="world_command", required=True)
    p = world.add_parser("export", help="write a world's corpus, SFT, preference and eval files")
    p.add_argument("name", choices=["sort", "fact"])
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=None,
                   help="scale: SFT prompts for sort (default 2000), keys for fact (default 200)")
    p.add_argument("--flip-rate", type=float, default=0.0, help="sort labeller: fraction of flipped labels")
    p.add_argument("--label-temperature", type=float, default=0.1, help="sort labeller: Bradley-Terry temperature")
    p.add_argument("--length-weight", type=float, default=0.05, help="sort labeller: spurious bonus per answer token")
    p.add_argument("--filler-weight", type=float, default=0.1, help="sort labeller: spurious bonus per filler word")
    p.set_defaults(func=cmd_world_export)

    data = sub.add_parser("data", help="data tools: curation (clean, dedup, filter, mix, curate)")
    add_data_curation_commands(data.add_subparsers(dest="data_command", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except LmlabError as e:
        print(f"lmlab: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
