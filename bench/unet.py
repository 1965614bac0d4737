r"""U-Net train-step / sampling-step benchmark; prints ONE JSON line per (batch, remat) point.

Measures a jitted training step (donated state, pinned shardings) and one classifier-free-
guided sampling step (conditional and unconditional in one batch of 2B), plus XLA's memory
analysis of the compiled train step, on synthetic data (no text encoder, no dataset). The
training step is, by default (`--step train`), the one train.py runs:
`imagen_jax.train_lib.make_train_step` with the project's defaults for the preset's stage (the
stage's diffusion loss with min-SNR weighting and text dropout, noise-conditioning
augmentation of a 4x smaller low-res image for an SR preset, gradient clipping, the
optimizer and the EMA; the loop checks its loss and gradient norm). `--step bare` times only
the v-prediction MSE and the optimizer update, the step of the H100 rows in
docs/performance.md measured before `--step` existed; the two differ by the EMA (the logged
gradient norm is the one gradient clipping computes, merged by XLA; cost: `--profile_steps`,
phase 'optimizer').

  # Speed on this machine (CPU) or a GPU/TPU:
  python bench/unet.py --preset small64 --batch 4 --resolution 64 --dtype float32
  # Sweep: one line per point, each in its own process (clean peak memory; an out-of-memory
  # point prints its error and the sweep goes on). Pick the best images_per_s that fits:
  python bench/unet.py --preset base64 --dtype bfloat16 --batch 16,32,64 --remat none,block
  # Where the step's time goes (ms per step by kind of op and by phase; imagen_jax.op_profile):
  python bench/unet.py --preset base64 --dtype bfloat16 --batch 16 --profile_steps 3
  # Memory of a full-size model without allocating it (abstract params, compile only):
  python bench/unet.py --preset base64 --batch 32 --resolution 64 --dtype bfloat16 --remat \
      --mesh_fsdp 4 --fake_cpu_devices 4 --memory_only

Memory comes from `compiled.memory_analysis()` of the program compiled for the backend in
use. On CPU it overstates what a GPU/TPU needs: XLA:CPU removes remat's optimisation
barriers and schedules for concurrency, so `--remat` barely lowers its peak, bf16 convs
and attention logits are computed in f32, and attention holds one block of f32 logits at a
time (`cpu_attention`; cuDNN flash attention is used on GPU, Pallas splash attention on TPU).

FLOPs: `model_tflop_per_step` is the U-Net's model FLOPs counted from its config and shapes
(`imagen_jax.flops`, 3 x forward); `hardware_tflop_per_step` adds what remat recomputes (each
block's forward but its last linear op). MFU and HFU divide them by the step time, the device
count and the dense bf16 peak of the device kind (null where the peak table has no entry, CPU
included).
`xla_flops_per_step_per_device` is `cost_analysis()`, kept for reference only: it counts cuDNN
convolutions and fused attention as zero on GPU and includes remat recomputation on TPU.
`peak_memory_gb` is the device allocator's peak (`memory_stats()`; null where the backend
has none, as on CPU, and with --memory_only, which runs nothing). `fused_attention_in_hlo`
says whether the compiled train step calls a fused attention kernel (cuDNN's on GPU, a Mosaic
`tpu_custom_call` on TPU); `attention` gives the implementation each attention got. `compile`
and `sample_compile` say whether the train and sampling steps were compiled or loaded from the
persistent compilation cache (`--compilation_cache`; `imagen_jax.compile_events`): a second
start of a point with a cache should read 'loaded from the persistent compilation cache'.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

REMAT_CHOICES = ('none', 'block')
STEPS = ('train', 'bare')


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--preset', default='small64')
  p.add_argument(
    '--batch', default='4', help='global batch size, or a comma list to sweep (16,32,64)'
  )
  p.add_argument('--resolution', type=int, default=64)
  p.add_argument('--text_len', type=int, default=128)
  p.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  p.add_argument(
    '--remat',
    nargs='?',
    const='block',
    default='none',
    help="'none' | 'block' (remat every U-Net block; bare --remat = block) or a comma list",
  )
  p.add_argument('--optimizer', default='adamw', choices=('adamw', 'adafactor'))
  p.add_argument(
    '--step',
    default='train',
    choices=STEPS,
    help="'train': the step train.py runs (train_lib.make_train_step: EMA, gradient norm, ...); "
    "'bare': the loss and the optimizer update only (the earlier H100 rows in docs/performance.md)",
  )
  p.add_argument('--mesh_fsdp', type=int, default=1, help='fsdp axis size; data = the rest')
  p.add_argument('--steps', type=int, default=5, help='timed steps (after one warm-up)')
  p.add_argument('--memory_only', action='store_true', help='compile on abstract inputs only')
  p.add_argument(
    '--fake_cpu_devices',
    type=int,
    default=0,
    help='N > 0: force N host CPU devices (XLA_FLAGS); 0: as train.py chooses '
    '(imagen_jax.cpu_devices: two on a CPU of two or more cores when the batch is even)',
  )
  p.add_argument(
    '--profile_steps',
    type=int,
    default=0,
    help='N > 0: trace N more train steps with the profiler and add "profile": milliseconds per '
    'step by kind of op (conv, dot, attention, ...) and by phase (forward, backward, optimizer)',
  )
  p.add_argument(
    '--grad_layout',
    default='auto',
    help='how the gradients are fixed before the optimizer, one of imagen_jax.optim.'
    "GRADIENT_LAYOUTS (checked once jax is imported); 'auto', what training uses: 'barrier' on "
    "GPU, 'none' elsewhere",
  )
  p.add_argument(
    '--state_layout',
    default='auto',
    help='how params, EMA and optimizer state are laid out in device memory (train.state_layout), '
    "one of imagen_jax.sharding.STATE_LAYOUTS: 'default' (row-major), 'conv_ohwi' (conv kernels "
    "stored [O, kh, kw, I], as cuDNN takes them and returns their gradients) or 'auto', what "
    "training uses: 'conv_ohwi' on GPU, 'default' elsewhere",
  )
  p.add_argument(
    '--sample_steps',
    type=int,
    default=-1,
    help='timed guided sampling steps (-1 = as --steps; 0 = no sampling: sample_step_s null)',
  )
  p.add_argument(
    '--trace_dir',
    default='',
    help="with --profile_steps: keep the profiler trace in this directory ('' = a temporary "
    'one, deleted; the trace opens in Perfetto or TensorBoard)',
  )
  p.add_argument(
    '--compilation_cache',
    default='',
    help="JAX's persistent compilation cache directory ('' = off, the default: compile_s then "
    'measures a real compile; a second run of the same point with a cache shows the reload)',
  )
  args = p.parse_args(argv)
  try:
    args.batches = [int(b) for b in str(args.batch).split(',')]
  except ValueError:
    p.error(f'--batch {args.batch!r}: give an integer or a comma list of integers.')
  args.remats = str(args.remat).split(',')
  bad = [r for r in args.remats if r not in REMAT_CHOICES]
  if bad:
    p.error(f'--remat {args.remat!r}: choose from {", ".join(REMAT_CHOICES)} (comma list).')
  if args.steps < 1 or min(args.batches) < 1:
    p.error(f'--steps and --batch must be at least 1, got {args.steps} and {args.batch}.')
  for name, lowest in [
    ('resolution', 1),
    ('text_len', 1),
    ('mesh_fsdp', 1),
    ('fake_cpu_devices', 0),
    ('profile_steps', 0),
    ('sample_steps', -1),
  ]:
    if getattr(args, name) < lowest:
      p.error(f'--{name} must be at least {lowest}, got {getattr(args, name)}.')
  return args


def _child_error(proc: subprocess.CompletedProcess) -> str:
  """The line that says why a sweep point's process failed: its `error:` line or the exception
  (not JAX's note on filtered frames that follows a traceback), else its last lines."""
  lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
  notes = ('For simplicity, JAX has removed', 'Set JAX_TRACEBACK_FILTERING', '----')
  lines = [ln for ln in lines if not ln.startswith(notes)]
  errors = [ln for ln in lines if re.match(r'(error:|[\w.]*(Error|Exception)\b)', ln)]
  return (errors[-1] if errors else ' | '.join(lines[-3:]))[-600:] or f'exit {proc.returncode}'


def sweep(args) -> list[dict]:
  """Runs each (batch, remat) point in a fresh process; one JSON line per point."""
  keep = [
    f'--preset={args.preset}',
    f'--resolution={args.resolution}',
    f'--text_len={args.text_len}',
    f'--dtype={args.dtype}',
    f'--optimizer={args.optimizer}',
    f'--step={args.step}',
    f'--mesh_fsdp={args.mesh_fsdp}',
    f'--steps={args.steps}',
    f'--fake_cpu_devices={args.fake_cpu_devices}',
    f'--compilation_cache={args.compilation_cache}',
    f'--profile_steps={args.profile_steps}',
    f'--grad_layout={args.grad_layout}',
    f'--state_layout={args.state_layout}',
    f'--sample_steps={args.sample_steps}',
  ] + (['--memory_only'] if args.memory_only else [])
  results = []
  for remat in args.remats:
    for batch in args.batches:
      cmd = [sys.executable, os.path.abspath(__file__), *keep, f'--batch={batch}']
      cmd.append(f'--remat={remat}')
      if args.trace_dir:  # each point's trace and HLO in a folder of its own
        cmd.append(f'--trace_dir={os.path.join(args.trace_dir, f"b{batch}_{remat}")}')
      proc = subprocess.run(cmd, capture_output=True, text=True)
      lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('{')]
      if proc.returncode == 0 and lines:
        result = json.loads(lines[-1])
      else:
        result = {'preset': args.preset, 'batch': batch, 'remat': remat}
        result['error'] = _child_error(proc)
      print(json.dumps(result), flush=True)
      results.append(result)
  return results


