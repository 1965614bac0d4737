"""Precomputes the frozen T5 embeddings of a dataset's captions into the on-disk cache.

  python -m imagen_jax.precompute --config=configs/base64.py --workdir=runs/base64
  python -m imagen_jax.precompute --config=configs/base64.py --config.text.encoder=t5-tiny-random

Reads the captions from `config.data` (imagen_jax.data.sources), encodes them with
`config.text.encoder` on all local devices (batch sharded over a ('data', 'fsdp') mesh, the
encoder's matrices sharded over the same devices) and writes `config.text.cache_dir/<key>/`.
An interrupted run resumes from its last finished shard. train.py calls `open_or_build_cache`.
"""

from __future__ import annotations

import logging
import math
import os
import pathlib

import jax
import ml_collections
import numpy as np

from imagen_jax.text import cache as cache_lib

log = logging.getLogger(__name__)


def make_encoder_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh | None:
  """A ('data', 'fsdp') mesh over this process's devices; None when there is only one device.

  Uses `config.mesh.fsdp` when it divides the device count (-1 takes all devices); the
  'data' axis takes the rest.
  """
  devices = jax.local_devices()
  if len(devices) == 1:
    return None
  fsdp = int(config.mesh.get('fsdp', 1)) if 'mesh' in config else 1
  if fsdp == -1:
    fsdp = len(devices)
  if fsdp < 1 or len(devices) % fsdp:
    log.warning('config.mesh.fsdp=%d does not divide %d devices; using fsdp=1.', fsdp, len(devices))
    fsdp = 1
  grid = np.asarray(devices).reshape(len(devices) // fsdp, fsdp)
  auto = jax.sharding.AxisType.Auto
  return jax.sharding.Mesh(grid, ('data', 'fsdp'), axis_types=(auto, auto))


def _batch_size(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None) -> int:
  """config.text.precompute_batch_size rounded up to a multiple of the device count."""
  batch = int(config.text.get('precompute_batch_size', 64))
  devices = 1 if mesh is None else mesh.devices.size
  return math.ceil(batch / devices) * devices


def resolve_cache_dir(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> None:
  """Make a relative `text.cache_dir` relative to the run folder `workdir` (in place)."""
  cache_dir = pathlib.Path(config.text.cache_dir).expanduser()
  if not cache_dir.is_absolute():
    config.text.cache_dir = str(pathlib.Path(workdir).expanduser().absolute() / cache_dir)


def _source(config: ml_collections.ConfigDict):
  from imagen_jax.data import sources

  return sources.build_source(config.data)


def precompute(config: ml_collections.ConfigDict) -> cache_lib.EmbeddingCache:
  """Encodes every caption of `config.data` into the cache (resuming a partial build)."""
  from imagen_jax.text import encoder as encoder_lib

  source = _source(config)
  captions = list(source.captions())
  fingerprint = source.fingerprint()
  mesh = make_encoder_mesh(config)
  log.info(
    'Precomputing %s embeddings of %d captions (max_length %d) on %d device(s) into %s.',
    config.text.encoder,
    len(captions),
    config.text.max_length,
    1 if mesh is None else mesh.devices.size,
    config.text.cache_dir,
  )
  encoder = encoder_lib.load_text_encoder(
    config.text.encoder,
    max_length=config.text.max_length,
    dtype=config.text.get('dtype', 'bfloat16'),
    mesh=mesh,
  )
  cache = cache_lib.build_cache(
    config.text.cache_dir,
    captions,
    encoder,
    dataset_fingerprint=fingerprint,
    shard_size=int(config.text.get('cache_shard_size', 4096)),
    batch_size=_batch_size(config, mesh),
    progress=True,
  )
  log.info('Embedding cache ready: %s %s', cache.path, cache.stats())
  return cache


def open_or_build_cache(
  config: ml_collections.ConfigDict, *, build_if_missing: bool
) -> cache_lib.EmbeddingCache:
  """Opens the cache for (config.text, config.data); builds / resumes it if allowed.

  Raises CacheError (naming the fix) when it is missing, stale or incomplete and
  `build_if_missing` is False.
  """
  source = _source(config)
  try:
    return cache_lib.EmbeddingCache.open(
      config.text.cache_dir,
      encoder_name=config.text.encoder,
      max_length=config.text.max_length,
      dataset_fingerprint=source.fingerprint(),
    )
  except cache_lib.CacheError as e:
    if not build_if_missing:
      raise
    log.warning('%s Building it now.', e)
  return precompute(config)


def _run_cli() -> None:
  from absl import app, flags
  from ml_collections import config_flags

  from imagen_jax import cli

  config_flag = config_flags.DEFINE_config_file(
    'config', None, 'Stage config file, e.g. configs/base64.py.', lock_config=True
  )
  workdir_flag = flags.DEFINE_string(
    'workdir',
    None,
    'The run folder train.py will use: a relative text.cache_dir is taken '
    'relative to it, as train.py does (without it: relative to the current directory).',
  )

  def main(argv) -> None:
    if len(argv) > 1:
      raise app.UsageError(f'Unexpected arguments {argv[1:]}; use --config.<field>=... overrides.')
    if config_flag.value is None:
      raise app.UsageError('--config is required, e.g. --config=configs/base64.py.')
    config = config_flag.value
    if workdir_flag.value:
      resolve_cache_dir(config, workdir_flag.value)
    cache = precompute(config)
    print(cache.path)

  cli.run(main)


if __name__ == '__main__':
  _run_cli()
