"""lmlab: a hackable, from-scratch PyTorch lab for the whole life of a language model."""
from lmlab.config import ModelConfig, get_preset
from lmlab.errors import LmlabError
from lmlab.model import KVCache, Transformer, build_model

__version__ = "0.1.0"


def load_model(path, device="cpu", dtype=None):
    """Load an lmlab checkpoint directory (or a Hugging Face one) as a Transformer."""
    from lmlab.checkpoint import load_model as _load

    return _load(path, device=device, dtype=dtype)


__all__ = ["ModelConfig", "get_preset", "LmlabError", "KVCache", "Transformer", "build_model", "load_model"]
