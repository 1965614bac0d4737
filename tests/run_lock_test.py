"""imagen_jax.run_lock: one training run per workdir, released however the holder exits."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from imagen_jax import run_lock

pytestmark = pytest.mark.unit


def test_a_second_lock_is_refused_naming_the_holder(tmp_path):
  first, second = run_lock.RunLock(tmp_path), run_lock.RunLock(tmp_path)
  assert first.acquire() is None
  problem = second.acquire()
  assert problem is not None and problem.startswith(f'{tmp_path} is in use by another training')
  assert f'pid {os.getpid()}' in problem and 'another --workdir' in problem
  first.release()
  assert second.acquire() is None  # free again
  second.release()
  assert (tmp_path / run_lock.LOCK_FILE).exists()  # kept: removing it would race


def test_the_lock_of_a_killed_holder_is_free(tmp_path):
  holder = subprocess.Popen(
    [
      sys.executable,
      '-c',
      textwrap.dedent(
        f"""
        import sys, time
        from imagen_jax import run_lock
        assert run_lock.RunLock({str(tmp_path)!r}).acquire() is None
        print('locked', flush=True)
        time.sleep(600)
        """
      ),
    ],
    stdout=subprocess.PIPE,
    text=True,
    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
  )
  try:
    assert holder.stdout.readline().strip() == 'locked'
    problem = run_lock.RunLock(tmp_path).acquire()
    assert problem and f'pid {holder.pid}' in problem
    holder.send_signal(signal.SIGKILL)  # no clean-up code runs
    holder.wait(timeout=60)
    deadline = time.time() + 10
    lock = run_lock.RunLock(tmp_path)
    while (problem := lock.acquire()) is not None and time.time() < deadline:
      time.sleep(0.1)
    assert problem is None
    lock.release()
  finally:
    if holder.poll() is None:
      holder.kill()
      holder.wait()
