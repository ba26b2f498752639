"""What the compiler says about a compiled program: memory, FLOPs, estimated time, collectives.

All figures are per device (an SPMD program is one program per device). They come from XLA:
`memory_analysis()` (buffer sizes the compiler assigned), `cost_analysis()` (FLOPs and, on TPU, the
compiler's estimated execution time `optimal_seconds`) and the optimised HLO text (collectives).
XLA's cost analysis counts the body of a loop (`scan`, `fori_loop`, `lax.map`) once, not once per
iteration.
"""

import collections
import dataclasses
import gzip
import re
from typing import Any

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

_BYTES = {
  "pred": 1,
  "s4": 0.5,
  "u4": 0.5,
  "s8": 1,
  "u8": 1,
  "f8e4m3fn": 1,
  "f8e5m2": 1,
  "s16": 2,
  "u16": 2,
  "f16": 2,
  "bf16": 2,
  "s32": 4,
  "u32": 4,
  "f32": 4,
  "s64": 8,
  "u64": 8,
  "f64": 8,
  "c64": 8,
  "c128": 16,
}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
# "  %name = <shape> <opcode>(" ; the shape may be a tuple "(f32[..]{..}, ...)".
_INSTRUCTION = re.compile(
  r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<shape>.*?)\s(?P<op>[\w\-]+)\("
)
_CHANNEL = re.compile(r"channel_id=(\d+)")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape string (a tuple's elements summed; layouts ignored)."""
  total = 0.0
  for dtype, dims in _ARRAY.findall(shape):
    if dtype not in _BYTES:
      continue
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    total += n * _BYTES[dtype]
  return int(total)


def _largest_array_bytes(shape: str) -> int:
  sizes = [shape_bytes(f"{t}[{d}]") for t, d in _ARRAY.findall(shape)]
  return max(sizes, default=0)


def _computations(hlo_text: str) -> tuple[dict[str, list[tuple[str, str, str]]], dict[str, str]]:
  """({computation: [(opcode, shape, line)]}, {instruction name: shape}) of optimised HLO text."""
  computations: dict[str, list[tuple[str, str, str]]] = collections.defaultdict(list)
  shapes: dict[str, str] = {}
  current = None
  for line in hlo_text.splitlines():
    if line and not line[0].isspace():  # a computation's header (or its closing brace)
      head = line.removeprefix("ENTRY ").lstrip("%")
      current = head.split()[0] if line.rstrip().endswith("{") and head else None
      continue
    instruction = _INSTRUCTION.match(line)
    if instruction and current is not None:
      computations[current].append((instruction["op"], instruction["shape"], line))
      shapes[instruction["name"]] = instruction["shape"]
  return computations, shapes


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """{kind: {"count": n, "bytes": b}} of the collectives in optimised HLO text.

  Counted once per instruction in the program text (a collective inside a loop body counts once).
  Bytes are those of the full buffer each one works on: an all-gather's gathered result, an
  all-reduce's operand, a reduce-scatter's input, an all-to-all's or collective-permute's operand.
  Async pairs (`-start` / `-done`) and the parts of one collective (same `channel_id`) count once;
  the TPU compiler's reduce-scatter fusions (an all-reduce and a slice fused together) count as one
  reduce-scatter.
  """
  computations, _ = _computations(hlo_text)
  # Fused computations that implement a reduce-scatter: their inner all-reduce is the collective.
  scatter_bodies = set()
  for body in computations.values():
    for op, _, line in body:
      if op == "fusion":
        called = _CALLS.search(line)
        if called and "reduce-scatter" in called.group(1):
          scatter_bodies.add(called.group(1))
  out: dict[str, dict[str, int]] = {k: {"count": 0, "bytes": 0} for k in COLLECTIVES}
  seen = set()
  for name, body in computations.items():
    for op, shape, line in body:
      if op.endswith("-done"):
        continue
      kind = op[: -len("-start")] if op.endswith("-start") else op
      if kind not in COLLECTIVES:
        continue
      if name in scatter_bodies and kind == "all-reduce":
        kind = "reduce-scatter"
      channel = _CHANNEL.search(line)
      if channel:  # one collective split into parts (async collective fusions) shares its channel
        if (kind, channel.group(1)) in seen:
          continue
        seen.add((kind, channel.group(1)))
      size = _largest_array_bytes(shape) if op.endswith("-start") else shape_bytes(shape)
      out[kind]["count"] += 1
      out[kind]["bytes"] += size
  return out


def while_loops(hlo_text: str) -> int:
  """Number of `while` instructions in optimised HLO text.

  A program with loops is under-counted by `cost_analysis()` (a body counts once) and the TPU
  compiler gives no estimated time for it; loops appear from `scan` and also from the compiler's
  own rewrites (e.g. a collective matmul that streams an all-gather as collective-permutes).
  """
  count = 0
  for line in hlo_text.splitlines():
    instruction = _INSTRUCTION.match(line)
    if instruction and instruction["op"] == "while":
      count += 1
  return count


@dataclasses.dataclass
class CompiledStats:
  """Per-device figures of one compiled program (bytes, FLOPs, seconds).

  Attributes:
    argument_bytes: inputs (for a train step: the state shards, the batch shard, frozen params).
    output_bytes: outputs.
    alias_bytes: outputs that reuse donated input buffers (counted once).
    temp_bytes: activations and other temporaries.
    code_bytes: generated code.
    flops: floating-point operations.
    bytes_accessed: memory traffic the cost model expects.
    estimated_seconds: the compiler's estimate of the run time (TPU only; None elsewhere).
    collectives: {kind: {"count", "bytes"}}.
    while_loops: `while` instructions in the optimised HLO (see `while_loops`).
  """

  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  flops: float
  bytes_accessed: float
  estimated_seconds: float | None
  collectives: dict[str, dict[str, int]]
  while_loops: int = 0

  @property
  def total_bytes(self) -> int:
    """Peak-style total: inputs + outputs not aliased to inputs + temporaries + code."""
    return (
      self.argument_bytes
      + self.output_bytes
      - self.alias_bytes
      + self.temp_bytes
      + (self.code_bytes)
    )


def _cost(compiled) -> dict[str, Any]:
  cost = compiled.cost_analysis()
  if isinstance(cost, list | tuple):  # older jax: one dict per program
    cost = cost[0] if cost else {}
  return dict(cost or {})


def analyse(compiled, hlo_path: str | None = None) -> CompiledStats:
  """The figures of a `jax.stages.Compiled`; `hlo_path` (gzip text) keeps its optimised HLO."""
  memory = compiled.memory_analysis()
  cost = _cost(compiled)
  estimated = cost.get("optimal_seconds")
  text = compiled.as_text()
  if hlo_path:
    with gzip.open(hlo_path, "wt") as f:
      f.write(text)
  return CompiledStats(
    argument_bytes=int(memory.argument_size_in_bytes),
    output_bytes=int(memory.output_size_in_bytes),
    alias_bytes=int(memory.alias_size_in_bytes),
    temp_bytes=int(memory.temp_size_in_bytes),
    code_bytes=int(memory.generated_code_size_in_bytes),
    flops=float(cost.get("flops", 0.0)),
    bytes_accessed=float(cost.get("bytes accessed", 0.0)),
    estimated_seconds=float(estimated) if estimated and estimated > 0 else None,
    collectives=collectives(text),
    while_loops=while_loops(text),
  )


# ---------------------------------------------------------------------------------------------
# Per op: where the TPU compiler expects the time to go.
# ---------------------------------------------------------------------------------------------

_CYCLES = re.compile(r'"estimated_cycles":"(\d+)"')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
# Kinds of scheduled ops, in the order they are tested against an op's text.
OP_KINDS = (
  "collective",
  "convolution",
  "attention (QK, AV)",
  "matmul",
  "group norm / reduction",
  "copy / transpose",
  "optimizer / EMA update",
  "elementwise",
  "other",
)


def _fused_ops(computations: dict[str, list[tuple[str, str, str]]], name: str) -> set[str]:
  """The opcodes of fused computation `name` and of those it calls (nested fusions)."""
  out: set[str] = set()
  stack, seen = [name], set()
  while stack:
    current = stack.pop()
    if current in seen:
      continue
    seen.add(current)
    for op, _, line in computations.get(current, ()):
      out.add(op)
      called = _CALLS.search(line)
      if called:
        stack.append(called.group(1))
  return out


def _outside_the_model(name: str) -> bool:
  """An op of the train step itself (optimizer, EMA, gradient norm, finite guard), not of a
  model's forward or backward pass: its JAX op name has no jvp / transpose / remat scope."""
  parts = name.split("/")
  return len(parts) > 1 and not parts[1].startswith(
    ("jvp(", "transpose(", "checkpoint", "rematted", "vmap(jvp", "remat")
  )


def op_kind(op: str, line: str, fused: set[str], train: bool = True) -> str:
  """The OP_KINDS entry of one scheduled instruction: its opcode, the opcodes it fuses and the
  JAX operation it came from (`op_name` metadata: `jit(fn)/jvp(Module)/<module path>/<op>`).
  `train`: the program has a backward pass, so ops outside it are the optimizer's; a forward-only
  program (a sampling step) has none."""
  kind = op.removesuffix("-start").removesuffix("-done")
  name = (_OP_NAME.search(line) or [None, ""])[1]
  ops = fused | {op}
  if kind in COLLECTIVES or any(c in o for o in ops for c in COLLECTIVES):
    return "collective"
  if "convolution" in ops or "dot" in ops:
    # The TPU compiler lowers matmuls to convolutions too: the JAX op names which it was.
    if "conv_general_dilated" in name:
      return "convolution"
    if "attn" in name and "->" in name:  # an attention block's einsums (not its projections)
      return "attention (QK, AV)"
    return "matmul"
  if train and _outside_the_model(name):
    return "optimizer / EMA update"
  if "reduce" in ops or "reduce-window" in ops:
    return "group norm / reduction"
  if ops <= {"copy", "transpose", "bitcast", "copy-start", "copy-done", "fusion", "parameter"}:
    return "copy / transpose"
  if ops & {"add", "multiply", "subtract", "divide", "exponential", "logistic", "convert",
            "maximum", "minimum", "select", "compare", "rsqrt", "tanh", "negate", "broadcast"}:  # fmt: skip
    return "elementwise"
  return "other"


def per_op(hlo_text: str) -> list[dict[str, Any]]:
  """Every op the TPU compiler scheduled with a cost estimate (`"estimated_cycles"` in its
  backend config), as {name, op, kind, cycles, bytes, op_name}: `bytes` the output's plus its
  operands' (as their shapes read), `kind` from `op_kind`. A loop body's ops appear once (as in
  `cost_analysis`). Empty for programs of other backends (no estimates)."""
  computations, shapes = _computations(hlo_text)
  train = "jvp(" in hlo_text  # a backward pass: ops outside the model are the optimizer's
  rows = []
  for body in computations.values():
    for op, shape, line in body:
      cycles = _CYCLES.search(line)
      if not cycles:
        continue
      called = _CALLS.search(line)
      fused = _fused_ops(computations, called.group(1)) if called else set()
      args = line[line.index(f"{op}(") + len(op) + 1 :].split(")", 1)[0]
      operands = re.findall(r"%([\w.\-]+)", args)
      name = _INSTRUCTION.match(line)["name"]
      rows.append(
        {
          "name": name,
          "op": op,
          "kind": op_kind(op, line, fused, train),
          "cycles": int(cycles.group(1)),
          "bytes": shape_bytes(shape) + sum(shape_bytes(shapes.get(o, "")) for o in operands),
          "op_name": (_OP_NAME.search(line) or [None, ""])[1],
        }
      )
  return rows


def per_op_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """`per_op` rows summed per kind: {kind, ops, cycles, share, bytes}, largest share first."""
  total = sum(r["cycles"] for r in rows) or 1
  out = []
  for kind in OP_KINDS:
    mine = [r for r in rows if r["kind"] == kind]
    if mine:
      cycles = sum(r["cycles"] for r in mine)
      out.append(
        {
          "kind": kind,
          "ops": len(mine),
          "cycles": cycles,
          "share": cycles / total,
          "bytes": sum(r["bytes"] for r in mine),
        }
      )
  return sorted(out, key=lambda r: -r["cycles"])
