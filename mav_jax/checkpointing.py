"""Orbax checkpoints of a run: train state, data iterator state and config, in `<workdir>/checkpoints`.

Saves are asynchronous and keep the last `checkpoint.keep`. The data iterator is saved with Grain's
own handler (one file per host), so a resumed run reads exactly the batches an uninterrupted run
would have. Restoring takes an abstract state whose leaves carry the *target* shardings, so a run
saved with one mesh and strategy restores onto another. Paths may be local or `gs://` (etils.epath).
"""

import contextlib
import functools
import gc
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from mav_jax import errors

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
    _write_noise.install()
    self.directory = _path(workdir) / "checkpoints"
    self._saving: int | None = None  # the step of the last save started
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
    """Saves at `step` (always: the caller decides when); returns before the write completes.

    Raises CheckpointWriteError (one line: the cause and the path) if this or the previous
    background write failed for a storage reason."""
    self.wait()  # Orbax waits for the previous save anyway; a failure here is that save's
    self._saving = step
    try:
      self._manager.save(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=grain.checkpoint.CheckpointSave(data_iterator),
          config=ocp.args.JsonSave(json.loads(config.to_json_best_effort())),
        ),
        force=True,
      )
    except Exception as e:
      self._raise_write_error(e)

  def _raise_write_error(self, e: BaseException):
    """Raises CheckpointWriteError for a storage failure (space, permissions, a read-only or
    failing file system); any other failure (a lost host's collective, a bug) is raised as it is:
    it is a fault with a traceback, and the multi-host handler names lost hosts."""
    cause = _root_cause(e)
    text = str(cause)
    if not isinstance(cause, OSError) and not any(m in text for m in _STORAGE_MESSAGES):
      raise e
    which = f"checkpoint {self._saving}" if self._saving is not None else "a checkpoint"
    held = f" (the writers' own messages: {_write_noise.path})" if _write_noise.count else ""
    raise errors.CheckpointWriteError(
      f"{which} could not be written to {self.directory}: {_describe(e, 500)}. The run stopped; the newest complete checkpoint is "
      f"{self._newest_complete()}. Fix the storage (space, permissions) and rerun the same "
      f"command to resume from it{held}"
    ) from e

  def _newest_complete(self) -> str:
    try:
      self._manager.reload()
      step = self._manager.latest_step()
    except Exception:  # the storage may be what failed
      return "unknown"
    return f"step {step}" if step is not None else "none (the run restarts from scratch)"

  def check_for_errors(self) -> None:
    """Raises CheckpointWriteError if the background write of the last save has failed (cheap:
    the loop calls it every step, so the run stops at the first step after a failure is known)."""
    try:
      self._manager.check_for_errors()
    except Exception as e:
      self._raise_write_error(e)

  def restore_latest(self, abstract_state: Any, data_iterator=None, log=print):
    """(state, step) of the newest checkpoint that restores, or None if the workdir has none.

    A checkpoint of another model (different parameter shapes) is a UserError: the config changed,
    not the checkpoint. A step whose files cannot be read (removed, truncated, corrupt) is moved to
    `<workdir>/checkpoints_damaged/` (never deleted) with one line saying why, and the next older
    step is tried; if none is intact, a UserError says where the damaged ones went."""
    moved = []
    while (step := self._manager.latest_step()) is not None:
      self._check_same_model(step, abstract_state)
      with _stderr_held() as held:
        try:
          return self.restore(step, abstract_state, data_iterator), step
        except errors.UserError:
          raise
        except Exception as e:
          failure = _describe(e)
          held.failed = True
          del e
      where = self._move_aside(step)
      moved.append(str(where))
      if jax.process_index() == 0 and held.text:
        (where / "restore_errors.log").write_bytes(held.text)
      log(
        f"[train] checkpoint {step} cannot be restored ({failure}); moved it to {where} (the "
        f"reader's messages are in restore_errors.log there); trying the previous one"
      )
      self._manager.reload()
    if moved:
      raise errors.UserError(
        f"no intact checkpoint in {self.directory}; the damaged ones were moved to {moved}. To "
        f"start this run afresh, rerun the command; to keep them apart, use a new --workdir"
      )
    return None

  def _check_same_model(self, step: int, abstract_state: Any) -> None:
    try:
      saved = self._manager.item_metadata(step)["state"]
      have = {_key(p): tuple(m.shape) for p, m in jax.tree_util.tree_leaves_with_path(saved)}
    except Exception:  # unreadable metadata: damage, which restore then reports
      return
    want = {_key(p): tuple(a.shape) for p, a in jax.tree_util.tree_leaves_with_path(abstract_state)}
    if have and want != have:
      diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
      raise errors.UserError(
        f"checkpoint {step} in {self.directory} was made by a different model than this config "
        f"builds (first differences: {diff[:5]}); use a new --workdir, or the config the run was "
        f"started with (saved in {self.directory / str(step) / 'config'})"
      )

  def _move_aside(self, step: int) -> epath.Path:
    """Moves a damaged step folder to <workdir>/checkpoints_damaged/<step>-<time> (process 0)."""
    source = self.directory / str(step)
    target = self.directory.parent / "checkpoints_damaged" / f"{step}-{int(time.time())}"
    if jax.process_index() == 0:
      target.parent.mkdir(parents=True, exist_ok=True)
      try:
        source.rename(target)
      except OSError:  # object stores rename folders by copying
        for f in source.rglob("*"):
          if f.is_file():
            (target / f.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
            f.copy(target / f.relative_to(source))
        source.rmtree()
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f"mav_jax_move_aside_{step}")
    return target

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
      raise errors.UserError(
        f"checkpoint {step} in {self.directory} holds the data-iterator state of "
        f"{int(next(iter(saved)))} host(s) but this run has {jax.process_count()}; resume with the "
        f"same number of hosts (the model state itself restores onto any mesh)"
      )

  def reached_preemption(self, step: int) -> bool:
    return self._manager.reached_preemption(step)

  def wait(self) -> None:
    """Waits for the background save; raises CheckpointWriteError if storage failed it."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:
      self._raise_write_error(e)

  def close(self) -> None:
    self._manager.close()


class _HeldStderr:
  failed: bool = False  # set by the caller once the exception is handled (and released)
  text: bytes = b""


@contextlib.contextmanager
def _stderr_held():
  """Holds what is written to stderr (file descriptor 2: C++ and other threads too) during a
  restore. If the caller marks it failed, what was written is kept in `.text` instead of shown:
  a damaged file makes Orbax's reader threads and its abandoned coroutines print a traceback for
  every array (over a thousand for a small model), burying the one line that says what happened.
  Otherwise it is written out unchanged. The caller must not hold the exception when the block
  ends: its frames keep the coroutines alive, and they print when collected."""
  held = _HeldStderr()
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as tmp:
    os.dup2(tmp.fileno(), 2)
    try:
      yield held
      if held.failed:
        gc.collect()  # abandoned coroutines and futures report themselves when collected
        size = -1
        while size != os.fstat(tmp.fileno()).st_size:  # and reader threads finish printing
          size = os.fstat(tmp.fileno()).st_size
          time.sleep(0.3)
          gc.collect()
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      tmp.seek(0)
      text = tmp.read()
      if held.failed:
        held.text = text
      elif text:
        os.write(2, text)


class _WriteNoise(logging.Filter):
  """Keeps what a failing background write prints off stderr, in a local file instead.

  When storage fails under an asynchronous save, every Orbax writer thread logs the failure with a
  traceback, asyncio logs each abandoned write task when it is collected (up to the interpreter's
  exit), and TensorStore's completion callbacks, finding Orbax's event loop already closed, report
  `RuntimeError: Event loop is closed` through `sys.unraisablehook`: 15-190 tracebacks in a
  600 KB-tmpfs run, before and after the one line that says what happened. Those records (Orbax's
  and asyncio's warnings and errors whose text names a storage failure, and the closed-loop
  reports) go to `<tmp>/mav_jax-checkpoint-messages-<pid>.log`, which the error line names.
  Once such a failure has been recorded, the `coroutine ... was never awaited` warnings that the
  abandoned write coroutines raise when the interpreter collects them at exit (after the error
  line, too late for any Python hook: the interpreter prints them itself) are filtered out, and
  the file says so. Anything else (a lost host, a bug) is printed as before."""

  def __init__(self):
    super().__init__()
    self.path = os.path.join(
      tempfile.gettempdir(), f"mav_jax-checkpoint-messages-{os.getpid()}.log"
    )
    self.count = 0
    self._previous_hook = None

  def install(self) -> None:
    if self._previous_hook is not None:
      return
    self._previous_hook = sys.unraisablehook
    sys.unraisablehook = self._unraisable
    for name in ("absl", "asyncio"):  # Orbax logs through absl
      logging.getLogger(name).addFilter(self)

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.WARNING:
      return True
    if record.name != "asyncio" and f"{os.sep}orbax{os.sep}" not in record.pathname:
      return True
    text = record.getMessage()
    if record.exc_info:
      text += "\n" + logging.Formatter().formatException(record.exc_info)
    storage = record.exc_info and isinstance(_root_cause(record.exc_info[1]), OSError)
    if not storage and not any(m in text for m in _STORAGE_MESSAGES):
      return True
    self._write(f"{record.levelname} {record.pathname}:{record.lineno} {text}")
    return False

  def _unraisable(self, unraisable) -> None:
    if isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(
      unraisable.exc_value
    ):
      import traceback

      self._write("".join(traceback.format_exception(unraisable.exc_value)))
      return
    self._previous_hook(unraisable)

  def _write(self, text: str) -> None:
    if not self.count:
      warnings.filterwarnings("ignore", r"coroutine '.*' was never awaited", RuntimeWarning)
      text += (
        "\n(from here on, 'coroutine ... was never awaited' warnings, the abandoned writes "
        "collected at exit, are not shown)"
      )
    self.count += 1
    try:
      with open(self.path, "a") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text.rstrip()}\n\n")
    except OSError:  # the local disk is what is full: the error line still says what failed
      pass


_write_noise = _WriteNoise()


def _root_cause(e: BaseException) -> BaseException:
  """The innermost exception of a chain (Orbax wraps the storage's error several times)."""
  seen = set()
  while id(e) not in seen:
    seen.add(id(e))
    inner = e.__cause__ or e.__context__
    if inner is None:
      break
    e = inner
  return e


def _describe(e: BaseException, limit: int = 300) -> str:
  """'Type: first line' of the innermost exception of `e`'s chain."""
  cause = _root_cause(e)
  return f"{type(cause).__name__}: {(str(cause).strip().splitlines() or [''])[0][:limit]}"


# What a storage failure says when it does not arrive as an OSError (TensorStore's status codes).
_STORAGE_MESSAGES = (
  "RESOURCE_EXHAUSTED",
  "PERMISSION_DENIED",
  "No space left",
  "Permission denied",
  "Read-only file system",
  "quota",
)


def _key(path) -> str:
  """A tree path as 'params/Dense_0/kernel', whatever the containers (dataclass, dict)."""
  return jax.tree_util.keystr(path, simple=True, separator="/")


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
    raise errors.UserFileNotFoundError(
      f"no checkpoint found under {path}: expected a training workdir (with checkpoints/<step>), "
      f"a step folder, or a model exported by mav_jax.export"
    )
  return root / str(steps[-1])


def _restore(directory: epath.Path, item: str | None, shardings: Any = None, arrays: bool = True):
  """Restores an Orbax tree (`item`: one entry of it); only the chosen arrays are read: a training
  state's optimizer state (twice the parameters) and its other parameters are never read nor
  allocated. Without `shardings`, as numpy arrays on this host (their saved dtypes); with them, as
  global jax.Arrays with those shardings, this host reading only the slices its devices hold.
  `arrays=False` reads the metadata alone: a tree of objects with `.shape` and `.dtype`.

  A folder whose files cannot be read (truncated, removed, corrupt) is a UserError naming it."""
  if not directory.exists():
    raise errors.UserFileNotFoundError(f"{directory} does not exist")
  checkpointer = ocp.PyTreeCheckpointer()
  failure = missing = differences = None
  with _stderr_held() as held:
    try:
      saved = checkpointer.metadata(directory).item_metadata.tree
      if item is not None and item not in saved:
        missing = sorted(saved)
      elif not arrays:
        restored = saved if item is None else saved[item]
      else:
        chosen = saved if item is None else saved[item]
        args, differences = _restore_args(chosen, shardings)
        if not differences:
          restored = _restore_chosen(checkpointer, directory, chosen, args, item)
    except Exception as e:
      failure = _describe(e)
      held.failed = True
      del e
    finally:
      checkpointer.close()
  if failure is not None:
    raise errors.UserError(
      f"{directory} cannot be read: a file in it is damaged or missing ({failure}); export the "
      f"model again (python -m mav_jax.export) or copy it again"
    )
  if missing is not None:
    raise errors.UserError(f"{directory} holds no {item!r}: it holds {', '.join(missing)}")
  if differences:
    raise errors.UserError(
      f"{directory}: the saved parameters are not those of the target model (do the configs "
      f"match?); first differences: {differences[:10]}"
    )
  return restored


def _restore_args(chosen: Any, shardings: Any) -> tuple[Any, list[str]]:
  """(RestoreArgs for each saved leaf of `chosen`, the paths where `shardings` differs from it).

  Without shardings each array is read whole into host memory, not onto a device: independent of
  the saving mesh, and a large model's parameters need no device that holds them all. With them
  each is a global array in its sharding, of the saved shape and dtype (strict: never resized)."""
  if shardings is None:
    return jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), chosen), []
  targets = {_key(p): s for p, s in jax.tree_util.tree_leaves_with_path(shardings)}
  saved = {_key(p) for p, _ in jax.tree_util.tree_leaves_with_path(chosen)}
  differences = sorted(
    [f"{k}: saved, not in the target" for k in saved - set(targets)]
    + [f"{k}: in the target, not saved" for k in set(targets) - saved]
  )
  if differences:
    return None, differences
  args = jax.tree_util.tree_map_with_path(
    lambda p, m: ocp.ArrayRestoreArgs(
      sharding=targets[_key(p)], global_shape=tuple(m.shape), dtype=m.dtype
    ),
    chosen,
  )
  return args, []


