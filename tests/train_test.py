"""train.py through the real CLI on tiny configs: smoke per stage, exact resume after SIGTERM,
kill -9 during saves, NaN abort, model-mismatch refusal, device-count changes.

All runs share one persistent XLA compilation cache, so each distinct program compiles once.
"""

import json
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import REPO_ROOT, cli_env, logged_output, start_logged

pytestmark = [pytest.mark.smoke, pytest.mark.xdist_group('train')]


def run_folders(root) -> dict:
  """A test module's shared folders: runs under root, text and render caches."""
  return {
    'root': root,
    'text_cache': root / 'embeddings',
    'render_cache': root / 'openmoji',
  }


@pytest.fixture(scope='module')
def shared(tmp_path_factory):
  return run_folders(tmp_path_factory.mktemp('train'))


def train_cmd(shared, workdir, *overrides, config='configs/base64.py:tiny'):
  return [
    sys.executable,
    'train.py',
    f'--config={config}',
    f'--workdir={workdir}',
    f'--config.text.cache_dir={shared["text_cache"]}',
    f'--config.data.render_cache_dir={shared["render_cache"]}',
    *overrides,
  ]


def env_for(shared, devices=1):
  del shared  # every module shares one compilation cache
  return cli_env(devices)


def run(shared, workdir, *overrides, devices=1, config='configs/base64.py:tiny', check=True):
  proc = subprocess.run(
    train_cmd(shared, workdir, *overrides, config=config),
    cwd=REPO_ROOT,
    env=env_for(shared, devices),
    capture_output=True,
    text=True,
    timeout=900,
  )
  if check and proc.returncode != 0:
    raise AssertionError(f'train.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}')
  return proc


def losses(workdir) -> dict[int, float]:
  rows = [json.loads(line) for line in open(pathlib.Path(workdir) / 'metrics.jsonl')]
  return {r['step']: r['loss'] for r in rows}


def finished_steps(workdir) -> list[int]:
  ckpt = pathlib.Path(workdir) / 'checkpoints'
  return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())


CONSTANT_LR = ('--config.optim.schedule=constant',)


@pytest.fixture(scope='module')
def uninterrupted(shared):
  """6 steps straight through on one device: the reference losses."""
  workdir = shared['root'] / 'uninterrupted'
  run(shared, workdir, '--config.train.num_steps=6', *CONSTANT_LR)
  return workdir


def test_smoke_base_stage(uninterrupted):
  got = losses(uninterrupted)
  assert sorted(got) == [1, 2, 3, 4, 5, 6]
  assert all(np.isfinite(v) and v > 0 for v in got.values())
  assert finished_steps(uninterrupted) == [2, 4, 6]  # every 2 steps, keep 3
  assert list((uninterrupted / 'tensorboard').iterdir()), 'no TensorBoard event files'
  saved = json.load(open(uninterrupted / 'checkpoints' / '6' / 'config' / 'metadata'))
  assert saved['model']['dim'] == 16 and saved['stage'] == 'base64'
  # Throughput: analytic model FLOPs per device; CPU has no peak in the table, so no MFU/HFU.
  rows = [json.loads(line) for line in open(uninterrupted / 'metrics.jsonl')]
  assert all(r['model_tflops_per_device'] > 0 for r in rows if 'img_per_s' in r)
  assert not any('mfu' in r or 'hfu' in r or 'tflops_per_device' in r for r in rows)


def test_step_flops_mfu_and_hfu():
  from imagen_jax import flops, train_lib

  step = train_lib.StepFlops(model=3e15, hardware=4e15, num_devices=2, peak=1e15)
  got = step.scalars(steps=4, seconds=2.0)  # 6e15 model FLOP/s per device
  assert got == pytest.approx({'model_tflops_per_device': 3000.0, 'mfu': 3.0, 'hfu': 4.0})
  assert 'hfu' not in train_lib.StepFlops(3e15, None, 2, 1e15).scalars(4, 2.0)  # remat off
  assert train_lib.StepFlops(3e15, 4e15, 2, None).scalars(4, 2.0) == {
    'model_tflops_per_device': pytest.approx(3000.0)
  }  # unknown device: no guess
  assert flops.peak_flops('NVIDIA H100 PCIe') == 756e12  # the table train_lib now uses


