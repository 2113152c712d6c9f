"""Where to equalize: presets by fusion kind and place, include/exclude patterns, names, rules, the measured rule;
recorded in the recipe and rebuilt by restore; the zoo's choices at two sizes; the CLI."""

import re
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import se_surgery as se


class TopDown(nn.Module):
    """UPerHead in small: a top-down path of two chained additions (``lateral + up(top)``) and a final
    concatenation of the levels (two more upsampled branches): 4 sites."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, 2, 1), nn.Conv2d(3, 4, 3, 4, 1)
        self.l1, self.l2 = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
        self.fuse = nn.Conv2d(12, 5, 1)

    def forward(self, x):
        c1, c2, p3 = torch.relu(self.c1(x)), torch.relu(self.c2(x)), torch.relu(self.c3(x))
        p2 = self.l2(c2) + F.interpolate(p3, size=c2.shape[-2:], mode="bilinear")
        p1 = self.l1(c1) + F.interpolate(p2, size=c1.shape[-2:], mode="bilinear")
        ups = [F.interpolate(p, size=c1.shape[-2:], mode="bilinear") for p in (p2, p3)]
        return self.fuse(torch.cat([p1, *ups], 1))


class Scaled(nn.Module):
    """One upsampled branch concatenated with a fine one, each at a set scale (for the measured rule)."""

    def __init__(self, fine: float, coarse: float):
        super().__init__()
        self.gains = (fine, coarse)
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, 2, 1)
        self.fuse = nn.Conv2d(8, 5, 1)

    def forward(self, x):
        fine, coarse = self.a(x) * self.gains[0], self.b(x) * self.gains[1]
        return self.fuse(torch.cat([fine, F.interpolate(coarse, scale_factor=2, mode="bilinear")], 1))


def _data(n=3, size=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, size, size, generator=gen) for _ in range(n)]


def _sites(model, where, data=None, **kw):
    data = data or _data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eq = se.equalize(model, (data[0],), data, where=where, progress=False, **kw)
    return [e.name for e in se.equalizers(eq)], eq


CHAINED = ["model.call0_resize0", "model.call0_resize1"]
FINAL = ["model.call0_resize2", "model.call0_resize3"]


@pytest.mark.parametrize("where, expected", [
    ("every", CHAINED + FINAL), ("paper", FINAL), ("final", FINAL), ("cat", FINAL), ("add", CHAINED),
    (se.Where(place="chained"), CHAINED), (se.Where(fusions="add", place="final"), None),
])
def test_presets_choose_by_fusion_kind_and_place(where, expected):
    torch.manual_seed(0)
    found, eq = _sites(TopDown(), where)
    assert found == (expected or [])
    sites = {s.name: s for s in (e.site for e in se.equalizers(_sites(TopDown(), "every")[1]))}
    assert [sites[n].place for n in CHAINED + FINAL] == ["chained"] * 2 + ["final"] * 2
    assert [sites[n].fusion for n in CHAINED + FINAL] == ["add"] * 2 + ["cat"] * 2


def test_patterns_names_and_rules_choose_sites():
    torch.manual_seed(0)
    assert _sites(TopDown(), se.Where(include="model.call0_resize[23]"))[0] == FINAL
    assert _sites(TopDown(), se.Where(exclude=[re.compile(r".*resize[01]")]))[0] == FINAL
    assert _sites(TopDown(), se.Where(exclude="re:.*resize0", fusions="add"))[0] == CHAINED[1:]
    assert _sites(TopDown(), se.Where(names=[FINAL[1]]))[0] == FINAL[1:]
    assert _sites(TopDown(), lambda site: site.factor == 4)[0] == FINAL[1:]  # p3 to the finest level
    # a fusion's name matches all of its branches, whoever owns the resizes
    assert _sites(TopDown(), se.Where(exclude="model.call0_fusion2"))[0] == CHAINED


@pytest.mark.parametrize("where, what", [
    (se.Where(include="decoder.*"), "pattern(s) 'decoder.*' match no site"),
    (se.Where(exclude="re:model\\.resize9"), "pattern(s) 're:model\\\\.resize9' match no site"),
    (se.Where(names=["model.call0_resize7"]), "name(s) 'model.call0_resize7' name no site"),
])
def test_a_pattern_or_name_that_matches_nothing_names_the_sites_there_are(where, what):
    model = TopDown()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(se.UsageError, match=re.escape(what)) as error:
        se.equalize(model, (_data()[0],), _data(), where=where, progress=False, inplace=True)
    assert all(n in str(error.value) for n in CHAINED + FINAL)
    assert not se.equalizers(model) and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("bad", ["everything", 3, se.Where, "re:("])
def test_bad_choices_are_usage_errors(bad):
    with pytest.raises(se.UsageError):
        where = se.Where(include=bad) if bad == "re:(" else bad
        se.equalize(TopDown(), (_data()[0],), _data(), where=where, progress=False)


def test_measured_rule_keeps_a_fusion_it_narrows_and_says_why_it_leaves_one_it_would_widen():
    torch.manual_seed(0)
    kept, _ = _sites(Scaled(fine=2.0, coarse=0.5), "measured")  # the upsampled branch arrives smaller: premise
    assert kept == ["model.call0_resize0"]
    left, eq = _sites(Scaled(fine=0.2, coarse=0.3), "measured")  # close before, 1 / 0.2 apart at unit scale
    assert left == []
    assert not hasattr(eq, "scale_equalizers")  # unchanged: no registry left behind
    with pytest.warns(UserWarning, match=r"where='measured' leaves every fusion.*spread .*x, .*x if equalized"):
        se.equalize(Scaled(fine=0.2, coarse=0.3), (_data()[0],), _data(), where="measured", progress=False)


def test_measured_rule_is_one_function_and_its_reason_is_described():
    torch.manual_seed(0)
    model = TopDown()
    found, eq = _sites(model, se.Where(measured=lambda scales: scales.kind == "cat"))
    assert found == FINAL
    text = se.describe(eq)
    assert "left alone by the choice of sites (Where(measured=" in text
    assert f"{CHAINED[0]}: measured: model.call0_fusion0's branches spread" in text


@pytest.mark.parametrize("kw", [{"scale": "restore"}, {"branches": "all"}, {}])
def test_measured_needs_data_and_the_unit_scale(kw):
    data = _data() if kw else None
    with pytest.raises(se.UsageError, match="measured on calibration_data"):
        se.equalize(TopDown(), (_data()[0],), data, where="measured", progress=False, **kw)


def test_the_choice_is_recorded_described_and_marked_by_scale_report():
    torch.manual_seed(0)
    _, eq = _sites(TopDown(), "paper")
    recipe = eq.scale_equalizers.recipe
    assert recipe["where"] == [{"preset": "paper", "fusions": None, "place": None, "include": [], "exclude": [],
                                "names": None, "rule": "se_surgery.where._paper", "measured": None}]
    assert set(recipe["left"]) == set(CHAINED)
    text = se.describe(eq)
    assert "left alone by the choice of sites (where='paper')" in text and "a chained addition" in text
    report = se.scale_report(eq, (_data()[0],), _data(), progress=False)
    marked = {r.branch: r for r in report.rows if r.factor}
    assert all(marked[n].left and not marked[n].equalized for n in CHAINED)
    assert all(marked[n].equalized and not marked[n].left for n in FINAL)
    assert str(report).count("left alone") == 2
    plain = se.scale_report(TopDown(), (_data()[0],), _data(), progress=False, where="cat")
    assert sorted(r.branch for r in plain.rows if r.left) == CHAINED
    with pytest.raises(se.UsageError, match="measured"):
        se.scale_report(TopDown(), (_data()[0],), _data(), progress=False, where="measured")


def test_restore_rebuilds_the_chosen_sites_and_the_record(tmp_path):
    torch.manual_seed(0)
    _, eq = _sites(TopDown(), se.Where(exclude="model.call0_resize3", fusions=("cat", "add")))
    torch.save(eq.state_dict(), tmp_path / "eq.pt")
    back = se.restore(TopDown(), tmp_path / "eq.pt")
    assert [e.name for e in se.equalizers(back)] == CHAINED + FINAL[:1]
    assert back.scale_equalizers.recipe["where"] == eq.scale_equalizers.recipe["where"]
    x = _data()[0]
    with torch.no_grad():
        assert torch.equal(back.eval()(x), eq.eval()(x))
    assert "excluded by 'model.call0_resize3'" in se.describe(back)


def test_equalizing_again_adds_the_sites_a_wider_choice_names_and_refuses_a_narrower_one():
    torch.manual_seed(0)
    data = _data()
    first = _sites(TopDown(), "final", data)[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wider = se.equalize(first, (data[0],), data, where="every", progress=False)
    assert [e.name for e in se.equalizers(wider)] == FINAL + CHAINED  # in the order added
    assert [w["preset"] for w in wider.scale_equalizers.recipe["where"]] == ["final", "every"]
    assert wider.scale_equalizers.recipe["left"] == {}
    with pytest.raises(se.UsageError, match=r"already equalized at model.call0_resize0.*nothing was changed"):
        se.equalize(wider, (data[0],), data, where="final", progress=False, inplace=True)
    assert len(se.equalizers(wider)) == 4
    back = se.restore(TopDown(), wider.state_dict())
    assert sorted(e.name for e in se.equalizers(back)) == sorted(CHAINED + FINAL)


def test_the_spread_warning_states_the_measurements_and_points_at_the_choice():
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=r"further apart than before \(model.call0_fusion0: spread .*where='measured'"
                                         r" leaves such fusions alone") as found:
        se.equalize(Scaled(fine=0.2, coarse=0.3), (_data()[0],), _data(), progress=False)
    assert "premise" not in str(found[0].message)  # no cause named: the evidence decides causes


# --------------------------------------------------------------------------------------------------------------
# The zoo, at two sizes, and the command line

ZOO = {  # model: {preset: number of sites}
    "smp_UPerNet": {"every": 9, "paper": 6, "final": 3, "cat": 6, "add": 3},
    "smp_FPN": {"every": 3, "paper": 3, "final": 3, "cat": 0, "add": 3},
    "smp_DeepLabV3Plus": {"every": 2, "paper": 2, "final": 1, "cat": 2, "add": 0},
    "tv_deeplabv3": {"every": 1, "paper": 1, "final": 1, "cat": 1, "add": 0},
    "hf_segformer": {"every": 3, "paper": 3, "final": 3, "cat": 3, "add": 0},
}


@pytest.mark.slow
@pytest.mark.parametrize("size", [128, 192])
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_choices_at_two_sizes(name, size):
    from zoo import build, inputs

    from se_surgery.capture import capture
    from se_surgery.where import PRESETS, choose

    model = build(name).eval()
    sites = se.find_sites(capture(model, inputs(name, torch.randn(1, 3, size, size))))
    counts = {preset: len(choose(sites, se.where.resolve(preset))[0]) for preset in PRESETS if preset != "measured"}
    assert counts == ZOO[name]


@pytest.mark.slow
def test_cli_equalize_with_a_choice_and_an_unknown_pattern(tmp_path):
    run = [sys.executable, "-m", "se_surgery.cli", "--quiet", "equalize", "--model",
           "smp:UPerNet?encoder_name=resnet18&classes=5", "--synthetic", "2", "--size", "64"]
    done = subprocess.run([*run, "--where", "paper", "--exclude", "decoder.psp", "-o", str(tmp_path / "eq.pt")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "3 equalizer(s)" in done.stdout and "left alone by the choice of sites" in done.stdout
    back = se.restore(__import__("segmentation_models_pytorch").UPerNet("resnet18", encoder_weights=None, classes=5),
                      tmp_path / "eq.pt")
    assert [e.name for e in se.equalizers(back)] == ["decoder.call0_resize7", "decoder.call0_resize8",
                                                     "decoder.call0_resize9"]
    bad = subprocess.run([*run, "--include", "decoder.fpn_lateral*x", "-o", str(tmp_path / "no.pt")],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "match no site" in bad.stderr and "decoder.psp.call0_resize0" in bad.stderr
    assert not (tmp_path / "no.pt").exists()
