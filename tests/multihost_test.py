"""Two real processes (jax.distributed on CPU, gloo collectives, 2 fake devices each) against one
process with 4 devices: the same losses, checkpoints that move between the two layouts with the
exact data position, a SIGTERM to one process that stops both at the same step, sample grids.

Skipped where localhost TCP ports cannot be opened; runs in CI here.
"""

import json
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import (
  REPO_ROOT,
  cli_env,
  finish,
  free_port,
  logged_output,
  one_move_entropy_bits,
  start_logged,
)
from tests.train_test import (
  CONSTANT_LR,
  env_for,
  finished_steps,
  losses,
  run,
  run_folders,
  train_cmd,
)

pytestmark = [pytest.mark.smoke, pytest.mark.multiprocess, pytest.mark.xdist_group('multihost')]


@pytest.fixture(scope='module')
def shared(tmp_path_factory):
  return run_folders(tmp_path_factory.mktemp('multihost'))


def distributed_args(port: int, process_id: int) -> list[str]:
  return [
    '--distributed',
    f'--coordinator_address=127.0.0.1:{port}',
    '--num_processes=2',
    f'--process_id={process_id}',
    '--coordinator_timeout=120',
  ]


def start_process(
  shared, workdir, *overrides, port: int, process_id: int, config='configs/base64.py:tiny'
) -> subprocess.Popen:
  """train.py as process `process_id` of 2, 2 CPU devices each, coordinator on `port`."""
  return start_logged(
    train_cmd(shared, workdir, *overrides, config=config) + distributed_args(port, process_id),
    shared['root'] / 'logs',
    cwd=REPO_ROOT,
    env=env_for(shared, devices=2),
  )


def start_two(shared, workdir, *overrides):
  """Two train.py processes of one run; returns the Popen objects."""
  port = free_port()
  return [start_process(shared, workdir, *overrides, port=port, process_id=i) for i in range(2)]


def run_two(shared, workdir, *overrides):
  results = finish(start_two(shared, workdir, *overrides))
  for i, (rc, _, err) in enumerate(results):
    assert rc == 0, f'process {i} failed ({rc}):\n{err[-4000:]}'
  return results


@pytest.fixture(scope='module')
def reference(shared):
  """One process, 4 devices, 6 steps: the reference losses and checkpoints at 2, 4, 6."""
  workdir = shared['root'] / 'one_process'
  run(shared, workdir, '--config.train.num_steps=6', *CONSTANT_LR, devices=4)
  return workdir


# Tolerance: the same global batches, RNG and 4-device mesh; only the all-reduce differs (gloo
# across processes vs in-process), which reorders float32 sums: ~1e-7 relative per step.
RTOL = 1e-4


def test_two_processes_match_one_and_checkpoints_move_both_ways(shared, reference):
  two = shared['root'] / 'two_processes'
  run_two(shared, two, '--config.train.num_steps=4', '--config.train.sample_every=4', *CONSTANT_LR)
  got, ref = losses(two), losses(reference)
  assert sorted(got) == [1, 2, 3, 4]
  np.testing.assert_allclose(
    [got[s] for s in range(1, 5)], [ref[s] for s in range(1, 5)], rtol=RTOL
  )
  assert (two / 'samples' / 'step_00000004.png').exists()  # the grid, read on every host
  saved = json.load(open(two / 'checkpoints' / '4' / 'data' / 'metadata'))
  assert saved['process_count'] == 2 and len(saved['states']) == 2

  # 2 processes -> 1 process: steps 5 and 6 see the same data as the reference.
  run(shared, two, '--config.train.num_steps=6', *CONSTANT_LR, devices=4)
  got = losses(two)
  np.testing.assert_allclose([got[5], got[6]], [ref[5], ref[6]], rtol=RTOL)

  # 1 process -> 2 processes, from the reference's step 4, with the conv kernels stored as on
  # GPU (train.state_layout): each process verifies the restored row-major arrays' checksums,
  # relays them and saves step 6 from the other layout (multihost.compiled_together keys on it).
  back = shared['root'] / 'back_to_two'
  shutil.copytree(reference, back)
  shutil.rmtree(back / 'checkpoints' / '6')
  run_two(
    shared,
    back,
    '--config.train.num_steps=6',
    '--config.train.state_layout=conv_ohwi',
    *CONSTANT_LR,
  )
  assert finished_steps(back)[-1] == 6
  got = losses(back)
  np.testing.assert_allclose([got[5], got[6]], [ref[5], ref[6]], rtol=RTOL)


