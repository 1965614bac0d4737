"""End-to-end training speed of a config: data pipeline + train step, median step seconds.

  python bench/train.py --config=configs/base64.py:small --config.train.batch_size=4

Uses the real input pipeline (embedded dataset, embedding cache; built on first use) and the
real sharded train step. Prints one JSON line: step seconds with data (end to end), step
seconds on a fixed batch (compute only), the data pipeline alone, img/s, TFLOP/s and MFU.
"""

import json
import math
import statistics
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from imagen_jax import optim, precompute, sharding, train_lib
from imagen_jax.data import pipeline

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', 'configs/base64.py:small', 'Stage config.')
flags.DEFINE_integer('steps', 10, 'Timed steps (after 2 warm-up steps).')


def main(_):
  config = FLAGS.config
  mesh = sharding.make_mesh(config.mesh)
  cache = precompute.open_or_build_cache(config, build_if_missing=True)
  it = pipeline.make_iterator(config, text_cache=cache)
  tx = optim.make_optimizer(config.optim, int(config.train.num_steps))
  batch_sh = sharding.batch_sharding(mesh)
  with jax.set_mesh(mesh):
    graphdef, state, state_sh = train_lib.create_train_state(config, tx, mesh)
    step_fn = jax.jit(
      train_lib.make_train_step(config, graphdef, tx),
      in_shardings=(state_sh, batch_sh),
      out_shardings=(state_sh, sharding.replicated(mesh)),
      donate_argnums=(0,),
    )
    batch = train_lib._to_global(next(it), batch_sh)
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    flops = train_lib.compiled_flops(compiled)
    for _ in range(2):
      state, m = compiled(state, batch)
    jax.block_until_ready(m)

    fixed = []
    for _ in range(FLAGS.steps):
      t0 = time.perf_counter()
      state, m = compiled(state, batch)
      jax.block_until_ready(m)
      fixed.append(time.perf_counter() - t0)

    data_only = []
    for _ in range(FLAGS.steps):
      t0 = time.perf_counter()
      next(it)
      data_only.append(time.perf_counter() - t0)

    # End to end, as the training loop runs: fetch, dispatch, read metrics one step late.
    end_to_end, pending = [], None
    for _ in range(FLAGS.steps):
      t0 = time.perf_counter()
      b = train_lib._to_global(next(it), batch_sh)
      state, m = compiled(state, b)
      if pending is not None:
        jax.device_get(pending)
      pending = m
      end_to_end.append(time.perf_counter() - t0)
    jax.device_get(pending)
  step_s = statistics.median(end_to_end)
  compute_s = statistics.median(fixed)
  bs = int(config.train.batch_size)
  peak = train_lib.peak_flops(jax.devices()[0])
  tflops = flops / compute_s / 1e12 if flops else None
  print(
    json.dumps(
      {
        'bench': 'train',
        'stage': config.stage,
        'preset': config.model_preset,
        'params_m': round(
          sum(math.prod(x.shape) for x in jax.tree.leaves(state['params'])) / 1e6, 2
        ),
        'batch': bs,
        'resolution': int(config.data.resolution),
        'dtype': config.model.dtype,
        'backend': jax.default_backend(),
        'device': jax.devices()[0].device_kind,
        'devices': jax.device_count(),
        'compile_s': round(compile_s, 1),
        'step_s_end_to_end': round(step_s, 3),
        'step_s_compute_only': round(compute_s, 3),
        'data_s_per_batch': round(statistics.median(data_only), 4),
        'img_per_s': round(bs / step_s, 2),
        'tflops_per_device': round(tflops, 3) if tflops else None,
        'mfu': round(tflops * 1e12 / peak, 4) if tflops and peak else None,
        'loss_finite': bool(np.isfinite(float(m['loss']))),
      }
    )
  )


if __name__ == '__main__':
  app.run(main)
