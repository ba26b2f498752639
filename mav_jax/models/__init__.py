"""Pure Flax Linen modules: the factorised space-time UNet and its layers."""

from mav_jax.models.inflate import inflate_image_params, is_temporal
from mav_jax.models.unet import SpaceTimeUNet, unet_from_config

__all__ = ["SpaceTimeUNet", "inflate_image_params", "is_temporal", "unet_from_config"]