def test_sigterm_to_one_process_stops_both_at_the_same_step(shared):
  workdir = shared['root'] / 'preempted'
  procs = start_two(
    shared,
    workdir,
    '--config.train.num_steps=100000',
    '--config.train.checkpoint_every=1000',
    *CONSTANT_LR,
  )
  metrics = workdir / 'metrics.jsonl'
  deadline = time.time() + 600
  ended_early = None  # both processes' output, when one ends before the signal
  try:
    while time.time() < deadline and not (
      metrics.exists() and len(metrics.read_text().splitlines()) >= 2
    ):
      if any(p.poll() is not None for p in procs):
        ended_early = finish(procs, timeout=60)
        break
      time.sleep(0.1)
    else:
      procs[1].send_signal(signal.SIGTERM)  # only the second host is preempted
  except BaseException:
    finish(procs, timeout=1)
    raise
  assert ended_early is None, '\n'.join(
    f'process {i} ended early ({rc}):\n{err[:2000]}\n...\n{err[-3000:]}'
    for i, (rc, _, err) in enumerate(ended_early)
  )
  results = finish(procs, timeout=300)
  for rc, _, err in results:
    assert rc == 75, err[-3000:]
  stopped = [int(out.split('stopped at step ')[1].split()[0]) for _, out, _ in results]
  assert stopped[0] == stopped[1]  # both hosts saved the same step together
  assert finished_steps(workdir) == [stopped[0]]
  run(shared, workdir, f'--config.train.num_steps={stopped[0] + 1}', *CONSTANT_LR, devices=4)
  assert max(losses(workdir)) == stopped[0] + 1


def test_a_process_failing_alone_exits_at_once_with_its_line(shared, reference, tmp_path):
  del reference  # its run built the data both processes read
  # Process 0 alone cannot write its sample grid (samples/ is a file). It used to wait in JAX's
  # shutdown barrier for process 1, which waits in the next step's collective: both hung 300 s,
  # then aborted with a C++ stack dump. Then process 0 exited with its line and process 1 still
  # ended at JAX's heartbeat timeout (100 s, rc -6, no reason). Now process 1 ends with the line
  # too, within seconds.
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'samples').write_text('a file where the grids go')
  procs = start_two(
    shared,
    workdir,
    '--config.train.num_steps=100000',
    '--config.train.sample_every=2',
    '--config.sample.steps=2',
    *CONSTANT_LR,
  )
  deadline, failed_at, ended_at = time.time() + 600, None, [None, None]
  try:
    while time.time() < deadline and None in ended_at:
      if failed_at is None and 'error: ' in logged_output(procs[0])[1]:
        failed_at = time.time()
      for i, proc in enumerate(procs):
        if ended_at[i] is None and proc.poll() is not None:
          ended_at[i] = time.time()
      time.sleep(0.1)
    results = [(proc.poll(), logged_output(proc)[1]) for proc in procs]
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
    finish(procs, timeout=60)
  for i, (rc, err) in enumerate(results):
    assert rc == 1, f'process {i} ({rc}): {err[-3000:]}'
    errors = [line for line in err.splitlines() if line.startswith('error: ')]
    assert len(errors) == 1 and 'Traceback' not in err, err[-3000:]
    # not JAX's 300 s shutdown barrier (process 0) nor its 100 s heartbeat timeout (process 1)
    assert ended_at[i] - (failed_at or ended_at[i]) < 30, (i, ended_at[i] - failed_at)
  own, told = (line for (_, err) in results for line in err.splitlines() if 'error: ' in line)
  assert own.startswith(f'error: Cannot write {workdir / "samples"}'), own
  assert 'resume' in own
  assert told == own.replace('error: ', 'error: Process 0 of 2 failed, so this one stops too: ', 1)


