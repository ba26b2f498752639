"""The sharding-strategy benchmark: compile a stage's real train step (and one sampling step) for a
mesh and strategy, on local devices or a Cloud TPU topology, and read what the compiler says.

For each case (strategy, mesh) the train step is the one `mav_jax.train` runs
(`train_step.make_train_step` + `jit_train_step`, same shardings, donated state); the sampling step
is the stage's sampler with one denoising step (guidance included). Inputs are abstract
(`jax.ShapeDtypeStruct` with shardings), so nothing is allocated to compile; on local devices the
step is then also run and timed on one real batch.

Figures per device: the state's shards (parameters, EMA, optimizer) from the shardings themselves;
arguments, outputs, temporaries (activations) and code from `memory_analysis()`; FLOPs and the
estimated time (TPU) from `cost_analysis()`; collectives from the optimised HLO.
"""

import dataclasses
import math
import os
import statistics
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mav_jax import checkpointing, errors, stages, train_step
from mav_jax.data import pipeline as data_pipeline
from mav_jax.models import attention as attention_lib
from mav_jax.models import unet
from mav_jax.parallel import compiled_stats, sharding
from mav_jax.parallel import targets as targets_lib
from mav_jax.stages import common as stage_common

MESH_AXES = ("data", "fsdp", "fsdp_transpose", "tensor")


@dataclasses.dataclass(frozen=True)
class Case:
  """One strategy on one mesh: `ici` / `dcn` sizes over MESH_AXES (one -1 inferred, or the two
  FSDP axes both -1: split for the model, `sharding.best_fsdp_split`)."""

  strategy: str
  ici: tuple[int, ...]
  dcn: tuple[int, ...] = (1, 1, 1, 1)


def parse_mesh(text: str) -> tuple[int, ...]:
  """ "1x-1x-1x4" -> (1, -1, -1, 4): sizes of (data, fsdp, fsdp_transpose, tensor). Three sizes
  are (data, fsdp, tensor) with no fsdp_transpose (the benchmark's meshes before it had one)."""
  try:
    sizes = tuple(int(s) for s in text.lower().split("x"))
  except ValueError:
    sizes = ()
  if len(sizes) == len(MESH_AXES) - 1:
    sizes = (sizes[0], sizes[1], 1, sizes[2])
  if len(sizes) != len(MESH_AXES):
    raise errors.UserError(
      f"mesh {text!r}: give the sizes of {' x '.join(MESH_AXES)} like 1x-1x-1x4 (-1: the rest; "
      f"both FSDP axes -1: split for the model), or of data x fsdp x tensor like 1x-1x4"
    )
  return sizes


def default_cases(
  strategies: Sequence[str],
  num_devices: int,
  num_slices: int = 1,
  tensor: int = 4,
  meshes: Sequence[tuple[int, ...]] = (),
) -> list[Case]:
  """Each strategy on its natural mesh, or on every mesh of `meshes` when given.

  Natural meshes: data_parallel and fsdp put every device of a slice on the two FSDP axes, split
  for the model (the batch is split over all of them either way; only fsdp also splits the
  parameters); tensor and fsdp_tensor use a "tensor" axis of `tensor` devices and the rest on the
  FSDP axes. Across slices the "data" axis spans the slices (the parameters are never split over
  the data-centre network).
  """
  for name in strategies:
    sharding.strategy_rules(name)  # unknown names fail here
  per_slice = num_devices // num_slices
  dcn = (-1, 1, 1, 1)
  cases = []
  for name in strategies:
    if meshes:
      cases += [Case(name, tuple(m), dcn) for m in meshes]
    elif "tensor" in name:
      t = math.gcd(tensor, per_slice)
      cases.append(Case(name, (1, -1, -1, t), dcn))
    else:
      cases.append(Case(name, (1, -1, -1, 1), dcn))
  return cases


