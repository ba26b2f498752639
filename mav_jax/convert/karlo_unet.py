"""Karlo's UNets (diffusers layout) -> SpaceTimeUNet image models.

The decoder is a `UNet2DConditionModel` (ResnetDownsampleBlock2D / SimpleCrossAttn blocks, learned
variance, `class_embed_type="identity"`) plus the pipeline's `UnCLIPTextProjModel`, which becomes
the UNet's `unclip_proj`; the super-resolution models are `UNet2DModel`s reading
`concat([x_t, upsampled image])`. `unet_kwargs_*` read a diffusers config.json and give the
SpaceTimeUNet fields (refusing, by key and value, what the port does not cover); `convert_unet`
maps a state dict onto the image model's parameter tree, every tensor used once (docs/karlo_design.md §2a,
§2b: names, layouts, numerics).
"""

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from mav_jax import errors
from mav_jax.convert.common import StateReader

_DOWN_PLAIN, _UP_PLAIN = "ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D"
_DOWN_ATTN, _UP_ATTN = "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnUpBlock2D"
_MID_ATTN, _MID_PLAIN = "UNetMidBlock2DSimpleCrossAttn", "UNetMidBlock2D"

# Keys whose value the port supports only at the value given (diffusers' default or Karlo's):
# any other value is refused by name. A key absent from an old config takes diffusers' default.
_FIXED_CONDITION = {
  "center_input_sample": False,
  "flip_sin_to_cos": True,
  "freq_shift": 0,
  "only_cross_attention": False,
  "downsample_padding": 1,
  "mid_block_scale_factor": 1,
  "dropout": 0.0,
  "act_fn": "silu",
  "norm_num_groups": 32,
  "norm_eps": 1e-5,
  "transformer_layers_per_block": 1,
  "reverse_transformer_layers_per_block": None,
  "encoder_hid_dim": None,
  "encoder_hid_dim_type": None,
  "num_attention_heads": None,
  "dual_cross_attention": False,
  "use_linear_projection": False,
  "class_embed_type": "identity",
  "addition_embed_type": None,
  "addition_time_embed_dim": None,
  "num_class_embeds": None,
  "upcast_attention": False,
  "resnet_time_scale_shift": "scale_shift",
  "resnet_skip_time_act": False,
  "resnet_out_scale_factor": 1.0,
  "time_embedding_type": "positional",
  "time_embedding_dim": None,
  "time_embedding_act_fn": None,
  "timestep_post_act": None,
  "time_cond_proj_dim": None,
  "conv_in_kernel": 3,
  "conv_out_kernel": 3,
  "projection_class_embeddings_input_dim": None,
  "attention_type": "default",
  "class_embeddings_concat": False,
  "mid_block_only_cross_attention": None,
  "cross_attention_norm": None,
  "addition_embed_type_num_heads": 64,
}
_FIXED_PLAIN = {
  "center_input_sample": False,
  "time_embedding_type": "positional",
  "time_embedding_dim": None,
  "freq_shift": 0,
  "flip_sin_to_cos": True,
  "mid_block_type": _MID_PLAIN,
  "mid_block_scale_factor": 1,
  "downsample_padding": 1,
  "downsample_type": "conv",  # not read by ResnetDownsampleBlock2D; refused if changed all the same
  "upsample_type": "conv",
  "dropout": 0.0,
  "act_fn": "silu",
  "norm_num_groups": 32,
  "attn_norm_num_groups": None,
  "norm_eps": 1e-5,
  "resnet_time_scale_shift": "default",
  "add_attention": False,
  "class_embed_type": None,
  "num_class_embeds": None,
  "num_train_timesteps": None,
}
_TEXT_PROJ = {"clip_extra_context_tokens": 4}
# Keys that describe the model's size, read below; metadata keys start with "_".
_SIZES_CONDITION = {
  "sample_size", "in_channels", "out_channels", "down_block_types", "mid_block_type",
  "up_block_types", "block_out_channels", "layers_per_block", "cross_attention_dim",
  "attention_head_dim",
}  # fmt: skip
_SIZES_PLAIN = {
  "sample_size", "in_channels", "out_channels", "down_block_types", "up_block_types",
  "block_out_channels", "layers_per_block", "attention_head_dim",
}  # fmt: skip


