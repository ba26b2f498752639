"""Tiny random Karlo (unCLIP) components in the diffusers layout, shared by the Karlo tests
(docs/karlo_design.md §4): every builder fixes its torch seed, so each call gives the same weights.

`write_karlo_folder(path)` saves them as `UnCLIPPipeline.save_pretrained` lays them out (prior/,
decoder/, text_proj/, super_res_first/, super_res_last/, text_encoder/, tokenizer/), with sizes
that fit together: CLIP width 16, 12 tokens, decoder context 24 (4 + 12 = 16 context tokens, never
equal to an attention block's h * w: docs/karlo_design.md T7).
"""

import json

import numpy as np
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


def tiny_clip_model(path, text_encoder, act: str = "quick_gelu", eos: int = 2):
  """A tiny CLIPModel whose text tower is `text_encoder`'s (as openai/clip-vit-large-patch14's is
  Karlo's), saved at `path`: the vision tower `mav_jax.convert karlo --vision` adds."""
  vision = dict(
    hidden_size=CLIP_DIM,
    intermediate_size=4 * CLIP_DIM,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=16,
    patch_size=8,
    hidden_act=act,
  )
  config = transformers.CLIPConfig(
    text_config=text_config(act, eos).to_dict(), vision_config=vision, projection_dim=CLIP_DIM
  )
  torch.manual_seed(1)
  model = scramble(transformers.CLIPModel(config), 2)
  model.text_model.load_state_dict(text_encoder.text_model.state_dict())
  model.text_projection.load_state_dict(text_encoder.text_projection.state_dict())
  model.save_pretrained(path, safe_serialization=True)
  return model


def write_karlo_folder(path, vision=None) -> dict:
  """Saves every component under `path` as UnCLIPPipeline.save_pretrained does; returns them.
  `vision`: also save there a CLIPModel with the text encoder's text tower (for --vision)."""
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
  if vision is not None:
    tiny_clip_model(vision, parts["text_encoder"])
  return parts


def karlo_schedulers() -> dict:
  """The three UnCLIPSchedulers as Karlo configures them (docs/karlo_design.md §3, point 4)."""
  from diffusers import UnCLIPScheduler

  common = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True)
  return {
    "prior": UnCLIPScheduler(
      variance_type="fixed_small_log", prediction_type="sample", clip_sample_range=5.0, **common
    ),
    "decoder": UnCLIPScheduler(
      variance_type="learned_range", prediction_type="epsilon", clip_sample_range=1.0, **common
    ),
    "super_res": UnCLIPScheduler(
      variance_type="fixed_small_log", prediction_type="epsilon", clip_sample_range=1.0, **common
    ),
  }


def _last(x: torch.Tensor):
  """torch -> numpy float32, images NCHW -> NHWC (mav_jax is channels-last)."""
  x = x.detach().float().cpu()
  return (x.permute(0, 2, 3, 1) if x.ndim == 4 else x).numpy()


def _first(x):
  """numpy NHWC -> torch NCHW (vectors unchanged)."""
  x = torch.from_numpy(np.ascontiguousarray(x))
  return x.permute(0, 3, 1, 2).contiguous() if x.ndim == 4 else x


