"""What ``auto`` means for precision, memory format and the data path on this machine.

Pure decisions (capabilities injected, so they are unit-tested for machines we do not have) and
one probe of the processor (:func:`cpu_caps`). Every decision returns ``(value, reason)``; the
reason is what the start-up log line prints. An explicit value always wins.

- ``train.precision``: CUDA: bf16 (Ampere and newer compute it natively; older GPUs emulate it
  slowly, so bf16 only where ``torch.cuda.is_bf16_supported()``). CPU: bf16 only where oneDNN
  computes it natively (AVX-512 bf16 or AMX tiles, with oneDNN built in); fp32 (``none``) else,
  since emulated bf16 is slower than fp32.
- ``train.channels_last``: CUDA: on (tensor-core convolutions want NHWC). CPU: on where oneDNN
  has AVX-512 (issue 17 measured its NHWC convolutions faster there: MoCo v2 ResNet-18, 32 px,
  2-core AMD EPYC: 75.1 vs 55.5 img/s fp32, 140.7 vs 124.0 bf16); contiguous else (not measured
  on AVX2-only processors: the safe choice). ``benchmarks/bench_step.py --precisions`` re-measures.
  Every model of ours is a convolutional ResNet, so the rule is per machine, not per model.
- ``data.augment_on``: CUDA: device. CPU: workers (today's default), unless ``data.in_memory`` or
  ``data.decode=device`` need device.
- ``data.decode``: CUDA with device augmentation and JPEG data: device (nvjpeg). Else pil.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

JPEG_SUFFIXES = (".jpg", ".jpeg")


@dataclass(frozen=True)
class Caps:
    """What the hardware computes natively. ``name``: the processor's (or GPU's) name."""

    name: str = "unknown"
    avx512: bool = False
    avx512_bf16: bool = False
    amx: bool = False
    mkldnn: bool = True
    cuda_bf16: bool = False

    @property
    def cpu_bf16(self) -> bool:
        return self.mkldnn and (self.avx512_bf16 or self.amx)

    def line(self) -> str:
        """One line for logs and benchmarks, e.g. ``AMD EPYC: AVX-512 yes, AVX-512 bf16 yes, AMX no``."""
        yn = {True: "yes", False: "no"}
        return (
            f"{self.name}: AVX-512 {yn[self.avx512]}, AVX-512 bf16 {yn[self.avx512_bf16]}, AMX {yn[self.amx]}, "
            f"oneDNN {yn[self.mkldnn]}"
        )


def _cpuinfo() -> tuple[str, set[str]]:
    """(model name, flags) from /proc/cpuinfo; ("unknown", set()) where there is none."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown", set()
    name, flags = "unknown", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and name == "unknown":
            name = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return name, flags


def _torch_cpu_flag(fn_name: str) -> bool | None:
    fn = getattr(torch.cpu, fn_name, None)  # private in torch 2.x: absent in some builds
    try:
        return bool(fn()) if fn is not None else None
    except Exception:  # noqa: BLE001 - a probe that fails means "unknown", never an error
        return None


def cpu_caps() -> Caps:
    """This processor's capabilities as torch reports them (``torch.cpu._is_*_supported``, which
    ask oneDNN's cpuinfo), /proc/cpuinfo's flags where torch has no answer."""
    name, flags = _cpuinfo()

    def flag(fn_name: str, cpu_flags: tuple[str, ...]) -> bool:
        got = _torch_cpu_flag(fn_name)
        return got if got is not None else all(f in flags for f in cpu_flags)

    return Caps(
        name=name,
        avx512=flag("_is_avx512_supported", ("avx512f", "avx512bw", "avx512vl", "avx512dq")),
        avx512_bf16=flag("_is_avx512_bf16_supported", ("avx512_bf16",)),
        amx=flag("_is_amx_tile_supported", ("amx_tile", "amx_bf16")),
        mkldnn=bool(torch.backends.mkldnn.is_available()),
    )


def device_caps(device: torch.device) -> Caps:
    """:func:`cpu_caps`, plus the GPU's name and bf16 support on CUDA."""
    caps = cpu_caps()
    if device.type != "cuda":
        return caps
    return Caps(
        name=torch.cuda.get_device_name(device),
        avx512=caps.avx512,
        avx512_bf16=caps.avx512_bf16,
        amx=caps.amx,
        mkldnn=caps.mkldnn,
        cuda_bf16=bool(torch.cuda.is_bf16_supported()),
    )


