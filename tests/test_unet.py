"""Properties of the factorised space-time UNet (not just shapes)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from mav_jax.models import SpaceTimeUNet, axes, inflate_image_params, is_temporal
from mav_jax.models.caption_motion import CaptionMotionConv, shift_kernels

B, F, H, W = 2, 3, 8, 8
EMB, CTX_LEN, CTX_DIM = 6, 5, 12


def _make_test_model(**overrides) -> SpaceTimeUNet:
  """A tiny UNet with every conditioning path on; override any attribute."""
  kwargs = dict(
    channels=16,
    channel_mults=(1, 2),
    num_res_blocks=1,
    attention_levels=(1,),
    head_dim=8,
    conditioning_scalars=("fps",),
    use_global_embedding=True,
    use_cross_attention=True,
  )
  kwargs.update(overrides)
  return SpaceTimeUNet(**kwargs)


def _inputs(seed: int = 0, frames: int = F):
  k = jax.random.split(jax.random.key(seed), 5)
  return dict(
    x=jax.random.normal(k[0], (B, frames, H, W, 3)),
    t=jax.random.uniform(k[1], (B,)),
    fps=jax.random.uniform(k[2], (B,), minval=1.0, maxval=30.0),
    emb=jax.random.normal(k[3], (B, EMB)),
    ctx=jax.random.normal(k[4], (B, CTX_LEN, CTX_DIM)),
    ctx_mask=jnp.array([[True] * CTX_LEN, [True, True, False, False, False]]),
  )


def _conditioning(inp, image_mode=False):
  """The UNet's keyword arguments for inputs `inp` (an image model gets no fps)."""
  return dict(
    scalars={} if image_mode or inp["fps"] is None else {"fps": inp["fps"]},
    global_embedding=inp["emb"],
    context=inp["ctx"],
    context_mask=inp["ctx_mask"],
    image_mode=image_mode,
  )


def _init(model, inp, image_mode=False, seed=42):
  return jax.jit(lambda r: model.init(r, inp["x"], inp["t"], **_conditioning(inp, image_mode)))(
    jax.random.key(seed)
  )


@functools.partial(jax.jit, static_argnums=(0, 3))
def _apply(model, params, inp, image_mode=False, ids=None):
  """The model's output; `ids` (caption token ids) for a model with text_vocab_size."""
  kwargs = _conditioning(inp, image_mode) | ({} if ids is None else {"context_ids": ids})
  return model.apply({"params": params}, inp["x"], inp["t"], **kwargs)


def _per_frame_image_model(model, params, inp):
  """The image model applied to every frame as a separate example: [B, F, ...] -> [B*F, 1, ...]."""
  b, f = inp["x"].shape[:2]
  rep = lambda a: jnp.repeat(a, f, axis=0)  # noqa: E731
  frames = dict(
    x=inp["x"].reshape((b * f, 1) + inp["x"].shape[2:]),
    t=rep(inp["t"]),
    fps=rep(inp["fps"]),
    emb=rep(inp["emb"]),
    ctx=rep(inp["ctx"]),
    ctx_mask=rep(inp["ctx_mask"]),
  )
  return _apply(model, params, frames, True).reshape(inp["x"].shape)


@pytest.fixture(scope="module")
def model():
  return _make_test_model()


@pytest.fixture(scope="module")
def inp():
  return _inputs()


@pytest.fixture(scope="module")
def video_params(model, inp):
  return nn.unbox(_init(model, inp))["params"]


def _perturb_temporal(params, scale=0.3, seed=7):
  flat = traverse_util.flatten_dict(params)
  keys = jax.random.split(jax.random.key(seed), len(flat))
  out = {
    p: v + scale * jax.random.normal(k, v.shape, v.dtype) if is_temporal(p) else v
    for (p, v), k in zip(flat.items(), keys, strict=True)
  }
  return traverse_util.unflatten_dict(out)


