"""The cascade: every stage trains with mav_jax.train, and the shipped tiny checkpoints sample every
application mode through `sample_lib.Cascade`."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from configs import decoder, interp, prior, sr_high, sr_low
from mav_jax import checkpointing, errors, paths, sample_lib, train_lib
from mav_jax.data import synthetic
from mav_jax.eval import motion_benchmark
from mav_jax.stages import common, video
from mav_jax.utils import video_io

SHIPPED = sample_lib.default_checkpoints()


def _short(config, steps):
  config.train.num_steps = steps
  config.train.checkpoint_every = steps
  config.train.log_every = steps
  config.train.sample_every = steps
  config.train.async_checkpoints = False
  config.batch_size = 4
  config.train.num_samples = 1
  config.sampling.num_steps = 2
  return config


@pytest.mark.parametrize(
  "module,overrides",
  [
    (prior, {}),
    (interp, {"init_from": SHIPPED["decoder"]}),
    (sr_low, {}),
    (sr_high, {}),
  ],
  ids=["prior", "interp", "sr_low", "sr_high"],
)
def test_each_stage_trains_with_the_trainer(tmp_path, module, overrides):
  config = _short(module.get_config("tiny"), 2)
  for key, value in overrides.items():
    config.train[key] = value
  if module in (interp, sr_low):  # samples while training: SR_h's case (the cheapest compile)
    config.train.sample_every = 0
  if module is sr_low:  # the trainer's machinery, not SR_l^t's attention (a ~2x dearer compile)
    config.model.mid_attention = False
  result = train_lib.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])
  assert result["step"] == 2 and all(np.isfinite(v) for v in result["losses"].values())
  exported = checkpointing.export_model(str(tmp_path), str(tmp_path / "model"))[0]
  assert exported.stage == config.stage
  with pytest.raises(FileExistsError, match="--overwrite"):
    checkpointing.export_model(str(tmp_path), str(tmp_path / "model"))
  assert checkpointing.load_config(str(tmp_path / "model")).to_dict() == exported.to_dict()
  if config.train.sample_every and config.stage != "prior":
    assert list((tmp_path / "samples").glob("*.gif"))
  if module is interp:  # started from D^t: its spatial weights, not a fresh init
    shipped = checkpointing.restore_params(SHIPPED["decoder"])
    first = checkpointing.restore_params(str(tmp_path), "params")
    k = ("conv_in", "spatial", "kernel")
    a, b = shipped, first
    for key in k:
      a, b = a[key], b[key]
    assert np.abs(a - b).max() < 0.1  # two small Adam steps away from D^t's weights


@pytest.mark.long
def test_text_aware_decoder_trains_from_the_paper_decoder_and_reads_the_prompt(tmp_path):
  """configs/decoder.py:tiny_text (model.text_motion: caption attention, learned token embeddings,
  motion convs; a time per frame): every parameter of the shipped D^t it starts from has its place
  in the text-aware model (the new layers come on top); the variant, cut to one small level,
  trains, exports, and the cascade reads the export as a stage that takes the prompt. (The trainer's
  `init_from`: tests/test_train.py and the ↑F case above; the cascade sampling a text-aware D^t with
  prompts, and their effect on the motion: the shipped-model test below.)"""
  config = decoder.get_config("tiny_text")
  assert paths.resolve(config.train.init_from) == paths.resolve(SHIPPED["decoder"])
  model = video.DECODER.make_model(config)
  abstract = jax.eval_shape(lambda rng: video.DECODER.init(model, config, rng), jax.random.key(0))
  text_aware = traverse_util.flatten_dict(nn.unbox(abstract))
  shipped = traverse_util.flatten_dict(checkpointing.restore_params(SHIPPED["decoder"]))
  assert {p: text_aware[p].shape for p in shipped} == {p: v.shape for p, v in shipped.items()}
  assert len(text_aware) > len(shipped)

  config = _short(config, 2)  # a full-size train step is a ~90 s compile here
  config.data.num_frames, config.data.resolution = 2, 8
  config.model.channel_mults, config.model.attention_levels = (1,), (0,)
  config.model.text_motion.conv_size = 1  # the wiring (k = 3 is checked in test_unet.py)
  config.train.init_from = ""
  config.train.sample_every = 0
  result = train_lib.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])
  assert result["step"] == 2 and all(np.isfinite(v) for v in result["losses"].values())
  checkpointing.export_model(str(tmp_path), str(tmp_path / "model"))
  cascade = sample_lib.Cascade({"prior": SHIPPED["prior"], "decoder": str(tmp_path / "model")})
  assert cascade.stages["decoder"].model.uses_text
  tokens, mask = cascade.caption_tokens("decoder", ["a red circle moving left"], 1)
  assert mask.any() and tokens.shape == mask.shape
  for field, value in [("vocab_size", 259), ("conv_size", 3)]:
    bad = decoder.get_config("tiny")
    bad.model.text_motion[field] = value
    with pytest.raises(ValueError, match=f"model.text_motion.{field} is part of the text pathway"):
      video.DECODER.make_model(bad)
  small = decoder.get_config("tiny_text")
  small.model.text_motion.vocab_size = 100
  with pytest.raises(ValueError, match="text_motion.vocab_size = 100 is smaller"):
    _ = video.DECODER.make_model(small).clip
  with pytest.raises(ValueError, match="text_motion applies to the decoder and interp"):
    bad = sr_low.get_config("tiny")
    bad.model.text_motion.enabled = True
    video.SR_LOW.make_model(bad)


@pytest.mark.parametrize("module", [prior, decoder], ids=["prior", "decoder"])
def test_prior_and_decoder_losses_fall(tmp_path, module):
  config = _short(module.get_config("tiny"), 80)
  config.train.sample_every = 0
  config.batch_size = 8
  if module is decoder:  # one 8x8 level of 2 frames: learning, not the tiny UNet's size, is tested
    config.data.num_frames, config.data.resolution = 2, 8
    config.model.channel_mults, config.model.attention_levels = (1,), ()
    config.model.mid_attention = False
  losses = train_lib.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])["losses"]
  values = [losses[s] for s in sorted(losses)]
  assert np.mean(values[-20:]) < 0.6 * np.mean(values[:10]), values


@pytest.fixture(scope="module")
def cascade():
  return sample_lib.Cascade(SHIPPED, steps={s: 2 for s in sample_lib.CASCADE})


def _check_video(clip, frames, size):
  clip = np.asarray(clip)
  assert clip.shape == (clip.shape[0], frames, size, size, 3)
  assert np.isfinite(clip).all() and np.abs(clip).max() <= 1.0 + 1e-5


def test_text_to_video_runs_the_whole_cascade(cascade):
  video, fps = cascade.text_to_video(
    ["a red circle moving left", "a blue square"], jax.random.key(0)
  )
  _check_video(video, 10, 64)
  assert video.shape[0] == 2 and fps == 12.0
  # Any part of it: stop after D^t.
  clip, fps = cascade.text_to_video(["a red circle"], jax.random.key(0), until="decoder")
  _check_video(clip, 4, 16)
  assert fps == 4.0


def _scene_frames(resolution=16, frames=4):
  scene = synthetic.sample_scene(np.random.default_rng(0), duration=2.0)
  rendered = synthetic.render(scene, np.linspace(0, 1, frames), resolution)
  return jnp.asarray(rendered.astype(np.float32) / 127.5 - 1.0)[None]


def test_image_to_video_holds_the_image_as_first_frame(cascade):
  image = _scene_frames()[:, 0]
  clip, _ = cascade.image_to_video(image, jax.random.key(1), until="interp")
  _check_video(clip, 10, 16)
  np.testing.assert_array_equal(np.asarray(clip[:, 0]), np.asarray(image))
  video, _ = cascade.image_to_video(image, jax.random.key(1))
  _check_video(video, 10, 64)


def test_interpolation_between_two_images_keeps_both_ends(cascade):
  frames = _scene_frames()
  clip, _ = cascade.interpolate(frames[:, 0], frames[:, -1], jax.random.key(2), until="interp")
  _check_video(clip, 10, 16)
  np.testing.assert_array_equal(np.asarray(clip[:, 0]), np.asarray(frames[:, 0]))
  np.testing.assert_array_equal(np.asarray(clip[:, -1]), np.asarray(frames[:, -1]))


def test_variation_and_extension(cascade):
  frames = _scene_frames()
  varied, _ = cascade.variation(frames, jax.random.key(3), strength=0.5, until="decoder")
  _check_video(varied, 4, 16)
  assert not np.allclose(np.asarray(varied), np.asarray(frames), atol=1e-3)
  longer, _ = cascade.extend(frames, jax.random.key(4), times=2, context=2, until="interp")
  # Each round keeps 2 given frames of the 10 ↑F makes and adds 8.
  _check_video(longer, 4 + 2 * 8, 16)
  np.testing.assert_array_equal(np.asarray(longer[:, :4]), np.asarray(frames))


def test_sr_high_gives_every_frame_the_same_noise(cascade):
  """A clip of one repeated frame stays one repeated frame through the per-frame SR_h."""
  frame = jax.image.resize(_scene_frames()[:, :1], (1, 1, 32, 32, 3), "linear")
  clip = jnp.repeat(frame, 3, axis=1)
  out = np.asarray(cascade.super_resolve("sr_high", clip, jax.random.key(5)))
  _check_video(out, 3, 64)
  np.testing.assert_allclose(out[:, 1:], np.broadcast_to(out[:, :1], out[:, 1:].shape), atol=1e-5)


def test_incompatible_checkpoints_are_named(tmp_path):
  with pytest.raises(sample_lib.CheckpointError, match="holds a 'prior' checkpoint"):
    sample_lib.Cascade({"decoder": SHIPPED["prior"]})
  with pytest.raises(sample_lib.CheckpointError, match="no sr_low checkpoint"):
    sample_lib.Cascade({"sr_low": str(tmp_path)})
  # A decoder config whose CLIP has another width: named, with the fix.
  config = decoder.get_config("tiny")
  config.conditioning.embedding_dim = 64
  with pytest.raises(ValueError, match="embedding_dim"):
    common.frozen_clip(config)


COLOURS = {"red": 0, "green": 1, "blue": 2}


def test_shipped_cascade_draws_the_prompted_colour():
  """Prior + D^t of the shipped tiny cascade: the object's dominant channel is the prompted one."""
  cascade = sample_lib.Cascade(
    {"prior": SHIPPED["prior"], "decoder": SHIPPED["decoder"]}, steps={"prior": 16, "decoder": 10}
  )
  prompts = [f"a {colour} square" for colour in COLOURS]
  clips, _ = cascade.text_to_video(prompts, jax.random.key(0), until="decoder")
  for colour, clip in zip(COLOURS, np.asarray(clips), strict=True):
    pixels = clip.reshape(-1, 3)
    bright = pixels[np.argsort(pixels.max(axis=1))[-16:]]  # the object: the brightest pixels
    assert np.argmax(bright.mean(axis=0)) == COLOURS[colour], (colour, bright.mean(axis=0))


