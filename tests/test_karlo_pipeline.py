"""Karlo's text-to-image pipeline through mav_jax against diffusers' UnCLIPPipeline (docs/karlo_design.md,
step 8): a tiny random Karlo folder converted by `mav_jax.convert karlo`, loaded by the sampler's
own `Cascade` (image checkpoints, the empty-caption null conditions, the last-step SR model), run
with diffusers' initial latents and per-step noises injected (tests/karlo_fixtures.py's
`run_unclip_pipeline`): prior 3 steps (guidance 4), decoder 4 steps (guidance 8, learned
variance), SR 3 steps (super_res_last at the last step).

Each stage is compared fed diffusers' own input (teacher forcing), then the whole chain end to end.
Float32 on both sides. And `mav_jax.sample --mode image_only` runs on the converted folder.
"""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import karlo_fixtures  # noqa: E402

from mav_jax import sample_lib, stages  # noqa: E402
from mav_jax.convert import karlo  # noqa: E402
from mav_jax.stages import video  # noqa: E402

PROMPTS = ["a red circle", "the blue one is circling"]
STEPS = {"prior": 3, "decoder": 4, "sr_low": 3}
GUIDANCE = {"prior": 4.0, "decoder": 8.0}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
  root = tmp_path_factory.mktemp("karlo_pipeline")
  parts = karlo_fixtures.write_karlo_folder(root / "src")
  karlo.convert_karlo(str(root / "src"), str(root / "out"), log=lambda m: None)
  ref = karlo_fixtures.run_unclip_pipeline(
    parts,
    root / "src" / "tokenizer",
    PROMPTS,
    prior_steps=STEPS["prior"],
    decoder_steps=STEPS["decoder"],
    sr_steps=STEPS["sr_low"],
    prior_guidance=GUIDANCE["prior"],
    decoder_guidance=GUIDANCE["decoder"],
  )
  out = root / "out"
  checkpoints = {
    "prior": str(out / "prior"),
    "decoder": str(out / "decoder_image"),
    "sr_low": str(out / "sr_low_image"),
  }
  cascade = sample_lib.Cascade(
    checkpoints,
    devices=jax.devices()[:1],
    steps=STEPS,
    guidance=GUIDANCE,
    images=True,
    progress=sample_lib.Progress(open("/dev/null", "w")),
  )
  for s in cascade.stages.values():  # the karlo configs compute in bfloat16; parity in float32
    with s.config.unlocked():
      s.config.model.dtype = "float32"
    s.model = s.stage.make_model(s.config)
    if s.name != "sr_low":
      stages.common.use_clip(s.model, cascade.clip)
  return root, ref, cascade


def _noises(ref, stage: str, steps: int, shape=None):
  """diffusers' latents and its n - 1 step noises (none at the last step: zeros stand in)."""
  latents, noise = ref["latents"][stage], ref["step_noise"][stage]
  noise = np.concatenate([noise, np.zeros_like(noise[:1])])
  assert noise.shape[0] == steps
  if shape is not None:  # images -> one-frame clips
    latents, noise = latents[:, None], noise[:, :, None]
  return jnp.asarray(latents), jnp.asarray(noise)


def _sampling(cascade, name):
  c = cascade.stages[name].config
  return sample_lib._sampling(c, cascade.steps, {}, cascade.guidance, name)


def _prior(cascade, ref):
  p = cascade.stages["prior"]
  tokens, mask = cascade.tokenize(PROMPTS)
  np.testing.assert_array_equal(np.asarray(tokens), ref["text"]["cond"]["input_ids"])
  noise, step_noise = _noises(ref, "prior", STEPS["prior"])
  return stages.prior.generate(
    p.model,
    p.config,
    p.params,
    cascade.clip_params,
    tokens,
    mask,
    jax.random.key(0),
    sampling=_sampling(cascade, "prior"),
    noise=noise,
    step_noise=step_noise,
  )


