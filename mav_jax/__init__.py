"""mav_jax: Make-A-Video (text-to-video diffusion cascade) in JAX/Flax."""

__version__ = "0.1.0"
