"""Kakao Brain's Karlo (unCLIP, diffusers layout) -> mav_jax model folders.

`convert_karlo(source, output)` reads a folder as diffusers' `UnCLIPPipeline.save_pretrained`
writes it (`prior/`, `decoder/`, `text_proj/`, `super_res_first/`, `super_res_last/`,
`text_encoder/`, `tokenizer/`; safetensors or .bin, fp16 variants, shards) and writes

  OUT/clip               the ViT-L/14 text encoder (+ the vision tower of a CLIPModel folder given
                         as `vision`) and its tokenizer: what `conditioning.clip` names
  OUT/prior              configs/prior.py:karlo
  OUT/decoder_image      configs/decoder.py:karlo as an image model (data.kind "image", no fps):
                         what D^t's `train.init_from` names
  OUT/sr_low_image       configs/sr_low.py:karlo as an image model (Karlo's super_res_first)
  OUT/sr_low_image_last  the same architecture with super_res_last's weights (the last SR step)

each a model folder (`config.json` + Orbax `params/`) that `train.init_from`, `conditioning.clip`
and `mav_jax.sample` read like any other. Sizes come from the source's config.json files; every
source tensor is used exactly once (missing, misshapen and left-over tensors are named). The whole
output is written beside OUT and swapped in at the end, so a failed conversion leaves OUT as it
was, and an existing OUT is replaced only with `overwrite`.
"""

import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from mav_jax import checkpointing, errors
from mav_jax.convert import karlo_prior, karlo_unet
from mav_jax.convert.common import read_weights

# Subfolder -> (library, the class its config.json must name).
COMPONENTS = {
  "text_encoder": ("transformers", "CLIPTextModelWithProjection"),
  "tokenizer": (None, None),
  "prior": ("diffusers", "PriorTransformer"),
  "text_proj": ("diffusers", "UnCLIPTextProjModel"),
  "decoder": ("diffusers", "UNet2DConditionModel"),
  "super_res_first": ("diffusers", "UNet2DModel"),
  "super_res_last": ("diffusers", "UNet2DModel"),
}
OUTPUTS = ("clip", "prior", "decoder_image", "sr_low_image", "sr_low_image_last")


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise errors.UserError(f"{path} is not valid JSON ({e})") from e


def check_source(source: str) -> dict[str, dict]:
  """The config.json of every component, after checking the folder is a Karlo (unCLIP) folder:
  every subfolder there, each config naming the class Karlo uses, the tokenizer's files."""
  if not os.path.isdir(source):
    raise errors.UserFileNotFoundError(f"--source {source} is not a folder")
  missing = [name for name in COMPONENTS if not os.path.isdir(os.path.join(source, name))]
  if missing:
    raise errors.UserFileNotFoundError(
      f"{source} is not a Karlo (unCLIP) folder in the diffusers layout: it has no "
      f"{', '.join(f'{m}/' for m in missing)} (expected {', '.join(f'{c}/' for c in COMPONENTS)}, "
      "as UnCLIPPipeline.save_pretrained writes them)"
    )
  configs = {}
  for name, (library, cls) in COMPONENTS.items():
    folder = os.path.join(source, name)
    if library is None:
      for file in ("merges.txt", "vocab.json"):
        if not os.path.isfile(os.path.join(folder, file)):
          raise errors.UserFileNotFoundError(f"{folder} has no {file} (a CLIPTokenizer's files)")
      continue
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
      raise errors.UserFileNotFoundError(f"{folder} has no config.json")
    config = _read_json(path)
    found = config.get("_class_name") or (config.get("architectures") or [None])[0]
    if found != cls:
      raise errors.UserError(
        f"{path} describes a {found or 'model of no named class'}, not the {cls} Karlo's "
        f"{name}/ holds: is {source} a Karlo (unCLIP) folder?"
      )
    configs[name] = config
  return configs


