"""`lmlab inspect`, `lmlab convert`, `lmlab adapter`: models and their formats."""
from __future__ import annotations

import argparse
import json


def cmd_inspect(args: argparse.Namespace) -> None:
    from lmlab.config import PRESETS, get_preset, load_yaml, resolve_model_config
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
    from lmlab.interop import hf, hf_reward

    if args.direction == "from-hf":
        import torch

        dtype = None if args.dtype == "keep" else getattr(torch, args.dtype)
        convert = hf_reward.convert_reward_from_hf if hf_reward.is_hf_reward_dir(args.src) else hf.convert_from_hf
        out = convert(args.src, args.out, dtype=dtype)
    elif hf_reward.is_reward_dir(args.src):
        out = hf_reward.convert_reward_to_hf(args.src, args.out, allow_pad_eos=args.allow_pad_eos)
    else:
        out = hf.convert_to_hf(args.src, args.out, max_shard_bytes=hf.parse_size(args.max_shard_size))
    print(f"wrote {out}")


def cmd_adapter_merge(args: argparse.Namespace) -> None:
    from lmlab.adapters.export import merge_adapter_into

    print(f"wrote {merge_adapter_into(args.base, args.adapter, args.out)}")


def add_commands(sub) -> None:
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
    p.add_argument("--allow-pad-eos", action="store_true",
                   help="to-hf, reward models: export even though pad == eos (transformers then scores "
                        "the token before a trailing EOS)")
    p.set_defaults(func=cmd_convert)

    adapter = sub.add_parser("adapter", help="LoRA/DoRA adapters saved by `lmlab finetune`").add_subparsers(
        dest="adapter_command", required=True)
    p = adapter.add_parser("merge", help="fold an adapter into its base and write a plain model directory")
    p.add_argument("base", help="the base model directory the adapter was trained on")
    p.add_argument("adapter", help="the adapter directory (adapter.safetensors + adapter_config.json)")
    p.add_argument("out", help="output model directory")
    p.set_defaults(func=cmd_adapter_merge)
