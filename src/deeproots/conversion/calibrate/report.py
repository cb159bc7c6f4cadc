"""What a calibrated conversion did, per grouped conv and per stage."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

from ...text import format_table
from .refit import MIN_PIXELS_PER_WEIGHT

__all__ = ["LayerCalibration", "CalibrationReport"]


@dataclass
class LayerCalibration:
    """One grouped conv of a calibrated conversion: groups; the fraction of its weight
    energy kept on the diagonal blocks without and with the assignment, weighted by the
    input channels' activation energy; the fraction of its output energy the cut keeps on
    the calibration images; which sides were permuted (or why not); the 1x1 conv refit after
    it and the energy the fit left unexplained."""

    layer: str
    groups: int
    weight_kept_plain: float
    weight_kept: float
    output_kept: Optional[float] = None
    permuted_in: bool = False
    permuted_out: bool = False
    fixed: str = ""
    refit: str = ""
    refit_unexplained: Optional[float] = None
    grouped_unexplained: Optional[float] = None  # the grouped conv's own refit


@dataclass
class CalibrationReport:
    """What :func:`calibrate` did, per grouped conv, and (when the caller measured them) the
    test top-1 of each stage (:data:`STAGES`)."""

    images: int
    layers: List[LayerCalibration] = field(default_factory=list)
    batchnorms: int = 0  # how many were re-estimated
    batchnorm: str = "keep"  # the trained statistics kept, or "reestimate"
    refits: Dict[str, float] = field(default_factory=dict)  # 1x1 conv -> unexplained energy
    kept: List[str] = field(default_factory=list)  # 1x1 convs too few pixels left as they were
    # grouped convs not refit within their groups: a conv subclass whose output is more
    # than its F.conv2d call with its weight (a gain after it), which no fit of it gives
    not_refit: List[str] = field(default_factory=list)
    # conv -> (calibration pixels, weights a filter fits, images that give 8 pixels a weight)
    # where the pixels are fewer than the weights (refit all the same)
    underdetermined: Dict[str, Tuple[int, int, int]] = field(default_factory=dict)
    stages: Dict[str, Optional[float]] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        head = ("layer", "groups", "weight kept", "assigned", "output kept", "refit kept",
                "permuted", "1x1 refit", "unexplained")
        rows = [(c.layer, str(c.groups), f"{100 * c.weight_kept_plain:.1f}%",
                 f"{100 * c.weight_kept:.1f}%",
                 f"{100 * c.output_kept:.1f}%" if c.output_kept is not None else "",
                 f"{100 * (1 - c.grouped_unexplained):.1f}%"
                 if c.grouped_unexplained is not None else "",
                 "/".join(s for s, ok in (("in", c.permuted_in), ("out", c.permuted_out)) if ok)
                 or "-", c.refit or "-",
                 f"{100 * c.refit_unexplained:.2f}%" if c.refit_unexplained is not None else "")
                for c in self.layers]
        norms = (f"{self.batchnorms} batch norms re-estimated" if self.batchnorm == "reestimate"
                 else "batch norms: the trained statistics kept")
        lines = [f"calibrated on {self.images} images; {norms}; {self.seconds:.1f} s",
                 format_table(head, rows, align="lrrrrrlll")]
        if self.kept:
            lines.append(f"not refit, too few calibration pixels for their weights (add "
                         f"calibration images to refit them): {', '.join(self.kept)}")
        if self.not_refit:
            lines.append(f"grouped but not refit within their groups, the diagonal blocks "
                         f"kept (a conv subclass whose output is more than its F.conv2d "
                         f"call, e.g. a gain after it): {', '.join(self.not_refit)}")
        if self.underdetermined:
            worst = max(n for _, _, n in self.underdetermined.values())
            lines.append(
                "refit from fewer calibration pixels than the weights a filter fits (the fit "
                "memorises these images; its unexplained share is measured on them): " +
                ", ".join(f"{name} {pixels:,} pixels for {weights:,} weights"
                          for name, (pixels, weights, _) in self.underdetermined.items()) +
                f". --calibration-images {worst:,} or more gives each of them "
                f"{MIN_PIXELS_PER_WEIGHT} pixels a weight")
        fixed = [f"{c.layer}: {c.fixed}" for c in self.layers if c.fixed]
        if fixed:
            lines += ["channel orders kept:"] + [f"  {f}" for f in fixed]
        if self.stages:
            lines.append(format_table(("stage", "test top-1"), [
                (k, f"{v:.4f}" if v is not None else "") for k, v in self.stages.items()],
                align="lr"))
        return "\n".join(lines)
