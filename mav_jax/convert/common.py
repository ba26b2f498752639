"""Reading a PyTorch state dict onto a Flax parameter tree, one tensor at a time.

`StateReader` hands out each source tensor once, in float32 and in Flax's layout (linear (out, in)
-> kernel (in, out); conv (O, I, kh, kw) -> (kh, kw, I, O); norm weight -> scale; attention
projections split into heads contiguously, as diffusers' and Hugging Face's `head_to_batch_dim`
split them), checks the shape it expects, and at the end names every tensor it did not use.
"""

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from mav_jax import errors


class StateReader:
  """One component's state dict (name -> array-like, e.g. torch tensors or numpy arrays).

  Args:
    state: the tensors.
    what: the component, for messages ("the decoder (decoder/diffusion_pytorch_model.safetensors)").
    ignore: name suffixes of buffers that carry no weights (never reported as left over).
  """

  def __init__(self, state: Mapping[str, Any], what: str, ignore: Iterable[str] = ()):
    self.state = state
    self.what = what
    self.ignore = tuple(ignore)
    self.used: set[str] = set()

  def has(self, name: str) -> bool:
    return name in self.state

  def take(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """The tensor `name` as float32 numpy (in the source layout), checked against `shape`."""
    if name not in self.state:
      raise errors.UserError(
        f"{self.what} has no tensor {name!r} ({len(self.state)} tensors; is it the right model, "
        "with the sizes its config.json says?)"
      )
    if name in self.used:
      raise ValueError(f"tensor {name!r} of {self.what} read twice (a converter bug)")
    value = self.state[name]
    if hasattr(value, "detach"):  # a torch tensor
      value = value.detach().float().cpu().numpy()
    value = np.asarray(value, np.float32)
    if shape is not None and tuple(value.shape) != tuple(shape):
      raise errors.UserError(
        f"{self.what}: tensor {name!r} has shape {tuple(value.shape)}, expected {tuple(shape)} "
        "from its config.json"
      )
    self.used.add(name)
    return value

  def linear(self, prefix: str, in_features: int, out_features: int, bias: bool = True) -> dict:
    """`prefix.weight` (out, in) [+ `prefix.bias`] -> {"kernel": (in, out), "bias": (out,)}."""
    out = {"kernel": self.take(f"{prefix}.weight", (out_features, in_features)).T}
    if bias:
      out["bias"] = self.take(f"{prefix}.bias", (out_features,))
    return out

  def norm(self, prefix: str, features: int) -> dict:
    """A GroupNorm / LayerNorm's weight and bias -> {"scale", "bias"}."""
    return {
      "scale": self.take(f"{prefix}.weight", (features,)),
      "bias": self.take(f"{prefix}.bias", (features,)),
    }

  def conv(self, prefix: str, in_features: int, out_features: int, kernel_size: int) -> dict:
    """A Conv2d (O, I, k, k) + bias -> {"kernel": (k, k, I, O), "bias": (O,)}."""
    k = kernel_size
    weight = self.take(f"{prefix}.weight", (out_features, in_features, k, k))
    return {
      "kernel": weight.transpose(2, 3, 1, 0),
      "bias": self.take(f"{prefix}.bias", (out_features,)),
    }

  def heads_in(self, prefix: str, in_features: int, heads: int, head_dim: int) -> dict:
    """A q/k/v projection (heads * head_dim, in) -> {"kernel": (in, heads, head_dim), "bias"}."""
    weight = self.take(f"{prefix}.weight", (heads * head_dim, in_features))
    return {
      "kernel": weight.T.reshape(in_features, heads, head_dim),
      "bias": self.take(f"{prefix}.bias", (heads * head_dim,)).reshape(heads, head_dim),
    }

  def heads_out(self, prefix: str, out_features: int, heads: int, head_dim: int) -> dict:
    """An attention output projection (out, heads * head_dim) -> {"kernel": (heads, head_dim,
    out), "bias": (out,)}."""
    weight = self.take(f"{prefix}.weight", (out_features, heads * head_dim))
    return {
      "kernel": weight.T.reshape(heads, head_dim, out_features),
      "bias": self.take(f"{prefix}.bias", (out_features,)),
    }

  def left_over(self) -> list[str]:
    return sorted(k for k in self.state if k not in self.used and not k.endswith(self.ignore))

  def finish(self) -> None:
    """Raises a UserError naming the tensors no conversion rule used (a different architecture
    or size than the config says)."""
    left = self.left_over()
    if left:
      more = f" and {len(left) - 8} more" if len(left) > 8 else ""
      raise errors.UserError(
        f"{self.what} has {len(left)} tensors the conversion does not use: {left[:8]}{more}; is "
        "it the model its config.json describes?"
      )


# Weight files a `save_pretrained` folder may hold, by library, in the order they are preferred:
# safetensors before PyTorch pickles, full precision before the fp16 variant, one file before
# shards (`<file>.index.json` names them).
WEIGHT_FILES = {
  "diffusers": (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
  ),
  "transformers": (
    "model.safetensors",
    "model.fp16.safetensors",
    "pytorch_model.bin",
    "pytorch_model.fp16.bin",
  ),
}


def _read_file(path: str) -> dict[str, Any]:
  if path.endswith(".safetensors"):
    from safetensors import safe_open

    try:
      with safe_open(path, framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except TypeError:  # bfloat16 has no numpy dtype: read through torch
      pass
    import torch  # noqa: F401 (the "pt" framework needs it)

    with safe_open(path, framework="pt") as f:
      return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
  try:
    import torch
  except ImportError as e:
    raise errors.UserError(
      f"reading {path} needs PyTorch (pip install torch); or save the model as safetensors"
    ) from e
  return torch.load(path, map_location="cpu", weights_only=True)


def read_weights(folder: str, library: str) -> tuple[dict[str, Any], str]:
  """(state dict, the file or index read) of a `save_pretrained` folder of `library`
  ("diffusers" or "transformers"): safetensors (read without PyTorch) or .bin (PyTorch), the
  fp16 variant if it is the only one, sharded through `<file>.index.json`. Arrays keep their
  dtype; `StateReader.take` converts each to float32 when it is used."""
  import json
  import os

  for name in WEIGHT_FILES[library]:
    path = os.path.join(folder, name)
    if os.path.isfile(path):
      return _read_file(path), path
    index = f"{path}.index.json"
    if os.path.isfile(index):
      with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
      state: dict[str, Any] = {}
      for shard in shards:
        shard_path = os.path.join(folder, shard)
        if not os.path.isfile(shard_path):
          raise errors.UserFileNotFoundError(f"{index} names {shard}, which is not in {folder}")
        state.update(_read_file(shard_path))
      return state, index
  raise errors.UserFileNotFoundError(
    f"{folder} has no weights: expected one of {', '.join(WEIGHT_FILES[library])} (or a sharded "
    "*.index.json)"
  )
