"""Flax NNX models: the Efficient U-Net and its building blocks."""

from imagen_jax.models.unet import PRESETS, UNet, UNetConfig, config_from_dict, count_params

__all__ = ['PRESETS', 'UNet', 'UNetConfig', 'config_from_dict', 'count_params']
