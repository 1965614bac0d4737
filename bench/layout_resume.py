"""Does a run resume exactly across train.state_layout on this machine? One JSON line.

  python bench/layout_resume.py                     # base64:tiny, 'auto' (conv_ohwi on GPU)
  python bench/layout_resume.py --layout conv_ohwi  # force the GPU's layout on a CPU
  python bench/layout_resume.py --workdir /tmp/lr -- --config.text.cache_dir=/tmp/emb

Runs `train.py` (constant learning rate, a checkpoint every 2 steps) twice in fresh folders
under --workdir: straight through --steps steps in --layout, and in three parts, the first in
--layout (with a sample grid from its EMA at its last step), the second resumed in the
row-major layout ('default'), the third resumed in --layout again. Checkpoints hold logical
values, so every step's loss must match the straight run's; a kernel saved, restored or relaid
transposed moves the losses by O(0.1). This exercises, on the backend at hand, what only a GPU
does by default: the state relaid leaf by leaf with donation at init and resume
(`sharding.relayout`), orbax saving and restoring arrays in the conv_ohwi layout, their
checksums, and a sample grid compiled for the EMA in that layout.

The line holds the layouts as resolved on this backend, each step's two losses, the largest
relative difference, whether it is within --tolerance (`ok`), whether the grid was written, and
the wall time. Exit code 1 when not ok. Arguments after `--` go to every train.py run.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--config', default='configs/base64.py:tiny', help='train.py --config')
  p.add_argument('--layout', default='auto', help="the layout to test: 'auto' or 'conv_ohwi'")
  p.add_argument('--steps', type=int, default=6, help='steps in all (a multiple of 6)')
  p.add_argument('--workdir', default='/tmp/imagen_jax_layout_resume', help='runs go here')
  p.add_argument(
    '--tolerance',
    type=float,
    default=1e-2,
    help='largest relative loss difference accepted (rounding: 1e-7 on CPU; '
    'a transposed kernel: about 1e-1)',
  )
  argv = sys.argv[1:] if argv is None else list(argv)
  passthrough = argv[argv.index('--') + 1 :] if '--' in argv else []
  args = p.parse_args(argv[: argv.index('--')] if '--' in argv else argv)
  if args.steps < 6 or args.steps % 6:
    p.error(f'--steps={args.steps}: use a multiple of 6 (three parts, a checkpoint every 2).')
  if args.layout not in ('auto', 'conv_ohwi'):
    p.error(f"--layout={args.layout}: use 'auto' or 'conv_ohwi' (the other is 'default').")
  # train.py runs in the repository: paths given from elsewhere are made absolute here (a
  # relative --workdir had its old runs removed here and trained into the repository).
  args.workdir = pathlib.Path(args.workdir).expanduser().absolute()
  config_file, sep, variant = args.config.partition(':')
  if pathlib.Path(config_file).expanduser().is_file():
    args.config = str(pathlib.Path(config_file).expanduser().absolute()) + sep + variant
  for d in (args.workdir / 'straight', args.workdir / 'switched'):
    if d.exists() and not (d / 'metrics.jsonl').exists() and not (d / 'checkpoints').exists():
      p.error(f'{d} exists and is not a run of this script; pass another --workdir.')
  return args, passthrough


def _train(args, workdir: pathlib.Path, steps: int, layout: str, extra: list[str]) -> None:
  cmd = [
    sys.executable,
    'train.py',
    f'--config={args.config}',
    f'--workdir={workdir}',
    f'--config.train.num_steps={steps}',
    f'--config.train.state_layout={layout}',
    '--config.optim.schedule=constant',
    '--config.train.checkpoint_every=2',
    '--config.train.log_every=1',
    *extra,
  ]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
  if proc.returncode != 0:
    tail = ' | '.join(proc.stderr.strip().splitlines()[-3:])
    raise SystemExit(f'error: {" ".join(cmd[1:])} failed ({proc.returncode}): {tail[-800:]}')


def _losses(workdir: pathlib.Path) -> dict[int, float]:
  rows = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  return {r['step']: r['loss'] for r in rows if 'loss' in r}


def main(argv=None) -> dict:
  args, passthrough = parse_args(argv)
  start = time.perf_counter()
  root = args.workdir
  straight, switched = root / 'straight', root / 'switched'
  for d in (straight, switched):
    if d.exists():
      shutil.rmtree(d)  # fresh runs: a kept checkpoint would be resumed
  part = args.steps // 3
  _train(args, straight, args.steps, args.layout, passthrough)
  no_grid = ['--config.train.sample_every=0', *passthrough]
  _train(args, switched, part, args.layout, [f'--config.train.sample_every={part}', *passthrough])
  _train(args, switched, 2 * part, 'default', no_grid)
  _train(args, switched, args.steps, args.layout, no_grid)

  a, b = _losses(straight), _losses(switched)
  steps = list(range(1, args.steps + 1))
  missing = [s for s in steps if s not in a or s not in b]
  rel = [abs(a[s] - b[s]) / max(abs(a[s]), 1e-12) for s in steps if s not in missing]
  worst = max(rel) if rel else None

  sys.path.insert(0, str(REPO))
  import jax

  from imagen_jax import sharding

  resolved = sharding.state_layout(args.layout)
  result = {
    'check': 'layout_resume',
    'backend': jax.default_backend(),
    'device_kind': jax.devices()[0].device_kind,
    'config': args.config,
    'layouts': [resolved, 'default', resolved],
    'steps': args.steps,
    'losses_straight': [a.get(s) for s in steps],
    'losses_switched': [b.get(s) for s in steps],
    'missing_steps': missing,
    'max_rel_diff': worst,
    'tolerance': args.tolerance,
    'ok': not missing and worst is not None and worst <= args.tolerance,
    'grid_written': any((switched / 'samples').glob('*.png')),
    'wall_s': round(time.perf_counter() - start, 1),
  }
  if resolved == 'default':
    result['note'] = 'the layout is row-major on this backend: pass --layout conv_ohwi'
  print(json.dumps(result), flush=True)
  return result


if __name__ == '__main__':
  sys.exit(0 if main()['ok'] else 1)
