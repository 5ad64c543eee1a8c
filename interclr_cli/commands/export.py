"""`interclr export`: ship a backbone (torchvision safetensors, TorchScript or ONNX), or import one.

``--format torchvision`` writes torchvision key names (loadable with ``strict=True`` into
``torchvision.models.resnetXX()`` whose ``fc`` is removed, or as is when a classifier is
included), safetensors metadata ``format=interclr-export``, ``arch``, ``small_stem``, and a ``.json``
beside it (architecture, preprocessing, how to load it; ``meta`` holds the source, the part and
the class names). ``interclr`` reads the file back as a checkpoint (see
:func:`~interclr_cli.commands.loading.load_backbone`).

``--format torchscript|onnx`` traces the chosen part for inference (batch axis dynamic for ONNX),
checks the traced model against PyTorch on a random input and writes a ``.json`` beside it.

``--from-torchvision PATH`` / ``--from-moco PATH`` read foreign weights (pickle files only with
``torch.load(weights_only=True)``) instead of an interclr checkpoint; combined with the default
``--format torchvision`` this converts them into a file every interclr command accepts.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from ..errors import UserError, WorkError
from ..models import build_backbone
from ..models.export import (
    backbone_state_dict,
    convert_moco_checkpoint,
    export_onnx,
    export_torchscript,
    infer_arch,
    read_pickle_checkpoint,
    write_torchvision_export,
)
from .common import resolve_config
from .loading import (
    _head_from_state,
    _info,
    _load_strict,
    backbone_fingerprint,
    load_backbone,
    read_classifier,
)

log = logging.getLogger("interclr")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("interclr")
    except Exception:  # not installed (running from a source tree)
        return "unknown"


FORMATS = ("torchvision", "torchscript", "onnx")
PARTS = ("backbone", "embedding", "classifier")
SUFFIX = {"torchvision": ".safetensors", "torchscript": ".pt", "onnx": ".onnx"}
ONNX_ATOL = 1e-4


def load_foreign(path: str, kind: str) -> tuple[nn.Module, Optional[nn.Module], dict]:
    """A MoCo-style or torchvision checkpoint as (backbone, head, info).

    ``kind="torchvision"``: a linear ``fc`` is kept as the classifier. ``kind="moco"``: the
    projection head (MoCo v2's MLP, or v1's linear layer) is kept as the embedding head; the key
    encoder and the queue are dropped.
    """
    p = Path(path)
    if p.suffix == ".safetensors" and p.is_file():
        from ..runtime.safefile import read_tensors

        state, _ = read_tensors(
            p, on_error=lambda why: UserError(f"cannot read {p} as safetensors ({why}); check the file")
        )
    else:
        state = read_pickle_checkpoint(p)
    bb, head_state, arch = convert_moco_checkpoint(state)
    arch, small = infer_arch(bb)
    backbone, _ = build_backbone(arch, small)
    _load_strict(backbone, bb, f"{arch} backbone", p)
    classifier, head = None, None
    if head_state:
        if kind == "torchvision":
            if set(head_state) == {"weight", "bias"} and head_state["weight"].ndim == 2:
                classifier = {"weight": head_state["weight"], "bias": head_state["bias"]}
            else:
                log.warning(
                    "%s: the fc layer is not a linear classifier (keys %s); it is not converted",
                    p,
                    sorted(head_state)[:3],
                )
        else:
            head = _head_from_state(head_state, p)
    extra = {}
    if head is not None:
        last = head[-1] if isinstance(head, nn.Sequential) else head
        extra["embed_dim"] = int(last.out_features)
    info = _info(str(p), kind, arch, small, classifier=classifier, **extra)
    return backbone.eval(), (head.eval() if head is not None else None), info


def sidecar(out: Path, fmt: str) -> Path:
    """The description beside an export: OUT.json for torchvision safetensors, OUT.pt.json / OUT.onnx.json otherwise."""
    return out.with_suffix(".json") if fmt == "torchvision" else out.with_name(out.name + ".json")


def _default_out(info: dict, part: str, fmt: str) -> Path:
    src = str(info.source)
    stem = src.replace(":", "-") if src.startswith("random:") else Path(src).stem
    return Path(f"{stem}-{part}{SUFFIX[fmt]}")


def _check_out(out: Path, fmt: str, force: bool) -> None:
    suffix = out.suffix.lower()
    if fmt == "torchvision" and suffix != ".safetensors":
        raise UserError(f"--format torchvision writes safetensors; name the output *.safetensors (got {out})")
    if fmt == "onnx" and suffix != ".onnx":
        raise UserError(f"--format onnx needs an output ending in .onnx (got {out})")
    if fmt == "torchscript" and suffix in (".safetensors", ".onnx", ".json"):
        raise UserError(f"--format torchscript writes a TorchScript archive; name the output *.pt (got {out})")
    for p in (out, sidecar(out, fmt)):
        if p.exists() and not force:
            raise UserError(f"{p} already exists; pass --force to overwrite it or choose another -o")
        if p.is_dir():
            raise UserError(f"{p} is a folder; give a file path to -o")


def _onnx_check(path: Path, module: nn.Module, example: torch.Tensor) -> Optional[float]:
    try:
        import onnxruntime as ort
    except ImportError:
        log.info("onnxruntime is not installed: the ONNX file was not checked against PyTorch")
        return None
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.cat([example, torch.randn(1, *example.shape[1:], generator=torch.Generator().manual_seed(1))])
    (got,) = sess.run(None, {"input": x.numpy()})
    with torch.no_grad():
        want = module.eval()(x)
    diff = float((torch.from_numpy(got) - want).abs().max())
    if not diff <= ONNX_ATOL:
        raise WorkError(
            f"the ONNX model differs from PyTorch by {diff:.3g} (limit {ONNX_ATOL}); try --format torchscript"
        )
    return diff


def _inputs(checkpoint, from_torchvision, from_moco, classifier, part):
    """(backbone, head, info, classifier dict or None, class names, part) of the export's input."""
    if checkpoint:
        backbone, head, info = load_backbone(checkpoint)
    else:
        backbone, head, info = load_foreign(
            from_torchvision or from_moco, "torchvision" if from_torchvision else "moco"
        )
    fc, classes = info.classifier, info.classes
    if classifier:
        clf = read_classifier(classifier)
        if clf["fingerprint"] != backbone_fingerprint(backbone):
            raise UserError(
                f"--classifier {classifier} was trained on another backbone ({clf['source']}); "
                f"pass the checkpoint it was trained on instead of {info.source}"
            )
        fc, classes = {"weight": clf["weight"], "bias": clf["bias"]}, clf["classes"]
    if part is None:
        part = "classifier" if fc is not None else "backbone"
    if part == "classifier" and fc is None:
        raise UserError(
            f"{info.source} has no classifier; pass --classifier runs/<linear-eval run>/classifier.safetensors, "
            "export a finetune checkpoint, or use --part backbone"
        )
    if part == "embedding" and head is None:
        raise UserError(
            f"{info.source} has no projection head, so there is no embedding to export; use --part backbone"
        )
    return backbone, head, info, fc, classes, part


