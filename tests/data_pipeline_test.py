"""The grain pipeline: batches, determinism, exact resume, sharding, bad-data accounting."""

import io
import json
import logging
import os
import pathlib
import re
import signal
import struct
import time
import zlib

import ml_collections
import ml_dtypes
import numpy as np
import pytest
from PIL import Image

from imagen_jax.data import pipeline, sources
from imagen_jax.data.sources import DataError
from tests.conftest import pipeline_config


class _NotCached(KeyError):
  pass


class FakeEmbeddingCache:
  """Test double of the `imagen_jax.text.cache.EmbeddingCache` interface (get/max_length/dim).

  Each caption maps to deterministic [n_tokens, dim] values, n_tokens = words + 1.
  """

  max_length = 6
  dim = 4

  def __init__(self, captions):
    self._table = {}
    for caption in captions:
      n = min(len(caption.split()) + 1, self.max_length)
      seed = zlib.crc32(caption.encode())
      values = np.random.default_rng(seed).normal(size=(n, self.dim))
      self._table[caption] = values.astype(ml_dtypes.bfloat16)  # as the real cache stores them
    self.longest_caption = max((len(v) for v in self._table.values()), default=0)

  def get(self, caption):
    if caption not in self._table:
      raise _NotCached(caption)
    return self._table[caption]


def _config(path, **data_overrides) -> ml_collections.ConfigDict:
  return pipeline_config(path, batch_size=4, **{'prefetch': 2, **data_overrides})


def _solid_folder(root, n=12):
  """n solid 8x8 images; red channel = 10 * index identifies the example in a batch."""
  root.mkdir(exist_ok=True)
  for i in range(n):
    Image.new('RGB', (8, 8), (10 * i, 255 - 10 * i, 7)).save(root / f'{i:03d}.png')
    (root / f'{i:03d}.txt').write_text(f'solid colour number {i}')
  return root


def _noise_folder(root, n=12, size=14):
  root.mkdir(exist_ok=True)
  rng = np.random.default_rng(0)
  for i in range(n):
    Image.fromarray(rng.integers(0, 255, (size, size + i, 3), np.uint8)).save(root / f'{i}.png')
    (root / f'{i}.txt').write_text(f'noise {i}')
  return root


