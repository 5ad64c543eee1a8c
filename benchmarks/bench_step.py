"""Training-step cost, measured side by side in one run (these machines are noisy).

Default (issue: engine): the full MoCo v2 training step of a preset (query + key forward,
backward, SGD step, momentum update, enqueue) against the bare backbone forward+backward on the
same random batch, and their ratio.

    python benchmarks/bench_step.py                                   # mocov2-r18-cifar, batch 256, 32 px
    python benchmarks/bench_step.py --preset r50-imagenet --vs mocov2 --batch 32 --size 224 \
        --num-samples 1281167                                         # InterCLR step vs MoCo v2 step

    python benchmarks/bench_step.py --precisions --batch 128          # fp32, channels_last, bf16, both

``--precisions`` (issue 17): the same step in the four settings ``train.precision`` x
``train.channels_last`` can pick, each on its own copy of the method (same seed), with the
processor's capability line and what ``auto`` resolves to on it.

Repetitions are interleaved (A, B, A, B, ...) and the median of each is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from _helpers import random_init_state

from interclr_cli.config import load_config
from interclr_cli.methods import build_method
from interclr_cli.runtime.device import autocast, memory_format
from interclr_cli.runtime.precision import cpu_caps, resolve_channels_last, resolve_precision
from interclr_cli.training.optim import build_optimizer


def make_step(cfg, num_samples: int, batch: dict, *, precision: str = "none", channels_last: bool = False):
    torch.manual_seed(0)
    method = build_method(cfg, num_samples)
    method.train()
    fmt = memory_format(channels_last)
    if channels_last:
        method = method.to(memory_format=fmt)
        batch = {k: (v.to(memory_format=fmt) if v.dim() == 4 else v) for k, v in batch.items()}
    if cfg.method.name == "interclr":
        random_init_state(method)  # bank/labels without the k-means initialisation pass
    opt = build_optimizer(cfg.optim, [{"params": method.trainable_parameters()}], cfg.optim.lr)
    state = {"step": 0}

    def step():
        with autocast(torch.device("cpu"), precision):
            loss, logs = method.training_step(batch, state["step"], 0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        method.after_optimizer_step(state["step"])
        state["step"] += 1

    return step


def make_backbone_step(cfg, batch: dict):
    from interclr_cli.models import build_backbone, use_point_output_convs

    net, _ = build_backbone(cfg.model.arch, cfg.model.small_stem)
    use_point_output_convs(net)  # as the methods' encoders use it
    net.train()
    x = batch["view1"]

    def step():
        net.zero_grad(set_to_none=True)
        net(x).sum().backward()

    return step


def timeit(fns: dict, reps: int, warmup: int) -> dict[str, float]:
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mocov2-r18-cifar")
    ap.add_argument("--vs", default="backbone", help="'backbone' (bare backbone fwd+bwd) or a method name, e.g. mocov2")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--size", type=int, default=0, help="image size (default: the preset's)")
    ap.add_argument("--num-samples", type=int, default=50000, help="data set size N (memory bank rows)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--precisions", action="store_true", help="fp32 / channels_last / bf16 / both, side by side")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = load_config(a.preset, a.overrides + ["device=cpu"])
    size = a.size or cfg.data.image_size
    torch.manual_seed(0)
    x1, x2 = torch.randn(a.batch, 3, size, size), torch.randn(a.batch, 3, size, size)
    batch = {
        "view1": x1,
        "view2": x2,
        "index": torch.randint(0, a.num_samples, (a.batch,)),
        "label": torch.full((a.batch,), -1),
    }
    if a.precisions:
        return precision_matrix(cfg, a, batch, size)
    fns = {cfg.method.name: make_step(cfg, a.num_samples, batch)}
    if a.vs == "backbone":
        fns["backbone fwd+bwd"] = make_backbone_step(cfg, batch)
    else:
        other = load_config(a.preset, a.overrides + ["device=cpu", f"method.name={a.vs}"])
        fns[a.vs] = make_step(other, a.num_samples, batch)
    res = timeit(fns, a.reps, a.warmup)
    names = list(res)
    ratio = res[names[0]] / res[names[1]]
    print(
        f"preset {a.preset}  arch {cfg.model.arch}  batch {a.batch}  {size}px  N {a.num_samples}  threads {torch.get_num_threads()}",
        file=sys.stderr,
    )
    for k, v in res.items():
        print(f"  {k:>20s}: {v * 1000:9.1f} ms/step  ({a.batch / v:7.1f} img/s)")
    print(f"  ratio {names[0]} / {names[1]}: {ratio:.3f}")
    print(
        json.dumps(
            {
                "preset": a.preset,
                "batch": a.batch,
                "size": size,
                "num_samples": a.num_samples,
                "seconds": res,
                "ratio": ratio,
            }
        ),
        file=sys.stderr,
    )


SETTINGS = {  # name -> (train.precision, channels_last)
    "fp32": ("none", False),
    "channels_last": ("none", True),
    "bf16": ("bf16", False),
    "bf16+channels_last": ("bf16", True),
}


def precision_matrix(cfg, a, batch: dict, size: int) -> None:
    """img/s of the step in each of :data:`SETTINGS`, interleaved, with the capability line."""
    caps = cpu_caps()
    auto = (resolve_precision("auto", "cpu", caps)[0], resolve_channels_last("auto", "cpu", caps)[0])
    fns = {
        name: make_step(cfg, a.num_samples, batch, precision=p, channels_last=cl) for name, (p, cl) in SETTINGS.items()
    }
    res = timeit(fns, a.reps, a.warmup)
    print(f"{caps.line()}  threads {torch.get_num_threads()}", file=sys.stderr)
    print(f"auto here: train.precision={auto[0]} train.channels_last={auto[1]}", file=sys.stderr)
    print(f"preset {a.preset}  {cfg.method.name}  arch {cfg.model.arch}  batch {a.batch}  {size}px", file=sys.stderr)
    for k, v in res.items():
        print(f"  {k:>20s}: {v * 1000:9.1f} ms/step  ({a.batch / v:7.1f} img/s)  x{res['fp32'] / v:.2f} vs fp32")
    out = {"cpu": caps.line(), "auto": {"precision": auto[0], "channels_last": auto[1]}, "preset": a.preset}
    out.update(batch=a.batch, size=size, img_per_s={k: a.batch / v for k, v in res.items()})
    print(json.dumps({**out, "speedup_vs_fp32": {k: res["fp32"] / v for k, v in res.items()}}), file=sys.stderr)


if __name__ == "__main__":
    main()
