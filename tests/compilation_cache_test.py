"""The product's persistent compilation cache (imagen_jax.cli): size-limited, LRU-evicted, and
usable on a folder written before it had a limit; every program cached; on in train.py, sample.py
and evaluate.py."""

import os
import pathlib
import subprocess
import sys
import time

import pytest

from imagen_jax import cli
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.unit

# What train.py / sample.py do at start (define the flag, parse it, enable the cache), then one
# small compile (cached: the product caches every program, however fast it compiled).
SCRIPT = """
import sys
from absl import flags
from imagen_jax import cli
cli.define_compilation_cache_flag()
flags.FLAGS(['prog', f'--compilation_cache={sys.argv[1]}'])
cli.enable_compilation_cache()
import jax, jax.numpy as jnp
from imagen_jax import compile_events
print('max_size', jax.config.jax_compilation_cache_max_size)
print('min_compile_time', jax.config.jax_persistent_cache_min_compile_time_secs)
x = jax.block_until_ready(jnp.ones(7))
with compile_events.counting() as made:
  jax.block_until_ready(jax.jit(lambda x: jnp.sin(x) * 2 + 1)(x))
print('made:', made.summary())
"""


def _env(**extra) -> dict[str, str]:
  """This environment without the test suite's cache settings (conftest.cli_env), CPU."""
  base = {
    k: v for k, v in os.environ.items() if not k.startswith(('JAX_COMPILATION', 'JAX_PERSISTENT'))
  }
  return {**base, 'JAX_PLATFORMS': 'cpu', **extra}


def _run(cache: pathlib.Path, **env) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, '-c', SCRIPT, str(cache)],
    cwd=REPO_ROOT,
    env=_env(**env),
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_a_cache_written_without_a_limit_is_adopted_and_evicted_oldest_first(tmp_path):
  cache = tmp_path / 'xla'
  cache.mkdir()
  # Two entries as an unlimited cache leaves them: no access-time files.
  old, newer = cache / 'jit_old-0123-cache', cache / 'jit_newer-4567-cache'
  old.write_bytes(b'\0' * 700_000)
  newer.write_bytes(b'\0' * 299_500)
  now = time.time()
  os.utime(old, (now - 7200, now - 7200))
  os.utime(newer, (now - 3600, now - 3600))

  # A limit that no new entry (about 2 KB each) fits under without evicting the older one.
  proc = _run(cache, JAX_COMPILATION_CACHE_MAX_SIZE='1000000')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'max_size 1000000' in proc.stdout
  assert 'Error' not in proc.stderr, proc.stderr[-3000:]  # JAX warns when a write fails
  assert not old.exists() and newer.exists()  # least recently used first
  written = [p for p in cache.glob('*-cache') if p != newer]
  assert written, 'the new program was not cached'
  for entry in [newer, *written]:
    assert entry.with_name(entry.name.replace('-cache', '-atime')).exists()


def test_the_default_limit_applies_and_an_env_limit_wins(tmp_path):
  proc = _run(tmp_path / 'a')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f'max_size {cli.COMPILATION_CACHE_MAX_BYTES}' in proc.stdout
  assert list((tmp_path / 'a').glob('*-atime'))  # eviction on: access times are kept
  proc = _run(tmp_path / 'b', JAX_COMPILATION_CACHE_MAX_SIZE='-1')
  assert proc.returncode == 0 and 'max_size -1' in proc.stdout
  assert list((tmp_path / 'b').glob('*-cache')) and not list((tmp_path / 'b').glob('*-atime'))


def test_fast_programs_are_cached_unless_the_env_sets_a_minimum(tmp_path):
  # The program compiles in milliseconds: JAX's default (1 s minimum) would not write it.
  proc = _run(tmp_path / 'a')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'min_compile_time 0.0' in proc.stdout
  assert list((tmp_path / 'a').glob('jit_*-cache'))
  assert 'made: compiled' in proc.stdout
  # A second start finds it (what train.py and sample.py log: imagen_jax.compile_events).
  proc = _run(tmp_path / 'a')
  assert 'made: loaded from the persistent compilation cache' in proc.stdout, proc.stdout
  proc = _run(tmp_path / 'b', JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='30')
  assert proc.returncode == 0 and 'min_compile_time 30.0' in proc.stdout
  assert not list((tmp_path / 'b').glob('jit_*-cache'))
  assert 'made: compiled' in proc.stdout


def test_adopting_gives_each_entry_its_modification_time(tmp_path):
  entry = tmp_path / 'jit_f-89ab-cache'
  entry.write_bytes(b'x')
  os.utime(entry, ns=(1_000_000_000, 1_234_567_890_123))
  kept = tmp_path / 'jit_g-cdef-cache'
  kept.write_bytes(b'y')
  (tmp_path / 'jit_g-cdef-atime').write_bytes((42).to_bytes(8, 'little'))
  assert cli.adopt_unlimited_cache_entries(tmp_path) == 1
  atime = (tmp_path / 'jit_f-89ab-atime').read_bytes()
  assert int.from_bytes(atime, 'little') == 1_234_567_890_123
  assert int.from_bytes((tmp_path / 'jit_g-cdef-atime').read_bytes(), 'little') == 42
  assert cli.adopt_unlimited_cache_entries(tmp_path) == 0
  assert not list(tmp_path.glob('.*.tmp'))


CONFIG = REPO_ROOT / 'configs' / 'base64.py'


@pytest.mark.parametrize(
  'entry, args',
  [
    ('train.py', [f'--config={CONFIG}:tiny', '--config.train.batch_size=0', '--workdir=RUN']),
    ('sample.py', ['--prompt=x', '--checkpoints=MISSING', '--out=OUT']),
    ('evaluate.py', ['--checkpoints=MISSING']),
  ],
)
def test_every_entry_point_takes_the_flag(tmp_path, entry, args):
  # Each turns the cache on at start (making its folder), then refuses the bad input.
  cache = tmp_path / 'xla'
  proc = subprocess.run(
    [sys.executable, str(REPO_ROOT / entry), *args, f'--compilation_cache={cache}'],
    cwd=tmp_path,  # RUN, OUT and MISSING are in there
    env=_env(PYTHONPATH=str(REPO_ROOT)),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode != 0 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  assert 'error' in proc.stderr.lower() and 'compilation_cache' not in proc.stderr
  assert cache.is_dir(), proc.stderr[-3000:]
