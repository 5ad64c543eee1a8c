"""One GPU check for interclr: everything issue 12 asks a GPU to measure, in one run, as one JSON object.

Runs from the source tree, no install step, no network, no faiss needed (nothing here clusters):

    PYTHONPATH=. python3 benchmarks/gpu_check.py --out benchmarks/results/gpu_check_h200.json
    PYTHONPATH=. python3 benchmarks/gpu_check.py --device cpu --tiny        # the same code, < 1 min

Sections (each has a time budget; the full run stays under 8 minutes on one H200; progress goes to
stderr; a section that fails reports ``{"error": "..."}`` and the others still run):

- ``steps``: the full training step (``PretrainTask.forward``, backward, SGD step, momentum update,
  queue, bank and online label step) of MoCo v2 (preset ``mocov2-r50-imagenet``) and InterCLR
  (``r50-imagenet``, bank of N = 1,281,167 rows allocated at full size) on random views, ResNet-50
  224 px, per-GPU batch 32 and 256 (``train.global_batch=0``), ``fp32`` (``train.precision=none``)
  and ``bf16_channels_last`` (``train.precision=bf16 train.channels_last=true``): ms per step,
  img/s, peak memory (``torch.cuda.max_memory_allocated`` during the method's warm-up, less what
  was allocated before it was built) and the InterCLR / MoCo v2 step ratio, the two timed in
  interleaved rounds (median);
- ``inter_branch``: InterCLR's inter-image branch stage by stage on the method's own bank and
  labels (random unit rows, balanced labels), timed with CUDA events (``time.perf_counter`` on
  the CPU): similarity, pool (the configured threshold's pool alone), sampling (positives +
  negatives, which include the pool again), loss (MarginNCE forward + backward), bank update,
  label step (relabel + small-cluster check), centroid recompute (every ``centroid_update_every``
  steps: ``amortised_total_ms`` spreads it), with the synchronising calls of each stage;
- ``syncs``: synchronising calls per steady-state step made from ``interclr_cli`` code (see
  ``_sync_count.py``), MoCo v2, InterCLR and NPID, steps 10 to 30; on CUDA also a few steps under
  ``torch.cuda.set_sync_debug_mode("error")``;
- ``device_augment``: nvjpeg (``decode_jpeg(device=)``) on one batch of synthetic JPEGs, ms per
  batch; ``DeviceAugment.from_images`` (crop, resize, flip, colour ops) and ``DeviceAugment``
  on cropped uint8 views (colour ops only), ms per view, B = 256, 224 px;
- ``data_path``: the pretraining data pipeline (``build_pipeline`` + ``PretrainTask._views``,
  both views on the device) in img/s with 8 and 16 workers: PIL in the workers
  (``augment_on=workers``), PIL crop + device colour (``augment_on=device decode=pil``) and
  device decode (``decode=device``). Measured from the end of the first round of batches (each
  worker builds whole batches, so batches arrive in rounds of ``num_workers``).

Synthetic JPEGs of ImageNet-like sizes (500x375 and its neighbours) are written to a temporary
folder. ``--tiny``: ResNet-18, 16 px steps at batch 4 and 8, N = 4,096, a few steps and images, 0 and 2 workers.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from _helpers import random_init_state
from _sync_count import SyncCounter, sync_debug_error

from interclr_cli.config import load_config
from interclr_cli.data.sources import FileIndex
from interclr_cli.methods import build_method
from interclr_cli.runtime.device import memory_format
from interclr_cli.training.loop import Position
from interclr_cli.training.optim import build_optimizer
from interclr_cli.training.pretraining import Pipeline, PretrainTask, build_pipeline

MOCO, INTERCLR, NPID = "mocov2-r50-imagenet", "r50-imagenet", "npid-r50-imagenet"
PRECISIONS = {
    "fp32": ["train.precision=none", "train.channels_last=false"],
    "bf16_channels_last": ["train.precision=bf16", "train.channels_last=true"],
}
JPEG_SIZES = [(500, 375), (375, 500), (500, 333), (500, 400), (400, 300)]  # (w, h), ImageNet-like


@dataclasses.dataclass
class Plan:
    """What a run measures and how long each section may take (seconds)."""

    tiny: bool
    num_samples: int = 1_281_167
    size: int = 224
    batches: tuple = (32, 256)
    warmup: int = 5
    rounds: int = 3
    steps_per_round: int = 5
    sync_warmup: int = 10
    sync_steps: int = 20
    debug_steps: int = 3
    branch_batches: tuple = (32, 256)
    branch_reps: int = 10
    jpegs: int = 1024
    workers: tuple = (8, 16)
    data_batch: int = 256
    data_size: int = 224
    data_window: float = 5.0
    aug_batch: int = 256
    aug_reps: int = 10
    overrides: tuple = ()
    budgets: dict = dataclasses.field(
        default_factory=lambda: {
            "steps": 180,
            "inter_branch": 45,
            "syncs": 60,
            "jpegs": 20,
            "device_augment": 25,
            "data_path": 100,
        }
    )
    total_budget: float = 440.0


def tiny_plan() -> Plan:
    return Plan(
        tiny=True,
        num_samples=4096,
        size=16,
        batches=(4, 8),
        warmup=1,
        rounds=2,
        steps_per_round=1,
        sync_warmup=2,
        sync_steps=3,
        debug_steps=2,
        branch_batches=(16,),
        branch_reps=2,
        jpegs=24,
        workers=(0, 2),
        data_batch=8,
        data_size=64,
        data_window=0.0,
        aug_batch=8,
        aug_reps=2,
        overrides=(
            "model.arch=resnet18",
            "model.head_hidden=256",
            "method.queue_size=1024",
            "method.inter.num_negatives=256",
            "method.inter.pool_size=512",
            "method.inter.pool_sample=1024",
            "method.npid.num_negatives=256",
        ),
        budgets={k: 30 for k in ("steps", "inter_branch", "syncs", "jpegs", "device_augment", "data_path")},
        total_budget=120.0,
    )


# ----------------------------------------------------------------------------- small utilities


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(seconds: list[float]) -> float:
    return round(statistics.median(seconds) * 1000, 3)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Deadline:
    """A section's time budget: ``left()`` seconds remain; ``over()`` when spent."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def over(self) -> bool:
        return self.left() <= 0


