"""One way in for every downstream command: ``load_backbone(path) -> (backbone, head, info)``.

Accepted inputs:

- a training checkpoint of ``interclr pretrain`` (safetensors, metadata ``format=interclr-checkpoint``,
  tensors ``model.encoder_q.backbone.*`` / ``model.encoder_q.head.*``, the config in ``config``);
- a fine-tuning checkpoint of ``interclr finetune`` (same format, ``kind=finetune``, tensors
  ``model.backbone.*`` and the classifier ``model.fc.*``);
- an exported backbone of ``interclr export`` (torchvision key names, metadata ``format=interclr-export``
  or ``interclr_export=1`` plus ``arch`` and ``small_stem``; ``fc.*`` present when a classifier was
  included; the ``.json`` beside it adds the class names and the preprocessing);
- ``random:ARCH`` or ``random:ARCH-small`` (resnet18, resnet34, resnet50): a randomly initialised
  backbone and projection head drawn with a fixed seed, the baseline for any measurement.

Anything else (a pickle file, foreign safetensors, a linear-eval classifier, a truncated file) is a
one-line :class:`~interclr_cli.errors.UserError` that names the fix.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torch.nn as nn

from ..errors import UserError
from ..models import BACKBONES, FEATURE_DIMS, MoCoV2Head, build_backbone
from ..training.checkpoint import EXPORT_FORMAT, FORMAT, atomic_save, read_safetensors, state_mismatch

log = logging.getLogger("interclr")

RANDOM_PREFIX = "random:"
RANDOM_SEED = 0
RANDOM_EMBED_DIM = 128
CLASSIFIER_FORMAT = "interclr-classifier"

_ZIP_MAGIC = b"PK\x03\x04"


def describe(arch: str, small_stem: bool) -> str:
    """``resnet18 (small stem)`` / ``resnet50``."""
    return f"{arch}{' (small stem)' if small_stem else ''}"


@dataclass
class CheckpointInfo:
    """What a loaded checkpoint is (every command's view of it).

    ``kind``: pretrain, finetune, export or random. ``image_size``: the training crop when known.
    ``embed_dim``/``head_hidden``: the projection head's widths (None without one).
    ``classifier``: ``{"weight": [C, D], "bias": [C]}`` of a fine-tuned or exported classifier,
    with its ``classes``. ``epoch``/``step``: where a training checkpoint was written.
    """

    source: str
    kind: str
    arch: str
    small_stem: bool
    feature_dim: int
    image_size: Optional[int] = None
    embed_dim: Optional[int] = None
    head_hidden: Optional[int] = None
    classifier: Optional[dict[str, torch.Tensor]] = None
    classes: Optional[list[str]] = None
    epoch: Optional[int] = None
    step: Optional[int] = None

    @property
    def description(self) -> str:
        """``resnet18 (small stem)`` / ``resnet50``."""
        return describe(self.arch, self.small_stem)


class LoadedModel(NamedTuple):
    """:func:`load_backbone`'s result: the backbone (pooled features [B, feature_dim], eval mode,
    on the CPU), the projection head or None, and what the checkpoint is."""

    backbone: nn.Module
    head: Optional[nn.Module]
    info: CheckpointInfo


def _sniff_pickle(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head.startswith(_ZIP_MAGIC) or head[:1] == b"\x80"


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor], what: str, path: Path) -> None:
    """``load_state_dict(strict=True)`` with a one-line error naming the first mismatch."""
    detail = state_mismatch(module, state)
    if detail:
        raise UserError(
            f"{path} does not hold a {what} ({detail}); the file is damaged or was written for another architecture"
        )
    module.load_state_dict(state, strict=True)


def _head_from_state(state: dict[str, torch.Tensor], path: Path) -> Optional[nn.Module]:
    """The projection head of a state dict relative to the head: MoCo v2's MLP or one linear layer."""
    if not state:
        return None
    if {"0.weight", "0.bias", "2.weight", "2.bias"} <= set(state):
        hidden, dim = state["0.weight"].shape
        out = state["2.weight"].shape[0]
        head: nn.Module = MoCoV2Head(int(dim), int(hidden), int(out))
    elif {"weight", "bias"} <= set(state):
        out, dim = state["weight"].shape
        head = nn.Linear(int(dim), int(out))
    else:
        raise UserError(
            f"{path} has a projection head of unknown layout (keys {sorted(state)[:3]}); export the backbone alone"
        )
    _load_strict(head, state, "projection head", path)
    return head


def _section(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    n = len(prefix)
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix)}


