"""Gradient synchronisation, SyncBatchNorm and replica checks for multi-process training.

The training loop (:mod:`interclr_cli.training`) calls ``wrap_ddp(method, device)`` when the
process group is initialised and then runs ``wrapper.training_step(batch, step, epoch)`` instead
of ``method.training_step``. The wrapper is real :class:`torch.nn.parallel.DistributedDataParallel`
around a tiny module whose ``forward`` is the method's ``training_step``: DDP buckets the
gradients and all-reduces each bucket as soon as backward has produced it, overlapping
communication with the rest of backward, which is what makes data parallelism scale on GPUs. The method itself is not renamed: checkpoints
keep ``method.state_dict()`` names (``encoder_q.backbone.conv1.weight``, no ``module.`` prefix).

* Only gradients are synchronised by DDP (``forward_sync_buffers=False``). The method's own
  buffers (MoCo queue, InterCLR bank, labels, centroids) are kept identical by the method itself
  (it all-gathers each step's keys), so they are excluded from DDP altogether: DDP would otherwise
  broadcast the whole bank from rank 0 when it starts.
* BatchNorm running statistics are rank-local during training (they only matter in eval mode);
  :meth:`sync_buffers` copies rank 0's to every rank (what DDP's default per-step buffer
  broadcast achieves, done only when needed), and the training loop calls it before every
  checkpoint, monitor pass and feature extraction, so what is saved, evaluated and resumed is the
  same on every rank, and independent of where checkpoints fall.

The flat all-reduce reference that DDP is tested against is ``GradAverager`` in
``tests/dist_helpers.py``.
"""

from __future__ import annotations

import inspect
import logging

import torch
import torch.distributed as tdist
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from . import dist

log = logging.getLogger("interclr")


# -- SyncBatchNorm ----------------------------------------------------------------------------------


class DistBatchNorm(_BatchNorm):
    """SyncBatchNorm that runs on any device and backend (gloo on the CPU included).

    torch's ``nn.SyncBatchNorm`` only runs on GPUs; this one computes the global batch mean and
    (biased) variance with two autograd-aware all-reduces of per-channel sums, so both the
    normalisation and its gradient equal those of one BatchNorm over the global batch. Used when
    the device is not CUDA; on CUDA :func:`convert_sync_bn` uses ``nn.SyncBatchNorm`` (fused kernels).
    Same parameter and buffer names as BatchNorm, so checkpoints are interchangeable.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_dist() and dist.world_size() > 1):
            return super().forward(x)
        self._check_input_dim(x)
        c = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        shape = [1, c] + [1] * (x.dim() - 2)
        xf = x.float()
        count = torch.full((1,), float(x.numel() // c), dtype=torch.float32, device=x.device)
        sums = dist.all_reduce_sum_with_grad(torch.cat([xf.sum(dims), count]))
        n = sums[c].detach()
        mean = sums[:c] / n
        xc = xf - mean.view(shape)
        var = dist.all_reduce_sum_with_grad((xc * xc).sum(dims)) / n
        y = xc * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                f = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
                unbiased = var.detach() * (n / (n - 1).clamp(min=1))
                self.running_mean.mul_(1 - f).add_(mean.detach().to(self.running_mean.dtype), alpha=f)
                self.running_var.mul_(1 - f).add_(unbiased.to(self.running_var.dtype), alpha=f)
        return y.to(x.dtype)


def _convert(module: nn.Module, cls) -> nn.Module:
    """Replace every BatchNorm in ``module`` (recursively) by ``cls``, keeping its tensors."""
    if isinstance(module, _BatchNorm) and not isinstance(module, cls):
        new = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        with torch.no_grad():
            if module.affine:
                new.weight, new.bias = module.weight, module.bias
            if module.track_running_stats:
                new.running_mean, new.running_var = module.running_mean, module.running_var
                new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in list(module.named_children()):
        setattr(module, name, _convert(child, cls))
    return module


def convert_sync_bn(method: nn.Module, *, sync_bn: bool, key_bn: str, device: torch.device) -> nn.Module:
    """Make BatchNorm synchronised where configured (a no-op on one process).

    ``model.sync_bn``: every network of the method except the key encoder ``encoder_k``;
    ``method.key_bn=sync``: the key encoder (the alternative to shuffle-BN).
    """
    if not dist.is_dist() or dist.world_size() == 1:
        return method
    cls = nn.SyncBatchNorm if device.type == "cuda" else DistBatchNorm
    for name, child in list(method.named_children()):
        if (name == "encoder_k" and key_bn == "sync") or (name != "encoder_k" and sync_bn):
            setattr(method, name, _convert(child, cls))
    return method


# -- gradient synchronisation -------------------------------------------------------------------------


def _bn_buffers(module: nn.Module) -> list[torch.Tensor]:
    out = []
    for m in module.modules():
        if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None:
            out += [m.running_mean, m.running_var]
    return out


@torch.no_grad()
def sync_bn_buffers(module: nn.Module) -> None:
    """Give every rank rank 0's BatchNorm running means and variances (one coalesced broadcast).

    Rank 0's statistics are the authoritative ones, as with DDP's default buffer broadcast: they
    evolve from rank 0's batches only, so what is saved does not depend on when ranks were synced
    (an averaged copy would make a resumed run depend on where the checkpoints fell).
    """
    if not dist.is_dist() or dist.world_size() == 1:
        return
    bufs = _bn_buffers(module)
    if not bufs:
        return
    flat = torch.cat([b.reshape(-1).float() for b in bufs])
    tdist.broadcast(flat, 0)
    off = 0
    for b in bufs:
        n = b.numel()
        b.copy_(flat[off : off + n].view_as(b))
        off += n


@torch.no_grad()
def check_replicas(method: nn.Module) -> list[str]:
    """Names of the parameters and buffers that differ between ranks (float64 checksums), with a
    warning when there are any (a warning, not an error: a GPU kernel with atomics can make
    replicated buffers differ in the last bit, which the user should hear about but can live with)."""
    if not dist.is_dist() or dist.world_size() == 1:
        return []
    names, sums = [], []
    for name, t in list(method.named_parameters()) + list(method.named_buffers()):
        names.append(name)
        acc = torch.zeros(3, dtype=torch.float64, device=t.device)
        for chunk in t.detach().reshape(-1).split(1 << 22):  # no float64 copy of a large bank
            c = chunk.double()
            acc += torch.stack([c.sum(), c.abs().sum(), (c * c).sum()])
        sums.append(acc)
    local = torch.stack(sums) if sums else torch.zeros(0, 3, dtype=torch.float64)
    everyone = dist.all_gather_cat(local.unsqueeze(0))
    differ = (everyone != everyone[:1]).any(dim=(0, 2)).nonzero().flatten().tolist()
    if differ:
        log.warning(
            f"the ranks start from different states ({len(differ)} tensors differ, e.g. {names[differ[0]]}): "
            "replicated state (queue, bank, labels) will not stay identical; the method must set it up "
            "identically on every rank (seeded, deterministic kernels)"
        )
    return [names[i] for i in differ]


class _StepModule(nn.Module):
    """``forward`` = the method's ``training_step``, so DDP can wrap a whole training step."""

    def __init__(self, method: nn.Module):
        super().__init__()
        self.method = method

    def forward(self, batch, step, epoch):
        return self.method.training_step(batch, step, epoch)


