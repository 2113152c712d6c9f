"""The se-surgery command line."""

import subprocess
import sys

import torch

from se_surgery.cli import load_model, main


def test_demo_prints_the_sites_table(capsys):
    assert main(["demo", "--quiet", "--batches", "2"]) == 0
    out = capsys.readouterr().out
    assert "decoder.psp.call0_resize0" in out and "9 equalizer(s) in UPerNet" in out and "fine-tuning step" in out


def test_export_then_fold_from_the_shell(tmp_path):
    out = tmp_path / "m.onnx"
    assert main(["export", "--model", "smp:DeepLabV3?encoder_name=resnet18&classes=3", "--size", "64",
                 "--synthetic", "2", "--quiet", "-o", str(out)]) == 0
    assert out.exists()
    # Folding an already folded graph finds nothing, writes it unchanged, and says so.
    again = subprocess.run([sys.executable, "-m", "se_surgery.cli", "fold", str(out), "-o", str(tmp_path / "f.onnx")],
                           capture_output=True, text=True)
    assert again.returncode == 0 and "no scale equalizer found" in again.stdout


def test_errors_are_one_line_without_debug(tmp_path):
    result = subprocess.run([sys.executable, "-m", "se_surgery.cli", "fold", str(tmp_path / "missing.onnx"), "-o",
                             str(tmp_path / "x.onnx")], capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.startswith("se-surgery: error:")
    assert "Traceback" not in result.stderr
    assert subprocess.run([sys.executable, "-m", "se_surgery.cli", "nope"], capture_output=True).returncode == 2


def test_model_specs(tmp_path):
    assert type(load_model("torchvision:lraspp_mobilenet_v3_large?num_classes=3")).__name__ == "LRASPP"
    factory = tmp_path / "mine.py"
    factory.write_text("import torch\ndef build(width=4):\n    return torch.nn.Conv2d(3, width, 1)\n")
    assert load_model(f"{factory}:build?width=6").out_channels == 6
    assert isinstance(load_model("smp:FPN?encoder_name=resnet18&classes=2"), torch.nn.Module)
