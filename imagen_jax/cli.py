"""Shared pieces of the command-line entry points (train.py, sample.py, evaluate.py, precompute).

`run(main)` parses absl flags so that a bad --config (missing file, unknown variant, unknown or
ill-typed override) is one line on stderr and exit code 2, never a traceback.
"""

import importlib.util
import pathlib
import sys
from collections.abc import Callable, Sequence

from absl import app, flags

EXIT_USAGE = 2


def fail(message: str, code: int = EXIT_USAGE) -> None:
  """Print `error: message` on stderr and exit with `code`."""
  print(f'error: {message}', file=sys.stderr)
  sys.exit(code)


def _config_flag_values(argv: Sequence[str]) -> tuple[str | None, list[tuple[str, str]]]:
  """(--config value, [(dotted field, value) of --config.<field>=... overrides])."""
  spec, overrides = None, []
  for arg in argv:
    if arg.startswith('--config='):
      spec = arg.split('=', 1)[1]
    elif arg.startswith('--config.'):
      field, _, value = arg[len('--config.') :].partition('=')
      overrides.append((field, value))
  return spec, overrides


def explain_config_error(argv: Sequence[str], error: BaseException) -> str:
  """One line saying which part of the --config flags is wrong, and how to fix it."""
  spec, overrides = _config_flag_values(argv)
  if spec is None:
    return f'--config is required, e.g. --config=configs/base64.py ({error}).'
  path_text, _, arg = spec.partition(':')
  path = pathlib.Path(path_text)
  if not path.is_file():
    return f'--config={spec}: no such config file {path}; pass one of configs/*.py.'
  try:
    module_spec = importlib.util.spec_from_file_location('_config_check', path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
  except Exception as e:  # noqa: BLE001 - any failure of the user's config file is reported
    return f'--config={spec}: {e}'
  for field, value in overrides:
    node, walked = config, []
    for part in field.split('.'):
      if not hasattr(node, 'keys') or part not in node:
        where = '.'.join(walked) or 'the config'
        choices = sorted(node.keys()) if hasattr(node, 'keys') else []
        return (
          f'--config.{field}: {where} has no field {part!r} (fields: {", ".join(choices)}); '
          'check the spelling against the config file.'
        )
      node = node[part]
      walked.append(part)
    if value == '' and not isinstance(node, str):
      return f'--config.{field} needs a value, e.g. --config.{field}={node!r}.'
  first = str(error).strip().splitlines()
  return f'bad --config flags: {first[-1] if first else type(error).__name__}'


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl flag parsing with one-line errors (exit 2) instead of tracebacks."""
  argv = list(argv)
  try:
    rest = flags.FLAGS(argv)
    if 'config' in flags.FLAGS and flags.FLAGS['config'].present:
      flags.FLAGS.config.keys()  # a config that failed to load raises on first use
  except flags.Error as e:
    if any(a.startswith('--config') for a in argv[1:]) and 'config' in str(e):
      fail(explain_config_error(argv[1:], e))
    fail(f'{e}. Pass --helpshort to see the flags.')
  except (OSError, ValueError, AttributeError, KeyError, TypeError) as e:
    fail(explain_config_error(argv[1:], e))
  return rest


def run(main: Callable[[list[str]], None]) -> None:
  """app.run(main) with `parse_flags`."""
  app.run(main, flags_parser=parse_flags)
