"""bench/unet.py and bench/sample.py run and print their JSON line (the GPU session runs them
unchanged), and the op profile (imagen_jax/op_profile.py) groups a real trace by kind of op and
by phase."""
# ruff: noqa: E501  (HLO below is verbatim compiler text, one instruction per line)

import functools
import gzip
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from imagen_jax import op_profile
from tests.conftest import REPO_ROOT

HLO = """HloModule jit_step

%fused_computation.1 (p0: f32[4,8], p1: f32[8,8]) -> f32[4,8] {
  %p0 = f32[4,8]{1,0} parameter(0)
  %p1 = f32[8,8]{1,0} parameter(1)
  ROOT %dot.1 = f32[4,8]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(step)/transpose(jvp(loss))/dot_general"}
}

%fused_update (q0: f32[8,8], q1: f32[8,8]) -> f32[8,8] {
  %q0 = f32[8,8]{1,0} parameter(0)
  %transpose.20 = f32[8,8]{1,0} transpose(%q0), dimensions={1,0}, metadata={op_name="params['w'].value"}
  %q1 = f32[8,8]{1,0} parameter(1)
  ROOT %add.21 = f32[8,8]{1,0} add(%transpose.20, %q1), metadata={op_name="jit(step)/optimizer/add"}
}

%body (t: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %t = (s32[], f32[4,8]{1,0}) parameter(0)
  ROOT %tuple.2 = (s32[], f32[4,8]{1,0}) tuple(%t)
}

ENTRY %main (a: f32[4,8], w: f32[8,8], k: f32[3,3,8,8], x: f32[1,6,6,8]) -> f32[4,8] {
  %a = f32[4,8]{1,0} parameter(0)
  %w = f32[8,8]{1,0} parameter(1)
  %k = f32[3,3,8,8]{3,2,1,0} parameter(2)
  %x = f32[1,6,6,8]{3,2,1,0} parameter(3)
  %convolution.3 = f32[1,6,6,8]{3,2,1,0} convolution(%x, %k), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, metadata={op_name="jit(step)/jvp(loss)/conv_general_dilated"}
  %custom-call.4 = f32[4,8]{1,0} custom-call(%a, %a, %a), custom_call_target="__cudnn$fmhaSoftmax", metadata={op_name="jit(step)/jvp(loss)/dot_product_attention"}
  %while.5 = (s32[], f32[4,8]{1,0}) while(%a), condition=%body, body=%body
  %fusion.6 = f32[4,8]{1,0} fusion(%a, %w), kind=kOutput, calls=%fused_computation.1
  %transpose.7 = f32[8,4]{0,1} transpose(%a), dimensions={1,0}, metadata={op_name="jit(step)/optimizer/transpose"}
  %fusion.9 = f32[8,8]{1,0} fusion(%w, %w), kind=kInput, calls=%fused_update
  %convolution.11 = f32[3,3,8,8]{3,2,1,0} convolution(%x, %fusion.6), window={size=6x6 pad=1_1x1_1}, dim_labels=b01f_01io->b01f
  %copy.12 = f32[8,8]{0,1} copy(%w)
  ROOT %add.8 = f32[4,8]{1,0} add(%a, %a), metadata={op_name="jit(step)/optimizer/add"}
}
"""


@pytest.mark.unit
def test_hlo_ops_kinds_and_phases():
  ops = op_profile.hlo_ops(HLO)
  assert ops['convolution.3'] == op_profile.Op('conv', 'forward', 'f32[1,6,6,8]')
  assert ops['custom-call.4'].kind == 'attention'  # cuDNN's fused attention
  # A fusion without a name stack of its own takes its kind and phase from what it calls.
  assert ops['fusion.6'] == op_profile.Op('dot', 'backward', 'f32[4,8]')
  assert ops['transpose.7'] == op_profile.Op('copy', 'optimizer', 'f32[8,4]')
  assert ops['add.8'] == op_profile.Op('elementwise', 'optimizer', 'f32[4,8]')
  # A fusion that starts by reading a parameter (a forward name) and updates it is the
  # optimizer's: the latest phase among its instructions wins.
  assert ops['fusion.9'] == op_profile.Op('elementwise', 'optimizer', 'f32[8,8]')
  assert ops['while.5'].kind == 'control'  # tuple shapes parse; loops are not counted
  # No name at all (XLA:CPU's kernel-gradient convolutions): the latest phase of its operands,
  # here the forward input and a backward value; reading only parameters leaves it unknown.
  assert ops['convolution.11'] == op_profile.Op('conv', 'backward', 'f32[3,3,8,8]')
  assert ops['copy.12'] == op_profile.Op('copy', 'unknown', 'f32[8,8]')


@pytest.mark.unit
def test_summarize_a_real_trace(tmp_path):
  def loss(w, x):
    y = jax.lax.conv_general_dilated(
      x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
    )
    return jnp.mean(jnp.square(jnp.dot(y.reshape(-1, 16), jnp.ones((16, 16)))))

  def step(w, x):
    g = jax.grad(loss)(w, x)
    with jax.named_scope('optimizer'):
      return w - 0.1 * g

  w = jnp.ones((3, 3, 16, 16)) * 0.01
  x = jnp.ones((2, 32, 32, 16))
  compiled = jax.jit(step).lower(w, x).compile()
  jax.block_until_ready(compiled(w, x))
  with op_profile.traced(tmp_path):
    for _ in range(2):
      w = jax.block_until_ready(compiled(w, x))
  summary = op_profile.summarize(tmp_path, compiled.as_text(), steps=2)
  assert summary['steps'] == 2
  assert summary['by_kind_ms'].get('conv', 0) > 0
  total = pytest.approx(summary['op_ms_per_step'], abs=0.01)  # each entry rounded to 1 us
  assert sum(summary['by_kind_ms'].values()) == total
  assert sum(summary['by_phase_ms'].values()) == total
  assert {'forward', 'backward', 'optimizer'} <= set(summary['by_phase_ms'])
  assert summary['top_ops'] and all(row[1] >= 0 for row in summary['top_ops'])
  with pytest.raises(FileNotFoundError, match='trace'):
    op_profile.summarize(tmp_path / 'empty', compiled.as_text(), steps=1)


