"""Karlo's decoder and super-resolution UNets as SpaceTimeUNet image and video models (docs/karlo_design.md,
step 4): tiny diffusers models with every parameter randomised, converted by
`mav_jax.convert.karlo_unet`, against diffusers in float32.

- decoder: UNet2DConditionModel (ResnetDownsampleBlock2D / SimpleCrossAttn blocks, scale-shift
  resnets, learned variance) + UnCLIPTextProjModel, called as UnCLIPPipeline calls them (text_proj
  output as `class_labels` and `encoder_hidden_states`, the mask padded with 4 valid entries), with
  a padded caption in one row, the learned null image embedding in another, and integer timesteps
  up to 999;
- super-resolution: UNet2DModel (additive resnets, no attention) on concat([x_t, upsampled]);
- inflation: a fresh video model (fps condition, temporal layers) with the converted image weights
  equals diffusers frame by frame on 3 distinct frames.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

from karlo_fixtures import CLIP_DIM, CROSS, SIZE, tiny_decoder, tiny_super_res  # noqa: E402

from mav_jax import errors  # noqa: E402
from mav_jax.convert import karlo_unet  # noqa: E402
from mav_jax.models import SpaceTimeUNet, inflate_image_params, is_temporal  # noqa: E402
from mav_jax.models.embeddings import UnclipProjection  # noqa: E402

TOL = 1e-4
B, TOKENS = 2, 12


def _inputs(frames: int, size: int = SIZE, seed: int = 0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(B, frames, size, size, 3)).astype(np.float32)
  mask = np.ones((B, TOKENS), bool)
  mask[1, 5:] = False  # row 1: a short caption
  return dict(
    x=x,
    t=np.array([999, 3], np.int64),
    image=rng.normal(size=(B, CLIP_DIM)).astype(np.float32),
    text=rng.normal(size=(B, CLIP_DIM)).astype(np.float32),
    hidden=rng.normal(size=(B, TOKENS, CLIP_DIM)).astype(np.float32),
    mask=mask,
    drop=np.array([False, True]),  # row 1: the learned null image embedding (guidance's uncond)
    upsampled=rng.normal(size=(B, frames, size, size, 3)).astype(np.float32),
  )


def _nchw(x: np.ndarray) -> torch.Tensor:
  b, f, h, w, c = x.shape
  return torch.from_numpy(x.reshape(b * f, h, w, c).transpose(0, 3, 1, 2).copy())


def _frames(y: torch.Tensor, b: int, f: int) -> np.ndarray:
  y = y.numpy().transpose(0, 2, 3, 1)
  return y.reshape(b, f, *y.shape[1:])


def _torch_decoder(unet, proj, inp) -> np.ndarray:
  """As UnCLIPPipeline runs the decoder, on every frame of inp["x"]."""
  f = inp["x"].shape[1]
  image = torch.from_numpy(inp["image"]).clone()
  null = proj.learned_classifier_free_guidance_embeddings.detach()
  image[torch.from_numpy(inp["drop"])] = null
  rep = lambda a: torch.from_numpy(np.repeat(a, f, axis=0))  # noqa: E731
  with torch.no_grad():
    hidden, add = proj(
      image_embeddings=torch.repeat_interleave(image, f, 0),
      prompt_embeds=rep(inp["text"]),
      text_encoder_hidden_states=rep(inp["hidden"]),
      do_classifier_free_guidance=False,
    )
    mask = torch.nn.functional.pad(rep(inp["mask"]), (4, 0), value=True)
    y = unet(
      _nchw(inp["x"]),
      rep(inp["t"]),
      encoder_hidden_states=hidden,
      class_labels=add,
      attention_mask=mask,
    ).sample
  return _frames(y, B, f)


def _decoder_call(inp) -> dict:
  return dict(
    global_embedding=jnp.asarray(inp["image"]),
    text_embedding=jnp.asarray(inp["text"]),
    drop_image=jnp.asarray(inp["drop"]),
    context=jnp.asarray(inp["hidden"]),
    context_mask=jnp.asarray(inp["mask"]),
  )


def _decoder_target(kwargs):
  """The decoder image model's parameter shapes (what convert_unet fills)."""
  inp = _inputs(1)
  return jax.eval_shape(
    lambda: SpaceTimeUNet(**kwargs).init(
      jax.random.key(0),
      inp["x"],
      inp["t"].astype(np.float32),
      image_mode=True,
      **_decoder_call(inp),
    )["params"]
  )


