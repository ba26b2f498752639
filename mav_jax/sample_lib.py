"""The cascade at sampling time: load stage checkpoints, run any part of
SR_h ∘ SR_l^t ∘ ↑F ∘ D^t ∘ P ∘ C_x, and the applications of the paper as modes of one `Cascade`.

  text        caption -> CLIP text -> prior -> image embedding -> D^t -> ↑F -> SR_l^t -> SR_h
  image       animate an image: ↑F with the image as the given first frame (extrapolation), CLIP
              embedding of the image as the condition -> SR_l^t -> SR_h
  variation   a video's frames noised part-way (`strength`) and denoised by D^t conditioned on the
              CLIP embedding of its middle frame -> ↑F -> SR_l^t -> SR_h
  interpolate two images as the given first and last frames of ↑F -> SR_l^t -> SR_h
  extend      a video continued forwards: ↑F given its last frames, repeatedly -> SR_l^t -> SR_h

Every stage runs as one jitted function with its parameters placed on the mesh by the stage's
sharding rules (any device count); videos are [b, f, h, w, 3] in [-1, 1].
"""

import dataclasses
import functools
import json
import math
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mav_jax import checkpointing, errors, paths, stages
from mav_jax.data import tokenizers
from mav_jax.data import video as video_lib
from mav_jax.diffusion import samplers as samplers_lib
from mav_jax.parallel import sharding
from mav_jax.stages import common, video

CASCADE = ("prior", "decoder", "interp", "sr_low", "sr_high")
MODES = ("text", "image", "variation", "interpolate", "extend")
# The shipped tiny cascade (made by scripts/train_tiny_cascade.sh).
DEFAULT_ROOT = "checkpoints/tiny"


class CheckpointError(errors.UserError):
  """A stage checkpoint that is missing, of the wrong stage, or incompatible with its neighbours."""


@dataclasses.dataclass
class LoadedStage:
  """A stage's config, model, and parameters placed on the mesh."""

  name: str
  path: str
  config: Any
  model: Any
  params: Any
  params_last: Any = None  # sampling.last_step_model's (Karlo's super_res_last), if any

  @property
  def stage(self):
    return stages.get_stage(self.name)


def _boxed_params(stage, model, config):
  return jax.eval_shape(lambda: stage.init(model, config, jax.random.key(0)))


def _item(path: str) -> str:
  return "params" if checkpointing.is_exported_model(path) else "ema_params"


def _place(stage, model, config, path: str, mesh, strategy: str, given: str):
  """The checkpoint's parameters read straight into their shardings on `mesh` (each host reads
  only the slices its devices hold), after checking they fit the model."""
  boxed = _boxed_params(stage, model, config)
  shardings = sharding.tree_shardings(boxed, sharding.strategy_rules(strategy), mesh)

  def shapes(tree):
    return {"/".join(p): tuple(a.shape) for p, a in traverse_util.flatten_dict(tree).items()}

  want, have = shapes(nn.unbox(boxed)), shapes(checkpointing.params_metadata(path, _item(path)))
  if want != have:
    diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
    raise CheckpointError(
      f"{given}: its parameters do not fit the model its config describes "
      f"(first differences: {diff[:5]}); re-export the checkpoint with mav_jax.export"
    )
  return checkpointing.restore_params(path, _item(path), shardings=shardings)


def read_stage(name: str, path: str, images: bool = False) -> tuple[str, Any, Any]:
  """(resolved path, config, model) of stage `name`'s checkpoint, with clear errors; none of its
  parameters is read. `images`: image-stage checkpoints are welcome (image_only sampling)."""
  given = path
  path = paths.resolve(path)
  try:
    config = checkpointing.load_config(path)
  except FileNotFoundError as e:
    raise CheckpointError(
      f"--{name}={given!r}: no {name} checkpoint there ({e}). Train it with "
      f"`python -m mav_jax.train --config configs/{name}.py:tiny --workdir W` (or the whole tiny "
      f"cascade with scripts/train_tiny_cascade.sh) and pass --{name}=W"
    ) from None
  if config.get("stage") != name:
    raise CheckpointError(
      f"--{name}={given!r} holds a {config.get('stage')!r} checkpoint, not {name}"
    )
  if name not in ("prior", "sr_high") and config.data.kind == "image" and not images:
    raise CheckpointError(
      f"--{name}={given!r} is an image-stage checkpoint (trained with data.kind=image); sampling "
      f"videos needs the video stage trained from it (train.init_from); --mode=image_only "
      f"samples images with it"
    )
  return path, config, stages.get_stage(name).make_model(config)


def load_stage(name: str, path: str, mesh, strategy: str = "data_parallel") -> LoadedStage:
  """Loads stage `name` from a model checkpoint or training workdir onto `mesh`, with clear
  errors."""
  resolved, config, model = read_stage(name, path)
  params = _place(stages.get_stage(name), model, config, resolved, mesh, strategy, path)
  return LoadedStage(name, resolved, config, model, params)


MESH_AXES = ("data", "fsdp", "fsdp_transpose", "tensor")