def configure(config: ml_collections.ConfigDict, case: Case, batch_size: int | None):
  """A copy of `config` with the case's mesh and strategy (and batch size, when given)."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.mesh.axes = MESH_AXES
  config.mesh.ici = tuple(case.ici)
  config.mesh.dcn = tuple(case.dcn)
  config.sharding.strategy = case.strategy
  if batch_size:
    config.batch_size = batch_size
  return config


# ---------------------------------------------------------------------------------------------
# Inputs: one real example of the stage's data, repeated to the global batch.
# ---------------------------------------------------------------------------------------------


def example_batch(config) -> dict[str, np.ndarray]:
  """One example of the stage's training data (from its real pipeline), batch axis leading."""
  data, _ = data_pipeline.pipeline_from_config(config.data, "train", batch_size=1)
  return next(iter(data))


def host_batch(example: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
  return {k: np.repeat(np.asarray(v), size, axis=0) for k, v in example.items()}


def abstract_batch(example, size: int, batch_sharding) -> dict[str, jax.ShapeDtypeStruct]:
  return {
    k: jax.ShapeDtypeStruct((size,) + np.shape(v)[1:], np.asarray(v).dtype, sharding=batch_sharding)
    for k, v in example.items()
  }


def frozen_models(stage, model, config, mesh, clip_config=None) -> tuple[Any, Any, Any]:
  """(abstract frozen params with shardings, their shardings, init fn for random real ones).

  CLIP-conditioned stages read a CLIP of `clip_config`'s shape when given (no weights needed),
  else that of the checkpoint `conditioning.clip` names.
  """
  if not hasattr(stage, "load_frozen") or not getattr(model, "uses_clip", True):
    return {}, {}, lambda: {}
  if clip_config is not None:
    stage_common.use_clip(model, stage_common.FrozenClip("", clip_config))
  clip = model.clip
  abstract, shardings = clip.shardings(mesh, config.sharding.strategy)
  init = clip.init_fn()

  def make():
    fn = jax.jit(lambda rng: nn.unbox(init(rng)), out_shardings=shardings)
    return {"clip": fn(jax.random.key(1))}

  return (
    {"clip": checkpointing.abstract_with_shardings(abstract, shardings)},
    {"clip": shardings},
    make,
  )


def _shard_bytes(abstract, shardings) -> int:
  """Bytes one device holds of a tree placed with `shardings`."""
  total = 0
  for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings), strict=True):
    total += math.prod(s.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize
  return total


def _tree_bytes(abstract) -> int:
  return sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(abstract))


# ---------------------------------------------------------------------------------------------
# One case.
# ---------------------------------------------------------------------------------------------


def _one_step_sampler(stage, model, config):
  """fn(params, batch, rng, frozen) running the stage's sampler for one denoising step, or None."""
  one = ml_collections.ConfigDict(config.to_dict())
  one.sampling.num_steps = 1
  if stage is stages.STAGES["prior"]:
    sampling = one.sampling

    def prior_step(params, batch, rng, frozen):
      return stage.generate(
        model,
        one,
        params,
        frozen["clip"],
        batch["tokens"],
        batch["token_mask"],
        rng,
        sampling=sampling,
      )

    return prior_step
  if hasattr(stage, "sample"):

    def video_step(params, batch, rng, frozen):
      return stage.sample(model, one, params, batch, rng, frozen)

    return video_step
  return None


def _timed(run, repeats: int) -> float:
  """Median seconds of `run()` (which blocks) over `repeats`, after one warm-up call."""
  run()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def parse_options(items: Sequence[str]) -> dict[str, Any]:
  """["name=value", ...] -> XLA compiler options; "true" / "false" become booleans."""
  options = {}
  for item in items:
    name, sep, value = item.partition("=")
    if not sep or not name:
      raise errors.UserError(f"compiler option {item!r} is not name=value")
    lowered = value.lower()
    options[name] = {"true": True, "false": False}.get(lowered, value)
  return options


def format_options(options: dict[str, Any] | None) -> str:
  """The options as the command line spells them ("" for none)."""
  return ",".join(
    f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in (options or {}).items()
  )


