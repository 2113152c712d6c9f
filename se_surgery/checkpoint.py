"""Save and restore: an equalized model's state_dict carries what rebuilding it needs, so ``restore`` gives the
same equalized model back from any checkpoint users make (a state_dict, ``torch.save``/safetensors files, the
``save_pretrained`` folders of transformers and smp, ``se-surgery equalize -o`` files).

The recipe (example input shapes and dtypes, input names, options, site names, what preserve_function and fold
did) rides in the state_dict as ``scale_equalizers._extra_state``: a uint8 tensor of JSON, so safetensors files
keep it too.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .equalize import equalize
from .errors import UsageError, warn
from .inputs import model_device
from .install import detach, equalizers
from .integrations.zoo import from_pretrained, saved_by_transformers
from .state import RECIPE_KEY, decode, encode, registry
from .torch_internals import COMPILED_PREFIX
from .where import Where

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pt", "model.pth")


def read_state_dict(source: str | os.PathLike | Mapping) -> dict[str, Any]:
    """A state_dict from a mapping, a ``.safetensors`` file, a ``torch.save`` file (``weights_only=True``: no code
    runs), a ``save_pretrained`` folder (transformers, smp; sharded too), or an ``se-surgery equalize -o`` file."""
    if isinstance(source, Mapping):
        state = dict(source)
    elif not isinstance(source, (str, os.PathLike)):
        raise UsageError(f"a checkpoint is a state_dict (a mapping), a file or a save_pretrained folder (a str or "
                         f"path), not a {type(source).__name__}.")
    else:
        path = Path(source)
        if path.is_dir():
            index = next((path / n for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json")
                          if (path / n).exists()), None)
            if index is not None:
                state = {}
                for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
                    state.update(read_state_dict(path / shard))
                return state
            found = next((path / n for n in _WEIGHT_FILES if (path / n).exists()), None)
            if found is None:
                raise UsageError(f"{path}: no weights file in it (looked for {', '.join(_WEIGHT_FILES)}).")
            return read_state_dict(found)
        if not path.exists():
            raise UsageError(f"{path}: no such file.")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            try:
                state = torch.load(path, weights_only=True, map_location="cpu")
            except Exception as error:
                raise UsageError(f"{path}: not a checkpoint that loads with torch.load(weights_only=True) "
                                 f"({type(error).__name__}: {str(error).splitlines()[0]}).") from error
            if not isinstance(state, Mapping):
                raise UsageError(f"{path}: holds a {type(state).__name__}, not a state_dict.")
    if isinstance(state.get("state_dict"), Mapping):  # {"state_dict": ..., ...}: se-surgery equalize -o, Lightning
        meta, state = state.get("se_surgery"), dict(state["state_dict"])
        if isinstance(meta, Mapping) and RECIPE_KEY not in state:  # written by se-surgery 0.1: no recipe inside
            hf = str(meta["model"]).startswith("hf:")
            state[RECIPE_KEY] = encode({
                "version": 1, "input_kind": "kwargs" if hf else "args", "input_names": ["pixel_values"] if hf else [],
                "shapes": [[1, 3, meta["size"], meta["size"]]], "dtypes": ["float32"],
                "per_channel": meta["per_channel"], "branches": meta["branches"], "sites": list(meta["sites"])})
    return state


def example_from(recipe: dict, device: torch.device) -> tuple | dict:
    """Example inputs of the recorded shapes and dtypes (values do not matter: sites depend on shapes)."""
    tensors = [torch.zeros(shape, dtype=getattr(torch, dtype), device=device)
               for shape, dtype in zip(recipe["shapes"], recipe["dtypes"])]
    if recipe["input_kind"] == "kwargs":
        return dict(zip(recipe["input_names"], tensors))
    return tuple(tensors)


def restore(model: nn.Module | type, source: str | os.PathLike | Mapping, *, strict: bool = True,
            prefix: str | None = None) -> nn.Module:
    """Give an equalized model back from a checkpoint of one, bit for bit.

    Args:
        model: the model as its library builds it (e.g. ``Cls.from_pretrained(folder)``, ``smp.UPerNet(...)``),
            without equalizers; it is edited in place. Or a class with ``from_pretrained`` (transformers, smp):
            it builds the model from the ``save_pretrained`` folder ``source`` (told to expect the equalizers'
            entries, so no unexpected-keys report), then restores it.
        source: a state_dict, a ``.pt``/``.bin``/``.safetensors``/``.ckpt`` file, a ``save_pretrained`` folder, or a
            file written by ``se-surgery equalize -o``. Checkpoints of training frameworks are read too: the
            equalized model's entries are found under their key prefix (Lightning's ``model.``, DDP's ``module.``,
            ``torch.compile``'s ``_orig_mod.``, ``{"model": state_dict, "optimizer": ...}``), with a warning that
            names the prefix.
        strict: passed to ``load_state_dict``.
        prefix: the key prefix of the model's entries, where a checkpoint holds several equalized models.

    Returns:
        ``model``, equalized at the same sites as the saved one, with all saved weights and statistics loaded.
    """
    if isinstance(model, type):
        model = from_pretrained(model, source)
    state = _model_entries(read_state_dict(source), source, prefix)
    recipe = decode(state[RECIPE_KEY], _name(source))
    if registry(model) is not None:
        raise UsageError(f"{type(model).__name__} already has equalizers; restore into the model as its library "
                         f"builds it.")
    saved_shape = next((v.shape for k, v in state.items() if k.startswith("scale_equalizers.")
                        and k.endswith(".mean")), None)
    if saved_shape is not None and (len(saved_shape) == 1) != recipe["per_channel"]:
        raise UsageError(f"{_name(source)}: its recipe says per_channel={recipe['per_channel']}, but its saved "
                         f"statistics have shape {tuple(saved_shape)}; the checkpoint is inconsistent.")
    device = model_device(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            equalize(model, example_from(recipe, device), None, per_channel=recipe["per_channel"],
                     branches=recipe["branches"], where=Where(names=tuple(recipe["sites"])), inplace=True,
                     progress=False)
    except UsageError as error:
        raise UsageError(f"{_name(source)}: {type(model).__name__} cannot be equalized as the checkpoint's recipe "
                         f"says: {error} Restore into the same architecture it was saved from.") from error
    except Exception as error:
        raise UsageError(f"{_name(source)}: {type(model).__name__} cannot be equalized as the checkpoint's recipe "
                         f"says (example inputs {recipe['shapes']}): {type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else ''}. Restore into the architecture it was "
                         f"saved from.") from error
    found = [eq.name for eq in equalizers(model)]
    if sorted(found) != sorted(recipe["sites"]):  # (a model equalized twice lists its sites in the order added)
        raise UsageError(f"{_name(source)} has equalizers at {recipe['sites']}, but {type(model).__name__} gives "
                         f"sites {found}: restore into the same architecture it was saved from.")
    saved = {key.split(".")[1] for key in state if key.startswith("scale_equalizers.") and key != RECIPE_KEY}
    for eq in equalizers(model):  # se_surgery.fold folded these away before the model was saved
        if eq.site.module_name not in saved:
            detach(model, eq, keep_registry=True)
    if saved_by_transformers(source):
        # transformers renames keys when it saves; from_pretrained has loaded the model's own weights already.
        ours = {k: v for k, v in state.items() if k.startswith("scale_equalizers.")}
        others = {k: v for k, v in state.items() if k not in ours}
        if _fingerprints(others.values()) - _fingerprints(model.state_dict().values()):
            raise UsageError(f"{_name(source)}: the model's weights are not the saved ones; load it with "
                             f"{type(model).__name__}.from_pretrained({_name(source)!r}) before restore.")
        model.scale_equalizers.load_state_dict({k.split(".", 1)[1]: v for k, v in ours.items()}, strict=strict)
    else:
        model.load_state_dict(state, strict=strict)
    return model


def _model_entries(state: dict, source: Any, prefix: str | None) -> dict:
    """The equalized model's entries of a checkpoint, with their key prefix taken off."""
    if prefix is None and RECIPE_KEY not in state:
        nested = [k for k, v in state.items() if isinstance(v, Mapping) and any(
            isinstance(key, str) and key.endswith(RECIPE_KEY) for key in v)]
        if len(nested) == 1:  # {"model": state_dict, "optimizer": ...}
            warn(f"se_surgery: restoring from the {nested[0]!r} entry of {_name(source)}.")
            state = dict(state[nested[0]])
    if prefix is None:
        found = sorted({k[:-len(RECIPE_KEY)] for k in state if isinstance(k, str) and k.endswith(RECIPE_KEY)})
        if not found:
            raise UsageError(f"{_name(source)} holds no se_surgery equalizers (no {RECIPE_KEY} entry under any "
                             f"prefix): it is a checkpoint of a plain model; load it with model.load_state_dict, or "
                             f"equalize after loading.")
        if len(found) > 1:
            raise UsageError(f"{_name(source)} holds {len(found)} equalized models, under the prefixes {found}: "
                             f"pass prefix= to say which to restore.")
        prefix = found[0]
        if prefix:
            warn(f"se_surgery: {_name(source)} keeps the equalized model under the key prefix {prefix!r} "
                 f"(a training framework's checkpoint); restoring from those entries.")
    if prefix + RECIPE_KEY not in state:
        raise UsageError(f"{_name(source)} has no {prefix + RECIPE_KEY} entry: no equalized model under the prefix "
                         f"{prefix!r}.")
    return {k[len(prefix):]: v for k, v in state.items() if isinstance(k, str) and k.startswith(prefix)}


