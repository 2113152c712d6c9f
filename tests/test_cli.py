"""The se-surgery command line."""

import subprocess
import sys

import pytest
import torch

import se_surgery as se
from se_surgery.cli import build_parser, load_weighted, main
from se_surgery.integrations.zoo import load_model

pytestmark = pytest.mark.slow  # zoo models, subprocesses or ONNX exports: not in the fast tier


def test_demo_prints_the_sites_table(capsys):
    assert main(["demo", "--quiet", "--batches", "2"]) == 0
    out = capsys.readouterr().out
    assert "decoder.psp.blocks.0.call0_resize0" in out and "4 equalizer(s) in PSPNet" in out
    assert "fine-tuning step" in out
    assert "decoder.psp.call0_fusion0: std" in out and "grad RMS spread" in out


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


def _images(folder, n=5):
    from torchvision.io import write_png

    folder.mkdir()
    for i in range(n):  # odd sizes: resized and centre-cropped
        write_png((torch.rand(3, 100 + 7 * i, 90 + 5 * i) * 255).to(torch.uint8), str(folder / f"{i}.png"))
    return folder


def test_inspect_equalize_reload_and_export(tmp_path, capsys):
    model = "smp:PSPNet?encoder_name=resnet18&classes=3"
    data = str(_images(tmp_path / "images"))
    common = ["--model", model, "--data", data, "--size", "64", "--batch-size", "2", "--quiet"]
    assert main(["inspect", *common, "--plot", str(tmp_path / "scales.png")]) == 0
    out = capsys.readouterr().out
    assert "## before" in out and "## after (equalized)" in out and "decoder.psp.blocks.0.call0_resize0" in out
    assert (tmp_path / "scales.png").read_bytes()[:4] == b"\x89PNG"

    assert main(["equalize", *common, "-o", str(tmp_path / "eq.pt")]) == 0
    saved = torch.load(tmp_path / "eq.pt", weights_only=True)  # a plain state_dict, as Python code saves one
    assert sorted(k for k in saved if k.endswith(".std")) == [
        f"scale_equalizers.decoder_psp_blocks_{i}_call0_resize0.std" for i in range(4)]
    assert "restore" in capsys.readouterr().out
    # ...that the library restores, and the CLI reads what Python saved.
    restored = se.restore(load_model(model), tmp_path / "eq.pt")
    assert [e.name for e in se.equalizers(restored)] == [f"decoder.psp.blocks.{i}.call0_resize0" for i in range(4)]
    from safetensors.torch import save_file

    save_file(restored.state_dict(), str(tmp_path / "eq.safetensors"))
    assert main(["inspect", *common, "--weights", str(tmp_path / "eq.safetensors")]) == 0
    capsys.readouterr()
    # Reloaded: the equalized model as saved (its statistics, not recalibrated), then exported from the file.
    assert main(["inspect", *common, "--weights", str(tmp_path / "eq.pt"), "--markdown"]) == 0
    out = capsys.readouterr().out
    assert "## equalized, as loaded" in out and "| decoder.psp.call0_fusion0 |" in out
    std = saved["scale_equalizers.decoder_psp_blocks_1_call0_resize0.std"].item()
    assert f"{std:.4g}" in out
    assert main(["export", "--model", model, "--weights", str(tmp_path / "eq.pt"), "--size", "64", "--static",
                 "--quiet", "-o", str(tmp_path / "m.onnx")]) == 0
    assert "4 equalizer(s) folded" in capsys.readouterr().out


