"""Embedding cache: build / reopen / lookup, stale and missing errors, pickling, and a
SIGKILLed build that resumes to byte-identical shards."""

import collections
import json
import os
import pickle
import signal
import sys
import textwrap
import time

import ml_dtypes
import numpy as np
import pytest

from imagen_jax.text import cache as cache_lib
from imagen_jax.text import encoder as encoder_lib
from tests.conftest import finish, logged_output, start_logged

MAX_LENGTH = 16
CAPTIONS = [f'caption number {i} ' + 'ab' * (i % 5) for i in range(22)]


@pytest.fixture(scope='module')
def tiny_encoder():
  return encoder_lib.load_text_encoder('t5-tiny-random', max_length=MAX_LENGTH)


@pytest.fixture(scope='module')
def built(tmp_path_factory, tiny_encoder):
  root = tmp_path_factory.mktemp('cache')
  captions = CAPTIONS[:10] + CAPTIONS[:3]  # 3 duplicates
  cache = cache_lib.build_cache(
    str(root), captions, tiny_encoder, dataset_fingerprint='fp0', shard_size=4, batch_size=4
  )
  return root, cache


@pytest.mark.unit
def test_build_reopen_lookup(built, tiny_encoder):
  root, cache = built
  assert cache.num_captions == 10 and cache.dim == 32 and cache.max_length == MAX_LENGTH
  reopened = cache_lib.EmbeddingCache.open(
    str(root), encoder_name='t5-tiny-random', max_length=MAX_LENGTH, dataset_fingerprint='fp0'
  )
  assert reopened.path == cache.path and reopened.path.name == cache_lib.cache_key(
    't5-tiny-random', MAX_LENGTH, 'fp0'
  )
  batch = [CAPTIONS[7], CAPTIONS[0], CAPTIONS[7]]
  embs, mask = reopened.lookup(batch)
  want_embs, want_mask = tiny_encoder.encode(batch)
  assert embs.shape == (3, MAX_LENGTH, 32) and embs.dtype == np.float32
  np.testing.assert_array_equal(mask, want_mask)
  # Stored as bfloat16: rounding an encoder output is <= 2^-9 relative (0.2 %), so rtol 1 %
  # plus atol 0.02 (~5 bf16 ulp at |x| ~ 1) holds for any encoder dtype; a wrong row is O(1) off.
  np.testing.assert_allclose(embs, want_embs, atol=0.02, rtol=0.01)
  assert np.all(embs[~mask] == 0)
  one = reopened.get(CAPTIONS[0])
  assert one.dtype == ml_dtypes.bfloat16 and one.shape == (want_mask[1].sum(), 32)
  stats = reopened.stats()
  assert stats['num_captions'] == 10 and stats['total_bytes'] > stats['num_tokens'] * 32 * 2
  # Integer byte counts divided once: pytest.approx's default 1e-6 relative is ample.
  assert stats['bytes_per_caption'] == pytest.approx(stats['total_bytes'] / 10)
  manifest = json.loads((cache.path / cache_lib.MANIFEST).read_text())
  assert manifest['complete'] and len(manifest['shards']) == 3  # 10 captions / 4 per shard


@pytest.mark.unit
def test_pickles_for_workers(built):
  _, cache = built
  cache.get(CAPTIONS[1])  # opens the mmaps
  clone = pickle.loads(pickle.dumps(cache))
  assert clone._loaded is None  # reopened lazily in the worker
  np.testing.assert_array_equal(
    clone.get(CAPTIONS[1]).astype(np.float32), cache.get(CAPTIONS[1]).astype(np.float32)
  )


@pytest.mark.unit
@pytest.mark.parametrize(
  'field, kwargs',
  [
    ('encoder', dict(encoder_name='t5-other', max_length=MAX_LENGTH, dataset_fingerprint='fp0')),
    ('max_length', dict(encoder_name='t5-tiny-random', max_length=32, dataset_fingerprint='fp0')),
    (
      'dataset fingerprint',
      dict(encoder_name='t5-tiny-random', max_length=MAX_LENGTH, dataset_fingerprint='fp1'),
    ),
  ],
)
def test_stale_cache_refused(built, field, kwargs):
  root, _ = built
  with pytest.raises(cache_lib.CacheError) as info:
    cache_lib.EmbeddingCache.open(str(root), **kwargs)
  message = str(info.value)
  assert f'{field} is' in message and 'stale' in message and 'imagen_jax.precompute' in message