def test_sigterm_saves_and_resume_is_bitwise_identical(shared, uninterrupted):
  workdir = shared['root'] / 'interrupted'
  proc = start_logged(  # to files: the test reads no pipe while it waits for the metrics
    train_cmd(
      shared,
      workdir,
      '--config.train.num_steps=100000',
      '--config.train.checkpoint_every=1000',
      *CONSTANT_LR,
    ),
    shared['root'] / 'logs',
    cwd=REPO_ROOT,
    env=env_for(shared),
  )
  metrics = workdir / 'metrics.jsonl'
  deadline = time.time() + 600
  while time.time() < deadline and not (
    metrics.exists() and len(metrics.read_text().splitlines()) >= 2
  ):
    assert proc.poll() is None, logged_output(proc)[1][-3000:]
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  proc.wait(timeout=300)
  stdout, stderr = logged_output(proc)
  assert proc.returncode == 75, stderr[-3000:]  # stopped early, resumable (not 'done')
  assert 'SIGTERM' in stderr
  stopped_at = finished_steps(workdir)[-1]
  assert stopped_at >= 2 and stopped_at == max(losses(workdir))
  assert f'stopped at step {stopped_at} (SIGTERM)' in stdout + stderr
  assert 'resume with the same command' in stdout + stderr

  # Resume to 6 steps (num_steps changed back; with a constant schedule that changes nothing
  # else), or to 2 past the stop where a fast machine ran past step 5 before the signal landed:
  # then a second uninterrupted run of that length is the reference, so the check never skips.
  total = max(6, stopped_at + 2)
  proc = run(shared, workdir, f'--config.train.num_steps={total}', *CONSTANT_LR)
  # The uninterrupted run compiled this step into the suite's cache: a second start loads it.
  assert 'Train step loaded from the persistent compilation cache in' in proc.stderr
  assert f'Resumed from step {stopped_at}' in proc.stdout + proc.stderr
  if total > 6:
    uninterrupted = shared['root'] / f'uninterrupted_{total}'
    run(shared, uninterrupted, f'--config.train.num_steps={total}', *CONSTANT_LR)
  resumed, reference = losses(workdir), losses(uninterrupted)
  assert sorted(resumed) == list(range(1, total + 1))
  # Exact by construction: same machine, same device count, same compiled step, restored bytes
  # and RNG; XLA:CPU is deterministic run to run (on GPU this needs --xla_gpu_deterministic_ops).
  assert [resumed[s] for s in range(1, total + 1)] == [reference[s] for s in range(1, total + 1)]


def test_a_stop_signal_during_the_last_step_ends_the_run_as_done(shared):
  # SIGTERM while the only step compiles (no compilation cache: seconds) used to exit 75,
  # "resume with the same command", for a run with nothing left to train, and skipped the
  # last step's grid and evaluation. The run now ends as it would: step 1 saved, exit 0.
  workdir = shared['root'] / 'last_step'
  env = {k: v for k, v in env_for(shared).items() if k != 'JAX_COMPILATION_CACHE_DIR'}
  proc = start_logged(  # no cache: the suite's shared one would load the step in a blink
    train_cmd(shared, workdir, '--config.train.num_steps=1', '--compilation_cache=', *CONSTANT_LR),
    shared['root'] / 'logs',
    cwd=REPO_ROOT,
    env=env,
  )
  deadline = time.time() + 600
  while time.time() < deadline and 'train base64' not in logged_output(proc)[1]:  # the loop
    assert proc.poll() is None, logged_output(proc)[1][-3000:]
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  proc.wait(timeout=300)
  stdout, stderr = logged_output(proc)
  assert proc.returncode == 0, stderr[-3000:]
  assert 'SIGTERM received' in stderr and 'done: step 1, loss' in stdout
  assert finished_steps(workdir) == [1]


