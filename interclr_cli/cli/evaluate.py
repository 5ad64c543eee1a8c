"""The downstream commands: linear-eval, finetune, knn, cluster, rankme, export (parse, call, print).

Every command takes the checkpoint first (a pretrain or finetune checkpoint, an ``interclr export``
file, or ``random:resnet18[-small]`` for a seeded random baseline), then ``key=value`` overrides.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import List, Optional

import typer

from ..errors import UserError
from ..runtime.safefile import verification
from .common import ForceOpt, JsonOpt, NoVerifyOpt, OverridesArg, PresetOpt, emit_json, setup_logging

CkptArg = typer.Argument(
    ...,
    help="A pretrain/finetune checkpoint (.safetensors), an `interclr export` file, or random:resnet18[-small].",
    show_default=False,
)
RunOutOpt = typer.Option(None, "--out", "-o", help="Run folder (default: runs/<command>-<timestamp>).")
QuietOpt = typer.Option(False, "--quiet", "-q", help="Only warnings and errors on stderr; no progress bars.")

CHECKPOINT_NOTE = """
The checkpoint is a file written by `interclr pretrain` or `interclr finetune`, an `interclr export` file, or
random:ARCH[-small] (resnet18, resnet34, resnet50: a randomly initialised backbone with a fixed seed, the baseline).
The architecture always comes from the checkpoint. Without --preset the command uses linear-r18-cifar for
small-stem checkpoints or ones trained at <= 64 px, else linear-r50-imagenet (finetune: finetune-r18-cifar or
finetune-r50-imagenet-10pct).
"""


def _flat(result: dict) -> dict:
    out = {}
    for k, v in result.items():
        if isinstance(v, dict):
            for kk, vv in v.items():
                out[f"{k}@{kk}"] = vv
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            continue
        elif isinstance(v, list):
            out[k] = ", ".join(str(x) for x in v)
        else:
            out[k] = v
    return out


def _show(result: dict, as_json: bool, title: str) -> None:
    if as_json:
        emit_json(result)
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, show_header=False, box=None)
    for k, v in _flat(result).items():
        if isinstance(v, float):
            v = "nan" if not math.isfinite(v) else f"{v:.4g}"
        t.add_row(f"[bold]{k}[/bold]", "-" if v is None else str(v))
    Console().print(t)


def _split_ckpt(checkpoint: Optional[str], overrides: Optional[List[str]]) -> tuple[Optional[str], list[str]]:
    """With --resume or --from-* the checkpoint may be absent: a first positional key=value is an override."""
    ov = list(overrides or [])
    if checkpoint and "=" in checkpoint and not checkpoint.startswith("random:") and not Path(checkpoint).exists():
        return None, [checkpoint, *ov]
    return checkpoint, ov


# --- linear-eval ---------------------------------------------------------------------------------


def linear_eval(
    checkpoint: str = CkptArg,
    overrides: Optional[List[str]] = OverridesArg,
    preset: Optional[str] = PresetOpt,
    out: Optional[str] = RunOutOpt,
    cached_features: Optional[bool] = typer.Option(
        None,
        "--cached-features/--no-cached-features",
        help="Extract the frozen features once (centre crop) and train on them: minutes instead of hours.",
        show_default=False,
    ),
    aug_copies: Optional[int] = typer.Option(
        None,
        "--aug-copies",
        help="With --cached-features: also cache this many augmented copies of the training set.",
        show_default=False,
    ),
    force: bool = ForceOpt,
    as_json: bool = JsonOpt,
    quiet: bool = QuietOpt,
    no_verify: bool = NoVerifyOpt,
) -> None:
    from ..commands import run_linear_eval

    setup_logging(quiet)
    ov = list(overrides or [])
    if cached_features is not None:
        ov.append(f"eval.cached_features={str(cached_features).lower()}")
    if aug_copies is not None:
        if aug_copies < 0:
            raise UserError(f"--aug-copies must be >= 0; got {aug_copies}")
        ov.append(f"eval.cached_aug_copies={aug_copies}")
    with verification(not no_verify):
        result = run_linear_eval(checkpoint, preset, ov, out=out, force=force, show_progress=not quiet)
    _show(result, as_json, "linear-eval")


linear_eval.__doc__ = (
    """Train a linear classifier on the frozen backbone; report top-1/top-5 on the validation split.

data.root holds train/ and val/ (or test/) ImageFolder trees (or set data.train=... data.val=...).
Writes metrics.jsonl (per epoch) and classifier.safetensors to the run folder. --json keys: top1, top5,
checkpoint (the classifier), mode (augmented or cached-features), best_top1, run_dir.
"""
    + CHECKPOINT_NOTE
    + """