def mesh_name(mesh) -> str:
  """ "data x fsdp x fsdp_transpose x tensor" sizes, e.g. "1x4x1x2"."""
  return "x".join(str(mesh.shape.get(a, 1)) for a in MESH_AXES)


def _row(target, config, case, mesh, step, stats, compile_s, extra) -> dict[str, Any]:
  """One results row; `stats` None (a --memory_only plan): the compiler's columns are None."""
  chip = target.chip
  if stats is None:
    stats = compiled_stats.CompiledStats(
      **{f.name: None for f in dataclasses.fields(compiled_stats.CompiledStats)}
    )
    stats = dataclasses.replace(stats, collectives={}, while_loops=0)
  row = {
    "target": target.name,
    "chip": chip.name,
    "devices": target.num_devices,
    "slices": target.num_slices,
    "stage": config.stage,
    "variant": config.variant,
    "step": step,
    "strategy": case.strategy,
    "mesh": mesh_name(mesh),
    "batch": config.batch_size,
    "compile_s": None if compile_s is None else round(compile_s, 2),
    "argument_bytes": stats.argument_bytes,
    "output_bytes": stats.output_bytes,
    "alias_bytes": stats.alias_bytes,
    "temp_bytes": stats.temp_bytes,
    "code_bytes": stats.code_bytes,
    "total_bytes": None if stats.argument_bytes is None else stats.total_bytes,
    "hbm_bytes": chip.hbm_bytes,
    "fits": None
    if chip.hbm_bytes is None or stats.argument_bytes is None
    else stats.total_bytes <= chip.hbm_bytes,
    "flops": stats.flops,
    "bytes_accessed": stats.bytes_accessed,
    "estimated_s": stats.estimated_seconds,
    "model_flops": None,
    "estimated_mfu": None,
    "measured_s": None,
    "measured_mfu": None,
    "collectives": stats.collectives,
    "while_loops": stats.while_loops,
  }
  row.update(extra)
  if row["model_flops"] and stats.estimated_seconds and chip.peak_flops:
    row["estimated_mfu"] = row["model_flops"] / stats.estimated_seconds / chip.peak_flops
  return row


def _programs(
  model,
  stage,
  config,
  tx,
  mesh,
  shardings,
  frozen_shardings,
  sampler,
  example,
  n,
  state_in,
  frozen_in,
):
  """{step: (jitted fn, abstract args)}: the train step as `mav_jax.train` jits it and, when
  `sampler` is given, one sampling step on `n` clips."""
  batch_spec = sharding.batch_sharding(mesh)
  step_fn = train_step.jit_train_step(
    train_step.make_train_step(model, stage, config, tx, shardings.params),
    mesh,
    shardings,
    frozen_shardings,
  )
  batch_in = abstract_batch(example, config.batch_size, batch_spec)
  out = {"train": (step_fn, (state_in, batch_in, frozen_in))}
  if sampler is not None:
    key_in = jax.eval_shape(lambda: jax.random.key(0))  # no concrete arrays on a topology
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    sample_jit = jax.jit(
      sampler, in_shardings=(shardings.params, batch_spec, replicated, frozen_shardings)
    )
    sample_in = abstract_batch(example, n, batch_spec)
    out["sample"] = (sample_jit, (state_in.params, sample_in, key_in, frozen_in))
  return out


_MODEL_FLOPS: dict[str, dict[str, float]] = {}