def _check_keys(config: Mapping[str, Any], fixed: dict, sizes: set, what: str) -> None:
  for key, value in config.items():
    if key.startswith("_") or key in sizes:
      continue
    if key not in fixed:
      raise errors.UserError(
        f"{what}: config key {key!r} (= {value!r}) is not one this converter knows; it reads "
        "Karlo's UNets as diffusers 0.42 writes them"
      )
    want = fixed[key]
    same = value == want or (
      isinstance(want, float) and value is not None and np.isclose(value, want)
    )
    if not same:
      raise errors.UserError(
        f"{what}: config {key} = {value!r} is not supported (Karlo's is {want!r}); this converter "
        "covers Karlo's architecture only"
      )


def _same_per_block(config: Mapping[str, Any], key: str, levels: int, what: str) -> int:
  value = config[key]
  if isinstance(value, (list, tuple)):
    if len(value) != levels or len(set(value)) != 1:
      raise errors.UserError(
        f"{what}: config {key} = {value!r}: only one value for every block is supported"
      )
    value = value[0]
  return int(value)


def _levels(config: Mapping[str, Any], what: str) -> tuple[int, tuple[int, ...]]:
  widths = [int(c) for c in config["block_out_channels"]]
  base = widths[0]
  if any(w % base for w in widths) or any(w % 32 for w in widths):
    raise errors.UserError(
      f"{what}: block_out_channels {widths} must be multiples of the first and of 32 (GroupNorm's "
      "32 groups)"
    )
  return base, tuple(w // base for w in widths)


def _channels(config: Mapping[str, Any], inputs: int, outputs: int, what: str, why: str) -> None:
  """A UserError unless config.json's in_channels / out_channels are Karlo's (`why` says them)."""
  given = (config.get("in_channels"), config.get("out_channels"))
  if given != (inputs, outputs):
    raise errors.UserError(f"{what}: in_channels {given[0]} / out_channels {given[1]}: {why}")


def _resnet_unet(config: Mapping[str, Any], what: str) -> tuple[dict, int]:
  """The SpaceTimeUNet fields every Karlo UNet shares (widths, depth, integer timesteps, resampling
  inside residual blocks) and its number of levels."""
  base, mults = _levels(config, what)
  levels = len(mults)
  kwargs = dict(
    channels=base,
    channel_mults=mults,
    num_res_blocks=_same_per_block(config, "layers_per_block", levels, what),
    time_scale=1.0,
    resample="resblock",
  )
  return kwargs, levels


def unet_kwargs_decoder(config: Mapping[str, Any], text_proj: Mapping[str, Any]) -> dict:
  """SpaceTimeUNet fields of Karlo's decoder from `decoder/config.json` (UNet2DConditionModel) and
  `text_proj/config.json` (UnCLIPTextProjModel)."""
  what = "decoder/config.json"
  config = dict(config)
  config.setdefault("mid_block_type", "UNetMidBlock2DCrossAttn")
  _check_keys(config, _FIXED_CONDITION, _SIZES_CONDITION, what)
  common, levels = _resnet_unet(config, what)
  base = common["channels"]
  down, up = list(config["down_block_types"]), list(config["up_block_types"])
  attention = [t == _DOWN_ATTN for t in down]
  if (
    any(t not in (_DOWN_PLAIN, _DOWN_ATTN) for t in down)
    or [t == _UP_ATTN for t in up] != attention[::-1]
    or any(t not in (_UP_PLAIN, _UP_ATTN) for t in up)
    or len(up) != levels
    or config["mid_block_type"] != _MID_ATTN
  ):
    raise errors.UserError(
      f"{what}: blocks {down} / {config['mid_block_type']} / {up} are not Karlo's pattern "
      f"({_DOWN_PLAIN} or {_DOWN_ATTN} down, mirrored up, {_MID_ATTN} in the middle)"
    )
  _channels(config, 3, 6, what, "Karlo's decoder reads 3 and predicts 6 (eps and variance)")
  _check_keys(text_proj, _TEXT_PROJ, {"clip_embeddings_dim", "time_embed_dim", "cross_attention_dim"}, "text_proj/config.json")  # fmt: skip
  cross = _same_per_block(config, "cross_attention_dim", levels, what)
  if int(text_proj["cross_attention_dim"]) != cross or int(text_proj["time_embed_dim"]) != 4 * base:
    raise errors.UserError(
      f"text_proj/config.json: cross_attention_dim {text_proj['cross_attention_dim']} / "
      f"time_embed_dim {text_proj['time_embed_dim']} do not match the decoder's {cross} / "
      f"{4 * base}"
    )
  return dict(
    common,
    out_channels=6,
    attention_levels=tuple(i for i, a in enumerate(attention) if a),
    mid_attention=True,
    head_dim=_same_per_block(config, "attention_head_dim", levels, what),
    use_global_embedding=True,
    global_conditioning="unclip",
    unclip_context_dim=cross,
    spatial_attention="added_kv",
    time_embedding="scale_shift",
  )


def unet_kwargs_super_res(config: Mapping[str, Any]) -> dict:
  """SpaceTimeUNet fields of a Karlo super-resolution model from its config.json (UNet2DModel)."""
  what = "super_res config.json"
  _check_keys(config, _FIXED_PLAIN, _SIZES_PLAIN, what)
  common, levels = _resnet_unet(config, what)
  if (
    list(config["down_block_types"]) != [_DOWN_PLAIN] * levels
    or list(config["up_block_types"]) != [_UP_PLAIN] * levels
  ):
    raise errors.UserError(
      f"{what}: blocks {config['down_block_types']} / {config['up_block_types']} are not Karlo's "
      f"({_DOWN_PLAIN} and {_UP_PLAIN} only)"
    )
  _channels(config, 6, 3, what, "Karlo's SR reads 6 (x_t and the upsampled image), predicts 3")
  return dict(
    common,
    out_channels=3,
    attention_levels=(),
    mid_attention=False,
    use_global_embedding=False,
    extra_input_channels=3,
    extra_input_mode="concat",
    time_embedding="additive",
  )


def _names(kwargs: Mapping[str, Any]) -> list[tuple[str, str, str]]:
  """(our module, diffusers prefix, kind) of every block, in the UNet's order."""
  levels = len(kwargs["channel_mults"])
  layers = kwargs["num_res_blocks"]
  attention = set(kwargs["attention_levels"])
  out = []
  for level in range(levels):
    for j in range(layers):
      out.append((f"down_{level}_res_{j}", f"down_blocks.{level}.resnets.{j}", "resnet"))
      if level in attention:
        out.append((f"down_{level}_attn_{j}", f"down_blocks.{level}.attentions.{j}", "attn"))
    if level != levels - 1:
      out.append((f"down_{level}_downsample", f"down_blocks.{level}.downsamplers.0", "resnet"))
  out.append(("mid_res_0", "mid_block.resnets.0", "resnet"))
  if kwargs["mid_attention"]:
    out.append(("mid_attn", "mid_block.attentions.0", "attn"))
  out.append(("mid_res_1", "mid_block.resnets.1", "resnet"))
  for i, level in enumerate(reversed(range(levels))):
    for j in range(layers + 1):
      out.append((f"up_{level}_res_{j}", f"up_blocks.{i}.resnets.{j}", "resnet"))
      if level in attention:
        out.append((f"up_{level}_attn_{j}", f"up_blocks.{i}.attentions.{j}", "attn"))
    if level != 0:
      out.append((f"up_{level}_upsample", f"up_blocks.{i}.upsamplers.0", "resnet"))
  return out


def convert_unet(
  state: Mapping[str, Any],
  kwargs: Mapping[str, Any],
  target: Any,
  what: str,
  text_proj: Mapping[str, Any] | None = None,
) -> dict:
  """The image model's parameters from a diffusers UNet state dict (and, for the decoder, the
  text_proj state dict).

  Args:
    state: the UNet's tensors.
    kwargs: its SpaceTimeUNet fields (`unet_kwargs_decoder` / `unet_kwargs_super_res`).
    target: the image model's unboxed parameter tree or its shapes (`jax.eval_shape` of init in
      image mode): every leaf must be filled, each with its shape.
    what: the component, for messages.
    text_proj: the decoder's UnCLIPTextProjModel tensors.
  """
  want = {
    "/".join(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(_plain(target)).items()
  }
  reader = StateReader(state, what)
  out: dict[str, np.ndarray] = {}

  def put(path: str, arrays: dict) -> None:
    for leaf, value in arrays.items():
      out[f"{path}/{leaf}"] = value

  def shape(path: str) -> tuple[int, ...]:
    if path not in want:
      raise ValueError(f"the model has no parameter {path} (a converter bug)")
    return want[path]

  def conv(path: str, prefix: str) -> None:
    k, _, i, o = shape(f"{path}/kernel")
    put(path, reader.conv(prefix, i, o, k))

  def linear(path: str, prefix: str, source: StateReader = reader) -> None:
    i, o = shape(f"{path}/kernel")
    put(path, source.linear(prefix, i, o))

  def norm(path: str, prefix: str, source: StateReader = reader) -> None:
    put(path, source.norm(prefix, shape(f"{path}/scale")[0]))

  conv("conv_in/spatial", "conv_in")
  linear("time_embed/fc1", "time_embedding.linear_1")
  linear("time_embed/fc2", "time_embedding.linear_2")
  for ours, theirs, kind in _names(kwargs):
    if kind == "resnet":
      norm(f"{ours}/norm1/norm", f"{theirs}.norm1")
      conv(f"{ours}/conv1/spatial", f"{theirs}.conv1")
      linear(f"{ours}/emb_proj", f"{theirs}.time_emb_proj")
      norm(f"{ours}/norm2/norm", f"{theirs}.norm2")
      conv(f"{ours}/conv2/spatial", f"{theirs}.conv2")
      if f"{ours}/skip/kernel" in want:
        conv(f"{ours}/skip", f"{theirs}.conv_shortcut")
    else:
      norm(f"{ours}/spatial_norm/norm", f"{theirs}.group_norm")
      for leaf, source in (
        ("query", "to_q"),
        ("key", "to_k"),
        ("value", "to_v"),
        ("added_key", "add_k_proj"),
        ("added_value", "add_v_proj"),
      ):
        i, heads, head_dim = shape(f"{ours}/spatial_attn/{leaf}/kernel")
        put(
          f"{ours}/spatial_attn/{leaf}", reader.heads_in(f"{theirs}.{source}", i, heads, head_dim)
        )
      heads, head_dim, o = shape(f"{ours}/spatial_attn/out/kernel")
      put(f"{ours}/spatial_attn/out", reader.heads_out(f"{theirs}.to_out.0", o, heads, head_dim))
  norm("norm_out/norm", "conv_norm_out")
  conv("conv_out/spatial", "conv_out")
  reader.finish()

  if kwargs.get("global_conditioning") == "unclip":
    if text_proj is None:
      raise ValueError("the decoder needs its text_proj tensors")
    proj = StateReader(text_proj, "text_proj")
    (d,) = shape("unclip_proj/null_image_embedding")
    out["unclip_proj/null_image_embedding"] = proj.take(
      "learned_classifier_free_guidance_embeddings", (d,)
    )
    linear("unclip_proj/text_time_proj", "embedding_proj", proj)
    linear("unclip_proj/image_time_proj", "clip_image_embeddings_project_to_time_embeddings", proj)
    linear("unclip_proj/image_tokens_proj", "clip_extra_context_tokens_proj", proj)
    linear("unclip_proj/context_proj", "encoder_hidden_states_proj", proj)
    norm("unclip_proj/context_norm", "text_encoder_hidden_states_norm", proj)
    proj.finish()

  missing = sorted(set(want) - set(out))
  if missing:
    raise ValueError(f"parameters the conversion left unfilled (a converter bug): {missing[:8]}")
  return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in out.items()})


def _plain(tree: Any) -> Any:
  """A parameter tree without Flax's Partitioned boxes, as nested dicts."""
  import flax.linen as nn

  return jax.tree.map(lambda x: x, nn.unbox(tree))