# An entry point whose process 1 raises an unexpected exception (a stand-in for a bug) while the
# others wait in a collective that it will never join.
FAULTY_ENTRY_POINT = """
import numpy as np
from imagen_jax import cli

cli.define_distributed_flags()


def main(argv):
  cli.initialize_distributed()
  import jax
  from jax.experimental import multihost_utils

  if jax.process_index() == 1:
    raise RuntimeError('injected fault')
  multihost_utils.process_allgather(np.zeros(1))
  print('the collective returned')


cli.run(main)
"""


def test_an_unexpected_exception_in_one_of_three_processes_ends_all_with_its_line(tmp_path):
  # Before, the failing process printed its traceback and waited in JAX's shutdown barrier;
  # the others waited in the collective; all aborted after 100 s or more (rc -6, no reason).
  script = tmp_path / 'faulty.py'
  script.write_text(FAULTY_ENTRY_POINT)
  port, count = free_port(), 3
  started = time.time()
  procs = [
    start_logged(
      [sys.executable, str(script), '--distributed', f'--coordinator_address=127.0.0.1:{port}']
      + [f'--num_processes={count}', f'--process_id={i}', '--coordinator_timeout=120'],
      tmp_path / 'logs',
      cwd=REPO_ROOT,
      env={**cli_env(devices=1), 'PYTHONPATH': str(REPO_ROOT)},
    )
    for i in range(count)
  ]
  results = finish(procs, timeout=90)
  elapsed = time.time() - started
  own = (
    'error: RuntimeError: injected fault (unexpected; its traceback is in '
    "process 1's log, before this line)"
  )
  for i, (rc, out, err) in enumerate(results):
    errors = [line for line in err.splitlines() if line.startswith('error: ')]
    assert rc == 1 and errors, f'process {i} ({rc}): {err[-3000:]}'
    assert 'the collective returned' not in out
    if i == 1:
      assert "raise RuntimeError('injected fault')" in err  # the traceback, then the line
      assert errors == [own], err[-3000:]
    else:
      assert 'Traceback' not in err, err[-3000:]
      told = own.replace('error: ', 'error: Process 1 of 3 failed, so this one stops too: ', 1)
      assert errors == [told], err[-3000:]
  assert elapsed < 60, elapsed  # start-up included; JAX's heartbeat timeout alone is 100 s


