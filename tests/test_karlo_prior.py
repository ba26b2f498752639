"""DiffusionPrior as Karlo's prior: `mav_jax.convert.karlo_prior` against diffusers' PriorTransformer
(docs/karlo_design.md, step 5).

A tiny `PriorTransformer` with every parameter randomised (clip_mean and clip_std included) is saved
with `save_pretrained` and converted from its folder (config.json and safetensors); its forward pass
with the attention mask the unCLIP pipeline passes (so diffusers adds its causal mask), padding in
one row and integer timesteps up to 999, and `post_process_latents`, against ours. Float32, 1e-4.
"""

import json
import re

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import traverse_util

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

from diffusers import PriorTransformer  # noqa: E402
from karlo_fixtures import LENGTH as L  # noqa: E402
from karlo_fixtures import tiny_prior  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from mav_jax import errors  # noqa: E402
from mav_jax.convert.karlo_prior import convert_prior  # noqa: E402
from mav_jax.models.prior import DiffusionPrior  # noqa: E402

TOL = 1e-4
B = 2
# The tiny prior of docs/karlo_design.md §4 (width 16 = embedding_dim), and one whose CLIP width (24)
# differs from the transformer's (16), so a swapped in/out size cannot pass.
SIZES = {"square": 16, "narrow": 24}
# PriorTransformer config keys added after Karlo's config.json was written (docs/karlo_design.md, T5).
NEWER_KEYS = (
  "time_embed_act_fn",
  "norm_in_type",
  "embedding_proj_norm_type",
  "encoder_hid_proj_type",
  "added_emb_type",
  "time_embed_dim",
  "embedding_proj_dim",
  "clip_embed_dim",
)


@pytest.fixture(scope="module", params=list(SIZES), ids=list(SIZES))
def converted(request, tmp_path_factory):
  """(diffusers prior, our kwargs, our params) converted from a save_pretrained folder."""
  prior = tiny_prior(SIZES[request.param])
  folder = tmp_path_factory.mktemp("prior")
  prior.save_pretrained(folder)
  config = json.loads((folder / "config.json").read_text())
  state = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
  kwargs, params = convert_prior(state, config)
  return prior, kwargs, params


def _inputs(d: int):
  rng = np.random.default_rng(1)
  z = rng.normal(size=(B, d)).astype(np.float32)
  text = rng.normal(size=(B, d)).astype(np.float32)
  tokens = rng.normal(size=(B, L, d)).astype(np.float32)
  mask = np.ones((B, L), bool)
  mask[1, 7:] = False  # row 1 has five padding tokens
  t = np.array([999, 3], np.int64)
  return z, t, text, tokens, mask


def _torch(prior: PriorTransformer, z, t, text, tokens, mask) -> np.ndarray:
  with torch.no_grad():
    out = prior(
      torch.from_numpy(z),
      torch.from_numpy(t),
      proj_embedding=torch.from_numpy(text),
      encoder_hidden_states=torch.from_numpy(tokens),
      attention_mask=torch.from_numpy(mask),
    )
  return out.predicted_image_embedding.numpy()


def _ours(kwargs, params, z, t, text, tokens, mask) -> np.ndarray:
  net = DiffusionPrior(**kwargs)
  return np.asarray(net.apply({"params": params}, z, t.astype(np.int32), text, tokens, mask))


def test_converted_tree_is_the_modules(converted):
  _, kwargs, params = converted
  assert kwargs["activation"] == "gelu_exact" and kwargs["causal"] and kwargs["clip_stats"]
  assert kwargs["time_scale"] == 1.0 and kwargs["max_tokens"] == L
  d = kwargs["embed_dim"]
  shapes = jax.eval_shape(
    DiffusionPrior(**kwargs).init, jax.random.key(0), *_inputs(d)[:4], np.ones((B, L), bool)
  )["params"]
  ours = traverse_util.flatten_dict(params)
  want = traverse_util.flatten_dict(nn.unbox(shapes))
  assert set(ours) == set(want)
  for path, value in ours.items():
    assert isinstance(value, np.ndarray) and value.dtype == np.float32, path
    assert value.shape == want[path].shape, path


def test_forward_matches_diffusers(converted):
  prior, kwargs, params = converted
  inputs = _inputs(kwargs["embed_dim"])
  ref = _torch(prior, *inputs)
  np.testing.assert_allclose(_ours(kwargs, params, *inputs), ref, atol=TOL, rtol=0)
  # the padding matters: without it row 1 differs
  unpadded = _torch(prior, *inputs[:4], np.ones((B, L), bool))
  assert np.abs(unpadded[1] - ref[1]).max() > 1e-2