def _write_trace(folder, processes: dict[int, str], spans: list[tuple]) -> None:
  """A profiler trace file in `folder`: processes {pid: name}, spans (pid, name, ms, args)."""
  events = [
    {'ph': 'M', 'name': 'process_name', 'pid': pid, 'args': {'name': name}}
    for pid, name in processes.items()
  ]
  events += [
    {'ph': 'X', 'pid': pid, 'tid': 1, 'ts': 0, 'name': name, 'dur': ms * 1e3, 'args': args}
    for pid, name, ms, args in spans
  ]
  folder.mkdir(parents=True)
  with gzip.open(folder / 'host.trace.json.gz', 'wt') as f:
    json.dump({'traceEvents': events}, f)


@pytest.mark.unit
def test_summarize_counts_only_op_events_as_unmapped(tmp_path):
  op = {'hlo_op': 'add.8', 'hlo_module': 'jit_step'}
  other_module = {'hlo_op': 'wrapped_is-finite', 'hlo_module': 'jit_isfinite'}
  # A CPU-only trace: the host's own spans (dispatch, argument parsing, a collective's
  # rendezvous waits) share the timeline with XLA:CPU's ops and carry no hlo_op; they were
  # summed as unmapped op time.
  _write_trace(
    tmp_path / 'cpu',
    {1: '/host:CPU'},
    [
      (1, 'add.8', 1.0, op),
      (1, 'wrapped_is-finite', 2.0, other_module),  # an op of another program: unmapped
      (1, 'ExecuteReplicated.__call__', 5.0, {}),
      (1, 'shard_args', 1.0, {}),
      (1, 'ParseArguments', 1.0, {'_src': 'x'}),
      (1, 'Rendezvous', 3.0, {}),
    ],
  )
  summary = op_profile.summarize(tmp_path / 'cpu', HLO, steps=1)
  assert summary['op_ms_per_step'] == 1.0
  assert summary['unmapped_ms_per_step'] == 2.0
  assert summary['top_unmapped'] == [['wrapped_is-finite', 2.0]]
  # A GPU trace: every span named like an op on the device's timeline counts, with or without
  # hlo_op (a copy); the host's spans are left out.
  _write_trace(
    tmp_path / 'gpu',
    {1: '/host:CPU', 2: '/device:GPU:0'},
    [
      (2, 'loop_add_fusion', 1.0, op),
      (2, 'command_buffer_12', 2.0, {'hlo_op': 'command_buffer_12', 'hlo_module': 'jit_step'}),
      (2, 'MemcpyDtoD', 0.5, {}),
      (1, 'ExecuteReplicated.__call__', 5.0, {}),
    ],
  )
  summary = op_profile.summarize(tmp_path / 'gpu', HLO, steps=1)
  assert summary['op_ms_per_step'] == 1.0
  assert summary['unmapped_ms_per_step'] == 2.5
  assert summary['top_unmapped'] == [['command_buffer_12', 2.0], ['MemcpyDtoD', 0.5]]


