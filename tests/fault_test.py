"""Injected faults against train.py and the checkpoint layer: damaged checkpoints (flipped bytes,
truncated files, silent bit rot, a damaged config) fall back to the previous good step; NaN from
the update is never saved; read-only and full disks, bad workdirs and bad --config flags give one
line and a non-zero exit, losing nothing.
"""

import contextlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT, with_address_space_limit
from tests.train_test import (
  CONSTANT_LR,
  env_for,
  finished_steps,
  losses,
  run,
  run_folders,
  train_cmd,
)

pytestmark = [pytest.mark.smoke, pytest.mark.xdist_group('faults')]


@pytest.fixture(scope='module')
def shared(tmp_path_factory):
  return run_folders(tmp_path_factory.mktemp('faults'))


@pytest.fixture(scope='module')
def pristine(shared):
  """4 steps, checkpoints at 2 and 4: each test damages a copy of it."""
  workdir = shared['root'] / 'pristine'
  run(shared, workdir, '--config.train.num_steps=4', *CONSTANT_LR)
  assert finished_steps(workdir) == [2, 4]
  return workdir


def copy_run(pristine, dest) -> pathlib.Path:
  shutil.copytree(pristine, dest)
  return dest


def data_files(workdir, step) -> list[pathlib.Path]:
  """The array data files of a checkpoint step, largest first."""
  root = workdir / 'checkpoints' / str(step) / 'state'
  files = [p for p in root.rglob('*') if p.is_file() and p.parent.name == 'd']
  assert files, sorted(root.rglob('*'))
  return sorted(files, key=lambda p: -p.stat().st_size)


def error_lines(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if line.startswith('error:')]


def test_flipped_bytes_fall_back_to_previous_step(shared, pristine):
  workdir = copy_run(pristine, shared['root'] / 'flipped')
  for path in data_files(workdir, 4):  # one flipped bit per data file, as bit rot leaves it
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    path.write_bytes(bytes(raw))
  proc = run(shared, workdir, '--config.train.num_steps=6', *CONSTANT_LR)
  assert 'checkpoint step 4' in proc.stderr and str(workdir / 'checkpoints' / '4') in proc.stderr
  assert 'Falling back' in proc.stderr and 'Resumed from step 2' in proc.stderr
  assert (workdir / 'checkpoints_set_aside' / '4').is_dir()  # kept for inspection, not deleted
  assert finished_steps(workdir) == [2, 4, 6]
  # Steps 3 and 4 were re-run from the good step 2 exactly as the first time.
  got, reference = losses(workdir), losses(pristine)
  assert [got[3], got[4]] == [reference[3], reference[4]]
  assert sorted(got) == [1, 2, 3, 4, 5, 6]  # each step logged once


def test_truncated_file_and_damaged_config_fall_back(shared, pristine):
  workdir = copy_run(pristine, shared['root'] / 'truncated')
  largest = data_files(workdir, 4)[0]
  largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])
  proc = run(shared, workdir, '--config.train.num_steps=4', *CONSTANT_LR)
  assert 'checkpoint step 4' in proc.stderr and 'Resumed from step 2' in proc.stderr

  workdir = copy_run(pristine, shared['root'] / 'bad_config')
  config_file = workdir / 'checkpoints' / '4' / 'config' / 'metadata'
  config_file.write_text(config_file.read_text()[:40])  # cut mid-JSON
  proc = run(shared, workdir, '--config.train.num_steps=4', *CONSTANT_LR)
  assert 'checkpoint step 4' in proc.stderr and 'config does not load' in proc.stderr
  assert 'Resumed from step 2' in proc.stderr