def model_flops(config, example, clip_config, n_sample, log) -> dict[str, float]:
  """{step: global FLOPs the model needs}: each step lowered (not compiled) for one local device
  with rematerialisation off, counted by XLA's cost analysis of the program before optimisation.
  MFU divides these by the time, so recomputation a remat policy adds is not counted as useful
  work (the compiled program's own FLOPs, `flops`, include it). Cached per config and batch."""
  key = f"{config.to_json()}|{clip_config.to_json() if clip_config else ''}|{n_sample}"
  if key in _MODEL_FLOPS:
    return _MODEL_FLOPS[key]
  plain = ml_collections.ConfigDict(config.to_dict())
  if "remat" in plain.get("model", {}):
    plain.model.remat = False
  one = configure(plain, Case("data_parallel", (1, 1, 1, 1)), None)
  try:
    devices = jax.local_devices(backend="cpu")[:1]
  except RuntimeError:  # JAX_PLATFORMS without cpu: lower for a local accelerator instead
    devices = jax.local_devices()[:1]
  mesh, model, stage, tx, shardings, abstract, _ = train_step.setup(one, devices)
  frozen_abstract, frozen_shardings, _ = frozen_models(stage, model, one, mesh, clip_config)
  sampler = _one_step_sampler(stage, model, one) if n_sample else None
  state_in = checkpointing.abstract_with_shardings(abstract, shardings)
  programs = _programs(
    model,
    stage,
    one,
    tx,
    mesh,
    shardings,
    frozen_shardings,
    sampler,
    example,
    n_sample,
    state_in,
    frozen_abstract,
  )
  out = {}
  start = time.perf_counter()
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.activation_rules("data_parallel")):
    for step, (fn, args) in programs.items():
      cost = fn.lower(*args).cost_analysis() or {}
      out[step] = float(cost.get("flops", 0.0)) or None
  log(
    f"[benchmark] {config.stage}:{config.variant}: model FLOPs (no remat, before optimisation) "
    + ", ".join(f"{k} {v / 1e12:.3f} T" for k, v in out.items() if v)
    + f" ({time.perf_counter() - start:.1f} s)"
  )
  _MODEL_FLOPS[key] = out
  return out


