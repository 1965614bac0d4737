"""Print each stage's sampling grid and noise-conditioning augmentation from its config.

  python tools/print_grids.py                                   # base64, sr256, sr1024 (full)
  python tools/print_grids.py configs/sr256.py:demo --config.sample.grid=karras
  python tools/print_grids.py configs/sr1024.py --all           # every log-SNR of the grid

One line per stage: the training schedule, the sampler and grid spacing, the log-SNR of the
first and last network call (and the noise s = sigma / alpha left at the last one), and for SR
stages the sampling augmentation level with the alpha it keeps of the low-res image. Overrides
(--config.x=y) apply to every config given.
"""

import ast
import importlib.util
import math
import pathlib
import sys

import jax

jax.config.update('jax_platforms', 'cpu')

from imagen_jax import cascade, cli, stage  # noqa: E402
from imagen_jax.diffusion import gaussian  # noqa: E402

DEFAULT_CONFIGS = ('configs/base64.py', 'configs/sr256.py', 'configs/sr1024.py')


def parse_value(current, text: str):
  """An override's text as its field's type ('false' -> False, where bool('false') is True)."""
  if isinstance(current, bool):
    if text.lower() in ('true', '1'):
      return True
    if text.lower() in ('false', '0'):
      return False
    raise ValueError(f'expected true or false, got {text!r}')
  if current is None or isinstance(current, str):
    return text
  if isinstance(current, (tuple, list)):
    return type(current)(ast.literal_eval(text))
  return type(current)(text)


def load_config(spec: str, overrides: list[str]):
  """'configs/sr256.py:demo' -> its ConfigDict, with '--config.a.b=value' overrides applied."""
  path, _, arg = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg)
  for item in overrides:
    key, _, value = item.removeprefix('--config.').partition('=')
    *parents, leaf = key.split('.')
    node = config
    for name in parents:
      node = node[name]
    node[leaf] = parse_value(node[leaf], value)
  return config


def describe(config) -> dict:
  """The grid facts of one stage config, as plain numbers."""
  options = cascade.SamplingOptions.from_config(config)
  logsnrs = [float(v) for v in options.logsnrs(config)]
  last_call = logsnrs[-2]  # the sampler's last network call is at grid[steps - 1]
  row = {
    'stage': config.stage,
    'resolution': int(config.data.resolution),
    'schedule': config.diffusion.schedule,
    'sampler': options.sampler,
    'grid': options.spacing,
    'steps': options.steps,
    'first_call_logsnr': round(logsnrs[0], 2),
    'last_call_logsnr': round(last_call, 2),
    'last_call_noise_s': round(math.exp(-last_call / 2), 4),
    'logsnrs': [round(v, 3) for v in logsnrs],
  }
  if stage.is_super_resolution(config):
    level = options.aug_level
    alpha, _ = gaussian.alpha_sigma(stage.aug_schedule(config)(jax.numpy.float32(level)))
    row['aug_level'] = level
    row['aug_alpha'] = round(float(alpha), 3)
  return row


def main(argv: list[str]) -> None:
  show_all = '--all' in argv
  unknown = [a for a in argv if a.startswith('--') and a != '--all' and '--config.' not in a]
  if unknown:
    cli.fail(f'Unknown flags {unknown}: give config files, --config.<field>=value and --all.')
  overrides = [a for a in argv if a.startswith('--config.')]
  specs = [a for a in argv if not a.startswith('--')] or list(DEFAULT_CONFIGS)
  for spec in specs:
    try:
      config = load_config(spec, overrides)
    except Exception as e:  # noqa: BLE001 - a missing file, a bad field or value: one line
      cli.fail(cli.explain_config_error([f'--config={spec}', *overrides], e))
    try:
      row = describe(config)
    except ValueError as e:  # a sampling setting (sample.grid, sample.steps, ...) out of range
      cli.fail(f'{spec}: {e}')
    grid = row.pop('logsnrs')
    print(' '.join(f'{k}={v}' for k, v in row.items()))
    if show_all:
      print('  logsnrs: ' + ' '.join(f'{v:.2f}' for v in grid))


if __name__ == '__main__':
  main(sys.argv[1:])
