"""Distributed precompute with two real JAX processes on CPU (gloo collectives, a localhost
coordinator, 2 fake devices each): the cache is byte-identical to a one-process build, and a
build killed mid-way (both processes) resumes, here on one process, to the same bytes.

Marked `multiprocess` (it opens localhost ports); skipped when a local port cannot be bound.
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from imagen_jax.text import cache as cache_lib
from tests.conftest import REPO_ROOT, finish, free_port, logged_output, start_logged

CAPTIONS = [f'a photo of thing number {i}' + ' and more' * (i % 3) for i in range(22)]
SHARD_SIZE = 4  # 22 captions -> 6 shards (the last one short)
TIMEOUT_S = 240

# argv: port num_processes process_id images cache_dir seconds_per_shard [verify]
_CHILD = textwrap.dedent(
  """
  import json, sys, time
  import jax

  port, count, index = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
  if count > 1:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(
        coordinator_address=f'127.0.0.1:{port}', num_processes=count, process_id=index,
        initialization_timeout=60)
  import ml_collections
  from imagen_jax import precompute
  from imagen_jax.text import cache

  delay = float(sys.argv[6])
  if delay:  # slow each shard down so that the parent can kill the build mid-way
    encode = cache._encode_shard
    cache._encode_shard = lambda *a: (time.sleep(delay), encode(*a))[1]
  c = ml_collections.ConfigDict()
  c.text = ml_collections.ConfigDict(dict(
      encoder='t5-tiny-random', max_length=16, cache_dir=sys.argv[5],
      precompute_batch_size=4, cache_shard_size=SHARD_SIZE, auto_precompute=True))
  c.data = ml_collections.ConfigDict(dict(
      source='folder', path=sys.argv[4], split='train', image_column='image',
      caption_column='text', max_skip_fraction=0.0, max_examples=0))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  if sys.argv[7:] == ['verify']:
    built = precompute.precompute(c, verify=True)
  else:
    built = precompute.open_or_build_cache(c, build_if_missing=True)
  print('REPORT', json.dumps({'path': str(built.path), 'report': built.build_report}), flush=True)
  """
).replace('SHARD_SIZE', str(SHARD_SIZE))


@pytest.fixture(scope='module')
def images(tmp_path_factory):
  from PIL import Image

  path = tmp_path_factory.mktemp('images')
  for i, caption in enumerate(CAPTIONS):
    Image.new('RGB', (8, 8), (i * 10, 0, 0)).save(path / f'img{i:02d}.png')
    (path / f'img{i:02d}.txt').write_text(caption, encoding='utf-8')
  return path


def _start(
  count: int, images: pathlib.Path, cache_dir: pathlib.Path, delay: float = 0.0, *extra: str
):
  env = dict(
    os.environ,
    JAX_PLATFORMS='cpu',
    XLA_FLAGS='--xla_force_host_platform_device_count=2',
    PYTHONFAULTHANDLER='1',  # finish()'s SIGABRT on a hang prints every thread's stack
  )
  port = free_port()
  return [
    start_logged(  # to files: an undrained pipe could stop one process and the other with it
      [sys.executable, '-c', _CHILD, str(port), str(count), str(i), str(images)]
      + [str(cache_dir), str(delay), *extra],
      cache_dir.parent / 'logs',
      cwd=REPO_ROOT,
      env=env,
    )
    for i in range(count)
  ]


def _kill(procs) -> None:
  for p in procs:
    if p.poll() is None:
      p.kill()
  for p in procs:
    p.wait(timeout=30)


def _finish(procs) -> list[dict]:
  """Waits for every process (see conftest.finish); their REPORT lines."""
  reports = []
  for rc, out, err in finish(procs, timeout=TIMEOUT_S):
    assert rc == 0, err[-3000:]
    line = next(line for line in out.splitlines() if line.startswith('REPORT '))
    reports.append(json.loads(line[len('REPORT ') :]))
  return reports


def _files(path: pathlib.Path) -> dict[str, bytes]:
  return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.fixture(scope='module')
def one_process_cache(images, tmp_path_factory):
  """The reference: one process, the children's 2-device encoder mesh and batch size."""
  import jax
  import numpy as np

  from imagen_jax.data import sources
  from imagen_jax.text import encoder as encoder_lib

  source = sources.FolderSource(images)
  auto = jax.sharding.AxisType.Auto
  mesh = jax.sharding.Mesh(
    np.asarray(jax.devices()[:2]).reshape(2, 1), ('data', 'fsdp'), axis_types=(auto, auto)
  )
  encoder = encoder_lib.load_text_encoder('t5-tiny-random', max_length=16, mesh=mesh)
  cache = cache_lib.build_cache(
    str(tmp_path_factory.mktemp('cache1')),
    source.captions(),
    encoder,
    dataset_fingerprint=source.fingerprint(),
    shard_size=SHARD_SIZE,
    batch_size=4,
    progress=False,
  )
  return cache.path


