"""Deterministic, resumable training input pipeline on grain.

    source --> drop images known to be too small (data.small_images='skip'; sizes.py)
      --> shuffle (seeded, re-shuffled every epoch) --> repeat forever
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
batches it would have seen, also after a change of `data.num_workers` (grain's states of
threads and of worker processes differ in shape; `set_state` converts between them).

Skipped examples (unreadable, truncated, empty, non-image or decompression-bomb files, and
rows the source itself fails to read, such as a corrupt record a dataset library decodes)
travel as markers from the workers to the main process, where they are logged (naming the
file), counted and dropped. So the counts are exact and global for this host, however many
workers there are, and they are part of the iterator state. Rule (`data.max_skip_fraction`
f): an unreadable file stays unreadable, so each epoch holds the same bad files, and the run
aborts with `DataError` as soon as more were skipped than f of the epochs begun can hold (a
dataset with more than f bad files stops within its first epoch, one that is all bad after
about f of it), and at the end of each epoch when skipped / (seen - too small) > f. A dataset
with at most f bad files is never stopped, however the shuffle orders them: a running fraction
(the rule before 2026-11-29) stopped half the seeds of a dataset with 0.5 % bad files when a
few came first. With several processes each checks its own share: the bound counts the global
epochs its elements come from, and at the end of its epoch the fraction is its share's, which
can be above the dataset's when that is close to f.

Too-small images (shorter side below `data.resolution`, `data.small_images='skip'`) are not
bad data: most of a web dataset is smaller than 1024 px. Those whose size the source knows
without decoding are dropped before training, with one log line of the counts; the others
are refused from their header when decoded and counted apart (`num_small`). Neither counts
toward `max_skip_fraction`; the run stops only when no usable example is left.

Training crops (`data.crop_size < data.resolution`, sr1024): batches hold crop_size crops
and the matching low-res crops (`batch_spec` gives the shapes); `check_crops` refuses them
for a U-Net with self-attention.
"""

import logging
import os
from typing import Any

import grain
import ml_dtypes
import numpy as np

from imagen_jax.data import preprocess, sizes
from imagen_jax.data.sources import DataError, Source, build_source
from imagen_jax.text.cache import PRECOMPUTE_HINT

log = logging.getLogger(__name__)

_MAX_LOGGED_SKIPS = 50


class _ProcessRecord(grain.transforms.RandomMap):
  """Decodes and resizes one record; a skipped record becomes `{'skip': reason, 'id'}`."""

  def __init__(self, options: preprocess.PreprocessOptions):
    self.options = options

  def random_map(self, record: dict, rng: np.random.Generator) -> dict:
    if 'skip' in record:  # the source could not read it (`_GuardedReads`)
      return record
    try:
      image, lowres = preprocess.load_and_preprocess(record['image'], self.options, rng)
    except preprocess.ImageTooSmall as e:
      return {'skip': str(e), 'id': record['id'], 'small': True}
    except preprocess.SkipExample as e:
      return {'skip': str(e), 'id': record['id']}
    out = {'image': image, 'caption': record['caption'], 'id': record['id']}
    if lowres is not None:
      out['lowres'] = lowres
    return out


TEXT_DTYPE = ml_dtypes.bfloat16  # text_embs of training batches: the cache's own dtype

# Text lengths the training batches are trimmed to: the longest caption of the run (or of the
# batch, data.text_length) rounded up to one of these (capped at text.max_length), so few
# lengths ever compile.
TEXT_LENGTH_BUCKETS = (8, 16, 32, 64, 128, 256, 512, 1024)


def text_length_bucket(num_tokens: int, max_length: int) -> int:
  """The smallest bucket >= num_tokens (at least 1 token), capped at max_length."""
  n = max(1, int(num_tokens))
  bucket = next((b for b in TEXT_LENGTH_BUCKETS if b >= n), n)
  return min(bucket, int(max_length))


