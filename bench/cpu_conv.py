"""How many cores XLA:CPU's 3x3 convolutions use, by shape; prints ONE JSON line.

  python bench/cpu_conv.py                      # small64's shapes at batch 4
  python bench/cpu_conv.py --shapes 64x64x64,64x64x128 --batch 8

For each shape HxCinxCout (square H x H images, 'SAME' padding, float32) it times the forward
convolution and its gradients (input and kernel), as jitted programs on their own, and reports
the wall time, the process CPU time over the same calls and their ratio: `cores` near 1 means
the convolution ran on one core. With an even batch it times the same two programs with image
pairs side by side (`folded`: `imagen_jax.models.cpu_conv`, forward and input gradient folded,
kernel gradient plain) and says whether the U-Net takes that path for the shape
(`model_folds`). On the 2-core development machine (jaxlib 0.10.2) the convolutions with 64
output channels of 64-wide images, forward and input gradient, ran on one core (12 ms wall and
12 ms CPU for 1.2 GFLOP) where 128 channels or 128 columns used both, which is why the U-Net
folds them. A jaxlib or a CPU where `folded` is no faster shows it here first.
"""

import argparse
import json
import os
import resource
import statistics
import sys
import time

# This checkout's package first (an installed one may be another checkout's).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from imagen_jax import cli  # noqa: E402
from imagen_jax.models import cpu_conv  # noqa: E402

SMALL64 = '64x64x64,64x128x64,64x64x128,32x128x128,32x256x128,16x256x256'


def _cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def _time(fn, args, calls: int) -> tuple[float, float]:
  """(median wall ms, mean CPU ms) of `calls` calls after one warm-up."""
  import jax

  jax.block_until_ready(fn(*args))
  walls = []
  cpu0 = _cpu_seconds()
  for _ in range(calls):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    walls.append(time.perf_counter() - t0)
  cpu_ms = (_cpu_seconds() - cpu0) / calls * 1e3
  return statistics.median(walls) * 1e3, cpu_ms


def _measure(programs, x, k, dy, gflop: float, calls: int) -> dict:
  forward, gradients = programs
  out = {}
  for name, fn, fn_args, flop in (
    ('forward', forward, (x, k), gflop),
    ('gradients', gradients, (x, k, dy), 2 * gflop),
  ):
    wall_ms, cpu_ms = _time(fn, fn_args, calls)
    out[name] = {
      'wall_ms': round(wall_ms, 3),
      'cpu_ms': round(cpu_ms, 3),
      'cores': round(cpu_ms / wall_ms, 2),
      'gflop_per_s': round(flop / wall_ms * 1e3, 1),
    }
  return out


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--shapes', default=SMALL64, help='comma list of HxCinxCout')
  p.add_argument('--batch', type=int, default=4)
  p.add_argument('--calls', type=int, default=10, help='timed calls per program')
  args = p.parse_args(argv)
  try:
    shapes = [tuple(int(v) for v in s.split('x')) for s in args.shapes.split(',')]
    assert all(len(s) == 3 and min(s) > 0 for s in shapes)
  except (ValueError, AssertionError):
    p.error(f'--shapes {args.shapes!r}: give HxCinxCout triples, e.g. 64x64x64,32x128x128.')
  if args.batch < 1 or args.calls < 1:
    p.error(f'--batch and --calls must be at least 1, got {args.batch} and {args.calls}.')
  host_malloc = cli.keep_freed_host_buffers()  # before JAX's CPU client starts its threads

  import jax
  import jax.numpy as jnp

  if jax.default_backend() != 'cpu':
    p.error(
      f'this bench measures the CPU backend, this process has {jax.default_backend()}: '
      'run it with JAX_PLATFORMS=cpu.'
    )

  programs = {}
  for name, fn in (('plain', cpu_conv.plain), ('folded', cpu_conv.fold_both)):
    programs[name] = (
      jax.jit(fn),
      jax.jit(lambda x, k, dy, fn=fn: jax.vjp(fn, x, k)[1](dy)),
    )
  points = []
  for h, c_in, c_out in shapes:
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (args.batch, h, h, c_in), jnp.float32)
    k = jax.random.normal(keys[1], (3, 3, c_in, c_out), jnp.float32) * 0.05
    dy = jax.random.normal(keys[2], (args.batch, h, h, c_out), jnp.float32)
    gflop = 2 * args.batch * h * h * 9 * c_in * c_out / 1e9
    point = {'shape': f'{h}x{c_in}x{c_out}', 'gflop_forward': round(gflop, 3)}
    point.update(_measure(programs['plain'], x, k, dy, gflop, args.calls))
    if args.batch % 2 == 0:
      point['folded'] = _measure(programs['folded'], x, k, dy, gflop, args.calls)
    point['model_folds'] = cpu_conv.wanted(x, k, 1)
    points.append(point)
  result = {
    'bench': 'cpu_conv',
    'backend': jax.default_backend(),
    'jax': jax.__version__,
    'host_malloc': host_malloc,
    'batch': args.batch,
    'cores_available': len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else None,
    'points': points,
  }
  print(json.dumps(result))
  return result


if __name__ == '__main__':
  main()
