"""Converters from other frameworks' pretrained weights to mav_jax model folders.

`python -m mav_jax.convert karlo --source DIR --output OUT` imports Kakao Brain's Karlo (unCLIP,
diffusers layout); `common.StateReader` reads a PyTorch state dict tensor by tensor so that every
source tensor is used exactly once and anything missing or left over is named.
"""
