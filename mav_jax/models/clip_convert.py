"""Pretrained CLIP weights: a Hugging Face / OpenAI-layout PyTorch checkpoint -> our parameter tree.

A checkpoint folder holds `config.json` and `model.safetensors` (read with no PyTorch) or
`pytorch_model.bin` (read with PyTorch, if installed). Nothing is downloaded: users supply the files.
Every tensor of our tree is filled exactly once and every tensor of the checkpoint that CLIP uses is
consumed; anything left over or missing is an error that names it.

Two layouts are read:
  - a full `CLIPModel` (`load_hf_checkpoint`): both towers and the logit scale;
  - a `CLIPTextModelWithProjection` (`load_hf_text_encoder`), such as Karlo's `text_encoder/`: the
    text tower alone (`ClipConfig.vision = None`), or, with `vision_from=` a full CLIPModel folder
    whose text tower is the same tensor for tensor, a complete CLIP with that folder's vision tower
    and logit scale.
Both share one mapping per tower and per residual block. To write the result as a model folder
that `conditioning.clip` can name, see `mav_jax.stages.clip.write_clip_folder`.
"""

import dataclasses
import json
import os
from typing import Any

import numpy as np

from mav_jax import errors
from mav_jax.convert.common import StateReader
from mav_jax.models.clip import ClipConfig, TowerConfig

# Hugging Face's `hidden_act` -> our ACTIVATIONS key. HF's "gelu" is the exact (erf) GELU, which
# is "gelu_exact" here; our "gelu" is flax's tanh approximation (HF's "gelu_new").
HF_ACTIVATIONS = {
  "quick_gelu": "quick_gelu",
  "gelu": "gelu_exact",
  "gelu_new": "gelu",
  "gelu_pytorch_tanh": "gelu",
}
# Buffers that carry no weights.
_IGNORED = ("position_ids",)


def _activation(hf_act: str) -> str:
  if hf_act not in HF_ACTIVATIONS:
    raise errors.UserError(
      f"hidden_act {hf_act!r} is not supported; CLIP here supports {sorted(HF_ACTIVATIONS)}"
    )
  return HF_ACTIVATIONS[hf_act]


def _tower(c: dict) -> TowerConfig:
  return TowerConfig(
    width=c["hidden_size"],
    layers=c["num_hidden_layers"],
    heads=c["num_attention_heads"],
    mlp_ratio=c["intermediate_size"] / c["hidden_size"],
  )


def text_config_from_hf(text: dict, projection_dim: int | None = None) -> ClipConfig:
  """A text-only ClipConfig (vision None) from a Hugging Face CLIPTextConfig dict (the config.json
  of a CLIPTextModelWithProjection, or a CLIPConfig's `text_config`)."""
  eos = text.get("eos_token_id", 2)
  return ClipConfig(
    embed_dim=projection_dim or text.get("projection_dim", 512),
    vocab_size=text["vocab_size"],
    context_length=text["max_position_embeddings"],
    text=_tower(text),
    vision=None,
    activation=_activation(text.get("hidden_act", "quick_gelu")),
    # Hugging Face's legacy configs say eos 2 and pool at the highest id, as OpenAI does.
    eos_token_id=None if eos == 2 else eos,
  )


def clip_config_from_hf(hf: dict) -> ClipConfig:
  """Our ClipConfig from a Hugging Face CLIPConfig dict (its config.json)."""
  if "text_config" not in hf or "vision_config" not in hf:
    raise errors.UserError(
      "config.json is not a CLIPModel's (no text_config / vision_config); a text encoder alone "
      "(CLIPTextModelWithProjection) loads with load_hf_text_encoder"
    )
  text, vision = hf["text_config"], hf["vision_config"]
  if text.get("hidden_act", "quick_gelu") != vision.get("hidden_act", "quick_gelu"):
    raise errors.UserError("text and vision towers use different activations; not supported")
  return dataclasses.replace(
    text_config_from_hf(text, hf.get("projection_dim", 512)),
    image_size=vision["image_size"],
    patch_size=vision["patch_size"],
    vision=_tower(vision),
  )