def run_text_length(text_cache: Any) -> int:
  """Text length of every training batch of a run: the longest caption in the whole cache,
  rounded up to a bucket. A per-run length (not per batch) because with several processes each
  builds only its part of the global batch and jit needs one global shape: every process reads
  the same cache, so all agree without a collective at each step. A cache object that does not
  report `longest_caption` (a test double) gets the full max_length."""
  longest = getattr(text_cache, 'longest_caption', None)
  if longest is None:
    return int(text_cache.max_length)
  return text_length_bucket(longest, text_cache.max_length)


TEXT_LENGTH_MODES = ('auto', 'batch', 'run')


def text_length_mode(data_config, process_count: int, backend: str | None = None) -> str:
  """'batch' or 'run': how training batches' text length L is chosen (`data.text_length`).

  'batch': the longest caption of each batch, rounded up to a bucket (a few compiled step
  shapes, far fewer padded text tokens). 'run': one L for the whole run (`run_text_length`).
  Several processes always use 'run': each builds only its part of the global batch, and jit
  needs one global shape, which they would have to agree on with a collective every step. It
  would rarely buy anything: the longest of the thousands of captions in a multi-host global
  batch almost always falls in the run's top bucket (with 2 % of captions in it, a batch of
  512 misses it with probability 0.98^512 ~ 3e-5).
  'auto' (the default) is 'batch' on one process with an accelerator, and 'run' on CPU, where
  compiling another step shape costs more than the shorter text saves in a short run.
  """
  mode = str(data_config.get('text_length', 'auto'))
  if mode not in TEXT_LENGTH_MODES:
    raise DataError(
      f"data.text_length={mode!r}: choose 'auto', 'batch' (each batch's longest caption, "
      "bucketed) or 'run' (one length for the run)."
    )
  if process_count > 1:
    return 'run'
  if mode == 'auto':
    if backend is None:
      import jax

      backend = jax.default_backend()
    return 'run' if backend == 'cpu' else 'batch'
  return mode


def lookup_text(
  text_cache: Any,
  captions: list[str],
  *,
  length: int | str | None = None,
  dtype: Any = np.float32,
) -> tuple[np.ndarray, np.ndarray]:
  """Per-caption cached embeddings, zero-padded (or cut) to `length`.

  Returns (text_embs [B, L, D] `dtype`, text_mask [B, L] bool), L = `length`, by default
  text_cache.max_length; 'bucket': the longest of these captions rounded up to a bucket
  (`text_length_bucket`). The cache holds bfloat16: `dtype=ml_dtypes.bfloat16` passes its
  values as they are (half the bytes of float32, which widens them exactly).
  """
  max_length = int(text_cache.max_length)
  bucketed = length == 'bucket'
  length = max_length if length is None or bucketed else int(length)
  dim = int(text_cache.dim)
  pieces = []
  for caption in captions:
    try:
      embs = np.asarray(text_cache.get(caption))  # [n_tokens, D]
    except KeyError as e:
      raise DataError(
        f'Caption {caption!r} is not in the text-embedding cache ({e}). The cache must be '
        f'built for this dataset and text encoder: run `{PRECOMPUTE_HINT}`.'
      ) from e
    if embs.ndim != 2 or embs.shape[1] != dim:
      raise DataError(
        f'Cached embedding for {caption!r} has shape {embs.shape}, expected [n, {dim}]; '
        f'the cache is stale or corrupt: delete it and run `{PRECOMPUTE_HINT}`.'
      )
    pieces.append(embs[:length])
  counts = np.array([len(e) for e in pieces], np.int64)  # [B]
  if bucketed:
    length = text_length_bucket(int(counts.max(initial=0)), max_length)
  text_mask = np.arange(length)[None, :] < counts[:, None]  # [B, L]: a prefix per caption
  text_embs = np.zeros((len(captions), length, dim), dtype)  # [B, L, D]
  if counts.sum():
    text_embs[text_mask] = np.concatenate(pieces).astype(dtype)  # row-major = caption order
  return text_embs, text_mask


