"""FID InceptionV3: parity with pytorch-fid's network through the weight converter."""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mav_jax.eval import extractors, inception

# float32 on both sides, relative to the features' scale: it covers summation-order differences
# over the network's ~100 convolutions.
TOLERANCE = 1e-4


REPO = pathlib.Path(__file__).resolve().parent.parent
REF_PKGS = REPO / ".ref_pkgs"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """pytorch-fid's FID Inception with random weights (its .pth) and its outputs on 2 images, made
  in a subprocess that imports the reference packages from .ref_pkgs (requirements-ref.txt)."""
  pytest.importorskip("torch")
  if not (REF_PKGS / "pytorch_fid").is_dir():
    pytest.skip("the reference is not installed: make test installs requirements-ref.txt")
  out = tmp_path_factory.mktemp("pytorch_fid")
  env = dict(os.environ, PYTHONPATH=str(REF_PKGS))
  script = REPO / "tests" / "reference" / "pytorch_fid_outputs.py"
  done = subprocess.run(
    [sys.executable, str(script), str(out)], env=env, capture_output=True, text=True
  )
  assert done.returncode == 0, done.stderr[-3000:]
  data = np.load(out / "reference.npz")
  expected = {k: data[k] for k in ("pool", "logits", "logits_unbiased")}
  return out / "pt_inception.pth", data["images"], expected


def test_converted_weights_match_pytorch_fid(reference):
  path, images, expected = reference
  # Through the protocols' extractor: weights replicated, the 2 images split over 2 devices.
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:2]), ("data",))
  features = jax.device_get(extractors.inception(str(path), mesh)(images))

  assert set(features) == set(expected)
  assert features["pool"].shape == (2, inception.FEATURE_DIM)
  assert features["logits"].shape == (2, inception.NUM_CLASSES)
  for name, want in expected.items():
    got = np.asarray(features[name])
    scale = np.abs(want).max()
    assert scale > 0.1 and np.std(want, axis=0).mean() > 1e-3 * scale  # not a degenerate test
    np.testing.assert_allclose(got, want, rtol=0, atol=TOLERANCE * scale, err_msg=name)


@pytest.mark.parametrize("shape", [(64, 80), (512, 400), (299, 300)])
def test_resize_matches_torch_interpolate(shape):
  torch = pytest.importorskip("torch")
  import torch.nn.functional as F

  images = np.random.default_rng(1).uniform(size=(2, *shape, 3)).astype(np.float32)
  got = inception.resize_bilinear(images, (299, 299))
  want = F.interpolate(torch.from_numpy(images).permute(0, 3, 1, 2), (299, 299), mode="bilinear")
  want = want.permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5)


def test_compute_dtype_is_separate_from_the_parameter_dtype():
  # Traced, not compiled: every convolution runs in bfloat16 on float32 parameters.
  model = inception.InceptionV3(dtype=jnp.bfloat16, image_size=None)
  images = jax.ShapeDtypeStruct((1, inception.MIN_PIXELS, inception.MIN_PIXELS, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  jaxpr = jax.make_jaxpr(model.apply)(variables, images)
  convs = [e for e in jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
  layers = [k for k in inception.torch_parameter_shapes() if k.endswith(".conv.weight")]
  assert len(convs) == len(layers) == 94
  assert {e.outvars[0].aval.dtype for e in convs} == {jnp.dtype(jnp.bfloat16)}
  outputs = jax.eval_shape(model.apply, variables, images)
  assert {v.dtype for v in outputs.values()} == {jnp.dtype(jnp.float32)}


def _zero_state_dict() -> dict[str, np.ndarray]:
  shapes = inception.torch_parameter_shapes()
  return {key: np.zeros(shape, np.float32) for key, shape in shapes.items()}


def test_convert_state_dict_ignores_step_counters_and_the_aux_classifier():
  state = _zero_state_dict()
  state["fc.bias"] = np.arange(inception.NUM_CLASSES, dtype=np.float32)
  state["Conv2d_1a_3x3.bn.num_batches_tracked"] = np.zeros((), np.int64)
  state["AuxLogits.fc.weight"] = np.zeros((1008, 768), np.float32)
  variables = inception.convert_state_dict(state)
  assert variables["params"]["Mixed_5b"]["branch5x5_2"]["conv"]["kernel"].shape == (5, 5, 48, 64)
  assert variables["params"]["fc"]["kernel"].shape == (inception.FEATURE_DIM, inception.NUM_CLASSES)
  np.testing.assert_array_equal(variables["params"]["fc"]["bias"], state["fc.bias"])
  assert variables["batch_stats"]["Mixed_7c"]["branch_pool"]["bn"]["var"].shape == (192,)


@pytest.mark.parametrize(
  "edit, message",
  [
    ({"Mixed_6c.branch7x7_2.conv.weight": None}, r"missing \['Mixed_6c.branch7x7_2.conv.weight'\]"),
    ({"fc.extra": np.zeros(1)}, r"unexpected \['fc.extra'\]"),
    ({"fc.weight": np.zeros((1000, 2048))}, r"fc.weight has shape \(1000, 2048\)"),
  ],
)
def test_convert_state_dict_names_what_is_wrong(edit, message):
  state = _zero_state_dict()
  for key, value in edit.items():
    if value is None:
      del state[key]
    else:
      state[key] = value
  with pytest.raises(ValueError, match=message):
    inception.convert_state_dict(state)