def test_coordinator_that_never_comes_up(shared, tmp_path):
  env = env_for(shared, devices=2)
  proc = subprocess.run(
    train_cmd(shared, tmp_path / 'run')
    + [
      '--distributed',
      f'--coordinator_address=127.0.0.1:{free_port()}',
      '--num_processes=2',
      '--process_id=1',
      '--coordinator_timeout=3',
    ],
    cwd=REPO_ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 1 and 'no coordinator answered' in proc.stderr
  assert 'Traceback' not in proc.stderr


def test_processes_with_different_configs_are_refused(shared, tmp_path):
  port = free_port()
  procs = [
    start_process(shared, tmp_path / 'run', f'--config.optim.lr={lr}', port=port, process_id=i)
    for i, lr in enumerate(['1e-3', '2e-3'])
  ]
  for rc, _, err in finish(procs, timeout=300):
    assert rc == 1 and 'run a different config than process 0' in err, err[-2000:]
  assert not (tmp_path / 'run' / 'checkpoints').exists()


def test_resume_step_with_no_checkpoint_is_refused_on_both_processes(shared, reference, tmp_path):
  del reference  # its run built the data both processes read
  # One process refuses before it makes the folder; several check after the run lock, on every
  # process alike, with the same line.
  results = finish(start_two(shared, tmp_path / 'run', '--config.train.resume_step=4'), timeout=300)
  for rc, _, err in results:
    errors = [line for line in err.splitlines() if line.startswith('error: ')]
    assert rc == 1 and len(errors) == 1 and 'Traceback' not in err, err[-2000:]
    assert 'train.resume_step=4 but ' in errors[0], errors[0]
    assert 'holds no finished checkpoint' in errors[0], errors[0]
    assert errors[0].endswith('check --workdir.'), errors[0]


def test_sample_py_on_two_processes_writes_the_same_files(shared, reference, tmp_path):
  # Each process samples every other batch on its own two devices (a batch of 2 split over
  # them, the last one, of 1 image, on the first); the files equal one process's.
  args = ['--prompt=a red circle', '--num_images=5', '--batch_size=2']
  args += [f'--checkpoints={reference}', '--steps=2']

  def sample_cmd(out):
    return [sys.executable, 'sample.py', *args, f'--out={out}']

  one = subprocess.run(  # the same 2 local devices as each host (the text encoder uses them)
    sample_cmd(tmp_path / 'one'),
    cwd=REPO_ROOT,
    env=env_for(shared, devices=2),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert one.returncode == 0, one.stderr[-3000:]
  port = free_port()
  procs = [
    start_logged(
      sample_cmd(tmp_path / 'two') + distributed_args(port, i),
      tmp_path / 'logs',
      cwd=REPO_ROOT,
      env=env_for(shared, devices=2),
    )
    for i in range(2)
  ]
  results = finish(procs, timeout=600)
  for rc, _, err in results:
    assert rc == 0, err[-3000:]
  err0 = results[0][2]  # process 0 samples batches 1 and 3
  assert 'batch 1/3: sampled 2 images over 2 devices' in err0, err0[-3000:]
  assert 'batch 3/3: sampled 1 images on the first device' in err0, err0[-3000:]
  names = sorted(p.name for p in (tmp_path / 'one').iterdir() if p.suffix == '.png')
  assert len(names) == 6 and 'grid.png' in names  # 5 images + the grid
  for name in names:
    assert (tmp_path / 'two' / name).read_bytes() == (tmp_path / 'one' / name).read_bytes(), name


def test_sample_py_stopped_on_one_process_stops_both_at_once(shared, reference, tmp_path):
  # A SIGTERM to process 1 alone: it printed its 'stopped' line and exited normally, which waits in
  # JAX's shutdown barrier, while process 0 went on to the collective after its last batch; JAX
  # aborted both about 5 minutes later (rc 134, C++ stack dumps). Now both end within seconds,
  # exit 75, process 0 with process 1's line.
  args = ['--prompt=a red circle', '--num_images=400', '--batch_size=2', '--steps=2']
  args += [f'--checkpoints={reference}', f'--out={tmp_path / "out"}']
  port = free_port()
  procs = [
    start_logged(
      [sys.executable, 'sample.py', *args, *distributed_args(port, i)],
      tmp_path / 'logs',
      cwd=REPO_ROOT,
      env=env_for(shared, devices=2),
    )
    for i in range(2)
  ]
  deadline = time.time() + 600
  try:
    while 'batch 2/200' not in logged_output(procs[1])[1]:  # process 1 samples the even batches
      assert time.time() < deadline and all(p.poll() is None for p in procs), [
        logged_output(p)[1][-2000:] for p in procs
      ]
      time.sleep(0.1)
    procs[1].send_signal(signal.SIGTERM)
  except BaseException:
    finish(procs, timeout=1)
    raise
  results = finish(procs, timeout=120)
  for rc, _, err in results:
    assert rc == 75 and 'Aborted' not in err, err[-3000:]
  assert 'stopped (SIGTERM) before the last batch' in results[1][2], results[1][2][-2000:]
  assert 'Process 1 of 2 failed, so this one stops too: stopped (SIGTERM)' in results[0][2]


def flip_one_bit_per_data_file(workdir, step):
  """One flipped bit in each array data file of a checkpoint step, as bit rot leaves it."""
  root = workdir / 'checkpoints' / str(step) / 'state'
  files = [p for p in root.rglob('*') if p.is_file() and p.parent.name == 'd']
  assert files
  for path in files:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    path.write_bytes(bytes(raw))


def run_on_own_copies(shared, hosts, *overrides) -> list[tuple[int, str, str]]:
  """train.py as 2 processes, process i on its own run folder hosts[i] (hosts with local disks)."""
  port = free_port()
  procs = [
    start_process(shared, hosts[i], *overrides, *CONSTANT_LR, port=port, process_id=i)
    for i in range(2)
  ]
  return finish(procs, timeout=600)


@pytest.mark.parametrize('fsdp', [1, 4])
def test_a_checkpoint_damaged_on_one_host_only_is_passed_over_by_both(
  shared, reference, tmp_path, fsdp
):
  # Process 1's copy of step 6 has bit rot; process 0's is intact. Before, process 1 failed to
  # read it and fell back while process 0 resumed from step 6 and waited in orbax's closing
  # barrier for a peer that never came. Now both report step 6 as failed and resume from 4.
  # fsdp=4: the params span both processes, so verifying their checksums is a collective that
  # process 0 must not enter alone.
  hosts = [tmp_path / f'host{i}' for i in range(2)]
  for host in hosts:
    shutil.copytree(reference, host)
  flip_one_bit_per_data_file(hosts[1], 6)
  args = ['--config.train.num_steps=4', f'--config.mesh.fsdp={fsdp}']
  for i, (rc, out, err) in enumerate(run_on_own_copies(shared, hosts, *args)):
    assert rc == 0, f'process {i}: {err[-3000:]}'
    assert f'process 1: checkpoint step 6 ({hosts[1]}/checkpoints/6) does not load' in err
    assert 'Resumed from step 4' in err and 'Resumed from step 6' not in err
    assert 'done: step 4' in out
  if fsdp != 1:
    return

  # Process 1 no longer sees step 4 at all: both refuse, naming what each sees.
  shutil.rmtree(hosts[1] / 'checkpoints' / '4')
  for i, (rc, _, err) in enumerate(run_on_own_copies(shared, hosts, *args)):
    assert rc == 1, f'process {i}: {err[-3000:]}'
    assert 'The processes see different checkpoints' in err, err[-3000:]
    assert 'process 0: [2, 4]; process 1: [2, 6]' in err


def eval_rows(workdir) -> dict[int, dict]:
  rows = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  return {r['step']: {k: v for k, v in r.items() if k.startswith('eval/')} for r in rows}


def test_in_training_evaluation_on_two_processes_matches_one(shared, tmp_path):
  # train.eval_every on 2 processes x 2 devices: the same samples and scores as 1 x 4 (the
  # judge trained and cached by process 0 while process 1 waits). After 2 steps the model is at
  # chance: this checks that the processes sample and score what one process does, not quality,
  # so it trains the tiny U-Net on the digits (the other tests' programs, already compiled and
  # cached) rather than the digits recipe's 2.4M-parameter one (25 s per train-step compile).
  args = [
    '--config.data.source=digits',
    '--config.train.num_steps=2',
    '--config.train.eval_every=2',
    '--config.train.eval_num=20',
    f'--config.train.eval_judge_dir={shared["root"] / "judge"}',
    *CONSTANT_LR,
  ]
  one, two = tmp_path / 'one', tmp_path / 'two'
  port = free_port()
  procs = [start_process(shared, two, *args, port=port, process_id=i) for i in range(2)]
  for i, (rc, _, err) in enumerate(finish(procs, timeout=600)):
    assert rc == 0, f'process {i}: {err[-3000:]}'
  assert (shared['root'] / 'judge').is_dir()
  run(shared, one, *args, devices=4)
  got, ref = eval_rows(two)[2], eval_rows(one)[2]
  assert set(got) == set(ref) and {'eval/adherence', 'eval/fd'} <= set(got)
  for key, value in ref.items():
    # The images agree to float rounding (the all-reduce differs), so a judge's call near a tie
    # may flip: rates move by one image of 20 at most, the entropy by one move, as between one
    # and two devices in evaluate_test; the rest to float rounding.
    name = key.split('/', 1)[1]
    if name.startswith(('adherence', 'precision', 'recall')):
      tolerance = dict(rtol=0, atol=0.051)
    elif name == 'entropy_bits':
      tolerance = dict(rtol=0, atol=one_move_entropy_bits(20) + 1e-9)
    else:
      tolerance = dict(rtol=RTOL, atol=1e-6)
    np.testing.assert_allclose(got[key], value, err_msg=key, **tolerance)
