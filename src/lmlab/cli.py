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


def cmd_convert(args: argparse.Namespace) -> None:
    from lmlab.interop import hf

    if args.direction == "from-hf":
        import torch

        dtype = None if args.dtype == "keep" else getattr(torch, args.dtype)
        out = hf.convert_from_hf(args.src, args.out, dtype=dtype)
    else:
        out = hf.convert_to_hf(args.src, args.out, max_shard_bytes=hf.parse_size(args.max_shard_size))
    print(f"wrote {out}")


def cmd_world_export(args: argparse.Namespace) -> None:
    from lmlab.worlds.export import export_world
    from lmlab.worlds.labeller import LabellerConfig

    labeller = LabellerConfig(temperature=args.label_temperature, length_weight=args.length_weight,
                              filler_weight=args.filler_weight, flip_rate=args.flip_rate)
    manifest = export_world(args.name, args.out_dir, seed=args.seed, n=args.n, labeller=labeller)
    for fname, count in manifest["files"].items():
        print(f"{args.out_dir}/{fname}: {count} rows")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmlab", description="A from-scratch lab for language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="print parameter counts of a preset (or 'all', or a recipe YAML)")
    p.add_argument("preset")
    p.add_argument("--json", action="store_true", help="one JSON object per model")
    p.set_defaults(func=cmd_inspect)

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