def _block(reader: StateReader, prefix: str, tower: TowerConfig) -> dict:
  """One residual block (`{prefix}.self_attn`, `.layer_norm1/2`, `.mlp.fc1/2`) -> our Block."""
  w, h = tower.width, tower.heads
  attn = {
    ours: reader.heads_in(f"{prefix}.self_attn.{theirs}", w, h, w // h)
    for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"))
  }
  attn["out"] = reader.heads_out(f"{prefix}.self_attn.out_proj", w, h, w // h)
  hidden = int(w * tower.mlp_ratio)
  return {
    "ln_1": reader.norm(f"{prefix}.layer_norm1", w),
    "attn": attn,
    "ln_2": reader.norm(f"{prefix}.layer_norm2", w),
    "fc1": reader.linear(f"{prefix}.mlp.fc1", w, hidden),
    "fc2": reader.linear(f"{prefix}.mlp.fc2", hidden, w),
  }


def _text_tower(reader: StateReader, config: ClipConfig) -> dict:
  """`text_model.*` and `text_projection.weight` -> our TextTower's params."""
  t, w = "text_model", config.text.width
  text = {
    "token_embedding": reader.take(
      f"{t}.embeddings.token_embedding.weight", (config.vocab_size, w)
    ),
    "positional_embedding": reader.take(
      f"{t}.embeddings.position_embedding.weight", (config.context_length, w)
    ),
    "ln_final": reader.norm(f"{t}.final_layer_norm", w),
    "projection": reader.linear("text_projection", w, config.embed_dim, bias=False)["kernel"],
  }
  for i in range(config.text.layers):
    text[f"block_{i}"] = _block(reader, f"{t}.encoder.layers.{i}", config.text)
  return text


def _vision_tower(reader: StateReader, config: ClipConfig) -> dict:
  """`vision_model.*` and `visual_projection.weight` -> our VisionTower's params."""
  v, w, p = "vision_model", config.vision.width, config.patch_size
  patches = (config.image_size // p) ** 2
  vision = {
    "patch_embed": {
      "kernel": reader.take(f"{v}.embeddings.patch_embedding.weight", (w, 3, p, p)).transpose(
        2, 3, 1, 0
      )
    },
    "class_embedding": reader.take(f"{v}.embeddings.class_embedding", (w,)),
    "positional_embedding": reader.take(
      f"{v}.embeddings.position_embedding.weight", (patches + 1, w)
    ),
    "ln_pre": reader.norm(f"{v}.pre_layrnorm", w),
    "ln_post": reader.norm(f"{v}.post_layernorm", w),
    "projection": reader.linear("visual_projection", w, config.embed_dim, bias=False)["kernel"],
  }
  for i in range(config.vision.layers):
    vision[f"block_{i}"] = _block(reader, f"{v}.encoder.layers.{i}", config.vision)
  return vision


def _finish(reader: StateReader) -> None:
  """A UserError naming the tensors no rule used (a different architecture or layer count)."""
  left = reader.left_over()
  if left:
    more = f" and {len(left) - 8} more" if len(left) > 8 else ""
    raise errors.UserError(
      f"{reader.what}: {len(left)} tensors not used by the conversion (wrong layer count or "
      f"model type?): {left[:8]}{more}"
    )


def convert_state_dict(state: dict[str, Any], config: ClipConfig, what: str = "the CLIP") -> dict:
  """Maps a state dict (name -> array-like) onto the `CLIP` module's params: a CLIPModel's when
  `config` has a vision tower, a CLIPTextModelWithProjection's (text tower only) when not."""
  reader = StateReader(state, what, ignore=_IGNORED)
  params = {"text": _text_tower(reader, config)}
  if config.has_vision:
    params["vision"] = _vision_tower(reader, config)
    params["logit_scale"] = reader.take("logit_scale", ()).reshape(())
  _finish(reader)
  return params


def _read_config(folder: str) -> dict:
  config_path = os.path.join(folder, "config.json")
  if not os.path.isfile(config_path):
    raise errors.UserFileNotFoundError(
      f"{folder} has no config.json (expected a Hugging Face CLIP folder)"
    )
  with open(config_path) as f:
    return json.load(f)


def read_state(folder: str) -> tuple[dict[str, np.ndarray], str]:
  """(state dict, its file) of a transformers folder's weights (`convert.common.read_weights`:
  model.safetensors, pytorch_model.bin, their fp16 variants or shards)."""
  from mav_jax.convert.common import read_weights

  return read_weights(folder, "transformers")


def load_hf_checkpoint(folder: str) -> tuple[ClipConfig, dict]:
  """(config, params) of a full CLIPModel folder (config.json and model.safetensors or
  pytorch_model.bin)."""
  config = clip_config_from_hf(_read_config(folder))
  state, file = read_state(folder)
  return config, convert_state_dict(state, config, f"the CLIPModel {file}")


def _check_same_text_tower(text_state: dict, text_file: str, full_state: dict, full_file: str):
  """A UserError naming the first tensor of the text encoder that the CLIPModel lacks or holds
  with another shape or other values."""
  for name in sorted(text_state):
    if name.endswith(_IGNORED):
      continue
    ours = text_state[name]
    if name not in full_state:
      raise errors.UserError(f"{full_file} has no tensor {name!r}, which {text_file} holds")
    theirs = full_state[name]
    if ours.shape != theirs.shape:
      raise errors.UserError(
        f"the text towers differ: {name!r} is {ours.shape} in {text_file} and {theirs.shape} in "
        f"{full_file}"
      )
    if not np.array_equal(ours, theirs):
      raise errors.UserError(
        f"the text towers differ: {name!r} of {text_file} and {full_file} differ by up to "
        f"{float(np.max(np.abs(ours - theirs))):.3g}; the vision tower must come from the "
        "CLIPModel the text encoder was taken from"
      )


def load_hf_text_encoder(folder: str, vision_from: str | None = None) -> tuple[ClipConfig, dict]:
  """(config, params) of a CLIPTextModelWithProjection folder (Karlo's `text_encoder/`).

  Without `vision_from`: a text-only CLIP (`config.vision` None; params {"text"}): it encodes text
  (text embeddings and token features) and raises a UserError for images. With `vision_from`, a
  full CLIPModel folder (for Karlo, openai/clip-vit-large-patch14): a complete CLIP with that
  folder's vision tower and logit scale, after checking that the CLIPModel's text tower holds the
  text encoder's tensors exactly (a UserError names the first that differs) and the same text
  config.
  """
  hf = _read_config(folder)
  if "text_config" in hf:
    raise errors.UserError(
      f"{folder}/config.json is a CLIPModel's (both towers): load it with load_hf_checkpoint"
    )
  config = text_config_from_hf(hf)
  state, file = read_state(folder)
  params = convert_state_dict(state, config, f"the text encoder {file}")
  if vision_from is None:
    return config, params
  full_config = clip_config_from_hf(_read_config(vision_from))
  text_fields = ("embed_dim", "vocab_size", "context_length", "text", "activation", "eos_token_id")
  for field in text_fields:
    if getattr(full_config, field) != getattr(config, field):
      raise errors.UserError(
        f"{vision_from}'s CLIPModel has {field} = {getattr(full_config, field)!r}, the text "
        f"encoder {folder} {getattr(config, field)!r}; the vision tower must come from the "
        "CLIPModel the text encoder was taken from"
      )
  full_state, full_file = read_state(vision_from)
  _check_same_text_tower(state, file, full_state, full_file)
  return full_config, convert_state_dict(full_state, full_config, f"the CLIPModel {full_file}")
