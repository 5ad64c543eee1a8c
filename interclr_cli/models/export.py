"""Export backbones in torchvision's format, to TorchScript and ONNX; read foreign checkpoints.

Exported weights are safetensors with torchvision's key names, so they load with
``torchvision.models.resnetXX().load_state_dict(...)``; a JSON file beside them records the
architecture and the preprocessing. Pickle-based inputs (MoCo, torchvision checkpoints) are
read with ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import pickle
import re
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn as nn

from ..errors import UserError, WorkError
from ..runtime.safefile import atomic_write_bytes, write_tensors
from . import FEATURE_DIMS, torchvision_resnet

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")

#: (backbone prefix, head prefix) of the checkpoint layouts :func:`convert_moco_checkpoint` knows,
#: most specific first: MoCo v1/v2 (facebookresearch/moco), MoCo v3, interclr's ``Encoder``,
#: and plain torchvision, each with or without DistributedDataParallel's ``module.``.
_LAYOUTS = (
    ("module.encoder_q.", "module.encoder_q.fc."),
    ("encoder_q.", "encoder_q.fc."),
    ("module.base_encoder.", "module.base_encoder.fc."),
    ("base_encoder.", "base_encoder.fc."),
    ("module.backbone.", "module.head."),
    ("backbone.", "head."),
    ("module.", "module.fc."),
    ("", "fc."),
)

_BLOCKS_TO_ARCH = {
    ((2, 2, 2, 2), False): "resnet18",
    ((3, 4, 6, 3), False): "resnet34",
    ((3, 4, 6, 3), True): "resnet50",
}


# ----------------------------------------------------------------------------- torchvision export


def _strip_wrappers(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _WRAPPER_PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p) :], True
    return key


def backbone_state_dict(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's weights and buffers in torchvision's key names, without ``fc.*``.

    DDP (``module.``) and ``torch.compile`` (``_orig_mod.``) prefixes are removed; tensors are
    detached, contiguous CPU copies.
    """
    out = {}
    for key, value in backbone.state_dict().items():
        key = _strip_wrappers(key)
        if key.startswith("fc."):
            continue
        out[key] = value.detach().to("cpu", copy=True).contiguous()
    return out


def expected_shapes(arch: str, small_stem: bool, num_classes: int | None = None) -> dict[str, torch.Size]:
    """Key -> shape of ``torchvision_resnet(arch, small_stem)`` (without ``fc.*`` unless num_classes)."""
    with torch.device("meta"):
        model = torchvision_resnet(arch, small_stem, num_classes=num_classes or 1000)
    return {k: v.shape for k, v in model.state_dict().items() if num_classes is not None or not k.startswith("fc.")}


def _check_against(state: dict[str, torch.Tensor], arch: str, small_stem: bool, num_classes: int | None) -> None:
    want = expected_shapes(arch, small_stem, num_classes)
    stem = "small-stem " if small_stem else ""
    missing = [k for k in want if k not in state]
    if missing:
        raise UserError(
            f"weights do not match a {stem}{arch}: {len(missing)} keys missing, first {missing[0]!r}; "
            "check --arch and --small-stem"
        )
    extra = [k for k in state if k not in want]
    if extra:
        raise UserError(
            f"weights do not match a {stem}{arch}: {len(extra)} unexpected keys, first {extra[0]!r}; "
            "check --arch and --small-stem"
        )
    for k, shape in want.items():
        if tuple(state[k].shape) != tuple(shape):
            raise UserError(
                f"weights do not match a {stem}{arch}: {k} has shape {tuple(state[k].shape)}, expected "
                f"{tuple(shape)}; check --arch and --small-stem"
            )


def _fc_tensors(fc: dict) -> dict[str, torch.Tensor]:
    out = {}
    for name in ("weight", "bias"):
        value = fc.get(name, fc.get(f"fc.{name}"))
        if value is None:
            raise ValueError(f"fc must hold 'weight' and 'bias' (or 'fc.weight' and 'fc.bias'), got {sorted(fc)}")
        out[f"fc.{name}"] = value.detach().to("cpu", copy=True).contiguous()
    return out


def _export_tensors(state: dict[str, torch.Tensor], fc: dict | None) -> tuple[dict[str, torch.Tensor], int | None]:
    """(CPU tensors to write, number of classes or None): the backbone of ``state`` plus the
    classifier ``fc`` (or the ``fc.*`` keys of ``state`` when ``fc`` is None)."""
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items() if not k.startswith("fc.")}
    fc_in_state = {k: v for k, v in state.items() if k.startswith("fc.")}
    if fc is None and fc_in_state:
        fc = fc_in_state
    if fc is None:
        return tensors, None
    fc_t = _fc_tensors(fc)
    tensors.update(fc_t)
    return tensors, int(fc_t["fc.weight"].shape[0])