class DDPMethod:
    """DistributedDataParallel around ``method.training_step`` (see the module docstring)."""

    def __init__(
        self,
        method: nn.Module,
        device: torch.device,
        *,
        find_unused_parameters: bool = False,
        bucket_cap_mb: float | None = None,
    ):
        self.method = method
        step = _StepModule(method)
        bn = {id(b) for b in _bn_buffers(method)}
        ignore = [f"method.{n}" for n, b in method.named_buffers() if id(b) not in bn]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(step, ignore)
        kw: dict = dict(find_unused_parameters=find_unused_parameters, gradient_as_bucket_view=True)
        if bucket_cap_mb is not None:
            kw["bucket_cap_mb"] = bucket_cap_mb
        kw.update(_no_forward_buffer_sync())
        if device.type == "cuda":
            kw["device_ids"] = [device.index if device.index is not None else torch.cuda.current_device()]
        self.ddp = DistributedDataParallel(step, **kw)

    def training_step(self, batch, step: int, epoch: int):
        """``method.training_step(batch, step, epoch)`` through DDP: (loss, logs); backward of the
        loss all-reduces (averages) the gradients bucket by bucket."""
        return self.ddp(batch, step, epoch)

    def sync_buffers(self) -> None:
        """Give every rank rank 0's BatchNorm running statistics (:func:`sync_bn_buffers`)."""
        sync_bn_buffers(self.method)


def _no_forward_buffer_sync() -> dict:
    """DDP keyword for "broadcast the buffers once at start, not before every forward"."""
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": False}  # BN buffers still synced once at start
    return {"broadcast_buffers": False}  # pragma: no cover - torch < 2.13


def ddp_module(model: nn.Module, device: torch.device, **kw) -> nn.Module:
    """``DistributedDataParallel(model)`` when running distributed, else ``model`` (for plain
    supervised models: the linear head of linear-eval, the network of finetune). Call the wrapper
    for training steps and ``model`` itself for evaluation (``model.state_dict()`` keeps the
    unprefixed names).

    Parameters and buffers are broadcast from rank 0 once, here, and BatchNorm running statistics
    are not broadcast before every forward (they only matter in eval mode): as in pretraining,
    call :func:`sync_bn_buffers` on ``model`` before evaluating or saving it, which gives every
    rank rank 0's statistics.
    """
    if not dist.is_dist() or dist.world_size() == 1:
        return model
    for k, v in _no_forward_buffer_sync().items():
        kw.setdefault(k, v)
    if device.type == "cuda":
        kw.setdefault("device_ids", [device.index if device.index is not None else torch.cuda.current_device()])
    return DistributedDataParallel(model, **kw)


def wrap_ddp(method: nn.Module, device: torch.device, **kw) -> DDPMethod:
    """The gradient synchroniser for ``method``: a :class:`DDPMethod` (``kw`` go to it).

    It broadcasts parameters and BN statistics from rank 0. Every other tensor (queues, banks ...)
    must already agree on every rank: the training loop calls :func:`check_replicas` once the
    method has set itself up (``on_train_start``).
    """
    return DDPMethod(method, device, **kw)