def run_unclip_pipeline(
  parts: dict,
  tokenizer_dir,
  prompts: list[str],
  *,
  prior_steps: int,
  decoder_steps: int,
  sr_steps: int,
  prior_guidance: float,
  decoder_guidance: float,
  seed: int = 0,
) -> dict:
  """diffusers' UnCLIPPipeline, built from the objects in `parts` (as `write_karlo_folder` returns
  them; docs/karlo_design.md T3) with Karlo's schedulers, run with every random value drawn here from
  `np.random.default_rng(seed)` and injected, so a JAX sampler fed the same values must agree.

  Every array is NumPy float32 (masks bool, ids and timesteps int64); images are channels-LAST
  [b, h, w, c]; b = len(prompts), d = CLIP width, s = decoder side, S = SR side (2s here), L =
  tokenizer length. diffusers batches guidance as [null; cond]; here the halves are split apart.

  - "images": [b, S, S, 3] in [0, 1], the pipeline's `output_type="np"` result.
  - "latents": the initial x_T: "prior" [b, d], "decoder" [b, s, s, 3], "super_res" [b, S, S, 3].
  - "step_noise": per stage an array [n - 1, *latent shape] (n the stage's steps): element i is
    the noise `UnCLIPScheduler.step` draws at grid point i (every t > 0, i.e. all steps but the
    last, which lands on t = -1 with no noise). Drawn in this order from the generator: the three
    latents (prior, decoder, super_res), then the prior's, decoder's and SR's step noises.
  - "timesteps": per stage the integer grid [n] (999, ..., 0).
  - "trajectory": per stage [n + 1, *latent shape]: x_t fed to each step, then the stage's raw
    result (prior: before post-processing; decoder: before the clamp).
  - "model_output": per stage [n, ...], what each step received: the prior's guided x0 [b, d], the
    decoder's guided eps with the cond branch's variance channels [b, s, s, 6], SR's eps.
  - "prior_latents": [b, d] the prior's result in its normalised space (= trajectory["prior"][-1]).
  - "image_embeddings": [b, d] the prior's post-processed (raw CLIP space) embeddings, as passed to
    text_proj.
  - "decoder_image": [b, s, s, 3] the decoder's result clamped to [-1, 1], before upsampling.
  - "upscaled": [b, S, S, 3] the bicubic-antialiased SR condition (channels 3: of the SR input).
  - "super_res": [b, S, S, 3] SR's result before the (x + 1) / 2 conversion and [0, 1] clamp.
  - "text": {"cond", "null"}, each {"input_ids" [b, L], "attention_mask" [b, L] bool,
    "text_embeds" [b, d], "last_hidden_state" [b, L, d]}; "null" is the "" prompt repeated b times
    (docs/karlo_design.md T13). The text encoder itself sees no padding mask; the mask goes to the prior
    and (padded with True for the extra tokens) the decoder.
  - "decoder_context": {"cond", "null"} (null only with guidance), each the decoder's inputs from
    text_proj: "encoder_hidden_states" [b, 4 + L, cross], "class_labels" [b, time_embed_dim] (the
    additive image-embedding time embedding), "attention_mask" [b, 4 + L] bool.
  - "noise_calls": [(stage, torch shape), ...], the patched `randn_tensor` calls in call order.
  """
  import logging
  import warnings
  from unittest import mock

  from diffusers import UnCLIPPipeline
  from diffusers.schedulers import scheduling_unclip
  from transformers import CLIPTokenizer

  tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
  schedulers = karlo_schedulers()
  deprecation = logging.getLogger("diffusers.pipelines.pipeline_utils")
  level = deprecation.level
  deprecation.setLevel(logging.ERROR)  # "UnCLIPPipeline has been deprecated" (a logger warning)
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      pipe = UnCLIPPipeline(
        **{k: parts[k] for k in ("prior", "decoder", "text_encoder", "text_proj")},
        super_res_first=parts["super_res_first"],
        super_res_last=parts["super_res_last"],
        tokenizer=tokenizer,
        prior_scheduler=schedulers["prior"],
        decoder_scheduler=schedulers["decoder"],
        super_res_scheduler=schedulers["super_res"],
      )
  finally:
    deprecation.setLevel(level)
  pipe.set_progress_bar_config(disable=True)

  b = len(prompts)
  d = pipe.prior.config.embedding_dim
  s, c = pipe.decoder.config.sample_size, pipe.decoder.config.in_channels
  big, sr_c = pipe.super_res_first.config.sample_size, pipe.super_res_first.config.in_channels // 2
  shapes = {"prior": (b, d), "decoder": (b, s, s, c), "super_res": (b, big, big, sr_c)}
  steps = {"prior": prior_steps, "decoder": decoder_steps, "super_res": sr_steps}
  rng = np.random.default_rng(seed)
  latents = {k: rng.standard_normal(shape, dtype=np.float32) for k, shape in shapes.items()}
  step_noise = {
    k: rng.standard_normal((steps[k] - 1, *shape), dtype=np.float32) for k, shape in shapes.items()
  }

  # Each scheduler's `step` is wrapped (on the instance) to say which stage is drawing and to
  # record its inputs; `randn_tensor` (imported into scheduling_unclip) hands out the noises.
  current: list = [None]
  used = {k: 0 for k in shapes}
  calls: list = []
  record = {k: {"t": [], "x": [], "out": [], "prev": None} for k in shapes}

  def fake_randn(shape, generator=None, device=None, dtype=None, **_):
    stage = current[0]
    assert stage is not None, "randn_tensor called outside a scheduler step"
    assert used[stage] < len(step_noise[stage]), f"{stage}: more noise draws than steps - 1"
    noise = _first(step_noise[stage][used[stage]])
    assert tuple(noise.shape) == tuple(shape), (stage, tuple(shape), tuple(noise.shape))
    used[stage] += 1
    calls.append((stage, tuple(shape)))
    return noise.to(device=device, dtype=dtype)

  def wrap(stage: str, scheduler):
    step = scheduler.step

    def recording_step(model_output, timestep, sample, *args, **kwargs):
      rec = record[stage]
      rec["t"].append(int(timestep))
      rec["x"].append(_last(sample))
      rec["out"].append(_last(model_output))
      current[0] = stage
      try:
        result = step(model_output, timestep, sample, *args, **kwargs)
      finally:
        current[0] = None
      rec["prev"] = _last(result[0] if isinstance(result, tuple) else result.prev_sample)
      return result

    scheduler.step = recording_step

  for stage, scheduler in schedulers.items():
    wrap(stage, scheduler)

  seen: dict = {}

  def first_call(name):
    def hook(module, args, kwargs):
      seen.setdefault(name, (args, dict(kwargs)))

    return hook

  handles = [
    pipe.prior.register_forward_pre_hook(first_call("prior"), with_kwargs=True),
    pipe.text_proj.register_forward_pre_hook(first_call("text_proj"), with_kwargs=True),
    pipe.decoder.register_forward_pre_hook(first_call("decoder"), with_kwargs=True),
    pipe.super_res_first.register_forward_pre_hook(first_call("super_res"), with_kwargs=True),
    pipe.super_res_last.register_forward_pre_hook(first_call("super_res"), with_kwargs=True),
  ]
  try:
    with mock.patch.object(scheduling_unclip, "randn_tensor", fake_randn):
      images = pipe(
        prompts,
        prior_num_inference_steps=prior_steps,
        decoder_num_inference_steps=decoder_steps,
        super_res_num_inference_steps=sr_steps,
        prior_guidance_scale=prior_guidance,
        decoder_guidance_scale=decoder_guidance,
        prior_latents=_first(latents["prior"]),
        decoder_latents=_first(latents["decoder"]),
        super_res_latents=_first(latents["super_res"]),
        output_type="np",
      ).images
    guided = prior_guidance > 1.0 or decoder_guidance > 1.0
    # The text encodings, as the pipeline computes them (CFG on, so "" is always there).
    with torch.no_grad():
      embeds, hidden, mask = pipe._encode_prompt(prompts, pipe.device, 1, True)
  finally:
    for h in handles:
      h.remove()

  for stage in shapes:
    assert used[stage] == steps[stage] - 1, (stage, used[stage], steps[stage])
    assert len(record[stage]["t"]) == steps[stage], stage
  assert len(calls) == sum(steps.values()) - 3

  def halves(x: torch.Tensor) -> dict:
    x = x.detach().cpu()
    return {"null": x[:b].numpy(), "cond": x[b:].numpy()} if guided else {"cond": x.numpy()}

  # What the prior saw must be what _encode_prompt gives (the text dict is what the pipeline used).
  prior_kw = seen["prior"][1]
  if guided:
    assert torch.equal(prior_kw["proj_embedding"], embeds)
    assert torch.equal(prior_kw["encoder_hidden_states"], hidden)
    assert torch.equal(prior_kw["attention_mask"], mask)
  ids = {
    "null": tokenizer(
      [""] * b,
      padding="max_length",
      max_length=tokenizer.model_max_length,
      truncation=True,
      return_tensors="np",
    ).input_ids,
    "cond": tokenizer(
      prompts,
      padding="max_length",
      max_length=tokenizer.model_max_length,
      truncation=True,
      return_tensors="np",
    ).input_ids,
  }
  text = {
    key: {
      "input_ids": ids[key].astype(np.int64),
      "attention_mask": m.numpy().astype(bool),
      "text_embeds": e.float().numpy(),
      "last_hidden_state": h.float().numpy(),
    }
    for key, e, h, m in (
      ("null", embeds[:b], hidden[:b], mask[:b]),
      ("cond", embeds[b:], hidden[b:], mask[b:]),
    )
  }

  dec_kw = seen["decoder"][1]
  context = {
    name: halves(dec_kw[name])
    for name in ("encoder_hidden_states", "class_labels", "attention_mask")
  }
  context = {key: {name: context[name][key] for name in context} for key in context["class_labels"]}
  sr_args, sr_kw = seen["super_res"]
  sr_input = sr_kw["sample"] if "sample" in sr_kw else sr_args[0]

  trajectory = {k: np.stack([*record[k]["x"], record[k]["prev"]]) for k in shapes}
  return {
    "images": np.asarray(images, np.float32),
    "latents": latents,
    "step_noise": step_noise,
    "timesteps": {k: np.asarray(record[k]["t"], np.int64) for k in shapes},
    "trajectory": trajectory,
    "model_output": {k: np.stack(record[k]["out"]) for k in shapes},
    "prior_latents": trajectory["prior"][-1],
    "image_embeddings": _last(seen["text_proj"][1]["image_embeddings"]),
    "decoder_image": np.clip(trajectory["decoder"][-1], -1.0, 1.0),
    "upscaled": _last(sr_input[:, sr_c:]),
    "super_res": trajectory["super_res"][-1],
    "text": text,
    "decoder_context": context,
    "noise_calls": calls,
  }
