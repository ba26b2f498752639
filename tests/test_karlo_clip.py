"""Karlo's text encoder (a CLIPTextModelWithProjection) and tokenizer through the CLIP converter:
parity with transformers, the optional vision tower from a CLIPModel folder, and the errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mav_jax import errors
from mav_jax.data import tokenizers
from mav_jax.models import clip, clip_convert
from mav_jax.stages import clip as clip_stage
from mav_jax.stages import common

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("diffusers")

from karlo_fixtures import (  # noqa: E402
  LENGTH,
  VOCAB,
  hf_vocab,
  tiny_clip_model,
  tiny_text_encoder,
  write_tokenizer,
)

TOLERANCE = 1e-4  # float32 on both sides
TEXTS = [
  "",
  "a red circle",
  "The blue one, moving LEFT!!",
  "a very long caption that does not fit into twelve tokens at all",
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("karlo") / "tokenizer"
  write_tokenizer(path)
  return path


def _text_encoder(path, act: str, eos: int = 2):
  """A tiny CLIPTextModelWithProjection saved at `path`."""
  model = tiny_text_encoder(act, eos)
  model.save_pretrained(path, safe_serialization=True)
  return model


def _mesh():
  return jax.make_mesh(
    (1, 1, 1, 1), ("data", "fsdp", "fsdp_transpose", "tensor"), devices=jax.devices()[:1]
  )


def test_clip_bpe_from_karlo_tokenizer_files_matches_clip_tokenizer(tokenizer_dir):
  ours = tokenizers.ClipBpeTokenizer(str(tokenizer_dir / "merges.txt"))
  tokenizers.check_clip_vocab(ours, str(tokenizer_dir / "vocab.json"))
  assert ours.vocab_size == VOCAB and ours.pad_id == 0 and ours.eos_id == VOCAB - 1
  theirs = transformers.CLIPTokenizer.from_pretrained(tokenizer_dir)
  assert theirs.pad_token_id == 0 and theirs.model_max_length == LENGTH
  ref = theirs(TEXTS, padding="max_length", max_length=LENGTH, truncation=True)
  ids, mask = tokenizers.tokenize_batch(ours, TEXTS, LENGTH)
  np.testing.assert_array_equal(ids, np.asarray(ref["input_ids"]))
  np.testing.assert_array_equal(mask, np.asarray(ref["attention_mask"], bool))
  assert len(ours.encode("a red circle")) == 2 + 3  # whole-word merges are used


def test_vocab_check_names_the_first_difference(tokenizer_dir, tmp_path):
  ours = tokenizers.ClipBpeTokenizer(str(tokenizer_dir / "merges.txt"))
  vocab = hf_vocab()
  vocab["red</w>"], vocab["circle</w>"] = vocab["circle</w>"], vocab["red</w>"]
  (tmp_path / "vocab.json").write_text(json.dumps(vocab))
  with pytest.raises(errors.UserError, match=rf"id {hf_vocab()['red</w>']} is 'circle</w>'"):
    tokenizers.check_clip_vocab(ours, str(tmp_path / "vocab.json"))
  (tmp_path / "vocab.json").write_text(json.dumps({**hf_vocab(), "extra": VOCAB}))
  with pytest.raises(errors.UserError, match=rf"id {VOCAB} is 'extra' there and None"):
    tokenizers.check_clip_vocab(ours, str(tmp_path / "vocab.json"))


@pytest.mark.parametrize("act,eos", [("quick_gelu", 2), ("gelu", VOCAB - 1)])
def test_text_encoder_folder_matches_transformers(tokenizer_dir, tmp_path, act, eos):
  """Converted, written as a model folder and read back as `conditioning.clip` reads it: the raw
  text_embeds and last_hidden_state equal transformers' on a batch tokenized by the folder's own
  tokenizer."""
  hf = _text_encoder(tmp_path / "text_encoder", act, eos)
  config, params = clip_convert.load_hf_text_encoder(str(tmp_path / "text_encoder"))
  assert config.vision is None and set(params) == {"text"}
  assert config.activation == {"gelu": "gelu_exact"}.get(act, act)
  assert config.eos_token_id == (None if eos == 2 else eos)
  clip_stage.write_clip_folder(
    str(tmp_path / "clip"),
    config,
    params,
    str(tokenizer_dir / "merges.txt"),
    str(tokenizer_dir / "vocab.json"),
  )
  frozen = common.load_clip(str(tmp_path / "clip"), "conditioning.clip = ")
  assert not frozen.has_vision and frozen.embed_dim == 16
  assert frozen.config.data.max_tokens == LENGTH and frozen.config.data.tokenizer == "clip_bpe"
  loaded = frozen.load(_mesh(), "data_parallel")
  ids, _ = tokenizers.tokenize_batch(frozen.tokenizer, TEXTS, LENGTH)
  assert ids.max() == VOCAB - 1  # the end of text: pooling reads it
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(ids, dtype=torch.long))
  embeds, features = frozen.module.apply({"params": loaded}, jnp.asarray(ids), method=_text)
  np.testing.assert_allclose(embeds, ref.text_embeds.numpy(), atol=TOLERANCE, rtol=TOLERANCE)
  np.testing.assert_allclose(
    features, ref.last_hidden_state.numpy(), atol=TOLERANCE, rtol=TOLERANCE
  )
  scaled, _ = frozen.text(loaded, jnp.asarray(ids))
  np.testing.assert_allclose(scaled, common.scaled_unit(embeds), atol=1e-6)
  # The image path of a text-only CLIP: a UserError that says how to get a vision tower.
  images = jnp.zeros((1, 8, 8, 3))
  with pytest.raises(errors.UserError, match=f"{tmp_path / 'clip'}.*no vision tower.*vision_from="):
    frozen.image_embedding(loaded, images)
  with pytest.raises(errors.UserError, match="no vision tower"):
    clip_stage.embed_images(frozen.module, loaded, jnp.zeros((1, 224, 224, 3), jnp.uint8))
  with pytest.raises(errors.UserError, match="no vision tower"):
    clip.CLIP(config).apply({"params": params}, images, method=clip.CLIP.encode_image)


def _text(module, tokens):
  return module.text(tokens)


def test_vision_tower_from_a_clip_model_folder(tokenizer_dir, tmp_path):
  """The exact GELU of both towers (hidden_act "gelu"), the image embeddings of the combined CLIP
  through the written folder, and a CLIPModel whose text tower differs by one tensor."""
  act, eos = "gelu", 2
  text_encoder = _text_encoder(tmp_path / "text_encoder", act, eos)
  full = tiny_clip_model(tmp_path / "clip_model", text_encoder, act, eos)
  config, params = clip_convert.load_hf_text_encoder(
    str(tmp_path / "text_encoder"), vision_from=str(tmp_path / "clip_model")
  )
  assert config.vision == clip.TowerConfig(16, 2, 2) and config.activation == "gelu_exact"
  assert set(params) == {"text", "vision", "logit_scale"}
  clip_stage.write_clip_folder(
    str(tmp_path / "clip"), config, params, str(tokenizer_dir / "merges.txt")
  )
  frozen = common.load_clip(str(tmp_path / "clip"), "conditioning.clip = ")
  assert frozen.has_vision and frozen.config.data.resolution == 16
  loaded = frozen.load(_mesh(), "data_parallel")

  ids, _ = tokenizers.tokenize_batch(frozen.tokenizer, TEXTS, LENGTH)
  images = np.random.default_rng(0).normal(size=(3, 3, 16, 16)).astype(np.float32)
  with torch.no_grad():
    ref_image = full.get_image_features(pixel_values=torch.tensor(images)).pooler_output.numpy()
    ref_text = text_encoder(input_ids=torch.tensor(ids, dtype=torch.long)).text_embeds.numpy()
  ours_text, ours_image, scale = frozen.module.apply(
    {"params": loaded}, jnp.asarray(ids), jnp.asarray(images.transpose(0, 2, 3, 1))
  )
  np.testing.assert_allclose(ours_image, ref_image, atol=TOLERANCE, rtol=TOLERANCE)
  np.testing.assert_allclose(ours_text, ref_text, atol=TOLERANCE, rtol=TOLERANCE)
  np.testing.assert_allclose(scale, full.logit_scale.item(), rtol=1e-6)
  embedding = frozen.image_embedding(loaded, jnp.zeros((2, 16, 16, 3)))
  assert embedding.shape == (2, 16)

  # The full CLIPModel path maps Hugging Face's "gelu" to the exact GELU too.
  full_config, _ = clip_convert.load_hf_checkpoint(str(tmp_path / "clip_model"))
  assert full_config == config

  # A CLIPModel whose text tower differs in one tensor: named.
  with torch.no_grad():
    full.text_model.encoder.layers[1].mlp.fc2.bias[3] += 1e-3
  full.save_pretrained(tmp_path / "other", safe_serialization=True)
  with pytest.raises(errors.UserError, match=r"'text_model.encoder.layers.1.mlp.fc2.bias'"):
    clip_convert.load_hf_text_encoder(
      str(tmp_path / "text_encoder"), vision_from=str(tmp_path / "other")
    )


def test_text_encoder_left_over_and_missing_tensors_are_named(tmp_path):
  from safetensors.numpy import load_file, save_file

  _text_encoder(tmp_path / "te", "quick_gelu")
  hf_config = json.loads((tmp_path / "te" / "config.json").read_text())
  config = clip_convert.text_config_from_hf(hf_config)
  state = load_file(tmp_path / "te" / "model.safetensors")
  # A position_ids buffer (2022 saves) is tolerated.
  with_ids = {**state, "text_model.embeddings.position_ids": np.arange(LENGTH)[None]}
  assert set(clip_convert.convert_state_dict(with_ids, config)) == {"text"}

  extra = {**state, "text_model.encoder.layers.2.mlp.fc1.bias": np.zeros(64, np.float32)}
  with pytest.raises(errors.UserError, match=r"not used.*'text_model.encoder.layers.2.mlp.fc1"):
    clip_convert.convert_state_dict(extra, config)
  missing = {k: v for k, v in state.items() if k != "text_model.final_layer_norm.bias"}
  with pytest.raises(errors.UserError, match=r"no tensor 'text_model.final_layer_norm.bias'"):
    clip_convert.convert_state_dict(missing, config)
  # Through the folder: a tensor of a third layer that config.json does not have.
  save_file(extra, str(tmp_path / "te" / "model.safetensors"))
  with pytest.raises(errors.UserError, match=r"text_model.encoder.layers.2.mlp.fc1.bias"):
    clip_convert.load_hf_text_encoder(str(tmp_path / "te"))
  # A CLIPModel folder given as the text encoder, and the reverse, are named as such.
  hf_config["text_config"] = {}
  (tmp_path / "te" / "config.json").write_text(json.dumps(hf_config))
  with pytest.raises(errors.UserError, match="load_hf_checkpoint"):
    clip_convert.load_hf_text_encoder(str(tmp_path / "te"))
  del hf_config["text_config"]
  (tmp_path / "te" / "config.json").write_text(json.dumps(hf_config))
  with pytest.raises(errors.UserError, match="load_hf_text_encoder"):
    clip_convert.load_hf_checkpoint(str(tmp_path / "te"))


def test_write_clip_folder_checks_the_tokenizer(tokenizer_dir, tmp_path):
  config = clip.ClipConfig(
    embed_dim=8,
    vocab_size=VOCAB + 1,
    context_length=LENGTH,
    text=clip.TowerConfig(8, 1, 2),
    vision=None,
  )
  with pytest.raises(errors.UserError, match=f"vocabulary of {VOCAB} tokens.*embeds {VOCAB + 1}"):
    clip_stage.write_clip_folder(
      str(tmp_path / "out"), config, {}, str(tokenizer_dir / "merges.txt")
    )
  assert not (tmp_path / "out").exists()
