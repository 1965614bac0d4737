"""Frozen T5 text encoder (our NNX port + HF checkpoint loading), tokenizer, embedding cache.

Submodules: `t5` (model + safetensors loading), `tokenizer`, `encoder` (TextEncoder,
load_text_encoder), `cache` (EmbeddingCache, build_cache). Names below are re-exported
lazily so that `from imagen_jax.text import cache` in data-loader workers does not import
jax, flax or transformers.
"""

import importlib

_EXPORTS = {
  'CacheError': 'cache',
  'CaptionNotCachedError': 'cache',
  'EmbeddingCache': 'cache',
  'build_cache': 'cache',
  'cache_key': 'cache',
  'TINY_RANDOM': 'encoder',
  'TextEncoder': 'encoder',
  'load_text_encoder': 'encoder',
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name in _EXPORTS:
    module = importlib.import_module(f'{__name__}.{_EXPORTS[name]}')
    return getattr(module, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
