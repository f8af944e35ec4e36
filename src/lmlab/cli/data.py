"""`lmlab tokenize`, `lmlab shards`, `lmlab world`, `lmlab data`: corpora, tokenizers, shards,
gold-reward worlds and curation."""
from __future__ import annotations

import argparse
import json

from lmlab.errors import LmlabError

OVERWRITE_HELP = "replace the files this command writes in an existing output (others are kept)"


def _texts(inputs: list[str], text_field: str):
    from lmlab.data.corpus import embedded_corpus_texts
    from lmlab.data.sources import read_texts

    if not inputs:
        return embedded_corpus_texts()
    return (t for path in inputs for t in read_texts(path, text_field))


def cmd_tokenize(args: argparse.Namespace) -> None:
    from lmlab.tokenizer import train_tokenizer

    from lmlab.io import check_output_file
    from lmlab.tokenizer import is_tokenizer_file

    check_output_file(args.out, args.overwrite, is_ours=is_tokenizer_file, inputs=args.inputs,
                      what="tokenizer file")  # refused before the training, not after
    tok = train_tokenizer(_texts(args.inputs, args.text_field), args.vocab_size)
    tok.save(args.out, overwrite=args.overwrite)
    print(f"trained a {tok.vocab_size}-token byte-level BPE -> {args.out}")


def cmd_shards(args: argparse.Namespace) -> None:
    from lmlab.data.shards import build_shards
    from lmlab.tokenizer import Tokenizer

    tok = Tokenizer.load(args.tokenizer)
    # One path is passed as a path, so "the output is the input" is caught by name.
    source = args.inputs[0] if len(args.inputs) == 1 else _texts(args.inputs, args.text_field)
    manifest = build_shards(source, tok, args.out, seq_len=args.seq_len, val_fraction=args.val_fraction,
                            text_field=args.text_field, overwrite=args.overwrite)
    for split, info in manifest["splits"].items():
        print(f"{split}: {info['documents']} documents, {info['tokens']:,} tokens, {info['rows']} rows")
    print(f"{manifest['tokens_per_second']:,} tokens/s -> {args.out}")


def cmd_world_export(args: argparse.Namespace) -> None:
    from lmlab.worlds.export import export_world
    from lmlab.worlds.labeller import LabellerConfig

    labeller = LabellerConfig(temperature=args.label_temperature, length_weight=args.length_weight,
                              filler_weight=args.filler_weight, flip_rate=args.flip_rate)
    manifest = export_world(args.name, args.out_dir, seed=args.seed, n=args.n, labeller=labeller,
                            overwrite=args.overwrite)
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


def _curate(args: argparse.Namespace, cfg) -> None:
    from lmlab.data.curate import curate, read_documents
    from lmlab.io import check_output_file

    if args.report:  # refused before the work, like the output itself
        check_output_file(args.report, args.overwrite, inputs=[args.input], what="report file")
    report = curate(lambda: read_documents(args.input), args.output, cfg, overwrite=args.overwrite)
    _write_report(args.report, report)


def _run_steps(args: argparse.Namespace, **sections) -> None:
    from lmlab.data.curate import CurateConfig

    _curate(args, CurateConfig(**{k: None for k in ("clean", "quality", "dedup", "learned")} | sections))


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
    clf.save(args.output, overwrite=args.overwrite)
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
    n = write_documents(args.output, mix(sources, seed=args.seed, max_docs=args.max_docs), overwrite=args.overwrite)
    print(json.dumps({"written": n, "output": args.output}))


def cmd_data_curate(args: argparse.Namespace) -> None:
    from lmlab.config import load_yaml
    from lmlab.data.curate import curate_config

    _curate(args, curate_config(load_yaml(args.config) if args.config else {}))


def add_data_curation_commands(data_sub) -> None:
    def io_parser(name: str, help: str):
        p = data_sub.add_parser(name, help=help)
        p.add_argument("input", help=".jsonl (objects with a 'text' field, other fields kept), or text/Parquet/"
                                     "Arrow files or a directory (as `lmlab shards` reads them)")
        p.add_argument("output", help="output .jsonl")
        p.add_argument("--config", help="curation YAML (sections clean/quality/dedup/learned; see docs/curation.md)")
        p.add_argument("--report", help="write the full JSON report here")
        p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
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
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_data_filter_train)
    p = data_sub.add_parser("mix", help="weighted, seeded mixture of several sources")
    p.add_argument("output")
    p.add_argument("--source", action="append", required=True, metavar="NAME=PATH[:WEIGHT[:EPOCHS]]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-docs", type=int)
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.set_defaults(func=cmd_data_mix)
    io_parser("curate", "the whole pipeline: clean, quality, dedup, learned filter").set_defaults(func=cmd_data_curate)


def add_commands(sub) -> None:
    p = sub.add_parser("tokenize", help="train a byte-level BPE tokenizer (default: on the embedded corpus)")
    p.add_argument("inputs", nargs="*", help="text/JSONL/Parquet files or directories")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--text-field", default="text", help="JSONL/Parquet field holding the text")
    p.add_argument("--out", default="tokenizer.json")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file that is not a tokenizer")
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("shards", help="tokenize and pack documents into memory-mapped training shards")
    p.add_argument("inputs", nargs="*", help="text/JSONL/Parquet files or directories (default: embedded corpus)")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json, sentencepiece .model, or a model dir")
    p.add_argument("--out", required=True)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--val-fraction", type=float, default=0.01)
    p.add_argument("--text-field", default="text")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.set_defaults(func=cmd_shards)

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
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.set_defaults(func=cmd_world_export)

    data = sub.add_parser("data", help="data tools: curation (clean, dedup, filter, mix, curate)")
    add_data_curation_commands(data.add_subparsers(dest="data_command", required=True))