def test_a_sigterm_outside_the_loop_exits_75_with_its_line(shared):
  # Before the loop (here while its own text cache is built, the encoder compiling without a
  # compilation cache) a SIGTERM ended train.py with no line and exit 143, which schedulers take
  # for a failure, and a stop during a compile could crash the interpreter's shutdown (SIGSEGV,
  # 139) after the line.
  workdir = shared['root'] / 'sigterm_in_setup'
  env = {k: v for k, v in env_for(shared).items() if k != 'JAX_COMPILATION_CACHE_DIR'}
  args = ['--config.train.num_steps=2', *CONSTANT_LR]
  proc = start_logged(
    train_cmd(shared, workdir, *args, '--compilation_cache=', '--config.text.cache_dir=cache'),
    shared['root'] / 'logs',
    cwd=REPO_ROOT,
    env=env,
  )
  deadline = time.time() + 600
  while time.time() < deadline and 'Embedding cache' not in logged_output(proc)[1]:
    assert proc.poll() is None, logged_output(proc)[1][-3000:]
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  proc.wait(timeout=300)
  _, stderr = logged_output(proc)
  assert proc.returncode == 75 and 'Traceback' not in stderr, stderr[-3000:]
  assert 'stopped (SIGTERM) outside the training loop, with no new step to save; ' in stderr
  assert 'the same command starts afresh' in stderr or 'the same command resumes' in stderr
  assert not (workdir / 'checkpoints').exists() or finished_steps(workdir) == []
  run(shared, workdir, *args)  # then trains (with the suite's text cache, to save the time)
  assert finished_steps(workdir)[-1] == 2


def test_a_grid_the_run_stopped_before_is_made_at_resume(shared):
  # A kill -9 after step 4's checkpoint was saved but before its grid was written: the rerun
  # went on from step 5 (here: reported the run done) and step 4's grid was never made. Its
  # file gone stands for that kill.
  workdir = shared['root'] / 'grid_catch_up'
  args = ['--config.train.num_steps=4', '--config.train.sample_every=2', '--config.sample.steps=2']
  run(shared, workdir, *args, *CONSTANT_LR)
  grid = workdir / 'samples' / 'step_00000004.png'
  made = grid.read_bytes()
  grid.unlink()
  proc = run(shared, workdir, *args, *CONSTANT_LR)
  assert 'Making the sample grid of step 4, which the run stopped before' in proc.stderr
  assert grid.read_bytes() == made  # the same EMA, the same grid
  assert 'done: step 4 (already finished)' in proc.stdout
  proc = run(shared, workdir, *args, *CONSTANT_LR)  # present now: not made again
  assert 'Making the sample grid' not in proc.stderr


def test_resume_on_a_different_device_count(shared, uninterrupted):
  workdir = shared['root'] / 'reshard'
  run(shared, workdir, '--config.train.num_steps=4', *CONSTANT_LR)
  run(shared, workdir, '--config.train.num_steps=6', *CONSTANT_LR, devices=4)
  got, reference = losses(workdir), losses(uninterrupted)
  assert sorted(got) == [1, 2, 3, 4, 5, 6]
  # Same data, same RNG; only the reduction order differs across 4 devices: f32 losses ~0.5
  # differ by 1 ulp (measured 3e-8). rtol 1e-4 leaves > 1000x (Adam's sign-like first steps
  # keep rounding noise small); the old 2e-3 would hide a wrong gradient all-reduce.
  np.testing.assert_allclose([got[5], got[6]], [reference[5], reference[6]], rtol=1e-4)


def test_resume_with_other_data_workers(shared, uninterrupted):
  # data.num_workers is a throughput setting: a resume may change it (threads -> 2 worker
  # processes here). The data position carries over exactly, so the losses are the
  # uninterrupted run's to the bit (same machine, same compiled step).
  workdir = shared['root'] / 'workers'
  run(shared, workdir, '--config.train.num_steps=2', *CONSTANT_LR)
  proc = run(
    shared, workdir, '--config.train.num_steps=6', '--config.data.num_workers=2', *CONSTANT_LR
  )
  assert 'Data position carried over from data.num_workers=0 to 2 (element 8)' in proc.stderr
  got, reference = losses(workdir), losses(uninterrupted)
  assert sorted(got) == [1, 2, 3, 4, 5, 6]
  assert [got[s] for s in range(1, 7)] == [reference[s] for s in range(1, 7)]