def _restore_chosen(checkpointer, directory: epath.Path, chosen: Any, args: Any, item: str | None):
  """`chosen` (all of the saved tree, or its entry `item`) read as `args` say.

  Orbax's partial restore: the target and its RestoreArgs name only the chosen subtree, and the
  leaves outside it are skipped (never deserialized)."""
  if item is None:
    return checkpointer.restore(directory, args=ocp.args.PyTreeRestore(chosen, restore_args=args))
  restored = checkpointer.restore(
    directory,
    args=ocp.args.PyTreeRestore({item: chosen}, restore_args={item: args}, partial_restore=True),
  )
  return restored[item]


def is_exported_model(path: str) -> bool:
  root = _path(path)
  return (root / MODEL_CONFIG).exists() and (root / MODEL_PARAMS).exists()


def _params_folder(path: str, item: str) -> tuple[epath.Path, str | None]:
  """(the Orbax folder of `path`'s parameters, the entry of it to read: None for all of it)."""
  if is_exported_model(path):
    return _path(path) / MODEL_PARAMS, None  # an exported model holds its parameters only
  return _latest_step_dir(path) / "state", item


def restore_params(path: str, item: str = "params", shardings: Any = None) -> Any:
  """Parameters of a checkpoint, for starting one stage from another or sampling.

  `path` is a training workdir (its latest step), a step folder (`item`: "params" or
  "ema_params"), or a model exported by `mav_jax.export` (its only parameters; `item` is unused).
  Only those parameters are read, never the optimizer state.

  Without `shardings`: host numpy arrays, each whole. With `shardings`, a tree of
  jax.sharding.Shardings (NamedShardings) with exactly the saved parameters' paths (any
  containers: dicts, FrozenDicts; `params_metadata` gives the paths): global jax.Arrays with those
  shardings, each host reading only the slices its devices hold (on a pod, no host holds the whole
  model). Shapes and dtypes are the saved ones. Paths that differ are a UserError listing them.
  """
  return _restore(*_params_folder(path, item), shardings)


