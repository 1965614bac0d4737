"""Training data: sources (OpenMoji default, image folders, HF datasets, tfds), decoding and
resizing, and the deterministic, resumable grain pipeline.

    source = build_source(config.data)
    iterator = make_iterator(config, text_cache=cache, source=source)
    batch = next(iterator)        # {'image', ['lowres'], 'text_embs', 'text_mask'}
    state = iterator.get_state()  # JSON-serialisable; iterator.set_state(state) resumes

The pipeline names are loaded lazily (grain imports JAX), so worker processes that only
decode images stay light.
"""

from imagen_jax.data.sources import DataError, Source, build_source

_PIPELINE_NAMES = ('make_dataset', 'make_iterator', 'sample_captions', 'per_host_batch_size')

__all__ = ['DataError', 'Source', 'build_source', *_PIPELINE_NAMES]


def __getattr__(name: str):
  if name in _PIPELINE_NAMES:
    from imagen_jax.data import pipeline

    return getattr(pipeline, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
