"""Shared helpers for tests that use transformers as the numerical oracle: build a tiny
random model of any HF causal-LM class, save it, and compare logits."""
from __future__ import annotations

import torch

TOL = 1e-5  # max abs logit difference allowed in float32


def randomize(model: torch.nn.Module, std: float = 0.1, embed_std: float = 0.02) -> torch.nn.Module:
    """Weights large enough that a wrong layout moves the logits far beyond TOL; norm weights
    around 1 but not equal to it, so a norm mix-up shows; the embedding keeps HF's small
    scale so that the first norm's eps matters."""
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            elif "embed" in name:
                p.copy_(embed_std * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(std * torch.randn(p.shape, generator=gen))
    return model


def tiny_hf_model(model_cls, config_cls, **kw):
    """A random-init eager-attention HF model in float32 eval mode."""
    config = config_cls(**kw)
    config._attn_implementation = "eager"
    model = model_cls(config).eval()
    return randomize(model)


@torch.no_grad()
def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@torch.no_grad()
def incremental_logits(model, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Our model with its KV cache: `prefill` tokens in one call, then one token per call."""
    cache = model.new_cache(ids.shape[0], ids.shape[1])
    out = [model(ids[:, :prefill], cache=cache)]
    for t in range(prefill, ids.shape[1]):
        out.append(model(ids[:, t:t + 1], cache=cache))
    return torch.cat(out, dim=1)