def resolve_precision(requested: str, device_type: str, caps: Caps) -> tuple[str, str]:
    """``train.precision``: ``auto`` -> ``bf16`` or ``none`` (float32) by the rules above."""
    if requested != "auto":
        return requested, "set in the config"
    if device_type == "cuda":
        if caps.cuda_bf16:
            return "bf16", f"the GPU ({caps.name}) computes bf16 natively"
        return "none", f"the GPU ({caps.name}) has no native bf16"
    if device_type == "cpu" and caps.cpu_bf16:
        what = "AMX" if caps.amx else "AVX-512 bf16"
        return "bf16", f"the CPU has {what}"
    if device_type == "cpu" and not caps.mkldnn:
        return "none", "this torch has no oneDNN"
    return "none", f"the {device_type.upper()} has no native bf16 (emulated bf16 is slower than fp32)"


def resolve_channels_last(requested: str, device_type: str, caps: Caps, world: int = 1) -> tuple[str, str]:
    """``train.channels_last``: ``auto`` -> ``true`` or ``false`` by the rules above. Several CPU
    processes stay contiguous: a 2-process CPU fine-tune with synchronised BatchNorm once diverged
    with channels_last (not reproduced since; in fp32 its distance from one process is ~1,000x
    contiguous's, float noise on near-zero BatchNorm biases); contiguous trains as one process does."""
    if requested != "auto":
        return requested, "set in the config"
    if device_type == "cuda":
        return "true", "NHWC convolutions on the GPU"
    if device_type == "cpu" and world > 1:
        return "false", "several CPU processes (channels_last diverged there with synchronised BatchNorm)"
    if device_type == "cpu" and caps.mkldnn and caps.avx512:
        return "true", "oneDNN's NHWC convolutions with AVX-512"
    return "false", "no AVX-512 oneDNN convolutions"


def resolve_augment_on(requested: str, device_type: str, *, in_memory: bool, decode: str) -> tuple[str, str]:
    """``data.augment_on``: ``auto`` -> ``device`` on CUDA or where ``data.in_memory`` /
    ``data.decode=device`` need it, else ``workers``."""
    if requested != "auto":
        return requested, "set in the config"
    if in_memory or decode == "device":
        return "device", "data.in_memory" if in_memory else "data.decode=device"
    if device_type == "cuda":
        return "device", "batched augmentation on the GPU"
    return "workers", "PIL in the workers on the CPU"


def resolve_decode(requested: str, device_type: str, *, augment_on: str, jpeg_share: float) -> tuple[str, str]:
    """``data.decode``: ``auto`` -> ``device`` on CUDA with device augmentation for JPEG data
    (``jpeg_share``: the fraction of the files that are JPEGs, >= 0.5), else ``pil``."""
    if requested != "auto":
        return requested, "set in the config"
    if device_type != "cuda":
        return "pil", "PIL in the workers on the CPU"
    if augment_on != "device":
        return "pil", "data.augment_on=workers"
    if jpeg_share < 0.5:
        return "pil", "the data is not JPEG"
    return "device", "JPEGs decoded on the GPU (nvjpeg)"


def jpeg_share(paths, sample: int = 1000) -> float:
    """The fraction of JPEG file names among (evenly spaced) ``sample`` of ``paths``; 0 for none."""
    n = len(paths)
    if n == 0:
        return 0.0
    step = max(1, n // sample)
    picked = [paths[i] for i in range(0, n, step)]
    return sum(str(p).lower().endswith(JPEG_SUFFIXES) for p in picked) / len(picked)


def configure_cuda_backends(device: torch.device, *, cudnn_benchmark: bool, tf32: bool) -> list[str]:
    """On CUDA: cuDNN's autotuner (``cudnn.benchmark``) and TF32 matmuls / convolutions as asked;
    nothing on other devices. Returns what was set, for the log line."""
    if device.type != "cuda":
        return []
    torch.backends.cudnn.benchmark = cudnn_benchmark
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    return [f"cudnn.benchmark={cudnn_benchmark}", f"tf32={tf32}"]