def _module(backbone: nn.Module, head: Optional[nn.Module], fc: Optional[dict], part: str) -> nn.Module:
    """The network of ``part`` for tracing (eval mode, float32)."""
    backbone.fc = nn.Identity()
    if part == "backbone":
        return backbone.eval().float()
    if part == "embedding":
        return nn.Sequential(backbone, head).eval().float()
    linear = nn.Linear(fc["weight"].shape[1], fc["weight"].shape[0])
    with torch.no_grad():
        linear.weight.copy_(fc["weight"])
        linear.bias.copy_(fc["bias"])
    return nn.Sequential(backbone, linear).eval().float()


def _traced_sidecar(out_path: Path, fmt: str, part: str, info, cfg, out_dim: int, meta: dict) -> dict:
    """The ``.json`` description beside a TorchScript or ONNX export."""
    size = cfg.data.image_size
    return {
        "format": f"interclr-{fmt}-export",
        "version": 1,
        "file": out_path.name,
        "architecture": info.arch,
        "small_stem": info.small_stem,
        "part": part,
        "input": {"name": "input", "shape": ["batch", 3, size, size], "dtype": "float32"},
        "output": {
            "name": "output",
            "shape": ["batch", out_dim],
            "meaning": {
                "backbone": "pooled backbone features",
                "embedding": "projection head output (not L2-normalised)",
                "classifier": "class logits",
            }[part],
        },
        "preprocessing": {
            "resize": max(cfg.data.eval_resize, size),
            "crop": size,
            "mean": list(cfg.data.mean),
            "std": list(cfg.data.std),
            "input": "RGB, pixel values scaled to [0, 1] then normalised with mean and std",
        },
        "load": (
            "torch.jit.load(file).eval()"
            if fmt == "torchscript"
            else "onnxruntime.InferenceSession(file).run(None, {'input': x})"
        ),
        "meta": meta,
    }


