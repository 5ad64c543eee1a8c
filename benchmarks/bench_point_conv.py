"""The 1x1-output convolution fast path (interclr_cli/models/fastconv.py), side by side.

A ResNet's forward+backward on one random batch with plain ``nn.Conv2d`` layers and with
:class:`PointOutputConv2d` (same weights), interleaved repetitions, medians and their ratio; also
the largest difference of the outputs and of the weight gradients. The fast path only acts where
a convolution's output is 1x1 (``layer4`` at 32 px with the standard stem; nothing at 224 px).

    python benchmarks/bench_point_conv.py                      # resnet18, batch 64, 32 px
    python benchmarks/bench_point_conv.py --arch resnet50 --size 64 --batch 32
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from interclr_cli.models import build_backbone, use_point_output_convs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--small-stem", action="store_true")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    plain, _ = build_backbone(a.arch, a.small_stem)
    fast = use_point_output_convs(copy.deepcopy(plain))
    x = torch.randn(a.batch, 3, a.size, a.size)

    def run(net):
        net.zero_grad(set_to_none=True)
        out = net(x)
        out.sum().backward()
        return out

    outs = {name: run(net) for name, net in (("plain", plain), ("fast", fast))}  # warm-up + check
    out_diff = (outs["plain"] - outs["fast"]).abs().max().item()
    # relative to the gradient's own scale (the sum over the batch makes some gradients large)
    grad_diff = max(
        ((p.grad - q.grad).abs().max() / p.grad.abs().max().clamp_min(1e-12)).item()
        for p, q in zip(plain.parameters(), fast.parameters())
    )
    times: dict[str, list[float]] = {"plain": [], "fast": []}
    for _ in range(a.reps):
        for name, net in (("plain", plain), ("fast", fast)):
            t = time.perf_counter()
            run(net)
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"{a.arch}{' small stem' if a.small_stem else ''}  batch {a.batch}  {a.size}px  threads {torch.get_num_threads()}"
    )
    print(f"  plain nn.Conv2d:      {med['plain'] * 1e3:8.1f} ms fwd+bwd")
    print(f"  1x1-output fast path: {med['fast'] * 1e3:8.1f} ms fwd+bwd")
    print(
        f"  speed-up plain / fast: {med['plain'] / med['fast']:.2f}x   max |diff| output {out_diff:.2e}, weight grads {grad_diff:.2e} (relative)"
    )
    print(
        json.dumps(
            {
                "arch": a.arch,
                "size": a.size,
                "batch": a.batch,
                "seconds": med,
                "speedup": med["plain"] / med["fast"],
                "max_output_diff": out_diff,
                "max_rel_grad_diff": grad_diff,
            }
        )
    )


if __name__ == "__main__":
    main()