Examples:

  interclr linear-eval runs/x/checkpoints/ckpt-e0200-s00100000.safetensors --preset linear-r50-imagenet data.root=/data/imagenet

  interclr linear-eval ckpt.safetensors --preset linear-r18-cifar data.root=/data/cifar10 --cached-features

  interclr linear-eval random:resnet18 --preset linear-r18-cifar data.root=builtin:cifar10-mini --cached-features --json

  torchrun --nproc-per-node 8 -m interclr_cli linear-eval ckpt.safetensors --preset linear-r50-imagenet data.root=/data/imagenet train.batch_size=32

Under torchrun or srun, linear-eval, finetune, knn and cluster run on every process (train.batch_size is per
process; README, Multi-GPU).
"""
)


# --- finetune ------------------------------------------------------------------------------------


def finetune(
    checkpoint: Optional[str] = typer.Argument(
        None, help="The checkpoint to fine-tune (not needed with --resume).", show_default=False
    ),
    overrides: Optional[List[str]] = OverridesArg,
    preset: Optional[str] = PresetOpt,
    out: Optional[str] = RunOutOpt,
    label_fraction: Optional[float] = typer.Option(
        None,
        "--label-fraction",
        help="Fine-tune on a stratified, seeded fraction of the labels, in (0, 1], e.g. 0.01 or 0.1.",
        show_default=False,
    ),
    label_list: Optional[str] = typer.Option(
        None,
        "--label-list",
        help="Fine-tune on the files named in this list (one file name a line, e.g. ImageNet's 1percent.txt).",
        show_default=False,
    ),
    resume: Optional[str] = typer.Option(
        None,
        "--resume",
        help="Continue a run: alone, the latest checkpoint in --out; or a run folder or checkpoint path.",
        show_default=False,
    ),
    force: bool = ForceOpt,
    as_json: bool = JsonOpt,
    quiet: bool = QuietOpt,
    no_verify: bool = NoVerifyOpt,
) -> None:
    from ..commands import run_finetune

    setup_logging(quiet)
    checkpoint, ov = _split_ckpt(checkpoint, overrides)
    if label_fraction is not None and label_list is not None:
        raise UserError("give either --label-fraction or --label-list, not both")
    if label_fraction is not None:
        if not (math.isfinite(label_fraction) and 0.0 < label_fraction <= 1.0):
            raise UserError(f"--label-fraction must be in (0, 1], e.g. 0.01 or 0.1; got {label_fraction:g}")
        ov.append(f"data.label_fraction={label_fraction!r}")
    if label_list is not None:
        ov += [f"data.label_list={label_list}", "data.label_fraction=1.0"]
    with verification(not no_verify):
        result = run_finetune(checkpoint, preset, ov, out=out, resume=resume, force=force, show_progress=not quiet)
    _show(result, as_json, "finetune")


finetune.__doc__ = (
    """Fine-tune the whole network with a new linear head, on all labels or a fraction of them.

Separate learning rates: the backbone at optim.lr, the head at optim.lr x optim.head_lr_mult. The labelled
subset is written to label_subset.txt in the run folder. Checkpoints, --resume, metrics.jsonl and progress work
as in pretrain. --json keys: top1, top5, checkpoint, run_dir, num_labelled, subset.
"""
    + CHECKPOINT_NOTE
    + """
Examples:

  interclr finetune ckpt.safetensors --preset finetune-r50-imagenet-1pct data.root=/data/imagenet

  interclr finetune ckpt.safetensors --preset finetune-r50-imagenet-10pct data.root=/data/imagenet --label-list 10percent.txt

  interclr finetune ckpt.safetensors --preset finetune-r18-cifar data.root=/data/cifar10 --label-fraction 0.1 --out runs/ft

  interclr finetune --out runs/ft --resume
"""
)


# --- knn -----------------------------------------------------------------------------------------


def knn(
    checkpoint: str = CkptArg,
    overrides: Optional[List[str]] = OverridesArg,
    preset: Optional[str] = PresetOpt,
    out: Optional[str] = RunOutOpt,
    k: Optional[List[int]] = typer.Option(
        None, "--k", help="Neighbour count; repeat for several (default eval.knn_k = 20 and 200).", show_default=False
    ),
    temperature: Optional[float] = typer.Option(
        None, "--temperature", help="Vote temperature (default eval.knn_temperature = 0.07).", show_default=False
    ),
    force: bool = ForceOpt,
    as_json: bool = JsonOpt,
    quiet: bool = QuietOpt,
    no_verify: bool = NoVerifyOpt,
) -> None:
    from ..commands import run_knn

    setup_logging(quiet)
    ov = list(overrides or [])
    if k:
        ov.append("eval.knn_k=" + ",".join(str(int(x)) for x in k))
    if temperature is not None:
        ov.append(f"eval.knn_temperature={temperature!r}")
    with verification(not no_verify):
        result = run_knn(checkpoint, preset, ov, out=out, force=force, show_progress=not quiet)
    _show(result, as_json, "knn")


knn.__doc__ = (
    """Weighted kNN classification (cosine, temperature 0.07) of val features against train features.

