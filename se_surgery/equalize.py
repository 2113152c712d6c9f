"""equalize(): capture, find, attach, verify, calibrate, and optionally keep the pretrained function."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch
from torch import nn

from .absorb import absorb_input_affine, refusal, shift_absorbable
from .balance import branch_scales, record, spreads, warn_wider
from .calibrate import InputFn, check_batches, check_data, check_scale, choose_norm, replayable, run_levels
from .capture import capture
from .dispatch import bypassed
from .equalizer import ScaleEqualizer
from .errors import SiteMismatchError, UsageError, warn
from .find import explain, find_sites, module_calls
from .inputs import ExampleInputs, default_example, split_inputs
from .install import attach, detach, equalizers, foreign_owners, reattach, strip_owner
from .modes import copy_model, eval_mode, frozen_norms, outside_inference_mode, resolve_norm
from .site import Site, own_forwards
from .state import Compensation, registry
from .torch_internals import OptimizedModule, tree_leaves
from .where import Where, choose, choose_measured, resolve


@outside_inference_mode
def equalize(
    model: nn.Module,
    example_inputs: ExampleInputs | None = None,
    calibration_data: Iterable | None = None,
    *,
    per_channel: bool = False,
    branches: str = "upsampled",
    where: str | Where | Callable[[Site], bool] = "every",
    scale: str = "unit",
    norm: str = "auto",
    preserve_function: bool = False,
    inplace: bool = False,
    max_batches: int | None = None,
    progress: bool = True,
    input_fn: InputFn | None = None,
) -> nn.Module:
    """Insert a ScaleEqualizer after every interpolating upsampling that feeds a fusion (or those ``where``
    chooses), and calibrate them.

    Args:
        model: any ``nn.Module`` that ``torch.export.export(..., strict=False)`` captures on ``example_inputs``.
        example_inputs: a tuple of positional inputs, a dict of keyword inputs, or one tensor, at the training size.
            ``None``: a random batch of one at 512 px (2-D; 64 for 3-D, 4096 for 1-D) with the channels of the
            model's first convolution (transformers: ``pixel_values`` with ``config.num_channels``), announced in a
            warning.
        calibration_data: batches to measure the statistics on (see :func:`se_surgery.calibrate`); ``None`` leaves
            the equalizers uncalibrated, and the model refuses to run until ``se_surgery.calibrate`` is called.
        per_channel: one mean/std per channel instead of the paper's single scalar pair.
        branches: ``"upsampled"`` (the paper's placement) or ``"all"`` (every input of those fusions).
        where: which fusions get equalizers: a preset (``"every"``: all of them; ``"paper"``: all but the chained
            additions of top-down paths; ``"final"``: only the final merge of the levels; ``"cat"``, ``"add"``: by
            fusion kind; ``"measured"``: where equalizing brings the branches closer together on the calibration
            data), a :class:`se_surgery.Where` (kinds, place, include/exclude patterns, names, rules), or a
            function of a :class:`se_surgery.Site`. Recorded in the recipe; ``describe`` lists the sites left
            alone and why.
        scale: ``"unit"`` (the paper's: mean 0, std 1) or ``"restore"`` (each upsampled branch gets back the std
            its map had before the resize; see :func:`se_surgery.calibrate`). docs/evidence/README.md has what
            each measured in training.
        norm: how BatchNorm-like layers normalise while calibrating: ``"batch"`` (each batch's statistics, as
            training sees them), ``"running"`` (their running statistics, as eval mode does) or ``"auto"`` (as
            ``model.training`` says: a model built for training is in training mode, one made ready for
            deployment in eval mode). Recorded on the model and kept by later ``se_surgery.calibrate`` calls; see
            :func:`se_surgery.calibrate`.
        preserve_function: let each site's consumer absorb the statistics so the model computes what it did before.
        inplace: edit ``model`` itself instead of a deep copy.
        max_batches: calibrate on at most this many batches per level.
        progress: show tqdm progress bars.
        input_fn: turns one calibration batch into the model's inputs, where the documented rule does not fit.

    Returns:
        The model (a copy unless ``inplace``): same class and call signature, plus ``model.scale_equalizers``.
    """
    check_batches(max_batches)
    for flag, value in (("per_channel", per_channel), ("preserve_function", preserve_function), ("inplace", inplace)):
        if not isinstance(value, bool):
            raise UsageError(f"{flag}={value!r}: give True or False.")
    choice = resolve(where)
    if choice.measured is not None and (calibration_data is None or scale != "unit" or branches != "upsampled"):
        raise UsageError(f"{choice} decides on the branch scales measured on calibration_data, at the unit scale, "
                         f"for branches='upsampled': pass calibration_data (and keep scale='unit', "
                         f"branches='upsampled'), or choose the sites by kind, place or pattern.")
    if preserve_function and calibration_data is None:
        raise UsageError("preserve_function=True needs calibration_data: the compensation uses the statistics.")
    check_scale(scale, [])
    resolve_norm(model, norm)  # (an unknown value fails before any work)
    if scale != "unit" and calibration_data is None:
        raise UsageError(f"scale={scale!r} is what calibration measures: pass calibration_data, or equalize without "
                         f"it and call se_surgery.calibrate(model, data, scale={scale!r}).")
    if example_inputs is None:
        example_inputs = default_example(model)
        shown = {k: tuple(v.shape) for k, v in example_inputs.items()} if isinstance(example_inputs, dict) \
            else tuple(example_inputs[0].shape)
        warn(f"se_surgery: no example_inputs given; finding the sites of {type(model).__name__} on a random "
             f"input of shape {shown}. Pass example_inputs at your training size if it differs.")
    args, kwargs = split_inputs(example_inputs)
    if calibration_data is not None:
        check_data(calibration_data)
        calibration_data = replayable(calibration_data)  # read once: measuring, the levels and the spreads replay it
    compiled = next((name for name, m in model.named_modules()
                     if isinstance(m, OptimizedModule)), None)
    if compiled is not None:
        raise UsageError(f"{compiled or 'the model'} of {type(model).__name__} is a torch.compile'd module: its "
                         f"compiled code would run without the equalizers' hooks. Equalize the plain model, then "
                         f"compile the result (torch.compile(model) or model.compile()).")
    inner = next((name for name, m in model.named_modules() if name and registry(m) is not None), None)
    if inner is not None:
        raise UsageError(f"{type(model).__name__} contains an equalized model at {inner!r}: equalizing the whole "
                         f"would add a second equalizer at its sites. Equalize the plain model before wrapping it, "
                         f"or use the inner model as it is.")
    shared = foreign_owners(model)
    if shared and inplace:
        raise UsageError(f"{', '.join(shared[:3])} of {type(model).__name__} already hold(s) the sites of another "
                         f"equalized model (a module shared by two models): one module cannot carry the equalizers of "
                         f"both. Give this model its own copy (copy.deepcopy) of the shared module, or equalize with "
                         f"inplace=False; nothing was changed.")
    target = model if inplace else copy_model(model)
    for path in shared:  # the copy's modules are its own now
        strip_owner(target.get_submodule(path))
    with bypassed():
        program = capture(target, example_inputs)
    sites, left = choose(_in_tree(target, find_sites(program, branches=branches)), choice)
    if left and not sites:
        warn(f"se_surgery: {choice} leaves every site of {type(model).__name__} alone "
             f"({'; '.join(f'{n}: {why}' for n, why in list(left.items())[:4])}); the model is returned unchanged.")
        return target
    if not sites:
        warn(f"se_surgery: no interpolating upsampling feeds a fusion in {type(model).__name__} "
             f"({explain(program)}); the model is returned unchanged.")
        return target
    form = ("kwargs", tuple(kwargs)) if kwargs else ("args", len(args))  # how a batch maps to the inputs
    if choice.measured is not None:
        scales = branch_scales(target, program, sites, calibration_data, form=form,
                               norm=choose_norm(target, norm, calibration_data, input_fn),
                               frozen=frozen_norms(target, norm), max_batches=max_batches, input_fn=input_fn)
        sites, more = choose_measured(sites, choice, scales)
        left.update(more)
        if not sites:
            warn(f"se_surgery: {choice} leaves every fusion of {type(model).__name__} alone "
                 f"({'; '.join(list(more.values())[:4])}); the model is returned unchanged.")
            return target
    clash = sorted({eq.name for eq in equalizers(target)} & set(left))
    if clash:
        raise UsageError(f"{type(model).__name__} is already equalized at {', '.join(clash[:4])}, which {choice} "
                         f"leaves alone ({left[clash[0]]}). To change where it is equalized, equalize the model "
                         f"without equalizers (the one you started from) with this choice; nothing was changed.")
    reg = registry(target)
    before = (reg.recipe, reg.input_form) if reg is not None else None
    weights = {k: v.clone() for k, v in target.state_dict().items()} if inplace and preserve_function else None
    renewed = reattach(target)  # an equalized model whose owner module was replaced: equalize the new module
    added = attach(target, sites, per_channel=per_channel, train_calls=_training_calls(target, example_inputs,
                                                                                       program))
    if not added and not renewed:
        warn(f"se_surgery: {type(model).__name__} is already equalized at all {len(sites)} sites; "
             f"nothing added.")
        return target
    try:
        _finish(target, added + renewed, args, kwargs, form, calibration_data, choice, left, per_channel=per_channel,
                branches=branches, scale=scale, norm=norm, preserve_function=preserve_function,
                max_batches=max_batches, progress=progress, input_fn=input_fn, program=program)
    except BaseException:
        if inplace:  # the user's model as it was: the new equalizers out, the weights preserve_function moved back
            for eq in added:
                detach(target, eq)
            if before is not None:
                registry(target).recipe, registry(target).input_form = before
            if weights is not None:
                target.load_state_dict(weights, strict=False)
        raise
    return target


def _finish(target: nn.Module, added: list[ScaleEqualizer], args, kwargs, form: tuple, calibration_data, choice: Where,
            left: dict[str, str], *, per_channel: bool, branches: str, scale: str, norm: str, preserve_function: bool,
            max_batches: int | None, progress: bool, input_fn: InputFn | None, program) -> None:
    """Record the recipe, verify the new equalizers against the graph, calibrate them, measure the spreads."""
    reg = registry(target)
    reg.input_form = form
    tensors = [*args, *kwargs.values()]
    if all(isinstance(t, torch.Tensor) for t in tensors):  # what restore() needs to find the same sites again
        chosen = {eq.name for eq in equalizers(target)}
        reg.recipe = {"input_kind": reg.input_form[0], "input_names": list(kwargs),
                      "shapes": [list(t.shape) for t in tensors],
                      "dtypes": [str(t.dtype).split(".")[1] for t in tensors], "per_channel": per_channel,
                      "branches": branches, "sites": [eq.name for eq in equalizers(target)],
                      "where": [*reg.recipe.get("where", []), choice.record()],
                      "left": {n: why for n, why in {**reg.recipe.get("left", {}), **left}.items() if n not in chosen}}
    unlocated = [eq.name for eq in added if not eq.site.source]
    if unlocated:
        warn(f"se_surgery: {', '.join(unlocated)} come from code without a source file (python -c, exec), "
             f"so they are told apart by the order of their owner's calls alone; a forward that makes other "
             f"calls at another input size can misplace them. Define the model in a .py file.")
    _verify(target, added, args, kwargs)
    if calibration_data is None:
        return
    reference = _outputs(target, args, kwargs, bypass=True) if preserve_function else None
    run_levels(target, added, calibration_data, max_batches=max_batches, progress=progress, input_fn=input_fn,
               scale=scale, norm=norm,
               after_level=(lambda eqs: [_compensate(target, eq) for eq in eqs]) if preserve_function else None)
    if preserve_function:
        _report_change(target, reference, args, kwargs)
    found = spreads(target, program, calibration_data, norm=registry(target).norm, max_batches=max_batches,
                    input_fn=input_fn)
    record(target, found)
    warn_wider(target, found, branches)


def _in_tree(model: nn.Module, sites: list[Site]) -> list[Site]:
    """The sites that the graph places in their owner's own ``forward`` (its class's, or a base class's that it
    calls through ``super().forward``). A call that the graph gives to an owner but whose source line is in another
    class's ``forward`` comes from a module that no module call of the model runs: one outside the model's tree (a
    model kept in a global or a plain attribute) or a submodule's ``forward`` called directly. No hook can reach
    it, so it is left out, with a warning that says so."""
    kept, outside = [], []
    for site in sites:
        function = site.source.rpartition("+")[0]
        own = own_forwards(model.get_submodule(site.owner))
        (outside if function and function not in own else kept).append(site)
    if outside:
        where = outside[0].source.rpartition("+")[0]
        warn(f"se_surgery: {', '.join(s.name for s in outside)} come from {where}, a module outside "
             f"{type(model).__name__}'s module tree (called from its forward) or a submodule whose "
             f".forward(...) is called directly, which skips its module hooks; they are not equalized. Make "
             f"that module a submodule and call it as module(x) to equalize it.")
    return kept


def _training_calls(model: nn.Module, example_inputs: ExampleInputs, program) -> dict[str, int]:
    """Owners that the training-mode forward calls more often than the eval-mode graph (a path taken only in
    training, e.g. MONAI SegResNetVAE's reconstruction through the decoder's upsamplers), with that count.

    Captured whatever mode the model is in (a pretrained model is often equalized after ``.eval()`` and trained
    later). Only modules of the eval graph count; if the training forward cannot be captured, none are known, and
    such a call raises at run time instead of being guessed."""
    try:
        with bypassed(), torch.random.fork_rng():
            train_program = capture(model, example_inputs, training=True)
    except Exception:
        return {}
    eval_calls, train_calls = module_calls(program), module_calls(train_program)
    return {path: n for path, n in train_calls.items() if n > eval_calls.get(path, n)}


def _verify(model: nn.Module, added: list[ScaleEqualizer], args, kwargs) -> None:
    """Run the example once and check that every new equalizer saw exactly the tensor the graph promised."""
    seen: dict[int, list[tuple[int, ...]]] = {id(eq): [] for eq in added}
    for eq in added:
        eq.observer = lambda x, _source, eq=eq: seen[id(eq)].append(tuple(x.shape))
    try:
        with eval_mode(model), torch.no_grad():
            try:
                model(*args, **kwargs)
            except SiteMismatchError:
                owners = registry(model).owners.values()
                if not any(owner.bound for owner in owners):
                    raise
                for owner in owners:  # a site call the bound forwards cannot reach: the owners' modes find it
                    owner.bound = False
                for shapes in seen.values():
                    shapes.clear()
                model(*args, **kwargs)
    finally:
        for eq in added:
            eq.observer = None
    for eq in added:
        if seen[id(eq)] != [eq.site.shape]:
            raise SiteMismatchError(
                f"site {eq.name} ({eq.site.where}) expected one {eq.site.kind} of shape {eq.site.shape} at run "
                f"time but saw {seen[id(eq)] or 'none'}. The module's forward calls differ between torch.export and "
                f"eager execution; please report this with the model's class.")


def _outputs(model: nn.Module, args, kwargs, bypass: bool = False) -> list[torch.Tensor]:
    with eval_mode(model), torch.no_grad(), bypassed() if bypass else contextlib.nullcontext():
        out = model(*args, **kwargs)
    return [t.detach().clone() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


def _compensate(model: nn.Module, eq: ScaleEqualizer) -> None:
    """Let the site's consumer absorb ``x = sigma * e + mu`` so the model computes what it did before."""
    consumer = eq.site.consumer
    reason = refusal(model, consumer)
    if reason is not None:
        eq.compensation = Compensation.refused(reason)
        return
    shift = eq.mean if shift_absorbable(consumer) else torch.zeros_like(eq.mean)
    absorb_input_affine(model, consumer, eq.std, shift)
    if not shift_absorbable(consumer):
        eq.compensation = Compensation.SCALE_ONLY
    elif consumer.zero_padded:
        eq.compensation = Compensation.ZERO_PADDED
    else:
        eq.compensation = Compensation.EXACT


def _report_change(model: nn.Module, reference: list[torch.Tensor], args, kwargs) -> None:
    after = _outputs(model, args, kwargs)
    change = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item() for a, b in zip(after, reference))
    registry(model).output_change = change
    inexact = [eq.name for eq in equalizers(model) if eq.compensation not in (Compensation.NONE, Compensation.EXACT)]
    if inexact:
        warn(f"se_surgery: preserve_function could not keep the function exactly at {len(inexact)} "
             f"site(s) ({', '.join(inexact)}); the output moved by {change:.3g} (max abs difference "
             f"relative to the output's max abs) on example_inputs. se_surgery.describe(model) gives the "
             f"reason per site.")