def _preprocessing(
    image_size: int, small_stem: bool, resize: int | None, mean: Sequence[float], std: Sequence[float]
) -> dict:
    """The ``preprocessing`` entry of the export JSON (resize default: crop / 0.875, or the crop
    itself for the small stem)."""
    crop = int(image_size)
    resize = int(resize) if resize else (crop if small_stem else int(round(crop / 0.875)))
    return {
        "resize": resize,
        "crop": crop,
        "interpolation": "bilinear",
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "input": "RGB, pixel values scaled to [0, 1] then normalised with mean and std",
        "torchvision": f"Resize({resize}), CenterCrop({crop}), ToTensor(), Normalize(mean, std)",
    }


def _export_meta(
    weights: str, arch: str, small_stem: bool, num_classes: int | None, preprocessing: dict, extra_meta: dict | None
) -> dict:
    """The export JSON: architecture, preprocessing and how to load ``weights`` (the file name)."""
    builder = f"torchvision.models.{arch}({'' if num_classes is None else f'num_classes={num_classes}'})"
    strict = "True" if num_classes is not None else "False"
    load_weights = f"model.load_state_dict(safetensors.torch.load_file({weights!r}), strict={strict})"
    meta = {
        "format": "interclr-torchvision-export",
        "version": 1,
        "weights": weights,
        "architecture": arch,
        "small_stem": bool(small_stem),
        "feature_dim": FEATURE_DIMS[arch],
        "includes_fc": num_classes is not None,
        "num_classes": num_classes,
        "preprocessing": preprocessing,
        "load": f"model = {builder}; {load_weights}",
    }
    if small_stem:
        nc = "" if num_classes is None else f", num_classes={num_classes}"
        meta["stem_note"] = (
            "small-image stem: conv1 is a 3x3 convolution with stride 1 and padding 1 (no bias) and there is no "
            "max-pool; build the matching model before loading"
        )
        meta["python_helper"] = (
            f"from interclr_cli.models import torchvision_resnet; model = torchvision_resnet({arch!r}, small_stem=True{nc})"
        )
        meta["plain_torchvision"] = (
            f"model = {builder}; model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False); "
            "model.maxpool = torch.nn.Identity()"
        )
        meta["load"] = f"{meta['python_helper']}; {load_weights}"
    meta["meta"] = dict(extra_meta or {})
    return meta


def write_torchvision_export(
    state: dict[str, torch.Tensor],
    out: Path,
    *,
    arch: str,
    small_stem: bool,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    fc: dict | None = None,
    extra_meta: dict | None = None,
    resize: int | None = None,
) -> Path:
    """Write ``out`` (.safetensors, torchvision keys) and its description ``out.with_suffix('.json')``.

    ``state`` is a backbone state dict (:func:`backbone_state_dict`); ``fc`` an optional
    classifier (``weight`` [classes, dim] and ``bias``; ``fc.*`` keys in ``state`` count as
    ``fc`` too). The keys and shapes are checked against ``torchvision_resnet(arch, small_stem)``.
    With ``fc`` the file loads into ``torchvision.models.<arch>(num_classes=...)`` with
    ``strict=True``; without it only ``fc.weight`` and ``fc.bias`` are missing. Evaluation
    preprocessing: resize the shorter side to ``resize`` (default image_size / 0.875, or
    image_size for the small stem), centre-crop ``image_size``, scale to [0, 1], normalise.
    Both files are written atomically (temporary file, fsync, rename); the safetensors metadata also
    carries ``interclr.digest`` (:mod:`interclr_cli.runtime.safefile`). Returns the JSON path.
    """
    out = Path(out)
    if out.suffix != ".safetensors":
        raise UserError(f"export file {out} must end in .safetensors; e.g. --out backbone.safetensors")
    tensors, num_classes = _export_tensors(state, fc)
    _check_against(tensors, arch, small_stem, num_classes)
    meta = _export_meta(
        out.name, arch, small_stem, num_classes, _preprocessing(image_size, small_stem, resize, mean, std), extra_meta
    )
    st_meta = {
        "format": "interclr-export",
        "interclr_export": "1",
        "arch": arch,
        "small_stem": str(bool(small_stem)).lower(),
    }
    write_tensors(out, tensors, st_meta)
    json_path = out.with_suffix(".json")
    atomic_write_bytes(json_path, (json.dumps(meta, indent=2, default=str) + "\n").encode("utf-8"))
    return json_path


# ----------------------------------------------------------------------------- TorchScript / ONNX


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def export_torchscript(module: nn.Module, example: torch.Tensor, out: Path, *, atol: float = 1e-4) -> Path:
    """Trace ``module`` (in eval mode) on ``example`` and save it atomically to ``out``.

    The traced module is checked against the module on ``example`` (max abs diff <= ``atol``).
    It is serialised in memory and written with :func:`atomic_write_bytes`: torch's own file
    writer aborts the process when the disk fills, ours raises a one-line storage error.
    """
    with _eval_mode(module), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in favour of torch.export
        traced = torch.jit.trace(module, example, check_trace=False)
        diff = (traced(example) - module(example)).abs().max().item()
        if not diff <= atol:
            raise WorkError(f"the TorchScript trace differs from the model by {diff:.3g}; export to ONNX instead")
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
    atomic_write_bytes(Path(out), buf.getvalue())
    return Path(out)