def run_case(
  config,
  case: Case,
  target: targets_lib.Target,
  *,
  batch_size: int | None = None,
  sample_batch: int | None = None,
  clip_config=None,
  include_sample: bool = True,
  repeats: int = 3,
  hlo_dir: str | None = None,
  compiler_options: dict[str, Any] | None = None,
  memory_only: bool = False,
  log=print,
) -> list[dict[str, Any]]:
  """Compiles (and on local devices times) the train step and the sampling step of one case.

  `memory_only`: no compile: one train row with the state's bytes per device (parameters, EMA,
  optimizer, frozen models: from the shardings alone, in seconds for any topology), the
  compiler's columns None. With `hlo_dir`, each compiled program's optimised HLO is written there as
  `<stage>_<variant>_<strategy>_<mesh>_<step>.hlo.txt.gz`. `compiler_options` go to XLA with
  every compile (e.g. {"xla_tpu_spmd_unroll_windowed_einsum": True}) and are recorded in the rows.
  """
  config = configure(config, case, batch_size)
  mesh, model, stage, tx, shardings, abstract, _ = train_step.setup(config, target.devices)
  devices = target.num_devices
  batch_spec = sharding.batch_sharding(mesh)
  shards = sharding.batch_shards(mesh)
  if config.batch_size % shards and not memory_only:
    raise errors.UserError(
      f"batch_size {config.batch_size} does not split over the {shards} data x fsdp shards of "
      f"mesh {dict(mesh.shape)}; pass --batch_size as a multiple of {shards}"
    )
  frozen_abstract, frozen_shardings, make_frozen = frozen_models(
    stage, model, config, mesh, clip_config
  )
  state_in = checkpointing.abstract_with_shardings(abstract, shardings)
  per_device = {
    "params_bytes": _shard_bytes(abstract.params, shardings.params),
    "ema_bytes": _shard_bytes(abstract.ema_params, shardings.ema_params),
    "opt_bytes": _shard_bytes(abstract.opt_state, shardings.opt_state),
    "frozen_bytes": _shard_bytes(frozen_abstract, frozen_shardings),
  }
  state_total = sum(
    _tree_bytes(t) for t in (abstract.params, abstract.ema_params, abstract.opt_state)
  )
  state_per_device = per_device["params_bytes"] + per_device["ema_bytes"] + per_device["opt_bytes"]
  common = dict(
    per_device,
    compiler_options=format_options(compiler_options),
    num_params=sum(math.prod(a.shape) for a in jax.tree.leaves(abstract.params)),
    state_total_bytes=state_total,
    # Per-device state over an even split of the whole state: 1.0 is a perfect split (FSDP's goal).
    state_split_ratio=state_per_device / (state_total / devices),
  )
  label = f"{config.stage}:{config.variant} {case.strategy} mesh {dict(mesh.shape)}"
  _, _, ratio, whole = sharding.state_report(abstract, shardings, case.strategy, mesh)
  named = sharding.describe_whole(whole)
  log(
    f"[benchmark] {label}: state {state_per_device / 2**30:.3f} GiB per device, "
    f"{common['state_split_ratio']:.3f}x an even split over all devices ({ratio:.3f}x over those "
    f"{case.strategy} shards it over); largest arrays left whole: {named}"
  )
  if memory_only:
    return [_row(target, config, case, mesh, "train", None, None, common)]
  example = example_batch(config)
  sampler = _one_step_sampler(stage, model, config) if include_sample else None
  n_sample = sample_batch or config.batch_size
  if sampler is not None and n_sample % shards:
    raise errors.UserError(
      f"--sample_batch {n_sample} must be a multiple of the {shards} batch shards"
    )
  needed = model_flops(config, example, clip_config, n_sample if sampler else None, log)
  rows = []
  programs = _programs(
    model,
    stage,
    config,
    tx,
    mesh,
    shardings,
    frozen_shardings,
    sampler,
    example,
    n_sample,
    state_in,
    frozen_abstract,
  )

  def hlo_path(step: str) -> str | None:
    if not hlo_dir:
      return None
    os.makedirs(hlo_dir, exist_ok=True)
    name = f"{config.stage}_{config.variant}_{case.strategy}_{mesh_name(mesh)}_{step}.hlo.txt.gz"
    return os.path.join(hlo_dir, name)

  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.activation_rules(case.strategy)):
    compiled = {}
    for step, (fn, args) in programs.items():
      log(f"[benchmark] {label}: compiling the {step} step")
      start = time.perf_counter()
      compiled[step] = fn.lower(*args).compile(compiler_options)
      compile_s = time.perf_counter() - start
      stats = compiled_stats.analyse(compiled[step], hlo_path(step))
      flops = needed.get(step)
      extra = dict(common, model_flops=flops / devices if flops else None)
      rows.append(_row(target, config, case, mesh, step, stats, compile_s, extra))
      if step == "sample":
        rows[-1]["batch"] = n_sample
      log(f"[benchmark] {label}: {step} step compiled in {compile_s:.1f} s")

    if target.runnable:
      create = train_step.create_state_fn(model, stage, config, tx)
      state = [train_step.init_state(create, shardings, config)]
      frozen = make_frozen()
      batch_spec = sharding.batch_sharding(mesh)

      def batch_of(size):
        return data_pipeline.global_batch(
          host_batch(example, size // jax.process_count()), mesh, batch_spec.spec[0]
        )

      batch = batch_of(config.batch_size)

      def train_once():
        state[0], metrics = compiled["train"](state[0], batch, frozen)
        jax.block_until_ready(metrics)

      rows[0]["measured_s"] = _timed(train_once, repeats)
      if "sample" in compiled:
        sample_data, params = batch_of(n_sample), state[0].params
        rows[1]["measured_s"] = _timed(
          lambda: jax.block_until_ready(
            compiled["sample"](params, sample_data, jax.random.key(0), frozen)
          ),
          repeats,
        )
      for row in rows:
        if target.chip.peak_flops and row["measured_s"] and row["model_flops"]:
          row["measured_mfu"] = row["model_flops"] / row["measured_s"] / target.chip.peak_flops
      log(
        f"[benchmark] {label}: "
        + ", ".join(f"{r['step']} {r['measured_s'] * 1e3:.1f} ms" for r in rows)
      )
  return rows


# ---------------------------------------------------------------------------------------------
# Factorised (pseudo-3D) against full 3D attention at the same size.
# ---------------------------------------------------------------------------------------------


def attention_sizes(config) -> list[dict[str, int]]:
  """(frames, height, width, channels, heads) of each attention level of a UNet stage config."""
  m, d = config.model, config.data
  levels = sorted(
    set(m.attention_levels) | ({len(m.channel_mults) - 1} if m.mid_attention else set())
  )
  out = []
  for level in levels:
    side = d.resolution // 2**level
    channels = m.channels * m.channel_mults[level]
    heads, head_dim = unet.attention_heads(channels, m.head_dim)
    out.append(
      dict(
        level=level,
        frames=d.num_frames,
        height=side,
        width=side,
        channels=channels,
        heads=heads,
        head_dim=head_dim,
      )
    )
  return out


class _Factorised(nn.Module):
  """Spatial attention per frame, then temporal attention per position (as Pseudo3DAttention)."""

  heads: int
  head_dim: int
  dtype: Any

  @nn.compact
  def __call__(self, x):
    b, f, h, w, c = x.shape
    kw = dict(num_heads=self.heads, head_dim=self.head_dim, dtype=self.dtype)
    t = x.reshape(b * f, h * w, c)
    t = t + attention_lib.MultiHeadAttention(**kw, name="spatial")(t)
    t = jnp.transpose(t.reshape(b, f, h, w, c), (0, 2, 3, 1, 4)).reshape(b * h * w, f, c)
    t = t + attention_lib.MultiHeadAttention(**kw, name="temporal")(t)
    return t


class _Full(nn.Module):
  """One self-attention over all f*h*w tokens of a clip."""

  heads: int
  head_dim: int
  dtype: Any

  @nn.compact
  def __call__(self, x):
    b, f, h, w, c = x.shape
    t = x.reshape(b, f * h * w, c)
    kw = dict(num_heads=self.heads, head_dim=self.head_dim, dtype=self.dtype)
    return t + attention_lib.MultiHeadAttention(**kw, name="full")(t)


def attention_comparison(config, target, batch: int = 1, log=print) -> list[dict[str, Any]]:
  """Forward + backward of factorised vs full 3D attention, compiled for one device of `target`,
  at every attention level of the config (batch `batch` clips)."""
  device = target.devices[0]
  one = jax.sharding.SingleDeviceSharding(device)
  dtype = jnp.dtype(config.model.dtype)
  rows = []
  for size in attention_sizes(config):
    shape = (batch, size["frames"], size["height"], size["width"], size["channels"])
    for kind, module in (
      ("factorised", _Factorised(size["heads"], size["head_dim"], dtype)),
      ("full_3d", _Full(size["heads"], size["head_dim"], dtype)),
    ):
      x = jax.ShapeDtypeStruct(shape, dtype, sharding=one)
      params = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros(shape, dtype))
      params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), params)

      def loss(p, x, module=module):
        return jnp.sum(module.apply(p, x).astype(jnp.float32))

      start = time.perf_counter()
      compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(params, x).compile()
      stats = compiled_stats.analyse(compiled)
      tokens = size["frames"] * size["height"] * size["width"]
      rows.append(
        dict(
          size,
          target=target.name,
          chip=target.chip.name,
          batch=batch,
          attention=kind,
          tokens=tokens,
          flops=stats.flops,
          temp_bytes=stats.temp_bytes,
          total_bytes=stats.total_bytes,
          estimated_s=stats.estimated_seconds,
          compile_s=round(time.perf_counter() - start, 2),
        )
      )
      log(
        f"[benchmark] attention level {size['level']} ({size['frames']}x{size['height']}x"
        f"{size['width']}x{size['channels']}) {kind}: {stats.flops / 1e9:.1f} GFLOP, "
        f"{stats.total_bytes / 2**20:.0f} MiB"
      )
  return rows
