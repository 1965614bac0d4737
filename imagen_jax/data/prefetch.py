"""Batches put on the device ahead of the train step, by one background thread.

  it = prefetch.DevicePrefetch(host_iter, transfer=to_device, size=2)
  batch = next(it)        # already on the device (transfer's result)
  state = it.get_state()  # host_iter's position after the last batch next() returned
  it.close()              # stops the thread, closes host_iter

The thread runs `next(host_iter)` and `transfer(batch)` (the host -> device copy) while the
step computes, keeping at most `size` batches produced but not yet consumed, so the step never
waits on host batch assembly, checkpoint saves and sample grids included. The checkpointed data
position stays exact: the host iterator's state is recorded right after each batch it produces,
and `get_state()` returns the one of the last batch handed out, not of those read ahead.
"""

import copy
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

_POLL_S = 0.05  # how often a waiting thread checks whether it was asked to stop
CLOSE_TIMEOUT_S = 30.0  # close() waits this long for a batch being read, then leaves it

log = logging.getLogger(__name__)


def checked_size(size: Any) -> int:
  """`data.device_prefetch` as a batch count, or ValueError naming the setting."""
  if int(size) < 0:
    raise ValueError(f'data.device_prefetch={size}: use 0 (off) or a positive batch count.')
  return int(size)


class DevicePrefetch(Iterator):
  """An iterator over `transfer(next(host_iter))`, read up to `size` batches ahead by a thread.

  Exceptions of the host iterator or of `transfer` (DataError, StopIteration, ...) are raised
  by the `next()` that would have returned that batch, as the very same exception object, and
  again by any later `next()`. `size=0` reads synchronously in the caller's thread.
  """

  def __init__(self, host_iter: Any, transfer: Callable[[Any], Any], size: int = 2):
    self._host_iter = host_iter
    self._transfer = transfer
    self._size = checked_size(size)
    self._state = host_iter.get_state()  # the position after the last batch handed out
    self._error: BaseException | None = None  # raised by the thread; raised again on next()
    self._thread: threading.Thread | None = None
    self._closed = False
    self._start()

  def _start(self) -> None:
    if self._size == 0:
      return
    self._stop = threading.Event()
    self._slots = threading.Semaphore(self._size)  # batches produced but not yet consumed
    self._ready: queue.Queue = queue.Queue()  # (batch, state) or (exception, None)
    self._thread = threading.Thread(
      target=self._produce, args=(self._stop, self._slots, self._ready), daemon=True
    )
    self._thread.name = 'device-prefetch'
    self._thread.start()

  def _produce(self, stop: threading.Event, slots: threading.Semaphore, ready: queue.Queue):
    while not stop.is_set():
      if not slots.acquire(timeout=_POLL_S):
        continue
      if stop.is_set():
        return
      try:
        batch = self._transfer(next(self._host_iter))
        ready.put((batch, self._host_iter.get_state()))
      except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
        ready.put((e, None))
        return

  def _halt(self, timeout: float | None = None) -> bool:
    """Stop and join the thread (waiting at most `timeout` seconds; None: as long as it
    takes); the batches it read ahead are dropped. False if it is still running."""
    if self._thread is None:
      return True
    self._stop.set()
    self._thread.join(timeout)
    if self._thread.is_alive():
      return False
    self._thread = None
    return True

  def __next__(self) -> Any:
    if self._closed:
      raise RuntimeError('DevicePrefetch: next() after close().')
    if self._error is not None:
      raise self._error
    if self._thread is None:  # size 0: in this thread
      batch = self._transfer(next(self._host_iter))
      self._state = self._host_iter.get_state()
      return batch
    while True:
      try:
        item, state = self._ready.get(timeout=1.0)
        break
      except queue.Empty:
        if not self._thread.is_alive() and self._ready.empty():
          raise RuntimeError('DevicePrefetch: the prefetch thread died without a batch.') from None
    if state is None:
      self._error = item
      self._halt()
      raise item
    self._slots.release()
    self._state = state
    return item

  def get_state(self) -> Any:
    """The host iterator's state after the last batch `next()` returned (a copy)."""
    return copy.deepcopy(self._state)

  def set_state(self, state: Any) -> None:
    """Drop the batches read ahead, move the host iterator to `state` and read on from there."""
    self._halt()
    self._host_iter.set_state(state)
    self._state = copy.deepcopy(state)
    self._error = None
    if not self._closed:
      self._start()

  def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
    """Stop (and join) the thread, then close the host iterator if it can be closed.

    A thread still inside the host iterator after `timeout` seconds (a read that hangs) is left
    behind with a warning: it is a daemon, so it cannot keep the process alive, and the host
    iterator it is using is not closed under it."""
    if self._closed:
      return
    self._closed = True
    if not self._halt(timeout):
      log.warning(
        'DevicePrefetch.close: the prefetch thread is still reading a batch after %.0f s; '
        'leaving it (a daemon thread) and the host iterator open.',
        timeout,
      )
      return
    if hasattr(self._host_iter, 'close'):
      self._host_iter.close()