def params_metadata(path: str, item: str = "params") -> Any:
  """The saved parameters' tree as `restore_params` would return it, each leaf an object with
  `.shape` and `.dtype`, read from the checkpoint's metadata alone (no array is read)."""
  return _restore(*_params_folder(path, item), arrays=False)


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
  a three-axis mesh (data, fsdp, tensor) gains fsdp_transpose; removed options at their neutral
  values are dropped, and any other value is an error."""
  data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
  for section, fields in _REMOVED.items():
    for field, neutral in fields.items():
      if field not in data.get(section, {}):
        continue
      value = data[section].pop(field)
      if neutral is not None and value != neutral and value != _tuples(neutral):
        raise errors.UserError(
          f"this checkpoint was made with {section}.{field} = {value!r}, an option mav_jax no "
          f"longer has; run it with mav_jax at commit {_LAST_WITH_REMOVED} "
          f"(git checkout {_LAST_WITH_REMOVED})"
        )
  mesh = data.get("mesh", {})
  if list(mesh.get("axes", [])) == ["data", "fsdp", "tensor"]:  # before fsdp_transpose
    (d, f, t), (dd, df, dt) = mesh.get("ici", (1, -1, 1)), mesh.get("dcn", (1, 1, 1))
    mesh.update(
      axes=["data", "fsdp", "fsdp_transpose", "tensor"],
      ici=[d, f, -1 if f == -1 else 1, t],  # the devices fsdp took, split for the model
      dcn=[dd, df, 1, dt],
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
    raise errors.UserFileNotFoundError(f"{file.parent}: the checkpoint holds no config")
  return config_from_json(json.loads(file.read_text()))


def load_model(path: str) -> tuple[ml_collections.ConfigDict, Any]:
  """(config, host numpy params) of an exported model or of a training run's EMA parameters."""
  if is_exported_model(path):
    return load_config(path), restore_params(path)
  return load_config(path), restore_params(path, "ema_params")