def _convert_decoder(unet, proj):
  kwargs = karlo_unet.unet_kwargs_decoder(dict(unet.config), dict(proj.config))
  target = _decoder_target(kwargs)
  params = karlo_unet.convert_unet(
    unet.state_dict(), kwargs, target, "decoder", text_proj=proj.state_dict()
  )
  return kwargs, params


@pytest.fixture(scope="module")
def decoder():
  unet, proj = tiny_decoder()
  kwargs, params = _convert_decoder(unet, proj)
  return unet, proj, kwargs, params


def test_decoder_image_matches_unclip_decoder(decoder):
  unet, proj, kwargs, params = decoder
  inp = _inputs(1)
  ref = _torch_decoder(unet, proj, inp)
  out = SpaceTimeUNet(**kwargs).apply(
    {"params": params},
    inp["x"],
    inp["t"].astype(np.float32),
    image_mode=True,
    **_decoder_call(inp),
  )
  assert out.shape == (B, 1, SIZE, SIZE, 6)
  err = np.abs(np.asarray(out) - ref).max()
  assert err < TOL * max(1.0, np.abs(ref).max()), err


def test_inflated_decoder_equals_the_image_model_frame_by_frame(decoder):
  """A fresh video model (fps condition, temporal convs and attention) with the converted image
  weights copied in: on 3 distinct frames, diffusers applied to each frame."""
  unet, proj, kwargs, params = decoder
  inp = _inputs(3, seed=1)
  video = SpaceTimeUNet(**kwargs, conditioning_scalars=("fps",))
  fps = {"fps": jnp.array([8.0, 24.0])}
  t = inp["t"].astype(np.float32)
  fresh = video.init(jax.random.key(1), inp["x"], t, scalars=fps, **_decoder_call(inp))["params"]
  merged, new = inflate_image_params(params, fresh)
  assert new and all(is_temporal(p) or p[0] == "fps_embed" for p in new), new
  out = video.apply({"params": merged}, inp["x"], t, scalars=fps, **_decoder_call(inp))
  ref = _torch_decoder(unet, proj, inp)
  err = np.abs(np.asarray(out) - ref).max()
  assert err < TOL * max(1.0, np.abs(ref).max()), err


def _torch_super_res(unet, inp) -> np.ndarray:
  f = inp["x"].shape[1]
  x = np.concatenate([inp["x"], inp["upsampled"]], axis=-1)
  with torch.no_grad():
    y = unet(_nchw(x), torch.from_numpy(np.repeat(inp["t"], f))).sample
  return _frames(y, B, f)


@pytest.mark.parametrize("frames", [1, 3])
def test_super_res_matches_unet2d_in_image_and_inflated_video_mode(frames):
  unet = tiny_super_res()
  kwargs = karlo_unet.unet_kwargs_super_res(dict(unet.config))
  inp = _inputs(frames, size=2 * SIZE, seed=2)
  t = inp["t"].astype(np.float32)
  image = SpaceTimeUNet(**kwargs)
  target = jax.eval_shape(
    lambda: image.init(
      jax.random.key(0), inp["x"][:, :1], t, extra_inputs=inp["upsampled"][:, :1], image_mode=True
    )["params"]
  )
  params = karlo_unet.convert_unet(unet.state_dict(), kwargs, target, "super_res_first")
  assert "conv_in_extra" not in params  # the 6-channel kernel maps whole: nothing zero-init
  if frames == 1:
    out = image.apply(
      {"params": params}, inp["x"], t, extra_inputs=inp["upsampled"], image_mode=True
    )
  else:
    video = SpaceTimeUNet(**kwargs, conditioning_scalars=("fps",))
    fps = {"fps": jnp.array([8.0, 24.0])}
    fresh = video.init(jax.random.key(1), inp["x"], t, scalars=fps, extra_inputs=inp["upsampled"])[
      "params"
    ]
    merged, _ = inflate_image_params(params, fresh)
    out = video.apply({"params": merged}, inp["x"], t, scalars=fps, extra_inputs=inp["upsampled"])
  ref = _torch_super_res(unet, inp)
  err = np.abs(np.asarray(out) - ref).max()
  assert err < TOL * max(1.0, np.abs(ref).max()), err


