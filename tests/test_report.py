"""scale_report on zoo models: statistics and gradients equal independent computations; tables, CSV, plots."""

import csv
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import SITES, batches, build, call, inputs

import se_surgery as se

pytestmark = pytest.mark.slow  # zoo models, subprocesses or ONNX exports: not in the fast tier


def _example(name):
    return inputs(name, torch.randn(2, 3, 128, 128))


@pytest.mark.parametrize("name", ["smp_UPerNet", "tv_lraspp", "hf_segformer", "hf_dpt", "smp_DeepLabV3Plus"])
def test_report_shows_the_problem_and_the_fix(name):
    model = build(name)
    data = batches(name)
    before = se.scale_report(model, _example(name), data, progress=False)
    upsampled = [r for r in before.rows if r.factor]
    assert len(upsampled) == SITES[name] and not any(r.equalized for r in before.rows)
    assert all(r.second_moment == pytest.approx(r.mean**2 + r.std**2) for r in before.rows)

    eq = se.equalize(model, _example(name), data, progress=False)
    after = se.scale_report(eq, _example(name), data, progress=False)
    assert [r.branch for r in after.rows] == [r.branch for r in before.rows]
    for row in after.rows:
        assert row.equalized == (row.factor is not None)
        if row.equalized:  # the fix, measured where the branch enters the fusion
            assert abs(row.mean) < 1e-4 and abs(row.std - 1) < 1e-4, row
    # Level-0 sites: the original model's upsampled branch has exactly the statistics calibration froze.
    frozen = {e.site.name: e for e in se.equalizers(eq) if e.site.level == 0}
    for row in upsampled:
        if row.branch in frozen:
            assert row.mean == pytest.approx(frozen[row.branch].mean.item(), rel=1e-5, abs=1e-6)
            assert row.std == pytest.approx(frozen[row.branch].std.item(), rel=1e-5)


def test_gradients_equal_a_hand_written_backward_and_the_model_is_untouched():
    name = "smp_PSPNet"
    model = build(name)
    data = batches(name, 2)
    targets = [torch.randint(0, 5, (2, 128, 128)) for _ in data]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = se.scale_report(model, _example(name), data, targets=targets, progress=False)

    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not list(se.equalizers(model)) and all(p.grad is None and p.requires_grad for p in model.parameters())
    assert "given targets" in report.loss and report.batches == 2

    reference = build(name)
    for (x,), y in zip(data, targets):
        (F.cross_entropy(call(reference, name, x), y) / len(data)).backward()
    with_grad = [r for r in report.rows if r.consumer]
    assert len(with_grad) == len(report.rows) == 5  # the PSP concat: the map and its four pooled branches
    for row in with_grad:
        grad = reference.get_parameter(row.consumer).grad[:, slice(*row.channels)]
        assert row.grad_rms == pytest.approx(grad.pow(2).mean().sqrt().item(), rel=1e-4)


def test_targets_at_input_size_meet_logits_at_quarter_size():
    name = "hf_segformer"  # transformers' SegFormer predicts at 1/4 of the input: logits are resized to the labels
    data, target = batches(name, 1), torch.randint(0, 5, (2, 128, 128))
    report = se.scale_report(build(name), _example(name), data, targets=[target], progress=False)
    reference = build(name)
    logits = F.interpolate(call(reference, name, data[0]["pixel_values"]), size=(128, 128), mode="bilinear")
    F.cross_entropy(logits, target).backward()
    rows = [r for r in report.rows if r.consumer]
    assert len(rows) == 4  # the four MLP outputs concatenated before linear_fuse
    for row in rows:
        grad = reference.get_parameter(row.consumer).grad[:, slice(*row.channels)]
        assert row.grad_rms == pytest.approx(grad.pow(2).mean().sqrt().item(), rel=1e-4)


def test_table_markdown_csv_and_plot(tmp_path):
    name = "smp_PSPNet"
    model = build(name)
    before = se.scale_report(model, _example(name), batches(name, 1), progress=False)
    after = se.scale_report(se.equalize(model, _example(name), batches(name), progress=False), _example(name),
                            batches(name, 1), progress=False)
    text = str(after)
    assert all(r.branch in text for r in after.rows) and "grad RMS" in text
    markdown = after.to_markdown().splitlines()
    assert len(markdown) == 2 + len(after.rows) and markdown[1].startswith("|---")

    path = tmp_path / "scales.csv"
    written = after.to_csv(path)
    records = list(csv.DictReader(io.StringIO(path.read_text())))
    assert path.read_text() == written and len(records) == len(after.rows)
    assert float(records[1]["std"]) == after.rows[1].std

    image = after.plot(tmp_path / "scales.png", before=before)
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scales.csv", "scales.png"]  # no temporary files left


def test_a_model_without_sites_gives_an_empty_report():
    name = "smp_Unet"
    report = se.scale_report(build(name), _example(name), batches(name, 1), progress=False)
    assert report.rows == [] and "no fusion takes a bilinearly upsampled branch" in str(report)


def test_a_channel_last_output_needs_its_class_dimension_named():
    from decoders import RootOwner

    class ChannelLast(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = RootOwner()

        def forward(self, x):
            return self.body(x).permute(0, 2, 3, 1)  # (N, H, W, 2), as a text detector's score maps

    x = torch.randn(2, 3, 32, 32)
    data = [x, torch.randn(2, 3, 32, 32)]
    model = ChannelLast().eval()
    with pytest.raises(se.UsageError, match=r"channel-last output \(N, H, W, C\).*class_dim"):
        se.scale_report(model, (x,), data, progress=False)
    named = se.scale_report(model, (x,), data, progress=False, class_dim=-1)
    labels = [torch.randint(0, 2, (2, 32, 32)) for _ in data]
    found = se.scale_report(model, (x,), data, progress=False, targets=labels)  # the targets tell
    reference = se.scale_report(model.body, (x,), data, progress=False, targets=labels)  # (N, 2, H, W) itself
    assert [r.grad_rms for r in found.rows] == pytest.approx([r.grad_rms for r in reference.rows])
    assert all(r.grad_rms for r in named.rows)


def test_the_plot_title_says_what_the_data_shows(tmp_path, monkeypatch):
    from decoders import Small

    import se_surgery.report as report

    x = torch.randn(2, 3, 32, 32)
    data = [x, torch.randn(2, 3, 32, 32)]
    model = Small().eval()
    eq = se.equalize(model, (x,), data, progress=False)
    before, after = se.scale_report(model, (x,), data, progress=False), se.scale_report(eq, (x,), data, progress=False)
    title = report._title("Small", before, after)
    assert "Upsampled branches arrive smaller than the others in" in title and "Median std spread" in title
    titles = []
    monkeypatch.setattr("matplotlib.figure.Figure.suptitle", lambda self, t, **k: titles.append(t))
    after.plot(tmp_path / "s.png", before=before, note="random weights, generated data")
    assert "(random weights, generated data)" in titles[0]
