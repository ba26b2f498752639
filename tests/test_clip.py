"""CLIP: numerical parity with transformers' PyTorch CLIPModel through the weight converter."""

import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from mav_jax.models import clip, clip_convert
from mav_jax.stages import common

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# float32 on both sides; the tolerance covers summation-order differences over a few layers.
TOLERANCE = 1e-4


def _tiny_hf_model():
  config = transformers.CLIPConfig(
    text_config=dict(
      vocab_size=99,
      hidden_size=32,
      intermediate_size=37,
      num_hidden_layers=2,
      num_attention_heads=4,
      max_position_embeddings=16,
    ),
    vision_config=dict(
      hidden_size=32,
      intermediate_size=37,
      num_hidden_layers=2,
      num_attention_heads=4,
      image_size=32,
      patch_size=8,
    ),
    projection_dim=24,
  )
  # Special tokens inside the tiny vocabulary, so the text is pooled at a real end-of-text token.
  config.text_config.bos_token_id, config.text_config.eos_token_id = 97, 98
  config.text_config.pad_token_id = 0
  torch.manual_seed(0)
  return transformers.CLIPModel(config).eval()


def test_converted_weights_match_the_pytorch_clip_model(tmp_path):
  hf = _tiny_hf_model()
  hf.save_pretrained(tmp_path, safe_serialization=True)
  config, params = clip_convert.load_hf_checkpoint(str(tmp_path))
  assert config.text.layers == 2 and config.patch_size == 8 and config.embed_dim == 24
  assert config.eos_token_id == 98  # pooled at the first end-of-text token, as transformers does

  rng = np.random.default_rng(0)
  tokens = rng.integers(1, 97, size=(3, 16))
  tokens[:, 0], tokens[0, 9], tokens[1, 15], tokens[2, 4] = 97, 98, 98, 98  # bos / eos positions
  tokens[0, 10:], tokens[2, 5:] = 0, 0
  images = rng.normal(size=(3, 3, 32, 32)).astype(np.float32)
  with torch.no_grad():
    ref_text = hf.get_text_features(input_ids=torch.tensor(tokens)).pooler_output.numpy()
    ref_image = hf.get_image_features(pixel_values=torch.tensor(images)).pooler_output.numpy()

  model = clip.CLIP(config)
  ours_text, ours_image, scale = model.apply(
    {"params": params}, jnp.asarray(tokens), jnp.asarray(images.transpose(0, 2, 3, 1))
  )
  np.testing.assert_allclose(ours_text, ref_text, atol=TOLERANCE, rtol=TOLERANCE)
  np.testing.assert_allclose(ours_image, ref_image, atol=TOLERANCE, rtol=TOLERANCE)
  np.testing.assert_allclose(scale, hf.logit_scale.item(), rtol=1e-6)
  # Same tree as the module's own initialisation: nothing missing, nothing extra.
  init = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.asarray(tokens), jnp.zeros((1, 32, 32, 3)))
  )["params"]
  from flax import linen as nn

  assert jax.tree.structure(nn.unbox(init)) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(nn.unbox(init)), jax.tree.leaves(params), strict=True):
    assert a.shape == b.shape


def test_converter_errors_name_the_problem(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    clip_convert.load_hf_checkpoint(str(tmp_path))
  hf = _tiny_hf_model()
  hf.save_pretrained(tmp_path, safe_serialization=True)
  config = json.loads((tmp_path / "config.json").read_text())
  config["text_config"]["num_hidden_layers"] = 1
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="not used by the conversion"):
    clip_convert.load_hf_checkpoint(str(tmp_path))


def test_clip_stage_learns_the_synthetic_image_text_pairs(tmp_path):
  """Contrastive training on the synthetic pairs: images retrieve their own caption among the 15
  distinct (colour, shape) captions far above chance (1/15)."""
  from configs import clip as clip_config
  from mav_jax import train_lib
  from mav_jax.data import pipeline, synthetic, tokenizers
  from mav_jax.stages import clip as clip_stage

  config = clip_config.get_config("tiny")
  config.train.num_steps = 120
  config.train.checkpoint_every = 1000
  config.mesh.ici = (1, -1, -1, 1)
  run = train_lib.train_and_evaluate(config, tmp_path, jax.devices()[:1])
  first, last = run["losses"][1], np.mean([run["losses"][s] for s in range(111, 121)])
  assert last < 0.7 * first, (first, last)

  model = clip_stage.make_model(config)
  params = run["state"].ema_params
  captions = sorted({f"a {c} {s}" for s, c, _ in synthetic.COMBINATIONS})
  ids, _ = tokenizers.tokenize_batch(tokenizers.ByteTokenizer(), captions, config.data.max_tokens)
  text = clip_stage.embed_text(model, params, jnp.asarray(ids))
  evals, _ = pipeline.pipeline_from_config(config.data, "eval", batch_size=60)
  batch = next(iter(evals))
  image = clip_stage.embed_images(model, params, jnp.asarray(batch["frames"]))
  truth = [captions.index(tokenizers.ByteTokenizer().decode(t)) for t in batch["tokens"]]
  scores = (image / jnp.linalg.norm(image, axis=-1, keepdims=True)) @ (
    text / jnp.linalg.norm(text, axis=-1, keepdims=True)
  ).T
  accuracy = float(np.mean(np.argmax(np.asarray(scores), axis=-1) == np.array(truth)))
  assert accuracy > 0.3, accuracy


