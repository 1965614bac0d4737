"""Shared defaults for every cascade stage. Stage files (base64.py, sr256.py, sr1024.py)
start from `get_common(...)` and change only what differs.

Configs hold data, not code paths: the model section is a copy of a U-Net preset's fields,
so any field can be overridden on the command line, e.g. `--config.model.dim=96`.
"""

import dataclasses

import ml_collections

from imagen_jax.models import unet


def model_config(preset: str, **overrides) -> ml_collections.ConfigDict:
  """The fields of U-Net preset `preset` as a ConfigDict (tuples kept as tuples)."""
  fields = dataclasses.asdict(unet.PRESETS[preset])
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def get_common(
  *,
  stage: str,
  preset: str,
  resolution: int,
  lowres_resolution: int = 0,
) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = stage  # 'base64' | 'sr256' | 'sr1024'
  c.seed = 0

  c.model = model_config(preset)
  c.model_preset = preset  # a label: config.model defines the network (train.py's log compares)

  # Diffusion (imagen_jax.diffusion): continuous time, log-SNR schedules.
  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.schedule = 'cosine'  # 'cosine' | 'linear' | 'shifted_cosine'
  c.diffusion.shift_base = 64  # shifted_cosine: logsnr += 2 * log(shift_base / resolution)
  c.diffusion.logsnr_min = -20.0
  c.diffusion.logsnr_max = 20.0
  c.diffusion.objective = 'v'  # 'eps' | 'v' | 'x0'
  c.diffusion.loss_weighting = 'min_snr'  # 'min_snr' | 'none'
  c.diffusion.min_snr_gamma = 5.0
  c.diffusion.cond_drop_prob = 0.1  # text dropped per example, for classifier-free guidance
  # SR noise-conditioning augmentation, on its own schedule (the same for every stage, see
  # guidance.aug_schedule): level 0.1 -> alpha 0.95, 0.2 -> 0.82, 0.5 -> 0.29.
  c.diffusion.aug_schedule = 'linear'  # 'linear' | 'stage' (runs made before this field)
  c.diffusion.aug_level_min = 0.0  # SR: training level ~ U[aug_level_min, aug_level_max]
  c.diffusion.aug_level_max = 0.5

  # Text: frozen encoder, embeddings precomputed once into an on-disk cache.
  c.text = ml_collections.ConfigDict()
  c.text.encoder = 'google/t5-v1_1-xxl'  # hub name, local folder, or 't5-tiny-random'
  c.text.max_length = 128
  # A Hub revision (branch, tag, commit or 'refs/pr/<n>') of text.encoder; '' for the default
  # branch. Some repos keep their safetensors weights off the default branch.
  c.text.revision = ''
  # Root, one sub-folder per (encoder, max_len, data); a relative path is taken relative to the
  # workdir. Give an absolute path to share one cache between runs and stages.
  c.text.cache_dir = 'cache/embeddings'
  c.text.precompute_batch_size = 64
  c.text.dtype = 'bfloat16'  # encoder compute / parameter dtype during precompute
  c.text.cache_shard_size = 4096  # captions per cache shard
  c.text.auto_precompute = True  # train.py runs precompute when the cache is missing

  # Data.
  c.data = ml_collections.ConfigDict()
  # 'openmoji' | 'folder' | 'hf' | 'tfds' | 'digits' | 'webdataset' | 'arrayrecord'
  c.data.source = 'openmoji'
  # folder path, HF dataset name or path, tfds name, or tar / array_record shards: a folder,
  # a brace pattern 'shards/{00000..00099}.tar' or a glob
  c.data.path = ''
  c.data.index_dir = ''  # webdataset: keep the per-tar member index here ('' = not saved)
  c.data.data_dir = ''  # tfds data_dir (default: TFDS_DATA_DIR or tfds' own default)
  c.data.split = 'train'
  c.data.image_column = 'image'
  c.data.caption_column = 'text'
  c.data.render_cache_dir = 'cache/openmoji'  # embedded set rendered once (relative: to the cwd)
  c.data.resolution = resolution
  c.data.lowres_resolution = lowres_resolution  # 0 for the base stage
  c.data.random_crop = lowres_resolution > 0  # SR stages train on random crops
  # Images whose shorter side is below resolution: 'skip' (dropped when the dataset is listed,
  # counted in one log line) | 'upsample'. They never count toward max_skip_fraction.
  c.data.small_images = 'skip'
  # 0: train on whole resolution x resolution images. 0 < crop_size < resolution: train on
  # crop_size crops of them (and the matching low-res crops); the noise schedule and sampling
  # stay at resolution. Only for U-Nets without self-attention (refused otherwise).
  c.data.crop_size = 0
  c.data.max_skip_fraction = 0.01  # unreadable / broken files
  c.data.max_examples = 0  # 0: all
  c.data.num_workers = 0  # grain worker processes; 0 reads in the main process
  c.data.prefetch = 2  # host batches read ahead by grain's threads
  # Batches assembled and copied to the devices ahead of the train step by one thread
  # (train_lib.device_prefetch), so the step never waits on the host; 0: in the step's thread.
  c.data.device_prefetch = 2
  # Text length L of training batches: 'batch' (each batch's longest caption, rounded up to a
  # bucket: 8, 16, 32, ...; one compiled step per bucket) | 'run' (the run's longest caption) |
  # 'auto': 'batch' on one process with an accelerator, 'run' on CPU or several processes.
  c.data.text_length = 'auto'

  # Optimisation.
  c.optim = ml_collections.ConfigDict()
  c.optim.optimizer = 'adamw'  # 'adamw' | 'adafactor'
  c.optim.lr = 1e-4
  c.optim.schedule = 'cosine'  # 'cosine' | 'constant'
  c.optim.warmup_steps = 1000
  c.optim.min_lr_ratio = 0.1
  c.optim.b1 = 0.9  # b1, b2, eps: AdamW's (adafactor refuses other values: it never reads them)
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.adafactor_min_dim = 128  # adafactor: factor the moments of dims at least this large
  c.optim.adafactor_decay_rate = 0.8  # adafactor: the second moments' decay exponent
  c.optim.adafactor_momentum = 0.0  # adafactor: a first moment's decay (0: none, the default)
  c.optim.weight_decay = 0.0
  c.optim.grad_clip = 1.0
  c.optim.grad_accum_steps = 1
  c.optim.ema_decay = 0.9999
  c.optim.ema_warmup = True  # decay = min(ema_decay, (1 + step) / (10 + step))

  # Training loop.
  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 64  # global batch, split over the mesh's data axes
  c.train.num_steps = 500_000
  c.train.log_every = 50
  c.train.checkpoint_every = 2000
  c.train.keep_checkpoints = 3
  c.train.resume_step = 0  # 0: the newest checkpoint that verifies; N: resume from kept step N
  c.train.sample_every = 5000  # sample grids from EMA params; 0: off
  c.train.sample_prompts = ()  # empty: the first captions of the dataset
  c.train.num_sample_prompts = 8
  # Quality evaluation on the labelled digits (imagen_jax.evaluate; data.source='digits' only):
  # every eval_every steps (0: off), eval_num samples (a multiple of 10, >= 20), fixed prompts/seed.
  c.train.eval_every = 0
  c.train.eval_num = 40
  c.train.eval_judge_dir = 'cache/judge'  # judge cache; relative: relative to the workdir
  # Device memory layout of params, EMA and optimizer state (imagen_jax.sharding.STATE_LAYOUTS):
  # 'auto' = 'conv_ohwi' on GPU (conv kernels stored [O, kh, kw, I], as cuDNN takes them: no
  # transposes around the optimizer), 'default' (row-major) elsewhere. Values are the same.
  c.train.state_layout = 'auto'
  c.train.wandb = False
  c.train.wandb_project = 'imagen-jax'
  c.train.wandb_mode = 'online'  # 'online' | 'offline' | 'disabled'

  # Device mesh: sizes per axis; -1 takes the remaining devices.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1

  # Sampling defaults (used by periodic sample grids and sample.py).
  c.sample = ml_collections.ConfigDict()
  c.sample.sampler = 'dpmpp_2m'  # 'ddpm' | 'ddim' | 'dpmpp_2m' | 'heun'
  c.sample.steps = 25
  # Sampling grid (schedules.logsnr_grid), separate from the training schedule: 'quad' | 'time' |
  # 'logsnr' | 'karras'; 'auto' is karras for heun, quad otherwise. With the unshifted cosine
  # put the last of 25 calls at logsnr 10.6 and 9.6 (tools/print_grids.py prints every stage's).
  c.sample.grid = 'auto'
  c.sample.guidance = 5.0
  c.sample.thresholding = 'dynamic'  # 'dynamic' | 'static' | 'none'
  c.sample.dynamic_percentile = 0.995
  c.sample.dynamic_max = 0.0  # upper clamp c on the dynamic threshold (>= 1); 0: no clamp
  c.sample.aug_level = 0.2  # SR stages: noise-conditioning level at sampling (alpha 0.82)
  return c


