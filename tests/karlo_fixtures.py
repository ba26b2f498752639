"""Tiny random Karlo (unCLIP) components in the diffusers layout, shared by the Karlo tests
(docs/karlo.md §4): every builder fixes its torch seed, so each call gives the same weights.

`write_karlo_folder(path)` saves them as `UnCLIPPipeline.save_pretrained` lays them out (prior/,
decoder/, text_proj/, super_res_first/, super_res_last/, text_encoder/, tokenizer/), with sizes
that fit together: CLIP width 16, 12 tokens, decoder context 24 (4 + 12 = 16 context tokens, never
equal to an attention block's h * w: docs/karlo.md T7).
"""

import json

import torch
import transformers
from diffusers import PriorTransformer, UNet2DConditionModel, UNet2DModel
from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

SIZE, CLIP_DIM, CROSS = 16, 16, 24  # decoder side, CLIP width, decoder context width
MERGES = ["r e", "re d</w>", "c i", "ci r", "cir c", "circ l", "circl e</w>", "t h", "th e</w>"]
MERGES += ["b l", "bl u", "blu e</w>", "o n", "on e</w>", "i n", "in g</w>"]
VOCAB = 2 * 256 + len(MERGES) + 2  # 530; end of text is the last id
LENGTH = 12  # tokens (Karlo: 77)


def randomise(module, seed: int, matrix: float = 0.15, vector: float = 0.3):
  """Every parameter drawn afresh (diffusers zero-initialises some, which would hide mistakes)."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.copy_(torch.randn_like(p) * (matrix if p.ndim > 1 else vector))
  return module.eval()


def tiny_decoder() -> tuple[UNet2DConditionModel, UnCLIPTextProjModel]:
  """Karlo's decoder pattern at toy size, and its text projection."""
  unet = UNet2DConditionModel(
    sample_size=SIZE,
    in_channels=3,
    out_channels=6,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
    up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn",
    cross_attention_dim=CROSS,
    attention_head_dim=8,
    resnet_time_scale_shift="scale_shift",
    class_embed_type="identity",
  )
  proj = UnCLIPTextProjModel(
    clip_extra_context_tokens=4,
    clip_embeddings_dim=CLIP_DIM,
    time_embed_dim=128,
    cross_attention_dim=CROSS,
  )
  return randomise(unet, 0), randomise(proj, 1)


def tiny_super_res(seed: int = 2) -> UNet2DModel:
  """Karlo's SR pattern (additive resnets, no attention, 6 input channels) at toy size."""
  unet = UNet2DModel(
    sample_size=2 * SIZE,
    in_channels=6,
    out_channels=3,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("ResnetDownsampleBlock2D",) * 2,
    up_block_types=("ResnetUpsampleBlock2D",) * 2,
    add_attention=False,
  )
  return randomise(unet, seed)


def tiny_prior(embedding_dim: int = CLIP_DIM) -> PriorTransformer:
  """Karlo's prior at toy size (2 layers of width 16), clip_std positive."""
  torch.manual_seed(embedding_dim)
  prior = PriorTransformer(
    num_attention_heads=2,
    attention_head_dim=8,
    num_layers=2,
    embedding_dim=embedding_dim,
    num_embeddings=LENGTH,
  ).eval()
  with torch.no_grad():
    for name, p in prior.named_parameters():
      if name == "clip_std":
        p.copy_(torch.rand_like(p) + 0.5)
      else:
        p.copy_(torch.randn_like(p) * 0.5)
  return prior


def hf_vocab() -> dict[str, int]:
  """vocab.json as Hugging Face's CLIPTokenizer defines it (byte symbols in GPT-2's table order,
  the same with </w>, the merges, the specials), built here independently of mav_jax."""
  bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  symbols = [chr(c) for c in cs]
  vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in MERGES]
  return {t: i for i, t in enumerate([*vocab, "<|startoftext|>", "<|endoftext|>"])}


def write_tokenizer(path) -> None:
  """A Karlo-style `tokenizer/` folder (vocab.json, merges.txt, tokenizer_config.json and
  special_tokens_map.json; pad "!" = id 0), as the diffusers layout ships it."""
  path.mkdir(parents=True)
  (path / "vocab.json").write_text(json.dumps(hf_vocab()))
  (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
  specials = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "pad_token": "!",
    "unk_token": "<|endoftext|>",
  }
  (path / "special_tokens_map.json").write_text(json.dumps(specials))
  config = {**specials, "do_lower_case": True, "model_max_length": LENGTH}
  (path / "tokenizer_config.json").write_text(
    json.dumps({**config, "tokenizer_class": "CLIPTokenizer"})
  )


def text_config(act: str = "quick_gelu", eos: int = 2) -> transformers.CLIPTextConfig:
  return transformers.CLIPTextConfig(
    vocab_size=VOCAB,
    hidden_size=CLIP_DIM,
    intermediate_size=4 * CLIP_DIM,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=LENGTH,
    projection_dim=CLIP_DIM,
    hidden_act=act,
    pad_token_id=0,
    bos_token_id=VOCAB - 2,
    eos_token_id=eos,
  )


def scramble(module, seed: int):
  """Weights far from the 0.02-std initialisation, so the MLP's pre-activations span the range
  where the exact and tanh GELUs differ (by up to 1e-3), well above the tolerance."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.add_(0.3 * torch.randn(p.shape, generator=gen))
  return module.eval()


def tiny_text_encoder(act: str = "quick_gelu", eos: int = 2):
  """A tiny CLIPTextModelWithProjection (eos 2: Hugging Face's legacy configs, pooled at the
  highest id as Karlo's; else pooled at the first `eos`)."""
  torch.manual_seed(0)
  return scramble(transformers.CLIPTextModelWithProjection(text_config(act, eos)), 1)


def write_karlo_folder(path) -> dict:
  """Saves every component under `path` as UnCLIPPipeline.save_pretrained does; returns them."""
  decoder, text_proj = tiny_decoder()
  parts = {
    "text_encoder": tiny_text_encoder(),
    "prior": tiny_prior(),
    "decoder": decoder,
    "text_proj": text_proj,
    "super_res_first": tiny_super_res(2),
    "super_res_last": tiny_super_res(3),
  }
  for name, module in parts.items():
    module.save_pretrained(path / name, safe_serialization=True)
  write_tokenizer(path / "tokenizer")
  return parts