def _stage_config(module: str, arg: str) -> ml_collections.ConfigDict:
  """configs/<module>.py's get_config(arg), loaded from the repository's configs folder."""
  import importlib.util

  from mav_jax import paths

  path = os.path.join(paths.REPO_ROOT, "configs", f"{module}.py")
  spec = importlib.util.spec_from_file_location(f"_mav_jax_configs_{module}", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def _use_clip(config: ml_collections.ConfigDict, clip_dir: str) -> None:
  """Points a stage config at the converted CLIP and the tokenizer it carries."""
  config.conditioning.clip = clip_dir
  config.data.tokenizer_path = os.path.join(clip_dir, "tokenizer", "merges.txt")


def _image_unet_config(stage: str, kwargs: dict, clip_dir: str) -> ml_collections.ConfigDict:
  """The karlo variant of `stage` as an image model with the source's sizes."""
  config = _stage_config(stage, "karlo")
  config.data.kind = "image"
  config.model.conditioning_scalars = ()  # fps belongs to the video model
  config.model.conditioning_scalar_scales = ()
  for key, value in kwargs.items():
    config.model[key] = value
  if config.model.use_global_embedding:
    _use_clip(config, clip_dir)
  config.train.init_from = ""
  config.train.trainable = "all"
  return config


def _check_tree(config, params, init_fn: Callable[[], Any], what: str) -> None:
  """The converted tree must be the one the stage initialises (a converter bug otherwise)."""
  import flax.linen as nn
  from flax import traverse_util

  want = traverse_util.flatten_dict(nn.unbox(jax.eval_shape(init_fn)))
  got = traverse_util.flatten_dict(params)
  bad = sorted(
    "/".join(p)
    for p in set(want) | set(got)
    if p not in want or p not in got or tuple(want[p].shape) != tuple(np.shape(got[p]))
  )
  if bad:
    raise ValueError(f"{what}: the converted tree differs from the stage's at {bad[:8]}")


def _contiguous(tree: Any) -> Any:
  return jax.tree.map(lambda a: np.array(a, np.float32, order="C"), tree)  # keeps 0-d arrays


def _count(tree: Any) -> int:
  return sum(int(np.size(a)) for a in jax.tree.leaves(tree))


def convert_karlo(
  source: str,
  output: str,
  vision: str | None = None,
  overwrite: bool = False,
  log: Callable[[str], None] = print,
) -> dict[str, ml_collections.ConfigDict]:
  """Converts the Karlo folder `source` into model folders under `output` (module docstring);
  `vision`: a CLIPModel folder (openai/clip-vit-large-patch14) whose vision tower joins the text
  encoder. Returns {output folder name: its config}."""
  checkpointing.check_new_output(output, overwrite)
  configs = check_source(source)
  if vision is not None and not os.path.isdir(vision):
    raise errors.UserFileNotFoundError(f"--vision {vision} is not a folder")
  out = epath.Path(output)
  final = os.path.abspath(output)  # the configs name the converted folders where they will be
  staging = out.parent / f"{out.name}.staging"
  if staging.exists():
    staging.rmtree()
  staging.mkdir(parents=True)
  try:
    written = _convert_all(source, configs, staging, final, vision, log)
  except BaseException:
    staging.rmtree()  # a failed conversion leaves nothing behind (and OUT as it was)
    raise
  if out.exists():
    out.rmtree()
  staging.rename(out)
  log(f"[convert] Karlo -> {output}: {', '.join(OUTPUTS)}")
  return written


def _convert_all(source, configs, staging, final, vision, log):
  """Writes every output folder into `staging`; returns {name: config}."""
  from mav_jax.models import clip_convert
  from mav_jax.stages import clip as clip_stage
  from mav_jax.stages import prior as prior_stage
  from mav_jax.stages import video

  written: dict[str, ml_collections.ConfigDict] = {}
  clip_dir = os.path.join(final, "clip")

  def done(name: str, config, n: int, start: float) -> None:
    written[name] = config
    log(f"[convert] {name}: {n:,} parameters ({time.time() - start:.1f} s)")

  start = time.time()
  clip, clip_params = clip_convert.load_hf_text_encoder(
    os.path.join(source, "text_encoder"), vision_from=vision
  )
  tokenizer = os.path.join(source, "tokenizer")
  clip_config = clip_stage.write_clip_folder(
    str(staging / "clip"),
    clip,
    _contiguous(clip_params),
    os.path.join(tokenizer, "merges.txt"),
    os.path.join(tokenizer, "vocab.json"),
  )
  done("clip", clip_config, _count(clip_params), start)
  if not clip.has_vision:
    log(
      "[convert] clip: text encoder only (Karlo ships no vision tower): sampling works; to "
      "train D^t, ↑F or the prior, convert again with --vision=<openai/clip-vit-large-patch14 "
      "folder>"
    )
  del clip_params

  start = time.time()
  state, file = read_weights(os.path.join(source, "prior"), "diffusers")
  kwargs, params = karlo_prior.convert_prior(state, configs["prior"], f"the prior {file}")
  del state
  config = _stage_config("prior", "karlo")
  for key in ("width", "layers", "heads", "activation", "causal", "time_scale", "clip_stats"):
    config.model[key] = kwargs[key]
  _use_clip(config, clip_dir)
  config.conditioning.embedding_dim = kwargs["embed_dim"]
  config.conditioning.text_width = clip.text.width
  config.data.max_tokens = kwargs["max_tokens"]
  model = prior_stage.make_model(config)
  _check_tree(config, params, lambda: prior_stage.init(model, config, jax.random.key(0)), "prior")
  checkpointing.write_model(str(staging / "prior"), config, _contiguous(params))
  done("prior", config, _count(params), start)
  del params

  for name, stage, sources in (
    ("decoder_image", "decoder", ("decoder",)),
    ("sr_low_image", "sr_low", ("super_res_first",)),
    ("sr_low_image_last", "sr_low", ("super_res_last",)),
  ):
    start = time.time()
    component = sources[0]
    state, file = read_weights(os.path.join(source, component), "diffusers")
    text_proj = None
    if stage == "decoder":
      kwargs = karlo_unet.unet_kwargs_decoder(configs["decoder"], configs["text_proj"])
      text_proj, _ = read_weights(os.path.join(source, "text_proj"), "diffusers")
    else:
      kwargs = karlo_unet.unet_kwargs_super_res(configs[component])
    config = _image_unet_config(stage, kwargs, clip_dir)
    base = int(configs["decoder"].get("sample_size") or config.conditioning.low_resolution)
    if stage == "decoder":
      config.conditioning.embedding_dim = int(configs["text_proj"]["clip_embeddings_dim"])
      config.conditioning.text_width = clip.text.width
      config.data.max_tokens = clip.context_length
      config.data.resolution = base
    else:
      config.data.resolution = int(configs[component].get("sample_size") or 4 * base)
      config.conditioning.low_resolution = base
      if name == "sr_low_image":  # Karlo's last step runs super_res_last
        config.sampling.last_step_model = os.path.join(final, "sr_low_image_last")
    stage_obj = video.VideoStage(stage)
    model = stage_obj.make_model(config)
    target = jax.eval_shape(lambda: stage_obj.init(model, config, jax.random.key(0)))  # noqa: B023
    params = karlo_unet.convert_unet(
      state, kwargs, target, f"the {component} {file}", text_proj=text_proj
    )
    del state, text_proj
    checkpointing.write_model(str(staging / name), config, _contiguous(params))
    done(name, config, _count(params), start)
    del params

  return written