def use_offline_text(c: ml_collections.ConfigDict, *, max_length: int) -> None:
  """The offline, untrained 't5-tiny-random' encoder (32-wide): demos and tests, no download."""
  c.text.encoder = 't5-tiny-random'
  c.text.max_length = max_length
  c.model.text_dim = 32


def use_cpu_unet(c: ml_collections.ConfigDict) -> None:
  """The 2.4M-parameter U-Net (small64 narrowed) of the CPU demo and the digits recipe."""
  c.model.dim = 32
  c.model.channel_mults = (1, 2, 4)
  c.model.num_res_blocks = 1
  c.model.attn_levels = (2,)
  c.model.cross_attn_levels = (1, 2)
  c.model.num_heads = 2
  c.model.head_dim = 32
  c.model.cond_dim = 128


def use_tiny_run(c: ml_collections.ConfigDict) -> None:
  """The smallest end-to-end run (tests, CI): 32 examples, 4 steps, a checkpoint every 2."""
  use_offline_text(c, max_length=16)
  c.data.max_examples = 32
  c.data.max_skip_fraction = 0.5
  c.train.batch_size = 4
  c.train.num_steps = 4
  c.train.log_every = 1
  c.train.checkpoint_every = 2
  c.train.sample_every = 0
  c.train.num_sample_prompts = 2
  c.optim.warmup_steps = 2
  c.optim.lr = 1e-3
  c.optim.ema_decay = 0.9
  c.sample.steps = 4
