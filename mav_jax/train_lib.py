"""The trainer: one `train_and_evaluate(config, workdir)` for every stage, from one CPU to a pod.

Sections: set-up (mesh, model, sharded state) | resume | the jitted train step | the loop
(data, metrics, samples, checkpoints, preemption).
"""

import functools
import math
import os
import signal
import tempfile
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, metrics, periodic_actions
from etils import epath
from flax import traverse_util
from jax.experimental import multihost_utils

from mav_jax import checkpointing, stages, train_state
from mav_jax.data import pipeline as data_pipeline
from mav_jax.models import inflate_image_params
from mav_jax.parallel import mesh as mesh_lib
from mav_jax.parallel import sharding
from mav_jax.utils import video_io

TrainState = train_state.TrainState


# ---------------------------------------------------------------------------------------------
# Set-up: the mesh, the model, and a train state initialised directly into its shardings.
# ---------------------------------------------------------------------------------------------


def create_state_fn(model, stage, config, tx):
  """rng -> boxed TrainState (params boxed with logical names, so shardings can be derived)."""

  def create(rng):
    params = stage.init(model, config, rng)
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      ema_params=params,
      opt_state=tx.init(params),
      rng=jax.random.key_data(jax.random.key(config.seed)),
    )

  return create


def setup(config, devices=None):
  """(mesh, model, stage, tx, state shardings, abstract state, create fn) for a config."""
  mesh = mesh_lib.create_mesh(config.mesh, devices)
  stage = stages.get_stage(config.stage)
  model = stage.make_model(config)
  tx = train_state.make_optimizer(config)
  create = create_state_fn(model, stage, config, tx)
  boxed = jax.eval_shape(create, jax.random.key(config.seed))
  shardings = sharding.tree_shardings(
    boxed, sharding.strategy_rules(config.sharding.strategy), mesh
  )
  abstract = nn.unbox(boxed)
  return mesh, model, stage, tx, shardings, abstract, create


def init_state(create, shardings, config) -> TrainState:
  """A fresh state, created by one jitted function straight into its shardings (never whole)."""
  init = jax.jit(lambda rng: nn.unbox(create(rng)), out_shardings=shardings)
  return init(jax.random.key(config.seed))


def state_from_image_checkpoint(state: TrainState, shardings, path: str) -> TrainState:
  """Loads an image-stage checkpoint's params into a fresh video state (temporal layers stay at
  their identity init); EMA starts from the same values, the optimizer from scratch.

  The image parameters are read on each host (parameters only, not the optimizer state), each
  array placed straight into the sharding of the video parameter it becomes; the merge runs under
  jit with the video shardings, so the video model is never gathered onto one host.
  """
  image = traverse_util.flatten_dict(checkpointing.restore_params(path))
  target = traverse_util.flatten_dict(shardings.params)
  missing = sorted("/".join(p) for p in image if p not in target)
  if missing:
    raise ValueError(
      f"{path}: image parameters missing from the video model (do the configs match?): "
      f"{missing[:10]}"
    )
  placed = sharding.place_host_tree(
    traverse_util.unflatten_dict(image),
    traverse_util.unflatten_dict({p: target[p] for p in image}),
  )

  def merge(image_params, video_params):
    return inflate_image_params(image_params, video_params)[0]

  # Two outputs: params and EMA are donated to the step separately and must not share buffers.
  params, ema = jax.jit(
    lambda i, v: (merge(i, v), merge(i, v)), out_shardings=(shardings.params, shardings.ema_params)
  )(placed, state.params)
  logging.info("initialised the video model from the image checkpoint %s", path)
  return state.replace(params=params, ema_params=ema)


# ---------------------------------------------------------------------------------------------
# The train step: pure, jitted once with explicit shardings, state donated.
# ---------------------------------------------------------------------------------------------


def _microbatches(batch, k: int):
  """[b, ...] -> [k, b/k, ...], example i of micro-batch j being b-index i*k + j (keeps each
  device's examples on that device)."""

  def split(x):
    if x.shape[0] % k:
      raise ValueError(f"batch {x.shape[0]} is not divisible by grad_accum_steps {k}")
    return jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)

  return jax.tree.map(split, batch)


