"""On-disk cache of frozen text-encoder embeddings, so training never loads T5.

Layout under `root/<cache_key>/` (root is `config.text.cache_dir`):

  manifest.json                 encoder, max_length, dataset fingerprint, dim, captions digest,
                                shard list, complete flag, size stats
  shard-00000.embs.npy          [T, D] uint16: bfloat16 bits of ONLY the real (unpadded) tokens
  shard-00000.offsets.npy       [n + 1] int64: caption i's tokens are embs[offsets[i]:offsets[i+1]]
  shard-00000.hashes.npy        [n] uint64: 64-bit BLAKE2b of each caption (the lookup index)
  shard-00000.crc32.npy         [n] uint32: CRC-32 of each caption's embedding bytes
  ...

Captions are deduplicated, sorted (so the layout does not depend on the source's order) and
split into shards of `shard_size`: shard i holds the same captions whatever the number of
processes that build the cache. Every file is written to a temporary name and renamed. A
finished shard gets a `shard-NNNNN.done.json` marker; once every shard is done, process 0
lists them all in the manifest (also renamed into place), marks it complete and removes the
markers. Several processes (hosts) build one cache together by each encoding its share of
the shards (`build_cache(processes=...)`). An interrupted build resumes with the shards not
yet done, and because a shard's content depends only on its captions, the encoder and the
batch size, a killed-then-resumed or multi-process build writes byte-identical files to an
uninterrupted single-process one.

Checksums: each shard's manifest entry holds the CRC-32 of its four files as written. Readers
check the small files (offsets, hashes, crc32) when they load them, and each caption's embedding
bytes against its CRC-32 on every read (3-7 GB/s on the 2-core EPYC: ~25 us per T5-XXL caption
of 12 tokens), so a flipped bit is reported as damage, never trained on. A resumed build checks
the small files of the finished shards; `find_damaged_shards` (`precompute --verify`) reads
every file whole, and `drop_shards` turns the damaged shards into a partial build that
re-encodes only them. Caches built before the checksums have no `crc32` entries and are read
unchecked.

A complete cache of the same captions, encoder and max_length under another dataset fingerprint
(the images touched, moved or copied) is reused by hard links (`adopt_matching_cache`).

Readers memory-map the shards (`np.load(mmap_mode='r')`), so lookups are cheap in data-loader
worker processes; an `EmbeddingCache` pickles as (path, manifest) and reopens lazily.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import io
import json
import logging
import math
import os
import pathlib
import re
import shutil
import sys
import threading
import time
import tokenize
import zlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import ml_dtypes
import numpy as np

if TYPE_CHECKING:
  from imagen_jax.text.encoder import TextEncoder

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = 'manifest.json'
DONE_SUFFIX = '.done.json'  # per-shard marker of a build in progress
# The build command for a run (its relative text.cache_dir is under its --workdir).
PRECOMPUTE_HINT = (
  "python -m imagen_jax.precompute --config=<the run's config> --workdir=<the run's --workdir>"
)
OPEN_SHARDS = 64  # shards' embeddings kept memory-mapped at once, per reader (LRU)
_KEY_FIELDS = ('encoder', 'max_length', 'dataset_fingerprint')

# What np.load raises for a shard file that is not an intact .npy: EOFError for an empty file,
# ValueError for most damage, and for a damaged header (its dict is parsed as Python literals)
# SyntaxError or tokenize.TokenError, which escaped as a traceback mid-training.
_UNREADABLE = (OSError, ValueError, EOFError, SyntaxError, tokenize.TokenError, TypeError)


class CacheError(ValueError):
  """A missing, stale, mismatched or incomplete embedding cache; the message says the fix."""


class CaptionNotCachedError(KeyError):
  """A caption that the embedding cache does not hold."""

  def __init__(self, caption: str, cache_path: str | os.PathLike):
    self.caption = caption
    self.message = (
      f'Caption not in embedding cache {str(cache_path)!r}: {caption[:200]!r}. The cache was '
      'built from a different caption list; rebuild it for the current data with '
      f'`{PRECOMPUTE_HINT}`.'
    )
    super().__init__(self.message)

  def __str__(self) -> str:
    return self.message


def cache_key(encoder_name: str, max_length: int, dataset_fingerprint: str) -> str:
  """Folder name for one (encoder, max_length, dataset) triple: readable slug + digest."""
  slug = re.sub(r'[^A-Za-z0-9._-]+', '_', str(encoder_name)).strip('_.')[-48:] or 'encoder'
  digest = hashlib.sha256(
    json.dumps([str(encoder_name), int(max_length), str(dataset_fingerprint)]).encode()
  ).hexdigest()[:16]
  return f'{slug}-L{int(max_length)}-{digest}'


def caption_hashes(captions: Sequence[str]) -> np.ndarray:
  """64-bit BLAKE2b of each caption's UTF-8 bytes, [n] uint64."""
  return np.array(
    [
      int.from_bytes(hashlib.blake2b(c.encode('utf-8'), digest_size=8).digest(), 'little')
      for c in captions
    ],
    dtype=np.uint64,
  )


def _captions_digest(captions: Sequence[str]) -> str:
  h = hashlib.sha256()
  for c in captions:
    b = c.encode('utf-8')
    h.update(len(b).to_bytes(8, 'little'))
    h.update(b)
  return h.hexdigest()


