"""Loading image-model weights into a video model ("inflation").

An image model is the same `SpaceTimeUNet` initialised with `image_mode=True` (and typically without
video-only conditions such as fps): its parameter tree is a subset of the video model's. Inflation
copies every image parameter into the video tree and keeps the video model's fresh parameters for the
rest, which are exactly the temporal layers (identity at init) and zero-initialised new conditions.
"""

from typing import Any

import flax.linen as nn
from flax import traverse_util

from mav_jax import errors

Params = Any
Path = tuple[str, ...]

TEMPORAL_PREFIX = "temporal_"


def is_temporal(path: Path) -> bool:
  """True for a parameter of a temporal layer (temporal conv, attention, norm or position bias)."""
  return any(part.startswith(TEMPORAL_PREFIX) for part in path)


def inflate_image_params(image_params: Params, video_params: Params) -> tuple[Params, list[Path]]:
  """Copies an image model's parameters into a freshly initialised video model's tree.

  Args:
    image_params: parameter tree of the image model (boxed or plain arrays).
    video_params: freshly initialised parameter tree of the video model (boxed or plain).

  Returns:
    (params, new_paths): the video tree (plain arrays) with every image parameter copied in, and the
    sorted paths that the image model did not have (to train, or to freeze the others). The result
    is placed like its inputs; a sharded trainer runs this inside `jax.jit` with the video model's
    `out_shardings` (from `jax.eval_shape` of its init) so no host holds the whole model.

  Raises:
    ValueError: if the image tree has parameters the video model lacks, or shapes disagree; the
      message lists them (a sign of mismatched model configs).
  """
  image = traverse_util.flatten_dict(nn.unbox(image_params))
  video = traverse_util.flatten_dict(nn.unbox(video_params))
  extra = sorted("/".join(p) for p in image if p not in video)
  if extra:
    raise errors.UserError(
      f"image parameters missing from the video model (do the configs match?): "
      f"{extra[:10]}{' ...' if len(extra) > 10 else ''}"
    )
  mismatched = [
    f"{'/'.join(p)}: image {image[p].shape} vs video {video[p].shape}"
    for p in image
    if image[p].shape != video[p].shape
  ]
  if mismatched:
    raise errors.UserError(
      f"parameter shapes differ between image and video model: {mismatched[:10]}"
    )
  merged = {p: image.get(p, v).astype(v.dtype) for p, v in video.items()}
  new_paths = sorted(p for p in video if p not in image)
  return traverse_util.unflatten_dict(merged), new_paths