class _BatchIterator(grain.DatasetIterator):
  """Main-process end of the pipeline: skip accounting, batching, text lookup."""

  def __init__(self, parent: grain.DatasetIterator, spec: '_BatchIterDataset'):
    super().__init__(parent)
    self._spec = spec
    self.num_seen = 0
    self.num_skipped = 0  # unusable files (they count toward max_skip_fraction)
    self.num_small = 0  # too small, found when decoded (they do not)
    self._logged = 0

  def _record_small(self, element: dict) -> None:
    spec = self._spec
    self.num_small += 1
    if self.num_small == 1:
      log.info(
        '%s: skipping images smaller than %d px as they are decoded (their size is not in the '
        'metadata), counted apart from broken files; first: %s: %s',
        spec.source_name,
        spec.min_side,
        element['id'],
        element['skip'],
      )

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
    whole_epoch = self.num_seen >= spec.epoch_length
    if self.num_seen == spec.epoch_length and self.num_small:
      log.info(
        '%s: first epoch: %d of %d examples were smaller than %d px when decoded and skipped '
        '(data.small_images=upsample keeps them).',
        spec.source_name,
        self.num_small,
        self.num_seen,
        spec.min_side,
      )
    if whole_epoch and self.num_small + self.num_skipped >= self.num_seen:
      fixes = []  # the advice for each cause there is (a small-image fix for broken files misled)
      if self.num_skipped:
        fixes.append('replace or remove the unreadable files (logged above)')
      if self.num_small:
        fixes.append(
          'use larger images, or keep small ones with --config.data.small_images=upsample'
        )
      raise DataError(
        f'{spec.source_name}: no usable example in a whole epoch of {self.num_seen}: '
        f'{self.num_small} smaller than data.resolution={spec.min_side} px, '
        f'{self.num_skipped} unreadable. {"; ".join(fixes).capitalize()}.'
      )
    # A file that cannot be read stays unreadable, so every epoch holds the same bad files,
    # however the shuffle orders them. More skips than max_skip_fraction of every epoch begun
    # can hold proves the fraction is above it (a running fraction also stopped runs whose
    # shuffle put a few of their < 1 % bad files first). At the end of this process's epoch the
    # fraction is exact on one process; with several it is that of this process's share.
    begun = spec.examples_in_epochs_begun(self.num_seen)
    allowed = spec.max_skip_fraction * begun
    usable = self.num_seen - self.num_small  # not too small: decodable or broken
    # As a fraction, as the other checks compare it: 0.29 * 100 is 28.999999999999996 in floats,
    # which stopped a run of exactly 29 % at data.max_skip_fraction=0.29.
    if begun and self.num_skipped / begun > spec.max_skip_fraction:
      raise DataError(
        f'{spec.source_name}: {self.num_skipped} of the first {self.num_seen} examples read were '
        f'unusable: more than data.max_skip_fraction={spec.max_skip_fraction} of the {begun} '
        f'examples in the epoch(s) they belong to ({allowed:g}); the warnings above name the '
        'files. Fix or remove them, or raise --config.data.max_skip_fraction.'
      )
    if self.num_seen % spec.epoch_length or usable <= 0:
      return
    fraction = self.num_skipped / usable
    if fraction > spec.max_skip_fraction:
      raise DataError(
        f'{spec.source_name}: {self.num_skipped} of {usable} examples seen (besides '
        f'{self.num_small} too small) were unusable ({fraction:.1%} > '
        f'data.max_skip_fraction={spec.max_skip_fraction}); the warnings above name the files. '
        'Fix or remove them, or raise --config.data.max_skip_fraction.'
      )

  def __next__(self) -> dict[str, np.ndarray]:
    self._assert_not_closed()
    spec = self._spec
    kept = []
    while len(kept) < spec.batch_size:
      element = next(self._parent)
      self.num_seen += 1
      if element.get('small'):
        self._record_small(element)
      elif 'skip' in element:
        self._record_skip(element)
      else:
        kept.append(element)
      self._check_skip_fraction()
    batch = {'image': preprocess.to_float(np.stack([e['image'] for e in kept]))}  # [B,H,W,3]
    if spec.has_lowres:
      batch['lowres'] = preprocess.to_float(np.stack([e['lowres'] for e in kept]))  # [B,h,w,3]
    batch['text_embs'], batch['text_mask'] = lookup_text(
      spec.text_cache,
      [e['caption'] for e in kept],
      length='bucket' if spec.text_length_mode == 'batch' else spec.text_length,
      dtype=TEXT_DTYPE,
    )
    return batch

  def get_state(self) -> dict[str, Any]:
    return {
      'parent': self._parent.get_state(),
      'num_seen': int(self.num_seen),
      'num_skipped': int(self.num_skipped),
      'num_small': int(self.num_small),
    }

  def set_state(self, state: dict[str, Any]) -> None:
    parent, like = state['parent'], self._parent.get_state()
    if _reader_layout(parent) != _reader_layout(like):  # data.num_workers changed since the save
      position = reader_position(parent)
      if position is None or reader_position(like) is None:
        raise DataError(
          'The saved data position comes from a reader this version cannot convert to '
          f'data.num_workers={_workers_text(like)}; resume with the data.num_workers of the run '
          'that saved it.'
        )
      log.info(
        'Data position carried over from data.num_workers=%s to %s (element %d).',
        _workers_text(parent),
        _workers_text(like),
        position,
      )
      parent = _reader_state(position, like)
    self._parent.set_state(parent)
    self.num_seen = int(state['num_seen'])
    self.num_skipped = int(state['num_skipped'])
    self.num_small = int(state.get('num_small', 0))  # states saved before the field: 0

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
    min_side: int,
    text_length_mode: str = 'run',
    num_examples: int | None = None,
    process_count: int = 1,
  ):
    super().__init__(parent)
    self.text_length_mode = text_length_mode  # 'batch' | 'run' (text_length_mode())
    self.batch_size = batch_size
    self.text_cache = text_cache
    self.has_lowres = has_lowres
    self.epoch_length = epoch_length  # this process's share of an epoch
    self.num_examples = epoch_length if num_examples is None else num_examples  # all processes'
    self.process_count = process_count
    self.max_skip_fraction = max_skip_fraction
    self.source_name = source_name
    self.min_side = min_side  # too-small threshold (data.resolution)
    self.text_length = run_text_length(text_cache)  # L of every batch with mode 'run'

  def __iter__(self) -> _BatchIterator:
    return _BatchIterator(self._parent.__iter__(), self)

  def examples_in_epochs_begun(self, num_seen: int) -> int:
    """Examples in the whole epochs that this process's first `num_seen` stream elements come
    from: the global stream's epochs up to its last element read (`_ProcessBlocks`: blocks of
    batch_size, one per process in turn)."""
    if self.process_count == 1:
      last = num_seen
    else:
      last = -(-num_seen // self.batch_size) * self.process_count * self.batch_size
    return -(-last // self.num_examples) * self.num_examples

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


def _reader_layout(parent: dict[str, Any]) -> int | None:
  """The worker count of a reader state (0: threads in this process), None if unrecognised."""
  if set(parent) == {'next_index'}:
    return 0
  workers = parent.get('iterators_in_use_states')
  return len(workers) if isinstance(workers, list) else None


def _workers_text(parent: dict[str, Any]) -> str:
  layout = _reader_layout(parent)
  return '?' if layout is None else str(layout)


def reader_position(parent: dict[str, Any]) -> int | None:
  """How many elements of this process's stream a saved reader state has consumed (None when
  the state is not one this knows).

  Threads (data.num_workers=0): grain's `next_index`. Worker processes: grain's mp_prefetch
  interleaves W workers, worker i reading elements i, i + W, ... of the same stream and the
  main process taking one from each in turn, so the position is the sum of the workers' own
  next indices (checked against the cycle's next worker). The elements are the same in either
  reader (module docstring), so a position carries over between worker counts exactly."""
  layout = _reader_layout(parent)
  if layout == 0:
    return int(parent['next_index'])
  if not layout:
    return None
  workers = parent['iterators_in_use_states']
  if not all(isinstance(w, dict) and set(w) == {'next_index'} for w in workers):
    return None
  if parent.get('future_states') or any(parent.get('exhausted') or []):
    return None  # an epoch-bounded or finished stream: not what make_dataset builds
  if list(parent.get('iterators_in_use_indices', [])) != list(range(layout)):
    return None
  position = sum(int(w['next_index']) for w in workers)
  if position % layout != int(parent.get('next_index_in_cycle', -1)):
    return None
  return position


def _reader_state(position: int, like: dict[str, Any]) -> dict[str, Any]:
  """A reader state of `like`'s layout (see reader_position) at `position`."""
  layout = _reader_layout(like)
  if layout == 0:
    return {'next_index': position}
  return {
    **like,
    'next_index_in_cycle': position % layout,
    'next_index_in_datasets': layout,
    'iterators_in_use_indices': list(range(layout)),
    'iterators_in_use_states': [
      {'next_index': max(0, position - i + layout - 1) // layout} for i in range(layout)
    ],
    'exhausted': [0] * layout,
    'future_states': {},
  }


def convert_states(
  states: list[dict[str, Any]], *, local_batch: int, new_count: int, new_local_batch: int
) -> tuple[list[dict[str, Any]], bool]:
  """Saved iterator states of N processes (`local_batch` each) -> states for M processes
  (`new_local_batch` each), and whether exact.

  The global stream is the same whatever the host count and batch (global batch t is the hosts'
  local batches side by side), so the position carries over as a count of global elements: the
  whole global batches every process had read, times the saved global batch. Exact when every
  process had read the same number of whole batches (no skipped files) and that count is a whole
  number of new global batches. Otherwise each new process starts at the last new global batch
  boundary at or before it (a few examples may be seen twice) and False is returned. The new
  states are the threaded reader's; `set_state` carries them to worker processes
  (data.num_workers > 0).
  """
  positions = []
  for state in states:
    position = reader_position(state.get('parent', {}))
    if position is None:
      raise DataError(
        'The saved data position comes from a reader this version cannot convert and cannot '
        'be moved to another number of hosts; resume with the same host count.'
      )
    positions.append(position)
  consumed = min(p // local_batch for p in positions) * local_batch * len(states)  # global
  new_batch = new_local_batch * new_count
  start = consumed // new_batch
  exact = len(set(positions)) == 1 and positions[0] % local_batch == 0 and consumed % new_batch == 0
  seen = sum(int(s.get('num_seen', 0)) for s in states)
  skipped = sum(int(s.get('num_skipped', 0)) for s in states)
  small = sum(int(s.get('num_small', 0)) for s in states)
  new = [
    {
      'parent': {'next_index': start * new_local_batch},
      'num_seen': seen // new_count,
      'num_skipped': skipped // new_count,
      'num_small': small // new_count,
    }
    for _ in range(new_count)
  ]
  return new, exact


PARENT_POLL_S = 1.0  # how often a worker process checks that its parent still runs


def _leave_ctrl_c_to_the_main_process(worker_index: int, worker_count: int) -> None:
  """A worker process ignores SIGINT: Ctrl-C in a terminal reaches the whole process group,
  and each worker printed a KeyboardInterrupt traceback while the main process was saving; the
  main process stops them (`close`). And it ends when its parent is gone: after a kill -9 of
  train.py the workers (~200 MB each) ran on for good, adopted by init, at every requeue."""
  del worker_index, worker_count
  import signal
  import threading
  import time

  signal.signal(signal.SIGINT, signal.SIG_IGN)
  parent = os.getppid()

  def watch_parent() -> None:
    while os.getppid() == parent:  # adopted by init (or a subreaper) once the parent dies
      time.sleep(PARENT_POLL_S)
    os._exit(0)

  threading.Thread(target=watch_parent, name='imagen_jax-parent-watch', daemon=True).start()


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


def check_crops(config) -> preprocess.PreprocessOptions:
  """The preprocess options of `config`; refuses crops the U-Net cannot train on (one line).

  A crop (`data.crop_size < data.resolution`) is only a faithful training example for a fully
  convolutional U-Net: convolutions, FiLM and cross-attention to the text act the same on a
  crop as inside the whole image. Self-attention does not: trained on crops, it would attend
  within a crop, then over the whole image when it samples. `crop_size`, and `resolution`
  (which sampling makes), must also divide by the U-Net's downsampling factor.
  """
  options = preprocess.PreprocessOptions.from_config(config.data)
  model = config.get('model')
  if model is None:
    return options
  levels = len(tuple(model.get('channel_mults', (1,))))
  factor = 2 ** (levels - 1)
  res = options.resolution
  if res % factor:  # failed at the first step (or, with crops, only when sampling)
    raise DataError(
      f'data.resolution={res} must be a multiple of {factor}, the downsampling factor of the '
      f'U-Net ({levels} levels from model.channel_mults={tuple(model.channel_mults)}); choose '
      'another resolution or fewer levels.'
    )
  if not options.crops:
    return options
  crop = options.crop_size
  attn_levels = tuple(model.get('attn_levels', ()))
  if attn_levels:
    raise DataError(
      f'data.crop_size={crop} < data.resolution={res}, but the U-Net has self-attention '
      f'(model.attn_levels={attn_levels}), which would attend within a crop in training and '
      f'over the whole image when sampling: set --config.data.crop_size=0 (whole images) or '
      "use a U-Net without self-attention (--config.model.attn_levels='()')."
    )
  if crop % factor:
    raise DataError(
      f'data.crop_size={crop} must be a multiple of {factor}, the downsampling factor of the '
      f'U-Net ({levels} levels).'
    )
  return options


def batch_spec(
  config, batch_size: int, text_length: int | None = None
) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """(shape, dtype) of every entry of a batch of `batch_size` from `make_dataset(config)`.

  'image' [B, S, S, 3] and 'lowres' [B, s, s, 3] (SR stages), S = data.crop_size with training
  crops, else data.resolution, s = S * lowres_resolution / resolution; 'text_embs' [B, L,
  model.text_dim] bfloat16; 'text_mask' [B, L]. L = `text_length`: the pipeline's is
  `run_text_length(text_cache)`; without it, text.max_length (the longest L can be).
  """
  options = preprocess.PreprocessOptions.from_config(config.data)
  b, size = int(batch_size), options.image_size
  length = int(config.text.max_length if text_length is None else text_length)
  spec = {'image': ((b, size, size, 3), np.dtype(np.float32))}
  if options.lowres_resolution:
    spec['lowres'] = ((b, options.lowres_size, options.lowres_size, 3), np.dtype(np.float32))
  spec['text_embs'] = ((b, length, int(config.model.text_dim)), np.dtype(TEXT_DTYPE))
  spec['text_mask'] = ((b, length), np.dtype(bool))
  return spec


class _Subset:
  """Random access to `source[indices[k]]` (the examples kept by the size filter)."""

  def __init__(self, source: Source, indices: np.ndarray):
    self._source, self._indices = source, indices

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, k: int) -> dict:
    return self._source[int(self._indices[k])]


class _GuardedReads:
  """`source[i]`, with a read that fails (a corrupt row a dataset library decodes itself, a
  storage error) turned into a skip record that names the example, like an undecodable image:
  counted against `data.max_skip_fraction` instead of ending the run with a bare traceback.
  DataError (a configuration problem) and MemoryError still raise."""

  def __init__(self, source: Any, name: str):
    self._source, self._name = source, name

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    try:
      return self._source[index]
    except (DataError, MemoryError):
      raise
    except Exception as e:  # noqa: BLE001 - any failure of one read is that example's skip
      return {'skip': f'cannot read it ({type(e).__name__}: {e})', 'id': f'{self._name} #{index}'}


def drop_small_images(
  source: Source, options: preprocess.PreprocessOptions, *, log_counts: bool = True
) -> Any:
  """`source` without the images it knows to be too small (`small_images='skip'`); logs the
  counts (with `log_counts`). DataError when none is left: train_lib calls it before the text
  cache is built too, so that such a dataset is refused before its captions are encoded."""
  if options.small_images != 'skip':
    return source
  result = sizes.filter_small(source.image_sizes(), min_side=options.resolution)
  if result.small and log_counts:
    log.info(result.message(source.name))
  if not len(result.kept):
    raise DataError(
      f'{source.name}: all {result.total} images are smaller than data.resolution='
      f'{options.resolution} px on their shorter side: nothing to train on. Use larger images, '
      'or keep these with --config.data.small_images=upsample.'
    )
  return source if not result.small else _Subset(source, result.kept)


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
  'lowres' [B, h, w, 3] (SR stages), 'text_embs' [B, L, D] bfloat16 (the cache's values),
  'text_mask' [B, L] bool, with B = train.batch_size // process_count and L =
  `run_text_length(text_cache)` (shapes: `batch_spec`), or with `text_length_mode` 'batch'
  the bucket of each batch's longest caption (at most that). `source` reuses
  an already-built `build_source(config.data)`. `data.prefetch` batches are read ahead by
  threads (in each worker when `data.num_workers` > 0); 0 reads synchronously.
  """
  data = config.data
  if text_cache is None:
    raise DataError(f'make_dataset needs the text-embedding cache; run `{PRECOMPUTE_HINT}`.')
  if not 0 <= process_index < process_count:
    raise DataError(f'process_index={process_index} not in [0, process_count={process_count}).')
  batch_size = per_host_batch_size(config, process_count)
  options = check_crops(config)
  source = build_source(data) if source is None else source
  seed = int(config.seed if seed is None else seed) % (2**32)
  examples = drop_small_images(source, options)

  if len(examples) < process_count:
    raise DataError(
      f'{source.name} has {len(examples)} usable examples: fewer than the {process_count} hosts.'
    )
  epoch_length = max(1, len(examples) // process_count)  # this host's share of an epoch
  ds = grain.MapDataset.source(_GuardedReads(examples, source.name)).seed(seed).shuffle()
  ds = ds.repeat(None)
  ds = ds.random_map(_ProcessRecord(options))  # RNG from the global index: same on any host count
  if process_count > 1:
    ds = grain.MapDataset.source(
      _ProcessBlocks(ds, index=process_index, count=process_count, local_batch=batch_size)
    )

  length_mode = text_length_mode(data, process_count)
  if data.get('text_length', 'auto') == 'batch' and length_mode == 'run':  # several processes
    log.info('data.text_length=batch: %d processes use one text length per run.', process_count)

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
      grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=buffer),
      worker_init_fn=_leave_ctrl_c_to_the_main_process,
    )
  return _BatchIterDataset(
    it_ds,
    batch_size=batch_size,
    text_cache=text_cache,
    has_lowres=options.lowres_resolution > 0,
    epoch_length=epoch_length,
    max_skip_fraction=float(data.get('max_skip_fraction', 0.01)),
    source_name=source.name,
    min_side=options.resolution,
    text_length_mode=length_mode,
    num_examples=len(examples),
    process_count=process_count,
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