def sampling_mesh(
  strategy: str, devices=None, tensor: int | None = None, boxed=None
) -> jax.sharding.Mesh:
  """The trainer's mesh axes over `devices` (default: all, of every process) for sampling with
  `strategy`: data_parallel puts every device on "data"; fsdp on the two FSDP axes (split to divide
  `boxed`, the largest stage's abstract parameters, most evenly); the tensor strategies put
  `tensor` devices (default 2) on "tensor" and the rest on "data" / the FSDP axes. The batch is
  split over every axis but "tensor" (sharding.batch_sharding), as in training."""
  import ml_collections

  from mav_jax.parallel import mesh as mesh_lib

  devices = list(jax.devices() if devices is None else devices)
  rules = sharding.strategy_rules(strategy)  # unknown names fail here
  if tensor is None:
    tensor = 2 if "tensor" in strategy and len(devices) % 2 == 0 else 1
  if "tensor" not in strategy and tensor != 1:
    raise errors.UserError(
      f"--tensor={tensor} needs a tensor strategy (--strategy tensor or fsdp_tensor); "
      f"{strategy} uses no tensor axis"
    )
  if tensor < 1 or len(devices) % tensor:
    raise errors.UserError(
      f"--tensor={tensor} must divide the {len(devices)} devices (e.g. --tensor=2)"
    )
  fsdp = -1 if "fsdp" in strategy else 1
  ici = (1 if fsdp == -1 else -1, fsdp, fsdp, tensor)
  config = ml_collections.ConfigDict({"axes": MESH_AXES, "ici": ici, "dcn": (-1, 1, 1, 1)})

  def split_fsdp(n):
    if boxed is None:
      return n, 1
    return sharding.best_fsdp_split(boxed, rules, {"data": 1, "tensor": tensor}, n)

  return mesh_lib.create_mesh(config, devices, split_fsdp)


class Progress:
  """Progress lines written from the host around stage calls; nothing inside the sampling loop
  calls back to the host (scripts/progress_cost.py measured what a per-step callback cost: see
  docs/sampling.md). A call that compiles first is announced before it starts; a line follows every
  call that compiled or took over `slow_s` seconds (a run of many fast batches leaves the per-batch
  lines to its caller):

    [sample] decoder  20 steps x 8 videos (compiling first)
    [sample] decoder  20 steps x 8 videos in 14.2s
  """

  def __init__(self, stream=None, slow_s: float = 5.0):
    self.stream, self.slow_s = stream or sys.stderr, slow_s

  def _say(self, line: str) -> None:
    if jax.process_index() == 0:
      print(line, file=self.stream, flush=True)

  def start(self, name: str, steps: int, batch: int, compiling: bool) -> tuple:
    what = f"[sample] {name:8s} {steps} steps x {batch} video{'' if batch == 1 else 's'}"
    if compiling:
      self._say(f"{what} (compiling first)")
    return what, time.time()

  def done(self, name: str, started: tuple, compiling: bool) -> None:
    what, start = started
    seconds = time.time() - start
    if compiling or seconds > self.slow_s:
      self._say(f"{what} in {seconds:.1f}s")


def _sampling(config, steps: dict, samplers: dict, guidance: dict, name: str):
  s = config.sampling.copy_and_resolve_references()
  with s.unlocked():
    if name in steps:
      s.num_steps = int(steps[name])
    if name in samplers:
      s.sampler = samplers[name]
    if name in guidance:
      s.guidance_scale = float(guidance[name])
  return s


# What each per-stage sampling flag accepts, checked when the flag is read (before any model loads).
LIMITS = {
  "steps": (lambda v: v >= 1, ">= 1"),
  "guidance": (
    lambda v: v >= 0,
    ">= 0 (0: unconditional, 1: the conditional model alone, above 1: stronger guidance)",
  ),
  "sampler": (lambda v: v in samplers_lib.SAMPLERS, f"one of {', '.join(samplers_lib.SAMPLERS)}"),
}


def check_frames(config, num_frames: int, flag: str = "--num_frames") -> None:
  """A video stage samples at most model.max_temporal_distance + 1 frames: its temporal attention
  tells frames apart up to that distance (further ones share one relative-position bias)."""
  limit = int(config.model.get("max_temporal_distance", 32)) + 1
  if not 2 <= num_frames <= limit:
    raise errors.UserError(
      f"{flag}={num_frames}: the {config.stage} samples 2 to {limit} frames (its temporal "
      f"attention tells frames apart up to {limit - 1} apart, model.max_temporal_distance; it was "
      f"trained on {config.data.num_frames}); more frames come from ↑F (--frame_skip) or "
      f"extend mode"
    )


def _per_stage(value, name: str, cast) -> dict:
  """'20' -> {every stage: 20}; 'decoder=20,sr_high=8' -> those stages; '20,decoder=30' -> 30 for
  the decoder, 20 for the rest (named stages win over a bare value wherever it stands). Values
  outside LIMITS[name] are an error naming the limit."""
  if value is None or str(value).strip() == "":
    return {}
  bare, named = {}, {}
  for part in (p.strip() for p in str(value).split(",")):
    if not part:
      continue
    key, _, v = part.rpartition("=")
    try:
      cast_v = cast(v.strip())
    except ValueError:
      raise errors.UserError(f"--{name}: cannot read {v.strip()!r} in {value!r}") from None
    ok, rule = LIMITS.get(name, (lambda v: True, ""))
    if not ok(cast_v):
      raise errors.UserError(f"--{name}: {cast_v!r} in {value!r}; it must be {rule}")
    if not key:
      bare = {s: cast_v for s in CASCADE}
    elif key.strip() not in CASCADE:
      raise errors.UserError(f"--{name}: unknown stage {key.strip()!r}; stages are {CASCADE}")
    else:
      named[key.strip()] = cast_v
  return {**bare, **named}


