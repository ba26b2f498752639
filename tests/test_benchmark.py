"""mav_jax.benchmark: three strategies compiled and timed on 8 fake CPU devices, the compiler's figures
checked against the shardings, collectives parsed from HLO, the outputs written; with libtpu
installed, one ahead-of-time compile for a small TPU topology."""

import gzip
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from configs import clip as clip_config
from configs import decoder as decoder_config
from mav_jax import benchmark, benchmark_lib
from mav_jax.parallel import compiled_stats, sharding, targets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _small_decoder(attention: bool = True):
  """The tiny decoder cut to one UNet level (every kind of block, fewest layers to compile).

  Without attention for the tests of the benchmark's machinery: the attention blocks more than
  double a compile here (fsdp on 8 devices: 31 vs 11 s of XLA, 52 vs 23 s in all; the TPU compile
  for v5e:2x2 93 vs 58 s). Attention's sharding is checked by the fsdp_tensor run of
  tests/test_train.py (8 devices against one) and by test_attention_comparison below."""
  config = decoder_config.get_config("tiny")
  config.data.num_frames = 2
  config.data.resolution = 8
  config.model.channels = 16  # wide enough that most parameters split 8 ways
  config.model.head_dim = 8
  config.model.channel_mults = (1,)
  config.model.attention_levels = (0,) if attention else ()
  config.model.mid_attention = attention
  config.batch_size = 8
  return config


# fsdp_tensor is left out of the grid to save one ~60 s compile: it only composes the fsdp and the
# tensor rules, and tests/test_train.py compiles and runs it on 8 devices against one device.
GRID = ("data_parallel", "fsdp", "tensor")


@pytest.fixture(scope="module")
def rows():
  target = targets.get_target("local")
  assert target.num_devices == 8 and target.runnable
  cases = benchmark_lib.default_cases(list(GRID), 8, tensor=2)
  out = []
  for case in cases:
    fsdp = case.strategy == "fsdp"
    out += benchmark_lib.run_case(
      _small_decoder(attention=False),
      case,
      target,
      repeats=1,
      include_sample=fsdp,
      compiler_options={"xla_cpu_enable_fast_math": False} if fsdp else None,
      log=print,
    )
  return out


def test_strategies_compile_run_on_8_devices_and_are_written_out(rows, tmp_path):
  """One test for the whole 8-device grid (~90 s to build here): with `--dist load` a second test
  using the module fixture could land on the other worker and build it again."""
  train = {r["strategy"]: r for r in rows if r["step"] == "train"}
  assert sorted(train) == sorted(GRID) and set(GRID) < set(sharding.STRATEGIES)
  assert {r["mesh"] for r in train.values()} == {"1x8x1x1", "1x4x1x2"}
  for r in train.values():
    assert r["measured_s"] > 0 and r["flops"] > 0 and r["total_bytes"] > 0
    # The compiler's argument buffers hold at least the state shards computed from the shardings
    # (frozen CLIP's text tower is unused by D^t, so jit prunes it from the arguments).
    state = r["params_bytes"] + r["ema_bytes"] + r["opt_bytes"]
    assert r["argument_bytes"] >= state
    assert r["estimated_s"] is None and r["fits"] is None  # a CPU: no estimate, no HBM figure
    # Model FLOPs (lowered for one device, before optimisation, split evenly): no more than what
    # each device's program does (data parallel also repeats the optimizer on every device).
    assert 0.5 * r["flops"] < r["model_flops"] <= 1.02 * r["flops"]
    assert r["measured_mfu"] is None  # a CPU has no peak figure
  # Replicated state: each device holds all of it; FSDP: close to an even eighth.
  assert train["data_parallel"]["state_split_ratio"] == pytest.approx(8.0)
  assert train["fsdp"]["state_split_ratio"] < 1.15
  assert 1.0 < train["tensor"]["state_split_ratio"] < 8.0
  # Data parallel all-reduces gradients and gathers no parameters; FSDP gathers parameters.
  dp, fsdp = train["data_parallel"]["collectives"], train["fsdp"]["collectives"]
  assert dp["all-reduce"]["count"] > 0 and dp["all-gather"]["count"] == 0
  assert fsdp["all-gather"]["count"] > 0
  [sample] = [r for r in rows if r["step"] == "sample"]
  assert sample["strategy"] == "fsdp" and sample["measured_s"] > 0 and sample["flops"] > 0
  # XLA options reach both of its compiles and are recorded; other cases had none.
  assert {r["compiler_options"] for r in rows if r["strategy"] == "fsdp"} == {
    "xla_cpu_enable_fast_math=false"
  }
  assert train["tensor"]["compiler_options"] == ""
  assert benchmark_lib.parse_options(["a=true", "b=3"]) == {"a": True, "b": "3"}
  # The outputs: table, CSV, JSON and plot.
  benchmark._write(str(tmp_path), "results", rows, benchmark._CSV_COLUMNS)
  benchmark.plot(rows, str(tmp_path / "memory_time.png"))
  table = benchmark.format_table(rows)
  # Header, separator and one line per row; the loop footnote only when a program has loops
  # (XLA's CPU build of the tensor-parallel step may or may not, depending on its version).
  assert sum(line.startswith("|") for line in table.splitlines()) == len(rows) + 2
  assert "| train | fsdp | 1x8x1x1 |" in table
  assert ("(N loops)" in table) == any(r.get("while_loops") for r in rows)
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved[0]["collectives"] == rows[0]["collectives"]
  csv_lines = (tmp_path / "results.csv").read_text().splitlines()
  assert len(csv_lines) == len(rows) + 1 and "all-gather_count" in csv_lines[0]
  assert (tmp_path / "memory_time.png").read_bytes()[:4] == b"\x89PNG"


