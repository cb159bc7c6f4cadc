"""What a training step minimises beyond the data's cross-entropy: GoogLeNet's auxiliary
losses (:func:`loss_of`), distillation from a teacher (``--distill``: :class:`Distillation`)
and the group-lasso penalty that makes a dense model groupable (``--learn-groups``:
:class:`GroupLasso`)."""
from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from ..conversion.calibrate.assignment import assign_groups
from ..models.layers import conv_layers, main_logits

__all__ = ["loss_of", "distillation_loss", "Distillation", "GroupLasso"]


def loss_of(out, y: torch.Tensor, aux_weight: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(main logits, loss): cross-entropy, plus ``aux_weight`` x each auxiliary classifier's
    (GoogLeNet's, Szegedy et al.: 0.3)."""
    logits = main_logits(out)
    loss = F.cross_entropy(logits, y)
    if isinstance(out, tuple):
        loss = loss + aux_weight * sum(F.cross_entropy(a, y) for a in out[1:] if a is not None)
    return logits, loss


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor,
                      temperature: float = 4.0) -> torch.Tensor:
    """Hinton et al.'s distillation term: the KL divergence from the teacher's softened
    class probabilities to the student's, at ``temperature``, times temperature squared (so
    its gradients keep their scale as the temperature changes)."""
    t = float(temperature)
    return F.kl_div(F.log_softmax(student.float() / t, 1), F.softmax(teacher.float() / t, 1),
                    reduction="batchmean") * t * t


class Distillation:
    """The loss of a student trained with a teacher: ``(1 - weight) x`` the usual loss plus
    ``weight x`` :func:`distillation_loss` on the teacher's logits for the same batch (the
    teacher in eval mode, no gradients)."""

    def __init__(self, teacher: nn.Module, temperature: float = 4.0, weight: float = 0.5):
        self.teacher, self.temperature, self.weight = teacher.eval(), temperature, weight
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def __call__(self, x: torch.Tensor, logits: torch.Tensor, loss: torch.Tensor
                 ) -> torch.Tensor:
        with torch.no_grad():
            target = main_logits(self.teacher(x))
        return (1 - self.weight) * loss + self.weight * distillation_loss(
            logits, target, self.temperature)


class GroupLasso:
    """CondenseNet's idea for any CNN: a group-lasso penalty, ``weight x`` the sum over the
    grouped-to-be convs of the L2 norms of each (filter, input channel) kernel outside its
    block of an assignment of filters and input channels to groups
    (:func:`deeproots.conversion.calibrate.assign_groups`, on the weights' energy); :meth:`reassign`
    re-estimates the assignment from the weights as they are. Driving those kernels to zero
    makes the model groupable: a calibrated conversion then keeps almost all its weight."""

    def __init__(self, model: nn.Module, groups: Dict[str, int], weight: float = 1e-3):
        self.convs = {n: conv_layers(model)[n] for n in groups}
        self.groups, self.weight = dict(groups), weight
        self.masks: Dict[str, torch.Tensor] = {}
        self.reassign()

    @torch.no_grad()
    def reassign(self) -> Dict[str, float]:
        """New blocks from the weights as they are; returns each layer's fraction of its
        weight energy inside them."""
        kept = {}
        for name, conv in self.convs.items():
            score = conv.weight.detach().double().pow(2).sum((2, 3)).cpu().numpy()
            rows, cols, kept[name] = assign_groups(score, self.groups[name], starts=1)
            inside = torch.from_numpy(rows[:, None] == cols[None, :])
            self.masks[name] = (~inside).to(conv.weight.device, conv.weight.dtype)
        return kept

    def __call__(self) -> torch.Tensor:
        total = 0.0
        for name, conv in self.convs.items():
            norms = conv.weight.float().pow(2).sum((2, 3)).add(1e-12).sqrt()
            total = total + (norms * self.masks[name]).sum()
        return self.weight * total

    @torch.no_grad()
    def kept(self) -> Dict[str, float]:
        """Each layer's fraction of its weight energy inside its blocks, as assigned."""
        out = {}
        for name, conv in self.convs.items():
            energy = conv.weight.detach().float().pow(2).sum((2, 3))
            out[name] = 1.0 - float((energy * self.masks[name]).sum() / energy.sum())
        return out
