"""The trainer: one `train_and_evaluate(config, workdir)` for every stage, from one CPU to a pod.

The mesh, the sharded state and the jitted step are `mav_jax.train_step`'s; this module is the loop
(data, resume, metrics, samples, checkpoints, preemption).
"""

import os
import signal
import sys
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
from jax.experimental import multihost_utils

from mav_jax import checkpointing, errors, paths, train_state
from mav_jax import lease as lease_lib
from mav_jax.data import pipeline as data_pipeline
from mav_jax.parallel import sharding
from mav_jax.train_step import (
  check_state_split,
  init_state,
  jit_train_step,
  make_train_step,
  setup,
  state_from_image_checkpoint,
)
from mav_jax.utils import video_io

# ---------------------------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------------------------


def say(message: str) -> None:
  """Prints one line in one write: the log's lines stay whole beside the metric writer's thread
  (print writes the text and its newline separately)."""
  sys.stdout.write(message + "\n")
  sys.stdout.flush()


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


def _all_agree(ok: bool) -> bool:
  """Process 0's answer on every process (the lease is process 0's)."""
  if jax.process_count() == 1:
    return ok
  return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))


def _take_lease(workdir: str, force: bool) -> "lease_lib.Lease | None":
  """Process 0 takes the workdir's lease; every process stops if it cannot."""
  held, failure = None, None
  if jax.process_index() == 0:
    held = lease_lib.Lease(workdir, force=force, log=lambda m: say(f"[train] {m}"))
    try:
      held.acquire()
    except lease_lib.WorkdirInUseError as e:
      held, failure = None, e
  if not _all_agree(failure is None):
    raise failure or lease_lib.WorkdirInUseError(
      f"{workdir} is in use by another run (process 0 names it)"
    )
  return held


def _check_lease(held) -> None:
  """Before a save: stops every process if another run has taken the workdir over."""
  failure = None
  if held is not None:
    try:
      held.check()
    except lease_lib.WorkdirInUseError as e:
      failure = e
  if not _all_agree(failure is None):
    raise failure or lease_lib.WorkdirInUseError("another run took over this workdir")


# (field, lowest allowed value, what it means) for the loop's integer settings.
_TRAIN_MINIMUMS = (
  ("num_steps", 1, "steps to train"),
  ("grad_accum_steps", 1, "micro-batches per step"),
  ("log_every", 1, "steps between metric logs"),
  ("checkpoint_every", 1, "steps between checkpoints"),
  ("checkpoint_keep", 1, "checkpoints kept"),
  ("sample_every", 0, "steps between sample writes, 0 for never"),
  ("num_samples", 1, "videos per sample write"),
)


def check_train_config(config: ml_collections.ConfigDict) -> None:
  """Raises a UserError naming the first `config.train` value the loop cannot run with (its
  field, its value and what is allowed); run before any model is built."""
  t = config.train
  for name, lowest, meaning in _TRAIN_MINIMUMS:
    value = t[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
      raise errors.UserError(
        f"--config.train.{name}={value!r}: must be an integer >= {lowest} ({meaning})"
      )
  if not 0.0 <= t.ema_decay <= 1.0:
    raise errors.UserError(
      f"--config.train.ema_decay={t.ema_decay!r}: must be in [0, 1] (e.g. 0.9999)"
    )
  if t.trainable not in train_state.TRAINABLE:
    raise errors.UserError(
      f"--config.train.trainable={t.trainable!r}: choose one of {train_state.TRAINABLE}"
    )


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, devices=None, force_unlock: bool = False
) -> dict[str, Any]:
  """Trains `config.stage` in `workdir`, resuming from its latest checkpoint if there is one.

  `devices` (default: all) are the devices the mesh is built over. The run holds the workdir's
  lease (mav_jax.lease) throughout; `force_unlock` takes it from a run that still holds it.

  Returns {"step": last step, "losses": {step: loss}, "grad_norms": {step: norm} of this run,
  "state": the final state}.
  """
  check_train_config(config)
  workdir = str(workdir)
  if epath.Path(workdir).exists() and not epath.Path(workdir).is_dir():
    raise errors.UserError(f"--workdir {workdir} is a file; pass a folder (new or a run's)")
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  held = _take_lease(workdir, force_unlock)
  try:
    return _train(config, workdir, devices, held)
  finally:
    if held is not None:
      held.release()


