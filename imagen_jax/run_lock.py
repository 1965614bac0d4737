"""One training run per workdir at a time: an exclusive lock on WORKDIR/.train.lock.

A second train.py started on a workdir that a run still uses (the same command run twice, a
scheduler that requeues a job while the old one is still saving) would delete the first run's
checkpoint in progress (orbax cleans `*.orbax-checkpoint-tmp*` folders when its manager opens),
rewrite metrics.jsonl under it, and save the same step numbers. The lock refuses that start
with one line naming the holder (host, pid, start time), before anything in the workdir is
touched.

The lock is `fcntl.flock` on a file, so the kernel drops it when the holder exits, however it
exits (kill -9 included): no stale lock to clean up. On several processes, process 0 holds it
for the run. A filesystem without flock support (some network mounts answer ENOLCK) leaves the
run unprotected, with a warning; it is not refused.
"""

from __future__ import annotations

import errno
import logging
import os
import pathlib
import socket
import time

log = logging.getLogger(__name__)

LOCK_FILE = '.train.lock'


class RunLock:
  """The lock of one workdir; `acquire` returns None, or why the workdir is in use."""

  def __init__(self, workdir: str | os.PathLike):
    self.path = pathlib.Path(workdir) / LOCK_FILE
    self._fd: int | None = None

  def acquire(self) -> str | None:
    import fcntl

    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = os.pread(fd, 500, 0).decode('utf-8', 'replace').strip() or 'unknown'
      os.close(fd)  # held by another run, or (below) a filesystem that cannot lock
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        return (
          f'{self.path.parent} is in use by another training run ({holder}): two runs in one '
          "workdir would delete and overwrite each other's checkpoints. Wait for it to finish "
          '(or stop it), or train into another --workdir.'
        )
      log.warning(
        'Cannot lock %s (%s): another run on this workdir would not be noticed.',
        self.path,
        e.strerror,
      )
      return None
    started = time.strftime('%Y-%m-%d %H:%M:%S %Z')
    os.ftruncate(fd, 0)
    os.pwrite(fd, f'host {socket.gethostname()}, pid {os.getpid()}, since {started}\n'.encode(), 0)
    self._fd = fd
    return None

  def release(self) -> None:
    """Unlocks (the file stays: removing it would race with a run locking it)."""
    if self._fd is not None:
      os.close(self._fd)  # closing the descriptor drops the flock
      self._fd = None