def make_train_step(model, stage, config, tx):
  """train_step(state, batch) -> (state, metrics); non-finite steps leave the state unchanged."""
  k = config.train.grad_accum_steps
  if k < 1:
    raise ValueError(f"train.grad_accum_steps must be >= 1, got {k}")
  schedule = train_state.learning_rate_schedule(config.optimizer, config.train.num_steps)

  def loss_and_grads(params, batch, rng, frozen):
    loss = functools.partial(stage.loss_fn, model, config, frozen=frozen)
    return jax.value_and_grad(loss, has_aux=True)(params, batch, rng)

  def train_step(state: TrainState, batch, frozen=None):
    """`frozen`: parameters of frozen models the loss reads (e.g. CLIP's), not trained."""
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    if k == 1:
      (loss, _), grads = loss_and_grads(state.params, batch, rng, frozen)
    else:

      def body(carry, inputs):
        i, micro = inputs
        (micro_loss, _), g = loss_and_grads(state.params, micro, jax.random.fold_in(rng, i), frozen)
        return jax.tree.map(jnp.add, carry, (micro_loss, g)), None

      zeros = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, state.params))
      (loss, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(k), _microbatches(batch, k)))
      loss, grads = loss / k, jax.tree.map(lambda g: g / k, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = jax.tree.map(jnp.add, state.params, updates)
    grad_norm = train_state.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new = state.replace(
      step=state.step + 1,
      params=params,
      ema_params=train_state.ema_update(
        state.ema_params, params, state.step, config.train.ema_decay
      ),
      opt_state=opt_state,
    )
    # A non-finite step changes nothing (the host then stops the run): no checkpoint holds NaN.
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
    metrics = {
      "loss": loss,
      "grad_norm": grad_norm,
      "param_norm": train_state.global_norm(params),
      "update_norm": train_state.global_norm(updates),
      "learning_rate": schedule(state.step),
      "finite": finite,
    }
    return new, metrics

  return train_step


def jit_train_step(train_step, mesh, state_shardings, frozen_shardings=None):
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(
    train_step,
    in_shardings=(state_shardings, sharding.batch_sharding(mesh), frozen_shardings),
    out_shardings=(state_shardings, replicated),
    donate_argnums=0,
  )


# ---------------------------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------------------------


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
  """Training metrics averaged over each logging interval."""

  loss: metrics.Average.from_output("loss")
  grad_norm: metrics.Average.from_output("grad_norm")
  param_norm: metrics.LastValue.from_output("param_norm")
  update_norm: metrics.Average.from_output("update_norm")
  learning_rate: metrics.LastValue.from_output("learning_rate")


class _Preemption:
  """Turns SIGTERM (what a preempted VM or a scheduler sends) into a flag the loop reads.

  Single-process runs only: with several processes, `jax.distributed` owns SIGTERM and its
  preemption service makes every host agree on the step to stop at (`reached_preemption`), so all
  of them save the same checkpoint; a per-host flag would let hosts stop at different steps.
  """

  def __init__(self):
    self.requested = False
    self._previous = None
    if jax.process_count() == 1:
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM: saving a checkpoint and stopping")
    self.requested = True

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _write_samples(workdir, writer, step, videos, fps):
  frames = video_io.to_uint8(np.asarray(videos))
  folder = epath.Path(workdir) / "samples"
  folder.mkdir(parents=True, exist_ok=True)
  scale = max(1, 128 // frames.shape[2])
  sheets = []
  for i, clip in enumerate(frames):
    with tempfile.TemporaryDirectory() as tmp:  # PyAV writes local files; epath copies anywhere
      local = os.path.join(tmp, "sample.gif")
      video_io.write_video(local, clip, fps=fps, scale=scale)
      (folder / f"step_{step:07d}_{i}.gif").write_bytes(epath.Path(local).read_bytes())
    sheets.append(np.concatenate(list(clip), axis=1))
  writer.write_images(step, {"samples": np.stack(sheets)})


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, devices=None
) -> dict[str, Any]:
  """Trains `config.stage` in `workdir`, resuming from its latest checkpoint if there is one.

  `devices` (default: all) are the devices the mesh is built over.

  Returns {"step": last step, "losses": {step: loss}, "grad_norms": {step: norm} of this run,
  "state": the final state}.
  """
  t = config.train
  workdir = str(workdir)
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  mesh, model, stage, tx, shardings, abstract, create = setup(config, devices)
  logging.info("mesh %s, strategy %s", dict(mesh.shape), config.sharding.strategy)

  global_batch = config.batch_size
  batch_sharding = sharding.batch_sharding(mesh)
  shards = math.prod(mesh.shape[a] for a in batch_sharding.spec[0])
  if shards % jax.process_count():
    raise ValueError(
      f"the batch is split over {shards} device groups ({batch_sharding.spec[0]}), which cannot "
      f"be spread over {jax.process_count()} hosts; make data x fsdp a multiple of the host count"
    )
  if global_batch % (shards * t.grad_accum_steps):
    raise ValueError(
      f"batch_size {global_batch} must divide by data x fsdp ({shards}) x "
      f"train.grad_accum_steps ({t.grad_accum_steps})"
    )
  train_data, data_stats = data_pipeline.pipeline_from_config(
    config.data, "train", batch_size=global_batch // jax.process_count()
  )
  data_iter = iter(train_data)
  checkpointer = checkpointing.Checkpointer(workdir, t.checkpoint_keep, t.async_checkpoints)

  # Resume order: (1) the latest checkpoint in workdir (state and data iterator); else (2) a fresh
  # state, loaded from an image-stage checkpoint if `train.init_from` names one; else (3) fresh.
  latest = checkpointer.latest_step()
  if latest is not None:
    target = checkpointing.abstract_with_shardings(abstract, shardings)
    state = checkpointer.restore(latest, target, data_iter)
    logging.info("resumed from step %d", latest)
  else:
    state = init_state(create, shardings, config)
    if t.init_from:
      state = state_from_image_checkpoint(state, shardings, t.init_from)
  n_params = sum(x.size for x in jax.tree.leaves(abstract.params))
  print(
    f"[train] {config.stage} ({config.variant}, {config.data.kind}): {n_params:,} parameters; "
    f"mesh {dict(mesh.shape)}; strategy {config.sharding.strategy}; "
    f"{'resumed at step ' + str(latest) if latest is not None else 'fresh start'}",
    flush=True,
  )

  # Frozen models the stage reads (CLIP for the prior, D^t and ↑F), sharded like trained params.
  frozen = stage.load_frozen(model, config, mesh) if hasattr(stage, "load_frozen") else {}
  frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen)
  step_fn = jit_train_step(
    make_train_step(model, stage, config, tx), mesh, shardings, frozen_shardings
  )
  n_samples = t.num_samples

  @jax.jit
  def sample_fn(params, batch, rng, frozen):
    batch = jax.tree.map(lambda x: x[:n_samples], batch)
    return stage.sample(model, config, params, batch, rng, frozen)

  sample_batch = None
  report = periodic_actions.ReportProgress(
    num_train_steps=t.num_steps, writer=writer, every_steps=t.log_every
  )
  hooks = [report]
  if t.profile and jax.process_index() == 0:
    hooks.append(periodic_actions.Profile(logdir=workdir, num_profile_steps=3))
  preemption = _Preemption()
  losses, grad_norms, pending, step, interval = {}, {}, None, int(state.step), [None]
  try:
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.activation_rules()):
      while step < t.num_steps:
        batch = data_pipeline.global_batch(next(data_iter), mesh, batch_sharding.spec[0])
        if sample_batch is None:
          sample_batch = batch  # samples are conditioned on the first batch's clips
        state, metrics = step_fn(state, batch, frozen)
        step += 1
        # The previous step's metrics are fetched now, so the host never waits on the device.
        if pending is not None:
          _check_and_log(*pending, writer, losses, grad_norms, t, interval)
        pending = (step, metrics)
        for hook in hooks:
          hook(step)
        if t.sample_every and hasattr(stage, "sample") and step % t.sample_every == 0:
          videos = sample_fn(state.ema_params, sample_batch, jax.random.key(step), frozen)
          videos = multihost_utils.process_allgather(videos, tiled=True)
          if jax.process_index() == 0:
            _write_samples(workdir, writer, step, videos, config.sampling.fps)
        stop = preemption.requested or checkpointer.reached_preemption(step)
        if step % t.checkpoint_every == 0 or step == t.num_steps or stop:
          # Never save after a non-finite step.
          _check_and_log(*pending, writer, losses, grad_norms, t, interval)
          pending = None
          checkpointer.save(step, state, data_iter, config)
          if t.kill_at_step == step:  # crash-recovery tests: die the hardest way after saving
            checkpointer.wait()
            os.kill(os.getpid(), signal.SIGKILL)
        if stop:
          print(f"[train] preempted at step {step}: checkpoint saved", flush=True)
          break
      if pending is not None:
        _check_and_log(*pending, writer, losses, grad_norms, t, interval)
  finally:
    preemption.restore()
    checkpointer.wait()
    checkpointer.close()
    writer.flush()
  logging.info("data: %d examples made, %d skipped", data_stats.valid, data_stats.skipped)
  return {"step": step, "losses": losses, "grad_norms": grad_norms, "state": state}


