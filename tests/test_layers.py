"""The pseudo-3D layers on their own: temporal conv, relative positions, attention masking."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mav_jax.models import axes
from mav_jax.models.attention import (
  MultiHeadAttention,
  Pseudo3DAttention,
  RelativePositionBias,
  attend,
)
from mav_jax.models.common import spatial_conv
from mav_jax.models.conv import Pseudo3DConv, TemporalConv


def test_temporal_conv_is_identity_at_init_and_convolves_over_frames_only():
  x = jax.random.normal(jax.random.key(0), (2, 5, 3, 4, 6))
  conv = TemporalConv(kernel_size=3)
  params = nn.unbox(conv.init(jax.random.key(1), x))["params"]
  np.testing.assert_allclose(conv.apply({"params": params}, x), x, atol=1e-6)

  kernel = jax.random.normal(jax.random.key(2), (3, 6, 6))
  bias = jnp.arange(6.0)
  y = conv.apply({"params": {"kernel": kernel, "bias": bias}}, x)
  # Reference: y[:, f] = sum_k x[:, f + k - 1] @ kernel[k] (zero padding at the ends) + bias.
  xp = np.pad(np.asarray(x), ((0, 0), (1, 1), (0, 0), (0, 0), (0, 0)))
  ref = sum(np.einsum("bfhwc,cd->bfhwd", xp[:, k : k + 5], np.asarray(kernel[k])) for k in range(3))
  np.testing.assert_allclose(y, ref + np.asarray(bias), atol=1e-4)


def test_temporal_conv_rejects_even_kernels():
  with pytest.raises(ValueError, match="odd"):
    TemporalConv(kernel_size=2).init(jax.random.key(0), jnp.zeros((1, 4, 2, 2, 3)))


def test_pointwise_conv_is_nn_conv_in_value_gradient_and_parameters():
  """Every 1x1 conv is a channel matmul (PointwiseConv) equal to nn.Conv with the same parameters
  (checkpoints interchange), logical axes and dtypes."""
  x = jax.random.normal(jax.random.key(0), (2, 3, 4, 4, 6))
  fast = spatial_conv(5, kernel_size=1, name="conv", dtype=jnp.float32, param_dtype=jnp.bfloat16)
  boxed = fast.init(jax.random.key(1), x)["params"]
  assert boxed["kernel"].names == (axes.CONV_H, axes.CONV_W, axes.CHANNELS_IN, axes.CHANNELS_OUT)
  params = nn.unbox(boxed)
  assert params["kernel"].shape == (1, 1, 6, 5) and params["kernel"].dtype == jnp.bfloat16
  params = {"kernel": jax.random.normal(jax.random.key(2), (1, 1, 6, 5)), "bias": jnp.arange(5.0)}
  conv = nn.Conv(5, (1, 1), padding="SAME")

  def loss(module, params, x):
    return jnp.sum(jnp.sin(module.apply({"params": params}, x)))

  for a, b in zip(
    jax.tree.leaves(jax.value_and_grad(loss, argnums=(1, 2))(fast, params, x)),
    jax.tree.leaves(jax.value_and_grad(loss, argnums=(1, 2))(conv, params, x)),
    strict=True,
  ):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_pseudo3d_conv_equals_its_spatial_conv_at_init():
  x = jax.random.normal(jax.random.key(0), (2, 4, 6, 6, 3))
  video = Pseudo3DConv(8)
  params = video.init(jax.random.key(1), x)
  image = Pseudo3DConv(8, image_mode=True)
  np.testing.assert_allclose(
    video.apply(params, x),
    image.apply({"params": {"spatial": params["params"]["spatial"]}}, x),
    atol=1e-5,
  )


def test_relative_position_bias_depends_only_on_clipped_distance():
  rel = RelativePositionBias(num_heads=2, max_distance=2)
  params = rel.init(jax.random.key(0), 6)
  bias = np.asarray(rel.apply(params, 6))[0]
  assert bias.shape == (2, 6, 6)
  for i in range(6):
    for j in range(6):
      d = int(np.clip(j - i, -2, 2))
      np.testing.assert_array_equal(bias[:, i, j], bias[:, 0 if d >= 0 else -d, d if d >= 0 else 0])
  # More frames than at training time reuse the edge buckets: nothing breaks.
  assert rel.apply(params, 40).shape == (1, 2, 40, 40)


def test_attend_is_jax_dot_product_attention_in_value_and_gradient():
  """The model's attention (bfloat16 scores) is jax.nn.dot_product_attention's math: equal in
  float32 with a bias and a mask (one query row of a clip fully masked), close in bfloat16."""
  keys = jax.random.split(jax.random.key(0), 5)
  q, k, v = (jax.random.normal(key, (2, 5, 3, 8)) for key in keys[:3])
  bias = jax.random.normal(keys[3], (1, 3, 5, 5))
  mask = jax.random.bernoulli(keys[4], 0.7, (2, 1, 5, 5)).at[1, :, 2].set(False)

  def loss(fn, q, k, v):
    return jnp.sum(jnp.sin(fn(q, k, v, bias=bias, mask=mask).astype(jnp.float32)))

  ours = jax.value_and_grad(functools.partial(loss, attend), argnums=(0, 1, 2))
  ref = jax.value_and_grad(functools.partial(loss, jax.nn.dot_product_attention), argnums=(0, 1, 2))
  for a, b in zip(jax.tree.leaves(ours(q, k, v)), jax.tree.leaves(ref(q, k, v)), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  half = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  out = attend(*half, bias=bias, mask=mask)
  assert out.dtype == jnp.bfloat16
  expected = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask)
  np.testing.assert_allclose(out.astype(jnp.float32), expected, atol=0.05)


def test_masked_context_tokens_do_not_affect_cross_attention():
  attn = MultiHeadAttention(num_heads=2, head_dim=4)
  x = jax.random.normal(jax.random.key(0), (1, 3, 8))
  ctx = jax.random.normal(jax.random.key(1), (1, 5, 7))
  mask = jnp.array([[True, True, True, False, False]])
  params = attn.init(jax.random.key(2), x, ctx, mask)
  changed = ctx.at[:, 3:].set(100.0)
  np.testing.assert_allclose(
    attn.apply(params, x, ctx, mask), attn.apply(params, x, changed, mask), atol=1e-6
  )
  assert float(jnp.abs(attn.apply(params, x, ctx) - attn.apply(params, x, changed)).max()) > 1e-3


def test_pseudo3d_attention_needs_context_when_built_for_cross_attention():
  block = Pseudo3DAttention(num_heads=2, head_dim=4, use_cross_attention=True)
  with pytest.raises(ValueError, match="context"):
    block.init(jax.random.key(0), jnp.zeros((1, 2, 4, 4, 8)))
