"""Model specs of the command line: ``torchvision:NAME``, ``smp:NAME?key=value&...``, ``hf:CONFIG_OR_FOLDER``,
``path/file.py:factory``. The one place that builds a model by its zoo's name."""

from __future__ import annotations


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
