from lmlab.model.cache import KVCache
from lmlab.model.transformer import Transformer, build_model, count_parameters

__all__ = ["KVCache", "Transformer", "build_model", "count_parameters"]