@pytest.mark.long
def test_shipped_text_aware_decoder_moves_the_object_the_prompted_way():
  """checkpoints/tiny/decoder_text (model.text_motion with motion convs, trained beyond
  the paper, README): prior + that D^t move the object the way the caption says, read from the
  pixels as the motion benchmark reads them (the paper-faithful D^t is at chance, 25%)."""
  text_decoder = os.path.join(os.path.dirname(SHIPPED["decoder"]), "decoder_text")
  cascade = sample_lib.Cascade(
    {"prior": SHIPPED["prior"], "decoder": text_decoder}, steps={"prior": 16, "decoder": 10}
  )
  combos = [
    (s, c, d) for s, c in [("circle", "red"), ("square", "blue")] for d in synthetic.DIRECTIONS
  ]
  prompts = [synthetic.video_caption(*combo) for combo in combos]
  clips, _ = cascade.text_to_video(prompts, jax.random.key(0), until="decoder")
  scores = motion_benchmark.measure(video_io.to_uint8(np.asarray(clips)), combos)
  # 7 of 8 here; a model at chance (25%) gets 5 or more with probability 2.7%.
  assert scores["direction_accuracy"] >= 5 / 8 and scores["colour_accuracy"] == 1.0, scores


def test_per_stage_flag_values():
  parse = sample_lib._per_stage
  assert parse("20", "steps", int) == {s: 20 for s in sample_lib.CASCADE}
  mixed = parse("sr_high=8, 20,decoder=30,", "steps", int)
  assert mixed == {**{s: 20 for s in sample_lib.CASCADE}, "sr_high": 8, "decoder": 30}
  assert parse(None, "steps", int) == {}
  with pytest.raises(ValueError, match="unknown stage 'sr'"):
    parse("sr=3", "steps", int)
  with pytest.raises(ValueError, match="--steps: cannot read 'x'"):
    parse("decoder=x", "steps", int)
  # Each flag's limit, named in the message (checked when the flag is read, before any model loads).
  with pytest.raises(errors.UserError, match=r"--guidance: -5.0 in '-5'; it must be >= 0 \(0: "):
    parse("-5", "guidance", float)
  with pytest.raises(errors.UserError, match="it must be one of ddpm, ddim, dpm\\+\\+2m"):
    parse("decoder=ddmi", "sampler", str)
  assert parse("0", "guidance", float)["decoder"] == 0.0
  # The overrides reach the stage's sampling section (a copy: the loaded config is unchanged).
  config = decoder.get_config("tiny")
  s = sample_lib._sampling(config, {"decoder": 7}, {}, {"decoder": 2.0}, "decoder")
  assert (s.num_steps, s.guidance_scale) == (7, 2.0) and config.sampling.num_steps == 10
  assert sample_lib._sampling(config, {"decoder": 7}, {}, {}, "interp").num_steps == 10


