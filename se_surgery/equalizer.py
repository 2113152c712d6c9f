"""The scale equalizer: ``x -> (x - mean) / std`` with statistics measured on data, then frozen."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .errors import NotCalibratedError
from .site import Site
from .state import Compensation, FoldAction, FoldStep
from .torch_internals import forward_hooks


class ScaleEqualizer(nn.Module):
    """``x -> (x - mean) / std`` with statistics measured on data, then frozen (Kim & Kim, TMLR 2024).

    Scalar statistics by default (the paper's); ``per_channel=True`` keeps one per channel (dim 1). Not learned:
    the buffers change only through :func:`se_surgery.calibrate`. Until calibrated, a forward raises instead of
    silently acting as the identity.

    Args:
        channels: channels of the equalized tensor (used with ``per_channel``).
        per_channel: one mean/std per channel instead of one scalar pair.
        site: where the equalizer sits, as found by the graph pass.
        dtype, device: of the statistics; those of the model it goes into.
    """

    def __init__(self, channels: int = 1, per_channel: bool = False, site: Site | None = None, *,
                 dtype: torch.dtype | None = None, device: torch.device | None = None) -> None:
        super().__init__()
        shape = (channels,) if per_channel else ()
        self.per_channel = per_channel
        self.site = site
        self.register_buffer("mean", torch.zeros(shape, dtype=dtype, device=device))
        self.register_buffer("std", torch.ones(shape, dtype=dtype, device=device))
        self.register_buffer("calibrated", torch.tensor(False, device=device))
        self.is_calibrated = False   # mirror of the buffer, read in forward without a device sync
        self.observer: Callable[[torch.Tensor, torch.Tensor | None], None] | None = None
        self.compensation = Compensation.NONE  # what preserve_function did at this site (see equalize.py)
        self.fold: FoldStep | None = None      # what fold() did here: the one record (folded statistics stay frozen)
        self.stale: str | None = None          # why the statistics no longer describe the weights (a later load)
        self.register_load_state_dict_post_hook(_sync_calibrated)

    @property
    def folded(self) -> FoldAction:
        return self.fold.action if self.fold is not None else FoldAction.NONE

    @property
    def before_resize(self) -> bool:
        """Whether it acts on its resize's input instead of the output: the same map in exact arithmetic (an
        interpolating resize's weights sum to one, so it commutes with ``x -> (x - mean) / std``, per channel too)
        at 1/factor^d of the work. So it does in eager runs of a calibrated equalizer at an upsampling. It stays after
        the resize while calibrating, while hooks watch its output (they see what enters the fusion), and while
        torch.compile or torch.export traces (the compiler fuses it into the resize; graphs keep the paper's
        placement, which the ONNX fold reads)."""
        if self.observer is not None or self.site is None or self.site.kind != "upsample":
            return False
        pre, post = forward_hooks(self)
        return not pre and not post and not torch.compiler.is_compiling()

    @property
    def name(self) -> str:
        return self.site.name if self.site is not None else "this equalizer"

    def set_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.mean.copy_(mean.reshape(self.mean.shape))
        self.std.copy_(std.reshape(self.std.shape))
        self.calibrated.fill_(True)
        self.is_calibrated, self.stale = True, None

    def mark_stale(self, reason: str) -> None:
        """The weights upstream changed after calibration: uncalibrated (the statistics kept, unused) until
        calibrated again, with ``reason`` in the refusal."""
        self.calibrated.fill_(False)
        self.is_calibrated, self.stale = False, reason

    def reset(self) -> None:
        """Back to uncalibrated (mean 0, std 1): the model refuses to run until calibrated again."""
        self.mean.zero_()
        self.std.fill_(1)
        self.calibrated.fill_(False)
        self.is_calibrated = False

    def _shaped(self, value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        value = value if value.dtype == x.dtype else value.to(x.dtype)
        return value.view(-1, *([1] * (x.dim() - 2)))

    def forward(self, x: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        """Equalize ``x``; ``source`` (the resize's input, given by the runtime at resize sites) is only watched
        during calibration, for ``scale="restore"``."""
        if self.observer is not None:  # calibration: watch the input, pass it on unchanged
            self.observer(x, source)
            return x
        if not self.is_calibrated:
            if self.stale:
                raise NotCalibratedError(f"ScaleEqualizer at {self.name}: {self.stale}, so its statistics describe "
                                         f"the old weights. Call se_surgery.calibrate(model, data) before running "
                                         f"the model.")
            raise NotCalibratedError(
                f"ScaleEqualizer at {self.name} is not calibrated: call se_surgery.calibrate(model, data) "
                f"(or pass calibration_data to se_surgery.equalize) before running the model."
            )
        if self.per_channel:
            return (x - self._shaped(self.mean, x)) / self._shaped(self.std, x)
        return (x - self.mean) / self.std  # (0-dim statistics take x's dtype: no cast)

    def extra_repr(self) -> str:
        where = f"site={self.site.name}, " if self.site is not None else ""
        if not self.is_calibrated:
            stats = "uncalibrated"
        elif self.per_channel:
            stats = f"mean~{self.mean.mean().item():.4g}, std~{self.std.mean().item():.4g} ({self.mean.numel()} ch)"
        else:
            stats = f"mean={self.mean.item():.4g}, std={self.std.item():.4g}"
        return where + stats + (f", fold: {self.folded}" if self.folded else "")


def _sync_calibrated(module: nn.Module, _incompatible) -> None:
    module.is_calibrated = bool(module.calibrated)