@pytest.mark.unit
def test_missing_cache_and_caption_errors(built, tmp_path):
  with pytest.raises(cache_lib.CacheError, match='No embedding cache.*imagen_jax.precompute'):
    cache_lib.EmbeddingCache.open(
      str(tmp_path), encoder_name='t5-tiny-random', max_length=16, dataset_fingerprint='x'
    )
  _, cache = built
  with pytest.raises(cache_lib.CaptionNotCachedError) as info:
    cache.lookup([CAPTIONS[0], 'a caption that was never encoded'])
  assert 'never encoded' in str(info.value) and 'python -m imagen_jax.precompute' in str(info.value)
  assert CAPTIONS[0] in cache and 'a caption that was never encoded' not in cache


@pytest.mark.unit
def test_incomplete_cache_refused(tmp_path, tiny_encoder):
  cache = cache_lib.build_cache(
    str(tmp_path), CAPTIONS[:5], tiny_encoder, dataset_fingerprint='fp', shard_size=4, batch_size=4
  )
  manifest_path = cache.path / cache_lib.MANIFEST
  manifest = json.loads(manifest_path.read_text())
  manifest['complete'] = False
  manifest['shards'] = manifest['shards'][:1]
  manifest_path.write_text(json.dumps(manifest))
  with pytest.raises(cache_lib.CacheError, match='incomplete: 1 of 2 shards.*resumes'):
    cache_lib.EmbeddingCache.open(
      str(tmp_path), encoder_name='t5-tiny-random', max_length=16, dataset_fingerprint='fp'
    )


@pytest.mark.unit
def test_empty_shard_file_is_damage_not_a_traceback(tmp_path, tiny_encoder):
  # A zero-byte file (a disk that filled up, a copy cut short): np.load raises EOFError.
  cache = cache_lib.build_cache(
    str(tmp_path), CAPTIONS[:5], tiny_encoder, dataset_fingerprint='fp', shard_size=4, batch_size=4
  )
  shard = json.loads((cache.path / cache_lib.MANIFEST).read_text())['shards'][0]
  (cache.path / shard['files']['offsets']).write_bytes(b'')
  reopened = cache_lib.EmbeddingCache.open(
    str(tmp_path), encoder_name='t5-tiny-random', max_length=16, dataset_fingerprint='fp'
  )
  with pytest.raises(cache_lib.CacheError, match='is damaged'):
    reopened.lookup(CAPTIONS[:1])
  assert cache_lib._shard_problem(cache.path, shard, cache.dim, 16)  # a resumed build redoes it


