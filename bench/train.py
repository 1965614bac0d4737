"""End-to-end training speed of a config: data pipeline + train step, seconds per step.

  python bench/train.py --config=configs/base64.py:small --config.train.batch_size=4
  # (:small encodes its captions with google/t5-v1_1-base from the Hub on first use;
  # :demo's offline t5-tiny-random runs anywhere)
  # Memory of a full-size stage without allocating it (abstract state and batch, compile only):
  python bench/train.py --config=configs/sr1024.py --memory_only --batch_per_device=8

Uses the real input pipeline (embedded dataset, embedding cache; built on first use) and the
real sharded train step. Prints one JSON line: step seconds with data (end to end), step
seconds on a fixed batch (compute only, the median step), the data pipeline alone, img/s,
TFLOP/s, MFU and HFU. The end-to-end steps run as training does: batches put on the devices
ahead by a thread (data.device_prefetch), metrics read one step late and, with
data.text_length=batch, one compiled step per text length (`text_lengths`; compiling them,
`recompile_s`, is left out of the step times). They are timed as a whole, from the first
batch to the last step's metrics on the host, and divided by --steps: each step is dispatched
before the previous one's metrics are read, so the steps overlap and no one step can be timed
apart. The FLOPs and the compute-only steps are those of the first batch's text length.

FLOPs are the U-Net's model FLOPs counted from its config and the batch shapes
(`imagen_jax.flops`: 3 x forward per step), not `cost_analysis()`, which on GPU counts cuDNN
convolutions and fused attention as zero and on TPU includes remat recomputation (reported
apart as `xla_flops_per_device`). MFU = model FLOP/s / (devices x dense bf16 peak of the
device kind); HFU adds the forward recomputed by remat (equal to MFU without remat). Both are
null on a device the peak table does not list (CPU included).

--memory_only compiles the config's real train step (`train_lib.make_train_step`, pinned
shardings, donated state) on abstract inputs: no params, no text encoder, no data. The batch
has the pipeline's shapes (`pipeline.batch_spec`: training crops when data.crop_size is set,
e.g. sr1024's 256 px crops with 64 px low-res crops). The JSON line gives XLA's
`memory_analysis()` per device and the batch shapes. On CPU the figures overstate a GPU/TPU's
(see bench/unet.py); set XLA_FLAGS=--xla_force_host_platform_device_count=N for N devices.
"""

import json
import math
import os
import statistics
import sys
import time

# This checkout's package first (an installed one may be another checkout's).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from imagen_jax import (  # noqa: E402
  cli,
  device_memory,
  optim,
  precompute,
  sharding,
  stage,
  train_lib,
)
from imagen_jax import flops as flops_lib  # noqa: E402
from imagen_jax.data import pipeline  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', 'configs/base64.py:small', 'Stage config.')
flags.DEFINE_integer('steps', 10, 'Timed steps (after 2 warm-up steps).')
flags.DEFINE_bool('memory_only', False, 'Compile the train step on abstract inputs; no run.')
flags.DEFINE_integer(
  'batch_per_device', 0, '--memory_only: examples per batch shard (0: train.batch_size / shards).'
)


def memory_only(config, *, batch_per_device: int = 0) -> dict:
  """Compiles the config's train step on abstract state and batch; memory and shapes."""
  pipeline.check_crops(config)  # as training does: crops only for a U-Net without self-attention
  mesh = sharding.make_mesh(config.mesh)
  shards = mesh.shape['data'] * mesh.shape['fsdp']  # the batch is split over both
  batch = batch_per_device * shards if batch_per_device > 0 else int(config.train.batch_size)
  if batch % shards:
    cli.fail(
      f'train.batch_size={batch} is not a multiple of the {shards} batch shards '
      f'(mesh {dict(mesh.shape)}); change it, or pass --batch_per_device.'
    )
  tx = optim.make_optimizer(config.optim, int(config.train.num_steps))
  batch_sh = sharding.batch_sharding(mesh)
  spec = pipeline.batch_spec(config, batch)
  with jax.set_mesh(mesh):
    graphdef, abstract, state_sh, _ = train_lib.abstract_train_state(config, tx, mesh)
    step_fn = jax.jit(
      train_lib.make_train_step(config, graphdef, tx),
      in_shardings=(state_sh, batch_sh),
      out_shardings=(state_sh, sharding.replicated(mesh)),
      donate_argnums=(0,),
    )
    abstract_batch = {
      k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sh) for k, (shape, dtype) in spec.items()
    }
    t0 = time.perf_counter()
    lowered = step_fn.lower(train_lib.abstract_with_shardings(abstract, state_sh), abstract_batch)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
  mem = device_memory.analyse(compiled)
  memory = None if mem is None else {**mem.as_gb(), 'per_device': True}
  d = config.data
  return {
    'bench': 'train_memory',
    'stage': config.stage,
    'preset': config.model_preset,
    'params_m': round(
      sum(math.prod(x.shape) for x in jax.tree.leaves(abstract['params'])) / 1e6, 2
    ),
    'batch': batch,
    'batch_per_device': batch // shards,
    'resolution': int(d.resolution),
    'crop_size': int(d.get('crop_size', 0)),
    'shapes': {k: list(shape) for k, (shape, _) in spec.items()},
    'self_attention_levels': list(config.model.attn_levels),
    'dtype': config.model.dtype,
    'remat': bool(config.model.remat),
    'optimizer': config.optim.optimizer,
    'mesh': dict(mesh.shape),
    'backend': jax.default_backend(),
    'device': jax.devices()[0].device_kind,
    'devices': jax.device_count(),
    'compile_s': round(compile_s, 1),
    'memory': memory,
  }