def test_resume_on_other_data_warns(shared, uninterrupted):
  # The saved data position is a position in one dataset listing: resuming on another (here 24
  # examples instead of 32) says so, since the position now points into another shuffle.
  workdir = shared['root'] / 'other_data'
  shutil.copytree(uninterrupted, workdir)
  saved = json.loads((workdir / 'checkpoints' / '6' / 'data' / 'metadata').read_text())
  assert len(saved['dataset_fingerprint']) == 16
  proc = run(shared, workdir, '--config.train.num_steps=7', '--config.data.max_examples=24')
  assert 'The dataset changed since this checkpoint (fingerprint ' in proc.stderr
  proc = run(shared, workdir, '--config.train.num_steps=8', '--config.data.max_examples=24')
  assert 'The dataset changed' not in proc.stderr


def test_four_devices_match_one_device(shared, uninterrupted):
  workdir = shared['root'] / 'four'
  proc = run(shared, workdir, '--config.train.num_steps=6', *CONSTANT_LR, devices=4)
  # The compiled step's memory is logged (imagen_jax.device_memory): on CPU, the four devices'
  # outputs and temporaries against the host memory available.
  line = re.search(r'Train step memory \(text length \d+\): per device .*', proc.stderr)
  assert line and 'of temporaries;' in line.group(0) and 'available.' in line.group(0), line
  got, reference = losses(workdir), losses(uninterrupted)
  # f32 reductions in a different order over 6 steps of Adam at lr 1e-3: losses ~0.5 differ by
  # 1 ulp (measured 3e-8); rtol 1e-4 leaves > 1000x (was 2e-3, loose enough to hide a bug).
  np.testing.assert_allclose(
    [got[s] for s in range(1, 7)], [reference[s] for s in range(1, 7)], rtol=1e-4
  )


def test_conv_kernel_layout_trains_and_resumes_like_row_major(shared, uninterrupted):
  """train.state_layout=conv_ohwi (what 'auto' is on GPU) on CPU, through bench/layout_resume.py
  (the check a GPU session runs with 'auto'): the step runs on kernels, EMA and moments stored
  [O, kh, kw, I]; checkpoints hold logical values, so a run switches layouts at a resume in
  either direction, and the losses are the row-major run's. Its first part also draws a sample
  grid from the EMA in that layout."""
  proc = subprocess.run(
    [
      sys.executable,
      'bench/layout_resume.py',
      '--layout=conv_ohwi',
      f'--workdir={shared["root"] / "layout_resume"}',
      '--tolerance=1e-4',
      '--',
      f'--config.text.cache_dir={shared["text_cache"]}',
      f'--config.data.render_cache_dir={shared["render_cache"]}',
    ],
    cwd=REPO_ROOT,
    env=env_for(shared),
    capture_output=True,
    text=True,
    timeout=1800,
  )
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
  lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('{')]
  assert len(lines) == 1, proc.stdout
  result = json.loads(lines[0])
  assert result['layouts'] == ['conv_ohwi', 'default', 'conv_ohwi'] and result['steps'] == 6
  assert result['ok'] and result['grid_written'] and not result['missing_steps']
  reference = losses(uninterrupted)
  # The same f32 math with kernels read in another order: equal to every bit on this CPU;
  # rtol 1e-4 leaves room for another CPU's convolution order, while a kernel restored or
  # relaid transposed would change the losses at O(0.1).
  np.testing.assert_allclose(
    result['losses_switched'], [reference[s] for s in range(1, 7)], rtol=1e-4
  )
  np.testing.assert_allclose(
    result['losses_straight'], [reference[s] for s in range(1, 7)], rtol=1e-4
  )


