"""Where users train and ship: Lightning, the transformers Trainer, the zoos' own loaders."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import se_surgery as se

pytestmark = pytest.mark.slow
HERE = Path(__file__).parent


def _python(code: str, cwd: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def test_lightning_fit_calibrates_before_the_sanity_check_and_loads_back_in_a_new_process(tmp_path):
    import lightning.pytorch as pl
    from frameworks import LitSmall, loader

    from se_surgery.integrations.lightning import ScaleEqualization

    torch.manual_seed(0)
    lit = LitSmall()
    trainer = pl.Trainer(max_steps=2, default_root_dir=tmp_path, callbacks=[ScaleEqualization(max_batches=2)],
                         num_sanity_val_steps=2, logger=False, enable_progress_bar=False, accelerator="cpu")
    trainer.fit(lit, train_dataloaders=loader(), val_dataloaders=loader(4, seed=1))
    assert len(se.equalizers(lit.model)) == 2 and all(e.is_calibrated for e in se.equalizers(lit.model))
    (ckpt,) = (tmp_path / "checkpoints").glob("*.ckpt")
    x = torch.randn(1, 3, 40, 40, generator=torch.Generator().manual_seed(5))
    lit.eval()
    with torch.no_grad():
        torch.save({"x": x, "out": lit(x)}, tmp_path / "expected.pt")
    out = _python(f"""
        import torch
        from frameworks import LitSmall
        from se_surgery.integrations.lightning import load_from_checkpoint
        lit = load_from_checkpoint(LitSmall, {str(ckpt)!r}).eval()
        saved = torch.load({str(tmp_path / "expected.pt")!r})
        with torch.no_grad():
            print("identical", torch.equal(lit(saved["x"]), saved["out"]))
    """, tmp_path)
    assert "identical True" in out
    # fit(ckpt_path=...) resumes with the saved statistics (no recalibration on other data)
    stats = {k: v.clone() for k, v in lit.model.state_dict().items() if k.endswith((".mean", ".std"))}
    again = LitSmall()
    trainer = pl.Trainer(max_steps=3, default_root_dir=tmp_path / "resumed", logger=False,
                         callbacks=[ScaleEqualization(max_batches=2)], enable_progress_bar=False, accelerator="cpu")
    trainer.fit(again, train_dataloaders=loader(seed=7), ckpt_path=ckpt)
    for k, v in stats.items():
        assert torch.equal(again.model.state_dict()[k], v), k


def _segformer(seed):
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    torch.manual_seed(seed)
    return SegformerForSemanticSegmentation(SegformerConfig(
        num_labels=3, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], decoder_hidden_size=32))


class _Scenes(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {"pixel_values": torch.randn(3, 64, 64, generator=g), "labels": torch.randint(0, 3, (64, 64),
                                                                                             generator=g)}


def test_trainer_trains_saves_and_resumes_with_the_equalizers(tmp_path):
    from transformers import Trainer, TrainingArguments

    from se_surgery.integrations.transformers import ScaleEqualizationCallback

    def trainer(model, steps, example=None):
        args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, save_steps=2, per_device_train_batch_size=2,
                                 report_to=[], use_cpu=True, logging_steps=1, disable_tqdm=True)
        return Trainer(model, args, train_dataset=_Scenes(), callbacks=[ScaleEqualizationCallback(example, 2)])

    model = _segformer(0)
    first = trainer(model, 2, {"pixel_values": torch.randn(1, 3, 64, 64)})
    result = first.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert len(se.equalizers(model)) == 3 and all(e.is_calibrated for e in se.equalizers(model))
    saved = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("scale_equalizers.")}
    other = _segformer(1)  # another seed: the statistics must come from the checkpoint
    with pytest.warns(UserWarning, match="no example_inputs given"):  # the model's default input finds the sites
        resumed = trainer(other, 3)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    for k, v in saved.items():
        if k.endswith((".mean", ".std")):
            assert torch.equal(other.state_dict()[k], v), k
    # and the checkpoint folder restores by the class in one call
    back = se.restore(type(model), tmp_path / "checkpoint-2")
    assert [e.name for e in se.equalizers(back)] == [e.name for e in se.equalizers(model)]


@pytest.mark.parametrize("zoo", ["transformers", "smp"])
def test_restore_by_class_from_a_save_pretrained_folder_in_a_new_process(tmp_path, zoo):
    if zoo == "transformers":
        model = _segformer(0).eval()
        example, call = {"pixel_values": torch.randn(1, 3, 64, 64)}, "model(pixel_values=x).logits"
        cls = "from transformers import SegformerForSemanticSegmentation as Cls"
    else:
        import segmentation_models_pytorch as smp

        torch.manual_seed(0)
        model = smp.PSPNet("resnet18", encoder_weights=None, classes=3).eval()
        example, call = (torch.randn(2, 3, 64, 64),), "model(x)"
        cls = "from segmentation_models_pytorch import PSPNet as Cls"
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(2, 3, 64, 64, generator=g) for _ in range(2)]
    eq = se.equalize(model, example, data, progress=False)
    eq.save_pretrained(str(tmp_path / "saved"))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        model_ = eq
        expected = eval(call, {"model": model_, "x": x})
    torch.save({"x": x, "out": expected}, tmp_path / "expected.pt")
    out = _python(f"""
        import torch, se_surgery as se
        {cls}
        model = se.restore(Cls, {str(tmp_path / "saved")!r}).eval()
        saved = torch.load({str(tmp_path / "expected.pt")!r})
        x = saved["x"]
        with torch.no_grad():
            print("identical", torch.equal({call}, saved["out"]), type(model).__name__)
    """, tmp_path)
    assert "identical True" in out
    for scary in ("LOAD REPORT", "UNEXPECTED", "Unexpected", "unexpected"):
        assert scary not in out, out