@pytest.mark.multiprocess
def test_two_processes_build_the_same_bytes(images, one_process_cache, tmp_path):
  reports = _finish(_start(2, images, tmp_path / 'cache'))
  path = pathlib.Path(reports[0]['path'])
  assert reports[1]['path'] == str(path)
  report = reports[0]['report']
  assert report['processes'] == 2 and report['devices'] == 4
  assert report['captions'] == len(CAPTIONS) and report['captions_per_s_per_device'] > 0
  assert all(r > 0 for r in report['per_process'])  # both processes encoded shards

  want = _files(one_process_cache)
  assert sorted(want) == sorted(_files(path))  # no markers or temporary files left
  assert len([n for n in want if n.startswith('shard-')]) == 4 * 6  # embs, offsets, hashes, crc32
  for name, data in _files(path).items():
    assert data == want[name], name  # shard files and manifest, byte for byte


@pytest.mark.multiprocess
def test_two_processes_verify_their_shares_and_reencode_the_damaged_ones(
  images, one_process_cache, tmp_path
):
  # precompute --verify --distributed: each process reads every other shard whole; the damaged
  # ones (one in each share) are dropped by process 0 and encoded again, to the same bytes.
  cache_dir = tmp_path / 'cache'
  shutil.copytree(one_process_cache, cache_dir / one_process_cache.name)
  path = cache_dir / one_process_cache.name
  for name in ('shard-00001.embs.npy', 'shard-00004.offsets.npy'):
    raw = bytearray((path / name).read_bytes())
    raw[-1] ^= 0x01  # data, not the .npy header
    (path / name).write_bytes(bytes(raw))
  procs = _start(2, images, cache_dir, 0.0, 'verify')
  reports = _finish(procs)
  assert reports[0]['report']['captions'] == 2 * SHARD_SIZE  # shards 1 and 4 only
  assert '2 of 6 shards are damaged' in logged_output(procs[0])[1]
  want = _files(one_process_cache)
  assert _files(path) == want  # shard files and manifest, byte for byte
  again = _start(2, images, cache_dir, 0.0, 'verify')
  assert _finish(again)[0]['report'] is None  # all intact: nothing encoded
  assert 'all 6 shards are intact' in logged_output(again[0])[1]