def test_unclip_tokens_are_channel_major(decoder):
  """The 4 image tokens: token k, channel c = image_tokens_proj(y)[c * 4 + k] (diffusers'
  reshape(b, -1, 4).permute(0, 2, 1)), not the row-major reading."""
  unet, proj, kwargs, params = decoder
  inp = _inputs(1)
  call = _decoder_call(inp)
  _, tokens, mask = UnclipProjection(128, CROSS).apply(
    {"params": params["unclip_proj"]},
    call["global_embedding"],
    call["text_embedding"],
    call["context"],
    call["context_mask"],
  )
  with torch.no_grad():
    ref, _ = proj(
      image_embeddings=torch.from_numpy(inp["image"]),
      prompt_embeds=torch.from_numpy(inp["text"]),
      text_encoder_hidden_states=torch.from_numpy(inp["hidden"]),
      do_classifier_free_guidance=False,
    )
  np.testing.assert_allclose(np.asarray(tokens), ref.numpy(), atol=TOL, rtol=TOL)
  assert np.asarray(mask)[:, :4].all() and (np.asarray(mask)[:, 4:] == inp["mask"]).all()


def test_converter_names_what_does_not_fit(decoder):
  unet, proj, kwargs, params = decoder
  config, proj_config = dict(unet.config), dict(proj.config)
  with pytest.raises(errors.UserError, match="resnet_time_scale_shift"):
    karlo_unet.unet_kwargs_decoder({**config, "resnet_time_scale_shift": "default"}, proj_config)
  with pytest.raises(errors.UserError, match="not one this converter knows"):
    karlo_unet.unet_kwargs_decoder({**config, "brand_new_option": 1}, proj_config)
  with pytest.raises(errors.UserError, match="in_channels"):
    karlo_unet.unet_kwargs_decoder({**config, "in_channels": 4}, proj_config)
  with pytest.raises(errors.UserError, match="cross_attention_dim"):
    karlo_unet.unet_kwargs_decoder(config, {**proj_config, "cross_attention_dim": 32})
  old = {k: v for k, v in config.items() if k not in ("attention_type", "time_cond_proj_dim")}
  assert karlo_unet.unet_kwargs_decoder(old, proj_config) == kwargs  # an older config.json

  target = _decoder_target(kwargs)
  state = dict(unet.state_dict())
  proj_state = proj.state_dict()
  convert = lambda s, p=proj_state: karlo_unet.convert_unet(  # noqa: E731
    s, kwargs, target, "decoder", text_proj=p
  )
  missing = {k: v for k, v in state.items() if k != "mid_block.attentions.0.add_k_proj.weight"}
  with pytest.raises(errors.UserError, match="mid_block.attentions.0.add_k_proj.weight"):
    convert(missing)
  with pytest.raises(errors.UserError, match="extra.weight"):
    convert({**state, "extra.weight": torch.zeros(2)})
  wrong = {**state, "conv_in.weight": torch.zeros(32, 3, 5, 5)}
  with pytest.raises(errors.UserError, match=r"conv_in.weight.*\(32, 3, 5, 5\)"):
    convert(wrong)
  with pytest.raises(errors.UserError, match="text_proj.*learned_classifier"):
    convert(state, {k: v for k, v in proj.state_dict().items() if "learned" not in k})