def main(argv=None) -> dict | list[dict]:
  args = parse_args(argv)
  if len(args.batches) * len(args.remats) > 1:
    results = sweep(args)
    if all('error' in r for r in results):
      raise SystemExit(f'error: every point of the sweep failed; the first: {results[0]["error"]}')
    return results
  args.batch, args.remat = args.batches[0], args.remats[0] == 'block'
  if args.fake_cpu_devices > 0:
    flag = f'--xla_force_host_platform_device_count={args.fake_cpu_devices}'
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + flag).strip()
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  # This checkout's package first (an installed one may be another checkout's).
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from imagen_jax import cli

  host_malloc = cli.keep_freed_host_buffers()  # before JAX's CPU client starts its threads
  if args.fake_cpu_devices <= 0:  # as train.py: two devices on a CPU of two or more cores
    cli.split_cpu_devices(
      args.batch,
      {'data': -1, 'fsdp': args.mesh_fsdp},
      distributed=False,
      batch_name='--batch',
      one_device_mesh='--mesh_fsdp=1',
    )

  import dataclasses

  import jax
  import jax.numpy as jnp
  from flax import nnx

  if args.compilation_cache:
    jax.config.update('jax_compilation_cache_dir', os.path.expanduser(args.compilation_cache))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)

  from configs import common
  from imagen_jax import compile_events, device_memory, optim, sharding, stage, train_lib
  from imagen_jax import flops as flops_lib
  from imagen_jax.models import layers, unet

  if args.preset not in unet.PRESETS:
    cli.fail(f'Unknown --preset {args.preset!r}; choose from {sorted(unet.PRESETS)}.')
  if args.grad_layout not in optim.GRADIENT_LAYOUTS:
    cli.fail(
      f'Unknown --grad_layout {args.grad_layout!r}; choose from {list(optim.GRADIENT_LAYOUTS)}.'
    )
  if args.state_layout not in sharding.STATE_LAYOUTS:
    cli.fail(
      f'Unknown --state_layout {args.state_layout!r}; choose from {list(sharding.STATE_LAYOUTS)}.'
    )
  config = dataclasses.replace(unet.PRESETS[args.preset], dtype=args.dtype, remat=args.remat)
  factor = 2 ** (config.num_levels - 1)
  if config.lowres_cond and args.resolution < 4:
    cli.fail(
      f'--resolution {args.resolution} is too small for {args.preset}, a super-resolution '
      'preset: its low-res input is a quarter of --resolution wide, so give at least 4.'
    )
  if args.resolution % factor:
    cli.fail(
      f'--resolution {args.resolution} must be a multiple of {factor} for the '
      f'{config.num_levels} levels of {args.preset}.'
    )
  try:
    mesh = sharding.make_mesh({'data': -1, 'fsdp': args.mesh_fsdp})
  except ValueError as e:
    cli.fail(f'--mesh_fsdp {args.mesh_fsdp}: {e}')
  if args.batch % mesh.size:
    cli.fail(f'--batch {args.batch} must be divisible by the {mesh.size} devices.')
  # The project's optimizer defaults (configs/common.py); only the bench's choices differ.
  optim_config = common.get_common(
    stage='bench', preset=args.preset, resolution=args.resolution
  ).optim
  optim_config.optimizer = args.optimizer
  optim_config.lr = 1e-4
  optim_config.schedule = 'constant'
  optim_config.warmup_steps = 0
  tx = optim.make_optimizer(optim_config, num_steps=1000)
  b, r, c, n_text = args.batch, args.resolution, config.image_channels, args.text_len
  # The stage config train.py would get for this preset (the project's defaults), for
  # --step train; an SR preset gets Imagen's 4x smaller low-res input.
  low = r // 4 if config.lowres_cond else 0
  stage_config = common.get_common(
    stage='bench', preset=args.preset, resolution=r, lowres_resolution=low
  )
  stage_config.model = common.model_config(args.preset, dtype=args.dtype, remat=args.remat)
  stage_config.optim = optim_config
  stage_config.train.num_steps = 1000
  stage_config.train.state_layout = args.state_layout
  train_lib.check_settings(stage_config)

  graphdef, abstract_state, state_sh, init_state = train_lib.abstract_train_state(
    stage_config, tx, mesh
  )
  abstract_params = abstract_state['params']
  num_params = unet.count_params(abstract_params)
  param_sh, opt_sh = state_sh['params'], state_sh['opt_state']
  batch_sh = sharding.batch_sharding(mesh)
  repl = sharding.replicated(mesh)

  f32, bf16 = jnp.float32, jnp.bfloat16
  bare = args.step == 'bare'
  low = r if bare else low  # the bare step conditions on a full-size low-res image
  batch_shapes = {
    'image': jax.ShapeDtypeStruct((b, r, r, c), f32, sharding=batch_sh),
    # bfloat16, as the data pipeline delivers them (the T5 cache holds bf16).
    'text_embs': jax.ShapeDtypeStruct((b, n_text, config.text_dim), bf16, sharding=batch_sh),
    'text_mask': jax.ShapeDtypeStruct((b, n_text), jnp.bool_, sharding=batch_sh),
  }
  if config.lowres_cond:
    batch_shapes['lowres'] = jax.ShapeDtypeStruct((b, low, low, c), f32, sharding=batch_sh)
  batch_sh_tree = {k: batch_sh for k in batch_shapes}

  def apply(params, z, logsnr, batch, drop_text):
    model = nnx.merge(graphdef, params)
    extra = {}
    if config.lowres_cond:
      lowres = batch['lowres']
      if lowres.shape[1] != z.shape[1]:  # --step train's smaller input, upsampled as it does
        lowres = stage.upsample_lowres(lowres, resolution=z.shape[1])
      extra = dict(lowres=lowres, aug_level=jnp.full((z.shape[0],), 0.2, f32))
    return model(z, logsnr, batch['text_embs'], batch['text_mask'], drop_text=drop_text, **extra)

  def train_step(params, opt_state, batch, key):
    """v-prediction MSE at a random log-SNR (cosine schedule), 10% text dropout."""
    k_t, k_eps, k_drop = jax.random.split(key, 3)
    x = batch['image']
    t = jax.random.uniform(k_t, (x.shape[0],), minval=0.02, maxval=0.98)
    logsnr = -2.0 * jnp.log(jnp.tan(jnp.pi * t / 2))
    alpha = jnp.sqrt(jax.nn.sigmoid(logsnr))[:, None, None, None]
    sigma = jnp.sqrt(jax.nn.sigmoid(-logsnr))[:, None, None, None]
    eps = jax.random.normal(k_eps, x.shape)
    z = alpha * x + sigma * eps
    v = alpha * eps - sigma * x
    drop = jax.random.bernoulli(k_drop, 0.1, (x.shape[0],))

    def loss_fn(p):
      return jnp.mean(jnp.square(apply(p, z, logsnr, batch, drop) - v))

    loss, grads = jax.value_and_grad(loss_fn)(params)
    grads = optim.settle_gradients(grads, args.grad_layout)  # 'auto': as train_lib's step
    with jax.named_scope('optimizer'):  # the profile's 'optimizer' phase
      updates, opt_state = tx.update(grads, opt_state, params)
      params = jax.tree.map(lambda p, u: p + u, params, updates)
    return params, opt_state, loss

  def sample_step(params, z, batch, guidance):
    """One DDIM step from logsnr 0 to 1 with classifier-free guidance (2B batch)."""
    bsz = z.shape[0]
    logsnr = jnp.zeros((bsz,), f32)
    both = jax.tree.map(lambda a: jnp.concatenate([a, a]), batch)
    drop = jnp.concatenate([jnp.zeros((bsz,), bool), jnp.ones((bsz,), bool)])
    v_both = apply(params, jnp.concatenate([z, z]), jnp.concatenate([logsnr, logsnr]), both, drop)
    v_cond, v_uncond = jnp.split(v_both, 2)
    v = v_uncond + guidance * (v_cond - v_uncond)
    alpha = sigma = jnp.sqrt(0.5)
    x_pred, eps_pred = alpha * z - sigma * v, sigma * z + alpha * v
    a_s, s_s = jnp.sqrt(jax.nn.sigmoid(1.0)), jnp.sqrt(jax.nn.sigmoid(-1.0))
    return a_s * jnp.clip(x_pred, -1, 1) + s_s * eps_pred

  key_shape = jax.eval_shape(lambda: jax.random.key(0))
  abstract_key = jax.ShapeDtypeStruct(key_shape.shape, key_shape.dtype, sharding=repl)
  abstract_state_sh = train_lib.abstract_with_shardings(abstract_state, state_sh)

  with jax.set_mesh(mesh):
    if bare:
      train_jit = jax.jit(
        train_step,
        in_shardings=(param_sh, opt_sh, batch_sh_tree, repl),
        out_shardings=(param_sh, opt_sh, repl),
        donate_argnums=(0, 1),
      )
      abstract_args = (
        abstract_state_sh['params'],
        abstract_state_sh['opt_state'],
        batch_shapes,
        abstract_key,
      )
    else:
      train_jit = jax.jit(
        train_lib.make_train_step(stage_config, graphdef, tx, grad_layout=args.grad_layout),
        in_shardings=(state_sh, batch_sh_tree),
        out_shardings=(state_sh, repl),
        donate_argnums=(0,),
      )
      abstract_args = (abstract_state_sh, batch_shapes)
    t0 = time.perf_counter()
    with layers.record_attention_plans() as plans:
      lowered = train_jit.lower(*abstract_args)
    with compile_events.counting() as train_made:
      compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    hlo = compiled.as_text() or ''
    attention = {}  # name -> implementation (traced once per compile; names repeat under grad)
    for plan in plans:
      attention[plan['name']] = plan['implementation']
    attention_counts = {}
    for impl in attention.values():
      attention_counts[impl] = attention_counts.get(impl, 0) + 1

    mem = device_memory.analyse(compiled)
    memory = None
    if mem is not None:
      memory = {**mem.as_gb(digits=6), 'total_bytes': mem.total, 'per_device': True}
    xla_flops = train_lib.compiled_flops(compiled)
    count = flops_lib.unet_flops(config, batch=b, resolution=r, text_len=n_text)
    model_flops, hardware_flops = count.train, count.train_hardware(config.remat)
    kind = jax.devices()[0].device_kind

    result = {
      'preset': args.preset,
      'params': int(num_params),
      'batch': b,
      'resolution': r,
      'dtype': args.dtype,
      'remat': 'block' if args.remat else 'none',
      'optimizer': args.optimizer,
      'step': args.step,
      'grad_layout': optim.gradient_layout(args.grad_layout),
      'state_layout': sharding.state_layout(args.state_layout),
      'mesh': dict(mesh.shape),
      'backend': jax.default_backend(),
      'jax': jax.__version__,
      'host_malloc': host_malloc,
      'device_kind': kind,
      'devices': jax.device_count(),
      'compile_s': round(compile_s, 2),
      'compile': train_made.summary(),  # or 'loaded from the persistent compilation cache'
      'memory': memory,
      'peak_memory_gb': None,
      'model_tflop_per_step': float(f'{model_flops / 1e12:.4g}'),
      'hardware_tflop_per_step': float(f'{hardware_flops / 1e12:.4g}'),
      'xla_flops_per_step_per_device': xla_flops,
      'fused_attention_in_hlo': any(m in hlo for m in layers.FUSED_ATTENTION_MARKERS.values()),
      # custom calls of the fused kernels in the compiled step (forward and backward each count)
      'fused_attention_calls': sum(
        hlo.count(f'custom_call_target="{m}') for m in layers.FUSED_ATTENTION_MARKERS.values()
      ),
      'attention': attention_counts,
      'train_step_s': None,
      'sample_step_s': None,
      'images_per_s': None,
      'model_tflops_per_s_per_device': None,
      'mfu': None,
      'hfu': None,
      'memory_only': args.memory_only,
    }

    if not args.memory_only:
      if bare:  # params and optimizer state only, as the earlier rows (no EMA on the device)
        init_params = lambda: stage.init_params(stage_config, jax.random.key(0))  # noqa: E731
        params = jax.jit(init_params, out_shardings=sharding.plain_shardings(param_sh))()
        opt_state = jax.jit(tx.init, out_shardings=sharding.plain_shardings(opt_sh))(params)
        state = {'params': params, 'opt_state': opt_state}
        state = sharding.relayout(state, {'params': param_sh, 'opt_state': opt_sh})
      else:
        state = init_state()  # params, EMA and optimizer state, made in their shards
      data_key = jax.random.key(1)
      ks = jax.random.split(data_key, 4)
      batch = {
        'image': jax.random.uniform(ks[0], (b, r, r, c), f32, -1, 1),
        'text_embs': jax.random.normal(ks[1], (b, n_text, config.text_dim), bf16),
        'text_mask': jnp.arange(n_text)[None, :] < jnp.arange(b)[:, None] % n_text + 8,
      }
      if config.lowres_cond:
        batch['lowres'] = jax.random.uniform(ks[2], (b, low, low, c), f32, -1, 1)
      batch = jax.device_put(batch, batch_sh_tree)
      finite = []

      def run_step(i):
        """One train step on the state; its loss (ready)."""
        nonlocal state
        if bare:
          params, opt_state, loss = compiled(
            state['params'], state['opt_state'], batch, jax.random.key(i)
          )
          state = {**state, 'params': params, 'opt_state': opt_state}
        else:
          state, metrics = compiled(state, batch)
          loss = metrics['loss']
          finite.append(jnp.isfinite(metrics['loss']) & jnp.isfinite(metrics['grad_norm']))
        return jax.block_until_ready(loss)

      times = []
      for i in range(args.steps + 1):
        t0 = time.perf_counter()
        loss = run_step(i)
        times.append(time.perf_counter() - t0)
      train_s = statistics.median(times[1:])
      params = state['params']

      cond = {k: v for k, v in batch.items() if k != 'image'}
      z = jax.device_put(jax.random.normal(ks[3], (b, r, r, c), f32), batch_sh)
      cond_sh = {k: batch_sh for k in cond}
      sample_jit = jax.jit(
        sample_step, in_shardings=(param_sh, batch_sh, cond_sh, None), out_shardings=batch_sh
      )
      sample_steps = max(args.steps, 1) if args.sample_steps < 0 else args.sample_steps
      stimes = []
      if sample_steps:
        t0 = time.perf_counter()
        with compile_events.counting() as sample_made:
          jax.block_until_ready(sample_jit(params, z, cond, 5.0))
        result['sample_compile_s'] = round(time.perf_counter() - t0, 2)
        result['sample_compile'] = sample_made.summary()
      for _ in range(sample_steps):
        t0 = time.perf_counter()
        jax.block_until_ready(sample_jit(params, z, cond, 5.0))
        stimes.append(time.perf_counter() - t0)

      if args.profile_steps > 0:
        import contextlib
        import tempfile

        from imagen_jax import op_profile

        keep = contextlib.nullcontext(args.trace_dir) if args.trace_dir else None
        with keep or tempfile.TemporaryDirectory() as trace_dir:
          if args.trace_dir:  # the HLO that maps the trace's kernels to ops, for op_profile
            os.makedirs(trace_dir, exist_ok=True)
            with open(os.path.join(trace_dir, 'train_step.hlo.txt'), 'w') as f:
              f.write(hlo)
          with op_profile.traced(trace_dir):
            for i in range(args.profile_steps):
              run_step(i)
          try:  # a profile that cannot be read must not cost the point's timings
            result['profile'] = op_profile.summarize(trace_dir, hlo, steps=args.profile_steps)
          except (OSError, ValueError) as e:
            result['profile'] = {'error': f'{type(e).__name__}: {e}'}

      result['train_step_s'] = round(train_s, 4)
      result['sample_step_s'] = round(statistics.median(stimes), 4) if stimes else None
      result['images_per_s'] = round(b / train_s, 3)
      result['final_loss'] = float(loss)
      # --step train: every timed step's loss and gradient norm finite (what train.py checks).
      result['all_steps_finite'] = None if bare else bool(all(jax.device_get(finite)))
      ndev = jax.device_count()
      result['model_tflops_per_s_per_device'] = float(f'{model_flops / train_s / ndev / 1e12:.4g}')
      mfu = flops_lib.utilization(model_flops, train_s, ndev, kind)
      hfu = flops_lib.utilization(hardware_flops, train_s, ndev, kind)
      result['mfu'] = None if mfu is None else round(mfu, 4)
      result['hfu'] = None if hfu is None else round(hfu, 4)
      # The allocator's peak over the steps run (--memory_only runs none: it stays null).
      stats = jax.devices()[0].memory_stats() or {}
      if 'peak_bytes_in_use' in stats:
        result['peak_memory_gb'] = round(stats['peak_bytes_in_use'] / 1e9, 3)

  print(json.dumps(result))
  return result


if __name__ == '__main__':
  main()
