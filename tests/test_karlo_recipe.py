"""The paper's recipe on Karlo (docs/karlo_design.md, step 9), at toy size: a tiny random Karlo folder
converted with a vision tower (`mav_jax.convert karlo --vision`), then D^t, ↑F and SR_l^t
trained a few steps by the trainer from the karlo configs (configs/*.py:karlo, cut to the tiny
model's sizes): each starts from the converted image model (↑F from the D^t just trained) with
`train.trainable=temporal`, so the imported weights stay bit-identical and only what video adds
(temporal layers, fps / frame-skip embeddings, ↑F's extra-input conv) moves; the prior trains from
its converted folder too (all its weights: it is an image-text model). Karlo's discrete schedule,
learned-variance hybrid loss, unCLIP condition dropout and raw embeddings are what these run.
"""

import os

import jax
import numpy as np
import pytest
from flax import traverse_util

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import karlo_fixtures  # noqa: E402

from configs import decoder, interp, prior, sr_low  # noqa: E402
from mav_jax import checkpointing, sample_lib, train_lib, train_state  # noqa: E402
from mav_jax.convert import karlo  # noqa: E402


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  root = tmp_path_factory.mktemp("karlo_recipe")
  karlo_fixtures.write_karlo_folder(root / "src", vision=root / "clip_vit")
  karlo.convert_karlo(
    str(root / "src"), str(root / "out"), vision=str(root / "clip_vit"), log=lambda m: None
  )
  return root


def _tiny(module, root, stage_folder: str, init_from: str, **data):
  """configs/<stage>.py:karlo with the converted tiny model's sizes, a few steps of 2 clips."""
  config = module.get_config("karlo")
  image = checkpointing.load_config(str(root / "out" / stage_folder))
  arch = ("channels", "channel_mults", "num_res_blocks", "attention_levels", "head_dim")
  for key in arch + ("unclip_context_dim",):
    config.model[key] = image.model[key]
  config.model.dtype = "float32"
  config.model.remat = False
  for key, value in image.conditioning.items():
    config.conditioning[key] = value
  config.data.tokenizer_path = image.data.tokenizer_path
  config.data.max_tokens = image.data.max_tokens
  config.data.resolution = image.data.resolution
  config.data.num_threads = 1
  for key, value in data.items():
    config.data[key] = value
  config.batch_size = 2
  config.train.num_steps = 2
  config.train.checkpoint_every = 2
  config.train.log_every = 1
  config.train.sample_every = 0
  config.train.async_checkpoints = False
  config.train.init_from = init_from
  config.optimizer.warmup_steps = 1
  return config


def _flat(tree):
  return traverse_util.flatten_dict(tree)


def _train_temporal(config, workdir, init_from):
  result = train_lib.train_and_evaluate(config, str(workdir), devices=jax.devices()[:1])
  assert result["step"] == 2 and all(np.isfinite(v) for v in result["losses"].values())
  start, end = (
    _flat(checkpointing.restore_params(init_from)),
    _flat(checkpointing.restore_params(str(workdir), "params")),
  )
  frozen = [p for p in end if not train_state.is_video_only(p)]
  assert set(frozen) == set(start) - {p for p in start if train_state.is_video_only(p)}
  for p in frozen:  # the imported (or D^t's) image weights: bit-identical
    np.testing.assert_array_equal(end[p], start[p], err_msg="/".join(p))
  moved = [p for p in end if train_state.is_video_only(p) and p in start]
  new = [p for p in end if p not in start]
  return new, moved, end


@pytest.mark.long
def test_karlo_video_stages_train_only_what_video_adds(converted, tmp_path):
  out = converted / "out"
  config = _tiny(decoder, converted, "decoder_image", str(out / "decoder_image"), num_frames=4)
  new, _, end = _train_temporal(config, tmp_path / "decoder", str(out / "decoder_image"))
  assert any(p[0] == "fps_embed" for p in new) and any("temporal" in "/".join(p) for p in new)
  assert any(p[0] == "unclip_proj" for p in end)  # read, frozen

  config = _tiny(
    interp,
    converted,
    "decoder_image",
    str(tmp_path / "decoder"),
    num_frames=4,
    mask_max_skip=3,
    mask_max_context=2,
  )
  new, moved, _ = _train_temporal(config, tmp_path / "interp", str(tmp_path / "decoder"))
  assert {p[0] for p in new} == {"conv_in_extra", "frame_skip_embed"}
  assert moved  # D^t's temporal layers keep training

  config = _tiny(sr_low, converted, "sr_low_image", str(out / "sr_low_image"), num_frames=4)
  new, _, _ = _train_temporal(config, tmp_path / "sr_low", str(out / "sr_low_image"))
  assert new and all("temporal" in "/".join(p) for p in new)  # Karlo's SR: no scalar conditions

  # The cascade samples videos with them: the converted Karlo prior, the trained D^t, ↑F, SR_l^t.
  cascade = sample_lib.Cascade(
    {
      "prior": str(out / "prior"),
      "decoder": str(tmp_path / "decoder"),
      "interp": str(tmp_path / "interp"),
      "sr_low": str(tmp_path / "sr_low"),
    },
    devices=jax.devices()[:1],
    steps={"prior": 2, "decoder": 2, "interp": 2, "sr_low": 2},
    progress=sample_lib.Progress(open(os.devnull, "w")),
  )
  clip, fps = cascade.text_to_video(
    ["a red circle", "the blue one"], jax.random.key(0), frame_skip=2, until="sr_low"
  )
  assert clip.shape == (2, 7, 32, 32, 3) and np.isfinite(np.asarray(clip)).all()


def test_karlo_prior_trains_from_its_converted_folder(converted, tmp_path):
  config = prior.get_config("karlo")
  image = checkpointing.load_config(str(converted / "out" / "prior"))
  for section in ("model", "conditioning"):
    for key, value in image[section].items():
      config[section][key] = value
  config.model.dtype = "float32"
  config.data.tokenizer_path = image.data.tokenizer_path
  config.data.max_tokens = image.data.max_tokens
  config.data.resolution = 16
  config.data.num_threads = 1
  config.batch_size = 2
  config.train.num_steps = 2
  config.train.checkpoint_every = 2
  config.train.log_every = 1
  config.train.async_checkpoints = False
  config.train.init_from = str(converted / "out" / "prior")
  result = train_lib.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])
  assert result["step"] == 2 and all(np.isfinite(v) for v in result["losses"].values())