def _script(*cmd: str, timeout: int = 600, **env_vars: str) -> subprocess.CompletedProcess:
  """python cmd... in the repository, on the CPU backend, with env_vars set."""
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # one CPU device, not 8
  return subprocess.run(
    [sys.executable, *cmd],
    cwd=REPO_ROOT,
    env={**env, 'JAX_PLATFORMS': 'cpu', **env_vars},
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def _bench(*args: str) -> subprocess.CompletedProcess:
  return _script('bench/unet.py', *args)


def _assert_one_usage_error(proc: subprocess.CompletedProcess, message: str) -> None:
  """Exit 2, one `error:` line holding message, no traceback and nothing on stdout."""
  errors = [ln for ln in proc.stderr.splitlines() if 'error:' in ln]
  assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr and not proc.stdout.strip()


@pytest.mark.smoke
def test_bench_unet_prints_one_json_line_with_a_profile(tmp_path):
  proc = _bench(
    '--preset=tiny',
    '--batch=2',
    '--resolution=16',
    '--text_len=8',
    '--steps=1',
    '--profile_steps=1',
    f'--trace_dir={tmp_path}',
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('{')]
  assert len(lines) == 1, proc.stdout
  result = json.loads(lines[0])
  assert result['preset'] == 'tiny' and result['batch'] == 2
  # The step train.py runs (train_lib.make_train_step); every loss and gradient norm finite.
  assert result['step'] == 'train' and result['all_steps_finite'] is True
  assert result['train_step_s'] > 0 and result['sample_step_s'] > 0
  # No --compilation_cache: compile_s times real compiles.
  assert result['compile'] == result['sample_compile'] == 'compiled'
  assert result['images_per_s'] == pytest.approx(2 / result['train_step_s'], rel=0.01)
  assert result['model_tflop_per_step'] > 0
  assert result['mfu'] is None  # CPU: no peak in the table, so no MFU, not a guess
  assert result['fused_attention_in_hlo'] is False and result['fused_attention_calls'] == 0
  assert sum(result['attention'].values()) > 0
  # A CPU run keeps XLA's step buffers mapped between steps (imagen_jax.host_memory) on glibc.
  assert result['host_malloc'] in ('on', 'off: the C library is not glibc')
  profile = result['profile']
  assert profile['by_kind_ms']['conv'] > 0 and profile['by_phase_ms']['optimizer'] > 0
  # --trace_dir keeps the trace and the HLO that maps it, so it can be summarised again later.
  kept = op_profile.summarize(tmp_path, (tmp_path / 'train_step.hlo.txt').read_text(), steps=1)
  assert kept['by_kind_ms'] == profile['by_kind_ms']


@pytest.mark.smoke
@pytest.mark.parametrize('step', ['train', 'bare'])
def test_bench_unet_runs_both_steps_for_an_sr_preset(step):
  # An SR preset: the train step conditions on a 4x smaller low-res image (noise-augmented and
  # upsampled in the step; the sampling step upsamples it too), the bare one (the earlier GPU
  # rows' step, params and optimizer state only) on a full-size one. One step of each is run.
  proc = _bench(
    '--preset=tiny_sr',
    '--batch=2',
    '--resolution=16',
    '--text_len=8',
    f'--step={step}',
    '--steps=1',
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  result = json.loads(proc.stdout.splitlines()[-1])
  assert result['step'] == step and result['memory']['total_bytes'] > 0
  assert result['train_step_s'] > 0 and result['sample_step_s'] > 0
  assert result['all_steps_finite'] is (True if step == 'train' else None)


@pytest.mark.smoke
def test_bench_sample_splits_an_even_batch_over_two_cpu_devices():
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  proc = subprocess.run(
    [sys.executable, 'bench/sample.py', '--config=configs/base64.py:tiny', '--batch=2']
    + ['--steps=2', '--repeats=1'],
    cwd=REPO_ROOT,
    env={**env, 'JAX_PLATFORMS': 'cpu', 'IMAGEN_JAX_CPU_DEVICES': '2'},
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  result = json.loads(proc.stdout.splitlines()[-1])
  assert result['bench'] == 'sample' and result['batch'] == 2
  assert result['devices'] == 2 and result['split'] is True
  assert result['images_per_s'] == pytest.approx(2 / result['batch_s'], rel=0.01)
  # One untimed call before the timed ones: the first call's one-time costs were timed, and
  # with --repeats=1 made batch_s about 9 times the sampling time.
  assert result['first_call_s'] > 0


_TIME_END_TO_END = """
import concurrent.futures, importlib.util, json, sys, time

spec = importlib.util.spec_from_file_location('bench_train', 'bench/train.py')
bench_train = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_train)
device = concurrent.futures.ThreadPoolExecutor(1)  # one step after another, as on a device


class Steps:  # train_lib.CompiledSteps: the first batch compiles its step (1 s)
  compiled = False

  def get(self, state, batch):
    seconds = 0.0 if self.compiled else 1.0
    time.sleep(seconds)
    self.compiled = True
    return step, None, seconds


def step(state, batch):  # dispatch returns at once; the step takes 0.2 s on the device
  return state + 1, device.submit(time.sleep, 0.2)


for count in (1, 3):
  state, _, step_s, recompile_s = bench_train.time_end_to_end(
    Steps(), 0, iter(range(count)), count, fetch=lambda m: m.result()
  )
  print(json.dumps({'count': count, 'state': state, 'step_s': step_s, 'recompile_s': recompile_s}))
"""


@pytest.mark.smoke
def test_bench_train_times_the_end_to_end_steps_as_a_whole():
  # Each step is dispatched before the previous step's metrics are read: timing each loop pass
  # timed the first step's dispatch only and left the last step's wait out, so with --steps=1
  # the end-to-end step (0.03 s) was shorter than the compute-only one (0.087 s). One clock
  # from the first batch to the last step's metrics, less the compiles, cannot be.
  proc = _script('-c', _TIME_END_TO_END, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.splitlines()
  assert len(lines) == 2, proc.stdout
  for line in lines:
    result = json.loads(line)
    assert result['state'] == result['count'] and result['recompile_s'] == 1.0
    assert 0.2 <= result['step_s'] < 1.0, result  # every step's 0.2 s, and no compile


@pytest.mark.smoke
def test_bench_unet_memory_only_reports_no_peak_memory():
  # A device whose allocator reports a peak (as a GPU's does; a CPU's reports none): with
  # --memory_only nothing ran, so the peak read at the end (whatever the process had allocated)
  # was printed as the step's.
  driver = (
    'import runpy, sys, jax\n'
    "jax.Device.memory_stats = lambda self: {'peak_bytes_in_use': 7.5e9, 'bytes_in_use': 1e6}\n"
    "sys.argv = ['bench/unet.py'] + sys.argv[1:]\n"
    "runpy.run_path('bench/unet.py', run_name='__main__')\n"
  )
  args = ['--preset=tiny', '--batch=2', '--resolution=16', '--text_len=8', '--memory_only']
  proc = _script('-c', driver, *args, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  result = json.loads(proc.stdout.splitlines()[-1])
  assert result['memory_only'] is True and result['memory']['total_bytes'] > 0
  assert result['peak_memory_gb'] is None and result['train_step_s'] is None


@pytest.mark.smoke
def test_bench_sweep_reports_each_failing_point_and_goes_on():
  proc = _bench('--preset=nope', '--batch=2,4', '--remat=none')
  lines = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith('{')]
  assert [ln['batch'] for ln in lines] == [2, 4]
  assert all("Unknown --preset 'nope'" in ln['error'] for ln in lines)
  # It exited 0 when no point ran.
  assert proc.returncode == 1 and 'every point of the sweep failed' in proc.stderr, proc.stderr


@pytest.mark.smoke
@pytest.mark.parametrize(
  'args,message',
  [
    (['--text_len=0'], '--text_len must be at least 1, got 0'),
    (['--resolution=0'], '--resolution must be at least 1, got 0'),
    # These ended in a traceback once the model was traced (or the mesh made).
    (['--resolution=18'], '--resolution 18 must be a multiple of 4 for the 3 levels of small64'),
    # On a 2-core CPU the device choice refuses it first, naming this script's flag.
    (
      ['--mesh_fsdp=3'],
      'needs 3 devices, but the CPU backend is left at one',
    ),
    (['--mesh_fsdp=3'], 'Set --mesh_fsdp=1 for one device, or IMAGEN_JAX_CPU_DEVICES=N'),
    # An SR preset's low-res input is a quarter as wide: 2 passed as 'a multiple of 2'.
    (['--preset=tiny_sr', '--resolution=2'], '--resolution 2 is too small for tiny_sr'),
    # Checked once jax is imported: they exited 1, without the usage errors' code 2.
    (['--preset=nope'], "Unknown --preset 'nope'; choose from"),
    (['--state_layout=sideways'], "Unknown --state_layout 'sideways'; choose from"),
  ],
)
def test_bench_unet_bad_arguments_are_one_line(args, message):
  _assert_one_usage_error(_bench('--preset=small64', '--batch=2', *args), message)


@pytest.mark.smoke
@pytest.mark.parametrize(
  'cmd,message',
  [
    (['bench/sample.py', '--sampler=bogus'], "sampler must be one of ('ddpm'"),
    (['bench/sample.py', '--guidance=-1'], 'guidance must be a finite number >= 0'),
    (['bench/cpu_conv.py', '--calls=0'], '--batch and --calls must be at least 1'),
    (['bench/data.py', '--batches=0'], '--batch_size and --batches must be at least 1'),
    (['bench/t5.py', '--max_length=0'], '--max_length must be at least 1'),
    # Refused when parsed (it exited 1 without `error:` once jax was imported).
    (['bench/t5.py', '--memory_only'], '--memory_only needs --synthetic_config'),
    (['bench/t5.py', '--encoder=/nonexistent/t5'], "folder '/nonexistent/t5' does not exist"),
    # Config errors were tracebacks (device_prefetch's only after the timed steps had run).
    (
      ['bench/train.py', '--config=configs/base64.py:tiny', '--config.train.batch_size=0'],
      'train.batch_size=0: use a whole number >= 1',
    ),
    (
      ['bench/train.py', '--config=configs/base64.py:tiny', '--config.data.device_prefetch=-1'],
      'data.device_prefetch=-1: use 0 (off) or a positive batch count',
    ),
    (
      ['bench/train.py', '--config=configs/base64.py:tiny', '--config.mesh.fsdp=3'],
      'needs 3 devices, but the CPU backend is left at one',
    ),
    (
      ['bench/train.py', '--config=configs/base64.py:tiny', '--config.text.encoder=/none/t5'],
      "T5 checkpoint folder '/none/t5' does not exist",
    ),
    (['bench/train.py', '--memory_only', '--batch_per_device=-1'], '--batch_per_device must be'),
    (
      ['bench/sample.py', '--config=configs/base64.py:tiny', '--config.text.max_length=0']
      + ['--batch=2', '--steps=1', '--repeats=1'],
      'text_embs needs at least one token',
    ),
    (['tools/print_grids.py', 'configs/base64.py', '--config.sample.steps=0'], 'steps must be'),
    (['tools/print_grids.py', '--al'], "Unknown flags ['--al']"),
  ]
  + [  # a bad IMAGEN_JAX_HOST_MALLOC
    ([script], "IMAGEN_JAX_HOST_MALLOC='bogus' is not a setting")
    for script in ('bench/sample.py', 'bench/unet.py', 'bench/cpu_conv.py', 'bench/train.py')
  ],
)
def test_bench_scripts_bad_input_is_one_line(cmd, message):
  # Each ended in a traceback (or, for counts of 0, ran and printed nonsense).
  proc = _script(*cmd, timeout=300, IMAGEN_JAX_HOST_MALLOC='bogus' if len(cmd) == 1 else '')
  _assert_one_usage_error(proc, message)


@pytest.mark.smoke
@pytest.mark.parametrize(
  'cmd,message',
  [
    (['bench/train.py', '--config=configs/base64.py:demo'], 'train.batch_size=16 is not divisible'),
    (['bench/unet.py', '--preset=tiny', '--batch=4'], '--batch=4 is not divisible'),
  ],
)
def test_bench_bad_cpu_device_count_is_one_line_exit_2(cmd, message):
  # As train.py (cli.split_cpu_devices): a count the batch cannot take is a usage error.
  proc = _script(*cmd, IMAGEN_JAX_CPU_DEVICES='3')
  _assert_one_usage_error(proc, f'IMAGEN_JAX_CPU_DEVICES=3: {message} by 3')


@pytest.mark.smoke
def test_bench_refuses_an_unknown_gradient_layout_naming_the_choices():
  proc = _bench('--preset=small64', '--grad_layout=sideways')
  assert proc.returncode == 2 and not proc.stdout.strip()
  assert "Unknown --grad_layout 'sideways'" in proc.stderr and "'row_major'" in proc.stderr


@pytest.mark.smoke
def test_bench_sr_quality_bad_input_is_one_line(tmp_path):
  # A base-stage run is refused from its saved config, before any restore (this one has no
  # params to restore), instead of after a full restore with the whole flag help.
  base = tmp_path / 'base'
  (base / 'checkpoints' / '4' / 'config').mkdir(parents=True)
  saved = {'stage': 'base64', 'data': {'resolution': 64, 'lowres_resolution': 0}}
  (base / 'checkpoints' / '4' / 'config' / 'metadata').write_text(json.dumps(saved))
  old_grid = tmp_path / 'grid.png'
  old_grid.write_bytes(b'an earlier grid')
  for args, message in [
    ([f'--checkpoints={tmp_path / "none"}'], f'error: No checkpoint to load: {tmp_path / "none"}'),
    ([f'--checkpoints={tmp_path}', '--num=0'], 'error: --num must be a positive integer, got 0.'),
    ([f'--checkpoints={tmp_path}', '--grid_rows=0'], 'error: --grid_rows must be a positive'),
    ([f'--checkpoints={tmp_path}', '--grid_rows=-1'], '--grid_rows must be a positive integer'),
    ([f'--checkpoints={tmp_path}', '--grid_scale=0'], 'error: --grid_scale must be a positive'),
    ([f'--checkpoints={tmp_path}', f'--seed={2**32}'], 'error: --seed must be in [0, 4294967296)'),
    ([f'--checkpoints={tmp_path}', '--seed=-1'], 'error: --seed must be in [0, 4294967296)'),
    ([f'--checkpoints={base}@4'], f'error: {base}@4 is a base64 run, not a super-resolution'),
    # An output that exists is refused before the sampling, unless --overwrite.
    ([f'--checkpoints={base}@4', f'--grid={old_grid}'], f'error: --grid {old_grid} exists;'),
    ([f'--checkpoints={base}@4', f'--grid={tmp_path}'], f'error: --grid {tmp_path} is a folder'),
  ]:
    proc = subprocess.run(
      [sys.executable, 'bench/sr_quality.py', *args],
      cwd=REPO_ROOT,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
      capture_output=True,
      text=True,
      timeout=300,
    )
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]  # no flag help
    assert 'Traceback' not in proc.stderr and not proc.stdout.strip()
  assert old_grid.read_bytes() == b'an earlier grid'


# An evaluate.py result (its --out JSON) that meets the digits target.
_EVAL_RESULT = {
  'step': 1500,
  'num': 20,
  'sampler': 'dpmpp_2m',
  'steps': 32,
  'guidance': 1.5,
  'judge_test_accuracy': 0.99,
  'sampling_seconds': 1.0,
  'rows': {
    'generated': {
      'adherence': 0.9,
      'adherence_seen': 0.95,
      'adherence_heldout': 0.85,
      'entropy_bits': 3.3,
      'fd': 10.0,
      'precision': 0.8,
      'recall': 0.8,
      'nn_train': 0.3,
      'n': 20,
      'per_template': {'digit {numeral}': 0.95},
    },
    'real_test': {'fd': 5.0, 'n': 359},
  },
}


def _quality_bench(tmp_path):
  """bench/quality.py run in `tmp_path` (or `cwd`) with `tmp_path` as the checkout
  (--checkout), whose stand-ins for train.py (makes its workdir, exits
  FAKE_TRAIN_EXIT, leaves a mark, appends its arguments to train_calls) and evaluate.py (writes
  the result above; for a run folder named seed_1 a held-out adherence of 0.6, below the
  target)."""
  (tmp_path / 'train.py').write_text(
    'import os, pathlib, sys\n'
    "pathlib.Path('trained').touch()\n"
    "workdir = next(a.split('=', 1)[1] for a in sys.argv if a.startswith('--workdir='))\n"
    'pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)\n'
    "with open('train_calls', 'a') as f: f.write(' '.join(sys.argv[1:]) + '\\n')\n"
    "sys.exit(int(os.environ.get('FAKE_TRAIN_EXIT', '0')))\n"
  )
  (tmp_path / 'evaluate.py').write_text(
    'import json, pathlib, sys\n'
    "arg = lambda name: next(a.split('=', 1)[1] for a in sys.argv if a.startswith(name + '='))\n"
    "result = json.loads(pathlib.Path('result.json').read_text())\n"
    "if arg('--checkpoints').endswith('seed_1'):\n"
    "  result['rows']['generated']['adherence_heldout'] = 0.6\n"
    "pathlib.Path(arg('--out')).write_text(json.dumps(result))\n"
  )
  (tmp_path / 'result.json').write_text(json.dumps(_EVAL_RESULT))

  def run(workdir, *args, train_exit=0, cwd=tmp_path):
    (tmp_path / 'trained').unlink(missing_ok=True)
    script = str(REPO_ROOT / 'bench/quality.py')
    return subprocess.run(
      [sys.executable, script, f'--workdir={workdir}', f'--checkout={tmp_path}', *args],
      cwd=cwd,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu', 'FAKE_TRAIN_EXIT': str(train_exit)},
      capture_output=True,
      text=True,
      timeout=300,
    )

  return run


@pytest.mark.smoke
def test_bench_quality_times_only_fresh_training_and_fails_early_without_a_traceback(tmp_path):
  run = _quality_bench(tmp_path)
  fresh = tmp_path / 'fresh'
  fresh.mkdir()
  proc = run(fresh, '--num=20')
  assert proc.returncode == 0, proc.stderr[-2000:]
  line = json.loads(proc.stdout.splitlines()[-1])
  assert line['resumed'] is False and 0 <= line['train_seconds'] < 60 and line['target_met']
  assert line['per_template'] == {'digit {numeral}': 0.95}
  # A run folder with a checkpoint: train.py resumes it, so the time of its call is not the
  # training time; it is not reported, and the time condition is left out of target_met.
  (fresh / 'checkpoints' / '4').mkdir(parents=True)
  proc = run(fresh, '--num=20')
  assert proc.returncode == 0, proc.stderr[-2000:]
  line = json.loads(proc.stdout.splitlines()[-1])
  assert line['resumed'] is True and line['train_seconds'] is None and line['target_met']
  # A bad --num is evaluate.py's error line before any training.
  proc = run(tmp_path / 'other', '--num=15')
  assert proc.returncode == 2 and not (tmp_path / 'trained').exists(), proc.stderr[-2000:]
  assert proc.stderr.startswith('error: --num must be a multiple of the 10 classes')
  assert len(proc.stderr.strip().splitlines()) == 1 and not proc.stdout.strip()
  # A failing step ends the bench with its exit status and one line, not a traceback.
  proc = run(tmp_path / 'other', '--num=20', train_exit=3)
  assert proc.returncode == 3 and (tmp_path / 'trained').exists() and not proc.stdout.strip()
  assert 'Traceback' not in proc.stderr, proc.stderr[-2000:]
  assert 'error: train.py failed with exit status 3' in proc.stderr
  # A --grid that is a folder is refused before the training, not after it.
  proc = run(tmp_path / 'other', '--num=20', f'--grid={tmp_path}')
  assert proc.returncode == 2 and not (tmp_path / 'trained').exists(), proc.stderr[-2000:]
  assert proc.stderr.startswith(f'error: --grid {tmp_path} is a folder; pass a PNG path')
  # So is an existing --grid file without --overwrite, which is left as it was.
  (tmp_path / 'grid.png').write_bytes(b'an earlier grid')
  proc = run(tmp_path / 'other', '--num=20', f'--grid={tmp_path / "grid.png"}')
  assert proc.returncode == 2 and not (tmp_path / 'trained').exists(), proc.stderr[-2000:]
  assert proc.stderr.startswith(f'error: --grid {tmp_path / "grid.png"} exists; pass --overwrite')
  assert (tmp_path / 'grid.png').read_bytes() == b'an earlier grid'
  # More samples than the floor's 359 test images and no fd_matched (an eval.json from before
  # it): the FD ratio at n 500 would flatter the model, so it is absent and the target unmet
  # (it read the plain ratio under the matched name).
  reused = tmp_path / 'reused'
  reused.mkdir()
  for matched, want in ((None, None), (7.5, 1.5)):
    # An eval.json from before per-template adherence: the line has none.
    generated = {**_EVAL_RESULT['rows']['generated'], 'n': 500}
    del generated['per_template']
    if matched is not None:
      generated['fd_matched'] = matched
    rows = {**_EVAL_RESULT['rows'], 'generated': generated}
    (reused / 'eval.json').write_text(json.dumps({**_EVAL_RESULT, 'num': 500, 'rows': rows}))
    proc = run(reused, '--reuse')
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = json.loads(proc.stdout.splitlines()[-1])
    assert line['fd_matched_over_floor'] == want and line['target_met'] is (want is not None)
    assert 'per_template' not in line
  # The target reads the unrounded values: entropy 3.0004 printed as 3.0 missed '> 3.0', and an
  # FD ratio of 5.004 printed as 5.0 met '<= 5.0'.
  for entropy, fd, met in ((3.0004, 10.0, True), (3.3, 25.02, False)):
    generated = {**_EVAL_RESULT['rows']['generated'], 'entropy_bits': entropy, 'fd': fd}
    rows = {**_EVAL_RESULT['rows'], 'generated': generated}
    (reused / 'eval.json').write_text(json.dumps({**_EVAL_RESULT, 'rows': rows}))
    line = json.loads(run(reused, '--reuse').stdout.splitlines()[-1])
    assert line['target_met'] is met, (entropy, fd, line)


@pytest.mark.smoke
def test_bench_quality_runs_the_checkouts_scripts_from_any_folder(tmp_path):
  # It ran `train.py` and `evaluate.py` from the caller's folder: from anywhere but the
  # repository, "can't open file .../train.py". They run in the checkout now (by default the
  # one holding bench/quality.py), with a relative --workdir made the caller's.
  help_text = subprocess.run(
    [sys.executable, str(REPO_ROOT / 'bench/quality.py'), '--helpshort'],
    cwd=tmp_path,
    capture_output=True,
    text=True,
    timeout=300,
  ).stdout
  assert f"(default: '{REPO_ROOT}')" in help_text, help_text
  run = _quality_bench(tmp_path)
  elsewhere = tmp_path / 'elsewhere'
  elsewhere.mkdir()
  proc = run('rel', '--num=20', cwd=elsewhere)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.loads(proc.stdout.splitlines()[-1])['target_met']
  calls = (tmp_path / 'train_calls').read_text().splitlines()  # written in the checkout
  assert calls == [f'--config=configs/digits.py --workdir={elsewhere / "rel"}']
  assert (elsewhere / 'rel' / 'eval.json').exists()
  proc = run('rel', '--num=20', f'--checkout={elsewhere}', cwd=elsewhere)
  assert proc.returncode == 2 and 'holds no train.py' in proc.stderr, proc.stderr[-2000:]


@pytest.mark.smoke
def test_bench_quality_over_training_seeds_reports_every_seed_and_the_worst(tmp_path):
  run = _quality_bench(tmp_path)
  proc = run(tmp_path / 'runs', '--num=20', '--seeds=0,1,2')
  assert proc.returncode == 0, proc.stderr[-2000:]
  line = json.loads(proc.stdout.splitlines()[-1])
  # One training per seed, each in its own folder with its seed passed to train.py.
  calls = (tmp_path / 'train_calls').read_text().splitlines()
  assert calls == [
    f'--config=configs/digits.py --workdir={tmp_path / "runs" / f"seed_{s}"} --config.seed={s}'
    for s in (0, 1, 2)
  ]
  assert line['seeds'] == [0, 1, 2] and sorted(line['per_seed']) == ['0', '1', '2']
  assert [line['per_seed'][s]['adherence_heldout'] for s in '012'] == [0.85, 0.6, 0.85]
  assert line['per_seed']['0']['per_template'] == {'digit {numeral}': 0.95}
  assert line['adherence_heldout_mean'] == round((0.85 + 0.6 + 0.85) / 3, 4)
  assert line['adherence_heldout_worst'] == 0.6 and line['adherence_heldout_range'] == 0.25
  assert line['fd_matched_over_floor_worst'] == 2.0  # FD 10 over the floor 5 at n 20 < 359
  # Seed 1 misses the target, so the recipe does not meet it, though two seeds of three do.
  assert not line['per_seed']['1']['target_met'] and line['per_seed']['0']['target_met']
  assert line['target_met_seeds'] == 2 and line['target_met'] is False
  # --reuse reads every seed's eval.json and trains nothing.
  (tmp_path / 'train_calls').unlink()
  proc = run(tmp_path / 'runs', '--num=20', '--seeds=0,1,2', '--reuse')
  assert proc.returncode == 0 and not (tmp_path / 'train_calls').exists(), proc.stderr[-2000:]
  assert json.loads(proc.stdout.splitlines()[-1])['adherence_heldout_worst'] == 0.6
  # Bad seeds and a grid of several runs are one line each, before any training.
  for args, message in (
    (['--seeds=0,x'], "error: --seeds: 'x' is not a whole number >= 0"),
    (['--seeds=1,1'], 'error: --seeds 1,1 names a seed twice'),
    (['--seeds=0,1', f'--grid={tmp_path / "g.png"}'], 'error: --grid shows one run'),
  ):
    proc = run(tmp_path / 'bad', '--num=20', *args)
    assert proc.returncode == 2 and proc.stderr.startswith(message), proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1 and not proc.stdout.strip()
    assert not (tmp_path / 'train_calls').exists() and not (tmp_path / 'bad').exists()
  # A folder that holds another seed's run: train.py resumed it (with a warning) and the line
  # carried its numbers under the seed asked for. Refused before any training.
  for workdir, seeds in ((tmp_path / 'one', '--seeds=1'), (tmp_path / 'runs', '--seeds=0,1')):
    config = workdir / ('seed_1' if workdir.name == 'runs' else '') / 'checkpoints/4/config'
    config.mkdir(parents=True, exist_ok=True)
    (config / 'metadata').write_text(json.dumps({'seed': 3}))
    proc = run(workdir, '--num=20', seeds)
    assert proc.returncode == 2 and not (tmp_path / 'train_calls').exists(), proc.stderr[-2000:]
    assert proc.stderr.startswith(
      f'error: {config.parents[2]} holds a run trained with seed 3, not 1: pass '
      '--seeds=3 to read or resume it'
    ), proc.stderr[-2000:]
  proc = run(tmp_path / 'one', '--num=20', '--seeds=3')  # its own seed: resumed
  assert proc.returncode == 0 and json.loads(proc.stdout.splitlines()[-1])['resumed'] is True


@pytest.mark.smoke
def test_bench_cpu_conv_reports_cores_per_shape():
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  run = functools.partial(
    subprocess.run,
    cwd=REPO_ROOT,
    env={**env, 'JAX_PLATFORMS': 'cpu'},
    capture_output=True,
    text=True,
    timeout=300,
  )
  proc = run(
    [sys.executable, 'bench/cpu_conv.py', '--shapes=8x4x8,4x8x4', '--batch=2', '--calls=2']
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('{')]
  assert len(lines) == 1, proc.stdout
  result = json.loads(lines[0])
  assert result['backend'] == 'cpu' and result['batch'] == 2
  assert [p['shape'] for p in result['points']] == ['8x4x8', '4x8x4']
  first = result['points'][0]
  assert first['gflop_forward'] == round(2 * 2 * 8 * 8 * 9 * 4 * 8 / 1e9, 3)
  assert first['model_folds'] is False  # 8 wide, 8 channels: the U-Net keeps it plain
  for timings in (first, first['folded']):  # plain, and image pairs side by side
    for part in ('forward', 'gradients'):
      assert timings[part]['wall_ms'] > 0 and timings[part]['cpu_ms'] >= 0
      ratio = timings[part]['cpu_ms'] / timings[part]['wall_ms']  # both rounded to 1 us
      assert timings[part]['cores'] == pytest.approx(ratio, rel=0.1, abs=0.05)
  odd = run([sys.executable, 'bench/cpu_conv.py', '--shapes=4x2x2', '--batch=1', '--calls=1'])
  assert (
    odd.returncode == 0 and 'folded' not in json.loads(odd.stdout.splitlines()[-1])['points'][0]
  )
  bad = run([sys.executable, 'bench/cpu_conv.py', '--shapes=64x64'])
  assert bad.returncode == 2 and 'HxCinxCout' in bad.stderr


@pytest.mark.unit
def test_accelerator_sh_writes_one_json_line_per_point_and_goes_on_after_a_failure(tmp_path):
  # The GPU session's driver, with a stand-in for python: one point prints its JSON line, one
  # fails with quotes, a backslash, a tab, an escape code and a non-ASCII dash in its stderr (the
  # error line must still be JSON), and the set goes on; an unknown point number is refused before any runs.
  fake = tmp_path / 'python'
  fake.write_text(
    '#!/bin/sh\n'
    'case "$*" in *batch=128*) printf \'bad "x" \\\\ y\\tz\\033[0m \u2014 ok\\n\' >&2; exit 3;; esac\n'
    'echo "warming up"\n'
    'echo \'{"img_per_s": 1.0}\'\n'
  )
  out = tmp_path / 'out'
  # Run through sh, not as an executable file: a temporary folder may be mounted noexec.
  env = {**os.environ, 'PY': f'sh {fake}', 'CACHE': str(tmp_path / 'cache'), 'DEADLINE': '600'}

  def run(points, *args, **more_env):
    return subprocess.run(
      ['bash', 'bench/accelerator.sh', str(out), *args],
      cwd=REPO_ROOT,
      env={**env, 'POINTS': points, **more_env} if points else {**env, **more_env},
      capture_output=True,
      text=True,
      timeout=120,
    )

  proc = run('2 1')
  assert proc.returncode == 0, proc.stderr
  lines = [json.loads(ln) for ln in (out / 'unet.jsonl').read_text().splitlines()]
  assert lines[1] == {'img_per_s': 1.0}
  assert lines[0]['point'] == 2 and '--batch=128' in lines[0]['args']
  assert lines[0]['error'].startswith('exit 3: bad  x  / y z[0m  ok'), lines[0]
  assert 'bad' in (out / 'errors.log').read_text()
  proc = run('1 14')
  assert proc.returncode == 2
  assert "point '14' in POINTS does not exist; give numbers 0-13" in proc.stderr
  for first in ('14', 'x'):
    proc = run(None, first)
    assert proc.returncode == 2 and f"FIRST_POINT '{first}' does not exist" in proc.stderr
  assert len((out / 'unet.jsonl').read_text().splitlines()) == 2  # nothing ran
  # The whole set from point 0 starts with a fresh compilation cache; with 100 s left, the
  # small64 points run and each base64 point (which needs 150 s or more) is skipped, one line
  # each, instead of being started to run out.
  (tmp_path / 'cache').mkdir()
  (tmp_path / 'cache' / 'stale_entry').write_text('x')
  (out / 'unet.jsonl').unlink()
  proc = run(None, '0', DEADLINE='100')
  assert proc.returncode == 0, proc.stderr
  assert not (tmp_path / 'cache').exists()
  lines = [json.loads(ln) for ln in (out / 'unet.jsonl').read_text().splitlines()]
  assert len(lines) == 14 and lines[0] == lines[1] == {'img_per_s': 1.0}
  assert all(ln['error'].startswith('skipped: ') for ln in lines[3:]), lines[3:]
  assert [ln['point'] for ln in lines[3:]] == list(range(3, 14))


@pytest.mark.unit
def test_accelerator_sh_reads_paths_from_the_callers_folder_and_refuses_bad_settings(tmp_path):
  # OUT_DIR and CACHE were read after the cd to the repository: a relative OUT_DIR wrote into
  # the repository, and CACHE=cache with point 0 ran rm -rf on the repository's own cache/.
  # The names are unique, so that the script of before this fix harms nothing in the repository.
  fake = tmp_path / 'python'
  fake.write_text('#!/bin/sh\necho \'{"img_per_s": 1.0}\'\n')
  caller = tmp_path / 'caller'
  (caller / f'cache_{tmp_path.name}').mkdir(parents=True)
  (caller / f'cache_{tmp_path.name}' / 'stale_entry').write_text('x')
  out_name, cache_name = f'out_{tmp_path.name}', f'cache_{tmp_path.name}'
  env = {**os.environ, 'PY': f'sh {fake}', 'DEADLINE': '600', 'POINTS': '2'}

  def run(**more_env):
    return subprocess.run(
      ['bash', str(REPO_ROOT / 'bench' / 'accelerator.sh'), out_name],
      cwd=caller,
      env={**env, **more_env},
      capture_output=True,
      text=True,
      timeout=120,
    )

  try:
    proc = run(CACHE=cache_name, POINTS='0 2')
    assert proc.returncode == 0, proc.stderr
    assert not (REPO_ROOT / out_name).exists()
    assert len((caller / out_name / 'unet.jsonl').read_text().splitlines()) == 2
    assert not (caller / cache_name).exists()  # the caller's, deleted by point 0
    (caller / out_name / 'unet.jsonl').unlink()
    # Each bad setting is one line and exit 2 before any point runs (DEADLINE=10m ran no point
    # and exited 0; DEADLINE=abc ended in 'unbound variable').
    for more_env, message in [
      ({'DEADLINE': '10m'}, "DEADLINE '10m' is not a whole number of seconds"),
      ({'DEADLINE': 'abc'}, "DEADLINE 'abc' is not a whole number of seconds"),
      ({'PROFILE_STEPS': 'x'}, "PROFILE_STEPS 'x' is not a whole number"),
      ({'SAMPLE_STEPS': '-2'}, "SAMPLE_STEPS '-2' is not a whole number"),
      ({'TRACE_POINTS': '2 99'}, "point '99' in TRACE_POINTS does not exist"),
      # Point 0 deletes CACHE: never the repository, a folder in it or one above it.
      ({'CACHE': str(REPO_ROOT / cache_name)}, f"CACHE '{REPO_ROOT / cache_name}' is the"),
      ({'CACHE': str(REPO_ROOT)}, f"CACHE '{REPO_ROOT}' is the repository"),
      ({'CACHE': str(REPO_ROOT.parent)}, f"CACHE '{REPO_ROOT.parent}' is the repository"),
    ]:
      proc = run(**more_env)
      assert proc.returncode == 2 and message in proc.stderr, (more_env, proc.stderr)
      assert len(proc.stderr.strip().splitlines()) == 1 and not proc.stdout.strip(), proc.stderr
    assert not (caller / out_name / 'unet.jsonl').exists()  # nothing ran
  finally:
    shutil.rmtree(REPO_ROOT / out_name, ignore_errors=True)  # written by the script before


def test_layout_resume_paths_are_the_callers_and_other_folders_are_kept(tmp_path, monkeypatch):
  # train.py runs in the repository: a relative --workdir removed the caller's lr/straight (with
  # whatever it held) and then trained into the repository's lr/.
  import importlib.util

  spec = importlib.util.spec_from_file_location(
    'layout_resume', REPO_ROOT / 'bench' / 'layout_resume.py'
  )
  layout_resume = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(layout_resume)
  monkeypatch.chdir(tmp_path)
  (tmp_path / 'configs').mkdir()
  (tmp_path / 'configs' / 'mine.py').write_text('')
  args, _ = layout_resume.parse_args(['--workdir', 'lr', '--config', 'configs/mine.py:tiny'])
  assert args.workdir == tmp_path / 'lr'
  assert args.config == f'{tmp_path / "configs" / "mine.py"}:tiny'
  args, _ = layout_resume.parse_args([])  # the repository's own config stays as given
  assert args.config == 'configs/base64.py:tiny'
  (tmp_path / 'lr' / 'straight').mkdir(parents=True)
  (tmp_path / 'lr' / 'straight' / 'keep.txt').write_text('mine')
  with pytest.raises(SystemExit):
    layout_resume.parse_args(['--workdir', 'lr'])
  assert (tmp_path / 'lr' / 'straight' / 'keep.txt').read_text() == 'mine'