def _ids(batch) -> list[int]:
  red = np.round((batch['image'][:, 0, 0, 0] + 1.0) * 127.5).astype(int)
  assert (red % 10 == 0).all()
  return list(red // 10)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
  """Exact: the same records through the same deterministic NumPy preprocessing (no jit)."""
  assert len(a) == len(b)
  for x, y in zip(a, b, strict=True):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def _iterator(config, **kwargs):
  source = sources.build_source(config.data)
  cache = FakeEmbeddingCache(source.captions())
  return pipeline.make_iterator(config, text_cache=cache, source=source, **kwargs), cache


@pytest.mark.unit
def test_base_batches_shapes_values_and_text(tmp_path):
  config = _config(_solid_folder(tmp_path / 'solid'))
  it, cache = _iterator(config)
  batch = next(it)
  assert set(batch) == {'image', 'text_embs', 'text_mask'}
  assert batch['image'].shape == (4, 8, 8, 3) and batch['image'].dtype == np.float32
  length = pipeline.text_length_bucket(cache.longest_caption, cache.max_length)
  assert length == 6  # captions of 5 tokens (4 words + EOS) -> bucket 8, capped at max_length 6
  assert batch['text_embs'].shape == (4, 6, 4) and batch['text_embs'].dtype == ml_dtypes.bfloat16
  assert batch['text_mask'].shape == (4, 6) and batch['text_mask'].dtype == bool
  assert batch['image'].min() >= -1.0 and batch['image'].max() <= 1.0
  for row, index in enumerate(_ids(batch)):
    expected = cache.get(f'solid colour number {index}')  # [n, D]
    n = expected.shape[0]
    np.testing.assert_array_equal(batch['text_mask'][row], np.arange(6) < n)
    # Exact: the cached bfloat16 values themselves.
    np.testing.assert_array_equal(batch['text_embs'][row, :n], expected)
    assert (batch['text_embs'][row, n:] == 0).all()
    # f32 x / 127.5 - 1 of uint8 pixels: <= 2 roundings of values <= 1; 1e-6 is ~8 ulp, and one
    # uint8 level (7.8e-3) would fail.
    np.testing.assert_allclose(
      batch['image'][row, 3, 3], np.array([10 * index, 255 - 10 * index, 7]) / 127.5 - 1, atol=1e-6
    )


@pytest.mark.unit
def test_sr_batches_have_lowres(tmp_path):
  config = _config(_noise_folder(tmp_path / 'noise'), lowres_resolution=4, random_crop=True)
  it, _ = _iterator(config)
  batch = next(it)
  assert batch['image'].shape == (4, 8, 8, 3)
  assert batch['lowres'].shape == (4, 4, 4, 3) and batch['lowres'].dtype == np.float32
  assert -1.0 <= batch['lowres'].min() and batch['lowres'].max() <= 1.0


@pytest.mark.unit
def test_deterministic_for_a_seed_and_reshuffled_each_epoch(tmp_path):
  config = _config(_solid_folder(tmp_path / 'solid'))
  first = _take(_iterator(config)[0], 6)
  _assert_batches_equal(first, _take(_iterator(config)[0], 6))
  epochs = [sum((_ids(b) for b in first[e * 3 : e * 3 + 3]), []) for e in range(2)]
  assert sorted(epochs[0]) == list(range(12)) and sorted(epochs[1]) == list(range(12))
  assert epochs[0] != epochs[1]  # a new order every epoch
  config.seed = 1
  other = sum((_ids(b) for b in _take(_iterator(config)[0], 3)), [])
  assert other != epochs[0]


@pytest.mark.unit
def test_exact_resume_from_json_state(tmp_path):
  # SR config: random crops must resume exactly too; threads prefetch (prefetch=2).
  config = _config(_noise_folder(tmp_path / 'noise'), lowres_resolution=4, random_crop=True)
  it, _ = _iterator(config)
  _take(it, 4)  # crosses an epoch boundary (12 examples, 3 batches per epoch)
  state = json.loads(json.dumps(it.get_state()))
  expected = _take(it, 5)
  restored, _ = _iterator(config)
  restored.set_state(state)
  _assert_batches_equal(expected, _take(restored, 5))


@pytest.mark.unit
def test_per_host_sharding_is_disjoint(tmp_path):
  config = _config(_solid_folder(tmp_path / 'solid'))
  seen = []
  for host in range(2):
    it, _ = _iterator(config, process_index=host, process_count=2)
    batches = _take(it, 3)  # one epoch of this host's 6 examples, 2 per batch
    assert all(b['image'].shape[0] == 2 for b in batches)
    seen.append(set(sum((_ids(b) for b in batches), [])))
  assert len(seen[0]) == 6 and len(seen[1]) == 6
  assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(12))
  with pytest.raises(DataError, match='multiple of the number of hosts'):
    _iterator(config, process_index=0, process_count=3)


@pytest.mark.unit
def test_global_batches_are_the_same_on_any_host_count(tmp_path):
  # Global batch t = the hosts' local batches side by side, whatever the host count, and the
  # positions of 2 hosts move exactly onto 1 host (and back).
  config = _config(_noise_folder(tmp_path / 'noise'), random_crop=True)
  single, _ = _iterator(config)
  reference = _take(single, 5)  # crosses the 12-example epoch
  hosts = [_iterator(config, process_index=i, process_count=2)[0] for i in range(2)]
  for t in range(3):
    local = [next(it) for it in hosts]
    for key in reference[t]:
      np.testing.assert_array_equal(np.concatenate([b[key] for b in local]), reference[t][key])

  states, exact = pipeline.convert_states(
    [it.get_state() for it in hosts], local_batch=2, new_count=1, new_local_batch=4
  )
  assert exact
  resumed, _ = _iterator(config)
  resumed.set_state(states[0])
  _assert_batches_equal(_take(resumed, 2), reference[3:5])

  back, exact = pipeline.convert_states(
    [resumed.get_state()], local_batch=4, new_count=2, new_local_batch=2
  )
  assert exact and back[0]['parent'] == back[1]['parent'] == {'next_index': 10}