# -- at scale: compiled once, batches split over the devices -------------------------------------


class _Compiles:
  """Counts XLA compilations (jax.monitoring's backend-compile events) while active."""

  def __enter__(self):
    self.count = 0
    jax.monitoring.register_event_duration_secs_listener(self._listen)
    return self

  def _listen(self, event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      self.count += 1

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._listen)


def test_batches_and_extend_rounds_after_the_first_compile_nothing():
  """Each stage's sampling function is built once per (shape, settings): after a first run of a
  prompts file (two batches of 2, the last padded: everything compiles there), a run of three
  batches of new prompts and another seed (sample --prompts_file, evaluation) compiles nothing, nor
  does an `extend` of three rounds after one of one round. (Before, every call compiled every stage
  again.)"""
  cascade = sample_lib.Cascade(
    {n: SHIPPED[n] for n in ("prior", "decoder", "interp")},
    steps={s: 2 for s in sample_lib.CASCADE},
  )
  written = {}

  def write(index, video, fps):
    written[index] = video

  prompts = ["a red circle moving left", "a blue square moving up", "a green circle"]
  with _Compiles() as first:
    sample_lib.text_batches(cascade, prompts, 2, jax.random.key(0), write, until="interp")
  assert sorted(written) == [0, 1, 2]
  more = ["a red square moving down", "a blue circle", "a square", "a circle", "a green square"]
  written.clear()
  with _Compiles() as three:
    sample_lib.text_batches(
      cascade, more + ["a triangle"], 2, jax.random.key(1), write, until="interp"
    )
  assert first.count > 0 and three.count == 0, (first.count, three.count)
  assert sorted(written) == list(range(6))
  frames = jnp.asarray(_scene_frames())
  with _Compiles() as one_round:
    cascade.extend(frames, jax.random.key(2), times=1, context=2, until="interp")
  with _Compiles() as three_rounds:
    longer, _ = cascade.extend(frames, jax.random.key(3), times=3, context=2, until="interp")
  assert one_round.count > 0 and three_rounds.count == 0, (one_round.count, three_rounds.count)
  assert longer.shape[1] == 4 + 3 * 8


