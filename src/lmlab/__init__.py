"""lmlab: a hackable, from-scratch PyTorch lab for the whole life of a language model."""
from lmlab.config import ModelConfig, get_preset
from lmlab.errors import LmlabError
from lmlab.model import KVCache, Transformer, build_model

__version__ = "0.1.0"


def load_model(path, device="cpu", dtype=None, merge_adapters=True):
    """Open a model in any format `lmlab.hub` recognises (lmlab checkpoints of every kind,
    Hugging Face directories)."""
    from lmlab.hub import load_model as _load

    return _load(path, device=device, dtype=dtype, merge_adapters=merge_adapters)


__all__ = ["ModelConfig", "get_preset", "LmlabError", "KVCache", "Transformer", "build_model", "load_model"]
