r"""Sharding-strategy benchmark: memory, FLOPs, estimated/measured step time and collectives of a
stage's train step (and one sampling step) for each strategy and mesh, on this machine's devices or
compiled ahead of time for a Cloud TPU topology (needs `pip install -r requirements-tpu.txt`).

  # 8 fake CPU devices, every strategy, the tiny decoder (also times the steps):
  python -m mav_jax.benchmark --config configs/decoder.py:tiny --cpu_devices 8 \
      --output outputs/bench_cpu
  # The paper-sized D^t on a v5p pod slice, compiled here by the TPU compiler:
  python -m mav_jax.benchmark --config configs/decoder.py:paper --target v5p:4x4x4 \
      --clip_config configs/clip.py:base --output outputs/bench_v5p
  # Per-device state of every strategy on a 512-chip v5p pod, from shardings alone (seconds):
  python -m mav_jax.benchmark --config configs/decoder.py:paper --target v5p:8x8x8 \
      --clip_config configs/clip.py:base --memory_only --output outputs/plan_v5p_512
  # Factorised vs full 3D attention at the config's attention sizes:
  python -m mav_jax.benchmark --config configs/decoder.py:paper --target v5p:2x2x1 \
      --attention --output outputs/attention_v5p

Writes results.json (everything, collectives included), results.csv and memory_time.png (and
attention.csv / attention.json with --attention) to --output; an existing results file is kept
unless --overwrite. Compiler estimates and measured times are separate columns.
"""

import csv
import json
import os
import sys

from absl import flags
from ml_collections import config_flags

from mav_jax import errors
from mav_jax.utils import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Stage config, e.g. decoder.py:paper.")
_TARGET = flags.DEFINE_string(
  "target", "local", "'local' (this machine's devices) or a TPU topology: v5e:4x4, v5p:4x4x4, ..."
)
_SLICES = flags.DEFINE_integer("num_slices", 1, "TPU slices (multi-slice topologies).")
_STRATEGIES = flags.DEFINE_list(
  "strategies", ["data_parallel", "fsdp", "tensor", "fsdp_tensor"], "Sharding strategies."
)
_MESHES = flags.DEFINE_list(
  "meshes",
  [],
  "Meshes (data x fsdp x fsdp_transpose x tensor per slice, -1 = the rest; fsdp and "
  "fsdp_transpose both -1: split for the model), e.g. 1x-1x-1x1,1x64x4x1; three sizes are data x "
  "fsdp x tensor. Default: each strategy's natural mesh.",
)
_TENSOR = flags.DEFINE_integer("tensor", 4, "Tensor-parallel axis size of the natural meshes.")
_BATCH = flags.DEFINE_integer("batch_size", None, "Global batch (default: the config's).")
_SAMPLE_BATCH = flags.DEFINE_integer(
  "sample_batch", None, "Clips per sampling step (default: the train batch)."
)
_NO_SAMPLE = flags.DEFINE_bool("skip_sample", False, "Compile the train step only.")
_MEMORY_ONLY = flags.DEFINE_bool(
  "memory_only",
  False,
  "Compile nothing: the train state's bytes per device (parameters, EMA, optimizer, frozen "
  "models) and its split for each strategy, from the shardings alone (seconds, any topology).",
)
_ATTENTION = flags.DEFINE_bool(
  "attention", False, "Compare factorised with full 3D attention instead of the strategies."
)
_CLIP = config_flags.DEFINE_config_file(
  "clip_config",
  None,
  "Shape of the frozen CLIP (e.g. configs/clip.py:base); default: the config "
  "of the checkpoint conditioning.clip names. No weights are needed.",
)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per step on local devices (median).")
_OUTPUT = flags.DEFINE_string("output", "outputs/benchmark", "Folder for the results.")
_SAVE_HLO = flags.DEFINE_bool(
  "save_hlo",
  False,
  "Also write each compiled program's optimised HLO to <output>/hlo/ (gzip text), to read the "
  "collectives and loops behind a cell's figures.",
)
_COMPILER_OPTIONS = flags.DEFINE_list(
  "compiler_options",
  [],
  "XLA options for every compile, name=value (e.g. xla_tpu_spmd_unroll_windowed_einsum=true, "
  "which unrolls the TPU compiler's collective-matmul loops so their FLOPs count in full).",
)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace results already in --output.")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", None, "Fake this many CPU devices (local).")
_MERGE = flags.DEFINE_list(
  "merge",
  [],
  "Instead of compiling: merge the results of these output folders (e.g. one compile per process "
  "on a small host) into --output.",
)