def test_sampling_splits_the_batch_over_8_devices_and_matches_one_device():
  """The same seeds give the same videos on 1 device and on 8 (data parallel and FSDP); on 8 the
  batch is split (one video per device) and under FSDP the parameters are too."""
  checkpoints = {n: SHIPPED[n] for n in ("prior", "decoder")}
  prompts = [f"a {c} {s}" for c in COLOURS for s in ("circle", "square")] + ["a red circle"] * 2

  def run(devices, strategy):
    cascade = sample_lib.Cascade(
      checkpoints, devices=devices, strategy=strategy, steps={"prior": 3, "decoder": 3}
    )
    clip, _ = cascade.text_to_video(prompts, jax.random.key(7), until="decoder")
    return cascade, clip

  _, single = run(jax.devices()[:1], "data_parallel")
  for strategy in ("data_parallel", "fsdp"):
    cascade, clip = run(jax.devices(), strategy)
    assert cascade.batch_shards == 8
    assert {s.data.shape[0] for s in clip.addressable_shards} == {1}, strategy
    assert len({s.device for s in clip.addressable_shards}) == 8
    np.testing.assert_allclose(np.asarray(clip), np.asarray(single), atol=2e-4, err_msg=strategy)
    split = [
      p for p in jax.tree.leaves(cascade.stages["decoder"].params) if not p.is_fully_replicated
    ]
    assert bool(split) == (strategy == "fsdp"), strategy
  # Fewer videos than devices: padded to one per device, the padding dropped.
  clip, _ = cascade.text_to_video(prompts[:3], jax.random.key(7), until="decoder")
  np.testing.assert_allclose(np.asarray(clip), np.asarray(single)[:3], atol=2e-4)
