"""2.5D slices or 3D patches for the cbct-to-sct network: training and inference cost on CPU.

Issue 7 asks to measure and choose between 2.5D (neighbouring slices as channels) and 3D
patches. This script times one training step (forward + backward, bf16 autocast) and one
inference pass per million output voxels for:

* the shipped 2.5D GLFC network and the plain 2.5D UNet (:mod:`models.networks.glfc`), on a
  batch of 8 slices of 128 x 128 with 2 neighbours per side;
* the 3D network of the comparison, ``unet3d`` (``SCTUNet(dims=3)`` in
  :mod:`models.networks.glfc`: the plain UNet in 3D, 0.78 M parameters), on the patch it
  trains on: 1 x 16 x 128 x 128;
* the baseline: a 3D UNet of the same depth and about the same parameter count
  (MONAI ``UNet``, 3D, channels 16/32/64/128, one residual unit per level) on 2 patches of
  64 x 128 x 128 (about the voxels of a 2.5D batch x 8).

It measures cost only; ``benchmarks/sct.py`` compares the quality of the trained 2.5D and 3D
networks.

Run: ``python benchmarks/sct_dims.py [--threads 1] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _time(fn: Callable[[], None], repeats: int) -> float:
    fn()  # warm-up (oneDNN kernel selection)
    best = float("inf")
    for _ in range(repeats):
        clock = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - clock)
    return best


def main() -> int:
    """Print seconds per training step and per million voxels for each design."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import torch
    from monai.networks.nets import UNet

    from models.networks.glfc import DEFAULT_CONFIGS, build_network, parameter_count

    torch.set_num_threads(args.threads)
    designs = {
        "2.5D GLFC (ours)": (build_network(DEFAULT_CONFIGS["glfc"]), (8, 5, 128, 128)),
        "2.5D plain UNet": (build_network(DEFAULT_CONFIGS["unet"]), (8, 5, 128, 128)),
        "3D UNet (unet3d)": (build_network(DEFAULT_CONFIGS["unet3d"]), (1, 1, 16, 128, 128)),
        "3D UNet (MONAI)": (
            UNet(3, 1, 1, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=1),
            (2, 1, 64, 128, 128),
        ),
    }
    print(f"CPU, {args.threads} thread(s), bf16 autocast, best of {args.repeats}")
    print(
        f"{'design':<20} {'params':>9} {'batch':>18} {'train s/step':>13} {'s / Mvox train':>15}"
        f" {'s / Mvox infer':>15}"
    )
    for name, (net, shape) in designs.items():
        x = torch.randn(*shape)
        out_voxels = shape[0] * int(torch.tensor(shape[2:]).prod())
        opt = torch.optim.AdamW(net.parameters(), 1e-4)

        def step(
            net: torch.nn.Module = net, x: torch.Tensor = x, opt: torch.optim.Optimizer = opt
        ) -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = net(x)
            y.float().abs().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        def infer(net: torch.nn.Module = net, x: torch.Tensor = x) -> None:
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                net(x)

        train_s = _time(step, args.repeats)
        infer_s = _time(infer, args.repeats)
        mvox = out_voxels / 1e6
        print(
            f"{name:<20} {parameter_count(net):>9} {'x'.join(map(str, shape)):>18} "
            f"{train_s:>13.2f} {train_s / mvox:>15.2f} {infer_s / mvox:>15.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