@contextlib.contextmanager
def hard_limit(seconds: float):
    """Raise TimeoutError in the main thread after ``seconds`` (SIGALRM; a no-op where missing)."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def on_alarm(signum, frame):
        raise TimeoutError(f"section ran past its hard limit of {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(1.0, seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def config(preset: str, plan: Plan, device: torch.device, extra: list[str]):
    """A preset's config with the plan's overrides (e.g. the tiny model) and ``extra`` ones."""
    return load_config(preset, [*plan.overrides, f"device={device}", "train.global_batch=0", *extra])


# ----------------------------------------------------------------------------- training steps


def wants_channels_last(cfg) -> bool:
    """``train.channels_last`` as set by :data:`PRECISIONS` (a bool, or the strings of an auto switch)."""
    value = cfg.train.channels_last
    return value is True or str(value).lower() == "true"


class Stepper:
    """One method's training step on fixed random views, as the training loop runs it."""

    def __init__(self, preset: str, plan: Plan, device: torch.device, batch: int, precision: str):
        cfg = config(preset, plan, device, [f"train.batch_size={batch}", *PRECISIONS[precision]])
        self.device, self.batch = device, batch
        method = build_method(cfg, plan.num_samples).to(device)
        if wants_channels_last(cfg):
            method = method.to(memory_format=memory_format(True))
        if hasattr(method, "labels") and hasattr(method, "bank"):
            random_init_state(method)  # bank rows and balanced labels without the k-means pass
        self.method = method
        self.opt = build_optimizer(cfg.optim, [{"params": method.trainable_parameters()}], cfg.optim.lr)
        pipeline = Pipeline(loader=None, sampler=None, augment=None, store=None)
        self.task = PretrainTask(
            cfg=cfg,
            method=method,
            ddp=None,
            pipeline=pipeline,
            device=device,
            ctx=None,
            monitor=None,
            reporter=None,
            metrics=None,
        )
        method.train()
        self.pos = Position()
        g = torch.Generator().manual_seed(0)
        views = [torch.randn(batch, 3, plan.size, plan.size, generator=g) for _ in range(2)]
        self.views = [v.to(device) for v in views]
        self.indices = [torch.randint(0, plan.num_samples, (batch,), generator=g).to(device) for _ in range(8)]
        self.label = torch.full((batch,), -1, dtype=torch.long, device=device)

    def step(self) -> None:
        pos = self.pos
        batch = {
            "view1": self.views[0],
            "view2": self.views[1],
            "index": self.indices[pos.step % len(self.indices)],
            "label": self.label,
        }
        loss, _ = self.task.forward(batch, pos)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.task.after_optimizer_step(pos.step)
        pos.step += 1
        pos.step_in_epoch += 1

    def settings(self) -> dict:
        """The step's precision and memory formats as the task and the model have them."""
        conv = next(p for p in self.method.parameters() if p.dim() == 4)
        return {
            "precision": str(self.task.cfg.train.precision),
            "views_channels_last": self.task.fmt == torch.channels_last,
            "weights_channels_last": conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous(),
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
        }

    def run(self, n: int) -> float:
        """Seconds for ``n`` steps, the device synchronised before and after."""
        sync(self.device)
        t0 = time.perf_counter()
        for _ in range(n):
            self.step()
        sync(self.device)
        return time.perf_counter() - t0


