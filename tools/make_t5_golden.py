"""Writes the golden T5 encoder outputs that tests/t5_test.py checks our encoder against.

Reference: Hugging Face's T5 encoder. transformers v5 has only the PyTorch T5 and PyPI's
Linux torch wheel is the multi-GB CUDA build (the CPU build lives only on PyTorch's own
index, which this environment cannot reach), so the reference is HF's `FlaxT5EncoderModel`
from transformers 4.57, run on an old jax that it still supports. It runs in a THROWAWAY
venv, never the project's:

  python3 -m venv /tmp/goldenvenv
  /tmp/goldenvenv/bin/pip install "transformers==4.57.*" "jax==0.4.38" "jaxlib==0.4.38" \
      "flax==0.10.2" safetensors numpy
  /tmp/goldenvenv/bin/python tools/make_t5_golden.py --out tests/fixtures/t5_golden

(generated with transformers 4.57.6, jax/jaxlib 0.4.38, flax 0.10.2, numpy 2.4, CPU.)

For each variant, 'v1_0' (ReLU feed-forward, like t5-small) and 'v1_1' (gated-GELU, like
google/t5-v1_1-*), it writes <out>/<variant>/ with
  config.json         a tiny Hugging Face T5 config
  model.safetensors   random float32 weights under the PyTorch T5 tensor names
                      ([out, in] matrices, `shared.weight`), as a real checkpoint has them
  input_ids.npy       [B, L] int32 token ids (0 = pad at masked positions)
  mask.npy            [B, L] bool, True on real tokens
  golden.npy          [B, L, D] float32 `last_hidden_state` of the reference encoder
Every weight is random, layer-norm scales included (1 + 0.1 * noise), so each one matters.
The bucket settings (16 buckets, max distance 12, length 20) exercise the exact, log-spaced
and clamped bucket ranges.
"""

import argparse
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from flax.traverse_util import flatten_dict, unflatten_dict
from safetensors.numpy import save_file

VARIANTS = {'v1_0': 'relu', 'v1_1': 'gated-gelu'}
BATCH, LENGTH = 3, 20
LENGTHS = (20, 13, 5)  # real tokens per row


def hf_config(feed_forward_proj: str) -> transformers.T5Config:
  return transformers.T5Config(
    vocab_size=64,
    d_model=32,
    d_kv=8,
    d_ff=48,
    num_layers=3,
    num_decoder_layers=3,
    num_heads=4,
    relative_attention_num_buckets=16,
    relative_attention_max_distance=12,
    feed_forward_proj=feed_forward_proj,
    layer_norm_epsilon=1e-6,
    dropout_rate=0.0,
    architectures=['T5EncoderModel'],
  )


def flax_to_pytorch_names(params: dict) -> dict[str, np.ndarray]:
  """Flax T5 param tree -> PyTorch state-dict names (kernels transposed to [out, in])."""
  out = {}
  for path, value in flatten_dict(params).items():
    value = np.asarray(value, np.float32)
    *prefix, leaf = path
    if leaf == 'kernel':
      value = value.T
    name = '.'.join([*prefix, 'weight'])
    out[name] = np.ascontiguousarray(value)
  return out


def make_variant(out_dir: pathlib.Path, feed_forward_proj: str, seed: int) -> None:
  config = hf_config(feed_forward_proj)
  model = transformers.FlaxT5EncoderModel(config, seed=seed, dtype=jnp.float32)
  rng = np.random.default_rng(seed)

  def randomize(path, leaf):
    leaf = np.asarray(leaf)
    if path[-1] == 'weight' and 'layer_norm' in '.'.join(path):  # RMS-norm scales
      return (1.0 + 0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)
    scale = 1.0 if path[-1] == 'embedding' and path[0] == 'shared' else leaf.shape[0] ** -0.5
    return (scale * rng.standard_normal(leaf.shape)).astype(np.float32)

  flat = flatten_dict(model.params)
  params = unflatten_dict({k: randomize(k, v) for k, v in sorted(flat.items())})

  input_ids = rng.integers(2, config.vocab_size, size=(BATCH, LENGTH)).astype(np.int32)
  mask = np.arange(LENGTH)[None, :] < np.array(LENGTHS)[:, None]
  input_ids = np.where(mask, input_ids, 0).astype(np.int32)
  input_ids[np.arange(BATCH), np.array(LENGTHS) - 1] = 1  # EOS closes each caption

  with jax.default_matmul_precision('highest'):
    golden = model(
      jnp.asarray(input_ids), attention_mask=jnp.asarray(mask, jnp.int32), params=params
    ).last_hidden_state
  golden = np.asarray(golden, np.float32)

  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / 'config.json').write_text(config.to_json_string())
  save_file(flax_to_pytorch_names(params), str(out_dir / 'model.safetensors'))
  np.save(out_dir / 'input_ids.npy', input_ids)
  np.save(out_dir / 'mask.npy', mask)
  np.save(out_dir / 'golden.npy', golden)
  print(
    json.dumps({'variant': str(out_dir), 'golden_shape': golden.shape, 'std': float(golden.std())})
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', default='tests/fixtures/t5_golden')
  args = parser.parse_args()
  for i, (variant, proj) in enumerate(VARIANTS.items()):
    make_variant(pathlib.Path(args.out) / variant, proj, seed=i)


if __name__ == '__main__':
  main()