Reports top-1 per k (default k = 20 and 200). data.root holds train/ and val/ (or test/) ImageFolder trees.
The similarity matrix is processed in chunks and never held whole. --json keys: top1 (an object keyed by k,
e.g. {"20": 81.2, "200": 79.5}), k, num_train, num_val, run_dir.
"""
    + CHECKPOINT_NOTE
    + """
Examples:

  interclr knn ckpt.safetensors data.root=/data/cifar10

  interclr knn ckpt.safetensors data.root=builtin:cifar10-mini --k 10 --k 50 --json | jq .top1
"""
)


# --- cluster -------------------------------------------------------------------------------------


def cluster(
    checkpoint: str = CkptArg,
    overrides: Optional[List[str]] = OverridesArg,
    preset: Optional[str] = PresetOpt,
    out: Optional[str] = RunOutOpt,
    k: Optional[int] = typer.Option(
        None,
        "--k",
        help="Number of clusters (default: the number of classes when the data has labels).",
        show_default=False,
    ),
    features: str = typer.Option(
        "backbone", "--features", help="backbone (pooled features) or embedding (projection head output)."
    ),
    pca: int = typer.Option(
        0, "--pca", help="Project the normalised features onto this many principal components first (0 = off)."
    ),
    iters: int = typer.Option(20, "--iters", help="k-means iterations."),
    sheet_clusters: int = typer.Option(
        10, "--sheet-clusters", help="Rows of clusters.png: the largest clusters (0 = no picture)."
    ),
    sheet_images: int = typer.Option(
        8, "--sheet-images", help="Images per row of clusters.png: those nearest the centroid."
    ),
    force: bool = ForceOpt,
    as_json: bool = JsonOpt,
    quiet: bool = QuietOpt,
    no_verify: bool = NoVerifyOpt,
) -> None:
    from ..commands import run_cluster

    setup_logging(quiet)
    with verification(not no_verify):
        result = run_cluster(
            checkpoint,
            preset,
            list(overrides or []),
            out=out,
            force=force,
            k=k,
            features=features,
            pca=pca,
            iters=iters,
            sheet_clusters=sheet_clusters,
            sheet_images=sheet_images,
            show_progress=not quiet,
        )
    if as_json:
        emit_json(result)
        return
    metrics = {key: result[key] for key in ("nmi", "ari", "ami", "purity", "accuracy") if key in result}
    _show(
        {
            "k": result["k"],
            "images": result["num_images"],
            **metrics,
            "assignments": result["assignments"],
            "centroids": result["centroids"],
            "sheet": result["sheet"],
            "run_dir": result["run_dir"],
        },
        False,
        "cluster",
    )


cluster.__doc__ = (
    """Cluster the features with faiss k-means; score against labels; draw the clusters.

data.root is one folder (an ImageFolder tree gives labels; builtin:NAME or a folder with train/ uses train/).
Features are L2-normalised (optionally PCA-reduced, then normalised again). Writes assignments.csv (path,
cluster, distance), centroids.safetensors and clusters.png (the images nearest the largest clusters'
centroids, one row per cluster). --json keys: k, assignments, centroids, sheet and, with labels, nmi, ari,
ami, purity, accuracy (Hungarian-matched), all fractions in [0, 1].
"""
    + CHECKPOINT_NOTE
    + """
Examples:

  interclr cluster ckpt.safetensors data.root=/data/imagenet/val --k 1000

  interclr cluster ckpt.safetensors data.root=builtin:cifar10-mini --k 10 --features embedding --pca 32 --json
"""
)


# --- rankme --------------------------------------------------------------------------------------


def rankme(
    checkpoint: str = CkptArg,
    overrides: Optional[List[str]] = OverridesArg,
    preset: Optional[str] = PresetOpt,
    out: Optional[str] = RunOutOpt,
    samples: Optional[int] = typer.Option(
        None, "--samples", help="At most this many images (default monitor.rankme_samples = 25600).", show_default=False
    ),
    force: bool = ForceOpt,
    as_json: bool = JsonOpt,
    quiet: bool = QuietOpt,
    no_verify: bool = NoVerifyOpt,
) -> None:
    from ..commands import run_rankme

    setup_logging(quiet)
    ov = list(overrides or [])
    if samples is not None:
        if samples < 1:
            raise UserError(f"--samples must be positive; got {samples}")
        ov.append(f"monitor.rankme_samples={samples}")
    with verification(not no_verify):
        result = run_rankme(checkpoint, preset, ov, out=out, force=force, show_progress=not quiet)
    _show(result, as_json, "rankme")


rankme.__doc__ = (
    """RankMe (effective rank) of the embeddings and of the backbone features: label-free comparison of runs.