@pytest.mark.unit
def test_convert_states_reports_uneven_positions():
  states = [
    {'parent': {'next_index': 6}, 'num_seen': 7, 'num_skipped': 1},
    {'parent': {'next_index': 4}, 'num_seen': 4, 'num_skipped': 0},
  ]
  new, exact = pipeline.convert_states(states, local_batch=2, new_count=1, new_local_batch=4)
  assert not exact and new[0]['parent'] == {'next_index': 8}  # the earliest whole batch: 2
  assert new[0]['num_seen'] == 11 and new[0]['num_skipped'] == 1
  with pytest.raises(sources.DataError, match='same host count'):
    pipeline.convert_states(
      [{'parent': {'workers': []}}], local_batch=2, new_count=1, new_local_batch=4
    )


def _next_global_batch(states, local_batch):
  """The global element indices the hosts at `states` read next (their blocks side by side)."""
  count = len(states)
  stream = range(10**6)
  return [
    pipeline._ProcessBlocks(stream, index=i, count=count, local_batch=local_batch)[
      state['parent']['next_index'] + k
    ]
    for i, state in enumerate(states)
    for k in range(local_batch)
  ]


@pytest.mark.unit
def test_a_changed_batch_size_moves_the_position_in_global_elements():
  # 2 hosts x 6 read one global batch (elements 0-11). Resumed with batch 8 on 2 hosts, the
  # positions were reused as they were: the next batch was 10, 11, 14, 15, ... (10 and 11 twice,
  # 12 and 13 never); with batch 8 on 1 host, 8-15 (8-11 twice).
  saved = [{'parent': {'next_index': 6}, 'num_seen': 6}] * 2
  for count, local, expected, whole in (
    (2, 3, list(range(12, 18)), True),  # 12 is a whole number of batches of 6: exact
    (1, 4, list(range(12, 16)), True),
    (2, 4, list(range(8, 16)), False),  # 12 is not a whole batch of 8: from 8, flagged
    (3, 2, list(range(12, 18)), True),
  ):
    new, exact = pipeline.convert_states(
      saved, local_batch=6, new_count=count, new_local_batch=local
    )
    assert exact is whole and _next_global_batch(new, local) == expected, (count, local)


@pytest.mark.unit
def test_a_resume_on_as_many_hosts_with_another_batch_size_converts(monkeypatch, caplog):
  from imagen_jax import train_lib

  class Iterator:
    def set_state(self, state):
      self.state = state

  config = ml_collections.ConfigDict({'train': {'batch_size': 6}})
  saved = {'process_count': 2, 'states': [{'parent': {'next_index': 6}}] * 2, 'batch_size': 12}
  monkeypatch.setattr(train_lib.jax, 'process_count', lambda: 2)
  monkeypatch.setattr(train_lib.jax, 'process_index', lambda: 1)
  it = Iterator()
  with caplog.at_level(logging.INFO):
    train_lib.restore_data_state(it, saved, config)
  assert it.state['parent'] == {'next_index': 6}  # host 1's block of global batch 2: 15-17
  assert _next_global_batch([{'parent': {'next_index': 6}}] * 2, 3) == list(range(12, 18))
  assert 'from 2 processes x batch 12 to 2 x batch 6 exactly' in caplog.text
  # The same batch (or a state saved before batch_size was recorded): positions as they are.
  for same in ({**saved, 'batch_size': 6}, {k: v for k, v in saved.items() if k != 'batch_size'}):
    train_lib.restore_data_state(it, {**same, 'states': [{'a': 0}, {'b': 1}]}, config)
    assert it.state == {'b': 1}


def _encode(image, fmt='PNG', **kwargs):
  buf = io.BytesIO()
  image.save(buf, format=fmt, **kwargs)
  return buf.getvalue()


def _bomb_png():
  def chunk(tag, data):
    return struct.pack('>I', len(data)) + tag + data + struct.pack('>I', zlib.crc32(tag + data))

  ihdr = struct.pack('>IIBBBBB', 100_000, 100_000, 8, 2, 0, 0, 0)
  header = b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr)
  return header + chunk(b'IDAT', zlib.compress(b'\0' * 64)) + chunk(b'IEND', b'')