def check_new_output(output: str, overwrite: bool) -> None:
  """A UserFileExistsError if `output` exists and `overwrite` is not set (before any work)."""
  if _path(output).exists() and not overwrite:
    raise errors.UserFileExistsError(
      f"{output} already exists; choose another output or pass --overwrite"
    )


def write_model(
  output: str,
  config: ml_collections.ConfigDict,
  params: Any,
  overwrite: bool = False,
  files: dict[str, bytes] | None = None,
) -> None:
  """Writes a model checkpoint folder: `params/` (Orbax), `config.json` and `files` (relative path
  -> contents, e.g. a tokenizer). The folder is written beside `output` first and swapped in, so a
  failed write leaves `output` as it was; an existing `output` is replaced only with `overwrite`."""
  check_new_output(output, overwrite)
  out = _path(output)
  staging = out.parent / f"{out.name}.staging"  # beside the output, never inside it
  if staging.exists():
    staging.rmtree()
  staging.mkdir(parents=True)
  for name, data in (files or {}).items():
    (staging / name).parent.mkdir(parents=True, exist_ok=True)
    (staging / name).write_bytes(data)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(staging / MODEL_PARAMS, params)
  checkpointer.wait_until_finished()
  checkpointer.close()
  (staging / MODEL_CONFIG).write_text(config.to_json_best_effort(indent=2, sort_keys=True))
  if out.exists():
    out.rmtree()
  staging.rename(out)


def export_model(source: str, output: str, overwrite: bool = False, item: str = "ema_params"):
  """Writes `source`'s (a training workdir or step folder) parameters and config as a model
  checkpoint in `output`: `params/` (Orbax) and `config.json`, no optimizer state or data state
  (`write_model`: staged, an existing `output` replaced only with `overwrite`).
  """
  check_new_output(output, overwrite)
  config = load_config(source)
  params = restore_params(source, item)
  write_model(output, config, params, overwrite)
  return config, params