Computed on a seeded random subset of up to 25,600 images of data.root (Garrido et al., ICML 2023).
--json keys: rankme_embedding (null without a projection head), rankme_backbone, num_images, run_dir.
"""
    + CHECKPOINT_NOTE
    + """
Examples:

  interclr rankme ckpt.safetensors data.root=/data/imagenet/train

  interclr rankme random:resnet18 data.root=builtin:cifar10-mini --json
"""
)


# --- export --------------------------------------------------------------------------------------


def export(
    checkpoint: Optional[str] = typer.Argument(
        None, help="The checkpoint to export (not with --from-torchvision/--from-moco).", show_default=False
    ),
    overrides: Optional[List[str]] = OverridesArg,
    fmt: str = typer.Option(
        "torchvision", "--format", "-f", help="torchvision (safetensors + .json), torchscript or onnx."
    ),
    part: Optional[str] = typer.Option(
        None,
        "--part",
        help="backbone, embedding (backbone + projection head) or classifier (backbone + fc). Default: classifier when one is available, else backbone.",
        show_default=False,
    ),
    out: Optional[str] = typer.Option(
        None,
        "--out",
        "-o",
        help="Output file (default: <checkpoint>-<part>.safetensors|.pt|.onnx in the current folder).",
        show_default=False,
    ),
    classifier: Optional[str] = typer.Option(
        None, "--classifier", help="Include this linear-eval classifier.safetensors as fc.", show_default=False
    ),
    from_torchvision: Optional[str] = typer.Option(
        None,
        "--from-torchvision",
        help="Read a torchvision ResNet checkpoint (.pth or .safetensors) instead.",
        show_default=False,
    ),
    from_moco: Optional[str] = typer.Option(
        None,
        "--from-moco",
        help="Read a MoCo-style checkpoint (e.g. moco_v2_800ep_pretrain.pth.tar) instead.",
        show_default=False,
    ),
    preset: Optional[str] = PresetOpt,
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output file."),
    as_json: bool = JsonOpt,
    quiet: bool = QuietOpt,
    no_verify: bool = NoVerifyOpt,
) -> None:
    from ..commands import run_export

    setup_logging(quiet)
    checkpoint, ov = _split_ckpt(checkpoint, overrides)
    with verification(not no_verify):
        result = run_export(
            checkpoint,
            preset,
            ov,
            fmt=fmt,
            part=part,
            out=out,
            classifier=classifier,
            from_torchvision=from_torchvision,
            from_moco=from_moco,
            force=force,
        )
    _show(result, as_json, "export")


export.__doc__ = (
    """Export a backbone as torchvision weights, TorchScript or ONNX; or import MoCo/torchvision weights.

torchvision (default): OUT.safetensors with torchvision's key names plus OUT.json (architecture, preprocessing).
Load it strictly: m = torchvision.models.resnet50(); m.fc = torch.nn.Identity(); m.load_state_dict(load_file(OUT))
(with a classifier, keep fc: torchvision.models.resnet50(num_classes=C)). A small-stem backbone needs the
matching model: interclr_cli.models.torchvision_resnet("resnet18", small_stem=True) (3x3 conv1, no max-pool).
The preprocessing in the .json comes from --preset (default: the checkpoint's small/large-image preset).
--from-torchvision/--from-moco convert foreign weights (read with torch.load(weights_only=True)) into a file
every interclr command accepts. --json keys: path, json, format, part.
"""
    + CHECKPOINT_NOTE
    + """
Examples:

  interclr export ckpt.safetensors -o resnet50.safetensors

  interclr export ckpt.safetensors --classifier runs/linear-x/classifier.safetensors -o r50-linear.safetensors

  interclr export ckpt.safetensors --format onnx --part embedding -o embed.onnx

  interclr export --from-moco moco_v2_800ep_pretrain.pth.tar -o moco-r50.safetensors
"""
)


def register(app: typer.Typer) -> None:
    for name, fn in (
        ("linear-eval", linear_eval),
        ("finetune", finetune),
        ("knn", knn),
        ("cluster", cluster),
        ("rankme", rankme),
        ("export", export),
    ):
        app.command(name, help=fn.__doc__)(fn)
