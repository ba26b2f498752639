"""Orbax checkpoints of a run: train state, data iterator state and config, in `<workdir>/checkpoints`.

Saves are asynchronous and keep the last `checkpoint.keep`. The data iterator is saved with Grain's
own handler (one file per host), so a resumed run reads exactly the batches an uninterrupted run
would have. Restoring takes an abstract state whose leaves carry the *target* shardings, so a run
saved with one mesh and strategy restores onto another. Paths may be local or `gs://` (etils.epath).
"""

import functools
import json
import os
from typing import Any

import grain
import jax
import ml_collections
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


def _path(path) -> epath.Path:
  """An absolute epath (Orbax rejects relative local paths); gs:// and other URLs as they are."""
  text = str(path)
  return epath.Path(text if "://" in text else os.path.abspath(text))


class Checkpointer:
  """Saves and restores (state, data iterator, config) by step.

  Args:
    workdir: the run's folder (local or gs://).
    keep: how many checkpoints to keep.
    async_save: save in the background while training goes on.
  """

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
    _register_array_handler()
    self.directory = _path(workdir) / "checkpoints"
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


def _latest_step_dir(path: str) -> epath.Path:
  """The step folder of a training checkpoint: `path` itself, or a workdir's latest step."""
  root = _path(path)
  if (root / "checkpoints").exists():
    root = root / "checkpoints"
  if (root / "state").exists():
    return root
  steps = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.exists() else []
  if not steps:
    raise FileNotFoundError(
      f"no checkpoint found under {path}: expected a training workdir (with checkpoints/<step>), "
      f"a step folder, or a model exported by mav_jax.export"
    )
  return root / str(steps[-1])


def _restore_host(directory: epath.Path, item: str | None = None) -> Any:
  """Restores an Orbax tree whole onto this host as numpy arrays; `item` picks one entry of it."""
  checkpointer = ocp.StandardCheckpointer()
  saved = checkpointer.metadata(directory).item_metadata
  # Each array whole on this host's first device: independent of the mesh it was saved from.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved)
  restored = jax.tree.map(np.asarray, checkpointer.restore(directory, target))
  checkpointer.close()
  return restored if item is None else restored[item]


def is_exported_model(path: str) -> bool:
  root = _path(path)
  return (root / MODEL_CONFIG).exists() and (root / MODEL_PARAMS).exists()


def restore_params(path: str, item: str = "params") -> Any:
  """Parameters of a checkpoint as host numpy arrays, for starting one stage from another.

  `path` is a training workdir (its latest step), a step folder (`item`: "params" or
  "ema_params"), or a model exported by `mav_jax.export` (its only parameters).
  """
  if is_exported_model(path):
    return _restore_host(_path(path) / MODEL_PARAMS)
  return _restore_host(_latest_step_dir(path) / "state", item)


# ---------------------------------------------------------------------------------------------
# Model checkpoints: the parameters a stage samples with, and the config that built them.
# ---------------------------------------------------------------------------------------------

MODEL_CONFIG = "config.json"
MODEL_PARAMS = "params"


def _tuples(value):
  """JSON lists back to the tuples configs use (a JSON round trip turns tuples into lists)."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


# Options a config of an earlier mav_jax may hold that are gone (docs/benchmarks.md, CPU
# throughput; docs/text_motion.md, what did not work), with their neutral values: at those values a
# model built without them is the same; at any other the checkpoint needs that earlier mav_jax.
_REMOVED = {
  "model": {
    "spatial_conv": "conv",
    "temporal_conv": "conv",
    "narrow_upsample": False,
    "temporal_downsample": [],
    "level_res_blocks": [],
    "text_motion_field": False,
    "text_field_pool": None,  # any: it only shaped text_motion_field
  },
  "conditioning": {"caption_only_dropout": 0.0, "embedding_frame": "random"},
  "sampling": {"frame_lead": 0.0},
  "train": {"kill_at_step": 0},
}
_LAST_WITH_REMOVED = "020500d"  # the last commit with every removed option


def upgrade_config(data: dict) -> dict:
  """A config (as JSON data) from an earlier mav_jax in today's form: model.temporal_text_attention,
  text_vocab_size and text_motion_conv become model.text_motion (enabled, vocab_size, conv_size);
  removed options at their neutral values are dropped, and any other value is an error."""
  data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
  for section, fields in _REMOVED.items():
    for field, neutral in fields.items():
      if field not in data.get(section, {}):
        continue
      value = data[section].pop(field)
      if neutral is not None and value != neutral and value != _tuples(neutral):
        raise ValueError(
          f"this checkpoint was made with {section}.{field} = {value!r}, an option mav_jax no "
          f"longer has; run it with mav_jax at commit {_LAST_WITH_REMOVED} "
          f"(git checkout {_LAST_WITH_REMOVED})"
        )
  model = data.get("model", {})
  if "temporal_text_attention" in model or (
    "channel_mults" in model and "text_motion" not in model  # a UNet from before the option
  ):
    model["text_motion"] = {
      "enabled": model.pop("temporal_text_attention", False),
      "vocab_size": model.pop("text_vocab_size", 0),
      "conv_size": model.pop("text_motion_conv", 0),
    }
  return data


def config_from_json(data: dict) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(_tuples(upgrade_config(data)))


def load_config(path: str) -> ml_collections.ConfigDict:
  """The stage config a model checkpoint or training workdir was made with."""
  if is_exported_model(path):
    return config_from_json(json.loads((_path(path) / MODEL_CONFIG).read_text()))
  # JsonCheckpointHandler's file; the folder also holds Orbax's commit marker.
  file = _latest_step_dir(path) / "config" / "metadata"
  if not file.exists():
    raise FileNotFoundError(f"{file.parent}: the checkpoint holds no config")
  return config_from_json(json.loads(file.read_text()))


def load_model(path: str) -> tuple[ml_collections.ConfigDict, Any]:
  """(config, host numpy params) of an exported model or of a training run's EMA parameters."""
  if is_exported_model(path):
    return load_config(path), restore_params(path)
  return load_config(path), restore_params(path, "ema_params")


def export_model(source: str, output: str, overwrite: bool = False, item: str = "ema_params"):
  """Writes `source`'s (a training workdir or step folder) parameters and config as a model
  checkpoint in `output`: `params/` (Orbax) and `config.json`, no optimizer state or data state.

  The write goes to a staging folder first and is swapped in, so a failed export leaves `output`
  as it was; an existing `output` is replaced only with `overwrite`.
  """
  out = _path(output)
  if out.exists() and not overwrite:
    raise FileExistsError(f"{output} already exists; choose another output or pass --overwrite")
  config = load_config(source)
  params = restore_params(source, item)
  staging = out.parent / f"{out.name}.staging"  # beside the output, never inside it
  if staging.exists():
    staging.rmtree()
  staging.mkdir(parents=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(staging / MODEL_PARAMS, params)
  checkpointer.wait_until_finished()
  checkpointer.close()
  (staging / MODEL_CONFIG).write_text(config.to_json_best_effort(indent=2, sort_keys=True))
  if out.exists():
    out.rmtree()
  staging.rename(out)
  return config, params