def test_video_model_at_init_equals_image_model_per_frame(model, inp, video_params):
  video_out = _apply(model, video_params, inp)
  image_out = _per_frame_image_model(model, video_params, inp)
  assert video_out.shape == (B, F, H, W, 3)
  assert float(jnp.std(video_out)) > 1e-2, "a constant output would make this test vacuous"
  np.testing.assert_allclose(video_out, image_out, atol=1e-5, rtol=1e-5)


def test_temporal_parameters_exist_and_start_as_identity(video_params):
  flat = traverse_util.flatten_dict(video_params)
  temporal = [p for p in flat if is_temporal(p)]
  kinds = {p[-2] for p in temporal}
  assert {"temporal_conv", "temporal_attn", "temporal_norm", "temporal_rel_pos"} <= kinds | {
    p[-3] for p in temporal
  }
  for p in temporal:
    if p[-2] == "temporal_conv" and p[-1] == "kernel":
      taps, c_in, c_out = flat[p].shape
      expected = np.zeros((taps, c_in, c_out)).astype(np.float32)
      expected[taps // 2] = np.eye(c_in)
      np.testing.assert_array_equal(flat[p], expected)
    if p[-3:-1] == ("temporal_attn", "out"):
      np.testing.assert_array_equal(flat[p], 0.0)


def test_perturbed_temporal_layers_mix_frames_and_image_mode_does_not(model, inp, video_params):
  params = _perturb_temporal(video_params)
  changed = dict(inp, x=inp["x"].at[:, 0].add(1.0))  # change frame 0 only
  video_delta = jnp.abs(_apply(model, params, changed) - _apply(model, params, inp))
  image_delta = jnp.abs(_apply(model, params, changed, True) - _apply(model, params, inp, True))
  # Video mode: frames 1.. react to a change of frame 0.
  assert float(video_delta[:, 1:].max()) > 1e-3
  # Image mode: only frame 0 changes, the temporal parameters are not used at all.
  assert float(image_delta[:, 0].max()) > 1e-3
  np.testing.assert_array_equal(image_delta[:, 1:], 0.0)
  np.testing.assert_allclose(
    _apply(model, params, inp, True), _per_frame_image_model(model, video_params, inp), atol=1e-5
  )
  # ... and the perturbed video model is no longer the per-frame image model.
  assert float(jnp.abs(_apply(model, params, inp) - _apply(model, params, inp, True)).max()) > 1e-3


def test_image_model_parameters_load_into_video_model(inp):
  image_model = _make_test_model(conditioning_scalars=())  # an image model has no fps condition
  video_model = _make_test_model()
  image_params = nn.unbox(_init(image_model, inp, image_mode=True, seed=1))["params"]
  fresh_video = nn.unbox(_init(video_model, inp))["params"]
  params, new_paths = inflate_image_params(image_params, fresh_video)
  assert new_paths, "the video model must add temporal layers"
  assert all(is_temporal(p) or p[0] == "fps_embed" for p in new_paths), new_paths
  video_out = _apply(video_model, params, inp)
  image_out = _per_frame_image_model(image_model, image_params, inp)
  np.testing.assert_allclose(video_out, image_out, atol=1e-5, rtol=1e-5)
  # And the loaded weights really are the image model's, not the fresh video init.
  assert float(jnp.abs(video_out - _apply(video_model, fresh_video, inp)).max()) > 1e-3


def _abstract_params(model, inp, image_mode=False):
  """Parameter shapes and dtypes only (jax.eval_shape: nothing is compiled or allocated)."""
  return nn.unbox(jax.eval_shape(lambda: _init(model, inp, image_mode)))["params"]


def test_inflate_rejects_mismatched_configs(inp):
  small = _abstract_params(_make_test_model(conditioning_scalars=()), inp, True)
  wide = _abstract_params(_make_test_model(channels=32, head_dim=16), inp)
  with pytest.raises(ValueError, match="shapes differ"):
    inflate_image_params(small, wide)
  no_global = _abstract_params(_make_test_model(use_global_embedding=False), dict(inp, emb=None))
  with pytest.raises(ValueError, match="missing from the video model"):
    inflate_image_params(small, no_global)


def test_parameters_keep_param_dtype_while_compute_runs_in_bf16(inp):
  model = _make_test_model(dtype=jnp.bfloat16, param_dtype=jnp.float32)
  params = _abstract_params(model, inp)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  out, state = jax.eval_shape(
    lambda p: model.apply(
      {"params": p}, inp["x"], inp["t"], **_conditioning(inp), capture_intermediates=True
    ),
    params,
  )
  assert out.dtype == jnp.float32
  inter = traverse_util.flatten_dict(state["intermediates"])
  # Every block's output (convs, attention, residual blocks) is computed in bfloat16.
  blocks = {
    p: v[0]
    for p, v in inter.items()
    if p[-1] == "__call__" and len(p) == 2 and p[0] != "time_embed"
  }
  assert len(blocks) > 10 and all(v.dtype == jnp.bfloat16 for v in blocks.values()), {
    p: v.dtype for p, v in blocks.items()
  }
  bf16_params = _abstract_params(
    _make_test_model(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16), inp
  )
  assert {x.dtype for x in jax.tree.leaves(bf16_params)} == {jnp.dtype(jnp.bfloat16)}


# Strategy tables of the kind the trainer keeps in its config: logical name -> mesh axis.
_RULES = {
  "data_parallel": [],
  "fsdp": [(axes.CHANNELS_IN, "fsdp"), (axes.EMBED, "fsdp"), (axes.CONTEXT, "fsdp")],
  "tensor": [(axes.HEADS, "tensor"), (axes.MLP, "tensor"), (axes.CHANNELS_OUT, "tensor")],
}
# Tensor first; then FSDP, with channels_out falling back to fsdp where tensor is already used.
_RULES["fsdp_tensor"] = _RULES["tensor"] + _RULES["fsdp"] + [(axes.CHANNELS_OUT, "fsdp")]


def test_every_parameter_carries_logical_axis_names(model, inp):
  variables = jax.eval_shape(lambda: _init(model, inp))
  boxed = jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert boxed
  for leaf in boxed:
    assert isinstance(leaf, nn.Partitioned), f"unnamed parameter of shape {leaf.shape}"
    assert len(leaf.names) == leaf.value.ndim
    assert set(leaf.names) <= set(axes.PARAM_AXES), leaf.names
    assert len(set(leaf.names)) == len(leaf.names), f"repeated axis name: {leaf.names}"


@pytest.mark.parametrize("strategy", sorted(_RULES))
def test_logical_names_map_onto_an_8_device_mesh(model, inp, strategy):
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
  variables = jax.eval_shape(lambda: _init(model, inp))
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(variables), mesh, _RULES[strategy])
  flat = traverse_util.flatten_dict(shardings["params"])
  query = flat[("mid_attn", "spatial_attn", "query", "kernel")].spec
  ff_out = flat[("mid_attn", "ff", "wo", "kernel")].spec
  if strategy == "data_parallel":
    assert all(all(a is None for a in s.spec) for s in flat.values())
  if "tensor" in strategy:
    assert query[1] == "tensor"  # heads split over the tensor axis
    assert ff_out == jax.sharding.PartitionSpec(
      "tensor", "fsdp" if strategy == "fsdp_tensor" else None
    )  # hidden split over tensor (the first rule wins over channels_out)
  if strategy == "fsdp":
    assert query[0] == "fsdp"