def warm_up(stepper: Stepper, steps: int) -> Optional[float]:
    """Warm-up steps (cudnn autotuning, buffers); on CUDA the peak of allocated memory since the
    last ``reset_peak_memory_stats`` (bytes), else None."""
    stepper.run(steps)
    if stepper.device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(stepper.device)


def time_pair(plan: Plan, device: torch.device, batch: int, precision: str, deadline: Deadline) -> dict:
    """MoCo v2 and InterCLR at one batch and precision: warm-up each alone (peak memory), then
    interleaved timed rounds; median ms per step, img/s, peak memory, the ratio."""
    out: dict = {}
    steppers: dict[str, Stepper] = {}
    for name, preset in (("mocov2", MOCO), ("interclr", INTERCLR)):
        free_memory()
        base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        steppers[name] = Stepper(preset, plan, device, batch, precision)
        peak = warm_up(steppers[name], plan.warmup)
        out[name] = {"peak_mem_gb": None if peak is None else round((peak - base) / 2**30, 3)}
    times: dict[str, list[float]] = {k: [] for k in steppers}
    for r in range(plan.rounds):
        if r > 0 and deadline.over():
            break
        for name, s in steppers.items():
            times[name].append(s.run(plan.steps_per_round) / plan.steps_per_round)
    for name, t in times.items():
        ms = median_ms(t)
        out[name].update({"step_ms": ms, "img_s": round(batch * 1000 / ms, 1), "rounds": len(t)})
    out["ratio_interclr_mocov2"] = round(out["interclr"]["step_ms"] / out["mocov2"]["step_ms"], 4)
    out["settings"] = steppers["interclr"].settings()
    del steppers
    free_memory()
    return out


