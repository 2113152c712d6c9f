"""Installation: the equalizers' registry on the model and the hooks that run them, as verbs and their inverses.

``attach`` gives a model its registry (``model.scale_equalizers``, the only attribute se_surgery adds), one
equalizer per site and the hooks of ``dispatch.py`` on the modules that need them; ``detach`` takes an equalizer
out again (and, with the last one, the hooks and the registry); ``reattach`` hooks the module that replaced an
owner; ``_sync_callees`` keeps the callee hooks on exactly the modules the owners call. The declared state is the
registry (:class:`~se_surgery.state.EqualizerRegistry`: the equalizers, and per owner path the
:class:`~se_surgery.state.OwnerSites` its hooks read) and the hooks themselves, which hold only names: nothing else
is kept on the user's modules.
"""

from __future__ import annotations

import torch
from torch import nn

from .bound import binds
from .dispatch import (
    OwnerForward,
    _enter_callee,
    _enter_model,
    _homes,
    _leave_callee,
    _leave_model,
    _submodule,
    owner_forward,
    replaced_owners,
)
from .equalizer import ScaleEqualizer
from .errors import UsageError, warn
from .modes import running_norms, unwrap
from .site import Site, own_forwards
from .state import EqualizerRegistry, OwnerSites, registry
from .torch_internals import forward_hooks, load_pre_hooks, remove_forward_hook


def equalizers(model: nn.Module) -> list[ScaleEqualizer]:
    """The model's equalizers, in the order the graph pass found them.

    Args:
        model: a model returned by :func:`se_surgery.equalize` (any other model gives ``[]``).
    """
    model = unwrap(model)
    found = registry(model)
    return list(found.values()) if found is not None else []


def reattach(model: nn.Module) -> list[ScaleEqualizer]:
    """Hook the replacing modules of :func:`replaced_owners` and mark their equalizers uncalibrated (the new module
    has other statistics); returns those equalizers. An owner whose path is gone is a UsageError."""
    reg = registry(model)
    renewed = []
    for path in replaced_owners(model):
        module = _submodule(model, path)
        if module is None:
            raise UsageError(f"{path} held equalizer sites of {type(model).__name__} but the model has no such module "
                             f"any more: se_surgery.equalize the plain model again.")
        sources = {key.source.rpartition("+")[0] for key in reg.owners[path].sites} - {""}
        if sources - own_forwards(module):
            raise UsageError(f"{path or 'the model'} is now a {type(module).__name__}, but its equalizer sites were "
                             f"found in {', '.join(sorted(sources))}: the new module makes other calls. Equalize the "
                             f"model with the new module afresh (se_surgery.equalize on a model without equalizers), "
                             f"or put back a module of the class the sites were found in.")
        _remove_hooks(module)
        _hook_owner(module, path, reg)
        reg.owners[path].bound = binds(module, reg.owners[path])
        _sync_callees(model)
        for targets in reg.owners[path].sites.values():
            for name in targets.values():
                reg[name].reset()
                renewed.append(reg[name])
    return renewed


def _ours(hook, kinds=("callee", "model")) -> bool:
    return "callee" in kinds and hook in (_enter_callee, _leave_callee) \
        or "model" in kinds and hook in (_enter_model, _leave_model)


def foreign_hooks(module: nn.Module) -> bool:
    """Whether the module has forward hooks other than se_surgery's."""
    return any(not _ours(h) for hooks in forward_hooks(module) for h in hooks.values())


def _has_hooks(module: nn.Module, kinds: tuple[str, ...]) -> bool:
    if "owner" in kinds and owner_forward(module) is not None:
        return True
    return any(_ours(h, kinds) for h in forward_hooks(module)[0].values())


def _remove_hooks(module: nn.Module, kinds: tuple[str, ...] = ("owner", "callee", "model")) -> None:
    found = owner_forward(module)
    if "owner" in kinds and found is not None:  # the instance's forward as it was before ours
        if found.inner is not None:
            module.forward = found.inner
        else:
            del module.__dict__["forward"]
    for hooks in forward_hooks(module):
        for key in [k for k, h in hooks.items() if _ours(h, kinds)]:
            remove_forward_hook(module, key)


def foreign_owners(model: nn.Module) -> list[str]:
    """Paths of the modules that are owners of *another* equalized model (an instance forward whose owner path
    the model's own registry does not list): a module shared between two models, or a copy of one."""
    reg = registry(model)
    return [name for name, module in model.named_modules()
            if (found := owner_forward(module)) is not None and (reg is None or found.path not in reg.owners)]


def strip_owner(module: nn.Module) -> None:
    """Take another model's instance forward off a module (a copy's, not shared with that model any more)."""
    _remove_hooks(module, ("owner",))


def _callees(module: nn.Module):
    """The modules an owner's forward can call: its children, through containers that have no forward of their
    own (``ModuleList``, ``ModuleDict``); never the equalizers."""
    for child in module.children():
        if isinstance(child, EqualizerRegistry):
            continue
        if type(child).forward is nn.Module.forward:
            yield from _callees(child)
        else:
            yield child


def _sync_callees(model: nn.Module) -> None:
    """Give the modules the owners call (and only those) the hooks that pause an owner's mode during their call
    (:func:`_pause`); an owner pauses its caller's mode itself."""
    owners = [m for m in model.modules() if _has_hooks(m, ("owner",))]
    wanted = {id(c) for o in owners for c in _callees(o) if not _has_hooks(c, ("owner",))}
    for module in model.modules():
        hooked = _has_hooks(module, ("callee",))
        if hooked and id(module) not in wanted:
            _remove_hooks(module, ("callee",))
        elif not hooked and id(module) in wanted:
            module.register_forward_pre_hook(_enter_callee)
            module.register_forward_hook(_leave_callee, always_call=True)


