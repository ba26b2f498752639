"""mav_jax layers against the diffusers blocks Karlo (unCLIP) is built from (docs/karlo_design.md, step 2).

`ResBlock` against `diffusers.models.resnet.ResnetBlock2D` in each mode (time_embedding_norm
"scale_shift" / "default" x no resampling / down / up), with random torch weights copied into our
parameters: image mode on the same input (NCHW vs [b, 1, h, w, c]), and video mode at init (identity
temporal convs) on 3 distinct frames against diffusers applied frame by frame. Float32, 1e-4.
"""

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import traverse_util

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

from diffusers.models.resnet import ResnetBlock2D  # noqa: E402

from mav_jax import errors  # noqa: E402
from mav_jax.models.resblock import ResBlock  # noqa: E402

TOL = 1e-4
B, H, W, TEMB = 2, 8, 8, 16
MODES = [
  (norm, resample) for norm in ("scale_shift", "default") for resample in (None, "down", "up")
]


def _torch_block(norm: str, resample: str | None, c_in: int, c_out: int) -> ResnetBlock2D:
  torch.manual_seed(0)
  block = ResnetBlock2D(
    in_channels=c_in,
    out_channels=c_out,
    temb_channels=TEMB,
    groups=32,
    eps=1e-5,
    time_embedding_norm=norm,
    up=resample == "up",
    down=resample == "down",
  ).eval()
  with torch.no_grad():  # norms start at (1, 0) and biases small: randomise everything
    for p in block.parameters():
      p.copy_(torch.randn_like(p) * (0.3 if p.ndim > 1 else 0.5))
  return block


def _mapping(block: ResnetBlock2D) -> dict[tuple[str, ...], np.ndarray]:
  """diffusers' state dict -> our flat parameter paths: conv OIHW -> HWIO, linear (out, in) -> (in,
  out), GroupNorm weight -> FrameGroupNorm's norm/scale."""
  conv = lambda w: w.transpose(2, 3, 1, 0)
  rules = {
    "norm1.weight": (("norm1", "norm", "scale"), None),
    "norm1.bias": (("norm1", "norm", "bias"), None),
    "conv1.weight": (("conv1", "spatial", "kernel"), conv),
    "conv1.bias": (("conv1", "spatial", "bias"), None),
    "time_emb_proj.weight": (("emb_proj", "kernel"), np.transpose),
    "time_emb_proj.bias": (("emb_proj", "bias"), None),
    "norm2.weight": (("norm2", "norm", "scale"), None),
    "norm2.bias": (("norm2", "norm", "bias"), None),
    "conv2.weight": (("conv2", "spatial", "kernel"), conv),
    "conv2.bias": (("conv2", "spatial", "bias"), None),
    "conv_shortcut.weight": (("skip", "kernel"), conv),
    "conv_shortcut.bias": (("skip", "bias"), None),
  }
  out = {}
  for name, value in block.state_dict().items():
    path, fn = rules[name]  # a KeyError names a diffusers tensor the mapping lacks
    value = value.numpy()
    out[path] = fn(value) if fn else value
  return out


def _ours(norm, resample, c_out, image_mode, block, x, emb):
  """Our ResBlock with `block`'s weights (temporal convs, in video mode, stay at their init)."""
  model = ResBlock(
    c_out,
    image_mode=image_mode,
    time_embedding="additive" if norm == "default" else "scale_shift",
    resample=resample,
  )
  init = traverse_util.flatten_dict(nn.unbox(model.init(jax.random.key(0), x, emb))["params"])
  converted = _mapping(block)
  spatial = {k for k in init if "temporal_conv" not in k}
  assert spatial == set(converted), "every spatial parameter comes from diffusers, and nothing else"
  for k, v in converted.items():
    assert init[k].shape == v.shape, (k, init[k].shape, v.shape)
  params = traverse_util.unflatten_dict({**init, **converted})
  return np.asarray(model.apply({"params": params}, x, emb))


def _reference(block, x_nhwc, temb):
  with torch.no_grad():
    y = block(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy()), torch.from_numpy(temb))
  return y.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("channels", [(32, 64), (32, 32)], ids=["32to64", "32to32"])
@pytest.mark.parametrize("norm,resample", MODES)
def test_resblock_equals_diffusers_resnet_block(norm, resample, channels):
  c_in, c_out = channels
  block = _torch_block(norm, resample, c_in, c_out)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((B, H, W, c_in), dtype=np.float32)
  temb = rng.standard_normal((B, TEMB), dtype=np.float32)
  ref = _reference(block, x, temb)
  side = {None: H, "down": H // 2, "up": 2 * H}[resample]
  assert ref.shape == (B, side, side, c_out)
  ours = _ours(norm, resample, c_out, True, block, x[:, None], temb)
  assert ours.shape == (B, 1) + ref.shape[1:]
  np.testing.assert_allclose(ours[:, 0], ref, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("per_frame_emb", [False, True], ids=["shared_emb", "frame_emb"])
@pytest.mark.parametrize("norm,resample", MODES)
def test_video_resblock_at_init_equals_diffusers_frame_by_frame(norm, resample, per_frame_emb):
  c_in, c_out, f = 32, 64, 3
  block = _torch_block(norm, resample, c_in, c_out)
  rng = np.random.default_rng(1)
  x = rng.standard_normal((B, f, H, W, c_in), dtype=np.float32)
  shape = (B, f, TEMB) if per_frame_emb else (B, TEMB)
  emb = rng.standard_normal(shape, dtype=np.float32)
  ours = _ours(norm, resample, c_out, False, block, x, emb)
  frame_emb = emb if per_frame_emb else np.repeat(emb[:, None], f, axis=1)
  ref = _reference(block, x.reshape((B * f, H, W, c_in)), frame_emb.reshape((B * f, TEMB)))
  ref = ref.reshape((B, f) + ref.shape[1:])
  assert not np.allclose(ref[:, 0], ref[:, 1], atol=1e-2)  # the frames really differ
  np.testing.assert_allclose(ours, ref, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("field,value", [("time_embedding", "default"), ("resample", "downsample")])
def test_resblock_rejects_unknown_modes(field, value):
  x, emb = np.zeros((1, 1, 4, 4, 32), np.float32), np.zeros((1, 8), np.float32)
  with pytest.raises(errors.UserError, match=field):
    ResBlock(32, **{field: value}).init(jax.random.key(0), x, emb)
