"""Test setup: 8 fake CPU devices (for mesh / partition-spec tests) before jax is imported."""

import os

# Not the developer's own settings of these (a CPU device count, a compilation cache): the tests
# and their subprocesses set their own.
for _name in list(os.environ):
  if _name.startswith(('IMAGEN_JAX_', 'JAX_NUM_CPU_DEVICES', 'JAX_COMPILATION_CACHE_DIR')):
    del os.environ[_name]
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
if os.environ['JAX_PLATFORMS'] != 'cpu':
  # On a GPU (JAX_PLATFORMS=cuda) float32 matmuls default to TF32 (~1e-3 relative), which the
  # float32 tolerances of this suite do not allow for: ask for full float32 there.
  os.environ.setdefault('JAX_DEFAULT_MATMUL_PRECISION', 'highest')
_flag = '--xla_force_host_platform_device_count=8'
if _flag not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + _flag).strip()

import itertools  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
  sys.path.insert(0, str(REPO_ROOT))

# One persistent XLA compilation cache for the tests that run train.py / sample.py /
# evaluate.py in a subprocess (the tiny configs compile the same programs in many tests and
# modules), shared by the xdist workers. With a size limit set, JAX reads and writes its entries
# under a file lock (jax._src.lru_cache); without one it writes them unlocked, and a peer could
# read a half-written entry.
XLA_CACHE_DIR = REPO_ROOT / '.pytest_cache' / 'xla'
XLA_CACHE_MAX_BYTES = 16 * 2**30


def cli_env(devices: int = 1) -> dict[str, str]:
  """Environment of a train.py / sample.py / evaluate.py subprocess: CPU, `devices` fake
  devices, the shared compilation cache (every program cached, however fast it compiled)."""
  env = dict(os.environ)
  env.update(
    JAX_PLATFORMS='cpu',
    XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
    JAX_COMPILATION_CACHE_DIR=str(XLA_CACHE_DIR),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0',
    JAX_COMPILATION_CACHE_MAX_SIZE=str(XLA_CACHE_MAX_BYTES),  # the file lock (see above)
    PYTHONFAULTHANDLER='1',  # a SIGABRT (a test's hang handling) prints every thread's stack
  )
  return env


def with_cpu_devices(env: dict[str, str], n: int) -> dict[str, str]:
  """`env` (a `cli_env`) for an entry point that configures its own CPU devices: no device
  count in XLA_FLAGS, IMAGEN_JAX_CPU_DEVICES=n (imagen_jax.cpu_devices)."""
  env = {k: v for k, v in env.items() if k != 'XLA_FLAGS'}
  return {**env, 'IMAGEN_JAX_CPU_DEVICES': str(n)}


def with_address_space_limit(cmd: list[str], gib: int) -> list[str]:
  """`cmd` ([python, script, args...]) run under an address-space limit of `gib` GiB (RLIMIT_AS,
  as `ulimit -v` sets it): XLA:CPU's allocations past it fail with RESOURCE_EXHAUSTED, as a
  GPU's do past its memory. A tiny train.py or sample.py run peaks at about 1.2 GB of it on two
  cores; the child is kept to two cores, since XLA sizes its thread pools by the cores it may use
  and each thread's stack counts against the limit (about 60 MB per core)."""
  code = (
    'import os, resource, runpy, sys\n'
    'os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:2])\n'
    f'resource.setrlimit(resource.RLIMIT_AS, ({gib} << 30, {gib} << 30))\n'
    'sys.argv = sys.argv[1:]\n'
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
  )
  return [cmd[0], '-c', code, *cmd[1:]]


def free_port() -> int:
  """A localhost TCP port free now (for a JAX coordinator); skips the test where none can be
  bound (a sandbox without networking)."""
  try:
    with socket.socket() as s:
      s.bind(('127.0.0.1', 0))
      return s.getsockname()[1]
  except OSError as e:
    pytest.skip(f'cannot open a localhost port for the coordinator: {e}')


_logged = itertools.count()


def start_logged(cmd: list[str], log_dir: pathlib.Path, **popen_kwargs) -> subprocess.Popen:
  """subprocess.Popen(cmd) with stdout and stderr written to files in log_dir (`logged_output`
  reads them), not to pipes: a pipe that the test does not read while it waits on something else
  stops the child at its next write once 64 KB wait there, and a peer waiting at a barrier for that
  child stops with it (a CI hang)."""
  log_dir.mkdir(parents=True, exist_ok=True)
  prefix = log_dir / f'proc{next(_logged)}'
  with open(f'{prefix}.out', 'w') as out, open(f'{prefix}.err', 'w') as err:
    proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, **popen_kwargs)
  proc.log_prefix = prefix
  return proc


