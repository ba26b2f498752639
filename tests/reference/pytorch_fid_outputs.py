"""pytorch-fid's FID Inception with random weights, and its outputs on 2 images: the reference of
tests/test_inception.py. Runs in its own process with PYTHONPATH=.ref_pkgs (requirements-ref.txt):

  python tests/reference/pytorch_fid_outputs.py OUT_DIR

writes OUT_DIR/pt_inception.pth (the state dict) and OUT_DIR/reference.npz (images, pool, logits,
logits_unbiased).
"""

import os
import sys

import numpy as np
import torch
import torch.nn.functional as F


def import_pytorch_fid():
  """pytorch_fid.inception. PyPI's torchvision wheels link their C++ ops against CUDA builds of
  torch, so beside a CPU-only torch those ops fail to load, and torchvision 0.28 then fails on
  import at two fake-kernel registrations (nms, qnms) it does not guard. Inception needs none of
  its ops: declaring those two schemas lets the pure-Python models import."""
  try:
    import torchvision  # noqa: F401
  except RuntimeError as e:
    if "torchvision::" not in str(e):
      raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
      del sys.modules[name]
    for op in ("nms", "qnms"):
      torch.library.define(
        f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
      )
  import pytorch_fid.inception

  return pytorch_fid.inception


def randomise(net, calibration_images) -> None:
  """Random affine batch norms with running statistics of a forward pass, and a random fc layer.

  Statistics measured on images like the test's keep activations at unit scale through the
  network's depth (random ones would let them vanish or blow up), and are far from the defaults
  (mean 0, variance 1), so a wrong mean, variance or epsilon shows. Positive biases keep most
  ReLUs open: with half the units at their kinks, this random network amplifies float32 rounding
  about 5x more.
  """
  generator = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for module in net.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.weight.uniform_(0.5, 1.5, generator=generator)
        module.bias.normal_(0.5, 0.2, generator=generator)
        module.reset_running_stats()
        module.momentum = None  # a cumulative average: the statistics of this one batch
    net.train()
    net(calibration_images)
    net.fc.weight.normal_(0.0, 2048**-0.5, generator=generator)
    net.fc.bias.normal_(0.0, 1.0, generator=generator)
  net.eval()


def main(out: str) -> None:
  fid = import_pytorch_fid()
  import torchvision

  # 2 cores shared with XLA and maybe another test worker: a second torch thread only spins.
  torch.set_num_threads(1)
  torch.manual_seed(0)
  # fid_inception_v3() itself, minus the download: its architecture is exactly the reference's.
  fid.load_state_dict_from_url = lambda *args, **kwargs: None
  torchvision.models.inception.Inception3.load_state_dict = lambda *args: None
  net = fid.fid_inception_v3()
  calibration = torch.rand(2, 3, 64, 80)
  calibration = 2 * F.interpolate(calibration, (299, 299), mode="bilinear") - 1
  randomise(net, calibration)
  # pytorch-fid's InceptionV3 wrapper (resize, normalize_input, blocks, average pool) around it.
  fid.fid_inception_v3 = lambda: net
  pipeline = fid.InceptionV3([fid.InceptionV3.DEFAULT_BLOCK_INDEX]).eval()

  images = np.random.default_rng(0).uniform(size=(2, 64, 80, 3)).astype(np.float32)
  with torch.no_grad():
    (pool,) = pipeline(torch.from_numpy(images).permute(0, 3, 1, 2))
    pool = pool.flatten(1)
    outputs = {
      "pool": pool.numpy(),
      "logits": net.fc(pool).numpy(),
      "logits_unbiased": (pool @ net.fc.weight.T).numpy(),
    }
  torch.save(net.state_dict(), os.path.join(out, "pt_inception.pth"))
  np.savez(os.path.join(out, "reference.npz"), images=images, **outputs)


if __name__ == "__main__":
  main(sys.argv[1])