def _info(source: str, kind: str, arch: str, small_stem: bool, **extra) -> CheckpointInfo:
    return CheckpointInfo(
        source=source, kind=kind, arch=arch, small_stem=bool(small_stem), feature_dim=FEATURE_DIMS[arch], **extra
    )


def _random(spec: str) -> tuple[nn.Module, nn.Module, CheckpointInfo]:
    name = spec[len(RANDOM_PREFIX) :]
    small = name.endswith("-small")
    arch = name[: -len("-small")] if small else name
    if arch not in BACKBONES:
        choices = ", ".join(f"random:{a}[-small]" for a in BACKBONES)
        raise UserError(f"unknown random backbone {spec!r}; use one of {choices}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        backbone, dim = build_backbone(arch, small)
        head = MoCoV2Head(dim, dim, RANDOM_EMBED_DIM)
    return backbone, head, _info(spec, "random", arch, small, embed_dim=RANDOM_EMBED_DIM, head_hidden=dim)


def _from_training(path: Path, tensors: dict, meta: dict) -> tuple[nn.Module, Optional[nn.Module], CheckpointInfo]:
    try:
        cfg = json.loads(meta["config"])
        model = cfg["model"]
        arch, small = str(model["arch"]), bool(model["small_stem"])
        info_meta = json.loads(meta.get("info", "{}"))
    except (KeyError, ValueError, TypeError) as e:
        raise UserError(f"{path} has damaged metadata ({type(e).__name__}: {e}); use another checkpoint") from None
    if arch not in BACKBONES:
        raise UserError(
            f"{path} was trained with model.arch={arch!r}, which this interclr cannot build; upgrade interclr"
        )
    kind = meta.get("kind", "pretrain")
    backbone, _ = build_backbone(arch, small)
    image_size = (cfg.get("data") or {}).get("image_size")
    extra = {"image_size": image_size, "epoch": int(meta.get("epoch", 0)), "step": int(meta.get("step", 0))}
    if kind == "finetune":
        _load_strict(backbone, _section(tensors, "model.backbone."), f"{describe(arch, small)} backbone", path)
        fc = _section(tensors, "model.fc.")
        if set(fc) != {"weight", "bias"}:
            raise UserError(
                f"{path} is a fine-tuning checkpoint without its classifier (model.fc.*); use another checkpoint"
            )
        classes = info_meta.get("classes")
        info = _info(
            str(path),
            "finetune",
            arch,
            small,
            classifier={"weight": fc["weight"], "bias": fc["bias"]},
            classes=classes,
            **extra,
        )
        return backbone, None, info
    bb = _section(tensors, "model.encoder_q.backbone.")
    if not bb:
        raise UserError(
            f"{path} is an interclr checkpoint of kind {kind!r} without a backbone (model.encoder_q.backbone.*); use a pretrain or finetune checkpoint"
        )
    _load_strict(backbone, bb, f"{describe(arch, small)} backbone", path)
    head = _head_from_state(_section(tensors, "model.encoder_q.head."), path)
    if head is not None:
        extra["embed_dim"] = int(head[-1].out_features) if isinstance(head, nn.Sequential) else int(head.out_features)
        extra["head_hidden"] = int(head[0].out_features) if isinstance(head, nn.Sequential) else None
    return backbone, head, _info(str(path), kind, arch, small, **extra)


def read_export_json(path: Path) -> dict:
    """The ``.json`` written beside an export (empty when absent or unreadable)."""
    side = Path(path).with_suffix(".json")
    try:
        data = json.loads(side.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _from_export(path: Path, tensors: dict, meta: dict) -> tuple[nn.Module, None, CheckpointInfo]:
    arch = meta.get("arch", "")
    small = str(meta.get("small_stem", "false")).lower() == "true"
    if arch not in BACKBONES:
        raise UserError(
            f"{path} is an interclr export of unknown architecture {arch!r}; re-export it with this interclr"
        )
    side = read_export_json(path)
    backbone, _ = build_backbone(arch, small)
    fc = {k[3:]: v for k, v in tensors.items() if k.startswith("fc.")}
    state = {k: v for k, v in tensors.items() if not k.startswith("fc.")}
    _load_strict(backbone, state, f"{describe(arch, small)} backbone", path)
    classifier = None
    if fc:
        if set(fc) != {"weight", "bias"}:
            raise UserError(f"{path} has an incomplete classifier (fc.* keys {sorted(fc)}); re-export it")
        classifier = {"weight": fc["weight"], "bias": fc["bias"]}
    extra_meta = side.get("meta") or {}
    classes = extra_meta.get("classes") if isinstance(extra_meta, dict) else None
    image_size = (side.get("preprocessing") or {}).get("crop")
    return (
        backbone,
        None,
        _info(str(path), "export", arch, small, classifier=classifier, classes=classes, image_size=image_size),
    )


def load_backbone(path) -> LoadedModel:
    """The backbone, projection head (or None) and :class:`CheckpointInfo` of any accepted input
    (see the module docstring). The backbone is a torchvision ResNet whose ``fc`` is an
    ``Identity`` (forward gives pooled features [B, feature_dim]), on the CPU in eval mode."""
    spec = str(path)
    if spec.startswith(RANDOM_PREFIX):
        backbone, head, info = _random(spec)
        return LoadedModel(backbone.eval(), head.eval(), info)
    p = Path(spec)
    if p.is_file() and _sniff_pickle(p):
        raise UserError(
            f"{p} is a PyTorch pickle file, not a safetensors checkpoint; convert it first: "
            f"interclr export --from-moco {p} -o backbone.safetensors (or --from-torchvision)"
        )
    tensors, meta = read_safetensors(p)
    fmt = meta.get("format")
    if fmt == FORMAT:
        backbone, head, info = _from_training(p, tensors, meta)
    elif fmt == EXPORT_FORMAT or meta.get("interclr_export") == "1":
        backbone, head, info = _from_export(p, tensors, meta)
    elif fmt == CLASSIFIER_FORMAT:
        raise UserError(
            f"{p} is a linear classifier written by linear-eval, not a backbone; pass the checkpoint it was trained on "
            "(export takes the classifier with --classifier)"
        )
    else:
        raise UserError(
            f"{p} is a safetensors file without interclr metadata (not a pretrain/finetune checkpoint or an export); "
            f"convert foreign weights with: interclr export --from-torchvision {p} -o backbone.safetensors"
        )
    backbone.eval()
    if head is not None:
        head.eval()
    return LoadedModel(backbone, head, info)


def backbone_fingerprint(backbone: nn.Module) -> str:
    """A short hash of the backbone's weights and buffers (names, dtypes, shapes and values)."""
    h = hashlib.blake2b(digest_size=12)
    for k, v in sorted(backbone.state_dict().items()):
        t = v.detach().to("cpu").contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# --- the linear-eval classifier file ----------------------------------------------------------------


def save_classifier(
    path: Path,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    info: CheckpointInfo,
    fingerprint: str,
    classes: list[str],
    extra: Optional[dict] = None,
) -> None:
    """``classifier.safetensors``: tensors ``weight`` [C, D] and ``bias`` [C]; metadata
    ``format=interclr-classifier``, ``arch``, ``small_stem``, ``feature_dim``, ``num_classes``,
    ``classes`` (JSON), ``backbone_fingerprint`` (see :func:`backbone_fingerprint`), ``source``
    and ``info`` (JSON: accuracies and protocol)."""
    meta = {
        "format": CLASSIFIER_FORMAT,
        "format_version": "1",
        "arch": info.arch,
        "small_stem": str(bool(info.small_stem)).lower(),
        "feature_dim": str(int(weight.shape[1])),
        "num_classes": str(int(weight.shape[0])),
        "classes": json.dumps(list(classes)),
        "backbone_fingerprint": fingerprint,
        "source": str(info.source),
        "info": json.dumps(extra or {}),
    }
    atomic_save({"weight": weight, "bias": bias}, Path(path), meta)


def read_classifier(path) -> dict:
    """A classifier written by linear-eval: ``weight``, ``bias``, ``classes``, ``fingerprint``, ``arch``, ``small_stem``, ``source``."""
    p = Path(path)
    if p.is_file() and _sniff_pickle(p):
        raise UserError(f"--classifier {p} is a pickle file; give the classifier.safetensors written by linear-eval")
    tensors, meta = read_safetensors(p)
    if meta.get("format") != CLASSIFIER_FORMAT:
        what = (
            "a checkpoint or export"
            if meta.get("format") in (FORMAT, EXPORT_FORMAT) or meta.get("interclr_export")
            else "not a classifier"
        )
        raise UserError(
            f"--classifier {p} is {what}; give the classifier.safetensors written by `interclr linear-eval`"
        )
    if set(tensors) != {"weight", "bias"} or tensors["weight"].ndim != 2:
        raise UserError(
            f"--classifier {p} is damaged (expected tensors weight [C, D] and bias [C]); run linear-eval again"
        )
    try:
        classes = json.loads(meta.get("classes", "[]"))
    except ValueError:
        classes = []
    return {
        "weight": tensors["weight"],
        "bias": tensors["bias"],
        "classes": classes,
        "fingerprint": meta.get("backbone_fingerprint", ""),
        "arch": meta.get("arch"),
        "small_stem": meta.get("small_stem") == "true",
        "source": meta.get("source", ""),
    }
