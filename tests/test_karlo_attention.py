"""Pseudo3DAttention(spatial="added_kv") against diffusers' unCLIP attention (docs/karlo_design.md, step 3).

diffusers' `Attention(added_kv_proj_dim=..., norm_num_groups=...)` built as
UNetMidBlock2DSimpleCrossAttn / SimpleCrossAttnDownBlock2D build it, with `AttnAddedKVProcessor` and
`AttnAddedKVProcessor2_0`, random torch weights copied into our parameters; the mask travels as the
UNet passes it (an additive (1 - m) * -10000 bias [b, 1, L] as `attention_mask`), with padding in
one row. Image mode on the same input (NCHW vs [b, 1, h, w, c]), and video mode at init (identity
temporal attention) on 3 distinct frames against diffusers applied frame by frame. Float32, 1e-4.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

from diffusers.models.attention_processor import (  # noqa: E402
  Attention,
  AttnAddedKVProcessor,
  AttnAddedKVProcessor2_0,
)

from mav_jax import errors  # noqa: E402
from mav_jax.models.attention import Pseudo3DAttention  # noqa: E402

TOL = 1e-4
B, C, H, W, L, D_CTX, FRAMES = 2, 64, 4, 6, 5, 24, 3
PROCESSORS = {"AttnAddedKVProcessor": AttnAddedKVProcessor, "2_0": AttnAddedKVProcessor2_0}
CASES = [(heads, proc) for heads in (2, 4) for proc in PROCESSORS]


def _torch_attention(heads: int, processor: str) -> Attention:
  """As unet_2d_blocks.UNetMidBlock2DSimpleCrossAttn builds it (cross_attention_dim=in_channels,
  only_cross_attention=False, cross_attention_norm=None), with every parameter randomised."""
  torch.manual_seed(heads)
  attn = Attention(
    query_dim=C,
    cross_attention_dim=C,
    heads=heads,
    dim_head=C // heads,
    added_kv_proj_dim=D_CTX,
    norm_num_groups=32,
    bias=True,
    upcast_softmax=True,
    only_cross_attention=False,
    cross_attention_norm=None,
    out_bias=True,
    processor=PROCESSORS[processor](),
  ).eval()
  with torch.no_grad():
    for p in attn.parameters():
      p.copy_(torch.randn_like(p) * (0.2 if p.ndim > 1 else 0.5))
  return attn


def _mapping(attn: Attention, heads: int) -> dict[tuple[str, ...], np.ndarray]:
  """diffusers' state dict -> our flat parameter paths: linear (out, in) -> (in, out), with the
  output features split as (heads, head_dim) for q/k/v (head_to_batch_dim's order) and the input
  features as (heads, head_dim) for the out projection; group norm weight -> scale."""
  hd = C // heads
  qkv = lambda w: w.T.reshape(w.shape[1], heads, hd)
  qkv_bias = lambda b: b.reshape(heads, hd)
  rules = {
    "group_norm.weight": (("spatial_norm", "norm", "scale"), None),
    "group_norm.bias": (("spatial_norm", "norm", "bias"), None),
    "to_q.weight": (("spatial_attn", "query", "kernel"), qkv),
    "to_q.bias": (("spatial_attn", "query", "bias"), qkv_bias),
    "to_k.weight": (("spatial_attn", "key", "kernel"), qkv),
    "to_k.bias": (("spatial_attn", "key", "bias"), qkv_bias),
    "to_v.weight": (("spatial_attn", "value", "kernel"), qkv),
    "to_v.bias": (("spatial_attn", "value", "bias"), qkv_bias),
    "add_k_proj.weight": (("spatial_attn", "added_key", "kernel"), qkv),
    "add_k_proj.bias": (("spatial_attn", "added_key", "bias"), qkv_bias),
    "add_v_proj.weight": (("spatial_attn", "added_value", "kernel"), qkv),
    "add_v_proj.bias": (("spatial_attn", "added_value", "bias"), qkv_bias),
    "to_out.0.weight": (("spatial_attn", "out", "kernel"), lambda w: w.T.reshape(heads, hd, C)),
    "to_out.0.bias": (("spatial_attn", "out", "bias"), None),
  }
  out = {}
  for name, value in attn.state_dict().items():
    path, fn = rules[name]  # a KeyError names a diffusers tensor the mapping lacks
    value = value.numpy()
    out[path] = fn(value) if fn else value
  return out


def _inputs(frames: int):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(B, frames, H, W, C)).astype(np.float32) * 2.0 + 0.5
  x[1] *= 0.005  # variance 1e-4: the GroupNorm eps (1e-5) matters
  ctx = rng.normal(size=(B, L, D_CTX)).astype(np.float32)
  mask = np.ones((B, L), bool)
  mask[1, 3:] = False  # row 1 has two padding tokens
  return x, ctx, mask


def _torch(attn: Attention, x: np.ndarray, ctx: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """diffusers per frame: x [b, f, h, w, c] -> NCHW frames, the UNet's mask bias, back."""
  b, f = x.shape[:2]
  frames = torch.from_numpy(x.reshape(b * f, H, W, C).transpose(0, 3, 1, 2).copy())
  ctx_t = torch.from_numpy(np.repeat(ctx, f, axis=0))
  bias = torch.from_numpy((1.0 - np.repeat(mask, f, axis=0).astype(np.float32)) * -10000.0)
  with torch.no_grad():
    y = attn(frames, encoder_hidden_states=ctx_t, attention_mask=bias[:, None, :]).numpy()
  return y.transpose(0, 2, 3, 1).reshape(b, f, H, W, C)


def _ours(attn: Attention, heads: int, x, ctx, mask, image_mode: bool) -> np.ndarray:
  model = Pseudo3DAttention(heads, C // heads, spatial="added_kv", image_mode=image_mode)
  params = model.init(jax.random.key(0), jnp.asarray(x), jnp.asarray(ctx), jnp.asarray(mask))
  flat = traverse_util.flatten_dict(nn.unbox(params["params"]))
  mapped = _mapping(attn, heads)
  for path, value in mapped.items():
    assert flat[path].shape == value.shape, path
    flat[path] = jnp.asarray(value)
  spatial = {p for p in flat if p[0] in ("spatial_norm", "spatial_attn")}
  assert spatial == set(mapped)  # no parameter of ours is left at its init
  y = model.apply({"params": traverse_util.unflatten_dict(flat)}, x, ctx, jnp.asarray(mask))
  return np.asarray(y)


@pytest.mark.parametrize("heads,processor", CASES)
def test_added_kv_image_matches_diffusers(heads, processor):
  attn = _torch_attention(heads, processor)
  x, ctx, mask = _inputs(1)
  ref = _torch(attn, x, ctx, mask)
  np.testing.assert_allclose(_ours(attn, heads, x, ctx, mask, True), ref, atol=TOL, rtol=0)
  # the padding matters here: without the mask row 1 differs
  unmasked = _torch(attn, x, ctx, np.ones_like(mask))
  assert np.abs(unmasked[1] - ref[1]).max() > 1e-2
  np.testing.assert_allclose(unmasked[0], ref[0], atol=1e-6)


@pytest.mark.parametrize("heads,processor", CASES[:2])
def test_added_kv_video_at_init_matches_diffusers_per_frame(heads, processor):
  attn = _torch_attention(heads, processor)
  x, ctx, mask = _inputs(FRAMES)
  assert np.abs(x[:, 0] - x[:, 1]).max() > 0.1  # distinct frames
  ref = _torch(attn, x, ctx, mask)
  np.testing.assert_allclose(_ours(attn, heads, x, ctx, mask, False), ref, atol=TOL, rtol=0)


def test_added_kv_parameters_and_padding():
  model = Pseudo3DAttention(2, 32, spatial="added_kv", image_mode=True)
  x, ctx, mask = _inputs(1)
  params = model.init(jax.random.key(0), x, ctx, mask)
  shapes = {
    "/".join(p): v.shape for p, v in traverse_util.flatten_dict(nn.unbox(params["params"])).items()
  }
  assert shapes == {
    "spatial_norm/norm/scale": (C,),
    "spatial_norm/norm/bias": (C,),
    "spatial_attn/query/kernel": (C, 2, 32),
    "spatial_attn/query/bias": (2, 32),
    "spatial_attn/key/kernel": (C, 2, 32),
    "spatial_attn/key/bias": (2, 32),
    "spatial_attn/value/kernel": (C, 2, 32),
    "spatial_attn/value/bias": (2, 32),
    "spatial_attn/added_key/kernel": (D_CTX, 2, 32),
    "spatial_attn/added_key/bias": (2, 32),
    "spatial_attn/added_value/kernel": (D_CTX, 2, 32),
    "spatial_attn/added_value/bias": (2, 32),
    "spatial_attn/out/kernel": (2, 32, C),
    "spatial_attn/out/bias": (C,),
  }
  # padded context tokens are not read
  changed = ctx.copy()
  changed[1, 3:] = 100.0
  params = jax.tree_util.tree_map(lambda p: p + 0.1, params)  # out starts at zero bias only
  np.testing.assert_allclose(
    model.apply(params, x, ctx, mask), model.apply(params, x, changed, mask), atol=1e-6
  )


def test_added_kv_rejects_bad_configs():
  x, ctx, mask = _inputs(1)
  with pytest.raises(errors.UserError, match="context"):
    Pseudo3DAttention(2, 32, spatial="added_kv").init(jax.random.key(0), x)
  with pytest.raises(errors.UserError, match="use_cross_attention"):
    Pseudo3DAttention(2, 32, spatial="added_kv", use_cross_attention=True).init(
      jax.random.key(0), x, ctx, mask
    )
  with pytest.raises(errors.UserError, match="norm_groups"):
    Pseudo3DAttention(2, 32, spatial="added_kv", norm_groups=24).init(
      jax.random.key(0), x, ctx, mask
    )
  with pytest.raises(errors.UserError, match="spatial"):
    Pseudo3DAttention(2, 32, spatial="conv").init(jax.random.key(0), x, ctx, mask)