def test_clip_stats_match_post_process_latents(converted):
  prior, kwargs, params = converted
  x = np.random.default_rng(2).normal(size=(B, kwargs["embed_dim"])).astype(np.float32)
  with torch.no_grad():
    ref = prior.post_process_latents(torch.from_numpy(x)).numpy()
  net = DiffusionPrior(**kwargs)
  raw = np.asarray(net.apply({"params": params}, x, method=DiffusionPrior.raw_embedding))
  np.testing.assert_allclose(raw, ref, atol=1e-5, rtol=0)
  back = net.apply({"params": params}, raw, method=DiffusionPrior.normalise_embedding)
  np.testing.assert_allclose(np.asarray(back), x, atol=1e-5, rtol=0)


def test_clip_stats_parameters():
  d = 16
  inputs = (*_inputs(d)[:4], np.ones((B, L), bool))
  default = DiffusionPrior(d, width=16, layers=1, heads=2, max_tokens=L)
  params = jax.eval_shape(default.init, jax.random.key(0), *inputs)["params"]
  assert "clip_mean" not in params and "clip_std" not in params
  net = DiffusionPrior(d, width=16, layers=1, heads=2, max_tokens=L, clip_stats=True)
  params = net.init(jax.random.key(0), *inputs)["params"]
  assert params["clip_mean"].names == params["clip_std"].names == ("context",)
  np.testing.assert_array_equal(nn.unbox(params["clip_mean"]), np.zeros(d))
  np.testing.assert_array_equal(nn.unbox(params["clip_std"]), np.ones(d))
  x = np.arange(2 * d, dtype=np.float32).reshape(2, d)
  for method in (DiffusionPrior.normalise_embedding, DiffusionPrior.raw_embedding):
    np.testing.assert_array_equal(net.apply({"params": params}, x, method=method), x)
  with pytest.raises(errors.UserError, match="clip_stats=False"):
    default.apply({"params": {}}, x, method=DiffusionPrior.raw_embedding)


# ---- the converter's checks ----


@pytest.fixture(scope="module")
def source():
  """A tiny prior's state dict (numpy) and config (as config.json holds it)."""
  prior = tiny_prior(16)
  state = {k: v.numpy() for k, v in prior.state_dict().items()}
  config = {"_class_name": "PriorTransformer", "_diffusers_version": "0.42.1", **prior.config}
  config.pop("_use_default_values", None)
  return state, config


def test_old_config_and_mask_buffer(source):
  state, config = source
  kwargs, params = convert_prior(state, config)
  # a config.json from before the newer keys existed: diffusers' defaults apply
  old = {k: v for k, v in config.items() if k not in NEWER_KEYS}
  assert convert_prior(state, old)[0] == kwargs
  # time_embed_dim / embedding_proj_dim / clip_embed_dim equal to what they default to
  same = {**config, "time_embed_dim": 16, "embedding_proj_dim": 16, "clip_embed_dim": 16}
  assert convert_prior(state, same)[0] == kwargs
  # the non-persistent causal mask buffer, should a state dict hold it
  buffered = {**state, "causal_attention_mask": np.zeros((1, L + 4, L + 4), np.float32)}
  kw2, params2 = convert_prior(buffered, config)
  assert kw2 == kwargs
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_missing_tensor(source):
  state, config = source
  state = {k: v for k, v in state.items() if k != "transformer_blocks.1.norm3.bias"}
  with pytest.raises(errors.UserError, match=r"no tensor 'transformer_blocks\.1\.norm3\.bias'"):
    convert_prior(state, config)


def test_left_over_tensor(source):
  state, config = source
  state = {**state, "norm_in.weight": np.ones(16, np.float32)}
  with pytest.raises(errors.UserError, match=r"1 tensors the conversion does not use.*norm_in\.w"):
    convert_prior(state, config)
  # a layer more than the config says
  state, config = source
  with pytest.raises(errors.UserError, match=r"transformer_blocks\.1\.attn1\.to_k\.weight"):
    convert_prior(state, {**config, "num_layers": 1})


def test_wrong_shape(source):
  state, config = source
  state = {**state, "clip_mean": np.zeros((1, 15), np.float32)}
  with pytest.raises(
    errors.UserError, match=r"'clip_mean' has shape \(1, 15\), expected \(1, 16\)"
  ):
    convert_prior(state, config)
  state, config = source
  with pytest.raises(errors.UserError, match=r"'positional_embedding' has shape \(1, 16, 16\)"):
    convert_prior(state, {**config, "num_embeddings": 77})


@pytest.mark.parametrize(
  "key,value",
  [
    ("norm_in_type", "layer"),
    ("embedding_proj_norm_type", "layer"),
    ("encoder_hid_proj_type", None),
    ("added_emb_type", None),
    ("time_embed_act_fn", "gelu"),
    ("additional_embeddings", 3),
    ("dropout", 0.1),
    ("time_embed_dim", 32),
    ("embedding_proj_dim", 8),
    ("clip_embed_dim", 8),
    ("num_layers", 0),
    ("_class_name", "UNet2DModel"),
  ],
)
def test_unsupported_config_value(source, key, value):
  state, config = source
  with pytest.raises(errors.UserError, match=re.escape(f"{key}={value!r}")):
    convert_prior(state, {**config, key: value})