def logged_output(proc: subprocess.Popen) -> tuple[str, str]:
  """(stdout, stderr) so far of a `start_logged` process."""
  return tuple(
    pathlib.Path(f'{proc.log_prefix}.{name}').read_text(errors='replace') for name in ('out', 'err')
  )


def finish(procs, timeout=900) -> list[tuple[int, str, str]]:
  """(returncode, stdout, stderr) of each `start_logged` process. If they are not all done by
  `timeout`, the ones still running get SIGABRT (PYTHONFAULTHANDLER, see `cli_env`, prints every
  thread's Python stack) and the test fails with each process's stderr tail: where each waited."""
  deadline = time.time() + timeout
  try:
    for p in procs:
      p.wait(timeout=max(1, deadline - time.time()))
  except subprocess.TimeoutExpired:
    for p in procs:
      if p.poll() is None:
        p.send_signal(signal.SIGABRT)
    for p in procs:
      try:
        p.wait(timeout=30)
      except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    tails = [
      f'--- process {i} (exit {p.returncode}):\n{logged_output(p)[1][-6000:]}'
      for i, p in enumerate(procs)
    ]
    pytest.fail(f'the processes did not finish in {timeout} s:\n' + '\n'.join(tails))
  return [(p.returncode, *logged_output(p)) for p in procs]


def data_config(**overrides):
  """The `data` section of a config for the data-pipeline tests: a small folder dataset read
  synchronously (no worker processes, no read-ahead), with `overrides` applied."""
  import ml_collections

  c = ml_collections.ConfigDict(
    dict(
      source='folder',
      path='',
      index_dir='',
      split='train',
      image_column='image',
      caption_column='text',
      render_cache_dir='',
      resolution=8,
      lowres_resolution=0,
      random_crop=False,
      small_images='skip',
      crop_size=0,
      max_skip_fraction=0.01,
      max_examples=0,
      num_workers=0,
      prefetch=0,
    )
  )
  c.update(overrides)
  return c


def pipeline_config(path, *, batch_size: int, **data_overrides):
  """A config with what `pipeline.make_iterator` reads: seed 0, `data_config(path=path,
  **data_overrides)` and train.batch_size."""
  import ml_collections

  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = data_config(path=str(path), **data_overrides)
  c.train = ml_collections.ConfigDict(dict(batch_size=batch_size))
  return c


class FakeEmbeddingCache:
  """get / max_length / dim of an EmbeddingCache (no longest_caption: batches get the full
  max_length), deterministic per caption: words + 1 tokens (at most max_length)."""

  def __init__(self, max_length: int = 6, dim: int = 4):
    self.max_length, self.dim = max_length, dim

  def get(self, caption):
    import zlib

    import numpy as np

    n = min(len(caption.split()) + 1, self.max_length)
    rng = np.random.default_rng(zlib.crc32(caption.encode()))
    return rng.normal(size=(n, self.dim)).astype(np.float32)


def pytest_runtest_setup(item):
  """`make test` runs `--dist loadgroup` so that each `xdist_group` (a module whose fixture
  trains a run, or tests that must not overlap) runs on one worker and builds its fixture once.
  pytest-xdist does that by appending '@group' to the node id, which pytest 9.2 no longer lets
  it do: every group was then split over the workers and its fixtures built on each, silently.
  Fail such a test with the reason instead (a worker's collection error would not be shown)."""
  if getattr(item.config.option, 'loadgroup', False):  # an xdist worker under loadgroup
    if item.get_closest_marker('xdist_group') and '@' not in item.nodeid:
      pytest.fail(
        f'pytest {pytest.__version__} with this pytest-xdist ignores xdist_group marks: install '
        'the locked versions (make install), or a pytest that requirements-test.txt allows',
        pytrace=False,
      )


def one_move_entropy_bits(n: int) -> float:
  """The most that moving one of n predictions from a class of a to one of b changes the class
  entropy: H = log2(n) - sum(c log2 c) / n, so only those two terms change."""

  def clog(c):
    return c * math.log2(c) if c > 0 else 0.0

  return max(
    abs(clog(a - 1) - clog(a) + clog(b + 1) - clog(b)) / n
    for a in range(1, n + 1)
    for b in range(0, n - a + 1)
  )