def section_steps(plan: Plan, device: torch.device, deadline: Deadline) -> dict:
    res: dict = {}
    for precision in PRECISIONS:
        res[precision] = {}
        for b in plan.batches:
            if deadline.over():
                res[precision][f"b{b}"] = {"error": "skipped: the section's time budget was spent"}
                continue
            log(f"steps: {precision}, batch {b}")
            try:
                res[precision][f"b{b}"] = time_pair(plan, device, b, precision, deadline)
            except Exception as e:  # one configuration failing (e.g. out of memory) keeps the others
                res[precision][f"b{b}"] = {"error": f"{type(e).__name__}: {e}"[:500]}
                free_memory()
    return res


# ----------------------------------------------------------------------------- inter-branch breakdown


class StageTimer:
    """Times named stages: CUDA events on a GPU (read once at the end), perf_counter on the CPU;
    also counts each stage's synchronising calls from interclr_cli code."""

    def __init__(self, device: torch.device, counter: SyncCounter):
        self.cuda = device.type == "cuda"
        self.counter = counter
        self.pending: list[tuple[str, object, object]] = []
        self.seconds: dict[str, list[float]] = {}
        self.syncs: dict[str, int] = {}

    def __call__(self, name: str, fn: Callable):
        before = self.counter.direct + self.counter.indirect
        if self.cuda:
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            out = fn()
            e1.record()
            self.pending.append((name, e0, e1))
        else:
            t0 = time.perf_counter()
            out = fn()
            self.seconds.setdefault(name, []).append(time.perf_counter() - t0)
        self.syncs[name] = self.syncs.get(name, 0) + self.counter.direct + self.counter.indirect - before
        return out

    def collect(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            for name, e0, e1 in self.pending:
                self.seconds.setdefault(name, []).append(e0.elapsed_time(e1) / 1000)
            self.pending.clear()


def branch_once(m, b: int, timer: StageTimer, gen: torch.Generator, work: dict) -> None:
    """One inter-image branch of a batch of ``b`` random queries/keys, stage by stage, on the
    InterCLR method ``m``'s bank and labels with its configuration (as ``inter_loss`` and
    ``after_optimizer_step`` call them)."""
    from interclr_cli.losses import margin_nce
    from interclr_cli.memory import LabelIndex, pool_threshold, sample_negatives, sample_positives

    it, bank, labels = m.inter_cfg, m.bank, m.labels
    dev, n = bank.features.device, bank.num_samples
    q = F.normalize(torch.randn(b, bank.dim, device=dev, generator=gen), dim=1).requires_grad_()
    k = F.normalize(torch.randn(b, bank.dim, device=dev, generator=gen), dim=1)
    idx = torch.randint(0, n, (b,), device=dev, generator=gen)
    if work.get("sim") is None or work["sim"].shape[0] != b:
        work["sim"] = torch.empty(b, n, device=dev)
    sim = timer("similarity", lambda: bank.similarity(q.detach(), out=work["sim"]))
    if it.pool_threshold == "exact":
        timer("pool", lambda: torch.topk(sim, m.pool_size, dim=1, sorted=False))
    else:
        timer("pool", lambda: pool_threshold(sim, m.pool_size, it.neg_sampling != "semieasy", gen, it.pool_sample))

    def sampling():
        ql = labels.labels[idx]
        pos = sample_positives(labels.labels, ql, gen, LabelIndex.build(labels.labels))
        neg = sample_negatives(
            sim, labels.labels, ql, it.neg_sampling, it.num_negatives, m.pool_size, gen, it.pool_threshold,
            it.pool_sample, work,
        )  # fmt: skip
        return pos, neg

    pos, neg = timer("sampling", sampling)

    def loss():
        pos_cos = (q * bank.rows(pos)).sum(1)
        neg_cos = bank.cosine(q, neg.indices, sim)
        margin_nce(pos_cos, neg_cos, it.temperature, it.margin, it.margin_type, neg.valid).backward()

    timer("loss", loss)
    timer("bank_update", lambda: bank.update(idx, k, it.bank_momentum))
    step = 0 if labels.centroid_update_every != 1 else 1  # a step without the centroid pass
    timer("label_step", lambda: labels.step(step, idx, bank.rows(idx), bank.features, gen))
    timer("centroid_recompute", lambda: labels.recompute_centroids(bank.features))


STAGES = ("similarity", "pool", "sampling", "loss", "bank_update", "label_step", "centroid_recompute")


def section_inter_branch(plan: Plan, device: torch.device, deadline: Deadline) -> dict:
    cfg = config(INTERCLR, plan, device, ["train.batch_size=32"])
    m = build_method(cfg, plan.num_samples).to(device)
    random_init_state(m)
    res: dict = {
        "num_samples": m.num_samples,
        "clusters": m.num_clusters,
        "pool": m.pool_size,
        "negatives": cfg.method.inter.num_negatives,
        "pool_threshold": cfg.method.inter.pool_threshold,
        "note": "sampling_ms includes the pool selection again (pool_ms is that part alone)",
    }
    gen = torch.Generator(device=device).manual_seed(0)
    for b in plan.branch_batches:
        log(f"inter_branch: batch {b}")
        work: dict = {}
        with SyncCounter() as counter:
            branch_once(m, b, StageTimer(device, counter), gen, work)  # warm-up
            timer = StageTimer(device, counter)
            for r in range(plan.branch_reps):
                if r > 1 and deadline.over():
                    break
                branch_once(m, b, timer, gen, work)
            timer.collect()
        reps = len(timer.seconds["similarity"])
        row = {f"{s}_ms": median_ms(timer.seconds[s]) for s in STAGES}
        per_step = sum(row[f"{s}_ms"] for s in STAGES if s not in ("pool", "centroid_recompute"))
        row["total_ms"] = round(per_step, 3)
        every = max(1, m.labels.centroid_update_every)
        row["amortised_total_ms"] = round(per_step + row["centroid_recompute_ms"] / every, 3)
        row["syncs_per_call"] = {s: timer.syncs.get(s, 0) / (reps + 1) for s in STAGES}
        row["repetitions"] = reps
        res[f"b{b}"] = row
    del m
    free_memory()
    return res


# ----------------------------------------------------------------------------- syncs per step


def section_syncs(plan: Plan, device: torch.device, deadline: Deadline) -> dict:
    res: dict = {"window": f"steps {plan.sync_warmup} to {plan.sync_warmup + plan.sync_steps}"}
    b = plan.batches[0]
    precision = "bf16_channels_last" if device.type == "cuda" else "fp32"
    res["batch"], res["precision"] = b, precision
    for name, preset in (("interclr", INTERCLR), ("mocov2", MOCO), ("npid", NPID)):
        if deadline.over():
            res[name] = {"error": "skipped: the section's time budget was spent"}
            continue
        log(f"syncs: {name}")
        try:
            s = Stepper(preset, plan, device, b, precision)
            s.run(plan.sync_warmup)
            with SyncCounter() as counter:
                s.run(plan.sync_steps)
            row = counter.summary(plan.sync_steps)
            if device.type == "cuda":
                # plain steps: Stepper.run's own torch.cuda.synchronize would count as a sync
                row["sync_debug_error_mode"] = sync_debug_error(lambda s=s: [s.step() for _ in range(plan.debug_steps)])
            else:
                row["sync_debug_error_mode"] = {"skipped": "needs CUDA"}
            res[name] = row
            del s
        except Exception as e:
            res[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
        free_memory()
    return res


# ----------------------------------------------------------------------------- synthetic JPEGs


def write_jpegs(folder: Path, count: int) -> tuple[list[str], dict]:
    """``count`` JPEGs of ImageNet-like sizes and content (smooth colour fields + grain),
    quality 90, written in parallel; their paths and sizes."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)

    def one(i: int) -> tuple[str, int]:
        w, h = JPEG_SIZES[i % len(JPEG_SIZES)]
        g = torch.Generator().manual_seed(i)
        field = F.interpolate(torch.rand(1, 3, 6, 8, generator=g), size=(h, w), mode="bicubic", align_corners=False)
        px = field[0] * 200 + torch.randn(3, h, w, generator=g) * 12 + 28
        arr = px.clamp(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
        path = folder / f"img_{i:05d}.jpg"
        Image.fromarray(arr).save(path, quality=90)
        return str(path), path.stat().st_size

    with ThreadPoolExecutor(max_workers=16) as pool:
        made = list(pool.map(one, range(count)))
    sizes = [s for _, s in made]
    info = {"count": count, "sizes_wh": JPEG_SIZES, "mean_kb": round(sum(sizes) / len(sizes) / 1024, 1)}
    return [p for p, _ in made], info


def file_index(paths: list[str], length: int) -> FileIndex:
    """An unlabelled index of ``length`` entries cycling over ``paths`` (the same files re-read)."""
    cycled = [paths[i % len(paths)] for i in range(length)]
    return FileIndex(
        root=str(Path(paths[0]).parent), paths=cycled, labels=np.full(length, -1, dtype=np.int64), classes=[]
    )


# ----------------------------------------------------------------------------- device augmentation


def section_device_augment(plan: Plan, device: torch.device, paths: list[str], deadline: Deadline) -> dict:
    from interclr_cli.data import DeviceAugment
    from interclr_cli.data.decode import decode_batch, read_encoded
    from interclr_cli.data.device_aug import PaddedImages

    cfg = config(MOCO, plan, device, [f"data.image_size={plan.data_size}"])
    res: dict = {"batch": plan.aug_batch, "size": plan.data_size}
    encoded = [read_encoded(paths[i % len(paths)]) for i in range(plan.aug_batch)]
    res["device_decoder"] = nvjpeg_check(encoded[0], device)
    aug = DeviceAugment(cfg.data, device, seed=0)
    images = PaddedImages(decode_batch(encoded, device), device)
    crops = torch.randint(0, 256, (plan.aug_batch, 3, plan.data_size, plan.data_size), dtype=torch.uint8)
    crops = crops.to(device)
    fns = {
        "decode_ms_per_batch": lambda: decode_batch(encoded, device),
        "from_images_ms_per_view": lambda: aug.from_images(images, epoch=0, step_in_epoch=0, view=0),
        "colour_ms_per_view": lambda: aug(crops, epoch=0, step_in_epoch=0, view=0),
    }
    with torch.no_grad():
        for key, fn in fns.items():
            log(f"device_augment: {key}")
            fn()  # warm-up
            times = []
            for r in range(plan.aug_reps):
                if r > 0 and deadline.over():
                    break
                sync(device)
                t0 = time.perf_counter()
                fn()
                sync(device)
                times.append(time.perf_counter() - t0)
            res[key] = median_ms(times)
    return res


def nvjpeg_check(data: torch.Tensor, device: torch.device) -> dict:
    """Whether ``decode_jpeg(device=)`` itself works here (``decode_batch`` would quietly fall
    back to PIL, which would make the device-decode figures PIL's)."""
    import warnings

    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            out = decode_jpeg([data], mode=ImageReadMode.RGB, device=device)[0]
        sync(device)
        return {"ok": True, "device": str(out.device), "shape": list(out.shape)}
    except Exception as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}"[:300]}


# ----------------------------------------------------------------------------- data path


DATA_PATHS = {
    "pil_workers": ["data.augment_on=workers", "data.decode=pil"],
    "pil_crop_device_colour": ["data.augment_on=device", "data.decode=pil"],
    "device_decode": ["data.augment_on=device", "data.decode=device"],
}


def data_rate(plan: Plan, device: torch.device, paths: list[str], workers: int, extra: list[str]) -> dict:
    """img/s of one pipeline: both views on the device, from the end of the first round of batches."""
    b = plan.data_batch
    overrides = [f"data.image_size={plan.data_size}", f"train.batch_size={b}", f"data.num_workers={workers}"]
    cfg = config(MOCO, plan, device, overrides + extra + ["data.in_memory=false", f"data.root={Path(paths[0]).parent}"])
    rounds = max(1, workers)
    length = b * (rounds * 2 + 2) if plan.tiny else max(len(paths), b * 96)
    pipeline = build_pipeline(cfg, file_index(paths, length), device)
    task = PretrainTask(
        cfg=cfg, method=None, ddp=None, pipeline=pipeline, device=device, ctx=None, monitor=None, reporter=None,
        metrics=None,
    )  # fmt: skip
    pipeline.sampler.set_epoch(0)
    pos, counted, t0, t_start = Position(), 0, None, time.perf_counter()
    iterator = iter(pipeline.loader)
    for i, batch in enumerate(iterator):
        views = task._views(batch, pos)
        if i + 1 == rounds:  # the first round (and the workers' start-up) is not counted
            sync(device)
            t0 = time.perf_counter()
            continue
        if t0 is not None:
            counted += int(views["index"].numel())
            enough = i + 1 >= 3 * rounds and time.perf_counter() - t0 >= plan.data_window
            if enough and (i + 1) % rounds == 0:
                break
    if t0 is None or counted == 0:
        raise RuntimeError(f"the loader gave too few batches to time ({rounds} start-up + at least one)")
    sync(device)
    elapsed = time.perf_counter() - t0
    del iterator, pipeline, task
    return {"img_s": round(counted / elapsed, 1), "images": counted, "seconds": round(elapsed, 2),
            "startup_s": round(t0 - t_start, 2)}  # fmt: skip


def section_data_path(plan: Plan, device: torch.device, paths: list[str], deadline: Deadline) -> dict:
    res: dict = {"batch": plan.data_batch, "size": plan.data_size, "views": 2}
    for w in plan.workers:
        row: dict = {}
        for name, extra in DATA_PATHS.items():
            if deadline.over():
                row[f"{name}_img_s"] = None
                row[f"{name}_error"] = "skipped: the section's time budget was spent"
                continue
            log(f"data_path: {name}, {w} workers")
            try:
                r = data_rate(plan, device, paths, w, extra)
                row[f"{name}_img_s"], row[f"{name}_detail"] = r["img_s"], r
            except Exception as e:
                row[f"{name}_img_s"], row[f"{name}_error"] = None, f"{type(e).__name__}: {e}"[:500]
        res[f"workers_{w}"] = row
    return res


# ----------------------------------------------------------------------------- the run


def environment(device: torch.device, plan: Plan) -> dict:
    import torchvision

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(),
        "faiss": _importable("faiss"),
        "mode": "tiny" if plan.tiny else "full",
        "num_samples": plan.num_samples,
        "image_size": plan.size,
        "arch": "resnet18" if plan.tiny else "resnet50",
    }
    if device.type == "cuda":
        env["cudnn_benchmark"] = torch.backends.cudnn.benchmark
        env["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        env["tf32_cudnn"] = torch.backends.cudnn.allow_tf32
    return env


def _importable(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def summarise(report: dict, plan: Plan) -> dict:
    """The headline figures and issue 12's GPU targets: each True/False, or None where a section did
    not produce it or the run is not the full one on CUDA (``targets_apply``; the targets are
    about ResNet-50 at batch 256 on a GPU, not the tiny mode)."""
    steps, big = report.get("steps", {}), f"b{plan.batches[-1]}"
    ratios = {
        f"{p}_{b}": steps.get(p, {}).get(b, {}).get("ratio_interclr_mocov2")
        for p in PRECISIONS
        for b in (f"b{x}" for x in plan.batches)
    }
    syncs = {k: report.get("syncs", {}).get(k, {}).get("direct_per_step") for k in ("interclr", "mocov2", "npid")}
    dp = report.get("data_path", {}).get(f"workers_{plan.workers[-1]}", {})
    applies = not plan.tiny and report["environment"]["device"].startswith("cuda")
    ratio_big, decode = ratios.get(f"bf16_channels_last_{big}"), dp.get("device_decode_img_s")
    measured_syncs = [v for v in syncs.values() if v is not None]

    def target(value, ok: bool):
        return None if value is None or not applies else ok

    return {
        "ratio_interclr_mocov2": ratios,
        "syncs_per_step": syncs,
        "targets_apply": applies,
        "targets": {
            "ratio_bf16_max_batch_le_1.05": target(ratio_big, ratio_big is not None and ratio_big <= 1.05),
            "device_decode_ge_2000_img_s": target(decode, decode is not None and decode >= 2000),
            "zero_syncs_per_step": target(measured_syncs or None, all(v == 0 for v in measured_syncs)),
        },
    }


def run(plan: Plan, device: torch.device, only: Optional[set]) -> dict:
    start = time.monotonic()
    report: dict = {"script": "benchmarks/gpu_check.py", "environment": environment(device, plan)}
    seconds: dict = {}
    tmp = Path(tempfile.mkdtemp(prefix="interclr_gpu_check_"))
    paths: list[str] = []

    def section(name: str, fn: Callable[[Deadline], dict], needed: bool = False) -> None:
        if only is not None and name not in only and not needed:
            return
        left = plan.total_budget - (time.monotonic() - start)
        if left <= 5:
            report[name] = {"error": "skipped: the run's total time budget was spent"}
            return
        budget = min(plan.budgets[name], left)
        log(f"section {name} (budget {budget:.0f} s)")
        t0 = time.monotonic()
        try:
            with hard_limit(budget * 1.5 + 15):
                report[name] = fn(Deadline(budget))
        except Exception as e:  # a failing section reports its error; the others still run
            report[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
        seconds[name] = round(time.monotonic() - t0, 1)
        free_memory()

    def jpegs(_d: Deadline) -> dict:
        made, info = write_jpegs(tmp / "jpegs", plan.jpegs)
        paths.extend(made)
        return info

    try:
        section("steps", lambda d: section_steps(plan, device, d))
        section("inter_branch", lambda d: section_inter_branch(plan, device, d))
        section("syncs", lambda d: section_syncs(plan, device, d))
        section("jpegs", jpegs, needed=only is not None and bool({"device_augment", "data_path"} & only))
        section("device_augment", lambda d: section_device_augment(plan, device, paths, d))
        section("data_path", lambda d: section_data_path(plan, device, paths, d))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report["summary"] = summarise(report, plan)
    report["section_seconds"] = seconds
    report["total_seconds"] = round(time.monotonic() - start, 1)
    return report


SECTIONS = ("steps", "inter_branch", "syncs", "jpegs", "device_augment", "data_path")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    ap.add_argument("--tiny", action="store_true", help="small model, bank and data: the same code in < 1 min")
    ap.add_argument("--out", type=Path, help="also write the JSON object to this file")
    ap.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    ap.add_argument(
        "--threads", type=int, default=-1, help="torch CPU threads (default: 1 with --device cpu --tiny, else torch's)"
    )
    a = ap.parse_args()
    threads = a.threads if a.threads >= 0 else (1 if a.tiny and a.device == "cpu" else 0)
    if threads > 0:  # one thread: a busy small CPU makes OpenMP's barriers cost ~100 ms per op
        torch.set_num_threads(threads)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device is visible; use --device cpu (with --tiny for a quick run)")
    device = torch.device(a.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # as a GPU training run would set it
    plan = tiny_plan() if a.tiny else Plan(tiny=False)
    torch.manual_seed(0)
    report = run(plan, device, set(a.only) if a.only else None)
    text = json.dumps(report, indent=1, default=str)
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text + "\n")
    print(text)
    log(f"done in {report['total_seconds']} s")


if __name__ == "__main__":
    main()
