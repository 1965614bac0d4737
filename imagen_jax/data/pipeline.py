"""Deterministic, resumable training input pipeline on grain.

    source --> shuffle (seeded, re-shuffled every epoch) --> repeat forever
      --> this process's block of every global batch --> decode + resize/crop (random_map:
      per-example RNG from the seed and the example's index) --> threads / worker processes
      (prefetch) --> [main process] drop + count skipped examples, batch, look up text embeddings

One global order for any number of processes: global batch t is elements [t*B, (t+1)*B) of
the shuffled stream, and process i of n reads its contiguous block [t*B + i*B/n, t*B +
(i+1)*B/n). So (without skipped files) the global batches are the same for 1 or N hosts, and
`convert_states` maps the saved positions of N processes onto M.

Every random choice is a function of (config.seed, index), so the batches are the same
for any number of reader threads or worker processes, and `iterator.get_state()` (a small
JSON-serialisable dict) restores the exact position: a resumed run sees exactly the
batches it would have seen. A state can only be restored into an iterator built with the
same config and the same `data.num_workers` (grain's worker states differ in shape).

Skipped examples (unreadable, truncated, empty, non-image, decompression-bomb or too-small
files) travel as markers from the workers to the main process, where they are logged
(naming the file), counted and dropped. So the counts are exact and global for this host,
however many workers there are, and they are part of the iterator state. Rule: once
`min(100, epoch length)` examples have been seen (i.e. after 100 examples, or after the
first epoch of a smaller dataset), the run aborts with `DataError` whenever
skipped / seen > `data.max_skip_fraction`. One bad file in the first few examples of a
larger dataset therefore does not abort; a dataset that stays mostly bad does.
"""

import logging
import os
from typing import Any

import grain
import numpy as np

from imagen_jax.data import preprocess
from imagen_jax.data.sources import DataError, Source, build_source

log = logging.getLogger(__name__)

MIN_SEEN_FOR_SKIP_CHECK = 100
_MAX_LOGGED_SKIPS = 50
_PRECOMPUTE_HINT = 'python -m imagen_jax.precompute --config=<the same config file>'


class _ProcessRecord(grain.transforms.RandomMap):
  """Decodes and resizes one record; a skipped record becomes `{'skip': reason, 'id'}`."""

  def __init__(self, options: preprocess.PreprocessOptions):
    self.options = options

  def random_map(self, record: dict, rng: np.random.Generator) -> dict:
    try:
      image, lowres = preprocess.load_and_preprocess(record['image'], self.options, rng)
    except preprocess.SkipExample as e:
      return {'skip': str(e), 'id': record['id']}
    out = {'image': image, 'caption': record['caption'], 'id': record['id']}
    if lowres is not None:
      out['lowres'] = lowres
    return out


