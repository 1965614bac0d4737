r"""Precomputes the frozen T5 embeddings of a dataset's captions into the on-disk cache.

  python -m imagen_jax.precompute --config=configs/base64.py --workdir=runs/base64
  python -m imagen_jax.precompute --config=configs/base64.py --config.text.encoder=t5-tiny-random
  # several hosts (same command on each; text.cache_dir on shared storage):
  python -m imagen_jax.precompute --config=configs/base64.py --workdir=/shared/runs/base64 \
      --distributed
  # check every file of a complete cache against its checksums; re-encode only damaged shards:
  python -m imagen_jax.precompute --config=configs/base64.py --workdir=runs/base64 --verify

Reads the captions from `config.data` (imagen_jax.data.sources), encodes them with
`config.text.encoder` on all local devices (batch sharded over a ('data', 'fsdp') mesh, the
encoder's matrices sharded over the same devices) and writes `config.text.cache_dir/<key>/`.
With several JAX processes, each one encodes its share of the cache's shards on its own
devices (`cache.shard_assignment`) and process 0 completes the manifest; the files are the
same bytes as a one-process build. An interrupted run resumes with the shards not yet done.
train.py calls `open_or_build_cache` on every process.
"""

from __future__ import annotations

import logging
import math
import os
import pathlib
import signal
from typing import Any

import jax
import ml_collections
import numpy as np

from imagen_jax import multihost
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


TEXT_DTYPES = ('bfloat16', 'float32')


def check_text_dtype(config: ml_collections.ConfigDict) -> None:
  """ValueError naming the fix when `text.dtype` is not one the T5 encoder runs in (a typo such
  as 'bf16' failed as a TypeError in the encoder, after the dataset was listed)."""
  dtype = config.text.get('dtype', 'bfloat16')
  if dtype not in TEXT_DTYPES:
    raise ValueError(
      f'text.dtype={dtype!r}: the T5 encoder runs in bfloat16 or float32; pass '
      '--config.text.dtype=bfloat16 (the default) or float32.'
    )


