"""Test setup: 8 fake CPU devices (for mesh / partition-spec tests) before jax is imported."""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
_flag = '--xla_force_host_platform_device_count=8'
if _flag not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + _flag).strip()

import pathlib  # noqa: E402
import sys  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
  sys.path.insert(0, str(REPO_ROOT))

# One persistent XLA compilation cache for every test that runs train.py / sample.py in a
# subprocess: the tiny configs compile the same programs in many tests and modules.
XLA_CACHE_DIR = REPO_ROOT / '.pytest_cache' / 'xla'
