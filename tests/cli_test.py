"""The entry points' command lines before any work starts: --helpshort shows every flag an error
message may name, and stray arguments or a missing --config are one line and exit code 2."""

import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT, cli_env

pytestmark = pytest.mark.unit


def run(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, *args],
    cwd=REPO_ROOT,
    env=cli_env(),
    capture_output=True,
    text=True,
    timeout=300,
  )


@pytest.mark.parametrize(
  'entry,flags',
  [
    (['train.py'], ['--workdir', '--distributed', '--coordinator_address', '--compilation_cache']),
    (['sample.py'], ['--prompt', '--checkpoints', '--distributed', '--compilation_cache']),
    (
      ['evaluate.py'],
      ['--checkpoints', '--num', '--judge_dir', '--overwrite', '--compilation_cache'],
    ),
    (['-m', 'imagen_jax.evaluate'], ['--checkpoints', '--num', '--compilation_cache']),
    (['-m', 'imagen_jax.precompute'], ['--workdir', '--distributed', '--process_id']),
  ],
)
def test_helpshort_lists_the_flags_of_the_entry_point(entry, flags):
  # The shared flags are defined in imagen_jax/cli.py (evaluate's in imagen_jax/evaluate/cli.py):
  # absl's --helpshort shows only the main module's own flags unless they are adopted.
  proc = run(*entry, '--helpshort')  # absl's help exits with code 1
  assert 'Traceback' not in proc.stderr, proc.stderr[-2000:]
  listed = {line.split(':')[0].strip().replace('[no]', '') for line in proc.stdout.splitlines()}
  assert set(flags) <= listed, (set(flags) - listed, proc.stdout[-2000:])


@pytest.mark.parametrize(
  'args,message',
  [
    (['sample.py', '--prompt', 'a', 'red', 'apple'], 'quote a prompt that has spaces'),
    (['-m', 'imagen_jax.precompute'], '--config is required'),
    # absl's own text read 'flag --config=None: Flag --config must have a value other than None..'
    (['train.py', '--workdir=x'], 'error: --config is required. Pass --helpshort'),
    (['train.py', '--config=configs/base64.py'], 'error: --workdir is required. Pass --helpshort'),
    (['-m', 'imagen_jax.precompute', '--config=configs/base64.py', 'x'], 'Unexpected arguments'),
  ],
)
def test_usage_errors_are_one_line(args, message):
  proc = run(*args)
  errors = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
  assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
  assert 'USAGE' not in proc.stderr and 'Traceback' not in proc.stderr


_SIGTERM_AFTER_THE_RUN = """
import os, signal, sys, time
sys.argv = ['sample.py', '--prompt=x', '--checkpoints=unused', '--out=unused']
import sample
from imagen_jax import sample_lib

class Written(list):
  def __len__(self):  # the final line's len(written): after sample_lib.run returned
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.2)
    return 0

sample_lib.run = lambda req: Written()
sample.cli.run(sample.main)
"""


def test_a_stop_signal_after_sample_py_wrote_everything_is_ignored():
  # Its handler raised KeyboardInterrupt there: a traceback after a finished run.
  proc = subprocess.run(
    [sys.executable, '-c', _SIGTERM_AFTER_THE_RUN],
    cwd=REPO_ROOT,
    env={**cli_env(), 'PYTHONPATH': str(REPO_ROOT)},
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0 and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
  assert proc.stdout.strip() == '0 images and grid.png in unused'
