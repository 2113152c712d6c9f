"""The scale equalizer, and how it is put into the user's own eager model.

An equalizer sits after a call that happens inside some module's forward (``F.interpolate`` in a decoder head,
``torch.cat`` for other fusion inputs). Module hooks cannot reach such a call, and rewriting the forward would lose
the user's class. So each *owner* module gets a forward pre-hook that pushes a ``TorchFunctionMode`` and a
post-hook that pops it; the mode counts the owner's bilinear resizes and fusions and passes the matching outputs
(or inputs) through the owner's equalizers. The model keeps its class, signature, train/eval behaviour and
state_dict keys (plus ``scale_equalizers.<site>.{mean,std,calibrated}``), works at any input size and
compiles with ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .find import Site

_RESIZE_FUNCS = {F.interpolate, torch._C._nn.upsample_bilinear2d}
_FUSION_FUNCS = {torch.cat, torch.concat, torch.concatenate, torch.stack, torch.add, torch.Tensor.add,
                 torch.Tensor.add_, torch.Tensor.__add__, torch.Tensor.__iadd__, torch.Tensor.__radd__}


class ScaleEqualizer(nn.Module):
    """``x -> (x - mean) / std`` with statistics measured on data, then frozen (Kim & Kim, TMLR 2024).

    Scalar statistics by default (the paper's); ``per_channel=True`` keeps one per channel (dim 1). Not learned:
    the buffers change only through :func:`se_surgery.calibrate`. Until calibrated, a forward raises instead of
    silently acting as the identity.
    """

    def __init__(self, channels: int = 1, per_channel: bool = False, site: Site | None = None) -> None:
        super().__init__()
        shape = (channels,) if per_channel else ()
        self.per_channel = per_channel
        self.site = site
        self.register_buffer("mean", torch.zeros(shape))
        self.register_buffer("std", torch.ones(shape))
        self.register_buffer("calibrated", torch.tensor(False))
        self.is_calibrated = False   # mirror of the buffer, read in forward without a device sync
        self.observer: Callable[[torch.Tensor], None] | None = None
        self.compensation = ""       # what preserve_function did at this site (see insert.py)
        self.register_load_state_dict_post_hook(_sync_calibrated)

    def set_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.mean.copy_(mean.reshape(self.mean.shape))
        self.std.copy_(std.reshape(self.std.shape))
        self.calibrated.fill_(True)
        self.is_calibrated = True

    def _shaped(self, value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return value.view(-1, *([1] * (x.dim() - 2))) if self.per_channel else value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:  # calibration: watch the input, pass it on unchanged
            self.observer(x)
            return x
        if not self.is_calibrated:
            where = self.site.name if self.site is not None else "this equalizer"
            raise RuntimeError(
                f"ScaleEqualizer at {where} is not calibrated: call se_surgery.calibrate(model, data) "
                f"(or pass calibration_data to se_surgery.equalize) before running the model."
            )
        return (x - self._shaped(self.mean, x)) / self._shaped(self.std, x)

    def extra_repr(self) -> str:
        where = f"site={self.site.name}, " if self.site is not None else ""
        if not self.is_calibrated:
            stats = "uncalibrated"
        elif self.per_channel:
            stats = f"mean~{self.mean.mean().item():.4g}, std~{self.std.mean().item():.4g} ({self.mean.numel()} ch)"
        else:
            stats = f"mean={self.mean.item():.4g}, std={self.std.item():.4g}"
        return where + stats


def _sync_calibrated(module: nn.Module, _incompatible) -> None:
    module.is_calibrated = bool(module.calibrated)


class _ForwardState:
    """Shared by the hooks of one model: which module calls are running, and re-entrancy guards."""

    def __init__(self) -> None:
        self.in_model = False
        self.calls: dict[str, int] = {}
        self.busy = False      # inside an equalizer: its own ops are not counted
        self.bypass = False    # capture of an already equalized model: equalizers pass through


class _SiteMode(TorchFunctionMode):
    """Counts the owner's bilinear resizes and fusion ops, and routes the matching ones through equalizers."""

    def __init__(self, equalizers: dict[str, ScaleEqualizer], call: int, state: _ForwardState) -> None:
        super().__init__()
        self.equalizers, self.call, self.state = equalizers, call, state
        self.resizes = 0
        self.fusions = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.state.busy:
            return func(*args, **kwargs)
        if func in _RESIZE_FUNCS:
            if func is F.interpolate and _interp_mode(args, kwargs) != "bilinear":
                return func(*args, **kwargs)
            key = f"call{self.call}_resize{self.resizes}"
            self.resizes += 1
            out = func(*args, **kwargs)
            return self._apply(key, out) if key in self.equalizers else out
        if func in _FUSION_FUNCS:
            prefix = f"call{self.call}_fusion{self.fusions}_input"
            self.fusions += 1
            wanted = [k for k in self.equalizers.keys() if k.startswith(prefix)]
            if wanted:
                args, kwargs = self._equalize_inputs(func, prefix, wanted, args, kwargs)
        return func(*args, **kwargs)

    def _apply(self, key: str, x: torch.Tensor) -> torch.Tensor:
        if self.state.bypass:
            return x
        self.state.busy = True
        try:
            return self.equalizers[key](x)
        finally:
            self.state.busy = False

    def _equalize_inputs(self, func, prefix, wanted, args, kwargs):
        positions = {int(k[len(prefix):]): k for k in wanted}
        if func in (torch.cat, torch.concat, torch.concatenate, torch.stack):
            tensors = list(kwargs.pop("tensors") if "tensors" in kwargs else args[0])
            tensors = [self._apply(positions[i], t) if i in positions else t for i, t in enumerate(tensors)]
            return (tensors, *args[1:]) if args else (tensors,), kwargs
        args = list(args)
        for i, key in positions.items():
            args[i] = self._apply(key, args[i])
        return tuple(args), kwargs


def _interp_mode(args, kwargs) -> str:
    return kwargs.get("mode", args[3] if len(args) > 3 else "nearest")


def _enter_model(model: nn.Module, _args) -> None:
    state: _ForwardState = model._se_state
    state.in_model = True
    state.calls.clear()


def _leave_model(model: nn.Module, _args, _out) -> None:
    model._se_state.in_model = False


def _enter_owner(owner: nn.Module, _args) -> None:
    state: _ForwardState = owner._se_owner_state
    path = owner._se_owner_path
    call = state.calls.get(path, 0) if state.in_model else 0
    state.calls[path] = call + 1
    mode = _SiteMode(owner._se_equalizers, call, state)
    owner._se_modes.append(mode)
    mode.__enter__()


def _leave_owner(owner: nn.Module, _args, _out) -> None:
    owner._se_modes.pop().__exit__(None, None, None)


def attach(model: nn.Module, sites: list[Site], per_channel: bool = False) -> list[ScaleEqualizer]:
    """Give every site an equalizer and hook its owner module; sites already equalized are skipped.

    All equalizers live in one ``model.scale_equalizers`` ModuleDict (owners such as torchvision's ASPPPooling are
    ``nn.Sequential``s that would run any child added to them); each owner keeps plain references to its own.
    """
    if isinstance(model, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        raise TypeError(f"se_surgery cannot add equalizers to a bare {type(model).__name__}: wrap it in an "
                        f"nn.Module whose forward calls it.")
    state = getattr(model, "_se_state", None)
    if state is None:
        state = model._se_state = _ForwardState()
        model.scale_equalizers = nn.ModuleDict()
        model.register_forward_pre_hook(_enter_model)
        model.register_forward_hook(_leave_model, always_call=True)
    ref = next(model.parameters(), None)
    added = []
    for site in sites:
        owner = model.get_submodule(site.owner)
        if not hasattr(owner, "_se_equalizers"):
            owner._se_equalizers = {}
            owner._se_owner_state = state
            owner._se_owner_path = site.owner
            owner._se_modes = []
            owner.register_forward_pre_hook(_enter_owner)
            owner.register_forward_hook(_leave_owner, always_call=True)
        if site.key in owner._se_equalizers:
            continue
        name = site.module_name
        if name in model.scale_equalizers:
            raise ValueError(f"two sites map to the equalizer name {name!r}; rename one of the modules.")
        equalizer = ScaleEqualizer(site.shape[1] if len(site.shape) > 1 else 1, per_channel, site)
        if ref is not None:
            equalizer.to(ref.device)
        model.scale_equalizers[name] = equalizer
        owner._se_equalizers[site.key] = equalizer
        added.append(equalizer)
    return added


def remove_equalizer(model: nn.Module, equalizer: ScaleEqualizer) -> None:
    """Take one equalizer out; when none is left, the hooks go too and the model is as it was."""
    site = equalizer.site
    owner = model.get_submodule(site.owner)
    del owner._se_equalizers[site.key]
    del model.scale_equalizers[site.module_name]
    if not owner._se_equalizers:
        _unhook(owner, _enter_owner, _leave_owner)
        for attr in ("_se_equalizers", "_se_owner_state", "_se_owner_path", "_se_modes"):
            delattr(owner, attr)
    if not len(model.scale_equalizers):
        _unhook(model, _enter_model, _leave_model)
        del model.scale_equalizers
        for attr in ("_se_state", "_se_input_form"):
            if hasattr(model, attr):
                delattr(model, attr)


def _unhook(module: nn.Module, pre, post) -> None:
    for hooks, fn in ((module._forward_pre_hooks, pre), (module._forward_hooks, post)):
        for handle_id in [k for k, h in hooks.items() if h is fn]:
            del hooks[handle_id]
            module._forward_hooks_always_called.pop(handle_id, None)


def equalizers(model: nn.Module) -> Iterator[ScaleEqualizer]:
    """The model's equalizers, in module order."""
    return (m for m in model.modules() if isinstance(m, ScaleEqualizer))
