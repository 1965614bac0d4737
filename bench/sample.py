"""Sampling speed of one stage: images/s of a whole compiled sampling loop (compile excluded).

  python bench/sample.py --config=configs/base64.py:small --batch=4 --steps=25 --sampler=dpmpp_2m

After the compile, one untimed call (`first_call_s`), then --repeats timed ones (`batch_s`:
their median). Random-initialised weights (speed does not depend on training); guidance
batched as [cond; uncond]. On a CPU of two or more cores the batch is split over two devices
where it is even, as sample.py does (`imagen_jax.cpu_devices`, `cascade.BatchDevices`);
IMAGEN_JAX_CPU_DEVICES=1 measures one device. `devices` and `split` say which ran. Prints one
JSON line.
"""

import json
import os
import statistics
import sys
import time

# This checkout's package first (an installed one may be another checkout's).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from imagen_jax import cascade, cli, stage  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', 'configs/base64.py:small', 'Stage config.')
flags.DEFINE_integer('batch', 4, 'Images per batch.')
flags.DEFINE_integer('steps', 25, 'Sampling steps.')
flags.DEFINE_string('sampler', 'dpmpp_2m', 'ddpm | ddim | dpmpp_2m | heun.')
flags.DEFINE_float('guidance', 5.0, 'Guidance scale (1: no unconditional pass).')
flags.DEFINE_integer('repeats', 3, 'Timed runs after the compile and one untimed run.')


def main(argv):
  try:
    run(argv)
  except ValueError as e:  # a config the stage cannot sample with (e.g. text.max_length=0)
    cli.fail(' '.join(str(e).split()))  # one line, whatever the message's own line breaks


def run(_):
  for name in ('batch', 'steps', 'repeats'):
    if getattr(FLAGS, name) < 1:
      cli.fail(f'--{name} must be at least 1, got {getattr(FLAGS, name)}.')
  host_malloc = cli.keep_freed_host_buffers()  # before JAX's CPU client starts its threads
  config = FLAGS.config
  try:
    options = cascade.SamplingOptions.from_config(
      config, sampler=FLAGS.sampler, steps=FLAGS.steps, guidance=FLAGS.guidance
    )
  except ValueError as e:  # an unknown sampler, a negative guidance
    cli.fail(str(e))
  # As sample.py: two CPU devices for an even batch, where two copies of the params fit.
  cli.split_cpu_devices(
    FLAGS.batch, None, distributed=False, copy_bytes=lambda: stage.params_bytes(config)
  )
  devices = cascade.BatchDevices()
  split = devices.splits(FLAGS.batch)
  graphdef, _ = stage.abstract_model(config)
  params = jax.jit(lambda k: stage.init_params(config, k), out_shardings=devices.params_sharding)(
    jax.random.key(0)
  )
  fn, params, put = devices.place(
    cascade.make_stage_sampler(config, graphdef, options), params, split
  )
  b, length, dim = FLAGS.batch, int(config.text.max_length), int(config.model.text_dim)
  text_embs = put(jax.random.normal(jax.random.key(1), (b, length, dim)))
  text_mask = put(jnp.arange(length)[None, :] < jnp.array([length // 2] * b)[:, None])
  lowres = None
  if stage.is_super_resolution(config):
    r = int(config.data.lowres_resolution)
    lowres = put(jax.random.uniform(jax.random.key(2), (b, r, r, 3), minval=-1, maxval=1))
  # Per-image keys, as sample.py passes them (image i's noise: cascade.image_keys).
  keys = [put(cascade.image_keys(seed, range(b))) for seed in range(FLAGS.repeats + 1)]
  args = (params, text_embs, text_mask, keys[0], lowres)
  t0 = time.perf_counter()
  compiled = fn.lower(*args).compile()
  compile_s = time.perf_counter() - t0
  # One untimed call first: a first call's one-time costs (buffers allocated, kernels and
  # thread pools set up) are not the sampling speed.
  t0 = time.perf_counter()
  compiled(*args).block_until_ready()
  first_call_s = time.perf_counter() - t0
  times = []
  for i in range(FLAGS.repeats):
    t0 = time.perf_counter()
    compiled(*args[:3], keys[i + 1], lowres).block_until_ready()
    times.append(time.perf_counter() - t0)
  batch_s = statistics.median(times)
  # Heun: 2N - 2 network calls for N >= 2 steps (Euler first and last steps), 1 for N = 1.
  calls = max(2 * FLAGS.steps - 2, 1) if FLAGS.sampler == 'heun' else FLAGS.steps
  evals = calls * (1 if FLAGS.guidance == 1 else 2)
  print(
    json.dumps(
      {
        'bench': 'sample',
        'stage': config.stage,
        'preset': config.model_preset,
        'resolution': int(config.data.resolution),
        'batch': b,
        'sampler': FLAGS.sampler,
        'steps': FLAGS.steps,
        'guidance': FLAGS.guidance,
        'backend': jax.default_backend(),
        'device': jax.devices()[0].device_kind,
        'devices': len(devices.devices),
        'split': split,
        'host_malloc': host_malloc,
        'compile_s': round(compile_s, 2),
        'first_call_s': round(first_call_s, 3),  # the untimed call before the timed ones
        'batch_s': float(f'{batch_s:.4g}'),  # 4 digits: a tiny config's batch takes milliseconds
        'images_per_s': round(b / batch_s, 3),
        'network_evals_per_image_batch': evals,
      }
    )
  )


if __name__ == '__main__':
  cli.run(main)
