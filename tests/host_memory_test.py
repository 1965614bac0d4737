"""host_memory.keep_freed_buffers: XLA:CPU's large per-call buffers reuse their pages."""

import json
import subprocess
import sys
import textwrap

import pytest

from imagen_jax import host_memory
from tests.conftest import REPO_ROOT

# A jitted program with a 128 MB intermediate (exp(x), read by two dots, so it is its own XLA:CPU
# temporary buffer); prints the minor page faults of 30 calls after three warm-up calls.
_PROBE = textwrap.dedent(
  """
  import json, resource, sys
  from imagen_jax import host_memory
  status = host_memory.keep_freed_buffers()
  import jax, jax.numpy as jnp

  @jax.jit
  def f(x, w):
    t = jnp.exp(x).reshape(-1, 1024)
    return jnp.sum(jnp.dot(t, w) ** 2) + jnp.sum(jnp.dot(t.T, t[:, :8]))

  x = jnp.ones((32, 1024, 1024), jnp.float32) * 0.01
  w = jnp.ones((1024, 8), jnp.float32)
  assert f.lower(x, w).compile().memory_analysis().temp_size_in_bytes >= 2**27
  for _ in range(3):  # the heap settles: a call that starts before the last one freed its block
    f(x, w).block_until_ready()
  faults = []
  for _ in range(30):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x, w).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
  print(json.dumps({'status': status, 'faults': faults}))
  """
)


def _probe(**env) -> dict:
  proc = subprocess.run(
    [sys.executable, '-c', _PROBE],
    cwd=REPO_ROOT,
    env={'JAX_PLATFORMS': 'cpu', 'PATH': '/usr/bin:/bin', **env},
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(
  not sys.platform.startswith('linux') or not host_memory._is_glibc(),
  reason='what it changes is glibc malloc on Linux',
)
def test_large_buffers_keep_their_pages_between_calls():
  default = _probe(IMAGEN_JAX_HOST_MALLOC='default')
  kept = _probe()
  assert default['status'] == 'off: IMAGEN_JAX_HOST_MALLOC=default'
  assert kept['status'] == 'on'
  # glibc's default maps the 128 MB buffer afresh on every call: at least 64 faults even with
  # 2 MB transparent huge pages, 32,768 with 4 KB pages.
  assert min(default['faults']) >= 64, default
  # Kept: most calls reuse the pages of an earlier one. Some get a fresh block while the heap
  # settles (small allocations split a freed block, or a call starts before the last one's
  # block is freed): 0-5 of 60 calls on the development machine.
  fresh = [n for n in kept['faults'] if n * 20 >= min(default['faults'])]
  assert len(fresh) <= 10, (kept, default)


def test_left_alone_where_it_does_not_apply(monkeypatch):
  monkeypatch.setattr(host_memory, 'backend_started', lambda: False)
  monkeypatch.setattr(host_memory, '_accelerator_installed', lambda: None)
  assert host_memory.why_not({'IMAGEN_JAX_HOST_MALLOC': 'default'}) == (
    'IMAGEN_JAX_HOST_MALLOC=default'
  )
  assert host_memory.why_not({'JAX_PLATFORMS': 'cuda'}) == 'JAX_PLATFORMS=cuda'
  assert host_memory.why_not({'JAX_PLATFORMS': 'tpu,cpu'}) == 'JAX_PLATFORMS=tpu,cpu'
  if sys.platform.startswith('linux'):
    assert host_memory.why_not({'JAX_PLATFORMS': 'cpu'}) in (None, 'the C library is not glibc')
    assert host_memory.why_not({}) in (None, 'the C library is not glibc')
  # An installed GPU/TPU plugin with no JAX_PLATFORMS: JAX may pick the accelerator.
  monkeypatch.setattr(host_memory, '_accelerator_installed', lambda: 'jax_cuda12_plugin')
  assert 'jax_cuda12_plugin' in host_memory.why_not({})
  assert host_memory.why_not({'JAX_PLATFORMS': 'cpu'}) in (None, 'the C library is not glibc')
  # Too late once the backend has started: its threads already have their own arenas.
  monkeypatch.setattr(host_memory, 'backend_started', lambda: True)
  assert 'already started' in host_memory.why_not({'JAX_PLATFORMS': 'cpu'})


def test_a_jax_plugins_namespace_package_counts_as_an_accelerator(tmp_path, monkeypatch):
  (tmp_path / 'jax_plugins' / 'xla_fake_gpu').mkdir(parents=True)
  (tmp_path / 'jax_plugins' / 'xla_fake_gpu' / '__init__.py').write_text('')
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.setattr(host_memory, '_ACCELERATOR_MODULES', ())  # whatever this machine has
  assert host_memory._accelerator_installed() == 'jax_plugins.xla_fake_gpu'
  monkeypatch.setattr(host_memory, 'backend_started', lambda: False)
  assert 'jax_plugins.xla_fake_gpu' in host_memory.why_not({})


def test_a_bad_setting_is_refused_with_the_fix(monkeypatch):
  monkeypatch.setattr(host_memory, 'backend_started', lambda: False)
  assert host_memory.why_not({'IMAGEN_JAX_HOST_MALLOC': 'keep', 'JAX_PLATFORMS': 'cpu'}) in (
    None,
    'the C library is not glibc',
  )
  with pytest.raises(ValueError, match=r"IMAGEN_JAX_HOST_MALLOC='off' is not a setting.*=default"):
    host_memory.why_not({'IMAGEN_JAX_HOST_MALLOC': 'off'})
  # An entry point: one line on stderr, exit code 2, before any work.
  proc = subprocess.run(
    [sys.executable, 'train.py', '--config=configs/base64.py:tiny', '--workdir=unused'],
    cwd=REPO_ROOT,
    env={'JAX_PLATFORMS': 'cpu', 'PATH': '/usr/bin:/bin', 'IMAGEN_JAX_HOST_MALLOC': 'off'},
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [ln for ln in proc.stderr.splitlines() if ln.startswith('error:')]
  assert len(errors) == 1 and "IMAGEN_JAX_HOST_MALLOC='off' is not a setting" in errors[0]
  assert not (REPO_ROOT / 'unused').exists()
