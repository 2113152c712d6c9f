"""Lightning: equalize and calibrate a LightningModule's model before the sanity check, and load it back.

    from se_surgery.integrations.lightning import ScaleEqualization, load_from_checkpoint

    trainer = L.Trainer(callbacks=[ScaleEqualization(max_batches=50)])
    trainer.fit(lit_module, datamodule)            # or train_dataloaders=...; fit(ckpt_path=...) resumes
    lit = load_from_checkpoint(LitModule, "last.ckpt")   # a new process: equalizers back, bit for bit
"""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import torch

from ..checkpoint import restore
from ..errors import UsageError
from ..inputs import example_from_batch, model_device, to_device
from ..state import RECIPE_KEY
from ._common import calibrate_if_needed, equalize_in_place


class ScaleEqualization(pl.Callback):
    """Equalize ``pl_module.<attr>`` in ``setup`` (in place: the optimizer and every reference stay valid) and
    calibrate it in ``on_fit_start``, after a checkpoint is restored and before Lightning's sanity check, on the
    training loader (the datamodule's, the module's ``train_dataloader``, or the one given to ``fit``).

    Args:
        attr: the attribute of the LightningModule that holds the segmentation model.
        example_inputs: the model's inputs at the training size; ``None``: taken from the first training batch.
        max_batches: calibrate on at most this many batches.
        input_fn: turns one batch into the model's inputs where ``se_surgery.calibrate``'s rule does not fit.
        **options: passed to ``se_surgery.equalize`` (``per_channel``, ``branches``).

    A model whose equalizers already have statistics (restored from ``fit(ckpt_path=...)``) is not recalibrated.
    """

    def __init__(self, attr: str = "model", example_inputs: Any = None, max_batches: int | None = 50,
                 input_fn=None, **options) -> None:
        self.attr, self.example_inputs, self.max_batches, self.input_fn = attr, example_inputs, max_batches, input_fn
        self.options = options

    def _model(self, pl_module: pl.LightningModule) -> torch.nn.Module:
        model = getattr(pl_module, self.attr, None)
        if not isinstance(model, torch.nn.Module):
            raise UsageError(f"ScaleEqualization: {type(pl_module).__name__} has no module attribute "
                             f"{self.attr!r}; pass attr= naming the attribute that holds the model.")
        return model

    def _loader(self, trainer: pl.Trainer, pl_module: pl.LightningModule):
        if trainer.datamodule is not None:
            return trainer.datamodule.train_dataloader()
        source = getattr(trainer.fit_loop, "_data_source", None)  # what fit() was given, or the module's hook
        if source is not None and source.is_defined():
            return source.dataloader()
        raise UsageError("ScaleEqualization found no training loader: pass one to trainer.fit, give the module or "
                         "a datamodule a train_dataloader(), or calibrate with se_surgery.calibrate before fit.")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        example = self.example_inputs
        if example is None:
            example = example_from_batch(next(iter(self._loader(trainer, pl_module))))
        model = self._model(pl_module)
        equalize_in_place(model, to_device(example, model_device(model)), **self.options)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = self._model(pl_module)
        calibrate_if_needed(model, self._loader(trainer, pl_module), self.max_batches, self.input_fn)


def load_from_checkpoint(cls: type[pl.LightningModule], checkpoint_path: str | os.PathLike,
                         **kwargs) -> pl.LightningModule:
    """``cls.load_from_checkpoint`` for a module whose model was equalized: the module is built by its
    ``__init__`` (saved hyperparameters), its equalized model restored from the checkpoint's entries, then every
    entry loaded strictly.

    Args:
        cls: the LightningModule class.
        checkpoint_path: a ``.ckpt`` file written by Lightning.
        **kwargs: passed to ``cls.load_from_checkpoint`` (``map_location``, hyperparameter overrides).
    """
    state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)["state_dict"]
    prefixes = sorted({k[:-len(RECIPE_KEY)] for k in state if k.endswith(RECIPE_KEY)})
    module = cls.load_from_checkpoint(checkpoint_path, strict=False, **kwargs)
    for prefix in prefixes:
        path = prefix.rstrip(".")
        restore(module.get_submodule(path) if path else module, state, prefix=prefix)
    module.load_state_dict(state, strict=True)
    return module
