"""The diffusers reference for the Karlo end-to-end parity test (docs/karlo_design.md §3, T25):
`karlo_fixtures.run_unclip_pipeline` on the tiny random Karlo folder, checked on its own (shapes,
determinism under injected noise, the captured stages agreeing with each other and with the final
image); and the upsampling numerics the JAX side relies on (T17): `jax.image.resize` bicubic
against torch's bicubic with and without antialiasing.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from karlo_fixtures import (  # noqa: E402
  CLIP_DIM,
  CROSS,
  LENGTH,
  SIZE,
  run_unclip_pipeline,
  write_karlo_folder,
)

PROMPTS = ["a red circle", "the blue one is circling"]  # 5 and 9 tokens of 12
STEPS = dict(prior_steps=3, decoder_steps=4, sr_steps=3)


@pytest.fixture(scope="module")
def karlo(tmp_path_factory):
  path = tmp_path_factory.mktemp("karlo")
  parts = write_karlo_folder(path)
  run = lambda: run_unclip_pipeline(  # noqa: E731
    parts, path / "tokenizer", PROMPTS, **STEPS, prior_guidance=4.0, decoder_guidance=8.0
  )
  return run(), run()


def test_shapes_and_finite(karlo):
  out, _ = karlo
  b, s, big = len(PROMPTS), SIZE, 2 * SIZE
  expect = {
    "images": (b, big, big, 3),
    "prior_latents": (b, CLIP_DIM),
    "image_embeddings": (b, CLIP_DIM),
    "decoder_image": (b, s, s, 3),
    "upscaled": (b, big, big, 3),
    "super_res": (b, big, big, 3),
  }
  latent = {"prior": (b, CLIP_DIM), "decoder": (b, s, s, 3), "super_res": (b, big, big, 3)}
  n = {"prior": 3, "decoder": 4, "super_res": 3}
  for stage, shape in latent.items():
    expect[f"latents/{stage}"] = shape
    expect[f"step_noise/{stage}"] = (n[stage] - 1, *shape)
    expect[f"trajectory/{stage}"] = (n[stage] + 1, *shape)
    expect[f"timesteps/{stage}"] = (n[stage],)
  expect["model_output/prior"] = (3, b, CLIP_DIM)
  expect["model_output/decoder"] = (4, b, s, s, 6)
  expect["model_output/super_res"] = (3, b, big, big, 3)
  for key in ("cond", "null"):
    expect[f"text/{key}/input_ids"] = (b, LENGTH)
    expect[f"text/{key}/attention_mask"] = (b, LENGTH)
    expect[f"text/{key}/text_embeds"] = (b, CLIP_DIM)
    expect[f"text/{key}/last_hidden_state"] = (b, LENGTH, CLIP_DIM)
    expect[f"decoder_context/{key}/encoder_hidden_states"] = (b, 4 + LENGTH, CROSS)
    expect[f"decoder_context/{key}/class_labels"] = (b, 128)
    expect[f"decoder_context/{key}/attention_mask"] = (b, 4 + LENGTH)
  for name, shape in expect.items():
    value = out
    for part in name.split("/"):
      value = value[part]
    assert value.shape == shape, name
    assert np.isfinite(value).all(), name
  np.testing.assert_array_equal(out["timesteps"]["decoder"], [999, 666, 333, 0])
  np.testing.assert_array_equal(out["timesteps"]["prior"], [999, 500, 0])
  # Noise drawn once per step except the last, stage after stage, in the torch (NCHW) layout.
  assert (
    out["noise_calls"]
    == [("prior", (b, CLIP_DIM))] * 2
    + [("decoder", (b, 3, s, s))] * 3
    + [("super_res", (b, 3, big, big))] * 2
  )
  # The text: padded captions of different lengths, "" as the null (2 valid tokens).
  np.testing.assert_array_equal(out["text"]["cond"]["attention_mask"].sum(1), [5, 9])
  np.testing.assert_array_equal(out["text"]["null"]["attention_mask"].sum(1), [2, 2])
  np.testing.assert_array_equal(
    out["text"]["null"]["text_embeds"][0], out["text"]["null"]["text_embeds"][1]
  )
  mask = out["decoder_context"]["cond"]["attention_mask"]
  assert mask[:, :4].all() and (mask[:, 4:] == out["text"]["cond"]["attention_mask"]).all()
  # The trajectories start at the injected latents.
  for stage in latent:
    np.testing.assert_array_equal(out["trajectory"][stage][0], out["latents"][stage])


def test_deterministic(karlo):
  first, second = karlo
  np.testing.assert_array_equal(first["images"], second["images"])
  np.testing.assert_array_equal(first["image_embeddings"], second["image_embeddings"])


def test_stages_agree(karlo):
  out, _ = karlo
  # The final image is SR's result mapped to [0, 1] (bit for bit: the same float32 ops).
  np.testing.assert_array_equal(out["images"], np.clip(out["super_res"] * 0.5 + 0.5, 0, 1))
  # The decoder's image is its last step clamped to [-1, 1]. (With clip_sample the last step, to
  # t = -1, returns the clipped x0, so here the clamp changes nothing: |x| <= 1 already.)
  assert np.abs(out["decoder_image"]).max() <= 1.0
  np.testing.assert_allclose(out["decoder_image"], out["trajectory"]["decoder"][-1], atol=1e-6)
  # The SR condition is the decoder image upsampled with bicubic antialias (T17).
  small = torch.from_numpy(out["decoder_image"]).permute(0, 3, 1, 2)
  up = torch.nn.functional.interpolate(
    small, size=[2 * SIZE] * 2, mode="bicubic", align_corners=False, antialias=True
  )
  np.testing.assert_array_equal(out["upscaled"], up.permute(0, 2, 3, 1).numpy())
  # Post-processing: the image embeddings are the prior's latents times clip_std plus clip_mean.
  assert not np.allclose(out["image_embeddings"], out["prior_latents"])


def _bicubic(x: np.ndarray, size: int, antialias: bool) -> np.ndarray:
  t = torch.from_numpy(x).permute(0, 3, 1, 2)
  y = torch.nn.functional.interpolate(
    t, size=[size, size], mode="bicubic", align_corners=False, antialias=antialias
  )
  return y.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("size", [32, 64])
def test_bicubic_upsampling_matches_torch_antialias(size):
  """Upscaling, torch's antialiased bicubic (Keys a = -0.5, edge weights renormalised) equals
  jax.image.resize's "bicubic" (max difference 7e-7); torch without antialias uses a = -0.75 (and
  clamped edge indices), which differs by about 0.3 on N(0, 1) images, in the interior as much
  as at the edges."""
  x = np.random.default_rng(size).normal(size=(2, SIZE, SIZE, 3)).astype(np.float32)
  ours = np.asarray(jax.image.resize(jnp.asarray(x), (2, size, size, 3), "bicubic"))
  aa = _bicubic(x, size, antialias=True)
  plain = _bicubic(x, size, antialias=False)
  err = np.abs(ours - aa)
  print(
    f"{SIZE}->{size}: max |jax - torch aa| {err.max():.3g}, |jax - torch plain| "
    f"{np.abs(ours - plain).max():.3g}"
  )
  np.testing.assert_allclose(ours, aa, rtol=0, atol=1e-5)
  assert np.abs(ours - plain).max() > 1e-2  # the two torch modes really differ