def test_collectives_parsed_from_hlo():
  mesh = Mesh(np.array(jax.devices()).reshape(8), ("fsdp",))

  def loss(x, w):
    return jnp.sum(jnp.tanh(x @ w) ** 2)

  grad = jax.jit(
    jax.grad(loss, argnums=1),
    in_shardings=(NamedSharding(mesh, P("fsdp")), NamedSharding(mesh, P("fsdp", None))),
    out_shardings=NamedSharding(mesh, P("fsdp", None)),
  )
  compiled = grad.lower(
    jax.ShapeDtypeStruct((64, 128), jnp.float32), jax.ShapeDtypeStruct((128, 256), jnp.float32)
  ).compile()
  stats = compiled_stats.analyse(compiled)
  # The weight is gathered whole (128 x 256 float32) and its gradient reduced.
  assert stats.collectives["all-gather"] == {"count": 1, "bytes": 128 * 256 * 4}
  reduced = stats.collectives["all-reduce"]["count"] + stats.collectives["reduce-scatter"]["count"]
  assert reduced >= 1
  assert stats.flops >= 2 * 8 * 128 * 256  # this device's 8 rows through the matmul, at least


def test_loops_counted_and_hlo_saved(tmp_path):
  """A scan compiles to a `while` loop (its body's FLOPs count once): the figures say so, and the
  optimised HLO can be kept to read."""

  def scanned(x):
    return jax.lax.scan(lambda c, _: (jnp.tanh(c @ c), None), x, None, length=4)[0]

  compiled = jax.jit(scanned).lower(jax.ShapeDtypeStruct((16, 16), jnp.float32)).compile()
  path = str(tmp_path / "scan.hlo.txt.gz")
  stats = compiled_stats.analyse(compiled, path)
  assert stats.while_loops >= 1
  with gzip.open(path, "rt") as f:
    assert compiled_stats.while_loops(f.read()) == stats.while_loops
  plain = compiled_stats.analyse(jax.jit(jnp.tanh).lower(jnp.ones(4)).compile())
  assert plain.while_loops == 0
  with open(os.path.join(REPO, "docs/benchmarks/sr_low_paper_v5p_2x2x2/results.json")) as f:
    row = {**json.load(f)[0], "while_loops": stats.while_loops}
  assert f"({stats.while_loops} loops)" in benchmark.format_table([row])


