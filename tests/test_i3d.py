"""I3D: numerical parity with a PyTorch InceptionI3d through the checkpoint converter."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mav_jax.eval import extractors, i3d

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