def _decoder(cascade, ref, embedding):
  d = cascade.stages["decoder"]
  tokens, mask = cascade.tokenize(PROMPTS)
  cond = {"embedding": embedding, "scalars": {}}
  cond = cascade._with_caption("decoder", cond, cascade.clip_params, (tokens, mask))
  noise, step_noise = _noises(ref, "decoder", STEPS["decoder"], shape="frames")
  out = video.DECODER.generate(
    d.model,
    d.config,
    d.params,
    cond,
    noise.shape,
    jax.random.key(0),
    sampling=_sampling(cascade, "decoder"),
    image_mode=True,
    noise=noise,
    step_noise=step_noise,
  )
  return out[:, 0]


def _super_res(cascade, ref, image):
  sr = cascade.stages["sr_low"]
  r = int(sr.config.data.resolution)
  up = video.resize_frames(image[:, None], r, sr.config.conditioning.upsample)
  noise, step_noise = _noises(ref, "super_res", STEPS["sr_low"], shape="frames")
  out = video.SR_LOW.generate(
    sr.model,
    sr.config,
    sr.params,
    {"scalars": {}, "extra": up},
    noise.shape,
    jax.random.key(0),
    sampling=_sampling(cascade, "sr_low"),
    image_mode=True,
    params_last=sr.params_last,
    noise=noise,
    step_noise=step_noise,
  )
  return up[:, 0], out[:, 0]


def _err(ours, theirs) -> float:
  return float(np.max(np.abs(np.asarray(ours) - np.asarray(theirs))))


def test_each_stage_matches_unclip_pipeline_given_its_input(pipeline):
  """Teacher forcing: every stage gets diffusers' own input (the caption; diffusers' prior
  embedding; diffusers' decoder image)."""
  _, ref, cascade = pipeline
  assert cascade.stages["sr_low"].params_last is not None  # super_res_last, for the last step
  embedding = _prior(cascade, ref)
  assert _err(embedding, ref["image_embeddings"]) < 1e-4, _err(embedding, ref["image_embeddings"])
  image = _decoder(cascade, ref, jnp.asarray(ref["image_embeddings"]))
  assert _err(image, ref["decoder_image"]) < 1e-4, _err(image, ref["decoder_image"])
  up, sr = _super_res(cascade, ref, jnp.asarray(ref["decoder_image"]))
  assert _err(up, ref["upscaled"]) < 1e-5, _err(up, ref["upscaled"])  # bicubic, as torch's
  assert _err(sr, ref["super_res"]) < 1e-4, _err(sr, ref["super_res"])


def test_text_to_image_end_to_end_matches_unclip_pipeline(pipeline):
  """The whole chain on its own outputs: the images in [0, 1] within 1e-4 of diffusers'."""
  _, ref, cascade = pipeline
  embedding = _prior(cascade, ref)
  image = _decoder(cascade, ref, embedding)
  _, sr = _super_res(cascade, ref, image)
  images = np.clip(np.asarray(sr) * 0.5 + 0.5, 0.0, 1.0)
  assert images.shape == ref["images"].shape
  err = np.abs(images - ref["images"])
  assert err.max() < 1e-4, (err.max(), np.quantile(err, 0.999))


def test_sample_image_only_mode_writes_karlo_images(pipeline, tmp_path):
  root, _, _ = pipeline
  out = root / "out"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "mav_jax.sample",
      "--mode=image_only",
      "--prompt=a red circle",
      f"--prior={out / 'prior'}",
      f"--decoder={out / 'decoder_image'}",
      f"--sr_low={out / 'sr_low_image'}",
      "--steps=prior=3,decoder=4,sr_low=3",
      f"--output={tmp_path / 'a.png'}",
    ],
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  from PIL import Image

  image = np.asarray(Image.open(tmp_path / "a.png"))
  assert image.shape == (2 * karlo_fixtures.SIZE, 2 * karlo_fixtures.SIZE, 3)
  assert image.std() > 0
  for stage in ("prior", "decoder", "sr_low"):
    assert f"[sample] {stage}" in proc.stderr
