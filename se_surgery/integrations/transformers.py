"""Hugging Face ``Trainer``: equalize the model when the Trainer is built, calibrate it when training begins.

    from se_surgery.integrations.transformers import ScaleEqualizationCallback

    example = {"pixel_values": torch.randn(1, 3, 512, 512)}
    trainer = Trainer(model, args, train_dataset=..., callbacks=[ScaleEqualizationCallback(example)])
    trainer.train()                                   # or train(resume_from_checkpoint=True)
    model = se.restore(SegformerForSemanticSegmentation, "out/checkpoint-500")   # later, anywhere
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from ..inputs import model_device, to_device
from ._common import calibrate_if_needed, equalize_in_place


class ScaleEqualizationCallback(TrainerCallback):
    """Equalize the Trainer's model in place when the Trainer is built (so ``resume_from_checkpoint`` loads the
    saved statistics into it), and calibrate it in ``on_train_begin`` on the first training batches, unless its
    equalizers already have statistics (a resumed run keeps the saved ones).

    Args:
        example_inputs: the model's keyword inputs at the training size, e.g. ``{"pixel_values": x}``. ``None``:
            the model's default input (``pixel_values`` of ``config.num_channels`` at 512 px), as
            ``se_surgery.equalize`` takes it, with its warning. The model is equalized when the Trainer is built,
            before any batch exists, so that ``resume_from_checkpoint`` can load the saved statistics.
        max_batches: calibrate on at most this many training batches.
        input_fn: turns one batch into the model's inputs where ``se_surgery.calibrate``'s rule does not fit
            (transformers batches are dicts; ``pixel_values`` is taken, ``labels`` ignored).
        **options: passed to ``se_surgery.equalize`` (``per_channel``, ``branches``).
    """

    def __init__(self, example_inputs: Any = None, max_batches: int | None = 50, input_fn=None, **options) -> None:
        self.example_inputs, self.max_batches, self.input_fn, self.options = example_inputs, max_batches, input_fn, \
            options

    def on_init_end(self, args, state, control, model=None, **kwargs):
        # None: equalize's default input, already on the model's device
        equalize_in_place(model, to_device(self.example_inputs, model_device(model)), **self.options)

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        calibrate_if_needed(model, train_dataloader, self.max_batches, self.input_fn)
