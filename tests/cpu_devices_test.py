"""cpu_devices: training on a CPU of two or more cores runs as two data-parallel JAX devices."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from imagen_jax import cpu_devices, host_memory
from tests.conftest import REPO_ROOT, cli_env

MESH = {'data': -1, 'fsdp': 1}
CPU = {'JAX_PLATFORMS': 'cpu'}


@pytest.fixture(autouse=True)
def _backend_not_started(monkeypatch):
  # This test process's backend has started (8 fake devices); `choose` is checked as it runs
  # at an entry point's start.
  monkeypatch.setattr(host_memory, 'backend_started', lambda: False)


def test_two_devices_where_the_cpu_and_the_config_take_them():
  assert cpu_devices.choose(4, MESH, environ=CPU, cores=2)[0] == 2
  assert (
    cpu_devices.choose(16, MESH, environ={**CPU, 'IMAGEN_JAX_CPU_DEVICES': 'auto'}, cores=64)[0]
    == 2
  )
  assert cpu_devices.choose(8, {'data': 1, 'fsdp': -1}, environ=CPU, cores=2)[0] == 2
  assert cpu_devices.choose(8, {'data': 2, 'fsdp': 1}, environ=CPU, cores=2)[0] == 2


def test_sampling_takes_two_devices_for_an_even_first_batch():
  # sample.py passes mesh=None and its first batch; a batch the devices do not split is sampled
  # on one of them, so an explicit count is taken whatever the batch.
  assert cpu_devices.choose(8, None, environ=CPU, cores=2)[0] == 2
  n, reason = cpu_devices.choose(1, None, environ=CPU, cores=2)
  assert n is None and 'a first batch of 1 images does not split over 2 devices' in reason
  assert cpu_devices.choose(1, None, environ={**CPU, 'IMAGEN_JAX_CPU_DEVICES': '2'})[0] == 2
  n, reason = cpu_devices.choose(8, None, distributed=True, environ=CPU, cores=2)
  assert n is None and '--distributed' in reason


@pytest.mark.parametrize(
  'batch, mesh, environ, cores, why',
  [
    (3, MESH, CPU, 2, 'train.batch_size=3 is not divisible by 2'),
    (8, {'data': 1, 'fsdp': 1}, CPU, 8, 'does not fill 2 devices'),
    (4, MESH, CPU, 1, '1 usable core'),
    (4, MESH, {'JAX_PLATFORMS': 'cuda'}, 8, 'JAX_PLATFORMS=cuda'),
    (4, MESH, {**CPU, 'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}, 8, 'XLA_FLAGS'),
    (4, MESH, {**CPU, 'JAX_NUM_CPU_DEVICES': '1'}, 8, 'JAX_NUM_CPU_DEVICES'),
  ],
)
def test_left_at_one_device_otherwise(batch, mesh, environ, cores, why):
  n, reason = cpu_devices.choose(batch, mesh, environ=environ, cores=cores)
  assert n is None and why in reason, reason


@pytest.mark.parametrize(
  'batch, mesh, cores, why',
  [
    (8, {'data': 4, 'fsdp': 1}, 8, 'the mesh data=4 x fsdp=1 does not fill 2 devices'),
    (3, {'data': 2, 'fsdp': 1}, 8, 'train.batch_size=3 is not divisible by 2'),
    (4, {'data': -1, 'fsdp': 2}, 1, '1 usable core(s)'),
  ],
)
def test_a_mesh_one_device_cannot_hold_says_why_one(batch, mesh, cores, why):
  # Left at one device, such a mesh failed later with 'does not divide the 1 available devices',
  # on a CPU of 8 cores, without saying why one.
  with pytest.raises(ValueError) as e:
    cpu_devices.choose(batch, mesh, environ=CPU, cores=cores)
  assert f'but the CPU backend is left at one ({why})' in str(e.value)
  assert '--config.mesh.data=-1 --config.mesh.fsdp=1' in str(e.value)


def test_left_alone_for_several_processes_an_accelerator_plugin_or_a_started_backend(monkeypatch):
  n, reason = cpu_devices.choose(4, MESH, distributed=True, environ=CPU, cores=2)
  assert n is None and '--distributed' in reason
  monkeypatch.setattr(host_memory, '_accelerator_installed', lambda: 'jax_cuda12_plugin')
  n, reason = cpu_devices.choose(4, MESH, environ={}, cores=2)
  assert n is None and 'jax_cuda12_plugin' in reason
  monkeypatch.setattr(host_memory, 'backend_started', lambda: True)
  n, reason = cpu_devices.choose(4, MESH, environ=CPU, cores=2)
  assert n is None and 'already started' in reason


def test_two_devices_only_where_two_copies_fit_in_half_the_memory():
  gb = 10**9
  calls = []

  def copy_bytes(n):
    return lambda: calls.append(n) or n

  fits = cpu_devices.choose(
    4, MESH, environ=CPU, cores=2, copy_bytes=copy_bytes(3 * gb), available=12 * gb
  )
  assert fits[0] == 2, fits
  n, reason = cpu_devices.choose(
    4, None, environ=CPU, cores=2, copy_bytes=copy_bytes(6_438_885_388), available=24 * gb
  )
  assert n is None, reason
  assert reason == (
    'memory: 2 copies of the 6.4 GB that each data-parallel replica holds would take more than '
    '50% of the 24.0 GB of memory available'
  )
  # Unknown bytes or memory: the other conditions decide.
  unknown = cpu_devices.choose(4, MESH, environ=CPU, cores=2, copy_bytes=lambda: None, available=gb)
  assert unknown[0] == 2
  assert calls == [3 * gb, 6_438_885_388]
  # The estimate runs only when everything else allows two devices; an explicit count is taken.
  odd = cpu_devices.choose(3, MESH, environ=CPU, cores=2, copy_bytes=copy_bytes(gb), available=1)
  assert odd[0] is None
  assert calls == [3 * gb, 6_438_885_388]
  # The state split over the two devices (fsdp), not copied: no second copy to check.
  for mesh in ({'data': 1, 'fsdp': -1}, {'data': -1, 'fsdp': 2}):
    split = cpu_devices.choose(
      8, mesh, environ=CPU, cores=2, copy_bytes=copy_bytes(gb), available=1
    )
    assert split[0] == 2, split
  assert calls == [3 * gb, 6_438_885_388]
  # An explicit count is taken; the reason (logged as a warning) says that it does not fit.
  env = {**CPU, 'IMAGEN_JAX_CPU_DEVICES': '2'}
  n, reason = cpu_devices.choose(4, MESH, environ=env, copy_bytes=copy_bytes(gb), available=gb)
  assert n == 2
  assert reason == (
    'IMAGEN_JAX_CPU_DEVICES=2; memory: 2 copies of the 1.0 GB that each data-parallel replica '
    'holds would take more than 50% of the 1.0 GB of memory available'
  )
  # Four devices with fsdp=2: two replicas, each split over two devices.
  env = {**CPU, 'IMAGEN_JAX_CPU_DEVICES': '4'}
  mesh = {'data': -1, 'fsdp': 2}
  n, reason = cpu_devices.choose(8, mesh, environ=env, copy_bytes=copy_bytes(gb), available=gb)
  assert n == 4
  assert reason.startswith('IMAGEN_JAX_CPU_DEVICES=4; memory: 2 copies of the 1.0 GB'), reason
  env = {**CPU, 'IMAGEN_JAX_CPU_DEVICES': '1'}
  assert cpu_devices.choose(4, MESH, environ=env, copy_bytes=copy_bytes(gb), available=1) == (
    1,
    'IMAGEN_JAX_CPU_DEVICES=1',
  )
  assert calls == [3 * gb, 6_438_885_388, gb, gb]


def test_a_failing_estimate_counts_as_unknown(monkeypatch):
  from imagen_jax import cli

  seen = {}

  def configure(batch_size, mesh, *, distributed, copy_bytes, batch_name, one_device_mesh):
    seen['bytes'] = copy_bytes()

  monkeypatch.setattr(cpu_devices, 'configure', configure)

  def broken():
    raise ValueError('unknown model preset')

  cli.split_cpu_devices(4, None, distributed=False, copy_bytes=broken)
  assert seen == {'bytes': None}


def test_available_memory_is_the_least_of_the_system_and_the_cgroup(tmp_path):
  def write(rel, text):
    path = tmp_path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)

  assert host_memory.available_bytes(str(tmp_path)) is None  # nothing readable
  write('proc/meminfo', 'MemTotal:       32000000 kB\nMemAvailable:   20000000 kB\n')
  assert host_memory.available_bytes(str(tmp_path)) == 20_000_000 * 1024
  write('sys/fs/cgroup/memory.max', 'max\n')  # cgroup v2 without a limit
  write('sys/fs/cgroup/memory.current', '5000000000\n')
  assert host_memory.available_bytes(str(tmp_path)) == 20_000_000 * 1024
  write('sys/fs/cgroup/memory.max', '8000000000\n')  # a container's limit
  assert host_memory.available_bytes(str(tmp_path)) == 3_000_000_000
  write('sys/fs/cgroup/memory/memory.limit_in_bytes', str(2**63 - 4096))  # v1 without a limit
  write('sys/fs/cgroup/memory/memory.usage_in_bytes', '1000')
  assert host_memory.available_bytes(str(tmp_path)) == 3_000_000_000
  # The process's own group (a SLURM job, a systemd unit) below the root: its limit counts. The
  # root's limit was all that was read before: 3 GB here instead of the job's 1 GB.
  write('proc/self/cgroup', '0::/slurm/job_1\n')
  write('sys/fs/cgroup/slurm/job_1/memory.max', '2000000000\n')
  write('sys/fs/cgroup/slurm/job_1/memory.current', '1000000000\n')
  assert host_memory.available_bytes(str(tmp_path)) == 1_000_000_000
  write('proc/self/cgroup', '4:memory:/job_2\n0::/\n')  # v1's memory controller
  write('sys/fs/cgroup/memory/job_2/memory.limit_in_bytes', '1500000000\n')
  write('sys/fs/cgroup/memory/job_2/memory.usage_in_bytes', '1000000000\n')
  assert host_memory.available_bytes(str(tmp_path)) == 500_000_000
  write('proc/self/cgroup', '0::/docker/abc\n')  # a group the mount does not show: its root's
  assert host_memory.available_bytes(str(tmp_path)) == 3_000_000_000
  assert host_memory.available_bytes() > 0  # this machine's own
  # An address-space limit (`ulimit -v`) leaves what the process has not mapped yet.
  probe = (
    'import resource\n'
    'resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n'
    'from imagen_jax import host_memory\n'
    "print(host_memory._address_space_left('/'), host_memory.available_bytes())\n"
  )
  proc = subprocess.run(
    [sys.executable, '-c', probe], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
  )
  assert proc.returncode == 0, proc.stderr
  left, available = map(int, proc.stdout.split())
  assert 0 < left < 1 << 30 and available <= left, proc.stdout


def test_an_explicit_count_is_used_or_refused_with_the_fix(monkeypatch):
  assert (
    cpu_devices.choose(4, MESH, environ={**CPU, 'IMAGEN_JAX_CPU_DEVICES': '1'}, cores=8)[0] == 1
  )
  assert (
    cpu_devices.choose(12, MESH, environ={**CPU, 'IMAGEN_JAX_CPU_DEVICES': '3'}, cores=1)[0] == 3
  )
  for bad in ('two', '0', '-1'):
    with pytest.raises(ValueError, match=r"IMAGEN_JAX_CPU_DEVICES='.*' is not a setting.*auto"):
      cpu_devices.choose(4, MESH, environ={**CPU, 'IMAGEN_JAX_CPU_DEVICES': bad})
  with pytest.raises(ValueError, match='^IMAGEN_JAX_CPU_DEVICES=4: train.batch_size=6 is not div'):
    cpu_devices.choose(6, MESH, environ={**CPU, 'IMAGEN_JAX_CPU_DEVICES': '4'})
  # A batch from another setting is named as that setting (bench/unet.py's --batch).
  with pytest.raises(
    ValueError, match='^IMAGEN_JAX_CPU_DEVICES=4: --batch=6 is not divisible by 4'
  ):
    cpu_devices.choose(
      6, MESH, environ={**CPU, 'IMAGEN_JAX_CPU_DEVICES': '4'}, batch_name='--batch'
    )
  assert cpu_devices.choose(3, MESH, environ=CPU, cores=2, batch_name='--batch') == (
    None,
    '--batch=3 is not divisible by 2',
  )
  with pytest.raises(ValueError, match='set the CPU device count in one place'):
    env = {
      **CPU,
      'IMAGEN_JAX_CPU_DEVICES': '2',
      'XLA_FLAGS': '--xla_force_host_platform_device_count=4',
    }
    cpu_devices.choose(4, MESH, environ=env)
  # With --distributed the mesh spans every process's devices: 2 processes x 2 devices fill
  # data=4 or data=2 x fsdp=2, which a check against the 2 local devices refused.
  two = {**CPU, 'IMAGEN_JAX_CPU_DEVICES': '2'}
  for mesh in ({'data': 4, 'fsdp': 1}, {'data': 2, 'fsdp': 2}, {'data': -1, 'fsdp': 4}):
    assert cpu_devices.choose(8, mesh, distributed=True, environ=two)[0] == 2, mesh
  with pytest.raises(ValueError, match='train.batch_size=3 is not divisible by 2'):
    cpu_devices.choose(3, {'data': 4, 'fsdp': 1}, distributed=True, environ=two)
  monkeypatch.setattr(host_memory, 'backend_started', lambda: True)
  with pytest.raises(ValueError, match='already started'):
    cpu_devices.choose(4, MESH, environ={**CPU, 'IMAGEN_JAX_CPU_DEVICES': '2'})


# configure() in a fresh process: the device count JAX then reports, and the train step on the
# two devices gives the loss of the one-device step.
_PROBE = textwrap.dedent(
  """
  import json, sys
  from imagen_jax import cpu_devices
  n = cpu_devices.configure(4, {'data': -1, 'fsdp': 1})
  import jax, jax.numpy as jnp
  from imagen_jax import sharding
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1})
  x = jnp.arange(4 * 8, dtype=jnp.float32).reshape(4, 8)
  x = jax.device_put(x, sharding.batch_sharding(mesh))
  w = jnp.linspace(-1.0, 1.0, 8 * 3, dtype=jnp.float32).reshape(8, 3)
  loss, grad = jax.jit(jax.value_and_grad(lambda w: jnp.mean(jnp.tanh(x @ w) ** 2)))(w)
  print(json.dumps({'configured': n, 'devices': jax.device_count(), 'mesh': dict(mesh.shape),
                    'loss': float(loss), 'grad': grad.tolist()}))
  """
)


def _probe(**env) -> dict:
  environ = {k: v for k, v in cli_env().items() if k != 'XLA_FLAGS'}
  environ.update(env)
  proc = subprocess.run(
    [sys.executable, '-c', _PROBE], cwd=REPO_ROOT, env=environ, capture_output=True, text=True
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(
  len(os.sched_getaffinity(0)) < 2 if hasattr(os, 'sched_getaffinity') else True,
  reason='the automatic choice needs two usable cores',
)
def test_configure_gives_two_devices_and_the_same_numbers():
  two = _probe()
  one = _probe(IMAGEN_JAX_CPU_DEVICES='1')
  assert (two['configured'], two['devices'], two['mesh']) == (2, 2, {'data': 2, 'fsdp': 1})
  assert (one['configured'], one['devices'], one['mesh']) == (1, 1, {'data': 1, 'fsdp': 1})
  assert two['loss'] == pytest.approx(one['loss'], rel=1e-6)
  for a, b in zip(sum(two['grad'], []), sum(one['grad'], []), strict=True):
    assert a == pytest.approx(b, rel=1e-5, abs=1e-7)


def test_train_py_refuses_a_count_the_batch_cannot_take(tmp_path):
  env = {k: v for k, v in cli_env().items() if k != 'XLA_FLAGS'}
  env['IMAGEN_JAX_CPU_DEVICES'] = '3'  # the tiny config's batch is 4
  proc = subprocess.run(
    [sys.executable, 'train.py', '--config=configs/base64.py:tiny', f'--workdir={tmp_path / "w"}'],
    cwd=REPO_ROOT,
    env=env,
    capture_output=True,
    text=True,
  )
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert 'IMAGEN_JAX_CPU_DEVICES=3: train.batch_size=4 is not divisible by 3' in proc.stderr
  assert not (tmp_path / 'w').exists()


def test_a_mesh_size_no_mesh_can_have_is_a_value_error_not_a_division_by_zero():
  for environ in (CPU, {**CPU, 'IMAGEN_JAX_CPU_DEVICES': '2'}):
    with pytest.raises(ValueError, match='Mesh sizes must be positive or -1, got data=-1, fsdp=0'):
      cpu_devices.choose(4, {'data': -1, 'fsdp': 0}, environ=environ, cores=2)
