"""Stage `sample`: a few sampled continuations from the pretrained model -> sample/samples.txt,
at the precision the model was trained in."""
from __future__ import annotations

from dataclasses import dataclass

NEEDS = ("tokenizer", "pretrain")
SECTIONS = ("sample", "train")


@dataclass(frozen=True)
class SampleConfig:
    prompts: tuple[str, ...] = ("The",)
    max_new_tokens: int = 40
    temperature: float = 0.8
    top_k: int | None = 40
    top_p: float | None = None
    seed: int = 0


CONFIG = ("sample", SampleConfig)


def run(ctx) -> None:
    import torch

    from lmlab.decode.generate import generate
    from lmlab.hub import load_model
    from lmlab.io import write_text_atomic
    from lmlab.precision import resolve
    from lmlab.stages.common import model_dir, tokenizer_file
    from lmlab.tokenizer import Tokenizer

    s, train = ctx.recipe.sample, ctx.recipe.train
    tok = Tokenizer.load(tokenizer_file(ctx.run_dir))
    model = load_model(model_dir(ctx.run_dir, "pretrain"), device=train.device).eval()
    prompts = [tok.encode(p, add_bos=True) for p in s.prompts]
    with torch.no_grad(), resolve(train.precision, train.device).autocast():
        outs = generate(model, prompts, s.max_new_tokens, temperature=s.temperature,
                        top_k=s.top_k, top_p=s.top_p, eos_id=tok.eos_id, seed=s.seed)
    lines = []
    for prompt, out in zip(s.prompts, outs):
        text = prompt + tok.decode(out.tokens)
        lines.append(text)
        ctx.echo(f"--- sample: {text!r}")
    write_text_atomic(ctx.out / "samples.txt", "\n\n".join(lines) + "\n")