def lookup_text(text_cache: Any, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
  """Per-caption cached embeddings, zero-padded to max_length.

  Returns (text_embs [B, L, D] float32, text_mask [B, L] bool), L = text_cache.max_length.
  """
  length, dim = int(text_cache.max_length), int(text_cache.dim)
  text_embs = np.zeros((len(captions), length, dim), np.float32)  # [B, L, D]
  text_mask = np.zeros((len(captions), length), bool)  # [B, L]
  for i, caption in enumerate(captions):
    try:
      embs = np.asarray(text_cache.get(caption))  # [n_tokens, D]
    except KeyError as e:
      raise DataError(
        f'Caption {caption!r} is not in the text-embedding cache ({e}). The cache must be '
        f'built for this dataset and text encoder: run `{_PRECOMPUTE_HINT}`.'
      ) from e
    if embs.ndim != 2 or embs.shape[1] != dim:
      raise DataError(
        f'Cached embedding for {caption!r} has shape {embs.shape}, expected [n, {dim}]; '
        f'the cache is stale or corrupt: delete it and run `{_PRECOMPUTE_HINT}`.'
      )
    n = min(embs.shape[0], length)
    text_embs[i, :n] = embs[:n].astype(np.float32)
    text_mask[i, :n] = True
  return text_embs, text_mask


class _BatchIterator(grain.DatasetIterator):
  """Main-process end of the pipeline: skip accounting, batching, text lookup."""

  def __init__(self, parent: grain.DatasetIterator, spec: '_BatchIterDataset'):
    super().__init__(parent)
    self._spec = spec
    self.num_seen = 0
    self.num_skipped = 0
    self._logged = 0

  def _record_skip(self, element: dict) -> None:
    spec = self._spec
    self.num_skipped += 1
    if self._logged < _MAX_LOGGED_SKIPS:
      log.warning('%s: skipping %s: %s', spec.source_name, element['id'], element['skip'])
      self._logged += 1
      if self._logged == _MAX_LOGGED_SKIPS:
        log.warning('%s: further skipped files are only counted.', spec.source_name)

  def _check_skip_fraction(self) -> None:
    spec = self._spec
    if self.num_seen < min(MIN_SEEN_FOR_SKIP_CHECK, spec.epoch_length):
      return
    fraction = self.num_skipped / self.num_seen
    if fraction > spec.max_skip_fraction:
      raise DataError(
        f'{spec.source_name}: {self.num_skipped} of {self.num_seen} examples seen were '
        f'unusable ({fraction:.1%} > data.max_skip_fraction={spec.max_skip_fraction}); '
        'the warnings above name the files. Fix or remove them, or raise '
        '--config.data.max_skip_fraction.'
      )

  def __next__(self) -> dict[str, np.ndarray]:
    self._assert_not_closed()
    spec = self._spec
    kept = []
    while len(kept) < spec.batch_size:
      element = next(self._parent)
      self.num_seen += 1
      if 'skip' in element:
        self._record_skip(element)
      else:
        kept.append(element)
      self._check_skip_fraction()
    batch = {'image': preprocess.to_float(np.stack([e['image'] for e in kept]))}  # [B,H,W,3]
    if spec.has_lowres:
      batch['lowres'] = preprocess.to_float(np.stack([e['lowres'] for e in kept]))  # [B,h,w,3]
    batch['text_embs'], batch['text_mask'] = lookup_text(
      spec.text_cache, [e['caption'] for e in kept]
    )
    return batch

  def get_state(self) -> dict[str, Any]:
    return {
      'parent': self._parent.get_state(),
      'num_seen': int(self.num_seen),
      'num_skipped': int(self.num_skipped),
    }

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state['parent'])
    self.num_seen = int(state['num_seen'])
    self.num_skipped = int(state['num_skipped'])

  def __str__(self) -> str:
    return f'ImagenBatchIterator(batch_size={self._spec.batch_size})'


class _BatchIterDataset(grain.IterDataset):
  """Drops skipped examples (counting them), batches, adds text embeddings and mask."""

  def __init__(
    self,
    parent: grain.IterDataset,
    *,
    batch_size: int,
    text_cache: Any,
    has_lowres: bool,
    epoch_length: int,
    max_skip_fraction: float,
    source_name: str,
  ):
    super().__init__(parent)
    self.batch_size = batch_size
    self.text_cache = text_cache
    self.has_lowres = has_lowres
    self.epoch_length = epoch_length
    self.max_skip_fraction = max_skip_fraction
    self.source_name = source_name

  def __iter__(self) -> _BatchIterator:
    return _BatchIterator(self._parent.__iter__(), self)

  def __str__(self) -> str:
    return f'ImagenBatchIterDataset(batch_size={self.batch_size})'


class _ProcessBlocks:
  """Random access to process `index`'s elements of a global stream: its contiguous block of
  `local_batch` elements in every global batch of `count * local_batch`."""

  def __init__(self, stream, *, index: int, count: int, local_batch: int):
    self._stream, self._index, self._count, self._b = stream, index, count, local_batch

  def __len__(self) -> int:
    return len(self._stream) // self._count

  def __getitem__(self, k: int):
    batch, offset = divmod(int(k), self._b)
    return self._stream[(batch * self._count + self._index) * self._b + offset]