def _check_and_log(step, step_metrics, writer, losses, grad_norms, t, interval):
  """Stops on a non-finite step; averages metrics over the interval and writes them."""
  values = jax.device_get(step_metrics)
  if not bool(values["finite"]):
    raise FloatingPointError(
      f"non-finite loss ({float(values['loss'])}) or gradient at step {step}; the state was left "
      f"as it was before that step and no checkpoint holds it. Lower optimizer.learning_rate or "
      f"optimizer.grad_clip, or check the data."
    )
  losses[step] = float(values["loss"])
  grad_norms[step] = float(values["grad_norm"])
  update = TrainMetrics.single_from_model_output(
    **{k: v for k, v in values.items() if k != "finite"}
  )
  interval[0] = update if interval[0] is None else interval[0].merge(update)
  if step % t.log_every == 0 or step == t.num_steps:
    scalars = {k: float(v) for k, v in interval[0].compute().items()}
    interval[0] = None
    writer.write_scalars(step, scalars)
    # The loss printed is this step's, in full (runs can be compared); TensorBoard gets averages.
    print(
      f"[train] step {step}/{t.num_steps} loss {losses[step]!r} (avg {scalars['loss']:.4f}) "
      f"grad_norm {scalars['grad_norm']:.3f} lr {scalars['learning_rate']:.2e}",
      flush=True,
    )