_CSV_COLUMNS = (
  "target chip devices slices stage variant step strategy mesh batch num_params params_bytes "
  "ema_bytes opt_bytes frozen_bytes state_total_bytes state_split_ratio argument_bytes "
  "output_bytes alias_bytes temp_bytes code_bytes total_bytes hbm_bytes fits flops "
  "model_flops bytes_accessed estimated_s estimated_mfu measured_s measured_mfu compile_s while_loops "
  "compiler_options"
).split()


def _gib(n) -> str:
  return "-" if n is None else f"{n / 2**30:.2f}"


def _collective_summary(collectives) -> str:
  short = {
    "all-reduce": "AR",
    "all-gather": "AG",
    "reduce-scatter": "RS",
    "all-to-all": "A2A",
    "collective-permute": "CP",
  }
  parts = [
    f"{short[k]} {v['count']}x{v['bytes'] / 2**20:.0f}M"
    for k, v in collectives.items()
    if v["count"]
  ]
  return " ".join(parts) or "none"


def format_table(rows) -> str:
  """The terminal / README table (GiB per device; times in ms)."""
  head = (
    "| step | strategy | mesh (d x f x ft x t) | params+EMA+opt GiB | split vs ideal | temp GiB | "
    "total GiB | fits | TFLOP | model TFLOP | est. ms | est. MFU | measured ms | collectives (count x MiB) |"
  )
  lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
  looped = False
  for r in rows:
    state = r["params_bytes"] + r["ema_bytes"] + r["opt_bytes"]
    loops = r.get("while_loops") or 0  # absent in results written before it was counted
    looped |= loops > 0
    est = "-" if r["estimated_s"] is None else f"{r['estimated_s'] * 1e3:.1f}"
    flops = "-" if r["flops"] is None else f"{r['flops'] / 1e12:.2f}"
    model = "-" if r.get("model_flops") is None else f"{r['model_flops'] / 1e12:.2f}"
    mfu = "-" if r["estimated_mfu"] is None else f"{r['estimated_mfu']:.0%}"
    measured = "-" if r["measured_s"] is None else f"{r['measured_s'] * 1e3:.1f}"
    fits = "-" if r["fits"] is None else ("yes" if r["fits"] else "NO")
    lines.append(
      f"| {r['step']} | {r['strategy']} | {r['mesh']} | {_gib(state)} | "
      f"{r['state_split_ratio']:.3f} | {_gib(r['temp_bytes'])} | {_gib(r['total_bytes'])} | "
      f"{fits} | {flops}{f' ({loops} loops)' if loops else ''} | {model} | {est} | {mfu} "
      f"| {measured} | {_collective_summary(r['collectives'])} |"
    )
  if looped:
    lines.append(
      "\n(N loops): the compiled program has `while` loops (e.g. the TPU compiler's collective "
      "matmuls for gathered weights); a loop body's FLOPs and collectives count once, so that "
      "cell's FLOPs, MFU and time estimate understate it (--compiler_options="
      "xla_tpu_spmd_unroll_windowed_einsum=true unrolls those loops)."
    )
  return "\n".join(lines)