def test_fsdp_run_saves_and_matches_one_device(shared, uninterrupted):
  """2 devices with mesh.fsdp=2 (parameters split over both) and the GPU's kernel layout: the
  checkpoint checksums of split arrays are collectives, which, dispatched back to back, ran in
  different orders on XLA:CPU's two devices and aborted the run at its first save (all-reduce
  rendezvous timeout) in 5 of 6 tries before `checkpoints.array_checksums` finished each first."""
  workdir = shared['root'] / 'fsdp'
  run(
    shared,
    workdir,
    '--config.train.num_steps=4',
    '--config.mesh.fsdp=2',
    '--config.train.state_layout=conv_ohwi',
    *CONSTANT_LR,
    devices=2,
  )
  assert finished_steps(workdir) == [2, 4]
  got, reference = losses(workdir), losses(uninterrupted)
  # Other reduction order across the two devices (as test_four_devices_match_one_device).
  np.testing.assert_allclose(
    [got[s] for s in range(1, 5)], [reference[s] for s in range(1, 5)], rtol=1e-4
  )


def test_resume_with_different_model_is_refused(shared, uninterrupted):
  workdir = shared['root'] / 'mismatch'
  run(shared, workdir, '--config.train.num_steps=2', *CONSTANT_LR)
  proc = run(
    shared,
    workdir,
    '--config.train.num_steps=4',
    '--config.model.dim=24',
    *CONSTANT_LR,
    check=False,
  )
  assert proc.returncode != 0
  assert 'model.dim: 16 -> 24' in proc.stderr
  assert finished_steps(workdir) == [2]


def test_nan_loss_aborts_without_checkpoint(shared):
  workdir = shared['root'] / 'nan'
  proc = run(
    shared,
    workdir,
    '--config.train.num_steps=8',
    '--config.optim.lr=1e30',
    '--config.optim.grad_clip=0',
    '--config.train.checkpoint_every=1',
    *CONSTANT_LR,
    check=False,
  )
  assert proc.returncode != 0
  assert 'Non-finite' in proc.stderr and 'at step' in proc.stderr
  bad_step = int(re.search(r'at step (\d+)', proc.stderr).group(1))
  assert all(s < bad_step for s in finished_steps(workdir))


