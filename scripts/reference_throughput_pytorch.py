r"""Train-step time of lucidrains' make-a-video-pytorch SpaceTimeUnet: the reference of the README's
performance section. Not a dependency of mav_jax; install it beside the project first:

  pip install --no-deps --target workdirs/ref_pkgs make-a-video-pytorch==0.4.0 einops==0.8.2 \
      beartype==0.23.1
  PYTHONPATH=workdirs/ref_pkgs .venv/bin/python scripts/reference_throughput_pytorch.py

The model is the issue's reference: dim 64, mults (1, 2, 4, 8), one resnet block per level and two
at the last, attention at the last level (the package's defaults otherwise), on a batch of 2 clips
of 8 frames at 32x32, one Adam step per iteration (MSE to the noise), PyTorch
on `--threads` CPU threads. Prints parameters, the median seconds per step and samples per second.
"""

import argparse
import statistics
import time

import torch
from make_a_video_pytorch import SpaceTimeUnet


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--frames", type=int, default=8)
  parser.add_argument("--size", type=int, default=32)
  parser.add_argument("--steps", type=int, default=5, help="timed steps (after 2 warm-up steps)")
  args = parser.parse_args()
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  model = SpaceTimeUnet(
    dim=64,
    channels=3,
    dim_mult=(1, 2, 4, 8),
    resnet_block_depths=(1, 1, 1, 2),
    self_attns=(False, False, False, True),
    temporal_compression=(False, True, True, True),
  )
  params = sum(p.numel() for p in model.parameters())
  opt = torch.optim.Adam(model.parameters(), lr=1e-4)
  x = torch.randn(args.batch, 3, args.frames, args.size, args.size)
  times = []
  for i in range(args.steps + 2):
    start = time.perf_counter()
    noise = torch.randn_like(x)
    t = torch.rand(args.batch)
    loss = torch.nn.functional.mse_loss(model(x + noise, t), noise)
    opt.zero_grad()
    loss.backward()
    opt.step()
    if i >= 2:
      times.append(time.perf_counter() - start)
  step = statistics.median(times)
  print(
    f"make-a-video-pytorch SpaceTimeUnet: {params:,} parameters, batch {args.batch} x "
    f"{args.frames} x {args.size}x{args.size}, {args.threads} threads: {step:.3f} s/step "
    f"(median of {args.steps}), {args.batch / step:.2f} samples/s"
  )


if __name__ == "__main__":
  main()