@pytest.mark.multiprocess
def test_killed_two_process_build_resumes(images, one_process_cache, tmp_path):
  cache_dir = tmp_path / 'cache'
  key = one_process_cache.name
  procs = _start(2, images, cache_dir, delay=1.0)
  deadline, markers = time.time() + TIMEOUT_S, []
  try:
    while time.time() < deadline and not markers:
      assert all(p.poll() is None for p in procs), [logged_output(p)[1][-2000:] for p in procs]
      markers = sorted((cache_dir / key).glob('shard-*' + cache_lib.DONE_SUFFIX))
      time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)  # one host dies mid-build ...
    time.sleep(0.5)
  finally:
    _kill(procs)  # ... and the job is torn down
  assert markers, 'no shard finished before the timeout'
  markers = sorted((cache_dir / key).glob('shard-*' + cache_lib.DONE_SUFFIX))
  manifest = json.loads((cache_dir / key / cache_lib.MANIFEST).read_text())
  assert not manifest['complete'] and 1 <= len(markers) < 6
  done = json.loads(markers[0].read_text())['shard']['files']['embs']
  before = (cache_dir / key / done).stat()

  (report,) = _finish(_start(1, images, cache_dir))  # resumed by one process
  assert report['report']['captions'] < len(CAPTIONS)  # only the missing shards were encoded
  after = (cache_dir / key / done).stat()
  assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
  want = _files(one_process_cache)
  got = _files(cache_dir / key)
  assert sorted(got) == sorted(want)
  for name, data in got.items():
    assert data == want[name], name


# The command line, each shard slowed down (argv: seconds per shard, then precompute's flags).
_CLI = textwrap.dedent(
  """
  import sys, time
  from imagen_jax import precompute
  from imagen_jax.text import cache

  delay = float(sys.argv.pop(1))
  encode = cache._encode_shard
  cache._encode_shard = lambda *a: (time.sleep(delay), encode(*a))[1]
  precompute._run_cli()
  """
)


@pytest.mark.multiprocess
def test_sigterm_to_one_host_stops_a_distributed_build_and_it_resumes(images, tmp_path):
  # After jax.distributed.initialize, JAX's preemption notifier caught SIGTERM and nothing read
  # it: `python -m imagen_jax.precompute --distributed` went on encoding until SIGKILL. Now the
  # signalled host stops with exit 75 and its line, and its peer stops with it.
  cache_dir = tmp_path / 'cache'
  port = free_port()
  flags = [
    '--config=configs/base64.py:tiny',
    '--config.data.source=folder',
    f'--config.data.path={images}',
    '--config.text.encoder=t5-tiny-random',
    f'--config.text.cache_dir={cache_dir}',
    f'--config.text.cache_shard_size={SHARD_SIZE}',
    '--config.text.precompute_batch_size=4',
    '--distributed',
    f'--coordinator_address=127.0.0.1:{port}',
    '--num_processes=2',
  ]
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONFAULTHANDLER='1')
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
  procs = [
    start_logged(
      [sys.executable, '-c', _CLI, '2.0', *flags, f'--process_id={i}'],
      tmp_path / 'logs',
      cwd=REPO_ROOT,
      env=env,
    )
    for i in range(2)
  ]
  deadline = time.time() + TIMEOUT_S
  try:
    while not list(cache_dir.glob('*/shard-*')):  # encoding has begun
      assert time.time() < deadline and all(p.poll() is None for p in procs), [
        logged_output(p)[1][-2000:] for p in procs
      ]
      time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)
  except BaseException:
    _kill(procs)
    raise
  results = finish(procs, timeout=60)
  for rc, _, err in results:
    assert rc == 75 and 'Aborted' not in err, err[-3000:]
  assert 'stopped (SIGTERM); the shards encoded so far are kept' in results[1][2]
  assert 'Process 1 of 2 failed, so this one stops too: stopped (SIGTERM)' in results[0][2]
  (key,) = [p for p in cache_dir.iterdir() if p.is_dir()]
  assert not json.loads((key / cache_lib.MANIFEST).read_text())['complete']
  # The same command again (here on one process) finishes it.
  one = [f for f in flags if not f.startswith(('--distributed', '--coordinator', '--num_pro'))]
  proc = subprocess.run(
    [sys.executable, '-c', _CLI, '0', *one], cwd=REPO_ROOT, env=env, capture_output=True, text=True
  )
  assert proc.returncode == 0 and proc.stdout.strip() == str(key), proc.stderr[-3000:]
  assert json.loads((key / cache_lib.MANIFEST).read_text())['complete']
