"""The contract between the training loop (:mod:`interclr_cli.training`) and a self-supervised method.

The training loop owns the loop, the optimizer, the device, precision and checkpoints; it knows
nothing about queues, banks or labels. A method owns its networks, its loss and its state, and
hands the training loop its extra tensors to save (``extra_state``) and takes them back on resume.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from ..config.schema import Config


@dataclass
class TrainContext:
    """What the training loop offers a method outside the training step.

    ``extract(fn)`` runs ``fn`` (images [B,3,H,W] on the device -> features [B,D]) over every
    image of the training set with the evaluation transform (centre crop, no augmentation) and
    returns the features [N, D] on the device, in dataset index order (gathered across ranks).
    """

    device: torch.device
    num_samples: int
    steps_per_epoch: int
    resumed: bool
    extract: Callable[[Callable[[torch.Tensor], torch.Tensor]], torch.Tensor]
    log: Callable[[str], None]


class Method(nn.Module):
    """Base class. Subclasses set ``self.encoder_q`` (an :class:`~interclr_cli.models.Encoder`)."""

    encoder_q: nn.Module

    def __init__(self, cfg: Config, num_samples: int):
        super().__init__()
        self.cfg = cfg
        self.num_samples = num_samples

    # -- networks -----------------------------------------------------------------------------
    def backbone(self) -> nn.Module:
        """The backbone that is evaluated and exported (torchvision parameter names)."""
        return self.encoder_q.backbone

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimizer updates (``requires_grad``; the key encoder's are frozen)."""
        return [p for p in self.parameters() if p.requires_grad]

    def compile_networks(self) -> None:
        """``torch.compile`` the encoders in place (state_dict names are unchanged)."""
        for name in ("encoder_q", "encoder_k"):
            net = getattr(self, name, None)
            if isinstance(net, nn.Module):
                net.compile()

    # -- hooks ------------------------------------------------------------------------------------
    def on_train_start(self, ctx: TrainContext) -> None:
        """Called once before the first step of a run and after every resume (ctx.resumed)."""

    def on_epoch_start(self, epoch: int, ctx: TrainContext) -> None:
        """Called at the start of every epoch (0-based), also the epoch a resume starts in."""

    def training_step(self, batch: dict, step: int, epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return the loss and a dict of detached scalar tensors to log.

        ``batch`` holds ``view1``, ``view2`` [B,3,H,W] on the device, ``index`` [B] (int64, the
        image's index in the data set) and ``label`` [B] (-1 when unlabelled). Must not sync the
        host (no ``.item()``): the training loop reads the logs every ``train.log_every`` steps.
        """
        raise NotImplementedError

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        """Momentum update, queue, bank and label maintenance, after ``optimizer.step()``."""

    # -- state ------------------------------------------------------------------------------------
    def extra_state(self) -> dict[str, torch.Tensor]:
        """Tensors besides parameters and buffers to save (e.g. RNG states). Names are dotted."""
        return {}

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what ``extra_state`` returned."""