# The key prefixes that wrappers add to a model's state_dict: DataParallel/DDP, torch.compile, Lightning modules.
WRAPPER_PREFIXES = ("module.", COMPILED_PREFIX, "model.")


def plain_entries(state: dict, model: nn.Module, source: Any) -> dict:
    """A plain model's state_dict from a checkpoint whose keys may carry a wrapper's prefix (one or several of
    :data:`WRAPPER_PREFIXES`), taken off where that makes the keys the model's; a :class:`~se_surgery.UsageError`
    that says which prefix the keys have where they still do not match."""
    wanted = set(model.state_dict())
    keys = {k for k in state if isinstance(k, str)}
    stripped = dict(state)
    while not wanted <= set(stripped):
        prefix = next((p for p in WRAPPER_PREFIXES if stripped and all(k.startswith(p) for k in stripped)), None)
        if prefix is None:
            break
        stripped = {k[len(prefix):]: v for k, v in stripped.items()}
    if wanted <= set(stripped) or not keys:
        return stripped
    first, mine = sorted(keys)[0], sorted(wanted)[0]
    common = os.path.commonprefix(sorted(keys)).rpartition(".")[0]
    under = f", all under '{common}.'" if common else ""
    raise UsageError(f"{_name(source)}: its keys are not {type(model).__name__}'s ({len(wanted - set(stripped))} of "
                     f"the model's are missing; the checkpoint's begin like {first!r}{under}, the model's like "
                     f"{mine!r}). Load the state_dict of this architecture, without the prefix a wrapper added.")


def _fingerprints(tensors) -> set[tuple]:
    import hashlib

    return {(str(t.dtype), tuple(t.shape), hashlib.sha1(t.detach().cpu().contiguous().view(-1).view(torch.uint8)
                                                         .numpy().tobytes()).hexdigest())
            for t in tensors if isinstance(t, torch.Tensor) and t.numel()}


def _name(source: Any) -> str:
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else "the state_dict"