def test_remat_gives_the_same_outputs_and_gradients(inp):
  # One level with a residual block and the middle attention: both kinds of remat-wrapped block.
  small = dict(channel_mults=(1,), attention_levels=())
  plain, remat = _make_test_model(**small), _make_test_model(remat=True, **small)
  params = nn.unbox(_init(plain, inp))["params"]

  def loss(model, p):
    return jnp.mean(_apply(model, p, inp) ** 2)

  assert "remat" in str(jax.make_jaxpr(jax.grad(functools.partial(loss, remat)))(params))
  assert "remat" not in str(jax.make_jaxpr(jax.grad(functools.partial(loss, plain)))(params))
  g_plain = jax.jit(jax.grad(functools.partial(loss, plain)))(params)
  g_remat = jax.jit(jax.grad(functools.partial(loss, remat)))(params)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4), g_plain, g_remat
  )


def test_extra_input_channels_start_as_the_base_model(inp):
  base = _make_test_model(use_cross_attention=False, use_global_embedding=False)
  extra = _make_test_model(
    use_cross_attention=False, use_global_embedding=False, extra_input_channels=4
  )
  masked = jnp.concatenate([inp["x"] * 0.5, jnp.ones((B, F, H, W, 1))], axis=-1)
  run = lambda m, v, **kw: m.apply(v, inp["x"], inp["t"], scalars={"fps": inp["fps"]}, **kw)  # noqa
  v_extra = jax.jit(
    lambda r: extra.init(r, inp["x"], inp["t"], scalars={"fps": inp["fps"]}, extra_inputs=masked)
  )(jax.random.key(0))
  v_base = {"params": {k: v for k, v in v_extra["params"].items() if k != "conv_in_extra"}}
  np.testing.assert_allclose(
    jax.jit(lambda v: run(extra, v, extra_inputs=masked))(v_extra),
    jax.jit(lambda v: run(base, v))(v_base),
    atol=1e-6,
  )