def _train(config, workdir, devices, held) -> dict[str, Any]:
  t = config.train
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  mesh, model, stage, tx, shardings, abstract, create = setup(config, devices)
  logging.info("mesh %s, strategy %s", dict(mesh.shape), config.sharding.strategy)
  check_state_split(config, abstract, shardings, mesh, lambda m: say(f"[train] {m}"))

  global_batch = config.batch_size
  batch_sharding = sharding.batch_sharding(mesh)
  shards = sharding.batch_shards(mesh)
  if shards % jax.process_count():
    raise errors.UserError(
      f"the batch is split over {shards} device groups ({batch_sharding.spec[0]}), which cannot "
      f"be spread over {jax.process_count()} hosts; make data x fsdp a multiple of the host count"
    )
  if global_batch % (shards * t.grad_accum_steps):
    raise errors.UserError(
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
  target = checkpointing.abstract_with_shardings(abstract, shardings)
  restored = checkpointer.restore_latest(target, data_iter, log=say)
  latest = None
  if restored is not None:
    state, latest = restored
    logging.info("resumed from step %d", latest)
  else:
    state = init_state(create, shardings, config)
    if t.init_from:
      state = state_from_image_checkpoint(state, shardings, paths.resolve(t.init_from))
  n_params = sum(x.size for x in jax.tree.leaves(abstract.params))
  say(
    f"[train] {config.stage} ({config.variant}, {config.data.kind}): {n_params:,} parameters; "
    f"mesh {dict(mesh.shape)}; strategy {config.sharding.strategy}; "
    f"{'resumed at step ' + str(latest) if latest is not None else 'fresh start'}",
  )

  # Frozen models the stage reads (CLIP for the prior, D^t and ↑F), sharded like trained params.
  frozen = stage.load_frozen(model, config, mesh) if hasattr(stage, "load_frozen") else {}
  frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen)
  step_fn = jit_train_step(
    make_train_step(model, stage, config, tx, shardings.params), mesh, shardings, frozen_shardings
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
  losses, grad_norms, step, interval = {}, {}, int(state.step), [None]
  # Each step's metrics stay on the device until a step that reads them: a logging step, a
  # checkpoint step (a non-finite step must stop the run before a save) and the last. Other steps
  # send nothing to the host, so it never waits on the device.
  recorder = _Recorder(mesh, min(t.log_every, t.checkpoint_every, max(t.num_steps - step, 1)))
  try:
    with (
      jax.set_mesh(mesh),
      nn.logical_axis_rules(sharding.activation_rules(config.sharding.strategy)),
    ):
      while step < t.num_steps:
        batch = data_pipeline.global_batch(next(data_iter), mesh, batch_sharding.spec[0])
        if sample_batch is None:
          sample_batch = batch  # samples are conditioned on the first batch's clips
        state, metrics = step_fn(state, batch, frozen)
        step += 1
        recorder.add(step, metrics)
        checkpointer.check_for_errors()  # a failed background save stops the run here
        if held is not None and held.lost_to is not None and jax.process_count() == 1:
          held.check()  # taken over (--force_unlock): stop now, without saving
        if step % t.log_every == 0 or step == t.num_steps:
          _check_and_log(recorder.read(), writer, losses, grad_norms, t, interval)
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
          _check_and_log(recorder.read(), writer, losses, grad_norms, t, interval)
          _check_lease(held)
          checkpointer.save(step, state, data_iter, config)
        if stop:
          say(f"[train] preempted at step {step}: checkpoint saved")
          break
  except BaseException:
    # Already failing: finish or abandon the background save quietly, the first error is the one
    # to report.
    preemption.restore()
    try:
      checkpointer.wait()
      checkpointer.close()
    except Exception as e:
      logging.warning("while stopping: %s", e)
    writer.flush()
    raise
  preemption.restore()
  checkpointer.wait()
  checkpointer.close()
  writer.flush()
  logging.info("data: %d examples made, %d skipped", data_stats.valid, data_stats.skipped)
  if step >= t.num_steps:
    say(f"[train] finished at step {step} (checkpoint saved)")
  return {"step": step, "losses": losses, "grad_norms": grad_norms, "state": state}


class _Recorder:
  """Each step's metrics, kept on the device (row i of a [size] buffer per metric) until read.

  `size` must be at least the number of steps between reads.
  """

  def __init__(self, mesh, size: int):
    self._size, self._rows, self._steps = size, None, []

    def record(rows, metrics, i):
      if rows is None:
        rows = jax.tree.map(lambda v: jnp.zeros((size,) + v.shape, v.dtype), metrics)
      return jax.tree.map(lambda r, v: r.at[i].set(v), rows, metrics)

    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    self._record = jax.jit(record, out_shardings=replicated)

  def add(self, step: int, metrics) -> None:
    if len(self._steps) == self._size:
      raise AssertionError(f"{self._size} steps' metrics unread at step {step}")
    self._rows = self._record(self._rows, metrics, len(self._steps))
    self._steps.append(step)

  def read(self) -> list[tuple[int, dict[str, np.ndarray]]]:
    """[(step, {metric: value})] of the steps since the last read, fetched in one transfer."""
    if not self._steps:
      return []
    values = jax.device_get(self._rows)
    rows = [(s, {k: v[i] for k, v in values.items()}) for i, s in enumerate(self._steps)]
    self._steps = []
    return rows


def _check_and_log(rows, writer, losses, grad_norms, t, interval):
  """Stops at the first non-finite step of `rows` (`_Recorder.read`); records each step's loss and
  gradient norm; averages the metrics over the logging interval and writes them at its end."""
  for step, values in rows:
    if not bool(values["finite"]):
      raise FloatingPointError(
        f"non-finite loss ({float(values['loss'])}) or gradient at step {step}; the state was left "
        f"as it was before that step and no checkpoint holds it. Lower optimizer.learning_rate or "
        f"optimizer.grad_clip, or check the data."
      )
    losses[step] = float(values["loss"])
    grad_norms[step] = float(values["grad_norm"])
  if not rows:
    return
  step, last = rows[-1]
  averaged = {k: np.stack([v[k] for _, v in rows]) for k in ("loss", "grad_norm", "update_norm")}
  update = TrainMetrics.single_from_model_output(
    **averaged, param_norm=last["param_norm"], learning_rate=last["learning_rate"]
  )
  interval[0] = update if interval[0] is None else interval[0].merge(update)
  if step % t.log_every == 0 or step == t.num_steps:
    scalars = {k: float(v) for k, v in interval[0].compute().items()}
    interval[0] = None
    writer.write_scalars(step, scalars)
    # The loss printed is this step's, in full (runs can be compared); TensorBoard gets averages.
    say(
      f"[train] step {step}/{t.num_steps} loss {losses[step]!r} (avg {scalars['loss']:.4f}) "
      f"grad_norm {scalars['grad_norm']:.3f} lr {scalars['learning_rate']:.2e}",
    )
