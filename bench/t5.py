"""T5 encoder throughput and memory. Prints ONE JSON line on stdout.

  python bench/t5.py --encoder t5-tiny-random --batch 32 --max_length 128
  python bench/t5.py --synthetic_config small --batch 32 --steps 3     # real shapes, random weights
  python bench/t5.py --synthetic_config xxl --memory_only              # abstract: no allocation
  python bench/t5.py --synthetic_config xxl --memory_only --host_devices 8   # per-device, sharded

--encoder takes 't5-tiny-random', a local checkpoint folder or a hub name. --synthetic_config
builds google/t5-v1_1-{small,base,large,xl,xxl}'s encoder shapes with random weights (nothing
to download). --memory_only lowers and compiles with abstract parameters and reports XLA's
memory analysis without materialising them. Throughput uses full-length token batches (the
worst case), timing only the encoder (tokenisation excluded; `tokenize_per_s` reports it).
"""

import argparse
import json
import os
import sys
import time


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--encoder', default='t5-tiny-random')
  parser.add_argument(
    '--synthetic_config', default='', choices=['', 'small', 'base', 'large', 'xl', 'xxl']
  )
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--max_length', type=int, default=128)
  parser.add_argument('--dtype', default='bfloat16', choices=['bfloat16', 'float32'])
  parser.add_argument('--steps', type=int, default=5, help='timed encoder calls')
  parser.add_argument('--memory_only', action='store_true')
  parser.add_argument(
    '--host_devices', type=int, default=0, help='CPU only: fake N devices (a data-axis mesh)'
  )
  args = parser.parse_args(argv)
  if args.steps < 1 or args.batch < 1:
    parser.error(f'--steps and --batch must be at least 1, got {args.steps} and {args.batch}.')
  if args.memory_only and not args.synthetic_config:
    parser.error(
      '--memory_only needs --synthetic_config (it compiles on abstract shapes, without loading '
      'weights), e.g. --synthetic_config=xxl.'
    )
  if args.max_length < 1 or args.host_devices < 0:
    parser.error(
      f'--max_length must be at least 1 and --host_devices at least 0, got {args.max_length} '
      f'and {args.host_devices}.'
    )
  return args


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.host_devices:
    flag = f'--xla_force_host_platform_device_count={args.host_devices}'
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + flag).strip()
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

  import jax
  import numpy as np
  from flax import nnx

  from imagen_jax import cli, device_memory
  from imagen_jax.text import encoder as encoder_lib
  from imagen_jax.text import t5

  devices = jax.devices()
  mesh = None
  if len(devices) > 1:
    auto = jax.sharding.AxisType.Auto
    mesh = jax.make_mesh((len(devices), 1), ('data', 'fsdp'), axis_types=(auto, auto))
  batch = -(-args.batch // len(devices)) * len(devices)

  result = {
    'encoder': args.encoder if not args.synthetic_config else f'synthetic-{args.synthetic_config}',
    'batch': batch,
    'max_length': args.max_length,
    'dtype': args.dtype,
    'backend': jax.default_backend(),
    'devices': len(devices),
    'device_kind': devices[0].device_kind,
  }

  t0 = time.perf_counter()
  if args.memory_only:
    config = t5.T5_V1_1_CONFIGS[args.synthetic_config]
    graphdef, abstract_state = nnx.split(
      nnx.eval_shape(
        lambda: t5.T5Encoder(config, dtype=args.dtype, param_dtype=args.dtype, rngs=nnx.Rngs(0))
      )
    )
    m = t5.auto_mesh(mesh) if mesh is not None else None
    state = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=t5.param_sharding(a.shape, m)),
      abstract_state,
    )
    lowered = encoder_lib.lower_encoder(
      graphdef, state, batch=batch, length=args.max_length, mesh=m
    )
    param_bytes = device_memory.tree_bytes(abstract_state)
  else:
    if args.synthetic_config:
      config = t5.T5_V1_1_CONFIGS[args.synthetic_config]
      model = t5.random_encoder(config, dtype=args.dtype, mesh=mesh)
      tokenizer = encoder_lib.tokenizer_lib.load_tokenizer('byt5', max_length=args.max_length)
      encoder = encoder_lib.TextEncoder(result['encoder'], model, tokenizer, mesh=mesh)
    else:
      try:
        encoder = encoder_lib.load_text_encoder(
          args.encoder, max_length=args.max_length, dtype=args.dtype, mesh=mesh
        )
      except t5.T5CheckpointError as e:  # a missing folder, a damaged or unreachable checkpoint
        cli.fail(f'--encoder {args.encoder}: ' + ' '.join(str(e).split()))  # one line
    config = encoder.config
    result['load_s'] = round(time.perf_counter() - t0, 3)
    lowered = encoder.lower(batch)
    param_bytes = encoder.param_bytes()

  t1 = time.perf_counter()
  compiled = lowered.compile()
  result['compile_s'] = round(time.perf_counter() - t1, 3)
  result['params'] = config.num_params()
  result['param_bytes'] = int(param_bytes)
  memory = compiled.memory_analysis()
  if memory is not None:
    result['compiled_memory'] = {
      'argument_bytes': int(memory.argument_size_in_bytes),
      'output_bytes': int(memory.output_size_in_bytes),
      'temp_bytes': int(memory.temp_size_in_bytes),
      'generated_code_bytes': int(memory.generated_code_size_in_bytes),
    }
    # Per device: arguments (params + tokens) + outputs + temporaries.
    result['compiled_memory']['total_per_device_gib'] = round(
      (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes)
      / 2**30,
      3,
    )

  if not args.memory_only:
    rng = np.random.default_rng(0)
    vocab = min(encoder.tokenizer.vocab_size, config.vocab_size)
    ids = rng.integers(3, vocab, size=(batch, args.max_length)).astype(np.int32)
    mask = np.ones((batch, args.max_length), bool)
    encoder.encode_tokens(ids, mask)  # warm-up (and the jit-cache compile)
    t2 = time.perf_counter()
    for _ in range(args.steps):
      out = encoder.encode_tokens(ids, mask)
    elapsed = time.perf_counter() - t2
    assert np.isfinite(out).all(), 'non-finite embeddings'
    result['step_s'] = round(elapsed / args.steps, 4)
    result['captions_per_s'] = round(batch * args.steps / elapsed, 2)
    result['tokens_per_s'] = round(batch * args.max_length * args.steps / elapsed, 1)
    captions = [f'a photo of object number {i} on a table' for i in range(batch)]
    t3 = time.perf_counter()
    encoder.tokenizer(captions)
    result['tokenize_per_s'] = round(batch / (time.perf_counter() - t3), 1)
  print(json.dumps(result))


if __name__ == '__main__':
  main()