@pytest.mark.parametrize(
  "bad, match",
  [
    (dict(x=jnp.zeros((B, H, W, 3))), "frames, height, width"),
    (dict(x=jnp.zeros((B, F, 9, 9, 3))), "divisible by 2"),
    (dict(fps=None), "missing scalar conditions"),
    (dict(emb=None), "needs global_embedding"),
    (dict(ctx=None), "needs context"),
  ],
)
def test_bad_inputs_raise_clear_errors(model, video_params, inp, bad, match):
  args = dict(inp, **bad)
  with pytest.raises(ValueError, match=match):
    model.apply({"params": video_params}, args["x"], args["t"], **_conditioning(args))


def test_bad_scalar_scales_and_remat_policy_are_rejected(inp):
  bad = _make_test_model(conditioning_scalar_scales=(1.0, 1000.0))
  with pytest.raises(ValueError, match="one scale per"):
    _abstract_params(bad, inp)
  with pytest.raises(ValueError, match="unknown remat_policy"):
    _abstract_params(_make_test_model(remat=True, remat_policy="save_all"), inp)


def test_temporal_text_attention_starts_as_identity_and_ignores_captionless_clips(inp):
  model = _make_test_model(use_cross_attention=False, temporal_text_attention=True)
  paper = _make_test_model(use_cross_attention=False)
  params = nn.unbox(_init(model, inp))["params"]
  flat = traverse_util.flatten_dict(params)
  added = {p for p in flat if "temporal_cross_attn" in p or "temporal_cross_norm" in p}
  assert added and all(is_temporal(p) for p in added)  # trained with the temporal layers
  # At initialisation the text branch adds zero: the paper's model with the same weights.
  without = traverse_util.unflatten_dict({p: v for p, v in flat.items() if p not in added})
  np.testing.assert_allclose(
    _apply(model, params, inp), _apply(paper, without, inp), atol=1e-6, rtol=1e-6
  )
  # Trained (perturbed): the caption moves the output, except for clips whose mask is all False.
  moved = _perturb_temporal(params)
  other = dict(inp, ctx=inp["ctx"] + 1.0)
  delta = jnp.abs(_apply(model, moved, other) - _apply(model, moved, inp))
  assert float(delta.max()) > 1e-3
  none = dict(inp, ctx_mask=jnp.zeros_like(inp["ctx_mask"]))
  np.testing.assert_array_equal(
    _apply(model, moved, dict(none, ctx=inp["ctx"] + 1.0)), _apply(model, moved, none)
  )
  # An image model needs no caption; a video model without context names the problem.
  image = dict(inp, ctx=None, ctx_mask=None)
  assert _apply(model, moved, image, True).shape == inp["x"].shape
  with pytest.raises(ValueError, match="temporal_text_attention=True needs context"):
    _apply(model, moved, image)


