"""`lmlab inspect`, `lmlab convert`, `lmlab adapter`: models and their formats."""
from __future__ import annotations

import argparse
import json

from lmlab.cli.data import OVERWRITE_HELP


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
        out = convert(args.src, args.out, dtype=dtype, overwrite=args.overwrite)
    elif hf_reward.is_reward_dir(args.src):
        out = hf_reward.convert_reward_to_hf(args.src, args.out, allow_pad_eos=args.allow_pad_eos,
                                             overwrite=args.overwrite)
    else:
        out = hf.convert_to_hf(args.src, args.out, max_shard_bytes=hf.parse_size(args.max_shard_size),
                               overwrite=args.overwrite)
    print(f"wrote {out}")


def cmd_adapter_merge(args: argparse.Namespace) -> None:
    from lmlab.adapters.export import merge_adapter_into

    print(f"wrote {merge_adapter_into(args.base, args.adapter, args.out, overwrite=args.overwrite)}")


def cmd_quantize(args: argparse.Namespace) -> None:
    from lmlab.decode.quant import quantize_model, save_quantized
    from lmlab.hub import load_model
    from lmlab.tokenizer import Tokenizer

    model = quantize_model(load_model(args.model), args.format, group_size=args.group_size,
                           zero_point=not args.no_zero_point, compute_dtype=args.compute_dtype)
    try:
        tokenizer = Tokenizer.load(args.model)
    except Exception:  # a model without a stored tokenizer is still worth quantising
        tokenizer = None
    print(f"wrote {save_quantized(model, args.out, tokenizer=tokenizer)}")


def cmd_export_gguf(args: argparse.Namespace) -> None:
    from lmlab.interop.gguf import export_gguf

    print(f"wrote {export_gguf(args.model, args.out, type=args.type, pre=args.pre)}")



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
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
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
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.set_defaults(func=cmd_adapter_merge)

    p = sub.add_parser("quantize", help="weight-only int8/int4 quantisation of a model (CPU kernels)")
    p.add_argument("model", help="an lmlab or Hugging Face model directory")
    p.add_argument("out", help="output directory (a quantised lmlab checkpoint)")
    p.add_argument("--format", choices=("int8", "int4"), default="int8")
    p.add_argument("--group-size", type=int, default=32, help="int4: inputs per scale group")
    p.add_argument("--no-zero-point", action="store_true", help="int4: symmetric groups")
    p.add_argument("--compute-dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="activations around the quantised matmuls (the kernels are fast in bf16)")
    p.set_defaults(func=cmd_quantize)

    export = sub.add_parser("export", help="export a model to another runtime's format").add_subparsers(
        dest="export_command", required=True)
    p = export.add_parser("gguf", help="one GGUF file llama.cpp runs (Llama family, byte-level BPE)")
    p.add_argument("model", help="an lmlab or Hugging Face Llama-family model directory")
    p.add_argument("out", help="output .gguf file")
    p.add_argument("--type", choices=("f32", "f16", "q8_0"), default="f32")
    p.add_argument("--pre", help="override the detected llama.cpp pre-tokenizer name")
    p.set_defaults(func=cmd_export_gguf)
