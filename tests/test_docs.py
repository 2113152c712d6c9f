"""Pages whose figures come from a command: the command runs again and the page must agree with it, within the
noise the page allows (random weights and generated data are seeded, so a rerun on one machine is identical; another
CPU moves the last digits). The ``docs`` tier (``pytest -m docs``); ``.ci/run`` runs it with the rest. Speed figures
(docs/performance.md, the README's times) come from ``benchmarks/`` and are not asserted here: a timed test would
fail on a loaded machine, not on a wrong page."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.docs
@pytest.mark.slow
def test_the_scales_page_example_is_what_its_command_prints(tmp_path):
    page = (ROOT / "docs" / "scales.md").read_text()
    command = re.search(r"Example: `se-surgery (inspect [^`]+)`", page.replace("\n", " ")).group(1).split()
    command = [c.strip("'") for c in command]
    command[command.index("--plot") + 1] = str(tmp_path / "scales.png")  # (the page's image is written apart)
    done = subprocess.run([sys.executable, "-m", "se_surgery.cli", "--quiet", *command, "--markdown"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines()
            if line.startswith("| decoder.psp.call0_fusion0 |")]
    before, after = rows[:len(rows) // 2], rows[len(rows) // 2:]
    measured = {r[1].strip(): (float(r[6]), float(a[6]), float(r[8]), float(a[8])) for r, a in zip(before, after)}
    table = {}
    for line in page.splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if len(cells) == 6 and "call0_" in cells[0]:
            table[re.search(r"`([^`]+)`", cells[0]).group(1)] = tuple(float(c) for c in cells[2:])
    assert table.keys() == measured.keys()
    for branch, shown in table.items():
        got = measured[branch]
        assert got[:2] == pytest.approx(shown[:2], rel=0.02), branch  # stds
        assert got[2:] == pytest.approx(shown[2:], rel=0.1), branch   # gradient RMS
    spreads = [max(g[i] for g in measured.values()) / min(g[i] for g in measured.values()) for i in (2, 3)]
    assert f"from {spreads[0]:.1f}x to {spreads[1]:.1f}x" in page.replace("\n", " ")
    assert (tmp_path / "scales.png").stat().st_size > 10_000


def _section(path: Path, marker: str) -> str:
    """What stands between ``<!-- MARKER:begin ... -->`` and ``<!-- MARKER:end -->`` in a page."""
    return re.search(rf"<!-- {marker}:begin.*?-->\n(.*?)<!-- {marker}:end -->", path.read_text(), re.S).group(1)


def _script(name: str, *args: str, cwd: Path) -> str:
    done = subprocess.run([sys.executable, str(ROOT / "examples" / f"{name}.py"), *args], capture_output=True,
                          text=True, timeout=900, cwd=cwd)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _report(name: str, data: list[Path], out: Path) -> str:
    """``results.md`` as ``examples/NAME.py --report --out OUT`` writes it from copies of the ``data`` files."""
    out.mkdir(exist_ok=True)
    for path in data:
        (out / path.name).write_text(path.read_text())
    _script(name, "--report", "--out", str(out), cwd=out)
    return (out / "results.md").read_text()


@pytest.mark.docs
def test_the_method_pages_variance_table_is_the_exact_prediction():
    # docs/method.md section 1: per axis E[(1-t)^2 + t^2] and the 2-D ratio, inside the image (exact to 3 digits).
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import upsampling_variance as uv
    finally:
        sys.path.remove(str(ROOT / "examples"))
    page = (ROOT / "docs" / "method.md").read_text()
    for factor in uv.FACTORS:
        row = re.search(rf"^\| x{factor} \| ([0-9.]+) \| ([0-9.]+) \|$", page, re.M)
        assert row is not None, factor
        assert float(row.group(1)) == round(uv.interior_ratio("linear", factor), 3)
        assert float(row.group(2)) == round(uv.interior_ratio("bilinear", factor), 3)


@pytest.mark.docs
@pytest.mark.slow
def test_the_evidence_pages_are_what_the_report_makes_of_the_rows(tmp_path):
    # Round 3: docs/evidence/results.md, its section in docs/evidence/README.md and the README's headline table are
    # regenerated from results.jsonl (exact: the rows are the data); the plot is drawn again.
    made = _report("evidence", [ROOT / "docs" / "evidence" / "results.jsonl"], tmp_path)
    assert made == (ROOT / "docs" / "evidence" / "results.md").read_text()
    assert made == _section(ROOT / "docs" / "evidence" / "README.md", "evidence")
    assert (tmp_path / "evidence.png").stat().st_size > 10_000
    headline = subprocess.run(
        [sys.executable, "-c", "import sys; sys.path.insert(0, 'examples'); import evidence as e; "
         "print(e.headline(e.read(e.ROOT / 'docs' / 'evidence' / 'results.jsonl')))"],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert headline.returncode == 0, headline.stderr[-2000:]
    assert headline.stdout == _section(ROOT / "README.md", "evidence-headline")
    # Round 4: its report and the README's section from its rows.
    round4 = ROOT / "docs" / "evidence" / "round4"
    assert _report("round4", sorted(round4.glob("rows-*.jsonl")), tmp_path / "round4") == \
        (round4 / "results.md").read_text()
    section = subprocess.run(
        [sys.executable, "-c", "import sys; sys.path.insert(0, 'examples'); import round4 as r; "
         "print(r.headline(r.read(r.OUT)), end='')"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert section.returncode == 0, section.stderr[-2000:]
    assert section.stdout == _section(ROOT / "README.md", "round4-headline")


@pytest.mark.docs
@pytest.mark.slow
def test_the_zoo_pages_3d_example_is_what_its_command_prints(tmp_path):
    # docs/zoo.md: MONAI SegResNet's branch stds before/after, from examples/segresnet_scales.py (seeded; another
    # CPU moves the last digits: 1%).
    out = _script("segresnet_scales", cwd=tmp_path)
    before, after = out.split("## after")
    measured = {}
    for part, label in ((before, "before"), (after, "after")):
        for line in part.splitlines():
            cells = [c.strip() for c in line.split("|")[1:-1]]
            if len(cells) == 10 and cells[0].startswith("model."):
                measured[(cells[1], label)] = float(cells[6])
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in (ROOT / "docs" / "zoo.md").read_text().splitlines()
            if line.count("|") == 6 and "call0_" in line]
    assert len(rows) == 4
    for cells in rows:
        branch = re.findall(r"`([^`]+)`", cells[1])[-1]
        assert measured[(branch, "before")] == pytest.approx(float(cells[3]), rel=0.01), branch
        assert measured[(branch, "after")] == pytest.approx(float(cells[4]), rel=0.01), branch


@pytest.mark.docs
@pytest.mark.slow
def test_the_calibration_pages_table_is_what_its_command_measures():
    # docs/calibration.md: the equalizers' output std per site in each mode, from examples/calibration_modes.py
    # (seeded; 5% where it is near 1, and within a factor 1.5 for LR-ASPP's untouched running statistics, whose
    # stds span 15 orders of magnitude).
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import calibration_modes
        measured = {(label, norm): (trained, evaluated)
                    for label, norm, trained, evaluated in calibration_modes.measure()}
    finally:
        sys.path.remove(str(ROOT / "examples"))
    shown = {}
    for line in (ROOT / "docs" / "calibration.md").read_text().splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if len(cells) == 4 and cells[1].startswith("`norm="):
            shown[(cells[0], cells[1].split("'")[1])] = tuple([float(v) for v in c.split(" / ")] for c in cells[2:])
    assert shown.keys() == measured.keys()
    for key, columns in shown.items():
        for page, got in zip(columns, measured[key]):
            assert len(page) == len(got), key
            for p, g in zip(page, got):
                if 0.5 < p < 2:
                    assert g == pytest.approx(p, rel=0.05), key
                else:
                    assert 1 / 1.5 < g / p < 1.5, key


@pytest.mark.docs
def test_the_zoo_pages_site_counts_are_the_ones_the_zoo_tests_find():
    # docs/zoo.md's table against tests/zoo.py's SITES, which tests/test_zoo.py checks on every model (exact).
    from zoo import SITES

    rows = {}
    for line in (ROOT / "docs" / "zoo.md").read_text().splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if len(cells) == 4 and cells[3][:1].isdigit():
            rows[(cells[0], re.search(r"`([^`]+)`", cells[1]).group(1))] = int(cells[3].split()[0].rstrip(","))
    prefixes = {"torchvision": "tv_", "smp": "smp_", "transformers": "hf_"}
    names = {"tv_deeplabv3_resnet50": "tv_deeplabv3", "tv_lraspp_mobilenet_v3_large": "tv_lraspp",
             "tv_fcn_resnet50": "tv_fcn", "hf_UperNetForSemanticSegmentation": "hf_upernet_convnext",
             "hf_SegformerForSemanticSegmentation": "hf_segformer", "hf_DPTForSemanticSegmentation": "hf_dpt"}
    checked = 0
    for (zoo, model), count in rows.items():
        name = prefixes.get(zoo, "") + model
        name = names.get(name, name)
        if name in SITES:
            assert SITES[name] == count, (zoo, model)
            checked += 1
    assert checked >= 12


@pytest.mark.docs
def test_the_method_pages_where_table_is_what_the_zoo_tests_choose():
    # docs/method.md's `where=` table against tests/test_where.py's ZOO (checked on each model at two sizes).
    from test_where import ZOO

    columns = ["smp_UPerNet", "smp_FPN", "smp_DeepLabV3Plus", "tv_deeplabv3", "hf_segformer"]
    shown: dict[str, dict[str, int]] = {name: {} for name in columns}
    for line in (ROOT / "docs" / "method.md").read_text().splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if len(cells) == 7 and cells[0].startswith('`"') and cells[2][:1].isdigit():
            presets = re.findall(r'"(\w+)"', cells[0])
            for name, cell in zip(columns, cells[2:]):
                for preset, count in zip(presets, cell.split(" / ")):
                    shown[name][preset] = int(count.split()[0])
    assert shown == ZOO


@pytest.mark.docs
def test_the_calibration_pages_spread_warning_is_what_equalize_warns():
    # docs/calibration.md's example warning: the Larger decoder of tests/test_norms.py as the page describes it
    # (seeded; the figures to the digits shown, another CPU may move the last one).
    import warnings

    import torch
    from test_norms import Larger

    import se_surgery as se

    torch.manual_seed(0)
    data = [torch.randn(2, 3, 32, 32) for _ in range(3)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        se.equalize(Larger(), (data[0],), data, progress=False)
    (warned,) = [str(w.message) for w in caught if "further apart" in str(w.message)]
    page = (ROOT / "docs" / "calibration.md").read_text()
    block = " ".join(re.search(r"```text\nUserWarning: (se_surgery: in 1 of 1 fusion\(s\) of Larger.*?)```", page,
                               re.S).group(1).split())
    number = r"[0-9.]+"
    assert re.sub(number, "#", block) == re.sub(number, "#", warned)
    shown, got = (list(map(float, re.findall(r"\d+\.?\d*(?=x|,|\))", t))) for t in (block, warned))
    assert got == pytest.approx(shown, rel=0.02)


@pytest.mark.docs
@pytest.mark.slow
def test_the_limits_pages_preserve_figure_is_what_equalize_reports():
    # docs/limits.md: how far preserve_function moves smp UPerNet's output (relative to its max abs), eval and
    # training mode, on tests/zoo.py's model, a seeded example and its batches (another CPU: 5%).
    import warnings

    import torch
    from zoo import batches, build, inputs

    import se_surgery as se

    page = " ".join((ROOT / "docs" / "limits.md").read_text().split())
    shown = re.search(r"output moves by ([0-9.]+) \(eval mode\) and ([0-9.]+) \(training mode\)", page)
    for mode, figure in zip(("eval", "train"), shown.groups()):
        torch.manual_seed(0)
        model = getattr(build("smp_UPerNet"), mode)()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            eq = se.equalize(model, inputs("smp_UPerNet", torch.randn(2, 3, 128, 128)), batches("smp_UPerNet"),
                             progress=False, preserve_function=True)
        assert eq.scale_equalizers.output_change == pytest.approx(float(figure), rel=0.05), mode


@pytest.mark.docs
@pytest.mark.slow
def test_the_variance_table_of_the_evidence_page_is_what_its_command_prints(tmp_path):
    # docs/evidence/README.md: examples/upsampling_variance.py's table (seeded; the predictions are exact, the
    # measured ratios move in the last digit on another CPU); the plot is drawn again, apart.
    out = _script("upsampling_variance", "--plot", str(tmp_path / "variance.png"), cwd=tmp_path)
    def rows(text):
        return {tuple(c.strip() for c in line.split("|")[1:4]): [c.strip() for c in line.split("|")[4:-1]]
                for line in text.splitlines() if re.match(r"\| (linear|bilinear|bicubic|trilinear) \|", line)}
    made, page = rows(out), rows((ROOT / "docs" / "evidence" / "README.md").read_text())
    assert made.keys() == page.keys() and len(page) == 24
    for key, cells in page.items():
        assert made[key][1:] == cells[1:], key  # the predictions
        assert float(made[key][0].split()[0]) == pytest.approx(float(cells[0].split()[0]), abs=0.001), key
    assert (tmp_path / "variance.png").stat().st_size > 10_000


@pytest.mark.docs
@pytest.mark.slow
def test_the_finetune_results_are_what_the_report_makes_of_the_log(tmp_path):
    # docs/finetune/: results.md and the plot from log.json (exact: the log is the data; the training itself takes
    # a quarter of an hour and is not rerun here); docs/evidence/README.md quotes the table.
    made = _report("finetune_experiment", [ROOT / "docs" / "finetune" / "log.json"], tmp_path)
    assert made == (ROOT / "docs" / "finetune" / "results.md").read_text()
    table = [line for line in made.splitlines() if line.startswith("|")]
    assert "\n".join(table) in (ROOT / "docs" / "evidence" / "README.md").read_text()
    assert (tmp_path / "finetune.png").stat().st_size > 10_000


@pytest.mark.docs
@pytest.mark.slow
def test_the_performance_pages_onnx_node_counts_are_what_the_benchmark_exports():
    # docs/performance.md's ONNX table: nodes of the original, unfolded and folded exports (exact); its latencies are
    # timings, measured by the same script and not asserted here.
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "onnx_fold.py"), "--counts"], capture_output=True,
                          text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    def counts(text):
        return {cells[0]: cells[1:3] for line in text.splitlines()
                if len(cells := [c.strip() for c in line.split("|")[1:-1]]) >= 3 and "/" in cells[2]
                and cells[0] != "model"}
    made = counts(done.stdout)
    page = counts((ROOT / "docs" / "performance.md").read_text().split("## The ONNX fold")[1])
    assert made == page and len(page) == 6


@pytest.mark.docs
@pytest.mark.slow
def test_the_method_pages_pretrained_variance_and_calibration_figures_hold(tmp_path):
    # docs/method.md: the range of variance bilinear x2 keeps on the pretrained Lite0's maps (its command; another
    # CPU: 0.01), and the figures it quotes from docs/calibration.md's table (which its own test reruns).
    page = " ".join((ROOT / "docs" / "method.md").read_text().split())
    low, high = (float(v) for v in re.search(r"bilinear x2 keeps ([0-9.]+)-([0-9.]+) of the variance", page).groups())
    out = _script("upsampling_variance", "--pretrained", cwd=tmp_path)
    ratios = [float(line.split("|")[2]) for line in out.splitlines() if re.match(r"\| \d+ x", line)]
    assert len(ratios) == 5
    assert min(ratios) == pytest.approx(low, abs=0.01) and max(ratios) == pytest.approx(high, abs=0.01)
    table = (ROOT / "docs" / "calibration.md").read_text()
    pspnet = re.search(r"\| smp PSPNet, evidence setup \| `norm='running'` \| ([^|]+) \|", table).group(1)
    stds = [float(v) for v in pspnet.split(" / ")]
    assert f"std {min(stds):.2f}-{max(stds):.2f} in training mode" in page
    lraspp = re.search(r"\| torchvision LR-ASPP, random weights \| `norm='running'` \| ([^|]+) \|", table).group(1)
    assert f"std of {float(lraspp):.1e}".replace("e+0", "e") in page