def test_learned_caption_tokens_start_at_zero_and_separate_ids_the_context_does_not():
  """text_vocab_size: a learned embedding of the caption ids joins the context features. At init
  it adds nothing; trained, two captions whose frozen features are identical but whose ids differ
  (a motion word CLIP did not learn) give different outputs, and captionless clips stay exact."""
  inp = _inputs()
  model = _make_test_model(
    use_cross_attention=False, temporal_text_attention=True, text_vocab_size=9
  )
  plain = _make_test_model(use_cross_attention=False, temporal_text_attention=True)
  ids = jnp.array([[1, 4, 5, 6, 2], [1, 3, 2, 0, 0]], jnp.int32)

  params = nn.unbox(
    jax.jit(lambda r: model.init(r, inp["x"], inp["t"], **_conditioning(inp), context_ids=ids))(
      jax.random.key(42)
    )
  )["params"]
  assert params["temporal_text_tokens"].shape == (9, CTX_DIM)
  assert is_temporal(("temporal_text_tokens",)) and is_temporal(("temporal_text_positions",))
  rest = {k: v for k, v in params.items() if not k.startswith("temporal_text_")}
  moved = _perturb_temporal(params)
  np.testing.assert_allclose(
    _apply(model, params, inp, ids=ids), _apply(plain, rest, inp), atol=1e-6, rtol=1e-6
  )
  other_ids = ids.at[0, 2].set(7)  # same context features, another word
  delta = jnp.abs(_apply(model, moved, inp, ids=other_ids) - _apply(model, moved, inp, ids=ids))
  assert float(delta[0].max()) > 1e-3 and float(delta[1].max()) == 0.0
  none = dict(inp, ctx_mask=jnp.zeros_like(inp["ctx_mask"]))
  np.testing.assert_array_equal(
    _apply(model, moved, none, ids=other_ids), _apply(model, moved, none, ids=ids)
  )
  with pytest.raises(ValueError, match="text_vocab_size=9 needs context_ids"):
    _apply(model, moved, inp)