@pytest.mark.unit
def test_a_flipped_bit_in_a_shard_files_header_is_damage_not_a_traceback(tmp_path, tiny_encoder):
  # np.load parses the .npy header's dict as Python literals: some flips raised SyntaxError or
  # tokenize.TokenError, which escaped the damage handling as a traceback mid-training.
  cache = cache_lib.build_cache(
    str(tmp_path), CAPTIONS[:5], tiny_encoder, dataset_fingerprint='fp', shard_size=8, batch_size=4
  )
  shard = json.loads((cache.path / cache_lib.MANIFEST).read_text())['shards'][0]
  outcomes = collections.Counter()
  for kind in ('embs', 'offsets', 'hashes', 'crc32'):
    path = cache.path / shard['files'][kind]
    good = path.read_bytes()
    header = 10 + int.from_bytes(good[8:10], 'little')  # magic, version, length, then the dict
    for bit in range(8 * header):
      raw = bytearray(good)
      raw[bit // 8] ^= 1 << (bit % 8)
      path.write_bytes(bytes(raw))
      reopened = cache_lib.EmbeddingCache.open(
        str(tmp_path), encoder_name='t5-tiny-random', max_length=16, dataset_fingerprint='fp'
      )
      try:
        reopened.lookup(CAPTIONS[:5])
        outcomes['read'] += 1  # a flip the header shrugs off (a space, a digit of the same size)
      except cache_lib.CacheError:
        outcomes['damaged'] += 1
      except cache_lib.CaptionNotCachedError:  # the header's length byte: the hashes misread,
        outcomes['not found'] += 1  # which training reports in one line (rebuild the cache)
      cache_lib._shard_problem(cache.path, shard, cache.dim, 16)  # no exception either
    path.write_bytes(good)
  assert outcomes['damaged'] > 0, outcomes


def _data_start(path) -> int:
  raw = path.read_bytes()
  return 10 + int.from_bytes(raw[8:10], 'little')  # magic, version, header length, header


def _flip(path, byte: int, bit: int = 0) -> None:
  raw = bytearray(path.read_bytes())
  raw[byte] ^= 1 << bit
  path.write_bytes(bytes(raw))


@pytest.mark.unit
def test_a_flipped_bit_in_the_embeddings_or_index_is_damage_never_read(tmp_path, tiny_encoder):
  # The cache had no checksums: a flipped bit in a shard's embedding data (not its header) was
  # trained on unnoticed, and one in an offset that kept the spans plausible shifted a
  # caption's tokens. Every caption's bytes are now checked against its CRC-32 on reading.
  cache = cache_lib.build_cache(
    str(tmp_path), CAPTIONS[:6], tiny_encoder, dataset_fingerprint='fp', shard_size=3, batch_size=4
  )
  captions = sorted(set(CAPTIONS[:6]))  # the build's order: shard 0 holds the first three
  shard = cache.manifest['shards'][0]
  embs_path = cache.path / shard['files']['embs']
  offsets = np.load(cache.path / shard['files']['offsets'])
  start = _data_start(embs_path)
  good = embs_path.read_bytes()
  rng = np.random.default_rng(0)

  def reopened():
    return cache_lib.EmbeddingCache.open(
      str(tmp_path), encoder_name='t5-tiny-random', max_length=16, dataset_fingerprint='fp'
    )

  for row in range(3):  # one random bit of each caption's bytes
    first, stop = start + 2 * 32 * offsets[row], start + 2 * 32 * offsets[row + 1]
    _flip(embs_path, int(rng.integers(first, stop)), int(rng.integers(8)))
    fresh = reopened()
    with pytest.raises(cache_lib.CacheError, match=rf'row {row} fail their CRC-32.*--verify'):
      fresh.lookup([captions[row]])
    others = [c for i, c in enumerate(captions) if i != row]
    assert fresh.lookup(others)[0].shape == (5, 16, 32)  # the rest still read
    assert not cache_lib._shard_problem(cache.path, shard, 32, 16)  # a resume's quick check
    assert cache_lib.find_damaged_shards(fresh) == [[0, f'{embs_path.name} fails its CRC-32 check']]
    embs_path.write_bytes(good)
  assert cache_lib.find_damaged_shards(reopened()) == []

  # An offset's lowest bit: the spans still fit (0..max_length, never back), the tokens shift.
  offsets_path = cache.path / shard['files']['offsets']
  _flip(offsets_path, _data_start(offsets_path) + 8)  # offsets[1], little-endian low byte
  with pytest.raises(cache_lib.CacheError, match='offsets.npy fails its CRC-32 check'):
    reopened().lookup(captions[3:])  # at open: a shard's index is read whole
  assert cache_lib._shard_problem(cache.path, shard, 32, 16)  # a resumed build redoes it


@pytest.mark.unit
def test_a_cache_built_before_the_checksums_is_read(tmp_path, tiny_encoder):
  cache = cache_lib.build_cache(
    str(tmp_path), CAPTIONS[:5], tiny_encoder, dataset_fingerprint='fp', shard_size=4, batch_size=4
  )
  want = cache.lookup(CAPTIONS[:5])[0]
  manifest = json.loads((cache.path / cache_lib.MANIFEST).read_text())
  for shard in manifest['shards']:  # as the previous format wrote it
    (cache.path / shard['files'].pop('crc32')).unlink()
    del shard['crc32']
  (cache.path / cache_lib.MANIFEST).write_text(json.dumps(manifest))
  old = cache_lib.EmbeddingCache.open(
    str(tmp_path), encoder_name='t5-tiny-random', max_length=16, dataset_fingerprint='fp'
  )
  np.testing.assert_array_equal(old.lookup(CAPTIONS[:5])[0], want)
  assert cache_lib.find_damaged_shards(old) == []


@pytest.mark.unit
def test_encoding_a_shard_keeps_one_padded_batch_not_all_of_them():
  # Each caption's real tokens were kept as a view of its padded float32 batch, so every batch
  # of the shard stayed alive until the end: 8 GiB per shard for T5-XXL's defaults, for 0.8 GiB
  # of bfloat16 result. Here 32 batches of [16, 64, 256] float32 (1 MiB each), 4 real tokens.
  import tracemalloc

  class FakeEncoder:
    def encode(self, batch):
      embs = np.full((len(batch), 64, 256), 0.5, np.float32)
      mask = np.zeros((len(batch), 64), bool)
      mask[:, :4] = True
      return embs, mask

  tracemalloc.start()
  try:
    tokens, offsets = cache_lib._encode_shard([f'c{i}' for i in range(512)], FakeEncoder(), 16)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert tokens.shape == (512 * 4, 256) and offsets[-1] == 512 * 4
  assert np.all(tokens.view(ml_dtypes.bfloat16) == 0.5)
  assert peak < 8 * 2**20, peak  # one batch, the pieces and the result: 3.1 MiB; before: 35 MiB


_FD_CHILD = textwrap.dedent(
  """
  import json, os, resource, sys
  from imagen_jax.text import cache
  path, limit_open = sys.argv[1], int(sys.argv[2])
  cache.OPEN_SHARDS = limit_open
  manifest = json.load(open(os.path.join(path, cache.MANIFEST)))
  reader = cache.EmbeddingCache(path, manifest)
  reader._load()  # offsets and hashes: read whole, their files closed again
  opened = len(os.listdir('/proc/self/fd'))
  hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
  resource.setrlimit(resource.RLIMIT_NOFILE, (opened + 10, hard))
  try:
    rows = [reader.get(c).astype('float32').sum() for c in json.loads(sys.argv[3])]
  except cache.CacheError as e:
    print(json.dumps({'error': str(e)}))
  else:
    print(json.dumps({'sums': [float(r) for r in rows], 'mapped': len(reader._open)}))
  """
)


@pytest.mark.unit
@pytest.mark.skipif(not os.path.isdir('/proc/self/fd'), reason='counts /proc/self/fd')
def test_a_cache_of_more_shards_than_open_files_allowed_is_read(tmp_path, tiny_encoder):
  # Every shard used to stay memory-mapped, one file descriptor each: a cache of more shards
  # than `ulimit -n` (1024 by default: ~4M captions at 4096 per shard) could not be read, and
  # the error called it damaged. Here 24 one-caption shards under a limit of 10 more files.
  import subprocess

  captions = [f'shard caption {i}' for i in range(24)]
  cache = cache_lib.build_cache(
    str(tmp_path), captions, tiny_encoder, dataset_fingerprint='fp', shard_size=1, batch_size=4
  )
  want = [float(cache.get(c).astype(np.float32).sum()) for c in captions]

  def read(open_shards):
    proc = subprocess.run(
      [sys.executable, '-c', _FD_CHILD, str(cache.path), str(open_shards), json.dumps(captions)],
      capture_output=True,
      text=True,
      timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])

  got = read(4)
  assert got['sums'] == want and got['mapped'] == 4
  # Without the bound, the descriptors run out: the message says so, and not to delete the cache.
  error = read(1000)['error']
  assert 'too many open files' in error and 'ulimit -n' in error and 'not damaged' in error