def test_read_images_resizes_crops_and_normalizes(tmp_path):
    from se_surgery.images import read_images

    folder = tmp_path / "grey"
    folder.mkdir()
    from torchvision.io import write_png

    write_png(torch.full((3, 40, 60), 128, dtype=torch.uint8), str(folder / "a.png"))
    (folder / "notes.txt").write_text("not an image")
    (batch,) = read_images(str(folder), 32, progress=False)
    assert batch.shape == (1, 3, 32, 32)
    expected = (128 / 255 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(batch[0, :, 16, 16], expected, atol=1e-3, rtol=0)


def test_data_and_weights_errors_name_the_file(tmp_path):
    model = "smp:PSPNet?encoder_name=resnet18&classes=3"
    empty = tmp_path / "empty"
    empty.mkdir()
    run = [sys.executable, "-m", "se_surgery.cli"]
    result = subprocess.run([*run, "inspect", "--model", model, "--data", str(empty)], capture_output=True, text=True)
    assert result.returncode == 1 and "no images" in result.stderr and "Traceback" not in result.stderr
    evil = tmp_path / "evil.pt"
    torch.save({"x": object()}, evil)  # not loadable with weights_only=True
    result = subprocess.run([*run, "inspect", "--model", model, "--weights", str(evil), "--synthetic", "2"],
                            capture_output=True, text=True)
    assert result.returncode == 1 and "weights_only=True" in result.stderr
    result = subprocess.run([*run, "equalize", "--model", model, "-o", str(tmp_path / "x.pt")], capture_output=True,
                            text=True)
    assert result.returncode == 2 and "needs --data" in result.stderr


def test_inspect_with_label_maps(tmp_path, capsys):
    from PIL import Image

    data = _images(tmp_path / "images", n=2)
    labels = tmp_path / "labels"
    labels.mkdir()
    Image.fromarray((torch.arange(100 * 90) % 3).view(100, 90).to(torch.uint8).numpy(), mode="L").save(labels / "0.png")
    args = ["inspect", "--model", "smp:PSPNet?encoder_name=resnet18&classes=3", "--data", str(data), "--labels",
            str(labels), "--size", "64", "--quiet"]
    assert main(args) == 1  # 1.png has no label map
    assert "no label map" in capsys.readouterr().err
    Image.fromarray(torch.full((107, 95), 255, dtype=torch.uint8).numpy(), mode="L").save(labels / "1.png")
    assert main(args) == 0
    assert "cross-entropy vs the given targets" in capsys.readouterr().out


def test_the_command_line_as_a_newcomer_meets_it(tmp_path):
    run = [sys.executable, "-m", "se_surgery.cli"]
    bare = subprocess.run(run, capture_output=True, text=True)
    assert bare.returncode == 0 and "usage: se-surgery" in bare.stdout and "fold" in bare.stdout
    for name in ("demo", "fold", "inspect", "equalize", "export"):
        text = subprocess.run([*run, name, "--help"], capture_output=True, text=True).stdout
        description = text.split("\n\n")[1]  # the paragraph after the usage lines
        assert description[0].isupper() and description.rstrip().endswith("."), (name, description)
    # --debug and --quiet after the command; an unwritable output folder is refused first, by the name given.
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    result = subprocess.run([*run, "export", "--model", "smp:FPN?encoder_name=resnet18", "--quiet", "--debug",
                             "-o", "notes.txt/m.onnx"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 1 and "-o notes.txt/m.onnx: cannot write there" in result.stderr
    assert "Traceback" in result.stderr  # --debug after the command works
    weights = tmp_path / "other.pt"
    torch.save(torch.nn.Conv2d(1, 1, 1).state_dict(), weights)
    result = subprocess.run([*run, "inspect", "--model", "smp:FPN?encoder_name=resnet18", "--weights", str(weights),
                             "--synthetic", "2", "--quiet"], capture_output=True, text=True)
    assert result.returncode == 1 and f"--weights {weights}: not a state_dict of --model smp:FPN" in result.stderr
    folder = tmp_path / "a_folder"
    folder.mkdir()
    result = subprocess.run([*run, "fold", str(weights), "-o", str(folder)], capture_output=True, text=True)
    assert result.returncode == 1 and f"-o {folder}: is a folder" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "model.module."])
def test_weights_saved_through_a_wrapper_load_with_the_prefix_taken_off(tmp_path, prefix):
    import segmentation_models_pytorch as smp

    model = "smp:FPN?encoder_name=resnet18&classes=3"
    plain = smp.FPN("resnet18", encoder_weights=None, classes=3)
    torch.save({prefix + k: v for k, v in plain.state_dict().items()}, tmp_path / "w.pt")
    assert main(["inspect", "--model", model, "--weights", str(tmp_path / "w.pt"), "--synthetic", "2", "--size",
                 "64", "--quiet"]) == 0
    torch.save({"other." + k: v for k, v in plain.state_dict().items()}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"its keys are not FPN's .* all under 'other\.'"):
        load_weighted(build_parser().parse_args(["inspect", "--model", model, "--weights", str(tmp_path / "bad.pt")]))