def _messy_folder(root):
  """8 good images in many modes, 5 broken files and one tiny image; all captioned."""
  root.mkdir()
  rgba = np.zeros((10, 12, 4), np.uint8)
  rgba[..., 3] = 255
  palette = Image.new('P', (12, 10), 1)
  palette.putpalette([0, 0, 0] + [0, 0, 255] * 255)
  exif = Image.Exif()
  exif[0x0112] = 6
  noise = np.random.default_rng(0).integers(0, 255, (40, 40, 3), np.uint8)
  jpeg = _encode(Image.fromarray(noise), 'JPEG')
  files = {
    'rgba.png': _encode(Image.fromarray(rgba, 'RGBA')),
    'grey.png': _encode(Image.new('L', (12, 10), 90)),
    'sixteen.png': _encode(Image.fromarray(np.full((10, 12), 40000, np.uint16))),
    'palette.png': _encode(palette, transparency=0),
    'cmyk.jpg': _encode(Image.new('CMYK', (12, 10), (0, 255, 255, 0)), 'JPEG'),
    'rotated.jpg': _encode(Image.new('RGB', (16, 9), (5, 6, 7)), 'JPEG', exif=exif.tobytes()),
    'plain1.png': _encode(Image.new('RGB', (9, 9), (1, 2, 3))),
    'plain2.jpg': jpeg,
    'corrupt.png': b'\x89PNG\r\n\x1a\n' + b'\x13' * 100,
    'truncated.jpg': jpeg[: len(jpeg) // 2],
    'zero.png': b'',
    'text.png': b'this is a text file with an image extension\n',
    'bomb.png': _bomb_png(),
    'tiny.png': _encode(Image.new('RGB', (4, 4), (9, 9, 9))),
  }
  for name, data in files.items():
    (root / name).write_bytes(data)
    (root / name).with_suffix('.txt').write_text(f'caption of {name}')
  return root


_BROKEN = {'corrupt.png', 'truncated.jpg', 'zero.png', 'text.png', 'bomb.png'}


@pytest.mark.unit
@pytest.mark.parametrize('small_images', ['skip', 'upsample'])
def test_bad_files_are_skipped_named_and_counted(tmp_path, caplog, small_images):
  folder = _messy_folder(tmp_path / 'messy')
  config = _config(folder, max_skip_fraction=0.6, small_images=small_images)
  config.train.batch_size = 2
  with caplog.at_level(logging.INFO, logger='imagen_jax.data.pipeline'):
    it, _ = _iterator(config)
    # 'skip': tiny.png (4x4 < 8 px) is dropped from its header when listed, not as broken.
    epoch = 13 if small_images == 'skip' else 14
    while it.num_seen < 2 * epoch + 1:  # more than two epochs
      batch = next(it)
      assert batch['image'].shape == (2, 8, 8, 3)
      assert np.isfinite(batch['image']).all() and np.abs(batch['image']).max() <= 1.0
  named = set(re.findall(r'skipping (\S+):', caplog.text))
  assert named == _BROKEN
  if small_images == 'skip':
    assert 'kept 13 of 14 images; 1 smaller than 8 px skipped' in caplog.text
  epochs = it.num_seen // epoch
  assert len(_BROKEN) * epochs <= it.num_skipped <= len(_BROKEN) * (epochs + 1)
  assert it.num_small == 0
  state = it.get_state()
  assert (state['num_seen'], state['num_skipped']) == (it.num_seen, it.num_skipped)


@pytest.mark.unit
def test_skip_fraction_aborts_with_clear_error(tmp_path):
  config = _config(_messy_folder(tmp_path / 'messy'))  # 5 of 13 unusable > 1 % (+ 1 small)
  config.train.batch_size = 2
  it, _ = _iterator(config)
  with pytest.raises(DataError, match=r'max_skip_fraction=0.01 of the 13 examples in the epoch'):
    _take(it, 20)
  assert it.num_skipped == 1  # one bad file of 13 is more than 1 %: no need to read further


@pytest.mark.unit
def test_at_most_the_allowed_fraction_of_bad_files_never_stops_a_run_more_always_does(tmp_path):
  """The running fraction stopped a run whose shuffle put its few bad files first: 2 bad files
  of 202 (0.99 % <= 1 %) read among the first 199 gave 2 / 199 > 1 %, at almost every seed."""
  folder = tmp_path / 'data'
  folder.mkdir()
  for i in range(200):
    Image.new('RGB', (8, 8), (i, 0, 0)).save(folder / f'{i:03d}.png')
    (folder / f'{i:03d}.txt').write_text(f'red {i}')
  for name in ('bad1', 'bad2'):
    (folder / f'{name}.png').write_bytes(b'not a png')
    (folder / f'{name}.txt').write_text('a broken file')
  config = _config(folder)  # max_skip_fraction 1 %
  config.train.batch_size = 20
  for seed in range(3):
    config.seed = seed
    it, _ = _iterator(config)
    while it.num_seen < 2 * 202:  # two epochs
      next(it)
    assert 4 <= it.num_skipped <= 6  # both bad files in each epoch, maybe some of the third
  # Two processes (host batch 10): a host's first k elements come from the global stream's first
  # ceil(k / 10) rounds of 2 blocks of 10, so its bound counts the global epochs those reach. (At
  # the end of its own epoch a host checks its share's fraction, which can exceed the dataset's:
  # not tested here.)
  spec = _iterator(config, process_index=1, process_count=2)[0]._spec
  assert spec.examples_in_epochs_begun(1) == 202  # global elements 0-19: epoch 1
  assert spec.examples_in_epochs_begun(101) == 404  # 11 rounds: elements 0-219, into epoch 2
  (folder / 'bad3.png').write_bytes(b'not a png')  # 3 of 203: 1.5 %
  (folder / 'bad3.txt').write_text('a broken file')
  it, _ = _iterator(config)
  with pytest.raises(DataError, match=r'3 of the first \d+ examples read were unusable'):
    while True:
      next(it)
  assert it.num_seen <= 203 and it.num_skipped == 3  # within the first epoch


@pytest.mark.unit
def test_one_bad_file_in_a_larger_dataset_does_not_abort(tmp_path):
  folder = _solid_folder(tmp_path / 'solid', n=25)
  for i in range(25, 150):  # more solid images (ids repeat; only counts matter here)
    Image.new('RGB', (8, 8), (0, 0, i)).save(folder / f'{i:03d}.png')
    (folder / f'{i:03d}.txt').write_text(f'blue {i}')
  (folder / 'bad.png').write_bytes(b'broken')
  (folder / 'bad.txt').write_text('a broken file')
  config = _config(folder)  # max_skip_fraction 1 %: 1 of >= 100 seen is not above it
  config.train.batch_size = 16
  it, _ = _iterator(config)
  _take(it, 10)
  assert it.num_seen == 160 + it.num_skipped and it.num_skipped == 1


@pytest.mark.unit
def test_a_read_that_fails_in_the_source_is_a_named_skip(tmp_path, monkeypatch, caplog):
  # tfds and HF decode rows themselves: a corrupt row raised out of the reader, outside the
  # image skip handling, and ended the run with a bare traceback whatever max_skip_fraction.
  config = _config(_solid_folder(tmp_path / 'solid', n=12))
  config.data.max_skip_fraction = 0.2
  source = sources.build_source(config.data)
  read = type(source).__getitem__

  def failing_read(self, index):
    if index == 5:
      raise OSError('image file is truncated')
    return read(self, index)

  monkeypatch.setattr(type(source), '__getitem__', failing_read)
  cache = FakeEmbeddingCache(source.captions())
  it = pipeline.make_iterator(config, text_cache=cache, source=source)
  with caplog.at_level(logging.WARNING):
    ids = [i for batch in _take(it, 6) for i in _ids(batch)]
  assert it.num_skipped >= 1 and 5 not in ids and set(ids) == set(range(12)) - {5}
  assert '#5: cannot read it (OSError: image file is truncated)' in caplog.text
  # Configuration errors still raise.
  monkeypatch.setattr(
    type(source), '__getitem__', lambda self, i: (_ for _ in ()).throw(DataError('bad column'))
  )
  with pytest.raises(DataError, match='bad column'):
    _take(pipeline.make_iterator(config, text_cache=cache, source=source), 1)


@pytest.mark.unit
def test_caption_missing_from_cache_says_how_to_fix(tmp_path):
  config = _config(_solid_folder(tmp_path / 'solid'))
  source = sources.build_source(config.data)
  cache = FakeEmbeddingCache(['some other caption'])
  it = pipeline.make_iterator(config, text_cache=cache, source=source)
  with pytest.raises(DataError, match='python -m imagen_jax.precompute'):
    next(it)


@pytest.mark.unit
def test_sample_captions_distinct_in_order(tmp_path):
  folder = _solid_folder(tmp_path / 'solid', n=5)
  (folder / '001.txt').write_text('solid colour number 0')  # a duplicate caption
  captions = pipeline.sample_captions(_config(folder), 3)
  assert captions == ['solid colour number 0', 'solid colour number 2', 'solid colour number 3']


def _proc_status(pid: int) -> dict[str, str]:
  lines = pathlib.Path(f'/proc/{pid}/status').read_text().splitlines()
  return dict(line.split(':\t', 1) for line in lines if ':\t' in line)


def _child_processes(parent: int) -> list[int]:
  children = []
  for entry in pathlib.Path('/proc').iterdir():
    if entry.name.isdigit():
      try:
        if int(_proc_status(int(entry.name))['PPid']) == parent:
          children.append(int(entry.name))
      except (OSError, KeyError, ValueError):
        pass
  return children


_WORKERS_THEN_WAIT = """
import pathlib, sys, time
from tests.data_pipeline_test import _config, _iterator, _noise_folder

config = _config(_noise_folder(pathlib.Path(sys.argv[1])))
config.data.num_workers = 2
it, _ = _iterator(config)
next(it)
print('ready', flush=True)
time.sleep(600)
"""


@pytest.mark.smoke
def test_worker_processes_end_when_the_main_process_is_killed(tmp_path):
  # A kill -9 of train.py left its grain workers (~200 MB each) running for good, adopted by
  # init; every requeue of a preempted job added more.
  import subprocess
  import sys

  from tests.conftest import REPO_ROOT

  main = subprocess.Popen(
    [sys.executable, '-c', _WORKERS_THEN_WAIT, str(tmp_path / 'noise')],
    cwd=REPO_ROOT,
    env={**os.environ, 'PYTHONPATH': str(REPO_ROOT)},
    stdout=subprocess.PIPE,
    text=True,
  )
  try:
    assert main.stdout.readline().strip() == 'ready'
    workers = _child_processes(main.pid)
    assert len(workers) >= 2, workers
  finally:
    main.kill()
    main.wait(timeout=60)
  deadline = time.monotonic() + 30  # each polls its parent every PARENT_POLL_S
  alive = workers
  while alive and time.monotonic() < deadline:
    time.sleep(0.2)
    alive = [pid for pid in alive if _running(pid)]
  assert not alive, alive


def _running(pid: int) -> bool:
  try:
    return _proc_status(pid).get('State', '').split()[0] not in ('Z', 'X')  # not a zombie
  except (OSError, IndexError):
    return False


@pytest.mark.smoke
def test_worker_processes_give_the_same_batches_and_resume(tmp_path):
  folder = _noise_folder(tmp_path / 'noise')
  config = _config(folder, lowres_resolution=4, random_crop=True)
  in_process = _take(_iterator(config)[0], 4)
  config.data.num_workers = 2
  it, _ = _iterator(config)
  try:
    _assert_batches_equal(in_process[:2], _take(it, 2))
    state = json.loads(json.dumps(it.get_state()))
    # The workers ignore Ctrl-C (the terminal sends it to the whole process group), which the
    # main process handles: no traceback from each worker while it saves.
    workers = _child_processes(os.getpid())
    assert len(workers) >= 2, workers
    for pid in workers:
      ignored = int(_proc_status(pid)['SigIgn'], 16)
      assert ignored & (1 << (signal.SIGINT - 1)), (pid, hex(ignored))
  finally:
    it.close()
  restored, _ = _iterator(config)
  try:
    restored.set_state(state)
    _assert_batches_equal(in_process[2:], _take(restored, 2))
  finally:
    restored.close()
  # A resume may change data.num_workers: the position carries over between the readers.
  config.data.num_workers = 0
  threads, _ = _iterator(config)
  threads.set_state(state)  # 2 workers -> threads
  _assert_batches_equal(in_process[2:3], _take(threads, 1))
  state = json.loads(json.dumps(threads.get_state()))
  config.data.num_workers = 3
  three, _ = _iterator(config)
  try:
    three.set_state(state)  # threads -> 3 workers, mid-cycle (element 12 of 4-image batches)
    _assert_batches_equal(in_process[3:], _take(three, 1))
  finally:
    three.close()
  config.data.num_workers = 0
  with pytest.raises(sources.DataError, match='resume with the data.num_workers of the run that'):
    _iterator(config)[0].set_state({**state, 'parent': {'workers': []}})


@pytest.mark.unit
def test_reader_positions_of_threads_and_worker_processes():
  # grain's states as its readers wrote them: 3 workers after 4 elements (worker 0 read
  # elements 0 and 3, workers 1 and 2 one each; the next is worker 1's).
  three = {
    'next_index_in_cycle': 1,
    'next_index_in_datasets': 3,
    'iterators_in_use_indices': [0, 1, 2],
    'iterators_in_use_states': [{'next_index': 2}, {'next_index': 1}, {'next_index': 1}],
    'exhausted': [0, 0, 0],
    'future_states': {},
  }
  assert pipeline.reader_position(three) == 4
  assert pipeline.reader_position({'next_index': 7}) == 7
  assert pipeline._reader_state(4, {'next_index': 0}) == {'next_index': 4}
  assert pipeline._reader_state(4, {**three, 'next_index_in_cycle': 0}) == three
  for n in range(10):
    assert pipeline.reader_position(pipeline._reader_state(n, three)) == n
  # Not a state this knows: no position (set_state and convert_states then refuse).
  assert pipeline.reader_position({**three, 'next_index_in_cycle': 0}) is None
  assert pipeline.reader_position({**three, 'exhausted': [0, 1, 0]}) is None
  assert pipeline.reader_position({'workers': []}) is None
  moved, exact = pipeline.convert_states(
    [{'parent': three, 'num_seen': 4, 'num_skipped': 0}],
    local_batch=2,
    new_count=2,
    new_local_batch=1,
  )
  assert exact and [s['parent'] for s in moved] == [{'next_index': 2}] * 2


@pytest.mark.smoke
def test_with_the_real_embedding_cache(tmp_path):
  cache_lib = pytest.importorskip('imagen_jax.text.cache')
  encoder_lib = pytest.importorskip('imagen_jax.text.encoder')
  config = _config(_solid_folder(tmp_path / 'solid', n=8))
  source = sources.build_source(config.data)
  encoder = encoder_lib.load_text_encoder('t5-tiny-random', max_length=16, dtype='float32')
  cache = cache_lib.build_cache(
    str(tmp_path / 'emb'), source.captions(), encoder, dataset_fingerprint=source.fingerprint()
  )
  batch = next(pipeline.make_iterator(config, text_cache=cache, source=source))
  # Trimmed to the run's length: the longest cached caption rounded up to a bucket.
  longest = max(len(cache.get(c)) for c in source.captions())
  assert cache.longest_caption == longest
  length = pipeline.text_length_bucket(longest, 16)
  assert length == pipeline.run_text_length(cache) and longest <= length <= 16
  assert batch['text_embs'].shape == (4, length, cache.dim)
  assert batch['text_embs'].dtype == ml_dtypes.bfloat16
  captions = [f'solid colour number {i}' for i in _ids(batch)]
  text_embs, text_mask = cache.lookup(captions)  # [B, 16, D] float32, the full length
  # Exact: the float32 lookup is the same cached bfloat16 values widened (a lossless cast).
  np.testing.assert_array_equal(batch['text_embs'].astype(np.float32), text_embs[:, :length])
  np.testing.assert_array_equal(batch['text_mask'], text_mask[:, :length])
  assert not text_mask[:, length:].any() and not text_embs[:, length:].any()
  assert batch['text_mask'].any(axis=1).all()