_CHILD = textwrap.dedent(
  """
  import sys, time
  from imagen_jax.text import cache, encoder

  class SlowEncoder:  # same encoder, slowed down so the parent can kill it mid-build
    def __init__(self, inner):
      self.inner, self.name, self.dim = inner, inner.name, inner.dim
      self.max_length = inner.max_length

    def encode(self, captions):
      time.sleep(float(sys.argv[3]) if len(sys.argv) > 3 else 0.4)
      return self.inner.encode(captions)

  captions = [l for l in open(sys.argv[2], encoding='utf-8').read().split('\\n') if l]
  inner = encoder.load_text_encoder('t5-tiny-random', max_length=16)
  cache.build_cache(sys.argv[1], captions, SlowEncoder(inner), dataset_fingerprint='fp',
                    shard_size=4, batch_size=2, progress=False)
  print('FINISHED')
  """
)


@pytest.mark.smoke
def test_killed_build_resumes_byte_identical(tmp_path, tiny_encoder):
  captions = CAPTIONS  # 22 captions -> 6 shards of 4, 2 batches each
  (tmp_path / 'captions.txt').write_text('\n'.join(captions), encoding='utf-8')
  killed_root, clean_root = tmp_path / 'killed', tmp_path / 'clean'
  key = cache_lib.cache_key('t5-tiny-random', 16, 'fp')
  manifest_path = killed_root / key / cache_lib.MANIFEST

  proc = start_logged(  # output to files: a pipe read only at the end could stop the child
    [sys.executable, '-c', _CHILD, str(killed_root), str(tmp_path / 'captions.txt')],
    tmp_path / 'logs',
    env=dict(os.environ),
  )
  deadline = time.time() + 120
  markers = []
  while time.time() < deadline and proc.poll() is None:
    markers = sorted((killed_root / key).glob('shard-*' + cache_lib.DONE_SUFFIX))
    if markers:
      proc.send_signal(signal.SIGKILL)
      break
    time.sleep(0.05)
  proc.wait(timeout=30)
  assert proc.returncode == -signal.SIGKILL, logged_output(proc)[1][-2000:]

  manifest = json.loads(manifest_path.read_text())
  markers = sorted((killed_root / key).glob('shard-*' + cache_lib.DONE_SUFFIX))
  assert not manifest['complete'] and 1 <= len(markers) < 6
  (killed_root / key / 'shard-00009.embs.npy').write_bytes(b'left by an older build')
  with pytest.raises(cache_lib.CacheError, match=f'incomplete: {len(markers)} of 6 shards'):
    cache_lib.EmbeddingCache.open(
      str(killed_root), encoder_name='t5-tiny-random', max_length=16, dataset_fingerprint='fp'
    )
  first = killed_root / key / json.loads(markers[0].read_text())['shard']['files']['embs']
  first_stat = first.stat()

  resumed = cache_lib.build_cache(
    str(killed_root), captions, tiny_encoder, dataset_fingerprint='fp', shard_size=4, batch_size=2
  )
  clean = cache_lib.build_cache(
    str(clean_root), captions, tiny_encoder, dataset_fingerprint='fp', shard_size=4, batch_size=2
  )
  assert first.stat().st_mtime_ns == first_stat.st_mtime_ns  # finished shards were not redone
  assert first.stat().st_ino == first_stat.st_ino
  names = sorted(p.name for p in clean.path.iterdir())
  assert names == sorted(p.name for p in resumed.path.iterdir())
  assert not [n for n in names if '.tmp-' in n or n.endswith(cache_lib.DONE_SUFFIX)]
  shard_files = [n for n in names if n.startswith('shard-')]
  assert len(shard_files) == 24  # 6 shards x (embs, offsets, hashes, crc32)
  for name in shard_files:
    assert (resumed.path / name).read_bytes() == (clean.path / name).read_bytes(), name
  assert resumed.manifest == clean.manifest