def _shard_files(index: int) -> dict[str, str]:
  stem = f'shard-{index:05d}'
  return {part: f'{stem}.{part}.npy' for part in ('embs', 'offsets', 'hashes', 'crc32')}


def _file_crc32(path: pathlib.Path, chunk: int = 1 << 24) -> int:
  """CRC-32 of a file's bytes, read in 16 MiB pieces."""
  crc = 0
  with open(path, 'rb') as f:
    while piece := f.read(chunk):
      crc = zlib.crc32(piece, crc)
  return crc


def _span_crcs(tokens: np.ndarray, offsets: np.ndarray) -> np.ndarray:
  """[n] uint32: CRC-32 of each caption's embedding bytes, tokens[offsets[i]:offsets[i+1]]."""
  return np.array(
    [zlib.crc32(tokens[start:stop]) for start, stop in zip(offsets[:-1], offsets[1:], strict=True)],
    dtype=np.uint32,
  )


def _atomic_save(path: pathlib.Path, array: np.ndarray) -> None:
  tmp = path.with_name(f'{path.name}.tmp-{os.getpid()}')
  with open(tmp, 'wb') as f:
    np.save(f, array, allow_pickle=False)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _atomic_write_json(path: pathlib.Path, data: dict) -> None:
  tmp = path.with_name(f'{path.name}.tmp-{os.getpid()}')
  with open(tmp, 'w') as f:
    json.dump(data, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _read_manifest(path: pathlib.Path) -> dict | None:
  try:
    return json.loads((path / MANIFEST).read_text())
  except FileNotFoundError:
    return None
  except (json.JSONDecodeError, OSError) as e:
    raise CacheError(
      f'Embedding cache manifest {str(path / MANIFEST)!r} is unreadable ({e}); delete '
      f'{str(path)!r} and rebuild with `{PRECOMPUTE_HINT}`.'
    ) from e


def _caches(root: pathlib.Path) -> Iterator[tuple[pathlib.Path, dict]]:
  """(folder, manifest) of each folder under `root` whose manifest reads as a JSON object, by
  name; the others are skipped."""
  if not root.is_dir():
    return
  for sub in sorted(root.iterdir()):
    try:
      manifest = json.loads((sub / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
      continue
    if isinstance(manifest, dict):
      yield sub, manifest


def _describe(encoder: str, max_length: int, fingerprint: str) -> str:
  return f'encoder={encoder!r}, max_length={max_length}, dataset fingerprint={fingerprint!r}'


def _differences(manifest: dict, wanted: dict) -> list[str]:
  names = {
    'encoder': 'encoder',
    'max_length': 'max_length',
    'dataset_fingerprint': 'dataset fingerprint',
  }
  return [
    f'{names[f]} is {manifest.get(f)!r} there but {wanted[f]!r} now'
    for f in _KEY_FIELDS
    if manifest.get(f) != wanted[f]
  ]


class EmbeddingCache:
  """Read side of a complete cache: caption -> [n_tokens, D] bfloat16 embeddings."""

  def __init__(self, path: str | os.PathLike, manifest: dict):
    self.path = pathlib.Path(path)
    self.manifest = manifest
    self._loaded = None  # (offsets, sorted hashes, shard ids, rows, span CRCs), lazily
    self._open: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()  # mmaps
    self._open_lock = threading.Lock()
    self._longest = None  # tokens of the longest caption, lazily
    self.build_report: dict[str, Any] | None = None  # encoding speed, when just built

  @classmethod
  def open(
    cls, root: str, *, encoder_name: str, max_length: int, dataset_fingerprint: str
  ) -> EmbeddingCache:
    """Opens `root/<cache_key>`; raises CacheError when it is missing, stale or incomplete."""
    wanted = {
      'encoder': str(encoder_name),
      'max_length': int(max_length),
      'dataset_fingerprint': str(dataset_fingerprint),
    }
    root = pathlib.Path(root).expanduser()
    path = root / cache_key(encoder_name, max_length, dataset_fingerprint)
    manifest = _read_manifest(path)
    if manifest is None:
      raise CacheError(cls._missing_message(root, path, wanted))
    diffs = _differences(manifest, wanted)
    if diffs:
      raise CacheError(
        f'Embedding cache {str(path)!r} is stale: {"; ".join(diffs)}. Delete it and rebuild '
        f'with `{PRECOMPUTE_HINT}`.'
      )
    if manifest.get('format_version') != FORMAT_VERSION:
      raise CacheError(
        f'Embedding cache {str(path)!r} has format version {manifest.get("format_version")}, '
        f'this code reads version {FORMAT_VERSION}; delete it and rebuild with '
        f'`{PRECOMPUTE_HINT}`.'
      )
    if not manifest.get('complete'):
      shards = {s['index']: s for s in manifest.get('shards', [])}
      shards.update(_read_markers(path, _header_digest(_manifest_header(manifest))))
      done = sum(s['num_captions'] for s in shards.values())
      raise CacheError(
        f'Embedding cache {str(path)!r} is incomplete: {len(shards)} of '
        f'{manifest.get("num_shards")} shards ({done} of {manifest.get("num_captions")} '
        f'captions) were written before the build stopped. Rerun `{PRECOMPUTE_HINT}`: it '
        'resumes from the last finished shard.'
      )
    return cls(path, manifest)

  @staticmethod
  def _missing_message(root: pathlib.Path, path: pathlib.Path, wanted: dict) -> str:
    message = f'No embedding cache for {_describe(**_renamed(wanted))} at {str(path)!r}.'
    others = [
      (len(_differences(m, wanted)), sub, _differences(m, wanted)) for sub, m in _caches(root)
    ]
    if others:
      _, sub, diffs = min(others, key=lambda o: o[0])
      message += f' The closest cache there, {str(sub)!r}, is stale for this config: ' + (
        '; '.join(diffs) + '.'
      )
    return (
      message
      + f' Build it with `{PRECOMPUTE_HINT}` (train.py does this when '
      + ('config.text.auto_precompute is True).')
    )

  # -- metadata

  @property
  def dim(self) -> int:
    return int(self.manifest['dim'])

  @property
  def max_length(self) -> int:
    return int(self.manifest['max_length'])

  @property
  def num_captions(self) -> int:
    return int(self.manifest['num_captions'])

  @property
  def encoder_name(self) -> str:
    return self.manifest['encoder']

  @property
  def longest_caption(self) -> int:
    """Tokens of the longest cached caption (0 for an empty cache); read from the offsets."""
    if self._longest is None:
      offsets, *_ = self._load()
      self._longest = max((int(np.diff(o).max()) for o in offsets if len(o) > 1), default=0)
    return self._longest

  def __len__(self) -> int:
    return self.num_captions

  def stats(self) -> dict[str, Any]:
    """Size of the cache: captions, tokens, bytes on disk, bytes per caption."""
    return dict(self.manifest['stats'])

  def __repr__(self) -> str:
    return f'EmbeddingCache({str(self.path)!r}, captions={self.num_captions}, dim={self.dim})'

  # -- pickling (grain workers): drop the mmaps, reopen lazily

  def __getstate__(self) -> dict:
    return {'path': str(self.path), 'manifest': self.manifest}

  def __setstate__(self, state: dict) -> None:
    self.__init__(state['path'], state['manifest'])

  # -- lookups

  def _load(self):
    """(offsets per shard, sorted caption hashes, their shard ids, their rows, span CRC-32s per
    shard or None), read once and checked (`_read_index`). The embeddings themselves are mapped
    per shard when first read (`_shard_embs`)."""
    if self._loaded is not None:
      return self._loaded
    offsets, hashes, shard_ids, rows, crcs = [], [], [], [], []
    for i, shard in enumerate(self.manifest['shards']):
      shard_offsets, shard_hashes, shard_crcs, problem = _read_index(
        self.path, shard, self.max_length
      )
      if problem:
        raise self._read_error(problem)
      offsets.append(shard_offsets)
      hashes.append(shard_hashes)
      crcs.append(shard_crcs)
      shard_ids.append(np.full(len(shard_hashes), i, np.int32))
      rows.append(np.arange(len(shard_hashes), dtype=np.int32))
    hashes = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
    order = np.argsort(hashes, kind='stable')
    self._loaded = (
      offsets,
      hashes[order],
      np.concatenate(shard_ids)[order] if shard_ids else np.zeros(0, np.int32),
      np.concatenate(rows)[order] if rows else np.zeros(0, np.int32),
      crcs,
    )
    return self._loaded

  def _shard_embs(self, shard: int) -> np.ndarray:
    """Shard `shard`'s [T, D] embeddings, memory-mapped. At most OPEN_SHARDS stay mapped (each
    map holds a file descriptor: a cache of more shards than `ulimit -n` could not be read when
    every shard stayed open); an evicted map closes once no returned view uses it."""
    with self._open_lock:  # data loading may read from several threads
      embs = self._open.get(shard)
      if embs is not None:
        self._open.move_to_end(shard)
        return embs
      embs, problem = _map_embs(self.path, self.manifest['shards'][shard], self.dim)
      if problem:
        raise self._read_error(problem)
      self._open[shard] = embs
      if len(self._open) > OPEN_SHARDS:
        self._open.popitem(last=False)
      return embs

  def _read_error(self, problem: str) -> CacheError:
    if problem.startswith(_TOO_MANY_FILES):
      return CacheError(
        f'Embedding cache {str(self.path)!r} cannot be read: this process has {problem}; raise '
        'the limit (`ulimit -n 65536`) and rerun. The cache is not damaged.'
      )
    return CacheError(
      f'Embedding cache {str(self.path)!r} is damaged ({problem}). Re-encode its damaged shards '
      f'with `{PRECOMPUTE_HINT} --verify` (it checks every shard and keeps the intact ones).'
    )

  def _locate(self, caption: str) -> tuple[int, int] | None:
    _, hashes, shard_ids, rows, _ = self._load()
    h = caption_hashes([caption])[0]
    i = int(np.searchsorted(hashes, h))
    if i < len(hashes) and hashes[i] == h:
      return int(shard_ids[i]), int(rows[i])
    return None

  def __contains__(self, caption: str) -> bool:
    return self._locate(caption) is not None

  def get(self, caption: str) -> np.ndarray:
    """[n_tokens, D] bfloat16 embeddings of the caption's real tokens (a view of the mmap),
    checked against their CRC-32 (CacheError when they fail it)."""
    where = self._locate(caption)
    if where is None:
      raise CaptionNotCachedError(caption, self.path)
    offsets, *_, crcs = self._load()
    shard, row = where
    start, stop = offsets[shard][row], offsets[shard][row + 1]
    tokens = self._shard_embs(shard)[start:stop]
    if crcs[shard] is not None and zlib.crc32(tokens) != crcs[shard][row]:
      raise self._read_error(
        f'{self.manifest["shards"][shard]["files"]["embs"]}: the embeddings of caption row '
        f'{row} fail their CRC-32 check'
      )
    return tokens.view(ml_dtypes.bfloat16)

  def lookup(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """text_embs [B, max_length, D] float32 zero-padded, text_mask [B, max_length] bool."""
    embs = np.zeros((len(captions), self.max_length, self.dim), np.float32)
    mask = np.zeros((len(captions), self.max_length), bool)
    for i, caption in enumerate(captions):
      tokens = self.get(caption)
      embs[i, : len(tokens)] = tokens.astype(np.float32)
      mask[i, : len(tokens)] = True
    return embs, mask


def _renamed(wanted: dict) -> dict:
  return {
    'encoder': wanted['encoder'],
    'max_length': wanted['max_length'],
    'fingerprint': wanted['dataset_fingerprint'],
  }


def _index_problem(
  shard: dict,
  offsets: np.ndarray,
  hashes: np.ndarray,
  crcs: np.ndarray | None,
  max_length: int,
) -> str:
  """What is wrong with a shard's offsets, hashes and span CRC-32s, read whole ('' if nothing):
  the shapes and dtypes it was saved with, and token spans that start at 0, never go back, end
  at its token count and hold at most max_length tokens each."""
  n, tokens = int(shard['num_captions']), int(shard['num_tokens'])
  files = shard['files']
  if (offsets.shape, offsets.dtype) != ((n + 1,), np.dtype(np.int64)):
    return f'{files["offsets"]} holds {offsets.dtype} {offsets.shape}, not int64 ({n + 1},)'
  if (hashes.shape, hashes.dtype) != ((n,), np.dtype(np.uint64)):
    return f'{files["hashes"]} holds {hashes.dtype} {hashes.shape}, not uint64 ({n},)'
  if crcs is not None and (crcs.shape, crcs.dtype) != ((n,), np.dtype(np.uint32)):
    return f'{files["crc32"]} holds {crcs.dtype} {crcs.shape}, not uint32 ({n},)'
  spans = np.diff(offsets)
  if (
    offsets[0] != 0
    or offsets[-1] != tokens
    or (n and not 0 <= spans.min() <= spans.max() <= max_length)
  ):
    return f'{files["offsets"]} does not split {tokens} tokens into spans of 0-{max_length}'
  return ''


_TOO_MANY_FILES = 'too many open files'


def _unreadable(name: str, e: Exception) -> str:
  if isinstance(e, OSError) and e.errno in (errno.EMFILE, errno.ENFILE):
    return f'{_TOO_MANY_FILES} ({e})'
  return f'{name} does not read ({type(e).__name__}: {e})'


def _load_checked(path: pathlib.Path, shard: dict, kind: str) -> tuple[np.ndarray | None, str]:
  """A shard's small file (offsets, hashes, crc32) read whole and checked against the CRC-32
  its manifest entry holds (when it has one): (array, '') or (None, what is wrong)."""
  name = shard['files'][kind]
  try:
    raw = (path / name).read_bytes()
    want = shard.get('crc32', {}).get(kind)
    if want is not None and zlib.crc32(raw) != want:
      return None, f'{name} fails its CRC-32 check'
    return np.load(io.BytesIO(raw), allow_pickle=False), ''
  except _UNREADABLE as e:
    return None, _unreadable(name, e)


def _read_index(
  path: pathlib.Path, shard: dict, max_length: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, str]:
  """A shard's (offsets, hashes, span CRC-32s or None for a cache built without them, ''), or
  its problem as the last item: a file that does not read or fails its CRC-32, or content
  that does not fit the entry (`_index_problem`)."""
  arrays = {}
  for kind in ('offsets', 'hashes', 'crc32'):
    if kind not in shard['files']:  # built before the checksums
      arrays[kind] = None
      continue
    arrays[kind], problem = _load_checked(path, shard, kind)
    if problem:
      return None, None, None, problem
  problem = _index_problem(shard, arrays['offsets'], arrays['hashes'], arrays['crc32'], max_length)
  return arrays['offsets'], arrays['hashes'], arrays['crc32'], problem


def _map_embs(path: pathlib.Path, shard: dict, dim: int) -> tuple[np.ndarray | None, str]:
  """A shard's [T, D] uint16 embeddings memory-mapped: (map, '') or (None, what is wrong)."""
  name = shard['files']['embs']
  try:
    embs = np.load(path / name, mmap_mode='r')
  except _UNREADABLE as e:
    return None, _unreadable(name, e)
  want = ((int(shard['num_tokens']), dim), np.dtype(np.uint16))
  if (embs.shape, embs.dtype) != want:  # a damaged header that still parses
    return None, f'{name} holds {embs.dtype} {embs.shape}, not {want}'
  return embs, ''


def _shard_problem(
  path: pathlib.Path, shard: dict, dim: int, max_length: int, whole: bool = False
) -> str:
  """What is wrong with a finished shard ('' if nothing): its small files as readers check them
  and its embeddings' shape; with `whole`, also the embeddings file's CRC-32 (a full read)."""
  try:
    *_, problem = _read_index(path, shard, max_length)
    if not problem:
      embs, problem = _map_embs(path, shard, dim)
      del embs  # the map closes
    want = shard.get('crc32', {}).get('embs')
    if not problem and whole and want is not None:
      if _file_crc32(path / shard['files']['embs']) != want:
        problem = f'{shard["files"]["embs"]} fails its CRC-32 check'
  except (KeyError, TypeError, ValueError) as e:  # an entry of another layout
    problem = f'its manifest entry does not read ({type(e).__name__}: {e})'
  except OSError as e:
    problem = _unreadable(shard.get('files', {}).get('embs', 'a shard file'), e)
  return problem


def _encode_shard(
  captions: Sequence[str], encoder: TextEncoder, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
  """Real-token embeddings of `captions`, concatenated: ([T, D] bf16 bits, [n + 1] offsets)."""
  pieces, lengths = [], []
  for start in range(0, len(captions), batch_size):
    batch = list(captions[start : start + batch_size])
    n = len(batch)
    batch += [''] * (batch_size - n)  # fixed batch shape: one compile, same numerics
    embs, mask = encoder.encode(batch)  # [B, L, D] f32, [B, L] bool
    for i in range(n):
      length = int(mask[i].sum())
      # A bfloat16 copy now: a view would keep the whole padded float32 batch alive until the
      # shard is done (shard_size x max_length x D x 4 bytes: 8 GiB for T5-XXL's defaults).
      pieces.append(np.asarray(embs[i, :length]).astype(ml_dtypes.bfloat16))
      lengths.append(length)
  tokens = np.concatenate(pieces).view(np.uint16)
  offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
  return tokens, offsets


class Processes(Protocol):
  """The processes that build one cache together (all of them call `build_cache`).

  `index` / `count` are this process's rank and the number of processes; `barrier(name)`
  returns once every process reached it; `allgather(value)` returns every process's
  JSON-serialisable `value`, in process order (and is a barrier too).
  """

  index: int
  count: int

  def barrier(self, name: str) -> None: ...

  def allgather(self, value: Any) -> list[Any]: ...


class SingleProcess:
  """`Processes` for a build by one process alone."""

  index = 0
  count = 1

  def barrier(self, name: str) -> None:
    del name

  def allgather(self, value: Any) -> list[Any]:
    return [value]


def shard_assignment(num_shards: int, done: Sequence[int], index: int, count: int) -> list[int]:
  """The shards process `index` of `count` encodes: every `count`-th shard not yet done.

  Shard i always holds the same captions (sorted caption list, fixed shard_size), so the
  assignment changes who writes a shard, never what it holds.
  """
  finished = set(done)
  todo = [i for i in range(num_shards) if i not in finished]
  return todo[index::count]


def _manifest_header(manifest: dict) -> dict:
  return {k: v for k, v in manifest.items() if k not in ('shards', 'complete', 'stats')}


def _header_digest(header: dict) -> str:
  return hashlib.sha256(json.dumps(header, sort_keys=True).encode()).hexdigest()


def _marker_path(path: pathlib.Path, index: int) -> pathlib.Path:
  return path / f'shard-{index:05d}{DONE_SUFFIX}'


def _read_markers(path: pathlib.Path, digest: str) -> dict[int, dict]:
  """Shard entries of the `*.done.json` markers written for this header (others ignored)."""
  found = {}
  for marker in sorted(path.glob(f'shard-*{DONE_SUFFIX}')):
    try:
      data = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
      continue
    if isinstance(data, dict) and data.get('header_digest') == digest:
      found[int(data['shard']['index'])] = data['shard']
  return found


def _prepare(path: pathlib.Path, header: dict, digest: str) -> dict:
  """Process 0, before anyone writes: the manifest to continue from, written to disk.

  Finished shards (listed in the manifest or marked done by any process) that are intact
  are folded into the manifest's shard list; a manifest for other captions / encoder /
  layout starts over; every other `shard-*` file (unfinished, or of an older build) and the
  temporary files of killed writers are removed.
  """
  path.mkdir(parents=True, exist_ok=True)
  manifest = _read_manifest(path)
  if manifest is not None:
    # A complete cache stays valid whatever the shard / batch sizes; a partial one resumes
    # only with the same layout, so that resumed shards equal uninterrupted ones.
    layout = ('shard_size', 'batch_size', 'num_shards')
    fields = [k for k in header if k not in layout or not manifest.get('complete')]
    changed = sorted(k for k in fields if manifest.get(k) != header[k])
    if changed:
      log.warning('Embedding cache %s was built with other %s; rebuilding it.', path, changed)
      manifest = None
  if manifest is not None and manifest.get('complete'):
    return manifest
  markers = _read_markers(path, digest) if manifest is not None else {}
  if manifest is None:
    manifest = {**header, 'shards': [], 'complete': False}
  listed = {s['index']: s for s in manifest['shards']}
  candidates = {**listed, **markers}
  done = {
    i: s
    for i, s in candidates.items()
    if not _shard_problem(path, s, header['dim'], header['max_length'])
  }
  manifest['shards'] = [done[i] for i in sorted(done)]
  _atomic_write_json(path / MANIFEST, manifest)
  keep = {f for s in manifest['shards'] for f in s['files'].values()}
  for stale in path.glob('shard-*'):  # markers (now in the manifest), unfinished or old shards
    if stale.name not in keep:
      stale.unlink(missing_ok=True)
  for stale in path.glob('*.tmp-*'):
    stale.unlink(missing_ok=True)
  return manifest


def _count_tokens(encoder: TextEncoder, captions: Sequence[str], chunk: int = 8192) -> int | None:
  """Real tokens (EOS included, truncated at max_length) the encoder will store for
  `captions`; None when the encoder exposes no Hugging Face tokenizer."""
  hf_tokenizer = getattr(getattr(encoder, 'tokenizer', None), 'hf_tokenizer', None)
  if hf_tokenizer is None:
    return None
  total = 0
  for start in range(0, len(captions), chunk):
    ids = hf_tokenizer(
      list(captions[start : start + chunk]), max_length=encoder.max_length, truncation=True
    )['input_ids']
    total += sum(len(i) for i in ids)
  return total


def _gib(num_bytes: float) -> str:
  return f'{num_bytes / 2**30:.3f} GiB' if num_bytes >= 2**27 else f'{num_bytes / 2**20:.2f} MiB'


def _agree(processes: Processes, problem: str | None) -> None:
  """Every process raises CacheError (the same message) if any process found a problem."""
  problems = [p for p in processes.allgather(problem) if p]
  if problems:
    raise CacheError(problems[0])


def _finish(path: pathlib.Path, header: dict, digest: str, num_captions: int) -> str | None:
  """Process 0, after every process encoded its shards: the complete manifest, or why not."""
  manifest = _read_manifest(path) or {**header, 'shards': [], 'complete': False}
  candidates = {s['index']: s for s in manifest['shards']}
  candidates.update(_read_markers(path, digest))
  done = {
    i: s
    for i, s in candidates.items()
    if not _shard_problem(path, s, header['dim'], header['max_length'])
  }
  missing = [i for i in range(header['num_shards']) if i not in done]
  manifest['shards'] = [done[i] for i in sorted(done)]
  if missing:
    _atomic_write_json(path / MANIFEST, manifest)
    return (
      f'Embedding cache {str(path)!r} is incomplete after the build: shards {missing[:10]} '
      f'({len(missing)} of {header["num_shards"]}) are missing or damaged (a process '
      f'stopped early?). Rerun `{PRECOMPUTE_HINT}`: it resumes.'
    )
  num_tokens = sum(s['num_tokens'] for s in manifest['shards'])
  total_bytes = sum(
    (path / f).stat().st_size for s in manifest['shards'] for f in s['files'].values()
  )
  manifest['stats'] = {
    'num_captions': num_captions,
    'num_tokens': num_tokens,
    'tokens_per_caption': num_tokens / num_captions,
    'total_bytes': total_bytes,
    'bytes_per_caption': total_bytes / num_captions,
    'dim': header['dim'],
    'max_length': header['max_length'],
    'num_shards': header['num_shards'],
  }
  manifest['complete'] = True
  _atomic_write_json(path / MANIFEST, manifest)
  for marker in path.glob(f'shard-*{DONE_SUFFIX}'):
    marker.unlink(missing_ok=True)
  return None


def say(message: str, progress: bool) -> None:
  """Logged, and with `progress` printed to stderr (with the bar): a bench script's stdout
  stays its one JSON line."""
  log.info('%s', message)
  if progress:
    print(message, file=sys.stderr, flush=True)


def build_cache(
  root: str,
  captions: Sequence[str],
  encoder: TextEncoder,
  *,
  dataset_fingerprint: str,
  shard_size: int = 4096,
  batch_size: int = 64,
  progress: bool = True,
  processes: Processes | None = None,
  encoder_id: str | None = None,
) -> EmbeddingCache:
  """Encodes the (deduplicated) captions into `root/<cache_key>/`, resuming a partial build.

  `encoder_id` (default `encoder.name`) names the encoder in the key and manifest; pass one
  that also says how it computes (precompute adds a non-default `text.dtype`), so caches of
  differently computed embeddings never mix.

  With `processes` (see `Processes`; `precompute.open_or_build_cache` passes the JAX
  processes), every process calls this with the same captions, encodes its share of the
  shards (`shard_assignment`) on its own devices and marks each finished shard with a
  `shard-NNNNN.done.json` file; process 0 then lists them all in the manifest and marks it
  complete. `root` must be on storage that all processes share. The files are byte-identical
  to a one-process build with the same `batch_size` (shard i holds the same captions whatever
  the process count).

  Prints (with `progress`) the caption and token counts and the expected size before
  encoding, and captions/s per device after. Returns the opened cache; its `stats()` give
  bytes per caption and total size, and `build_report` this run's encoding speed.
  """
  processes = processes or SingleProcess()
  if shard_size < 1 or batch_size < 1:
    raise ValueError(f'shard_size and batch_size must be >= 1, got {shard_size}, {batch_size}.')
  bad = [type(c).__name__ for c in captions if not isinstance(c, str)]
  if bad:
    raise TypeError(f'Captions must be str; got {len(bad)} of type {sorted(set(bad))}.')
  unique = sorted(set(captions))  # shard layout independent of the source's order
  if not unique:
    raise ValueError('No captions to encode: the data source returned an empty caption list.')
  hashes = caption_hashes(unique)
  if len(np.unique(hashes)) != len(hashes):
    raise CacheError('Two different captions share a 64-bit hash; rename one of them.')

  encoder_id = encoder_id or encoder.name
  path = pathlib.Path(root).expanduser() / cache_key(
    encoder_id, encoder.max_length, dataset_fingerprint
  )
  num_shards = math.ceil(len(unique) / shard_size)
  header = {
    'format_version': FORMAT_VERSION,
    'encoder': encoder_id,
    'max_length': encoder.max_length,
    'dataset_fingerprint': str(dataset_fingerprint),
    'dim': encoder.dim,
    'dtype': 'bfloat16',
    'num_captions': len(unique),
    'num_shards': num_shards,
    'shard_size': shard_size,
    'batch_size': batch_size,
    'captions_digest': _captions_digest(unique),
  }
  digest = _header_digest(header)
  digests = processes.allgather(digest)
  if len(set(digests)) > 1:
    differ = [i for i, d in enumerate(digests) if d != digests[0]]
    raise CacheError(
      f'Processes {differ} would build another embedding cache than process 0 (other '
      'captions, encoder, max_length or batch size): every process must see the same data '
      'and config (and the same number of local devices).'
    )
  chief = processes.index == 0
  # One build of a cache at a time: another job building the same one (two stages started
  # together on one dataset) would delete this one's unfinished files; it waits, then finds the
  # cache complete.
  with _build_lock(path) if chief else contextlib.nullcontext():
    if chief:
      _prepare(path, header, digest)
    processes.barrier('embedding_cache_prepared')
    manifest = _read_manifest(path)
    _agree(
      processes,
      None
      if manifest is not None
      else (
        f'Process {processes.index} does not see the manifest that process 0 wrote in '
        f'{str(path)!r}: text.cache_dir must be on storage that every host shares.'
      ),
    )
    if manifest.get('complete'):
      if chief:
        log.info('Embedding cache %s is complete (%d captions).', path, len(unique))
      return EmbeddingCache(path, manifest)

    done = {s['index']: s for s in manifest['shards']}
    mine = shard_assignment(num_shards, list(done), processes.index, processes.count)
    my_captions = [c for i in mine for c in unique[i * shard_size : (i + 1) * shard_size]]
    devices = _num_devices(encoder)
    counts = processes.allgather([_count_tokens(encoder, my_captions), len(my_captions)])
    if chief:
      todo_tokens = [t for t, _ in counts]
      tokens = (
        None
        if None in todo_tokens
        else sum(todo_tokens) + sum(s['num_tokens'] for s in done.values())
      )
      size = 'unknown' if tokens is None else _gib(tokens * encoder.dim * 2)
      say(
        f'Embedding cache {path}: {len(unique)} captions ({len(captions) - len(unique)} '
        f'duplicates dropped), {tokens if tokens is not None else "?"} tokens, about {size} on '
        f'disk (tokens x dim {encoder.dim} x 2 bytes, bfloat16). {len(done)} of {num_shards} '
        f'shards already done; encoding {sum(n for _, n in counts)} captions on '
        f'{processes.count} process(es) x {devices} device(s).',
        progress,
      )

    try:
      from tqdm.auto import tqdm

      bar = tqdm(
        total=len(my_captions), unit='caption', desc='Encoding captions', disable=not progress
      )
    except ImportError:  # tqdm is a requirement; keep building without a bar if it is absent
      bar = None
    started = time.perf_counter()
    for index in mine:
      shard_captions = unique[index * shard_size : (index + 1) * shard_size]
      tokens, offsets = _encode_shard(shard_captions, encoder, batch_size)
      files = _shard_files(index)
      arrays = {
        'embs': tokens,
        'offsets': offsets,
        'hashes': hashes[index * shard_size : (index + 1) * shard_size],
        'crc32': _span_crcs(tokens, offsets),
      }
      for kind, array in arrays.items():
        _atomic_save(path / files[kind], array)
      entry = {
        'index': index,
        'num_captions': len(shard_captions),
        'num_tokens': int(offsets[-1]),
        'files': files,
        # Of each file's bytes as saved, read back (np.save adds the .npy header).
        'crc32': {kind: _file_crc32(path / name) for kind, name in files.items()},
      }
      _atomic_write_json(_marker_path(path, index), {'header_digest': digest, 'shard': entry})
      if bar is not None:
        bar.update(len(shard_captions))
    if bar is not None:
      bar.close()
    seconds = time.perf_counter() - started

    truncated = getattr(getattr(encoder, 'tokenizer', None), 'num_truncated', 0)
    if truncated:
      log.warning(
        '%d captions were longer than max_length=%d tokens and were truncated.',
        truncated,
        encoder.max_length,
      )
    speeds = processes.allgather(
      {'captions': len(my_captions), 'seconds': seconds, 'devices': devices}
    )
    _agree(processes, _finish(path, header, digest, len(unique)) if chief else None)
    cache = EmbeddingCache(path, _read_manifest(path))
    cache.build_report = _speed_report(speeds)
    stats = cache.stats()
    if chief:
      say(
        f'Embedding cache {path}: {len(unique)} captions, '
        f'{stats["tokens_per_caption"]:.1f} tokens/caption, '
        f'{stats["bytes_per_caption"] / 1024:.1f} KiB/caption, {_gib(stats["total_bytes"])}. '
        f'This run encoded {cache.build_report["captions"]} captions in '
        f'{cache.build_report["seconds"]:.1f} s: '
        f'{cache.build_report["captions_per_s_per_device"]:.1f} captions/s per device '
        f'({cache.build_report["devices"]} device(s), compilation included).',
        progress,
      )
    return cache


def find_damaged_shards(cache: EmbeddingCache, index: int = 0, count: int = 1) -> list[list]:
  """[[shard index, what is wrong], ...] for the damaged shards among every `count`-th shard of
  a complete cache, from the `index`-th (several processes share the reading): every file read
  whole and checked against its CRC-32 (a cache built without checksums: their structure only)."""
  damaged = []
  for shard in cache.manifest['shards'][index::count]:
    problem = _shard_problem(cache.path, shard, cache.dim, cache.max_length, whole=True)
    if problem:
      damaged.append([int(shard['index']), problem])
  return damaged


def drop_shards(path: str | os.PathLike, indices: Sequence[int]) -> None:
  """Turns a complete cache into a partial build without the shards `indices` (their files are
  removed), so that the next `build_cache` of it encodes only those. Process 0 only."""
  path = pathlib.Path(path)
  with _build_lock(path):
    manifest = _read_manifest(path)
    gone = {int(i) for i in indices}
    names = [n for s in manifest['shards'] if s['index'] in gone for n in s['files'].values()]
    manifest['shards'] = [s for s in manifest['shards'] if s['index'] not in gone]
    manifest['complete'] = False
    manifest.pop('stats', None)
    _atomic_write_json(path / MANIFEST, manifest)  # first: no listed shard lacks its files
    for name in names:
      (path / name).unlink(missing_ok=True)


def adopt_matching_cache(
  root: str,
  captions: Sequence[str],
  *,
  encoder_id: str,
  max_length: int,
  dataset_fingerprint: str,
) -> EmbeddingCache | None:
  """A complete cache in `root` of these very captions, encoder and max_length, built for
  another dataset fingerprint, made this fingerprint's cache; None when `root` has none.

  A folder dataset's fingerprint covers its path and every file's mtime, so touching, moving or
  copying the images changes the key although the embeddings (they depend only on the captions)
  do not: re-encoding them (hours of T5-XXL for millions of captions) would rebuild the same
  bytes. The matching cache's shard files are hard-linked (copied where links fail) under the
  new key, next to a manifest that names the new fingerprint; the old cache stays as it was.
  A partial build under the new key is replaced. Call it on process 0 only.
  """
  unique = sorted(set(captions))
  if not unique:
    return None
  digest = _captions_digest(unique)
  root = pathlib.Path(root).expanduser()
  path = root / cache_key(encoder_id, max_length, dataset_fingerprint)
  try:
    if (_read_manifest(path) or {}).get('complete'):
      return None  # already this fingerprint's cache (the precompute CLI run again)
  except CacheError:
    pass  # an unreadable manifest: replaced below when a match is found
  for source, manifest in _caches(root):
    if source == path:
      continue
    same = (
      manifest.get('complete') is True
      and manifest.get('format_version') == FORMAT_VERSION
      and manifest.get('encoder') == str(encoder_id)
      and manifest.get('max_length') == int(max_length)
      and manifest.get('captions_digest') == digest
      and manifest.get('num_captions') == len(unique)
      and manifest.get('dtype') == 'bfloat16'
    )
    if not same or not all(
      not _shard_problem(source, s, manifest['dim'], manifest['max_length'])
      for s in manifest.get('shards', [])
    ):
      continue
    with _build_lock(path):
      keep = set()
      for shard in manifest['shards']:
        for name in shard['files'].values():
          tmp = path / f'{name}.tmp-{os.getpid()}'
          tmp.unlink(missing_ok=True)
          try:
            os.link(source / name, tmp)
          except OSError:  # a file system without hard links: copy
            shutil.copyfile(source / name, tmp)
          os.replace(tmp, path / name)
          keep.add(name)
      for stale in path.glob('shard-*'):  # a partial build's shards and markers
        if stale.name not in keep:
          stale.unlink(missing_ok=True)
      adopted = {**manifest, 'dataset_fingerprint': str(dataset_fingerprint)}
      _atomic_write_json(path / MANIFEST, adopted)
    log.warning(
      'Embedding cache %s holds these %d captions for encoder %r (max_length %d), built for '
      'another dataset fingerprint (the images were touched, moved or copied): linked its %d '
      'shards into %s instead of encoding them again.',
      source,
      len(unique),
      encoder_id,
      max_length,
      len(manifest['shards']),
      path,
    )
    return EmbeddingCache(path, adopted)
  return None


@contextlib.contextmanager
def _build_lock(path: pathlib.Path):
  """Hold an exclusive lock on `path/.build.lock` (flock: released when the process dies)."""
  import fcntl

  path.mkdir(parents=True, exist_ok=True)
  with open(path / '.build.lock', 'a') as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      log.warning('Embedding cache %s is being built by another process: waiting for it.', path)
      fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _num_devices(encoder: TextEncoder) -> int:
  mesh = getattr(encoder, 'mesh', None)
  return 1 if mesh is None else int(mesh.devices.size)


def _speed_report(speeds: list[dict]) -> dict[str, Any]:
  """Encoding speed of a build from every process's (captions, seconds, devices)."""
  captions = sum(s['captions'] for s in speeds)
  seconds = max(s['seconds'] for s in speeds)
  devices = sum(s['devices'] for s in speeds)
  return {
    'captions': captions,
    'seconds': seconds,
    'devices': devices,
    'processes': len(speeds),
    'captions_per_s_per_device': captions / max(seconds, 1e-9) / devices,
    'per_process': [
      s['captions'] / max(s['seconds'], 1e-9) / s['devices'] if s['captions'] else 0.0
      for s in speeds
    ],
  }
