r"""A stage's sampling step (one denoising step of its sampler) compiled ahead of time for a TPU
topology, the batch split over the mesh's data axes and the parameters sharded by the strategy as
`mav_jax.sample` does (sharding.batch_sharding, strategy_rules, activation_rules): per-chip FLOPs,
bytes, memory and the compiler's time estimate. No weights are needed (abstract shapes).

  .venv/bin/python scripts/aot_sampler_step.py --config configs/decoder.py:paper \
      --clip_config configs/clip.py:base --target v5p:2x2x1 --batch 8 --output out/sample_b8.json

Each run is one compile (minutes for a paper-size stage); compare batches on one topology to see the
split: per-chip FLOPs grow with batch / chips.
"""

import json
import os
import time

import flax.linen as nn
import jax
from absl import app, flags
from ml_collections import config_flags

from mav_jax import benchmark_lib, checkpointing, train_step
from mav_jax.parallel import compiled_stats, sharding
from mav_jax.parallel import targets as targets_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Stage config, e.g. decoder.py:paper.")
_CLIP = config_flags.DEFINE_config_file("clip_config", None, "CLIP config of the frozen CLIP.")
_TARGET = flags.DEFINE_string("target", "v5p:2x2x1", "TPU topology (or 'local').")
_BATCH = flags.DEFINE_integer("batch", 8, "Videos per sampling call (split over the data axes).")
_STRATEGY = flags.DEFINE_string("strategy", "data_parallel", "Parameter sharding strategy.")
_OUTPUT = flags.DEFINE_string("output", None, "JSON file for the row.")
_HLO = flags.DEFINE_string("save_hlo", None, "Also write the optimised HLO (gzip text) there.")

ICI = {"data_parallel": (-1, 1, 1, 1), "fsdp": (1, -1, -1, 1)}


def main(argv):
  del argv
  target = targets_lib.get_target(_TARGET.value)
  case = benchmark_lib.Case(_STRATEGY.value, ICI[_STRATEGY.value])
  config = benchmark_lib.configure(_CONFIG.value, case, _BATCH.value)
  mesh, model, stage, _, shardings, abstract, _ = train_step.setup(config, target.devices)
  frozen_abstract, frozen_shardings, _ = benchmark_lib.frozen_models(
    stage, model, config, mesh, _CLIP.value
  )
  params_in = checkpointing.abstract_with_shardings(abstract, shardings).params
  batch_spec = sharding.batch_sharding(mesh)
  example = benchmark_lib.example_batch(config)
  sample_in = benchmark_lib.abstract_batch(example, _BATCH.value, batch_spec)
  # The model's FLOPs (lowered for one device, nothing recomputed): est. MFU divides these.
  model_flops = benchmark_lib.model_flops(config, example, _CLIP.value, _BATCH.value, print)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  jitted = jax.jit(
    benchmark_lib._one_step_sampler(stage, model, config),
    in_shardings=(shardings.params, batch_spec, replicated, frozen_shardings),
    out_shardings=batch_spec,
  )
  key_in = jax.eval_shape(lambda: jax.random.key(0))
  start = time.perf_counter()
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.activation_rules(_STRATEGY.value)):
    compiled = jitted.lower(params_in, sample_in, key_in, frozen_abstract).compile()
  seconds = time.perf_counter() - start
  stats = compiled_stats.analyse(compiled, _HLO.value)
  extra = {"model_flops": model_flops["sample"] / target.num_devices}
  row = benchmark_lib._row(target, config, case, mesh, "sample", stats, seconds, extra)
  row["batch"] = _BATCH.value
  print(json.dumps(row, indent=2, default=str))
  if _OUTPUT.value:
    os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
    with open(_OUTPUT.value, "w") as f:
      json.dump(row, f, indent=2, default=str)


if __name__ == "__main__":
  app.run(main)