@pytest.mark.smoke
def test_a_second_build_of_the_same_cache_waits_for_the_first(tmp_path, tiny_encoder):
  # Two jobs building one cache (two stages started together on one dataset): the second used to
  # delete the first one's unfinished files, which then failed ('incomplete after the build' or a
  # KeyError). Now the second waits for the build lock and finds the cache complete.
  (tmp_path / 'captions.txt').write_text('\n'.join(CAPTIONS), encoding='utf-8')
  root = tmp_path / 'shared'
  key = cache_lib.cache_key('t5-tiny-random', 16, 'fp')
  cmd = [sys.executable, '-c', _CHILD, str(root), str(tmp_path / 'captions.txt')]
  # 1.5 s per batch: the first build takes ~18 s, so it still runs when the second has loaded.
  first = start_logged([*cmd, '1.5'], tmp_path / 'logs', env=dict(os.environ))
  deadline = time.time() + 120
  while time.time() < deadline and not list((root / key).glob('shard-*' + cache_lib.DONE_SUFFIX)):
    assert first.poll() is None, logged_output(first)[1][-2000:]
    time.sleep(0.05)
  second = start_logged(cmd, tmp_path / 'logs', env=dict(os.environ))
  results = finish([first, second], timeout=300)
  for rc, out, err in results:
    assert rc == 0 and 'FINISHED' in out, err[-2000:]
  assert 'is being built by another process: waiting for it' in results[1][2]
  clean = cache_lib.build_cache(
    str(tmp_path / 'clean'),
    CAPTIONS,
    tiny_encoder,
    dataset_fingerprint='fp',
    shard_size=4,
    batch_size=2,
  )
  built = json.loads((root / key / cache_lib.MANIFEST).read_text())
  assert built == clean.manifest and built['complete']
  for name in (n for n in os.listdir(clean.path) if n.startswith('shard-')):
    assert (root / key / name).read_bytes() == (clean.path / name).read_bytes(), name