def time_end_to_end(steps, state, batches, count: int, fetch=jax.device_get):
  """Runs `count` steps as the training loop does and times them as a whole.

  steps: a `train_lib.CompiledSteps` (a batch of new shapes compiles its step first);
  batches: an iterator of device batches. Each step is dispatched before the previous step's
  metrics are fetched (`fetch`, on the host), so one clock runs from the first batch to the last
  step's metrics. Returns (state, the last metrics, seconds per step without the compiles,
  seconds spent compiling)."""
  pending, recompile_s = None, 0.0
  t0 = time.perf_counter()
  for _ in range(count):
    b = next(batches)
    step, _, seconds = steps.get(state, b)
    state, m = step(state, b)
    if pending is not None:
      fetch(pending)
    pending = m
    recompile_s += seconds
  fetch(pending)
  total = time.perf_counter() - t0
  return state, pending, (total - recompile_s) / count, recompile_s


def main(argv):
  try:
    run(argv)
  except ValueError as e:  # a bad setting, a missing T5 checkpoint or dataset (DataError)
    cli.fail(' '.join(str(e).split()))  # one line: some carry a library's multi-line text


def run(_):
  if FLAGS.steps < 1:
    cli.fail(f'--steps must be at least 1, got {FLAGS.steps}.')
  if FLAGS.batch_per_device < 0:
    cli.fail(
      f'--batch_per_device must be at least 0 (0: from train.batch_size), got '
      f'{FLAGS.batch_per_device}.'
    )
  host_malloc = cli.keep_freed_host_buffers()  # before JAX's CPU client starts its threads
  config = FLAGS.config
  if FLAGS.memory_only:
    train_lib.check_settings(config)  # as train.py, before any work
    print(json.dumps(memory_only(config, batch_per_device=FLAGS.batch_per_device)))
    return
  # As train.py: two data-parallel devices on a CPU of two or more cores (before JAX's backend
  # starts, which check_settings does).
  cli.split_cpu_devices(
    config.train.batch_size,
    config.mesh,
    distributed=False,
    copy_bytes=lambda: train_lib.replicated_bytes(config),
  )
  # Settings refused before the text cache is built and steps run, as train.py refuses them.
  train_lib.check_settings(config)
  train_lib.device_prefetch_size(config)
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
    steps = train_lib.CompiledSteps(step_fn)  # one compiled step per text length
    compiled, _, compile_s = steps.get(state, batch)
    xla_flops = train_lib.compiled_flops(compiled)
    model_config = stage.model_config(config)
    count = flops_lib.unet_flops(
      model_config,
      batch=batch['image'].shape[0],
      resolution=batch['image'].shape[1],
      text_len=batch['text_embs'].shape[1],
    )
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

    # End to end, as the training loop runs: batches assembled and put on the devices ahead by
    # a thread (data.device_prefetch), dispatch, metrics read one step late. A batch of a new
    # text length (data.text_length=batch) compiles its step first, outside the timing.
    on_device = train_lib.device_prefetch(config, it, batch_sh)
    try:
      state, m, step_s, recompile_s = time_end_to_end(steps, state, on_device, FLAGS.steps)
    finally:
      on_device.close()
  compute_s = statistics.median(fixed)
  bs = int(config.train.batch_size)
  kind, ndev = jax.devices()[0].device_kind, jax.device_count()
  model_flops = count.train
  hardware_flops = count.train_hardware(model_config.remat)
  mfu = flops_lib.utilization(model_flops, compute_s, ndev, kind)
  hfu = flops_lib.utilization(hardware_flops, compute_s, ndev, kind)
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
        'remat': bool(model_config.remat),
        'backend': jax.default_backend(),
        'device': kind,
        'devices': ndev,
        'host_malloc': host_malloc,
        'compile_s': round(compile_s, 1),
        'text_lengths': sorted(steps.text_lengths),  # of the compiled steps
        'recompile_s': round(recompile_s, 1),
        'step_s_end_to_end': round(step_s, 3),
        'step_s_compute_only': round(compute_s, 3),
        'data_s_per_batch': round(statistics.median(data_only), 4),
        'img_per_s': round(bs / step_s, 2),
        'model_tflop_per_step': float(f'{model_flops / 1e12:.4g}'),
        'hardware_tflop_per_step': float(f'{hardware_flops / 1e12:.4g}'),
        'model_tflops_per_s_per_device': float(f'{model_flops / compute_s / ndev / 1e12:.4g}'),
        'xla_flops_per_device': xla_flops,  # cost_analysis: see the docstring
        'mfu': round(mfu, 4) if mfu is not None else None,
        'hfu': round(hfu, 4) if hfu is not None else None,
        'loss_finite': bool(np.isfinite(float(m['loss']))),
      }
    )
  )


if __name__ == '__main__':
  cli.run(main)