def resolve_cache_dir(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> None:
  """Make a relative `text.cache_dir` relative to the run folder `workdir`, and '~' the home
  folder (in place). A quoted or `--flag=~/x` path reaches the program unexpanded; kept so, the
  cache went to a folder named '~' under the current directory."""
  cache_dir = pathlib.Path(config.text.cache_dir).expanduser()
  if not cache_dir.is_absolute():
    cache_dir = pathlib.Path(workdir).expanduser().absolute() / cache_dir
  config.text.cache_dir = str(cache_dir)


class JaxProcesses:
  """`cache.Processes` over the JAX processes (`jax.distributed.initialize`d)."""

  def __init__(self):
    self.index = jax.process_index()
    self.count = jax.process_count()

  def barrier(self, name: str) -> None:
    multihost.barrier(f'imagen_jax:{name}')

  def allgather(self, value: Any) -> list[Any]:
    """JSON values of every process, in process order."""
    return multihost.allgather_json(value)


def encoder_id(config: ml_collections.ConfigDict) -> str:
  """The encoder as the cache names it: `text.encoder`; for a local checkpoint folder plus
  `#` and a digest of the checkpoint it holds (`t5.folder_fingerprint`: other weights or
  tokenizer files in the same folder make another cache); plus `@dtype` when the encoder does
  not compute in the default bfloat16 (the stored values differ, so the caches must too)."""
  from imagen_jax.text import t5

  name = str(config.text.encoder)
  fingerprint = t5.folder_fingerprint(name)
  if fingerprint is not None:
    name = f'{name}#{fingerprint}'
  revision = str(config.text.get('revision') or '')
  if revision and fingerprint is None:  # a hub name at another revision: other weights
    name = f'{name}#{revision}'
  dtype = str(config.text.get('dtype', 'bfloat16'))
  return name if dtype == 'bfloat16' else f'{name}@{dtype}'


def record_encoder_fingerprint(config: ml_collections.ConfigDict) -> None:
  """Set `text.encoder_fingerprint` (in place; '' for a Hub name): the digest of the T5
  checkpoint a local `text.encoder` folder holds now (`t5.folder_fingerprint`). train.py saves
  it with every checkpoint, so that sampling can tell when that folder holds other weights."""
  from imagen_jax.text import t5

  with config.unlocked():
    config.text.encoder_fingerprint = t5.folder_fingerprint(str(config.text.encoder)) or ''


def check_encoder_unchanged(config: ml_collections.ConfigDict) -> None:
  """Warn when a run's local T5 folder now holds another checkpoint than the one it trained
  with (its saved `text.encoder_fingerprint`): prompts would be encoded by another model than
  the one whose embeddings the U-Net learned, and the images would not follow them."""
  from imagen_jax.text import t5

  saved = str(config.text.get('encoder_fingerprint') or '')
  now = t5.folder_fingerprint(str(config.text.encoder)) or ''
  if saved and now and saved != now:
    log.warning(
      'The T5 folder %s holds another checkpoint than the one this model trained with '
      '(fingerprint %s then, %s now): its prompt embeddings will not be the ones the model '
      'learned. Put the training checkpoint back in that folder.',
      config.text.encoder,
      saved,
      now,
    )


def load_encoder(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None):
  """The text encoder `config.text` names (encoder, max_length, dtype, Hub revision) on `mesh`."""
  from imagen_jax.text import encoder as encoder_lib

  return encoder_lib.load_text_encoder(
    config.text.encoder,
    max_length=int(config.text.max_length),
    dtype=config.text.get('dtype', 'bfloat16'),
    mesh=mesh,
    revision=config.text.get('revision') or None,
  )


def unloadable_encoder(config: ml_collections.ConfigDict, error: Exception) -> str:
  """'was trained with the text encoder E ..., which cannot be loaded: why': the end of
  sample.py's and evaluate.py's line when a restored run's T5 (its folder moved, a Hub name
  offline) raises T5CheckpointError."""
  return (
    f'was trained with the text encoder {config.text.encoder!r} (its saved config.text.encoder), '
    f'which cannot be loaded: {error} The model needs the encoder it trained with.'
  )


def processes() -> cache_lib.Processes:
  """The processes that build a cache together: all JAX processes, or this one alone."""
  return JaxProcesses() if jax.process_count() > 1 else cache_lib.SingleProcess()


def _source(config: ml_collections.ConfigDict):
  from imagen_jax.data import sources

  return sources.build_source(config.data)


def precompute(
  config: ml_collections.ConfigDict, *, progress: bool = True, source=None, verify: bool = False
) -> cache_lib.EmbeddingCache:
  """Encodes every caption of `config.data` into the cache (resuming a partial build), or
  links a complete cache of the same captions built under another dataset fingerprint.

  With several JAX processes, every process must call this (see `open_or_build_cache`).
  `source`: the data source of `config.data` when the caller already built it (listing a large
  dataset takes time). `verify`: a complete cache is read whole and checked against its
  checksums (`verify_cache`); its damaged shards, if any, are encoded again.
  """

  check_text_dtype(config)  # before the dataset is listed
  source = _source(config) if source is None else source
  captions = list(source.captions())
  fingerprint = source.fingerprint()
  mesh = make_encoder_mesh(config)
  procs = processes()
  log.info(
    'Precomputing %s embeddings of %d captions (max_length %d) on %d device(s) of process %d '
    'of %d into %s.',
    config.text.encoder,
    len(captions),
    config.text.max_length,
    1 if mesh is None else mesh.devices.size,
    procs.index,
    procs.count,
    config.text.cache_dir,
  )
  cache_dir = pathlib.Path(config.text.cache_dir).expanduser()
  try:  # before the encoder loads (minutes for T5-XXL)
    multihost.check_writable(cache_dir)
  except OSError as e:
    raise cache_lib.CacheError(
      f'Cannot write the embedding cache folder {str(cache_dir)!r} ({e.strerror or e}); pass a '
      'writable --config.text.cache_dir.'
    ) from e
  if verify:
    cache = verify_cache(config, fingerprint, procs, progress=progress)
    if cache is not None:
      return cache
  # The same captions cached under another fingerprint (images touched, moved or copied): reuse.
  adopted = None
  if procs.index == 0:
    try:
      adopted = cache_lib.adopt_matching_cache(
        config.text.cache_dir,
        captions,
        encoder_id=encoder_id(config),
        max_length=config.text.max_length,
        dataset_fingerprint=fingerprint,
      )
    except OSError as e:
      raise cache_lib.CacheError(
        f'Linking an existing embedding cache of these captions in {str(cache_dir)!r} failed '
        f'({e.strerror or e}); free space or fix the folder, then rerun.'
      ) from e
  adopted_path = procs.allgather(None if adopted is None else str(adopted.path))[0]
  if adopted_path is not None:
    return adopted or open_cache(config, fingerprint)
  encoder = load_encoder(config, mesh)
  try:
    cache = cache_lib.build_cache(
      config.text.cache_dir,
      captions,
      encoder,
      dataset_fingerprint=fingerprint,
      shard_size=int(config.text.get('cache_shard_size', 4096)),
      batch_size=_batch_size(config, mesh),
      progress=progress and procs.index == 0,
      processes=procs,
      encoder_id=encoder_id(config),
    )
  except OSError as e:  # a full or failing disk: what was finished is kept, the rest redone
    raise cache_lib.CacheError(
      f'Writing the embedding cache in {str(cache_dir)!r} failed ({e.strerror or e}); the shards '
      'finished so far are kept. Free space or fix the folder, then rerun: the build resumes.'
    ) from e
  log.info('Embedding cache ready: %s %s', cache.path, cache.stats())
  return cache


def open_cache(config: ml_collections.ConfigDict, fingerprint: str) -> cache_lib.EmbeddingCache:
  """The complete cache of `config.text` for the dataset `fingerprint`
  (`EmbeddingCache.open`: CacheError when it is missing, stale or incomplete)."""
  return cache_lib.EmbeddingCache.open(
    config.text.cache_dir,
    encoder_name=encoder_id(config),
    max_length=config.text.max_length,
    dataset_fingerprint=fingerprint,
  )


def verify_cache(
  config: ml_collections.ConfigDict,
  fingerprint: str,
  procs: cache_lib.Processes,
  *,
  progress: bool = True,
) -> cache_lib.EmbeddingCache | None:
  """The complete cache of `config`, every file read and checked against its checksums (each
  process reads its share of the shards): the cache when every shard is intact, else None
  after process 0 dropped the damaged shards (`cache.drop_shards`), so that the build that
  follows encodes only those. None, with nothing changed, when there is no complete cache.
  Says what it found (with `progress` on stderr too), on process 0."""

  def say(message: str) -> None:
    if procs.index == 0:
      cache_lib.say(message, progress)

  try:
    cache = open_cache(config, fingerprint)
  except cache_lib.CacheError as e:
    say(f'No complete cache to verify ({e}); building it.')
    return None
  gathered = procs.allgather(cache_lib.find_damaged_shards(cache, procs.index, procs.count))
  damaged = sorted((i, problem) for part in gathered for i, problem in part)
  shards = len(cache.manifest['shards'])
  checked = all('crc32' in s for s in cache.manifest['shards'])
  if not damaged:
    how = (
      'every file against its CRC-32'
      if checked
      else 'built without checksums: only their structure was checked'
    )
    say(f'Embedding cache {cache.path}: all {shards} shards are intact ({how}).')
    return cache
  listed = '; '.join(f'shard {i}: {problem}' for i, problem in damaged[:10])
  say(
    f'Embedding cache {cache.path}: {len(damaged)} of {shards} shards are damaged; encoding '
    f'them again ({listed}{"; ..." if len(damaged) > 10 else ""}).'
  )
  if procs.index == 0:
    cache_lib.drop_shards(cache.path, [i for i, _ in damaged])
  procs.barrier('embedding_cache_verified')
  return None


def open_or_build_cache(
  config: ml_collections.ConfigDict, *, build_if_missing: bool, source=None
) -> cache_lib.EmbeddingCache:
  """Opens the cache for (config.text, config.data); builds / resumes it if allowed.

  Call it on every process of a multi-process run: when the cache is missing or
  incomplete, all processes build it together (each its share of the shards, on its own
  devices) and all return the same opened cache; `text.cache_dir` must be on storage they
  share. Raises CacheError (naming the fix, the same on every process) when it is missing,
  stale or incomplete and `build_if_missing` is False. `source`: as `precompute`'s.
  """
  check_text_dtype(config)  # before the dataset is listed
  source = _source(config) if source is None else source
  procs = processes()
  try:
    cache, problem = open_cache(config, source.fingerprint()), None
  except cache_lib.CacheError as e:
    cache, problem = None, str(e)
  # Every process takes the same branch (a barrier inside build_cache would hang otherwise).
  problems = procs.allgather(problem)
  first = next(((i, p) for i, p in enumerate(problems) if p), None)
  if first is None:
    return cache
  if not build_if_missing:
    index, message = first
    raise cache_lib.CacheError(message if procs.count == 1 else f'process {index}: {message}')
  if procs.index == 0:
    log.warning('%s Building it now.', first[1])
  return precompute(config, source=source)


EXIT_STOPPED = 75  # as train.py and sample.py: stopped by a signal, resumable


def _run_cli() -> None:
  from absl import flags
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

  verify_flag = flags.DEFINE_bool(
    'verify',
    False,
    'Read every file of the complete cache and check it against its checksums; encode the '
    'damaged shards (only those) again.',
  )

  # --distributed: run the same command on every host; each encodes its share of the captions
  # (text.cache_dir on shared storage).
  cli.define_distributed_flags()
  flags.adopt_module_key_flags(cli)  # --helpshort lists them too

  def main(argv) -> None:
    if len(argv) > 1:
      cli.fail(f'Unexpected arguments {argv[1:]}; use --config.<field>=... overrides.')
    if config_flag.value is None:
      cli.fail('--config is required, e.g. --config=configs/base64.py.')
    cli.check_distributed_flags()
    cli.keep_freed_host_buffers()
    if flags.FLAGS.distributed:
      cli.initialize_distributed()
    # SIGTERM stops the build like Ctrl-C. After jax.distributed.initialize, JAX's preemption
    # notifier held it and nothing read it: a multi-host encode went on until SIGKILL.
    signal.signal(signal.SIGTERM, cli.raise_stop)
    config = config_flag.value
    if workdir_flag.value:
      resolve_cache_dir(config, workdir_flag.value)
    # One line for DataError, CacheError, T5CheckpointError and a peer that never came.
    try:  # a complete cache is opened, not rebuilt (no encoder load, no write)
      from imagen_jax import train_lib

      train_lib.check_data_and_text(config, present_only=True)  # what train.py would refuse
      if verify_flag.value:
        cache = precompute(config, verify=True)
      else:
        cache = open_or_build_cache(config, build_if_missing=True)
    except (ValueError, FileNotFoundError, multihost.PeersLostError) as e:
      cli.fail(str(e), code=1)
    except KeyboardInterrupt as e:  # through cli.fail: with --distributed the others stop too
      cli.fail(
        f'stopped ({cli.stop_name(e)}); the shards encoded so far are kept: '
        'run the same command again to encode the rest.',
        EXIT_STOPPED,
        prefix='',
        now=True,  # the encoder may be compiling in XLA's threads; finished shards are complete
      )
    if jax.process_index() == 0:
      print(cache.path)

  cli.run(main)


if __name__ == '__main__':
  _run_cli()
