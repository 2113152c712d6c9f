"""Pages whose figures come from a command: the command runs again and the page must agree with it, within the
noise the page allows (random weights and generated data are seeded, so a rerun on one machine is identical; another
CPU moves the last digits)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_scales_page_example_is_what_its_command_prints(tmp_path):
    page = (ROOT / "docs" / "scales.md").read_text()
    command = re.search(r"Example: `se-surgery (inspect [^`]+)`", page.replace("\n", " ")).group(1).split()
    command = [c.strip("'") for c in command]
    command[command.index("--plot") + 1] = str(tmp_path / "scales.png")  # (the page's image is written apart)
    done = subprocess.run([sys.executable, "-m", "se_surgery.cli", "--quiet", *command, "--markdown"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| decoder.call0_fusion4 |")]
    before, after = rows[:4], rows[4:8]
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
