"""lm-evaluation-harness runs lmlab checkpoints directly: model name "lmlab".

    import lm_eval
    from lmlab.eval.lm_eval_adapter import register
    register()   # lm-eval finds no plugins by itself; this adds "lmlab" to its registry
    lm_eval.simple_evaluate(model="lmlab", model_args="pretrained=runs/x/sft/model", tasks=[...])

Importing this module needs lm-eval (`pip install 'lmlab[test]'`); nothing in the core
imports it. Scores come from the same code as `lmlab eval`: log-likelihoods from
`lmlab.eval.scoring.score_pairs` (the one masked log-prob primitive), rolling log-likelihoods
from the same windows as `lmlab eval perplexity`, generation from `lmlab.decode.generate`.

model_args: pretrained (a model directory lmlab.load_model opens), tokenizer (default: the
one in it), device (cpu), precision (auto), batch_size (16), max_length (default: the
model's context), add_bos_token (default: as the checkpoint's tokenizer does, which is BOS
for lmlab's own; false scores bare text as lm-eval's API models send it), max_gen_toks (256).
"""
from __future__ import annotations

from importlib import import_module

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from lmlab.errors import LmlabError

MODEL_NAME = "lmlab"
# lm-eval fills its registry with its own (lazy) models only when it finds the registry
# empty; registering "lmlab" first would hide them all (local-completions, hf, ...).
import_module("lm_eval.models")


def _as_bool(value) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise LmlabError(f"add_bos_token must be true or false, got {value!r}")


def _batch_size(value, default: int = 16) -> int:
    if value is None or (isinstance(value, str) and value.startswith("auto")):
        return default
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise LmlabError(f"batch_size must be a positive integer (or auto), got {value!r}") from None
    if size <= 0:
        raise LmlabError(f"batch_size must be positive, got {size}")
    return size


@register_model(MODEL_NAME)
class LmlabLM(TemplateLM):
    """An lmlab model behind lm-eval's `LM` interface. Pass `pretrained` (a directory) or a
    loaded `model` with its `tokenizer` object."""

    def __init__(self, pretrained=None, tokenizer=None, model=None, device: str = "cpu", precision: str = "auto",
                 batch_size=16, max_length=None, add_bos_token=None, max_gen_toks=256, **kwargs) -> None:
        super().__init__()
        from lmlab.precision import resolve

        if model is None:
            if pretrained is None:
                raise LmlabError("the lmlab lm-eval model needs model_args pretrained=DIR (an lmlab or Hugging "
                                 "Face model directory)")
            from lmlab.hub import load_model

            model = load_model(pretrained, device=device)
        if tokenizer is None or isinstance(tokenizer, str):
            from lmlab.tokenizer import Tokenizer

            source = tokenizer or pretrained
            if source is None:
                raise LmlabError("pass the tokenizer along with a loaded model")
            tokenizer = Tokenizer.load(source)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.precision = resolve(precision, next(model.parameters()).device)
        self.batch_size = _batch_size(batch_size)
        context = int(model.config.max_seq_len)
        self._max_length = int(max_length) if max_length else context
        if not 1 <= self._max_length <= context:
            raise LmlabError(f"max_length must be in 1..{context} (the model's context), got {max_length}")
        self.add_bos_token = _as_bool(add_bos_token)
        self.max_gen_toks = int(max_gen_toks)
        self._device = next(model.parameters()).device
        self._name = str(pretrained) if pretrained is not None else type(model).__name__

    # ---- what TemplateLM asks for -------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_id
        if eos is None:
            raise LmlabError("the tokenizer has no EOS token, which lm-eval needs as end of text")
        return int(eos)

    @property
    def prefix_token_id(self) -> int:
        from lmlab.eval.scoring import prefix_token

        return prefix_token(self.tokenizer)

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return f"lmlab:{self._name}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        from lmlab.eval.scoring import encode_text

        if add_special_tokens is None:
            add_special_tokens = True if self.add_bos_token is None else self.add_bos_token
        return encode_text(self.tokenizer, string, add_special_tokens)

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(list(tokens))

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        from lmlab.eval.scoring import score_pairs

        pairs = [(ctx, cont) for _, ctx, cont in requests]
        out = score_pairs(self.model, pairs, batch_size=self.batch_size, precision=self.precision,
                          max_len=self.max_length)
        for (key, _, _), answer in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lmlab.eval.perplexity import document_loglikelihoods

        texts = [req.args[0] for req in requests]
        docs = document_loglikelihoods(self.model, self.tokenizer, texts, max_len=self.max_length,
                                       batch_size=self.batch_size, precision=self.precision)
        out = []
        for text, (logp, _) in zip(texts, docs):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), logp)
            out.append(logp)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with temperature > 0) text until one of `until` or EOS."""
        import torch

        from lmlab.decode.generate import generate

        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        parsed = []
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            kw = dict(gen_kwargs or {})
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.pop("max_gen_toks", kw.pop("max_new_tokens", self.max_gen_toks)))
            temperature = float(kw.pop("temperature", 0.0)) if kw.pop("do_sample", True) else 0.0
            parsed.append((context, until, max_new, temperature))
            groups.setdefault(repr((until, max_new, temperature)), []).append(i)
        for idx in groups.values():
            _, until, max_new, temperature = parsed[idx[0]]
            if max_new >= self.max_length:
                raise LmlabError(f"max_gen_toks {max_new} leaves no room for a prompt in the model's context of "
                                 f"{self.max_length}")
            keep = self.max_length - max_new
            for s in range(0, len(idx), self.batch_size):
                chunk = idx[s:s + self.batch_size]
                prompts = [self.tok_encode(parsed[i][0])[-keep:] or [self.prefix_token_id] for i in chunk]
                with torch.no_grad(), self.precision.autocast():
                    gens = generate(self.model, prompts, max_new, temperature=temperature, eos_id=self.eot_token_id,
                                    stop=until or None, decode=self.tokenizer.decode, seed=1234)
                for i, g in zip(chunk, gens):
                    out[i] = g.text
                    self.cache_hook.add_partial("generate_until", requests[i].args, g.text)
        return out  # type: ignore[return-value]


def register() -> type:
    """Make sure "lmlab" is in lm-eval's model registry (importing this module does it)."""
    return LmlabLM