def test_no_usable_checkpoint_is_one_line_and_writes_nothing(shared, pristine):
  workdir = copy_run(pristine, shared['root'] / 'all_bad')
  for step in (2, 4):
    for path in data_files(workdir, step):
      path.write_bytes(b'')
  before = sorted(p.name for p in (workdir / 'checkpoints').iterdir())
  proc = run(shared, workdir, '--config.train.num_steps=6', *CONSTANT_LR, check=False)
  assert proc.returncode == 1
  errors = error_lines(proc.stderr)
  assert errors and 'No usable checkpoint' in errors[0], proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr
  assert 'checkpoint step 4' in proc.stderr and 'checkpoint step 2' in proc.stderr
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == before
  # sample.py on it: one line too. Orbax's unfinished reads of the damaged arrays each printed
  # an 'Exception ignored in: <coroutine ...>' traceback with the TensorStore spec (hundreds).
  proc = subprocess.run(
    [sys.executable, 'sample.py', '--prompt=a', f'--checkpoints={workdir}', '--steps=2'],
    cwd=REPO_ROOT,
    env=env_for(shared),
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert proc.returncode == 2 and 'No usable checkpoint' in proc.stderr, proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr and 'Exception ignored' not in proc.stderr


def test_resume_step_picks_a_kept_checkpoint(shared, pristine):
  workdir = copy_run(pristine, shared['root'] / 'resume_step')
  proc = run(
    shared, workdir, '--config.train.num_steps=4', '--config.train.resume_step=3', check=False
  )
  assert proc.returncode == 1 and 'kept steps: [2, 4]' in proc.stderr
  assert 'Traceback' not in proc.stderr

  run(shared, workdir, '--config.train.num_steps=4', '--config.train.resume_step=2', *CONSTANT_LR)
  assert (workdir / 'checkpoints_set_aside' / '4').is_dir()
  assert finished_steps(workdir) == [2, 4]
  assert losses(workdir)[4] == losses(pristine)[4]
  # The same command again (e.g. after a SIGTERM) continues; it does not go back to step 2, also
  # where it logs or checkpoints at other intervals (what it trains is the same).
  proc = run(
    shared,
    workdir,
    '--config.train.num_steps=6',
    '--config.train.resume_step=2',
    '--config.train.log_every=2',
    '--config.train.keep_checkpoints=4',
    *CONSTANT_LR,
  )
  assert 'Already resumed from step 2' in proc.stderr
  assert finished_steps(workdir) == [2, 4, 6]
  assert sorted(p.name for p in (workdir / 'checkpoints_set_aside').iterdir()) == ['4']
  # Going back to step 2 again with another setting (a lower learning rate, as the NaN message
  # advises) is a new attempt: it goes back, setting the newer steps aside again.
  proc = run(
    shared,
    workdir,
    '--config.train.num_steps=4',
    '--config.train.resume_step=2',
    '--config.optim.lr=1e-5',
    *CONSTANT_LR,
  )
  assert 'Already resumed' not in proc.stderr and 'Resumed from step 2' in proc.stderr
  assert finished_steps(workdir) == [2, 4]
  assert losses(workdir)[4] != losses(pristine)[4]  # trained again at the lower rate
  assert (workdir / 'checkpoints_set_aside' / '6').is_dir()
  # The chosen step outlives retention: keep_checkpoints' newest saves deleted step 2 here, and
  # the next go-back found no step 2 ('not a kept checkpoint').
  run(
    shared,
    workdir,
    '--config.train.num_steps=8',
    '--config.train.resume_step=2',
    '--config.train.keep_checkpoints=1',
    '--config.optim.lr=2e-5',
    *CONSTANT_LR,
  )
  assert finished_steps(workdir) == [2, 8]


@pytest.mark.parametrize(
  ('user', 'every'),
  [
    ('grid', ('--config.train.checkpoint_every=2', '--config.train.sample_every=1')),
    ('save', ('--config.train.checkpoint_every=1', '--config.train.sample_every=0')),
  ],
)
def test_nan_from_the_update_stops_the_run_and_is_never_saved(shared, user, every):
  # Adam with eps=0 divides 0 by 0 for parameters whose gradient is exactly zero: the loss and
  # gradient norm are finite, the updated parameters are not. The train step checks only its
  # loss and gradient norm; the state is checked before it is sampled (`_Loop.check_state`, a
  # grid every step) or saved (`checkpoints.save`, every step), not only when its metrics are
  # logged (every fourth step here).
  workdir = shared['root'] / f'nan_update_{user}'
  proc = run(
    shared,
    workdir,
    '--config.train.num_steps=4',
    '--config.optim.eps=0',
    *every,
    '--config.train.log_every=4',
    *CONSTANT_LR,
    check=False,
  )
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert 'Non-finite state (NaN/Inf in the parameters' in proc.stderr, proc.stderr[-2000:]
  assert 'at step 1;' in proc.stderr and 'optim.eps' in proc.stderr
  ckpt = workdir / 'checkpoints'
  assert not ckpt.exists() or finished_steps(workdir) == []
  assert not list(workdir.glob('samples/*.png'))


def test_out_of_memory_is_one_line_with_the_fixes_and_keeps_the_checkpoints(shared, pristine):
  workdir = copy_run(pristine, shared['root'] / 'out_of_memory')
  cmd = train_cmd(
    shared, workdir, '--config.train.num_steps=6', '--config.train.batch_size=8192', *CONSTANT_LR
  )
  proc = subprocess.run(
    with_address_space_limit(cmd, 4),  # XLA's allocations past 4 GiB fail
    cwd=REPO_ROOT,
    env=env_for(shared),
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert proc.returncode == 1, proc.stderr[-3000:]
  # Warned when the step compiled (its 11 GB of temporaries against the 4 GB limit) ...
  assert 'more host memory' in proc.stderr and 'the system may end the process' in proc.stderr
  # ... then one line, with the fixes and the checkpoint the same command resumes from.
  (line,) = error_lines(proc.stderr)
  assert line.startswith('error: Out of memory (RESOURCE_EXHAUSTED: Out of memory allocating ')
  assert 'Lower train.batch_size' in line and 'Traceback' not in proc.stderr
  assert (
    f'resumes from the newest checkpoint in {workdir} that verifies (the newest is step 4)' in line
  )
  assert finished_steps(workdir) == [2, 4]
  assert losses(workdir) == losses(pristine)  # nothing of the failed step was logged


def test_optimizer_structure_change_is_named(shared, pristine):
  workdir = copy_run(pristine, shared['root'] / 'optim_change')
  proc = run(
    shared, workdir, '--config.train.num_steps=6', '--config.optim.grad_clip=0', check=False
  )
  assert proc.returncode == 1
  errors = error_lines(proc.stderr)
  assert errors and 'optim.grad_clip: 1.0 -> 0' in errors[0], proc.stderr[-2000:]
  assert finished_steps(workdir) == [2, 4]


def cli(args, cwd=REPO_ROOT, **kwargs):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run(
    [sys.executable, *args],
    cwd=cwd,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
    **kwargs,
  )


@pytest.mark.parametrize(
  'flags_, expected',
  [
    (['--config=configs/nope.py'], 'no such config file'),
    (['--config=configs/base64.py:nonsense'], "Unknown variant 'nonsense'"),
    (['--config=configs/base64.py:tiny', '--config.model.nonexistent=1'], "no field 'nonexistent'"),
    (['--config=configs/base64.py:tiny', '--config.model.dim=abc'], 'invalid literal'),
    # absl's space-separated form read as a missing --config, with a traceback in the line
    (['--config', 'configs/base64.py:nonsense'], "Unknown variant 'nonsense'"),
    (['--config', 'configs/base64.py:tiny', '--config.model.nope', '1'], "no field 'nope'"),
  ],
)
def test_bad_config_flags_are_one_line(tmp_path, flags_, expected):
  proc = cli(['train.py', *flags_, f'--workdir={tmp_path / "run"}'])
  assert proc.returncode == 2
  assert 'Traceback' not in proc.stderr
  errors = error_lines(proc.stderr)
  assert len(errors) == 1 and expected in errors[0], proc.stderr[-2000:]
  assert 'Traceback' not in errors[0] and 'is required' not in errors[0]
  assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize(
  'source, expected',
  [
    ('def get_config(:\n', 'mine.py: invalid syntax (mine.py, line 1)'),
    ('def get_config():\n  return undefined_name\n', "name 'undefined_name' is not defined"),
    ('def get_config():\n  raise RuntimeError("boom")\n', 'mine.py: boom'),
    ('import no_such_module_here\n', 'no_such_module_here'),
  ],
)
def test_a_config_file_that_fails_is_one_line(tmp_path, source, expected):
  # Errors of the user's own config file used to escape as an absl traceback (exit 1).
  (tmp_path / 'mine.py').write_text(source)
  proc = cli(['train.py', f'--config={tmp_path / "mine.py"}', f'--workdir={tmp_path / "run"}'])
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
  errors = error_lines(proc.stderr)
  assert len(errors) == 1 and expected in errors[0], proc.stderr[-2000:]


@pytest.mark.parametrize(
  'flags_, expected',
  [
    (['--coordinator_address=127.0.0.1', '--process_id=0'], "'127.0.0.1' is not HOST:PORT"),
    (['--coordinator_address=127.0.0.1:x', '--process_id=1'], "'127.0.0.1:x' is not HOST:PORT"),
    (['--coordinator_address=127.0.0.1:1234', '--process_id=2'], '--process_id=2 is not in [0,'),
    # Without --distributed they were ignored: each process trained the whole job on its own.
    (['--process_id=1'], '--num_processes, --process_id given without --distributed, which they'),
  ],
)
def test_bad_distributed_flags_are_one_line_at_once(tmp_path, flags_, expected):
  # No port: an IndexError inside JAX (process 0), or 300 s of 'no coordinator answered'.
  distributed = [] if 'without --distributed' in expected else ['--distributed']
  proc = cli(
    ['train.py', '--config=configs/base64.py:tiny', f'--workdir={tmp_path / "run"}']
    + [*distributed, '--num_processes=2', *flags_]
  )
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
  errors = error_lines(proc.stderr)
  assert len(errors) == 1 and expected in errors[0], proc.stderr[-2000:]


def test_workdir_that_is_a_file(tmp_path):
  target = tmp_path / 'file'
  target.write_text('keep me')
  proc = cli(['train.py', '--config=configs/base64.py:tiny', f'--workdir={target}'])
  assert proc.returncode == 1 and 'is a file, not a folder' in proc.stderr
  assert 'Traceback' not in proc.stderr and target.read_text() == 'keep me'


def test_empty_workdir_is_refused(tmp_path):
  # --workdir= (an unset shell variable) trained into the current folder before.
  proc = subprocess.run(
    [
      sys.executable,
      str(REPO_ROOT / 'train.py'),
      f'--config={REPO_ROOT}/configs/base64.py:tiny',
      '--workdir=',
    ],
    cwd=tmp_path,
    env={**os.environ, 'PYTHONPATH': str(REPO_ROOT)},
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 2 and error_lines(proc.stderr) == [
    'error: --workdir is empty; pass the run folder, e.g. --workdir=runs/base64.'
  ], proc.stderr[-2000:]
  assert list(tmp_path.iterdir()) == []


@contextlib.contextmanager
def tmpfs(path: pathlib.Path, options: str):
  """A tmpfs mounted at path (root only); skips the test where mounting is not allowed."""
  path.mkdir(parents=True, exist_ok=True)
  if os.geteuid() != 0 or shutil.which('mount') is None:
    pytest.skip('mounting a tmpfs needs root (read-only / full-disk faults)')
  proc = subprocess.run(
    ['mount', '-t', 'tmpfs', '-o', options, 'tmpfs', str(path)], capture_output=True
  )
  if proc.returncode != 0:
    pytest.skip(f'cannot mount a tmpfs here: {proc.stderr.decode().strip()}')
  try:
    yield path
  finally:
    subprocess.run(['umount', '-l', str(path)], check=False)


def test_read_only_workdir(shared, pristine):
  with tmpfs(shared['root'] / 'ro_empty', 'ro,size=1m') as mount:
    proc = run(shared, mount / 'run', '--config.train.num_steps=2', check=False)
    assert proc.returncode == 1 and 'Cannot write to --workdir' in proc.stderr
    assert 'Traceback' not in proc.stderr

  with tmpfs(shared['root'] / 'ro_run', 'size=16m') as mount:
    workdir = copy_run(pristine, mount / 'run')
    subprocess.run(['mount', '-o', 'remount,ro', str(mount)], check=True)
    proc = run(shared, workdir, '--config.train.num_steps=6', *CONSTANT_LR, check=False)
    assert proc.returncode == 1 and 'Cannot write to --workdir' in proc.stderr
    assert 'Traceback' not in proc.stderr
    assert finished_steps(workdir) == [2, 4]


def fill_the_disk(shared, workdir) -> str:
  """A 12-step run saving every 2 steps into workdir, on a disk too small for it: its one error
  line (exit 1, no traceback, none of asyncio's unretrieved-future reports)."""
  proc = run(
    shared,
    workdir,
    '--config.train.num_steps=12',
    '--config.train.checkpoint_every=2',
    *CONSTANT_LR,
    check=False,
  )
  assert proc.returncode == 1, proc.stderr[-2000:]
  errors = error_lines(proc.stderr)
  assert errors, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr and 'never retrieved' not in proc.stderr
  return errors[0]


def test_full_disk_keeps_the_last_good_checkpoint(shared, pristine):
  # Room for about one checkpoint of the tiny model (1.3-2.8 MB each): a later save runs out.
  with tmpfs(shared['root'] / 'full', 'size=3m') as mount:
    workdir = mount / 'run'
    error = fill_the_disk(shared, workdir)
    assert 'failed' in error and 'are untouched' in error and 'verifies' in error, error
    kept = finished_steps(workdir)
    assert kept, 'no checkpoint survived'
    # The newest finished checkpoint restores and verifies.
    from imagen_jax import checkpoints

    config = checkpoints.restore_config(checkpoints.make_manager(workdir, read_only=True), kept[-1])
    assert config.stage == 'base64'

  # Bytes to spare but few inodes: the free-space check before each save passes and a write
  # inside orbax's save threads fails (as when another process fills the disk meanwhile). Each
  # thread logged its traceback (5, and asyncio's unretrieved futures): one line now.
  with tmpfs(shared['root'] / 'few_inodes', 'size=64m,nr_inodes=60') as mount:
    error = fill_the_disk(shared, mount / 'run')
    assert 'No space left on device' in error, error


# Saves of a small state into tmpfs folders of N inodes, N = 24..86: each runs out of inodes at
# another point of a save (a step or item folder, a metadata file, an array chunk).
_SAVE_UNTIL_FULL = """
import subprocess, sys, time
import jax.numpy as jnp, ml_collections
from imagen_jax import checkpoints
checkpoints.quiet_orbax_noise()
root = sys.argv[1]
state = {'w': jnp.ones((64, 64)), 'b': jnp.zeros((64,))}
config = ml_collections.ConfigDict()
for n in range(24, 87, 2):
  mount = f'{root}/{n}'
  subprocess.run(['mkdir', '-p', mount], check=True)
  options = f'size=64m,nr_inodes={n}'
  subprocess.run(['mount', '-t', 'tmpfs', '-o', options, 'tmpfs', mount], check=True)
  manager, start, failed = checkpoints.make_manager(f'{mount}/run', keep=2), time.time(), None
  for step in range(1, 20):
    try:
      manager.wait_until_finished()
      manager.check_for_errors()
      checkpoints.save(manager, step, state=state, data_state={}, config=config)
    except Exception:
      failed = step
      break
  try:
    manager.wait_until_finished()
    manager.close()
  except Exception:
    pass
  print(n, failed, round(time.time() - start, 1), flush=True)
  subprocess.run(['umount', '-l', mount], check=True)
"""


def test_a_save_that_cannot_make_its_folders_fails_at_once(shared):
  # Orbax made a step's folders in a background thread: when that mkdir failed (no inodes or
  # bytes left), the sibling writes waited for its signal until their timeout (5-20 minutes, the
  # process could not exit) and then each logged a traceback. The folders are made in save() now.
  with tmpfs(shared['root'] / 'can_mount', 'size=1m'):
    pass  # skips where a tmpfs cannot be mounted
  try:  # about 5 s
    proc = subprocess.run(
      [sys.executable, '-c', _SAVE_UNTIL_FULL, str(shared['root'] / 'inode_sweep')],
      cwd=REPO_ROOT,
      env=env_for(shared),
      capture_output=True,
      text=True,
      timeout=120,
    )
  except subprocess.TimeoutExpired as e:
    raise AssertionError(f'the saves hung after running out of inodes: {e.stdout}') from None
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [line.split() for line in proc.stdout.splitlines()]
  assert len(rows) == 32, proc.stdout
  for n, failed, seconds in rows:
    assert failed != 'None' and float(seconds) < 30, (n, failed, seconds)
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]


def test_a_workdir_in_use_by_another_run_is_refused_untouched(shared, pristine):
  # Another train.py holds the workdir (here: this test holds its lock). A second start must not
  # clean its checkpoint in progress, rewrite its metrics or save over its steps.
  from imagen_jax import run_lock

  workdir = copy_run(pristine, shared['root'] / 'in_use')
  in_progress = workdir / 'checkpoints' / '6.orbax-checkpoint-tmp-1234'
  in_progress.mkdir()
  metrics = (workdir / 'metrics.jsonl').read_bytes()
  lock = run_lock.RunLock(workdir)
  assert lock.acquire() is None
  try:
    proc = run(shared, workdir, '--config.train.num_steps=6', *CONSTANT_LR, check=False)
  finally:
    lock.release()
  assert proc.returncode == 1, proc.stderr[-3000:]
  (line,) = error_lines(proc.stderr)
  assert line.startswith(f'error: {workdir} is in use by another training run (host ')
  assert f'pid {os.getpid()}' in line and 'Traceback' not in proc.stderr
  assert in_progress.is_dir() and (workdir / 'metrics.jsonl').read_bytes() == metrics
  assert finished_steps(workdir) == [2, 4]


def test_a_fresh_start_drops_the_rows_of_a_run_stopped_before_its_first_checkpoint(shared):
  # A run killed before its first checkpoint left metrics rows; the next start begins at step 0,
  # so those rows would otherwise be logged twice.
  workdir = shared['root'] / 'no_checkpoint_yet'
  workdir.mkdir()
  (workdir / 'metrics.jsonl').write_text(
    ''.join(f'{{"step": {s}, "loss": 9.0}}\n' for s in (1, 2, 3))
  )
  proc = run(shared, workdir, '--config.train.num_steps=2', *CONSTANT_LR)
  assert 'metrics.jsonl: dropped 3 rows after step 0' in proc.stderr
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in rows if 'loss' in r] == [1, 2]
  assert 9.0 not in losses(workdir).values()


def test_a_folder_dataset_is_listed_once_per_start(shared, tmp_path):
  # Listing a large folder stats every file and reads image headers; train.py used to list it up
  # to four times (cache, iterator, grid prompts), each time warning about the same bad file.
  from PIL import Image

  data = tmp_path / 'images'
  data.mkdir()
  for i in range(8):
    Image.new('RGB', (16, 16), (30 * i, 0, 0)).save(data / f'{i}.png')
    (data / f'{i}.txt').write_text(f'square number {i}')
  Image.new('RGB', (16, 16)).save(data / 'no_caption.png')
  proc = run(
    shared,
    tmp_path / 'run',
    '--config.data.source=folder',
    f'--config.data.path={data}',
    '--config.data.max_skip_fraction=0.5',
    '--config.train.num_steps=1',
    '--config.train.sample_every=1',
    '--config.sample.steps=2',
    *CONSTANT_LR,
  )
  assert proc.stderr.count('skipping no_caption.png') == 1, proc.stderr[-3000:]
  assert (tmp_path / 'run' / 'samples' / 'step_00000001.png').exists()


def test_grid_prompts_that_are_no_training_caption_are_encoded(shared, tmp_path):
  # train.sample_prompts outside the dataset: encoded with the run's encoder at start (the cache
  # holds only training captions); before, a CaptionNotCachedError traceback.
  proc = run(
    shared,
    tmp_path / 'run',
    "--config.train.sample_prompts=('a prompt that is no caption', 'nor is this one')",
    '--config.train.num_steps=1',
    '--config.train.sample_every=1',
    '--config.sample.steps=2',
    *CONSTANT_LR,
  )
  assert 'Traceback' not in proc.stderr
  assert (tmp_path / 'run' / 'samples' / 'step_00000001.png').exists()


def test_the_write_probe_of_a_full_disk_is_not_left_behind(tmp_path):
  from imagen_jax import multihost

  with tmpfs(tmp_path / 'full', 'size=4k') as mount:
    (mount / 'fill').write_bytes(b'x' * 4096)  # the one page: a new file is made, its write fails
    with pytest.raises(OSError):
      multihost.check_writable(mount)
    assert [p.name for p in mount.iterdir()] == ['fill']