def _export_traced(module: nn.Module, out_path: Path, fmt: str, part: str, info, cfg, meta: dict) -> dict:
    """Trace ``module`` to TorchScript or ONNX (checked against PyTorch) and write its ``.json``."""
    size = cfg.data.image_size
    example = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out_dim = int(module(example).shape[1])
    diff = None
    if fmt == "torchscript":
        export_torchscript(module, example, out_path)
    else:
        export_onnx(module, example, out_path)
        diff = _onnx_check(out_path, module, example)
    json_path = sidecar(out_path, fmt)
    json_path.write_text(
        json.dumps(_traced_sidecar(out_path, fmt, part, info, cfg, out_dim, meta), indent=2, default=str) + "\n"
    )
    return {
        "json": str(json_path),
        "output_dim": out_dim,
        "max_abs_diff": diff,
        "num_classes": out_dim if part == "classifier" else None,
    }


def run_export(
    checkpoint: Optional[str],
    preset: Optional[str],
    overrides: list[str],
    *,
    fmt: str = "torchvision",
    part: Optional[str] = None,
    out: Optional[str] = None,
    classifier: Optional[str] = None,
    from_torchvision: Optional[str] = None,
    from_moco: Optional[str] = None,
    force: bool = False,
) -> dict:
    """Export a checkpoint (or foreign weights) as torchvision safetensors, TorchScript or ONNX;
    the JSON-ready result: ``path``, ``json``, ``format``, ``part`` ..."""
    sources = [s for s in (checkpoint, from_torchvision, from_moco) if s]
    if len(sources) != 1:
        raise UserError("give exactly one input: a checkpoint path, --from-torchvision PATH or --from-moco PATH")
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    if part is not None and part not in PARTS:
        raise UserError(f"--part must be one of {', '.join(PARTS)}; got {part!r}")
    backbone, head, info, fc, classes, part = _inputs(checkpoint, from_torchvision, from_moco, classifier, part)
    cfg = resolve_config("export", preset, overrides, info)
    if part == "embedding" and fmt == "torchvision":
        raise UserError(
            "torchvision models have no projection head: --part embedding needs --format torchscript or onnx"
        )
    out_path = Path(out) if out else _default_out(info, part, fmt)
    _check_out(out_path, fmt, force)
    meta = {
        "source": info.source,
        "kind": info.kind,
        "part": part,
        "classes": classes if part == "classifier" else None,
        "epoch": info.epoch,
        "interclr_version": _version(),
    }
    result = {
        "path": str(out_path),
        "format": fmt,
        "part": part,
        "arch": info.arch,
        "small_stem": info.small_stem,
        "source": info.source,
    }
    if fmt == "torchvision":
        json_path = write_torchvision_export(
            backbone_state_dict(backbone),
            out_path,
            arch=info.arch,
            small_stem=info.small_stem,
            image_size=cfg.data.image_size,
            mean=cfg.data.mean,
            std=cfg.data.std,
            fc=fc if part == "classifier" else None,
            extra_meta=meta,
            resize=max(cfg.data.eval_resize, cfg.data.image_size),
        )
        result.update(
            {"json": str(json_path), "num_classes": int(fc["weight"].shape[0]) if part == "classifier" else None}
        )
        return result
    result.update(_export_traced(_module(backbone, head, fc, part), out_path, fmt, part, info, cfg, meta))
    log.info("exported the %s of %s (%s) to %s", part, info.source, info.description, out_path)
    return result
