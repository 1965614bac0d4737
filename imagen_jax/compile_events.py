"""How many XLA programs a piece of code compiled, and how many came from the persistent cache.

For the logs of train.py and sample.py: a second start of the same config should say that its
programs were loaded from JAX's persistent compilation cache (README, "Compile once"), and a
user whose cache is off, unwritable or invalidated (another jax version, other XLA flags)
should see that they compiled. Counted from `jax.monitoring` events that JAX records on the
calling thread: one backend-compile event per program (a cache hit included) and one cache-hit
event per program read from the cache. Events from other threads are not counted.
"""

import contextlib
import dataclasses
import threading
from collections.abc import Iterator

from jax import monitoring

# Event names as JAX records them (jax._src.dispatch.BACKEND_COMPILE_EVENT and
# jax._src.compiler); should a version rename them, nothing is counted and the logs say so.
_PROGRAM = '/jax/core/compile/backend_compile_duration'
_CACHE_HIT = '/jax/compilation_cache/cache_hits'


@dataclasses.dataclass
class Compiles:
  programs: int = 0  # XLA programs made (compiled, or loaded from the persistent cache)
  cache_hits: int = 0  # of those, loaded from the persistent cache

  def add(self, other: 'Compiles') -> None:
    self.programs += other.programs
    self.cache_hits += other.cache_hits

  def summary(self) -> str:
    """How the programs were made, to follow e.g. 'Train step': 'compiled', 'loaded from the
    persistent compilation cache', 'compiled (1 of 3 programs; 2 loaded from the persistent
    compilation cache)', or 'ready (no compile event seen)'."""
    compiled = self.programs - self.cache_hits
    if self.programs == 0:
      return 'ready (no compile event seen)'
    if compiled == 0:
      return 'loaded from the persistent compilation cache'
    if self.cache_hits == 0:
      return 'compiled'
    return (
      f'compiled ({compiled} of {self.programs} programs; {self.cache_hits} loaded from the '
      'persistent compilation cache)'
    )


@contextlib.contextmanager
def counting() -> Iterator[Compiles]:
  """Counts the compiles made on this thread inside the block (into the yielded Compiles)."""
  count = Compiles()
  thread = threading.get_ident()

  def on_event(event: str, **kwargs) -> None:
    if event == _CACHE_HIT and threading.get_ident() == thread:
      count.cache_hits += 1

  def on_duration(event: str, seconds: float, **kwargs) -> None:
    if event == _PROGRAM and threading.get_ident() == thread:
      count.programs += 1

  monitoring.register_event_listener(on_event)
  monitoring.register_event_duration_secs_listener(on_duration)
  try:
    yield count
  finally:
    monitoring.unregister_event_listener(on_event)
    monitoring.unregister_event_duration_listener(on_duration)