def test_hlo_text_parsing_of_tpu_async_and_fused_collectives():
  text = """HloModule m

%fused (p: bf16[1,64]) -> bf16[4,64] {
  %p = bf16[1,64]{1,0} parameter(0)
  ROOT %all-gather.2 = bf16[4,64]{1,0} all-gather(%p), channel_id=7, dimensions={0}
}

%async_fusion (p: bf16[1,64]) -> bf16[4,64] {
  %p = bf16[1,64]{1,0} parameter(0)
  ROOT %all-gather.3 = bf16[4,64]{1,0} all-gather(%p), channel_id=7, dimensions={0}
}

%all-reduce-scatter.1 (input: f32[8,16]) -> f32[2,16] {
  %input = f32[8,16]{1,0} parameter(0)
  %all-reduce.4 = f32[8,16]{1,0} all-reduce(%input), channel_id=6, to_apply=%add
  ROOT %slice = f32[2,16]{1,0} dynamic-slice(%all-reduce.4)
}

ENTRY %main (a: f32[8,16], b: bf16[1,64]) -> f32[2,16] {
  %a = f32[8,16]{1,0} parameter(0)
  %start = (f32[32]{0}, f32[32]{0}) all-reduce-start(%x), channel_id=9
  %done = f32[32]{0} all-reduce-done(%start)
  %cp = u32[2]{0} collective-permute(%y), channel_id=10, source_target_pairs={{0,1}}
  ROOT %fusion.1 = f32[2,16]{1,0} fusion(%a), kind=kCustom, calls=%all-reduce-scatter.1
}
"""
  got = compiled_stats.collectives(text)
  assert got["all-gather"] == {"count": 1, "bytes": 4 * 64 * 2}  # one channel, two parts
  assert got["reduce-scatter"] == {"count": 1, "bytes": 8 * 16 * 4}
  assert got["all-reduce"] == {"count": 1, "bytes": 32 * 4}  # the async pair, once
  assert got["collective-permute"] == {"count": 1, "bytes": 8}