def test_kill_9_never_leaves_a_bad_latest_checkpoint(shared, uninterrupted):
  workdir = shared['root'] / 'killed'
  proc = subprocess.Popen(
    train_cmd(
      shared,
      workdir,
      '--config.train.num_steps=100000',
      '--config.train.checkpoint_every=1',
      *CONSTANT_LR,
    ),
    cwd=REPO_ROOT,
    env=env_for(shared),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  ckpt = workdir / 'checkpoints'
  deadline = time.time() + 600
  while time.time() < deadline and not (ckpt.exists() and len(finished_steps(workdir)) >= 2):
    assert proc.poll() is None
    time.sleep(0.01)
  proc.kill()  # SIGKILL, likely in the middle of an async save
  proc.wait()
  # A half-written save of a later step, as a kill leaves it.
  (ckpt / '999.orbax-checkpoint-tmp-1234').mkdir()
  latest = finished_steps(workdir)[-1]
  assert latest < 999
  run(shared, workdir, f'--config.train.num_steps={latest + 1}', *CONSTANT_LR)
  assert finished_steps(workdir)[-1] == latest + 1
  assert not any('tmp' in p.name for p in ckpt.iterdir()), sorted(p.name for p in ckpt.iterdir())
  reference = losses(uninterrupted)
  if latest + 1 in reference:  # the restored state and data continue the same run exactly
    # Exact: same machine and device count, same compiled step, restored bytes (as above).
    assert losses(workdir)[latest + 1] == reference[latest + 1]
  # Steps logged after the last checkpoint and re-run after the kill appear once.
  logged = [json.loads(line)['step'] for line in open(workdir / 'metrics.jsonl')]
  assert len(logged) == len(set(logged)), logged


@pytest.mark.parametrize('config', ['configs/sr256.py:tiny', 'configs/sr1024.py:tiny'])
def test_smoke_sr_stages(shared, config):
  workdir = shared['root'] / config.split('/')[1].replace(':', '_')
  run(shared, workdir, '--config.train.num_steps=2', config=config)
  got = losses(workdir)
  assert sorted(got) == [1, 2] and all(np.isfinite(v) for v in got.values())
  assert finished_steps(workdir) == [2]


def test_step_flops_from_the_batch_shapes():
  from configs import base64
  from imagen_jax import flops, stage, train_lib

  config = base64.get_config('tiny')
  batch = {'image': np.zeros((4, 16, 16, 3)), 'text_embs': np.zeros((4, 8, 1))}
  got = train_lib.step_flops(config, batch)
  count = flops.unet_flops(stage.model_config(config), batch=4, resolution=16, text_len=8)
  assert got.model == count.train > 0
  assert got.peak is None  # CPU
  config.model.remat = True
  remat = train_lib.step_flops(config, batch)
  assert remat.model == got.model and remat.hardware > remat.model


def test_workdirs_that_cannot_hold_a_run_are_refused_before_it_starts(tmp_path, monkeypatch):
  # Each of these trained: a URL became a local 'gs:/...' folder and failed at the first save;
  # '[' or '\' in the path saved checkpoints that orbax could not read back ('damaged' on every
  # resume); a run's checkpoints folder got a fresh run inside it.
  from imagen_jax import train_lib

  monkeypatch.chdir(tmp_path)  # where a URL's 'gs:' folder went
  run = tmp_path / 'run'
  (run / 'checkpoints' / '4').mkdir(parents=True)
  for workdir, message in [
    ('gs://bucket/runs/base64', r'is a URL; .* mount the bucket'),
    (str(tmp_path / 'sweep[lr=1e-3]'), r'holds \[ \]: checkpoints saved under such a path'),
    (str(tmp_path / 'a\\b'), r'holds \\: checkpoints saved'),
    (str(run / 'checkpoints'), rf'holds checkpoint steps \[4\]: .* Pass the run folder, {run}\.'),
  ]:
    with pytest.raises(train_lib.TrainingError, match=message):
      train_lib._prepare_workdir(workdir)
  assert not (tmp_path / 'sweep[lr=1e-3]').exists()
  # train.resume_step=N with a mistyped --workdir: refused before the folder (and, in train.py,
  # the text cache) is made.
  for missing in (tmp_path / 'rnu', tmp_path / 'sweep=lr,1e-3'):
    with pytest.raises(train_lib.TrainingError, match=r'resume_step=4 but .*: check --workdir'):
      train_lib._prepare_workdir(str(missing), resume_step=4)
    assert not missing.exists()
  assert train_lib._prepare_workdir(str(run), resume_step=4) == run
  assert train_lib._prepare_workdir(str(run)) == run  # the run folder itself is fine
  assert train_lib._prepare_workdir(str(tmp_path / 'sweep=lr,1e-3')).is_dir()


def test_a_failed_save_names_the_kept_checkpoints_or_says_there_are_none(tmp_path):
  from types import SimpleNamespace

  from imagen_jax import train_lib

  manager = SimpleNamespace(directory=tmp_path)
  full = OSError(28, 'No space left on device')
  line = str(train_lib._save_failed(manager, 2, full))
  assert line.startswith(f'Saving checkpoint step 2 to {tmp_path} failed (No space left on')
  # It read "The kept checkpoints (none) are intact; ... resume with the same command".
  assert 'No earlier checkpoint is kept' in line and 'starts from step 0' in line, line
  for name in ('2', '4', '6', '8.orbax-checkpoint-tmp-1'):  # 6 failed; 8 never finished
    (tmp_path / name).mkdir()
  line = str(train_lib._save_failed(manager, 6, full))
  assert 'The kept checkpoints [2, 4] are untouched (latest: step 4)' in line, line
  assert 'newest kept checkpoint that verifies' in line, line