class Cascade:
  """The loaded stages and the functions that run them.

  Every stage runs as one jitted function, built once per (stage, input shapes, sampling settings)
  and reused by every later batch, prompts file, evaluation batch and `extend` round. The stages'
  parameters are sharded by `strategy` over the trainer's mesh axes and every batch is split over
  the data axes (padded to a multiple of their size; the padding's outputs are dropped), so N
  devices sample N times the videos at once. With several JAX processes (a pod, or
  launch/local.py), every process runs the same calls on the same inputs; outputs are global
  arrays, each process holding its devices' rows (`local_rows`).

  Args:
    checkpoints: {stage: path} for the stages to load (missing stages cannot be used).
    clip: CLIP checkpoint (default: the prior's or the decoder's conditioning.clip).
    devices: devices for the mesh (default: all, of every process).
    strategy: sharding strategy for the parameters (data_parallel replicates them).
    tensor: devices on the "tensor" axis for the tensor strategies (default 2).
    steps, samplers, guidance: per-stage overrides ({stage: value}).
    progress: where the per-stage progress lines go (default: stderr; `Progress(io.StringIO())`
      to keep them quiet).
  """

  def __init__(
    self,
    checkpoints: dict[str, str],
    clip: str | None = None,
    devices=None,
    strategy: str = "data_parallel",
    steps: dict | None = None,
    samplers: dict | None = None,
    guidance: dict | None = None,
    truncate_prompts: bool = False,
    tensor: int | None = None,
    progress: Progress | None = None,
    images: bool = False,
  ):
    self.truncate_prompts, self._warned_truncation = truncate_prompts, False
    self.strategy = strategy
    read = {n: read_stage(n, p, images) for n, p in checkpoints.items() if p}
    # The FSDP axes are split to divide the largest stage's parameters most evenly.
    boxed = None
    if read and "fsdp" in strategy:
      boxed = max(
        (_boxed_params(stages.get_stage(n), m, c) for n, (_, c, m) in read.items()),
        key=lambda b: sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(b))),
      )
    self.mesh = sampling_mesh(strategy, devices, tensor, boxed)
    self.rules = sharding.activation_rules(strategy)
    self.batch_sharding = sharding.batch_sharding(self.mesh)
    self.batch_shards = sharding.batch_shards(self.mesh)
    self._replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    self.stages = {n: LoadedStage(n, path, c, m, None) for n, (path, c, m) in read.items()}
    self._check_chain()  # from the configs: no parameter is read for stages that do not chain
    for n, loaded in self.stages.items():
      loaded.params = _place(
        loaded.stage, loaded.model, loaded.config, loaded.path, self.mesh, strategy, checkpoints[n]
      )
      last = loaded.config.sampling.get("last_step_model", "")
      if last:
        loaded.params_last = self._last_step_params(loaded, last)
    self.steps, self.samplers, self.guidance = steps or {}, samplers or {}, guidance or {}
    self.progress = progress or Progress()
    # (stage, kind, static arguments, sampling settings) -> its jitted function.
    self._jitted: dict = {}
    self._seen: set = set()  # (key, input shapes) already compiled
    self.clip, self.clip_params = None, None
    clip_user = next((s for s in ("prior", "decoder", "interp") if s in self.stages), None)
    if clip_user:
      # One CLIP for the whole cascade: --clip, else the one the first CLIP-reading stage names;
      # frozen_clip checks it is a CLIP of the right width (and tokens, for the prior).
      config = self.stages[clip_user].config.copy_and_resolve_references()
      if clip:
        with config.unlocked():
          config.conditioning.clip = clip
      self.clip = common.frozen_clip(config, check_tokens=clip_user == "prior")
      for s in ("prior", "decoder", "interp"):
        if s in self.stages:
          want = self.stages[s].config.conditioning.embedding_dim
          if want != self.clip.embed_dim:
            raise CheckpointError(
              f"the {s} checkpoint was trained on {want}-dimensional CLIP embeddings, the CLIP at "
              f"{self.clip.path!r} makes {self.clip.embed_dim}: pass the CLIP it was trained with "
              f"(--clip)"
            )
          common.use_clip(self.stages[s].model, self.clip)
      if "prior" in self.stages:
        width = self.stages["prior"].config.conditioning.text_width
        if width != self.clip.config.model.text_width:
          raise CheckpointError(
            f"the prior reads {width}-wide CLIP token features, the CLIP at {self.clip.path!r} "
            f"makes {self.clip.config.model.text_width}: pass the CLIP it was trained with (--clip)"
          )
      self.clip_params = self.clip.load(self.mesh, strategy)
      self.tokenizer = self.clip.tokenizer

  def _last_step_params(self, loaded: LoadedStage, given: str):
    """The parameters of `sampling.last_step_model`, a model of the same architecture used for
    the last sampling step (Karlo's super_res_last), placed like the stage's."""
    path = paths.resolve(given)
    try:
      config = checkpointing.load_config(path)
    except FileNotFoundError as e:
      raise CheckpointError(
        f"the {loaded.name} at {loaded.path!r} names sampling.last_step_model={given!r}, which "
        f"is not there ({e})"
      ) from None
    if (
      config.get("stage") != loaded.name or config.model.to_dict() != loaded.config.model.to_dict()
    ):
      raise CheckpointError(
        f"sampling.last_step_model={given!r} of the {loaded.name} at {loaded.path!r} is not a "
        f"{loaded.name} of the same architecture"
      )
    return _place(loaded.stage, loaded.model, loaded.config, path, self.mesh, self.strategy, given)

  # -- consistency ---------------------------------------------------------------------------------

  def _check_chain(self):
    s = self.stages
    if "sr_low" in s:
      low, base = s["sr_low"].config.conditioning.low_resolution, self.base_resolution
      if base is not None and low != base:
        raise CheckpointError(
          f"sr_low upsamples {low}px video but the decoder makes {base}px: use checkpoints of one "
          f"cascade"
        )
    if "sr_high" in s and "sr_low" in s:
      low, mid = s["sr_high"].config.conditioning.low_resolution, s["sr_low"].config.data.resolution
      if low != mid:
        raise CheckpointError(f"sr_high upsamples {low}px frames but sr_low makes {mid}px")

  @property
  def base_resolution(self) -> int | None:
    for n in ("decoder", "interp"):
      if n in self.stages:
        return int(self.stages[n].config.data.resolution)
    return None

  def require(self, *names):
    missing = [n for n in names if n not in self.stages]
    if missing:
      raise CheckpointError(
        f"this needs the {', '.join(missing)} checkpoint(s): pass --{missing[0]}"
      )
    if self.clip is None and any(n in ("prior", "decoder", "interp") for n in names):
      raise CheckpointError("this needs a CLIP checkpoint: pass --clip")

  # -- stage runners -------------------------------------------------------------------------------

  def _padded(self, b: int) -> int:
    """The batch size `b` is padded to: a multiple of the batch shards."""
    return -(-b // self.batch_shards) * self.batch_shards

  def _call(self, key, fn, shared, batch, rng=None):
    """`fn(shared, batch, rng)`, jitted once per `key` (and compiled once per input shape), under
    the mesh and the strategy's activation rules. `batch`'s leaves all lead with the same batch
    size b: they are padded to a multiple of the batch shards and split over them, and the
    outputs (all leading with the batch) cut back to b. `rng` is replicated."""
    jitted = self._jitted.get(key)
    if jitted is None:

      def wrapped(shared, batch, key_data):
        rng = None if key_data is None else jax.random.wrap_key_data(key_data)
        return fn(shared, batch, rng)

      jitted = self._jitted[key] = jax.jit(wrapped, out_shardings=self.batch_sharding)
    b = jax.tree.leaves(batch)[0].shape[0]
    n = self._padded(b)
    batch = jax.tree.map(lambda x: place_batch(x, n, self.batch_sharding), batch)
    key_data = None
    if rng is not None:
      data = np.asarray(jax.random.key_data(rng))
      key_data = jax.make_array_from_callback(data.shape, self._replicated, lambda i: data[i])
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      out = jitted(shared, batch, key_data)
    return out if n == b else jax.tree.map(lambda x: x[:b], out)

  def _run(self, name: str, kind: str, statics: tuple, fn, shared, batch, rng):
    """Runs sampling function `fn(settings, shared, batch, rng)` of stage `name` (see `_call`),
    built once per (kind, `statics`, the stage's sampling settings), with progress lines."""
    s = _sampling(self.stages[name].config, self.steps, self.samplers, self.guidance, name)
    settings = json.dumps(s.to_dict(), sort_keys=True, default=str)
    key = (name, kind, statics, settings)
    b = jax.tree.leaves(batch)[0].shape[0]
    n = self._padded(b)
    shapes = tuple((n, *x.shape[1:], str(x.dtype)) for x in jax.tree.leaves(batch))
    compiling = (key, shapes) not in self._seen
    self._seen.add((key, shapes))
    started = self.progress.start(name, s.num_steps, b, compiling)
    out = jax.block_until_ready(self._call(key, functools.partial(fn, s), shared, batch, rng))
    self.progress.done(name, started, compiling)
    return out

  def tokenize(self, prompts: list[str]):
    for p in prompts:
      if not p.strip():
        raise errors.UserError(
          "empty prompt: pass a caption, e.g. --prompt 'a red circle moving left'"
        )
    self.check_prompts(prompts)
    ids, mask = tokenizers.tokenize_batch(
      self.tokenizer, prompts, int(self.clip.config.data.max_tokens)
    )
    return jnp.asarray(ids), jnp.asarray(mask)

  def check_prompts(self, prompts: list[str]) -> int:
    """Prompts longer than the text encoder's context: an error naming the first, or (with
    truncate_prompts) one warning line; returns how many are cut."""
    limit = int(self.clip.config.data.max_tokens)
    long = [
      (i, p, n) for i, p in enumerate(prompts) if (n := len(self.tokenizer.encode(p))) > limit
    ]
    if long and not self.truncate_prompts:
      i, p, n = long[0]
      raise errors.UserError(
        f"prompt {i + 1} ({p[:60]!r}{'...' if len(p) > 60 else ''}) is {n} tokens, over the text "
        f"encoder's context of {limit} ({self.clip.config.data.tokenizer} tokens, begin and end "
        f"included); {len(long)} of {len(prompts)} prompts are too long. Shorten them, or pass "
        f"--truncate_prompts to cut them to {limit} tokens"
      )
    if long and not self._warned_truncation:
      self._warned_truncation = True
      print(
        f"[sample] warning: {len(long)} of {len(prompts)} prompts cut to the text encoder's "
        f"{limit} tokens (--truncate_prompts; said once)",
        file=sys.stderr,
      )
    return len(long)

  def prior(self, prompts: list[str], rng, negative_prompt: str | None = None):
    """Scaled-unit image embeddings [b, d] for the prompts."""
    self.require("prior")
    p = self.stages["prior"]
    tokens, mask = self.tokenize(prompts)
    batch = {"tokens": tokens, "mask": mask}
    if negative_prompt:
      batch["negative"] = self.tokenize([negative_prompt] * len(prompts))

    def fn(s, shared, batch, rng):
      params, clip_params = shared
      return stages.prior.generate(
        p.model,
        p.config,
        params,
        clip_params,
        batch["tokens"],
        batch["mask"],
        rng,
        negative=batch.get("negative"),
        sampling=s,
      )

    return self._run("prior", "prior", (), fn, (p.params, self.clip_params), batch, rng)

  def image_embedding(self, frames):
    """CLIP image embeddings of model-space images [b, h, w, 3]: scaled-unit, or raw for stages
    that read them raw (`conditioning.embedding_norm`, Karlo's)."""
    users = [self.stages[n].config for n in ("decoder", "interp") if n in self.stages]
    raw = bool(users) and common.raw_embeddings(users[0])

    def fn(params, batch, rng):
      return self.clip.image_embedding(params, batch, raw=raw)

    return self._call(("clip", "image_embedding"), fn, self.clip_params, frames)

  def caption_tokens(self, name: str, prompts: list[str] | None, batch: int):
    """(tokens, mask) for a stage with `model.text_motion` (None for other stages):
    the prompts' tokens, or an all-False mask (no caption) when there are none."""
    model = self.stages[name].model
    if model.unclip:  # Karlo reads the caption; with none, the empty caption
      return self.tokenize(prompts) if prompts is not None else self.clip.null_tokens(batch)
    if not model.uses_text:
      return None
    if prompts is None:
      n = int(self.clip.config.data.max_tokens)
      return jnp.zeros((batch, n), jnp.int32), jnp.zeros((batch, n), bool)
    return self.tokenize(prompts)

  def _with_caption(self, name: str, cond: dict, clip_params, caption) -> dict:
    """`cond` plus the caption context (inside a jitted function) when the stage reads text."""
    if caption is None:
      return cond
    model = self.stages[name].model
    if model.unclip:
      b = caption[0].shape[0]
      return dict(
        cond,
        **video.VideoStage.unclip_text(model, clip_params, *caption),
        null=video.VideoStage.unclip_null(model, clip_params, b),
      )
    return dict(cond, **video.VideoStage.caption_context(model, clip_params, *caption))

  def decoder(
    self,
    embedding,
    fps: float,
    num_frames: int,
    rng,
    *,
    negative=None,
    init=None,
    strength=1.0,
    prompts=None,
    image_mode=False,
  ):
    """D^t: clips [b, f, r, r, 3] from image embeddings [b, d]; `prompts` feed a decoder with
    text-aware temporal layers or a Karlo decoder (ignored by a paper-faithful one).
    `image_mode`: independent images [b, 1, r, r, 3] (an image-stage decoder, no fps)."""
    self.require("decoder")
    d = self.stages["decoder"]
    if image_mode:
      num_frames = 1
    else:
      check_frames(d.config, num_frames)
    r = int(d.config.data.resolution)
    b = embedding.shape[0]
    batch = {
      "embedding": embedding,
      "fps": np.full((b,), fps, np.float32),
      "caption": self.caption_tokens("decoder", prompts, b),
      "negative": negative,
      "init": init,
    }
    strength = float(strength)

    def fn(s, shared, batch, rng):
      params, clip_params = shared
      scalars = {} if image_mode else {"fps": batch["fps"]}
      cond = {"embedding": batch["embedding"], "scalars": scalars}
      cond = self._with_caption("decoder", cond, clip_params, batch["caption"])
      return video.DECODER.generate(
        d.model,
        d.config,
        params,
        cond,
        (batch["embedding"].shape[0], num_frames, r, r, 3),
        rng,
        sampling=s,
        negative_embedding=batch["negative"],
        init=batch["init"],
        strength=strength,
        image_mode=image_mode,
      )

    statics = (num_frames, strength, image_mode)
    return self._run("decoder", "decoder", statics, fn, (d.params, self.clip_params), batch, rng)

  def interp(self, given, mask, skip: float, fps: float, embedding, rng, prompts=None):
    """↑F: fills in the frames of `given` [b, f, h, w, 3] where `mask` [f] is False."""
    self.require("interp")
    it = self.stages["interp"]
    b = given.shape[0]
    batch = {
      "given": given,
      "mask": np.broadcast_to(np.asarray(mask, bool), given.shape[:2]),
      "embedding": embedding,
      "fps": np.full((b,), fps, np.float32),
      "frame_skip": np.full((b,), skip, np.float32),
      "caption": self.caption_tokens("interp", prompts, b),
    }

    def fn(s, shared, batch, rng):
      params, clip_params = shared
      given, mask = batch["given"], batch["mask"]
      cond = {
        "embedding": batch["embedding"],
        "scalars": {"fps": batch["fps"], "frame_skip": batch["frame_skip"]},
        "extra": video.masked_video_inputs(given, mask),
      }
      cond = self._with_caption("interp", cond, clip_params, batch["caption"])
      out = video.INTERP.generate(it.model, it.config, params, cond, given.shape, rng, sampling=s)
      # The given frames are kept exactly.
      return jnp.where(mask[:, :, None, None, None], given, out)

    return self._run("interp", "interp", (), fn, (it.params, self.clip_params), batch, rng)

  def expand(self, clip, skip: int, fps: float, embedding, rng, prompts=None):
    """↑F interpolation: f frames at `fps` -> (f - 1) * skip + 1 frames at fps * skip."""
    b, f = clip.shape[:2]
    n = (f - 1) * skip + 1
    given = jnp.zeros((b, n) + clip.shape[2:]).at[:, ::skip].set(clip)
    mask = video_lib.frame_mask("interpolate", n, skip)
    return self.interp(given, mask, skip, fps * skip, embedding, rng, prompts)

  def super_resolve(self, name: str, clip, rng, image_mode: bool = False):
    """SR_l^t (whole clips) or SR_h (frame by frame, shared noise) of `clip` [b, f, h, w, 3];
    `image_mode`: the frames as independent images (an image-stage SR_l)."""
    self.require(name)
    sr = self.stages[name]
    c = sr.config
    if clip.shape[2] != c.conditioning.low_resolution:
      raise CheckpointError(
        f"{name} upsamples {c.conditioning.low_resolution}px frames, got {clip.shape[2]}px"
      )
    r = int(c.data.resolution)
    stage = stages.get_stage(name)

    def fn(s, shared, batch, rng):
      params, params_last = shared
      clip = batch["clip"]
      b, f = clip.shape[:2]
      aug_rng, rng = jax.random.split(rng)
      cond = stage.low_resolution_input(
        sr.model, c, clip, r, aug_rng, level=s.aug_level, share_across_frames=name == "sr_high"
      )
      return stage.generate(
        sr.model,
        c,
        params,
        cond,
        (b, f, r, r, 3),
        rng,
        sampling=s,
        image_mode=image_mode,
        params_last=params_last,
      )

    shared = (sr.params, sr.params_last)
    return self._run(name, name, (image_mode,), fn, shared, {"clip": clip}, rng)

  def finish(self, clip, rng, until: str = "sr_high"):
    """SR_l^t then SR_h, each only if `until` is that stage or later."""
    for name in ("sr_low", "sr_high"):
      if CASCADE.index(name) <= CASCADE.index(until):
        rng, sub = jax.random.split(rng)
        clip = self.super_resolve(name, clip, sub)
    return clip

  # -- applications --------------------------------------------------------------------------------

  def text_to_video(
    self,
    prompts,
    rng,
    *,
    fps=None,
    num_frames=None,
    frame_skip=None,
    negative_prompt=None,
    until="sr_high",
  ):
    """Captions -> videos through the whole cascade (or up to `until`)."""
    self.require("prior", "decoder")
    dc = self.stages["decoder"].config
    fps = float(fps or dc.sampling.fps)
    num_frames = int(num_frames or dc.data.num_frames)
    r = jax.random.split(rng, 4)
    embedding = self.prior(prompts, r[0])
    negative = self.prior([negative_prompt] * len(prompts), r[1]) if negative_prompt else None
    clip = self.decoder(embedding, fps, num_frames, r[2], negative=negative, prompts=prompts)
    return self._after_decoder(clip, fps, embedding, r[3], frame_skip, until, prompts)

  def text_to_image(self, prompts, rng, *, negative_prompt=None, until="sr_low"):
    """Captions -> images [b, 1, h, w, 3] through the image stages: prior, decoder in image mode,
    then (until "sr_low") SR_l in image mode: Karlo's text-to-image pipeline on its converted
    folders. Returns (images, 0.0)."""
    if until not in ("decoder", "sr_low"):
      raise errors.UserError(f"image_only mode runs the prior, decoder and sr_low, not {until}")
    self.require("prior", "decoder")
    r = jax.random.split(rng, 4)
    embedding = self.prior(prompts, r[0])
    negative = self.prior([negative_prompt] * len(prompts), r[1]) if negative_prompt else None
    images = self.decoder(
      embedding, 0.0, 1, r[2], negative=negative, prompts=prompts, image_mode=True
    )
    if until == "sr_low":
      images = self.super_resolve("sr_low", images, r[3], image_mode=True)
    return images, 0.0

  def _after_decoder(self, clip, fps, embedding, rng, frame_skip, until, prompts=None):
    if until == "decoder":
      return clip, fps
    if frame_skip is None:
      self.require("interp")
      frame_skip = self.stages["interp"].config.sampling.frame_skip
    skip = int(frame_skip)
    if skip < 1:
      raise errors.UserError(f"frame_skip must be >= 1 (1: no interpolation), got {skip}")
    rng, sub = jax.random.split(rng)
    clip = self.expand(clip, skip, fps, embedding, sub, prompts) if skip > 1 else clip
    return self.finish(clip, rng, until), fps * skip

  def image_to_video(
    self, image, rng, *, fps=None, num_frames=None, frame_skip=None, until="sr_high"
  ):
    """Animates model-space images [b, h, w, 3]: ↑F extrapolates from them as the first frame."""
    self.require("decoder", "interp")
    dc = self.stages["decoder"].config
    skip = int(frame_skip or self.stages["interp"].config.sampling.frame_skip)
    if skip < 1:
      raise errors.UserError(f"frame_skip must be >= 1, got {skip}")
    fps = float(fps or dc.sampling.fps) * skip
    n = (int(num_frames or dc.data.num_frames) - 1) * skip + 1
    b = image.shape[0]
    given = jnp.zeros((b, n) + image.shape[1:]).at[:, 0].set(image)
    embedding = self.image_embedding(image)
    rng, sub = jax.random.split(rng)
    clip = self.interp(given, video_lib.frame_mask("first", n, 1), 1.0, fps, embedding, sub)
    return (clip if until == "interp" else self.finish(clip, rng, until)), fps

  def variation(self, clip, rng, *, strength=0.7, fps=None, frame_skip=None, until="sr_high"):
    """Variations of model-space clips [b, f, h, w, 3] (at D^t's resolution and frame count)."""
    self.require("decoder")
    if not 0.0 < strength <= 1.0:
      raise errors.UserError(f"strength must be in (0, 1], got {strength}")
    fps = float(fps or self.stages["decoder"].config.sampling.fps)
    embedding = self.image_embedding(clip[:, clip.shape[1] // 2])
    r = jax.random.split(rng, 2)
    out = self.decoder(embedding, fps, clip.shape[1], r[0], init=clip, strength=strength)
    return self._after_decoder(out, fps, embedding, r[1], frame_skip, until)

  def interpolate(self, first, last, rng, *, num_frames=None, fps=None, until="sr_high"):
    """A clip from image `first` to image `last` [b, h, w, 3]: ↑F given both end frames."""
    self.require("interp")
    ic = self.stages["interp"].config
    n = int(num_frames or ic.data.num_frames)
    fps = float(fps or ic.sampling.fps)
    b = first.shape[0]
    given = jnp.zeros((b, n) + first.shape[1:]).at[:, 0].set(first).at[:, -1].set(last)
    embedding = self.image_embedding(first)
    rng, sub = jax.random.split(rng)
    clip = self.interp(
      given, video_lib.frame_mask("interpolate", n, n - 1), n - 1, fps, embedding, sub
    )
    return (clip if until == "interp" else self.finish(clip, rng, until)), fps

  def extend(self, clip, rng, *, times=1, context=None, fps=None, until="sr_high"):
    """Continues model-space clips [b, f, h, w, 3] forwards: each round ↑F is given the last
    `context` frames as its first frames and generates the rest."""
    self.require("interp")
    ic = self.stages["interp"].config
    n = int(ic.data.num_frames)
    context = int(context or ic.data.mask_max_context)
    if not 1 <= context < n:
      raise errors.UserError(f"--context must be in [1, {n - 1}], got {context}")
    if clip.shape[1] < context:
      raise errors.UserError(
        f"the video has {clip.shape[1]} frames, fewer than the {context} given frames per round "
        f"(--context)"
      )
    if times < 1:
      raise errors.UserError(f"extend_times must be >= 1, got {times}")
    fps = float(fps or ic.sampling.fps)
    # As in training: the CLIP embedding of the first given frame.
    embedding = self.image_embedding(clip[:, -context])
    mask = video_lib.frame_mask("first", n, context)
    # Every round is the same call (the last `context` frames in from the host, n out): ↑F
    # compiles once, and nothing else compiles per round. Base-resolution frames are small.
    pieces = [to_host(clip)]
    tail = pieces[0][:, -context:]
    blank = np.zeros((clip.shape[0], n - context) + clip.shape[2:], np.float32)
    for _ in range(times):
      rng, sub = jax.random.split(rng)
      new = to_host(
        self.interp(np.concatenate([tail, blank], axis=1), mask, 1.0, fps, embedding, sub)
      )
      pieces.append(new[:, context:])
      tail = new[:, -context:]
    clip = np.concatenate(pieces, axis=1)
    return (clip if until == "interp" else self.finish(clip, rng, until)), fps


def text_batches(
  cascade: Cascade,
  prompts: list[str],
  batch_size: int,
  rng,
  write,
  log=None,
  images: bool = False,
  **kwargs,
) -> float:
  """Samples videos for `prompts`, a fixed batch at a time (the last padded with its last prompt;
  padding is never written), and hands each video this process holds to `write(index, video,
  fps)` (video: model space [f, h, w, 3], host numpy) as its batch finishes. Batch k's key is
  `rng` for k = 0 and fold_in(rng, first prompt's index) after: a video depends on the seed, the
  batch size and its place in the file. Returns the fps.
  The batches are the same whatever the device or process count (each is padded to a multiple of
  the devices inside the cascade), so the videos are too. `kwargs` go to `text_to_video` (or, with
  `images`, to `text_to_image`: one-frame "videos")."""
  if batch_size < 1:
    raise errors.UserError(f"--batch_size must be >= 1, got {batch_size}")
  size = min(batch_size, len(prompts))
  start, fps = time.time(), None
  for first in range(0, len(prompts), size):
    chunk = prompts[first : first + size]
    padded = chunk + [chunk[-1]] * (size - len(chunk))
    key = rng if first == 0 else jax.random.fold_in(rng, first)
    run = cascade.text_to_image if images else cascade.text_to_video
    clip, fps = run(padded, key, **kwargs)
    for row, video_frames in sorted(local_rows(clip).items()):
      if row < len(chunk):
        write(first + row, video_frames, fps)
    done = first + len(chunk)
    if log and len(prompts) > size:
      rate = (time.time() - start) / done
      log(
        f"[sample] {done}/{len(prompts)} videos ({rate:.2f} s/video, "
        f"{rate * (len(prompts) - done) / 60:.1f} min left)"
      )
  return fps


# ---------------------------------------------------------------------------------------------
# Inputs: images and videos from files, in model space at the base resolution.
# ---------------------------------------------------------------------------------------------


def read_image(path: str) -> np.ndarray:
  """An image file -> uint8 [h, w, 3], with a clear error for a missing or unreadable file."""
  from PIL import Image, UnidentifiedImageError

  try:
    with Image.open(path) as im:
      return np.asarray(im.convert("RGB"))
  except FileNotFoundError:
    raise errors.UserFileNotFoundError(f"input image {path!r} does not exist") from None
  except (UnidentifiedImageError, OSError) as e:
    raise errors.UserError(f"cannot read image {path!r}: {e}") from None


def decode_video_file(path: str, decode, what: str = "input video"):
  """`decode(the file's bytes)`, with one clear error for a missing file (`what` names it) and for
  one that cannot be decoded."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError:
    raise errors.UserFileNotFoundError(f"{what} {path!r} does not exist") from None
  try:
    return decode(data)
  except video_lib.UnreadableVideo as e:
    raise errors.UserError(f"cannot read video {path!r}: {e}") from None


def read_video(path: str) -> tuple[np.ndarray, np.ndarray]:
  """A video file -> (uint8 [n, h, w, 3], float64 [n] presentation times in seconds from the first
  frame), with a clear error for an unreadable file."""
  return decode_video_file(path, video_lib.decode_timed)


def frames_in_time(
  frames: np.ndarray, times: np.ndarray, *, count: int | None = None, fps: float | None = None
) -> tuple[np.ndarray, float]:
  """A decoded video's frames at evenly spaced real times (its timestamps, so a variable frame
  rate plays at real speed) -> (frames, their fps): `count` frames over its whole span, or the
  span at `fps` (default: the video's average real rate)."""
  span = float(times[-1] - times[0]) if len(times) > 1 else 0.0
  if count is not None:
    rate = (count - 1) / span if span > 0 and count > 1 else (fps or 1.0)
    wanted = np.linspace(0.0, span, count)
  else:
    rate = fps or ((len(times) - 1) / span if span > 0 else 1.0)
    wanted = np.arange(int(np.floor(span * rate + 1e-6)) + 1) / rate
  return frames[video_lib.indices_at_times(times - times[0], wanted)], float(rate)


def to_model_frames(frames: np.ndarray, resolution: int, num_frames: int | None = None):
  """uint8 frames [n, h, w, 3] -> model space [n', r, r, 3] (centre crop; `num_frames` evenly
  spaced frames when given)."""
  if num_frames is not None:
    frames = frames[np.round(np.linspace(0, len(frames) - 1, num_frames)).astype(int)]
  frames = video_lib.resize_and_crop(frames, resolution)
  return frames.astype(np.float32) / 127.5 - 1.0


def place_batch(x, n: int, batch_sharding: jax.sharding.NamedSharding) -> jax.Array:
  """One batch input (leading dim b <= n) padded to n rows (the last repeated) and split by
  `batch_sharding`. Arrays already on its devices stay there; host arrays (the same on every
  process) are placed slice by slice."""
  if isinstance(x, jax.Array) and x.sharding.device_set == batch_sharding.device_set:
    if x.shape[0] < n:
      x = jnp.concatenate([x, jnp.repeat(x[-1:], n - x.shape[0], axis=0)])
    return jax.device_put(x, batch_sharding)
  x = np.asarray(x)
  if x.shape[0] < n:
    x = np.concatenate([x, np.repeat(x[-1:], n - x.shape[0], axis=0)])
  return jax.make_array_from_callback(x.shape, batch_sharding, lambda index: x[index])


def to_host(x) -> np.ndarray:
  """A batch output as one host array on every process (gathered from the others' devices when
  several processes hold parts of it)."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(x)
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def local_rows(x) -> dict[int, np.ndarray]:
  """{row: host array} of the rows of a batch output `x` [b, ...] that this process's devices hold
  (every row with one process): each process writes its own share of the videos."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return dict(enumerate(np.asarray(x)))
  rows = {}
  for shard in x.addressable_shards:
    start = shard.index[0].start or 0
    data = np.asarray(shard.data)
    for i in range(data.shape[0]):
      rows.setdefault(start + i, data[i])
  return rows


def default_checkpoints(root: str = DEFAULT_ROOT) -> dict[str, str]:
  return {name: f"{root}/{name}" for name in CASCADE}


def frames_for_display(clip) -> np.ndarray:
  from mav_jax.utils import video_io

  return video_io.to_uint8(np.asarray(clip))


def scale_for(resolution: int) -> int:
  """Nearest-neighbour upscale so small outputs are visible (at least ~192 px)."""
  return max(1, math.ceil(192 / resolution))