@pytest.mark.unit
def test_complete_cache_is_reused_not_rebuilt(built, tiny_encoder):
  root, cache = built
  before = {p.name: p.stat().st_mtime_ns for p in cache.path.iterdir()}
  again = cache_lib.build_cache(
    str(root),
    list(reversed(CAPTIONS[:10])) + CAPTIONS[:10],
    tiny_encoder,
    dataset_fingerprint='fp0',
    shard_size=8,  # neither another layout nor another caption order invalidates it
    batch_size=2,
  )
  assert again.path == cache.path
  assert {p.name: p.stat().st_mtime_ns for p in cache.path.iterdir()} == before


class _ThreadProcesses:
  """`cache.Processes` for threads standing in for processes (barrier + allgather)."""

  def __init__(self, shared: dict, index: int, count: int):
    self.shared, self.index, self.count = shared, index, count

  def barrier(self, name: str) -> None:
    self.shared['barrier'].wait(timeout=60)

  def allgather(self, value):
    slots = self.shared.setdefault('slots', [None] * self.count)
    self.barrier('before')
    slots[self.index] = value
    self.barrier('written')
    gathered = list(slots)
    self.barrier('read')
    return gathered


def _build_in_threads(root, caption_lists, encoder) -> list:
  import threading

  shared = {'barrier': threading.Barrier(len(caption_lists))}
  results = [None] * len(caption_lists)

  def run(i):
    try:
      results[i] = cache_lib.build_cache(
        str(root),
        caption_lists[i],
        encoder,
        dataset_fingerprint='fp',
        shard_size=4,
        batch_size=2,
        progress=False,
        processes=_ThreadProcesses(shared, i, len(caption_lists)),
      )
    except Exception as e:  # noqa: BLE001 - returned to the test
      results[i] = e

  threads = [threading.Thread(target=run, args=(i,)) for i in range(len(caption_lists))]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=120)
  assert not any(t.is_alive() for t in threads), 'a build thread hangs'
  return results


@pytest.mark.unit
def test_shard_assignment_covers_every_shard_once():
  for count in (1, 2, 3, 7):
    for done in ([], [0, 3, 4]):
      parts = [cache_lib.shard_assignment(6, done, i, count) for i in range(count)]
      assert sorted(s for p in parts for s in p) == [i for i in range(6) if i not in done]


@pytest.mark.unit
def test_three_process_build_equals_one_process(tmp_path, tiny_encoder):
  one = cache_lib.build_cache(
    str(tmp_path / 'one'), CAPTIONS, tiny_encoder, dataset_fingerprint='fp', shard_size=4,
    batch_size=2, progress=False,
  )  # fmt: skip
  results = _build_in_threads(tmp_path / 'three', [CAPTIONS] * 3, tiny_encoder)
  assert all(isinstance(r, cache_lib.EmbeddingCache) for r in results), results
  assert results[0].build_report['processes'] == 3
  assert results[0].build_report['captions'] == len(CAPTIONS)
  names = sorted(p.name for p in one.path.iterdir())
  assert names == sorted(p.name for p in results[0].path.iterdir())
  for name in names:
    assert (one.path / name).read_bytes() == (results[0].path / name).read_bytes(), name


@pytest.mark.unit
def test_processes_with_other_captions_all_refuse(tmp_path, tiny_encoder):
  results = _build_in_threads(tmp_path, [CAPTIONS, CAPTIONS[:-1]], tiny_encoder)
  for r in results:  # every process raises the same error, none hangs
    assert isinstance(r, cache_lib.CacheError) and 'Processes [1]' in str(r), r
  assert not list(tmp_path.iterdir())  # nothing was written


@pytest.mark.unit
def test_build_prints_size_estimate_and_speed(tmp_path, tiny_encoder, capsys):
  cache = cache_lib.build_cache(
    str(tmp_path), CAPTIONS[:6], tiny_encoder, dataset_fingerprint='fp', shard_size=4,
    batch_size=2, progress=True,
  )  # fmt: skip
  captured = capsys.readouterr()
  out = captured.err
  assert captured.out == ''  # stdout stays a bench script's one JSON line
  stats = cache.stats()
  assert f'6 captions (0 duplicates dropped), {stats["num_tokens"]} tokens' in out
  assert f'{stats["num_tokens"] * 32 * 2 / 2**20:.2f} MiB on disk (tokens x dim 32 x 2 bytes' in out
  assert 'captions/s per device' in out and cache.build_report['captions'] == 6
