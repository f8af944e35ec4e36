"""Model specs as users write them -> something the decoding engine can step: a local
model directory (any format `lmlab.hub` opens) or a black-box OpenAI-compatible endpoint
(a URL), the latter usable as a proxy-tuning member."""
from __future__ import annotations

from typing import Any, Sequence

from lmlab.errors import LmlabError


def is_url(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


def open_tokenizer(model: str, tokenizer: str | None = None):
    """The tokenizer named, or the one stored with `model` (a URL needs one named)."""
    from lmlab.tokenizer import Tokenizer

    if is_url(model) and not tokenizer:
        raise LmlabError("a remote base model needs --tokenizer (the vocabulary all members share)")
    return Tokenizer.load(tokenizer or model)


def open_member(spec: str, tokenizer: Any = None, prompts: Sequence[Sequence[int]] = (),
                remote_model: str = "default", remote_top_k: int = 20, device: str = "cpu"):
    """A local model in eval mode, or a `RemoteMember` for a URL (it needs the shared
    tokenizer and the prompts it will be asked to continue)."""
    if is_url(spec):
        from lmlab.decode.remote import RemoteMember

        return RemoteMember(spec, remote_model, tokenizer, prompts, top_k=remote_top_k)
    from lmlab.hub import load_model

    return load_model(spec, device=device).eval()


def require_weights(spec: str, what: str) -> None:
    if is_url(spec):
        raise LmlabError(f"a URL model works only as a proxy-tuning member; {what} needs weights")