def test_cli_errors_exit_nonzero_and_keep_results(tmp_path):
  (tmp_path / "results.json").write_text("[]")
  cmd = [sys.executable, "-m", "mav_jax.benchmark", "--config", "configs/decoder.py:tiny"]
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
  for extra, message in (
    ([f"--output={tmp_path}"], "pass --overwrite"),
    ([f"--output={tmp_path}/a", "--target=v9:2x2"], "unknown target"),
    ([f"--output={tmp_path}/b", "--strategies=pipeline"], "unknown sharding strategy"),
    (
      [f"--output={tmp_path}/c", "--meshes=2x2"],
      "give the sizes of data x fsdp x fsdp_transpose x tensor",
    ),
    ([f"--output={tmp_path}/d", "--compiler_options=unroll"], "is not name=value"),
  ):
    done = subprocess.run(cmd + extra, cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode != 0 and message in done.stderr, (extra, done.stderr[-2000:])
  assert (tmp_path / "results.json").read_text() == "[]"


def test_merge_results_of_separate_runs(tmp_path):
  """Cells compiled one per process (a small host) merge into one table; a re-run cell replaces
  its earlier row."""
  with open(os.path.join(REPO, "docs/benchmarks/decoder_paper_v5p_2x2x1/results.json")) as f:
    fsdp = [r for r in json.load(f) if r["strategy"] == "fsdp"]  # its train and sample rows
  other = [dict(r, strategy="data_parallel", estimated_s=1.0) for r in fsdp if r["step"] == "train"]
  rerun = [dict(other[0], estimated_s=2.0)]
  for name, rows in (("a", fsdp), ("b", other), ("c", rerun)):
    os.makedirs(tmp_path / name)
    (tmp_path / name / "results.json").write_text(json.dumps(rows))
  folders = [str(tmp_path / n) for n in "abc"]
  merged = benchmark.merge_results(folders, str(tmp_path / "all"))
  assert [(r["strategy"], r["step"]) for r in merged] == [
    ("fsdp", "train"),
    ("fsdp", "sample"),
    ("data_parallel", "train"),
  ]
  assert merged[2]["estimated_s"] == 2.0
  for name in ("results.json", "results.csv", "memory_time.png"):
    assert (tmp_path / "all" / name).exists()
  assert "| data_parallel |" in benchmark.format_table(merged)
  with pytest.raises(FileNotFoundError, match="results.json does not exist"):
    benchmark.merge_results([str(tmp_path / "missing")], str(tmp_path / "x"))


def test_attention_sizes_of_the_paper_decoder():
  sizes = benchmark_lib.attention_sizes(decoder_config.get_config("paper"))
  # Levels 1-3 (32, 16, 8 px of 64) at 640, 960, 1280 channels in heads of 128 (120 at 960: the
  # UNet's own rule, unet.attention_heads); the middle block shares level 3.
  assert [(s["height"], s["channels"], s["heads"], s["head_dim"]) for s in sizes] == [
    (32, 640, 5, 128),
    (16, 960, 8, 120),
    (8, 1280, 10, 128),
  ]


def _libtpu_installed() -> bool:
  try:
    import libtpu  # noqa: F401
  except ImportError:
    return False
  return True


@pytest.mark.skipif(
  not _libtpu_installed(), reason="needs libtpu (pip install -r requirements-tpu.txt)"
)
def test_ahead_of_time_compile_for_a_tpu_topology():
  """The TPU compiler (libtpu, on this CPU) compiles the train step for 4 v5e chips."""
  target = targets.get_target("v5e:2x2")
  assert target.num_devices == 4 and not target.runnable and target.chip.hbm_bytes == 16 * 2**30
  config = _small_decoder(attention=False)
  config.model.remat = True
  [row] = benchmark_lib.run_case(
    config,
    benchmark_lib.Case("fsdp", (1, -1, -1, 1)),
    target,
    include_sample=False,
  )
  assert row["chip"] == "TPU v5e" and row["mesh"] == "1x4x1x1" and row["fits"] is True
  assert row["estimated_s"] > 0 and 0 < row["estimated_mfu"] < 1  # the compiler's estimate
  # MFU counts the model's FLOPs: remat's recomputed forward is in the compiled program's FLOPs
  # but not in model_flops (lowered without remat), and the MFU divides model_flops.
  assert 0.5 < row["model_flops"] / row["flops"] < 0.95
  peak = target.chip.peak_flops
  assert row["estimated_mfu"] == pytest.approx(row["model_flops"] / row["estimated_s"] / peak)
  assert row["measured_s"] is None  # nothing runs on a topology
  assert row["state_split_ratio"] < 1.1
  assert row["collectives"]["all-gather"]["count"] > 0


def test_per_op_shares_of_tpu_hlo():
  """The per-op table (scripts/per_op.py) reads each scheduled op's `estimated_cycles` and
  classifies it by what it fuses and the JAX op it came from."""
  cfg = '{"flag_configs":[],"estimated_cycles":"%d","cost_model_type":"CLASSIC"}'
  text = f"""HloModule m

%fused_conv (p: bf16[2,8,8,32], k: bf16[3,3,32,32]) -> bf16[2,8,8,32] {{
  %p = bf16[2,8,8,32]{{3,2,1,0}} parameter(0)
  %k = bf16[3,3,32,32]{{3,2,1,0}} parameter(1)
  ROOT %c = bf16[2,8,8,32]{{3,2,1,0}} convolution(%p, %k), window={{size=3x3}}, dim_labels=b01f_01io->b01f
}}

%fused_norm (p: f32[2,8,8,32]) -> f32[2,32] {{
  %p = f32[2,8,8,32]{{3,2,1,0}} parameter(0)
  ROOT %r = f32[2,32]{{1,0}} reduce(%p), dimensions={{1,2}}, to_apply=%add
}}

ENTRY %main (x: bf16[2,8,8,32], k: bf16[3,3,32,32]) -> f32[2,32] {{
  %x = bf16[2,8,8,32]{{3,2,1,0}} parameter(0)
  %k = bf16[3,3,32,32]{{3,2,1,0}} parameter(1)
  %f1 = bf16[2,8,8,32]{{3,2,1,0}} fusion(%x, %k), kind=kOutput, calls=%fused_conv, metadata={{op_name="jit(step)/jvp(SpaceTimeUNet)/conv_general_dilated"}}, backend_config={cfg % 600}
  %f2 = bf16[2,8,8,32]{{3,2,1,0}} fusion(%x, %k), kind=kOutput, calls=%fused_conv, metadata={{op_name="jit(step)/dot_general"}}, backend_config={cfg % 200}
  %f3 = bf16[2,8,8,32]{{3,2,1,0}} fusion(%x, %k), kind=kOutput, calls=%fused_conv, metadata={{op_name="jit(step)/jvp(UNet)/attn/vmap(BNTS,BSNH->BTNH)/dot_general"}}, backend_config={cfg % 0}
  %u = bf16[2,8,8,32]{{3,2,1,0}} add(%x, %x), metadata={{op_name="jit(step)/add"}}, backend_config={cfg % 0}
  %t = bf16[2,8,8,32]{{0,3,2,1}} copy(%f1), backend_config={cfg % 100}
  %ar = bf16[2,8,8,32]{{3,2,1,0}} all-reduce-start(%t), channel_id=3, backend_config={cfg % 50}
  ROOT %n = f32[2,32]{{1,0}} fusion(%f2), kind=kInput, calls=%fused_norm, backend_config={cfg % 50}
}}
"""
  rows = compiled_stats.per_op(text)
  kinds = {r["name"]: r["kind"] for r in rows}
  assert kinds == {
    "f1": "convolution",
    "f2": "matmul",
    "f3": "attention (QK, AV)",
    "u": "optimizer / EMA update",
    "t": "copy / transpose",
    "ar": "collective",
    "n": "group norm / reduction",
  }
  conv = next(r for r in rows if r["name"] == "f1")
  assert conv["bytes"] == 2 * (2 * 8 * 8 * 32) * 2 + 3 * 3 * 32 * 32 * 2  # out + x + kernel
  table = {r["kind"]: r for r in compiled_stats.per_op_table(rows)}
  assert table["convolution"]["share"] == 0.6 and table["matmul"]["share"] == 0.2
  assert abs(sum(r["share"] for r in table.values()) - 1) < 1e-12
  assert compiled_stats.per_op(text.replace('"estimated_cycles"', '"other"')) == []
  # A forward-only program (a sampling step: no jvp anywhere) has no optimizer: its elementwise
  # ops outside a module scope (the sampler's update, a loop body) are elementwise.
  forward = text.replace("jvp(SpaceTimeUNet)", "SpaceTimeUNet").replace("jvp(UNet)", "UNet")
  assert {r["name"]: r["kind"] for r in compiled_stats.per_op(forward)}["u"] == "elementwise"


def test_attention_comparison_counts_full_3d_attention_as_dearer():
  """Factorised against full 3D attention, compiled for this machine's CPU (docs/benchmarks.md's figures
  come from the same code compiled for a TPU topology)."""
  [factorised, full] = benchmark_lib.attention_comparison(
    _attention_config(), targets.get_target("local"), log=lambda _: None
  )
  assert factorised["attention"] == "factorised" and full["attention"] == "full_3d"
  assert full["flops"] > factorised["flops"] > 0
  assert full["temp_bytes"] > factorised["temp_bytes"]


def _attention_config():
  config = _small_decoder()
  config.data.num_frames = 8
  config.data.resolution = 16
  config.model.channels = 32
  config.model.head_dim = 16
  config.model.mid_attention = False
  return config


@pytest.mark.skipif(
  not _libtpu_installed(), reason="needs libtpu (pip install -r requirements-tpu.txt)"
)
def test_paper_decoder_state_splits_evenly_on_256_and_512_chips(tmp_path):
  """The memory planner (no compile): FSDP over the two axes it chooses keeps the paper D^t's
  busiest chip within 1.05x of an even share of the train state on 256 and 512 v5p chips, where
  one 256-way axis left 32% / 78% of it whole (83x / 402x). Through the CLI once, in-process
  for the rest."""
  config = decoder_config.get_config("paper")
  clip = clip_config.get_config("base")  # the frozen CLIP's shape (no weights needed)
  for topology, fsdp in (("v5p:8x8x4", "1x64x4x1"), ("v5p:8x8x8", "1x64x8x1")):
    [row] = benchmark_lib.run_case(
      config,
      benchmark_lib.Case("fsdp", (1, -1, -1, 1)),
      targets.get_target(topology),
      clip_config=clip,
      memory_only=True,
      log=lambda _: None,
    )
    assert row["mesh"] == fsdp and row["state_split_ratio"] < 1.05, row
    assert row["flops"] is None and row["temp_bytes"] is None  # nothing was compiled
  # The single-axis mesh of before, for contrast: the same strategy leaves 83x on a chip.
  [row] = benchmark_lib.run_case(
    config,
    benchmark_lib.Case("fsdp", (1, 256, 1, 1)),
    targets.get_target("v5p:8x8x4"),
    clip_config=clip,
    memory_only=True,
    log=lambda _: None,
  )
  assert row["state_split_ratio"] > 80
  done = subprocess.run(
    [
      sys.executable,
      "-m",
      "mav_jax.benchmark",
      "--config=configs/sr_low.py:paper",
      "--clip_config=configs/clip.py:base",
      "--target=v5p:8x8x8",
      "--memory_only",
      "--strategies=fsdp,data_parallel",
      f"--output={tmp_path}",
    ],
    cwd=REPO,
    env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  rows = json.loads((tmp_path / "results.json").read_text())
  assert [(r["strategy"], r["devices"]) for r in rows] == [("fsdp", 512), ("data_parallel", 512)]
  assert rows[0]["state_split_ratio"] < 1.05 and rows[1]["state_split_ratio"] == 512
  assert "| train | fsdp | 1x64x8x1 |" in done.stdout and (tmp_path / "results.csv").exists()
  assert "largest arrays left whole" in done.stdout