def test_caption_motion_conv_is_a_caption_mixed_depthwise_space_time_conv():
  """model.text_motion.conv_size's CaptionMotionConv: zero at init, then per clip exactly a depthwise
  (frame, y, x) conv (XLA's grouped conv as the reference) of the GroupNormed input with the
  caption's mix of the kernel bank; a rightward-motion kernel answers rightward motion more than
  leftward; exactly zero without a caption; in the UNet, the identity at init and a temporal,
  text-pathway parameter."""
  inp = _inputs()
  x = jax.random.normal(jax.random.key(3), (B, 3, 6, 6, 4))
  conv = CaptionMotionConv(kernel_size=3, kernels=5, hidden=8)
  params = nn.unbox(conv.init(jax.random.key(0), x, inp["ctx"], inp["ctx_mask"]))["params"]
  assert float(jnp.abs(conv.apply({"params": params}, x, inp["ctx"], inp["ctx_mask"])).max()) == 0
  params = dict(params, out={"kernel": jnp.eye(4), "bias": jnp.zeros(4)})
  out, state = conv.apply(
    {"params": params}, x, inp["ctx"], inp["ctx_mask"], capture_intermediates=True
  )
  mix = state["intermediates"]["mix"]["__call__"][0]
  normed = state["intermediates"]["in_norm"]["__call__"][0]
  kernels = jnp.einsum("bn,ntyxc->btyxc", mix, params["kernel_bank"])
  for i in range(B):
    want = jax.lax.conv_general_dilated(
      normed[i : i + 1],
      kernels[i][:, :, :, None, :],
      (1, 1, 1),
      "SAME",
      dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
      feature_group_count=4,
    )
    np.testing.assert_allclose(out[i : i + 1], want, atol=1e-5, rtol=1e-5)
  assert float(jnp.abs(mix[0] - mix[1]).max()) > 1e-3  # the caption sets the mix
  none = conv.apply({"params": params}, x, inp["ctx"], jnp.zeros_like(inp["ctx_mask"]))
  assert float(jnp.abs(none).max()) == 0.0
  # One kernel that takes the left pixel from the previous frame and the right one from the next.
  bank = jnp.zeros_like(params["kernel_bank"]).at[:, 0, 1, 0].set(1.0).at[:, 2, 1, 2].set(1.0)
  dot = lambda xs: jnp.zeros((1, 3, 6, 6, 4)).at[0, jnp.arange(3), 2, jnp.array(xs)].set(1.0)  # noqa: E731
  ctx, ctx_mask = inp["ctx"][:1], inp["ctx_mask"][:1]
  respond = lambda clip: conv.apply(  # noqa: E731
    {"params": dict(params, kernel_bank=bank)}, clip, ctx, ctx_mask
  )[0, 1, 2, 2]  # middle frame, where both dots pass
  right, left = respond(dot([1, 2, 3])), respond(dot([3, 2, 1]))
  assert float(jnp.abs(right - left).min()) > 0.1
  # The initial bank: kernel i follows one pixel per frame towards compass direction i.
  initial = shift_kernels(jax.random.key(0), (8, 3, 3, 3, 4))
  for i, xs, ys in [
    (0, [1, 2, 3], [2, 2, 2]),
    (2, [2, 2, 2], [1, 2, 3]),
    (4, [3, 2, 1], [2, 2, 2]),
  ]:
    clip = jnp.zeros((1, 3, 6, 6, 4)).at[0, jnp.arange(3), jnp.array(ys), jnp.array(xs)].set(1.0)
    for n in range(8):
      got = jax.lax.conv_general_dilated(
        clip,
        initial[n][:, :, :, None, :],
        (1, 1, 1),
        "SAME",
        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
        feature_group_count=4,
      )[0, 1, 2, 2]
      # Its own motion: both taps on the dot (~1); any other direction: at most one (~0.5).
      assert (float(got.min()) > 0.9) if n == i else (float(got.max()) < 0.6), (i, n, got)
  with pytest.raises(ValueError, match="odd kernel_size"):
    CaptionMotionConv(kernel_size=2).init(jax.random.key(0), x, inp["ctx"], None)
  # In the UNet: after every residual block, the identity at init, trained as a temporal layer.
  model = _make_test_model(
    use_cross_attention=False, temporal_text_attention=True, text_motion_conv=3
  )
  plain = _make_test_model(use_cross_attention=False, temporal_text_attention=True)
  flat = traverse_util.flatten_dict(nn.unbox(_init(model, inp))["params"])
  added = {p for p in flat if p[0].startswith("temporal_text_motion_")}
  assert {p[0] for p in added} >= {
    "temporal_text_motion_down_0_res_0",
    "temporal_text_motion_mid_res_1",
  }
  assert all(is_temporal(p) for p in added)
  params = traverse_util.unflatten_dict(flat)
  rest = traverse_util.unflatten_dict({p: v for p, v in flat.items() if p not in added})
  np.testing.assert_allclose(
    _apply(model, params, inp), _apply(plain, rest, inp), atol=1e-6, rtol=1e-6
  )
  image = dict(inp, ctx=None, ctx_mask=None)
  assert _apply(model, params, image, True).shape == inp["x"].shape


def test_a_time_per_frame_conditions_each_frame_on_its_own_noise_level(model, video_params, inp):
  """t [b, f] (diffusion.frame_noise): equal times are exactly t [b]; in image mode (frames
  independent) changing one frame's time changes that frame alone; a wrong shape is named."""
  per_frame = jnp.repeat(inp["t"][:, None], F, axis=1)
  np.testing.assert_allclose(
    _apply(model, video_params, dict(inp, t=per_frame)), _apply(model, video_params, inp), atol=1e-6
  )
  image = dict(inp, t=per_frame, fps=None)
  moved = dict(image, t=per_frame.at[:, 0].set(0.97))
  delta = jnp.abs(
    _apply(model, video_params, moved, True) - _apply(model, video_params, image, True)
  )
  assert float(delta[:, 0].max()) > 1e-3
  assert float(delta[:, 1:].max()) == 0.0
  with pytest.raises(ValueError, match=r"or \[batch, frames\]"):
    _apply(model, video_params, dict(inp, t=jnp.ones((B, F + 1))))
