"""`python -m mav_jax.convert karlo` (docs/karlo_design.md, step 7): a tiny random Karlo folder in the
diffusers layout (tests/karlo_fixtures.py) converted by the command, the folders it writes read
back as model folders (test_karlo_pipeline.py runs them against diffusers); the one-line errors;
and, at full size without weights (diffusers models built on torch's meta device), the
converter's name map covering every tensor of Karlo's prior, decoder, text projection and SR
models, with Karlo's parameter counts.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import karlo_fixtures  # noqa: E402

from mav_jax import checkpointing  # noqa: E402
from mav_jax.convert import karlo_prior, karlo_unet  # noqa: E402
from mav_jax.stages import video  # noqa: E402

TOL = 1e-4


def _convert(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", "mav_jax.convert", *args],
    capture_output=True,
    text=True,
    timeout=600,
  )


@pytest.fixture(scope="module")
def karlo(tmp_path_factory):
  """(source folder, its torch modules, the command's output folder)."""
  root = tmp_path_factory.mktemp("karlo")
  parts = karlo_fixtures.write_karlo_folder(root / "src")
  out = root / "out"
  proc = _convert("karlo", f"--source={root / 'src'}", f"--output={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  return root / "src", parts, out, proc.stdout


def test_the_command_writes_every_folder_with_progress(karlo):
  _, parts, out, stdout = karlo
  assert sorted(os.listdir(out)) == sorted(
    ["clip", "prior", "decoder_image", "sr_low_image", "sr_low_image_last"]
  )
  for name in os.listdir(out):
    assert f"[convert] {name}: " in stdout
  config, params = checkpointing.load_model(str(out / "decoder_image"))
  assert (config.stage, config.variant, config.data.kind) == ("decoder", "karlo", "image")
  assert config.train.init_from == "" and config.conditioning.clip == str(out / "clip")
  n = sum(p.numel() for p in parts["decoder"].parameters())
  n += sum(p.numel() for p in parts["text_proj"].parameters())
  assert sum(np.size(a) for a in jax.tree.leaves(params)) == n  # every tensor, once


def _one_line_error(proc, *needles):
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 1 and lines and lines[-1].startswith("error: "), proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
  for needle in needles:
    assert needle in lines[-1], lines[-1]


def test_one_line_errors_and_no_overwrite(karlo, tmp_path):
  src, _, _, _ = karlo
  bad = tmp_path / "bad"
  shutil.copytree(src, bad)
  shutil.rmtree(bad / "super_res_last")
  _one_line_error(
    _convert("karlo", f"--source={bad}", f"--output={tmp_path / 'o1'}"), "super_res_last/"
  )
  shutil.copytree(src / "super_res_first", bad / "super_res_last")

  config = json.loads((bad / "decoder" / "config.json").read_text())
  (bad / "decoder" / "config.json").write_text(json.dumps({**config, "_class_name": "UNet2DModel"}))
  _one_line_error(
    _convert("karlo", f"--source={bad}", f"--output={tmp_path / 'o2'}"), "UNet2DConditionModel"
  )
  (bad / "decoder" / "config.json").write_text(json.dumps(config))

  from safetensors.numpy import load_file, save_file

  file = bad / "super_res_last" / "diffusion_pytorch_model.safetensors"
  state = load_file(str(file))
  state["mid_block.resnets.1.conv2.weight"] = np.zeros((64, 64, 1, 1), np.float32)
  save_file(state, str(file))
  out = tmp_path / "o3"
  _one_line_error(
    _convert("karlo", f"--source={bad}", f"--output={out}"),
    "mid_block.resnets.1.conv2.weight",
    "(64, 64, 1, 1)",
  )
  assert not out.exists() and not (tmp_path / "o3.staging").exists()  # nothing left behind

  _one_line_error(_convert("karlo", f"--source={tmp_path / 'none'}", f"--output={out}"), "none")
  _one_line_error(_convert("nothing", f"--source={src}", f"--output={out}"), "karlo")

  existing = tmp_path / "existing"
  existing.mkdir()
  (existing / "mine.txt").write_text("keep")
  _one_line_error(_convert("karlo", f"--source={src}", f"--output={existing}"), "--overwrite")
  assert os.listdir(existing) == ["mine.txt"]
  proc = _convert("karlo", f"--source={src}", f"--output={existing}", "--overwrite")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "mine.txt" not in os.listdir(existing) and "decoder_image" in os.listdir(existing)


# -- full size, no weights ------------------------------------------------------------------------


def _meta_state(module) -> dict[str, np.ndarray]:
  """The state dict's names and shapes as zero-stride float32 arrays (no memory)."""
  return {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in module.state_dict().items()}


def _karlo_configs() -> dict[str, dict]:
  """Karlo's component configs (the diffusers conversion script's, docs/karlo_design.md §2)."""
  return {
    "decoder": dict(
      sample_size=64,
      in_channels=3,
      out_channels=6,
      layers_per_block=3,
      block_out_channels=(320, 640, 960, 1280),
      down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 3,
      up_block_types=("SimpleCrossAttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",),
      mid_block_type="UNetMidBlock2DSimpleCrossAttn",
      cross_attention_dim=1536,
      attention_head_dim=64,
      resnet_time_scale_shift="scale_shift",
      class_embed_type="identity",
    ),
    "text_proj": dict(
      clip_extra_context_tokens=4,
      clip_embeddings_dim=768,
      time_embed_dim=1280,
      cross_attention_dim=1536,
    ),
    "super_res": dict(
      sample_size=256,
      in_channels=6,
      out_channels=3,
      layers_per_block=3,
      block_out_channels=(320, 640, 960, 1280),
      down_block_types=("ResnetDownsampleBlock2D",) * 4,
      up_block_types=("ResnetUpsampleBlock2D",) * 4,
      add_attention=False,
    ),
  }


def _stage_target(module: str, kwargs: dict):
  from mav_jax.convert import karlo

  config = karlo._image_unet_config(module, kwargs, "unused")
  stage = video.VideoStage(module)
  model = stage.make_model(config)
  return jax.eval_shape(lambda: stage.init(model, config, jax.random.key(0)))


def test_full_size_name_maps_cover_every_tensor_with_karlos_counts():
  """Full-size Karlo models on the meta device: every tensor's name and shape maps onto the
  karlo configs' image models (nothing missing, left over or misshapen), with the sizes the
  issue gives: decoder 885,439,686 + text projection 7,878,400, each SR 691,579,523, prior
  1,022,030,080."""
  from diffusers import PriorTransformer, UNet2DConditionModel, UNet2DModel
  from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

  cfg = _karlo_configs()
  with torch.device("meta"):
    decoder = UNet2DConditionModel(**cfg["decoder"])
    text_proj = UnCLIPTextProjModel(**cfg["text_proj"])
    super_res = UNet2DModel(**cfg["super_res"])
    prior = PriorTransformer()

  kwargs = karlo_unet.unet_kwargs_decoder(dict(decoder.config), dict(text_proj.config))
  params = karlo_unet.convert_unet(
    _meta_state(decoder),
    kwargs,
    _stage_target("decoder", kwargs),
    "decoder",
    text_proj=_meta_state(text_proj),
  )
  flat = traverse_util.flatten_dict(params)
  proj = sum(np.size(v) for k, v in flat.items() if k[0] == "unclip_proj")
  assert (sum(np.size(v) for v in flat.values()) - proj, proj) == (885_439_686, 7_878_400)

  kwargs = karlo_unet.unet_kwargs_super_res(dict(super_res.config))
  params = karlo_unet.convert_unet(
    _meta_state(super_res), kwargs, _stage_target("sr_low", kwargs), "super_res"
  )
  assert sum(np.size(v) for v in jax.tree.leaves(params)) == 691_579_523

  kwargs, params = karlo_prior.convert_prior(_meta_state(prior), dict(prior.config))
  assert sum(np.size(v) for v in jax.tree.leaves(params)) == 1_022_030_080
  assert kwargs["max_tokens"] == 77 and kwargs["width"] == 2048 and kwargs["layers"] == 20


@pytest.mark.parametrize(
  "config,spatial",
  [
    ("decoder.py:karlo", 885_439_686 + 7_878_400 + 2_050_560),  # + the fps embedding
    ("sr_low.py:karlo", 691_579_523),
    ("prior.py:karlo", 1_022_030_080),
  ],
)
def test_count_params_of_the_karlo_configs(config, spatial):
  proc = subprocess.run(
    [sys.executable, "-m", "mav_jax.count_params", f"--config=configs/{config}"],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert f"({spatial:,} spatial" in proc.stdout, proc.stdout


def test_pytorch_bin_and_fp16_files_convert_like_safetensors(karlo, tmp_path):
  """The same folder saved as PyTorch .bin (text encoder, decoder) and as fp16 safetensors (SR):
  the converted parameters equal the safetensors conversion's (the fp16 ones to fp16 rounding)."""
  from mav_jax.convert import karlo as karlo_convert

  src, parts, out, _ = karlo
  other = tmp_path / "src"
  shutil.copytree(src, other)
  for name in ("text_encoder", "decoder"):
    shutil.rmtree(other / name)
    parts[name].save_pretrained(other / name, safe_serialization=False)
  assert (other / "decoder" / "diffusion_pytorch_model.bin").exists()
  shutil.rmtree(other / "super_res_last")
  parts["super_res_last"].half().save_pretrained(other / "super_res_last", variant="fp16")
  parts["super_res_last"].float()
  assert (other / "super_res_last" / "diffusion_pytorch_model.fp16.safetensors").exists()
  karlo_convert.convert_karlo(str(other), str(tmp_path / "out"), log=lambda m: None)
  for name, tol in (("clip", 0), ("decoder_image", 0), ("sr_low_image_last", 1e-3)):
    ours = traverse_util.flatten_dict(checkpointing.restore_params(str(tmp_path / "out" / name)))
    ref = traverse_util.flatten_dict(checkpointing.restore_params(str(out / name)))
    assert ours.keys() == ref.keys()
    for k in ref:
      np.testing.assert_allclose(ours[k], ref[k], atol=tol, rtol=tol, err_msg="/".join(k))