def test_contrastive_loss_is_float32_with_bfloat16_features():
  """bfloat16 towers: the embeddings come out in float32, and the loss (normalised features and
  logits scaled by 100 in float32) matches a float64 reference on the same features to 1e-5
  (computed in bfloat16 it was 0.36% off here)."""
  from mav_jax.stages import clip as clip_stage

  config = clip.ClipConfig(
    embed_dim=32,
    vocab_size=20,
    context_length=8,
    text=clip.TowerConfig(16, 1, 2),
    image_size=8,
    patch_size=4,
    vision=clip.TowerConfig(16, 1, 2),
  )
  model = clip.CLIP(config, dtype=jnp.bfloat16)
  tokens, images = jnp.ones((2, 8), jnp.int32), jnp.zeros((2, 8, 8, 3))
  params = model.init(jax.random.key(0), tokens, images)["params"]
  text, image, _ = model.apply({"params": params}, tokens, images)
  assert text.dtype == image.dtype == jnp.float32

  rng = np.random.default_rng(0)
  text = rng.normal(size=(64, 512))
  image = text + 6 * rng.normal(size=text.shape)  # noisy pairs: loss 0.63, accuracy 0.8
  text, image = (jnp.asarray(x, jnp.bfloat16) for x in (text, image))
  loss, _ = clip_stage.contrastive_loss(text, image, jnp.log(100.0))

  def reference(t, i):
    t, i = (np.asarray(x, np.float64) for x in (t, i))
    t, i = (x / np.linalg.norm(x, axis=-1, keepdims=True) for x in (t, i))
    logits = 100.0 * i @ t.T

    def cross_entropy(z):
      z = z - z.max(axis=-1, keepdims=True)
      return np.mean(np.log(np.exp(z).sum(axis=-1)) - np.diag(z))

    return (cross_entropy(logits) + cross_entropy(logits.T)) / 2

  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(float(loss), reference(text, image), rtol=1e-5)


# Real photos from scikit-image's wheel (requirements-ref.txt, installed into .ref_pkgs by
# `make test`), read by path.
PHOTOS = pathlib.Path(__file__).resolve().parents[1] / ".ref_pkgs" / "skimage" / "data"
# PIL resamples in two 8-bit passes (width, then height), rounding each: up to half a grey level
# per pass, the first's carried through the second kernel (taps summing to ~1), so floats differ
# from it by about one grey level at most (0.98 measured on astronaut.png; bilinear: 28.6).
MAX_GREY_LEVELS = 1.25


def _openai_clip_preprocess(image: Image.Image, size: int = 224) -> np.ndarray:
  """OpenAI CLIP's preprocess (clip.py's _transform) on a PIL image: torchvision Resize(size,
  BICUBIC) = PIL's resize of the shorter side to size and the longer to int(size * long /
  short); CenterCrop(size) with rounded offsets; ToTensor; Normalize -> [size, size, 3]."""
  w, h = image.size
  new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
  image = image.resize((new_w, new_h), Image.BICUBIC)
  left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
  pixels = np.asarray(image.crop((left, top, left + size, top + size)), np.float64) / 255.0
  return (pixels - np.asarray(common.IMAGE_MEAN)) / np.asarray(common.IMAGE_STD)


@pytest.mark.parametrize("name", ["astronaut.png", "chelsea.png"])  # 512 x 512; 451 x 300
def test_clip_image_preprocessing_matches_openai_on_a_real_photo(name):
  path = PHOTOS / name
  if not path.exists():
    pytest.skip(f"{path} is not installed: `make test` installs requirements-ref.txt")
  image = Image.open(path).convert("RGB")
  expected = _openai_clip_preprocess(image)

  # Through the embedding path itself (FrozenClip.image_embedding, which the prior, D^t and
  # CLIPSIM use), with a stand-in encoder that keeps the images it is given.
  received = []

  class Keep:
    def encode_image(self, images):
      return images

    def apply(self, variables, images, method):
      received.append(np.asarray(images))
      return images.reshape(images.shape[0], -1)

  frozen = common.FrozenClip("", ml_collections.ConfigDict({"data": {"resolution": 224}}))
  frozen.__dict__["module"] = Keep()  # replaces the cached CLIP module
  frozen.image_embedding(None, jnp.asarray(np.asarray(image, np.float32)[None] / 127.5 - 1.0))
  ours = received[0][0]
  assert ours.shape == expected.shape == (224, 224, 3)
  # In grey levels (0-255) of each channel, undoing the normalisation.
  diff = np.abs(ours - expected) * np.asarray(common.IMAGE_STD) * 255.0
  print(f"{name}: max {diff.max():.3f}, mean {diff.mean():.3f} grey levels from OpenAI's")
  assert diff.max() < MAX_GREY_LEVELS and diff.mean() < 0.35