def attach(model: nn.Module, sites: list[Site], per_channel: bool = False,
           train_calls: dict[str, int] | None = None) -> list[ScaleEqualizer]:
    """Give every site an equalizer in ``model.scale_equalizers`` and hook its owner; returns the new equalizers
    (sites already equalized are skipped). ``train_calls``: owners the training-mode graph calls more often."""
    if isinstance(model, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        raise UsageError(f"se_surgery cannot add equalizers to a bare {type(model).__name__}: wrap it in an "
                         f"nn.Module whose forward calls it.")
    reg = registry(model)
    if reg is None:
        reg = EqualizerRegistry()
        model.scale_equalizers = reg
        model.register_forward_pre_hook(_enter_model, prepend=True)
        model.register_forward_hook(_leave_model, always_call=True)
    if not any(getattr(h, "hook", None) is _check_load for h in load_pre_hooks(model).values()):
        model.register_load_state_dict_pre_hook(_check_load)
    ref = next((t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()), None)
    added = []
    for site in sites:
        name = site.module_name
        if name in reg:
            continue
        owner = reg.owners.get(site.owner)
        if owner is None:
            owner = reg.owners[site.owner] = OwnerSites(site.owner, site.owner_calls,
                                                        (train_calls or {}).get(site.owner))
            _hook_owner(model.get_submodule(site.owner), site.owner, reg)
        equalizer = ScaleEqualizer(site.shape[1] if len(site.shape) > 1 else 1, per_channel, site,
                                   dtype=ref.dtype if ref is not None else None,
                                   device=ref.device if ref is not None else None)
        reg[name] = equalizer
        owner.add(site, name)
        added.append(equalizer)
    for path in {site.owner for site in sites}:
        reg.owners[path].bound = binds(model.get_submodule(path), reg.owners[path])
    _sync_callees(model)
    return added


def _check_load(model: nn.Module, state_dict: dict, prefix: str, *_args) -> None:
    """``load_state_dict`` pre-hook of an equalized model: where the load changes weights upstream of calibrated
    equalizers and brings no statistics for them (``scale_equalizers.*``), their statistics describe the old
    weights. Mark those equalizers stale (they refuse to run until calibrated again) and say so now."""
    reg = registry(model)
    if reg is None or not len(reg):
        return
    reg.check_shapes(state_dict, prefix + "scale_equalizers.")  # (before any weight of the model is loaded)
    if any(k.startswith(prefix + "scale_equalizers.") for k in state_dict):
        return
    current = model.state_dict()
    changed = set()
    for key, value in state_dict.items():
        now = current.get(key[len(prefix):]) if key.startswith(prefix) else None
        if isinstance(now, torch.Tensor) and isinstance(value, torch.Tensor) and (
                now.shape != value.shape or not torch.equal(now, value.to(now.device, now.dtype))):
            changed.add(key[len(prefix):])
    if reg.norm == "batch":  # calibrated on batch statistics: these layers' running statistics played no part
        changed -= {f"{name}.{buffer}" for name, _ in running_norms(model) if name not in reg.frozen_norms
                    for buffer in ("running_mean", "running_var", "num_batches_tracked")}
    stale = [eq for eq in reg.values() if eq.is_calibrated and not eq.folded and changed & eq.site.weights]
    if not stale:
        return
    shown = sorted(changed & set().union(*(eq.site.weights for eq in stale)))
    names = f"{', '.join(shown[:3])}{', ...' if len(shown) > 3 else ''}"
    for eq in stale:
        eq.mark_stale(f"load_state_dict changed {len(shown)} weight(s) upstream of it ({names}) and brought no "
                      f"statistics")
    warn(f"se_surgery: load_state_dict changed {len(shown)} weight(s) upstream of {len(stale)} of the "
         f"{len(reg)} equalizer(s) of {type(model).__name__} ({names}) and brought no statistics for them: theirs "
         f"describe the old weights, so they refuse to run until se_surgery.calibrate(model, data) measures them "
         f"again (or load a state_dict that holds the scale_equalizers.* entries too).")


def _hook_owner(module: nn.Module, path: str, reg: EqualizerRegistry) -> None:
    _homes[module] = reg
    module.forward = OwnerForward(path, module, module.__dict__.get("forward"))


def detach(model: nn.Module, equalizer: ScaleEqualizer, keep_registry: bool = False) -> None:
    """Take one equalizer out; when none is left, the hooks go too and, unless ``keep_registry`` (an empty one
    keeps fold's record and adds no state_dict key), the registry."""
    reg = registry(model)
    site = equalizer.site
    owner = reg.owners[site.owner]
    targets = owner.sites[site.call_key]
    del targets[site.arg]
    if not targets:
        del owner.sites[site.call_key]
    del reg[site.module_name]
    if not owner.sites:
        del reg.owners[site.owner]
        for module in model.modules():  # the owner and any copy of it (hooks name the path, not the module)
            if module is not model:
                if owner_forward(module, site.owner) is not None:
                    _remove_hooks(module)
    if not len(reg):
        _remove_hooks(model)
        if not keep_registry:
            del model.scale_equalizers
            for key, hook in list(load_pre_hooks(model).items()):
                if getattr(hook, "hook", None) is _check_load:
                    del load_pre_hooks(model)[key]
    _sync_callees(model)