def format_attention(rows) -> str:
  head = "| level | f x h x w x c | tokens | attention | GFLOP (fwd+bwd) | temp MiB | est. ms |"
  lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
  for r in rows:
    est = "-" if r["estimated_s"] is None else f"{r['estimated_s'] * 1e3:.2f}"
    lines.append(
      f"| {r['level']} | {r['frames']}x{r['height']}x{r['width']}x{r['channels']} | {r['tokens']} "
      f"| {r['attention']} | {r['flops'] / 1e9:.1f} | {r['temp_bytes'] / 2**20:.0f} | {est} |"
    )
  return "\n".join(lines)


def plot(rows, path: str) -> None:
  """Per-device memory (stacked) and step time per case: one PNG."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  train = [r for r in rows if r["step"] == "train"] or rows
  labels = [f"{r['strategy']}\n{r['mesh']}" for r in train]
  gib = 2**30
  state = [(r["params_bytes"] + r["ema_bytes"] + r["opt_bytes"]) / gib for r in train]
  temp = [(r["temp_bytes"] or 0) / gib for r in train]  # None: a --memory_only plan
  other = [
    max((r["total_bytes"] or 0) / gib - s - t, 0.0)
    for r, s, t in zip(train, state, temp, strict=True)
  ]
  fig, (ax_m, ax_t) = plt.subplots(1, 2, figsize=(4 + 1.6 * len(train), 4.5))
  x = range(len(train))
  ax_m.bar(x, state, label="params + EMA + optimizer")
  ax_m.bar(x, temp, bottom=state, label="temporaries (activations)")
  ax_m.bar(
    x, other, bottom=[s + t for s, t in zip(state, temp, strict=True)], label="batch, frozen, code"
  )
  hbm = train[0]["hbm_bytes"]
  if hbm:
    ax_m.axhline(hbm / gib, color="red", linestyle="--", label=f"HBM {hbm / gib:.0f} GiB")
  ax_m.set_xticks(list(x), labels, fontsize=8)
  ax_m.set_ylabel("GiB per device")
  ax_m.set_title("train step memory (compiler)")
  ax_m.legend(fontsize=7)
  measured = all(r["measured_s"] for r in train)
  times = [(r["measured_s"] if measured else r["estimated_s"] or 0.0) * 1e3 for r in train]
  ax_t.bar(x, times, color="tab:green")
  ax_t.set_xticks(list(x), labels, fontsize=8)
  ax_t.set_ylabel("ms per train step")
  ax_t.set_title("measured" if measured else "compiler's estimate")
  first = train[0]
  fig.suptitle(f"{first['stage']}:{first['variant']} on {first['target']} ({first['chip']})")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _write(output: str, name: str, rows, columns=None) -> None:
  with open(os.path.join(output, name + ".json"), "w") as f:
    json.dump(rows, f, indent=1)
  columns = list(columns or [k for k in rows[0] if k != "collectives"])
  for kind in rows[0].get("collectives", {}):
    columns += [f"{kind}_count", f"{kind}_bytes"]
  with open(os.path.join(output, name + ".csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
      flat = dict(row)
      for kind, v in row.get("collectives", {}).items():
        flat[f"{kind}_count"], flat[f"{kind}_bytes"] = v["count"], v["bytes"]
      writer.writerow(flat)


def merge_results(folders: list[str], output: str) -> list[dict]:
  """Rows of the results.json files in `folders`, one per (target, stage, variant, step, strategy,
  mesh, batch) with the last folder winning, written to `output` (json, csv, plot)."""
  merged = {}
  for folder in folders:
    path = os.path.join(folder, "results.json")
    if not os.path.isfile(path):
      raise errors.UserFileNotFoundError(
        f"{path} does not exist: pass output folders of the benchmark"
      )
    with open(path) as f:
      for row in json.load(f):
        key = tuple(row[k] for k in ("target", "stage", "variant", "step", "strategy", "mesh"))
        merged[key + (row["batch"],)] = row
  rows = list(merged.values())
  if not rows:
    raise errors.UserError(f"no result rows in {', '.join(folders)}")
  os.makedirs(output, exist_ok=True)
  _write(output, "results", rows, _CSV_COLUMNS)
  plot(rows, os.path.join(output, "memory_time.png"))
  return rows


def main(argv):
  del argv  # cli.main rejects positional arguments
  if _MERGE.value:
    out = os.path.join(_OUTPUT.value, "results.json")
    if os.path.exists(out) and not _OVERWRITE.value and _OUTPUT.value not in _MERGE.value:
      raise errors.UserError(f"{out} exists; pass --overwrite or choose another --output")
    try:
      rows = merge_results(_MERGE.value, _OUTPUT.value)
    except errors.UserError as e:
      raise errors.UserError(str(e)) from e
    print(format_table(rows))
    return
  if _CONFIG.value is None:
    raise errors.UserError("pass --config, e.g. --config configs/decoder.py:tiny")
  if _CPU_DEVICES.value:
    if _TARGET.value != "local":
      raise errors.UserError("--cpu_devices fakes local devices; it does not apply to a TPU target")
    from mav_jax.parallel import mesh

    mesh.fake_cpu_devices(_CPU_DEVICES.value)
  name = "attention" if _ATTENTION.value else "results"
  output = _OUTPUT.value
  if os.path.exists(os.path.join(output, name + ".json")) and not _OVERWRITE.value:
    raise errors.UserError(
      f"{output}/{name}.json exists; pass --overwrite to replace it or choose another --output"
    )
  from mav_jax import benchmark_lib
  from mav_jax.parallel import targets

  try:
    meshes = [benchmark_lib.parse_mesh(m) for m in _MESHES.value]
    compiler_options = benchmark_lib.parse_options(_COMPILER_OPTIONS.value)
    target = targets.get_target(_TARGET.value, _SLICES.value)
  except (errors.UserError, RuntimeError) as e:
    raise errors.UserError(str(e)) from e
  print(
    f"[benchmark] target {target.name}: {target.num_devices} x {target.chip.name}"
    f"{'' if target.runnable else ' (compiled ahead of time, not run)'}",
    flush=True,
  )
  log = lambda message: print(message, flush=True)  # noqa: E731
  os.makedirs(output, exist_ok=True)
  if _ATTENTION.value:
    rows = benchmark_lib.attention_comparison(_CONFIG.value, target, log=log)
    _write(output, name, rows)
    print(format_attention(rows))
    return
  try:
    cases = benchmark_lib.default_cases(
      _STRATEGIES.value, target.num_devices, target.num_slices, _TENSOR.value, meshes
    )
  except errors.UserError:
    raise
  rows = []
  for case in cases:
    try:
      rows += benchmark_lib.run_case(
        _CONFIG.value,
        case,
        target,
        batch_size=_BATCH.value,
        sample_batch=_SAMPLE_BATCH.value,
        clip_config=_CLIP.value,
        include_sample=not _NO_SAMPLE.value,
        repeats=_REPEATS.value,
        hlo_dir=os.path.join(output, "hlo") if _SAVE_HLO.value else None,
        compiler_options=compiler_options,
        memory_only=_MEMORY_ONLY.value,
        log=log,
      )
    except errors.UserError as e:
      raise errors.UserError(f"{case.strategy} on mesh {'x'.join(map(str, case.ici))}: {e}") from e
    except Exception as e:  # XLA rejects an option only when it compiles
      if "No such compile option" in str(e):
        raise errors.UserError(f"--compiler_options: {e}") from e
      raise
    _write(output, name, rows, _CSV_COLUMNS)  # after every case: long runs keep what they made
  if _MEMORY_ONLY.value:
    print(format_table(rows))
    print(f"[benchmark] wrote {output}/results.json, results.csv", file=sys.stderr)
    return
  plot(rows, os.path.join(output, "memory_time.png"))
  print(format_table(rows))
  print(f"[benchmark] wrote {output}/results.json, results.csv, memory_time.png", file=sys.stderr)


if __name__ == "__main__":
  cli.main(main)
