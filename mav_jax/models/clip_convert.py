"""Pretrained CLIP weights: a Hugging Face / OpenAI-layout PyTorch checkpoint -> our parameter tree.

A checkpoint folder holds `config.json` and `model.safetensors` (read with no PyTorch) or
`pytorch_model.bin` (read with PyTorch, if installed). Nothing is downloaded: users supply the files.
Every tensor of our tree is filled exactly once and every tensor of the checkpoint that CLIP uses is
consumed; anything left over or missing is an error that names it.
"""

import json
import os
from typing import Any

import numpy as np

from mav_jax import errors
from mav_jax.models.clip import ClipConfig, TowerConfig


def clip_config_from_hf(hf: dict) -> ClipConfig:
  """Our ClipConfig from a Hugging Face CLIPConfig dict (its config.json)."""
  text, vision = hf["text_config"], hf["vision_config"]

  def tower(c):
    return TowerConfig(
      width=c["hidden_size"],
      layers=c["num_hidden_layers"],
      heads=c["num_attention_heads"],
      mlp_ratio=c["intermediate_size"] / c["hidden_size"],
    )

  if text.get("hidden_act", "quick_gelu") != vision.get("hidden_act", "quick_gelu"):
    raise errors.UserError("text and vision towers use different activations; not supported")
  eos = text.get("eos_token_id", 2)
  return ClipConfig(
    embed_dim=hf.get("projection_dim", 512),
    vocab_size=text["vocab_size"],
    context_length=text["max_position_embeddings"],
    text=tower(text),
    image_size=vision["image_size"],
    patch_size=vision["patch_size"],
    vision=tower(vision),
    activation=text.get("hidden_act", "quick_gelu"),
    # Hugging Face's legacy configs say eos 2 and pool at the highest id, as OpenAI does.
    eos_token_id=None if eos == 2 else eos,
  )


def _norm(take, name: str) -> dict:
  """A LayerNorm's weight and bias -> our scale and bias."""
  return {"scale": take(f"{name}.weight"), "bias": take(f"{name}.bias")}


def _block(take, prefix: str, width: int, heads: int) -> dict:
  d = width // heads
  attn = {}
  for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
    attn[ours] = {
      "kernel": take(f"{prefix}.self_attn.{theirs}.weight").T.reshape(width, heads, d),
      "bias": take(f"{prefix}.self_attn.{theirs}.bias").reshape(heads, d),
    }
  attn["out"] = {
    "kernel": take(f"{prefix}.self_attn.out_proj.weight").T.reshape(heads, d, width),
    "bias": take(f"{prefix}.self_attn.out_proj.bias"),
  }

  def dense(name):
    return {
      "kernel": take(f"{prefix}.mlp.{name}.weight").T,
      "bias": take(f"{prefix}.mlp.{name}.bias"),
    }

  return {
    "ln_1": _norm(take, f"{prefix}.layer_norm1"),
    "attn": attn,
    "ln_2": _norm(take, f"{prefix}.layer_norm2"),
    "fc1": dense("fc1"),
    "fc2": dense("fc2"),
  }


def convert_state_dict(state: dict[str, Any], config: ClipConfig) -> dict:
  """Maps a CLIPModel state dict (name -> array-like) onto the `CLIP` module's params."""
  state = {k: np.asarray(v, np.float32) for k, v in state.items()}
  used: set[str] = set()

  def take(name: str) -> np.ndarray:
    if name not in state:
      raise KeyError(f"the checkpoint has no tensor {name!r}; is it a CLIPModel checkpoint?")
    used.add(name)
    return state[name]

  def norm(name):
    return _norm(take, name)

  t, v = "text_model", "vision_model"
  text = {
    "token_embedding": take(f"{t}.embeddings.token_embedding.weight"),
    "positional_embedding": take(f"{t}.embeddings.position_embedding.weight"),
    "ln_final": norm(f"{t}.final_layer_norm"),
    "projection": take("text_projection.weight").T,
  }
  for i in range(config.text.layers):
    text[f"block_{i}"] = _block(
      take, f"{t}.encoder.layers.{i}", config.text.width, config.text.heads
    )
  vision = {
    "patch_embed": {"kernel": take(f"{v}.embeddings.patch_embedding.weight").transpose(2, 3, 1, 0)},
    "class_embedding": take(f"{v}.embeddings.class_embedding"),
    "positional_embedding": take(f"{v}.embeddings.position_embedding.weight"),
    "ln_pre": norm(f"{v}.pre_layrnorm"),
    "ln_post": norm(f"{v}.post_layernorm"),
    "projection": take("visual_projection.weight").T,
  }
  for i in range(config.vision.layers):
    vision[f"block_{i}"] = _block(
      take, f"{v}.encoder.layers.{i}", config.vision.width, config.vision.heads
    )
  params = {"text": text, "vision": vision, "logit_scale": take("logit_scale").reshape(())}
  # Buffers that carry no weights (position ids) may remain; any other leftover is a mismatch.
  left = sorted(k for k in state if k not in used and not k.endswith("position_ids"))
  if left:
    raise errors.UserError(
      f"checkpoint tensors not used by the conversion (wrong layer count?): {left[:8]}"
    )
  return params


def load_hf_checkpoint(folder: str) -> tuple[ClipConfig, dict]:
  """(config, params) from a folder with config.json and model.safetensors or pytorch_model.bin."""
  config_path = os.path.join(folder, "config.json")
  if not os.path.isfile(config_path):
    raise errors.UserFileNotFoundError(
      f"{folder} has no config.json (expected a Hugging Face CLIP folder)"
    )
  with open(config_path) as f:
    config = clip_config_from_hf(json.load(f))
  safetensors_path = os.path.join(folder, "model.safetensors")
  bin_path = os.path.join(folder, "pytorch_model.bin")
  if os.path.isfile(safetensors_path):
    from safetensors.numpy import load_file

    state = load_file(safetensors_path)
  elif os.path.isfile(bin_path):
    try:
      import torch
    except ImportError as e:
      raise ImportError(f"reading {bin_path} needs PyTorch; or convert it to safetensors") from e
    state = {k: v.float().numpy() for k, v in torch.load(bin_path, map_location="cpu").items()}
  else:
    raise errors.UserFileNotFoundError(
      f"{folder} has neither model.safetensors nor pytorch_model.bin"
    )
  return config, convert_state_dict(state, config)