def export_onnx(module: nn.Module, example: torch.Tensor, out: Path, opset: int = 17) -> Path:
    """Export ``module`` (eval mode) to ONNX with a dynamic batch axis; input ``input``, output ``output``.

    Uses the TorchScript-based exporter (``dynamo=False``), which needs no ``onnxscript``. Like
    :func:`export_torchscript` it serialises in memory and writes with :func:`atomic_write_bytes`.
    """
    with _eval_mode(module), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        buf = io.BytesIO()
        torch.onnx.export(
            module,
            (example,),
            buf,
            dynamo=False,
            opset_version=opset,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            do_constant_folding=True,
        )
    atomic_write_bytes(Path(out), buf.getvalue())
    return Path(out)


# ----------------------------------------------------------------------------- foreign checkpoints


def _one_line(e: BaseException, limit: int = 160) -> str:
    text = str(e).strip().splitlines()
    first = text[0] if text else e.__class__.__name__
    return first if len(first) <= limit else first[: limit - 3] + "..."


def read_pickle_checkpoint(path: Path) -> dict:
    """Load a PyTorch pickle checkpoint safely: ``torch.load(weights_only=True)`` on the CPU.

    Beyond tensors and containers only ``argparse.Namespace`` (the ``args`` that MoCo v3 and DINO
    store) is allowed. Missing, unreadable or unsafe files raise a one-line ``UserError``.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found; check the path")
    if path.suffix == ".safetensors":
        raise UserError(f"{path} is a safetensors file, not a pickle checkpoint; pass it where safetensors are read")
    try:
        allow = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
        with allow([argparse.Namespace]) if allow else contextlib.nullcontext():
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(
            f"checkpoint {path} holds Python objects that safe loading refuses ({_one_line(e)}); "
            "re-save only its state_dict with torch.save"
        ) from None
    except Exception as e:  # torch raises many kinds on garbage (RuntimeError, EOFError, IndexError ...)
        raise UserError(
            f"cannot read checkpoint {path}: not a PyTorch checkpoint or truncated ({_one_line(e)}); check the file"
        ) from None
    if not isinstance(obj, dict):
        raise UserError(f"checkpoint {path} holds a {type(obj).__name__}, not a dict of tensors; save a state_dict")
    return obj


def infer_arch(state: dict[str, torch.Tensor]) -> tuple[str, bool]:
    """(arch, small_stem) of a torchvision-named ResNet state dict, from blocks per stage and conv1."""
    if "conv1.weight" not in state:
        raise UserError("no conv1.weight in the weights; expected a ResNet in torchvision's key names")
    blocks = []
    for stage in range(1, 5):
        ids = {int(m.group(1)) for k in state if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        blocks.append(len(ids))
    bottleneck = "layer1.0.conv3.weight" in state
    arch = _BLOCKS_TO_ARCH.get((tuple(blocks), bottleneck))
    if arch is None:
        kind = "bottleneck" if bottleneck else "basic"
        raise UserError(
            f"unsupported ResNet ({kind} blocks per stage {tuple(blocks)}); interclr reads resnet18, resnet34 and resnet50"
        )
    return arch, tuple(state["conv1.weight"].shape[-2:]) == (3, 3)


def convert_moco_checkpoint(state: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, str]:
    """Split a MoCo or torchvision checkpoint into (backbone state, head state or None, arch).

    Accepts a whole checkpoint (its ``state_dict`` or ``model`` entry is used) or a state dict:
    MoCo v1/v2 (``module.encoder_q.conv1.weight`` ..., head ``module.encoder_q.fc.0/2.*``; the key
    encoder and queue are dropped), MoCo v3 (``module.base_encoder.*``), interclr's ``Encoder``
    (``backbone.*``/``head.*``) and plain torchvision (``conv1.weight`` ... ``fc.*``), with or
    without DDP's ``module.``. The backbone comes back in torchvision's key names, checked against
    the inferred arch (resnet18/34/50; the small stem is allowed, see :func:`infer_arch`); head keys
    are relative to the head (``0.weight``... for MoCo v2's MLP, ``weight``/``bias`` for a
    torchvision classifier). Anything else raises ``UserError``.
    """
    if not isinstance(state, dict):
        raise UserError(f"expected a checkpoint dict, got a {type(state).__name__}")
    for wrapper in ("state_dict", "model"):
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    tensors = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    for prefix, head_prefix in _LAYOUTS:  # noqa: B007 - both used after the loop
        if prefix + "conv1.weight" in tensors:
            break
    else:
        first = ", ".join(list(map(str, state))[:3]) or "none"
        raise UserError(
            f"no ResNet backbone in the checkpoint (first keys: {first}); expected MoCo "
            "(module.encoder_q.conv1.weight ...) or torchvision (conv1.weight ...) weights"
        )
    backbone = {}
    head = {}
    for key, value in tensors.items():
        if key.startswith(head_prefix):
            head[key[len(head_prefix) :]] = value.detach().clone().contiguous()
        elif key.startswith(prefix):
            rest = key[len(prefix) :]
            if not rest.startswith("fc."):
                backbone[rest] = value.detach().clone().contiguous()
    arch, small_stem = infer_arch(backbone)
    _check_against(backbone, arch, small_stem, None)
    return backbone, (head or None), arch