def convert_states(
  states: list[dict[str, Any]], *, local_batch: int, new_count: int, new_local_batch: int
) -> tuple[list[dict[str, Any]], bool]:
  """Saved iterator states of N processes -> states for M processes, and whether exact.

  Exact when every process had read the same number of whole batches (no skipped files):
  then the global position t*B carries over. Otherwise each new process starts at the
  smallest saved whole-batch position (a few examples may be seen twice) and False is
  returned. Only the threaded reader's states convert (`data.num_workers=0`).
  """
  positions = []
  for state in states:
    parent = state.get('parent', {})
    if set(parent) != {'next_index'}:
      raise DataError(
        'The saved data position comes from worker processes (data.num_workers > 0) and '
        'cannot be moved to another number of hosts; resume with the same host count.'
      )
    positions.append(int(parent['next_index']))
  batches = [p // local_batch for p in positions]
  exact = len(set(positions)) == 1 and positions[0] % local_batch == 0
  start = min(batches)
  seen = sum(int(s.get('num_seen', 0)) for s in states)
  skipped = sum(int(s.get('num_skipped', 0)) for s in states)
  new = [
    {
      'parent': {'next_index': start * new_local_batch},
      'num_seen': seen // new_count,
      'num_skipped': skipped // new_count,
    }
    for _ in range(new_count)
  ]
  return new, exact


def _ensure_absl_flags_parsed() -> None:
  """grain's worker processes read absl flags; outside `absl.app.run` (tests, notebooks)
  nothing parsed them, so use their defaults."""
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def per_host_batch_size(config, process_count: int) -> int:
  """config.train.batch_size split over hosts; DataError if it does not divide."""
  batch_size = int(config.train.batch_size)
  if batch_size <= 0 or batch_size % process_count:
    raise DataError(
      f'train.batch_size={batch_size} must be a positive multiple of the number of hosts '
      f'({process_count}); set --config.train.batch_size accordingly.'
    )
  return batch_size // process_count


def make_dataset(
  config,
  *,
  text_cache: Any,
  process_index: int = 0,
  process_count: int = 1,
  seed: int | None = None,
  source: Source | None = None,
) -> grain.IterDataset:
  """The per-host training dataset of batches (see the module docstring).

  Each element is a dict of numpy arrays: 'image' [B, H, W, 3] float32 in [-1, 1],
  'lowres' [B, h, w, 3] (SR stages), 'text_embs' [B, L, D] float32, 'text_mask' [B, L]
  bool, with B = train.batch_size // process_count. `source` reuses an already-built
  `build_source(config.data)`. `data.prefetch` batches are read ahead by threads (in each
  worker when `data.num_workers` > 0); 0 reads synchronously.
  """
  data = config.data
  if text_cache is None:
    raise DataError(f'make_dataset needs the text-embedding cache; run `{_PRECOMPUTE_HINT}`.')
  if not 0 <= process_index < process_count:
    raise DataError(f'process_index={process_index} not in [0, process_count={process_count}).')
  batch_size = per_host_batch_size(config, process_count)
  options = preprocess.PreprocessOptions.from_config(data)
  source = build_source(data) if source is None else source
  seed = int(config.seed if seed is None else seed) % (2**32)

  if len(source) < process_count:
    raise DataError(
      f'{source.name} has {len(source)} examples: fewer than the {process_count} hosts.'
    )
  epoch_length = max(1, len(source) // process_count)  # this host's share of an epoch
  ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat(None)
  ds = ds.random_map(_ProcessRecord(options))  # RNG from the global index: same on any host count
  if process_count > 1:
    ds = grain.MapDataset.source(
      _ProcessBlocks(ds, index=process_index, count=process_count, local_batch=batch_size)
    )

  num_workers = int(data.get('num_workers', 0))
  prefetch = int(data.get('prefetch', 2))
  if prefetch > 0:
    num_threads = 1 if num_workers > 0 else min(4, os.cpu_count() or 1)
    read_options = grain.ReadOptions(
      num_threads=num_threads, prefetch_buffer_size=prefetch * batch_size
    )
  else:
    read_options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
  it_ds = ds.to_iter_dataset(read_options)
  if num_workers > 0:
    _ensure_absl_flags_parsed()
    buffer = max(1, prefetch * batch_size // num_workers)
    it_ds = it_ds.mp_prefetch(
      grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=buffer)
    )
  return _BatchIterDataset(
    it_ds,
    batch_size=batch_size,
    text_cache=text_cache,
    has_lowres=options.lowres_resolution > 0,
    epoch_length=epoch_length,
    max_skip_fraction=float(data.get('max_skip_fraction', 0.01)),
    source_name=source.name,
  )


def make_iterator(
  config,
  *,
  text_cache: Any,
  process_index: int = 0,
  process_count: int = 1,
  source: Source | None = None,
) -> grain.DatasetIterator:
  """An iterator over `make_dataset(...)`; `get_state()` / `set_state()` resume exactly.

  Call `.close()` when done if `data.num_workers > 0` (stops the worker processes).
  """
  ds = make_dataset(
    config,
    text_cache=text_cache,
    process_index=process_index,
    process_count=process_count,
    source=source,
  )
  return iter(ds)


def sample_captions(config, n: int, *, source: Source | None = None) -> list[str]:
  """The first `n` distinct captions of the dataset (prompts for sample grids)."""
  source = build_source(config.data) if source is None else source
  seen: dict[str, None] = {}
  for caption in source.captions():
    seen.setdefault(caption, None)
    if len(seen) >= n:
      break
  return list(seen)
