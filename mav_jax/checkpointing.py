"""Orbax checkpoints of a run: train state, data iterator state and config, in `<workdir>/checkpoints`.

Saves are asynchronous and keep the last `checkpoint.keep`. The data iterator is saved with Grain's
own handler (one file per host), so a resumed run reads exactly the batches an uninterrupted run
would have. Restoring takes an abstract state whose leaves carry the *target* shardings, so a run
saved with one mesh and strategy restores onto another. Paths may be local or `gs://` (etils.epath).
"""

import functools
import json
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

# Replica-parallel saving splits each replicated array into per-replica slices, each slice a small
# compiled program; below 1 MiB per slice that costs more than the parallel write gains (hundreds of
# compilations for a small model), so small arrays are written whole by one replica.
_MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL = 1 << 20


@functools.cache
def _register_array_handler() -> None:
  ocp.type_handlers.register_type_handler(
    jax.Array,
    ocp.type_handlers.ArrayHandler(
      min_slice_bytes_for_replica_parallel=_MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL
    ),
    override=True,
  )


class Checkpointer:
  """Saves and restores (state, data iterator, config) by step.

  Args:
    workdir: the run's folder (local or gs://).
    keep: how many checkpoints to keep.
    async_save: save in the background while training goes on.
  """

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
    _register_array_handler()
    self.directory = epath.Path(workdir) / "checkpoints"
    self._manager = ocp.CheckpointManager(
      self.directory,
      item_handlers={
        "state": ocp.StandardCheckpointHandler(),
        "data": grain.checkpoint.CheckpointHandler(),
        "config": ocp.JsonCheckpointHandler(),
      },
      options=ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True
      ),
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_iterator, config) -> None:
    """Saves at `step` (always: the caller decides when); returns before the write completes."""
    self._manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator),
        config=ocp.args.JsonSave(json.loads(config.to_json_best_effort())),
      ),
      force=True,
    )

  def restore(self, step: int, abstract_state: Any, data_iterator=None) -> Any:
    """The state at `step`, placed as `abstract_state`'s shardings say; restores the iterator too."""
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      self._check_host_count(step)
      args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    return self._manager.restore(step, args=ocp.args.Composite(**args))["state"]

  def _check_host_count(self, step: int) -> None:
    """The data iterator was saved per host: resuming needs as many hosts as saved it."""
    folder = self.directory / str(step) / "data"
    saved = {p.name.split("-of-")[-1].split(".")[0] for p in folder.glob("process_*-of-*.json")}
    if len(saved) == 1 and int(next(iter(saved))) != jax.process_count():
      raise ValueError(
        f"checkpoint {step} in {self.directory} holds the data-iterator state of "
        f"{int(next(iter(saved)))} host(s) but this run has {jax.process_count()}; resume with the "
        f"same number of hosts (the model state itself restores onto any mesh)"
      )

  def reached_preemption(self, step: int) -> bool:
    return self._manager.reached_preemption(step)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def abstract_with_shardings(abstract_tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the shardings a restored tree should have."""
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings
  )


def restore_params(path: str) -> Any:
  """Only the `params` of a checkpoint (a step folder or a run's workdir: its latest step), as
  host numpy arrays: for starting a video stage from an image stage."""
  root = epath.Path(path)
  if (root / "checkpoints").exists():
    root = root / "checkpoints"
  if not (root / "state").exists():
    steps = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit())
    if not steps:
      raise FileNotFoundError(f"no checkpoint found under {path}")
    root = root / str(steps[-1])
  checkpointer = ocp.StandardCheckpointer()
  saved = checkpointer.metadata(root / "state").item_metadata
  # Each array whole on this host's first device: independent of the mesh it was saved from.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved)
  restored = checkpointer.restore(root / "state", target)
  return jax.tree.map(np.asarray, restored["params"])
