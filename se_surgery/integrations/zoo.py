"""What se_surgery knows of the model zoos (torchvision, smp, transformers): the one place that names them.

The core asks through these functions: the inputs a model declares (:func:`declared_inputs`), the logits in its
output (:func:`main_logits`), a hint when export fails (:func:`export_hint`), building a model from a
``save_pretrained`` folder that holds equalizers (:func:`from_pretrained`, :func:`saved_by_transformers`), and the
command line's model specs (:func:`load_model`: ``torchvision:NAME``, ``smp:NAME?key=value&...``,
``hf:CONFIG_OR_FOLDER``, ``path/file.py:factory``).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UsageError


def declared_inputs(model: nn.Module) -> tuple[int | None, str | None]:
    """(input channels, keyword name of the main input) as a transformers config declares them, else (None, None)."""
    config = getattr(model, "config", None)
    if config is None:
        return None, None
    return getattr(config, "num_channels", None), getattr(model, "main_input_name", None)


def main_logits(output: Any) -> torch.Tensor:
    """The main prediction of a segmentation model's output (tensor, torchvision dict, transformers output)."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, dict):
        return output["out"] if "out" in output else next(v for v in output.values() if isinstance(v, torch.Tensor))
    if isinstance(output, (tuple, list)):
        return next(v for v in output if isinstance(v, torch.Tensor))
    raise UsageError(f"scale_report cannot find the logits in a model output of type {type(output).__name__}: "
                     f"return a tensor, a dict with 'out', or an object with .logits.")


def export_hint(model: nn.Module) -> str:
    """What to try when torch.onnx.export fails on this model ("" when nothing specific is known)."""
    attention = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if attention in (None, "eager"):
        return ""
    return (f" transformers models using {attention!r} attention often export only with eager attention: load the "
            f"model with attn_implementation='eager' (from_pretrained or the config) and export again.")


_CLASS_LOCK = threading.Lock()


def from_pretrained(cls: type, source: Any) -> nn.Module:
    """``cls.from_pretrained(source)`` for a class of transformers or smp, expecting the equalizers' entries."""
    if not hasattr(cls, "from_pretrained") or not isinstance(source, (str, os.PathLike)) or \
            not Path(source).is_dir():
        raise UsageError(f"se_surgery.restore({cls.__name__}, ...) builds the model with {cls.__name__}."
                         f"from_pretrained, which needs a class that has it and a save_pretrained folder; pass a "
                         f"built model otherwise.")
    try:
        from transformers import PreTrainedModel
    except ImportError:
        PreTrainedModel = ()  # noqa: N806
    if PreTrainedModel and issubclass(cls, PreTrainedModel):
        # transformers reads this class attribute when it builds the model; set it for this call only
        with _CLASS_LOCK:
            before = cls.__dict__.get("_keys_to_ignore_on_load_unexpected", _UNSET)
            cls._keys_to_ignore_on_load_unexpected = [*(getattr(cls, "_keys_to_ignore_on_load_unexpected", None)
                                                        or []), r"^scale_equalizers\."]
            try:
                return cls.from_pretrained(source)
            finally:
                if before is _UNSET:
                    del cls._keys_to_ignore_on_load_unexpected
                else:
                    cls._keys_to_ignore_on_load_unexpected = before
    return cls.from_pretrained(source, strict=False)  # huggingface_hub's mixin (smp): restore loads strictly


_UNSET = object()


def saved_by_transformers(source: Any) -> bool:
    """Whether ``source`` is a transformers ``save_pretrained`` folder (its keys are renamed on saving)."""
    config = Path(source) / "config.json" if isinstance(source, (str, os.PathLike)) else None
    return config is not None and config.exists() and "transformers_version" in json.loads(config.read_text())



def load_model(spec: str):
    """A model from a SPEC: torchvision:NAME, smp:NAME?key=value&..., hf:CONFIG_OR_FOLDER, path/file.py:factory.

    Zoo models are built with random weights, seeded (nothing is downloaded); load trained weights with --weights.
    """
    import importlib.util
    from urllib.parse import parse_qsl

    import torch

    torch.manual_seed(0)  # the same random weights in every command, so their numbers can be compared

    kind, _, rest = spec.partition(":")
    name, _, query = rest.partition("?")
    options = {k: _literal(v) for k, v in parse_qsl(query)}
    if kind == "torchvision":
        import torchvision.models.segmentation as tvs

        build = _named(tvs, name, spec)
        _check_keywords(build, options, spec)
        return build(weights=None, weights_backbone=None, **options)
    if kind == "smp":
        import segmentation_models_pytorch as smp
        from segmentation_models_pytorch.encoders import get_encoder

        build = _named(smp, name, spec)
        if not str(options.get("encoder_name", "")).startswith("tu-"):  # smp drops other keywords silently
            _check_keywords(build, options, spec, also=get_encoder)
        return build(**{"encoder_weights": None, **options})
    if kind == "hf":
        from transformers import AutoConfig, AutoModelForSemanticSegmentation

        return AutoModelForSemanticSegmentation.from_config(AutoConfig.from_pretrained(name))
    if rest and spec.endswith(f":{rest}") and kind.endswith(".py"):
        module_spec = importlib.util.spec_from_file_location("se_surgery_user_model", kind)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return getattr(module, name)(**options)
    raise ValueError(f"unknown model SPEC {spec!r}: use torchvision:NAME, smp:NAME?key=value, hf:PATH or "
                     f"file.py:factory")


def _named(namespace, name: str, spec: str):
    found = getattr(namespace, name, None)
    if not callable(found):
        raise ValueError(f"model SPEC {spec!r}: {namespace.__name__} has no model {name!r}.")
    return found


def _check_keywords(build, options: dict, spec: str, also=None) -> None:
    """Refuse keywords the constructor does not take (instead of a model built without them)."""
    import inspect

    def named(fn) -> set[str]:
        return {p.name for p in inspect.signature(fn).parameters.values()
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"}

    valid = named(build) | (named(also) - {"name", "weights", "depth"} if also is not None else set())
    unknown = sorted(set(options) - valid)
    if unknown:
        raise ValueError(f"model SPEC {spec!r}: {getattr(build, '__name__', build)} takes no keyword "
                         f"{', '.join(unknown)}; its keywords are {', '.join(sorted(valid))}.")


def _literal(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)
