"""Issue 15: the evidence sweep runs as a user reruns it: resumable, one pair again with --only, reproducible."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "evidence.py"


def _run(*args):
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_quick_pair_resumes_and_reports(tmp_path):
    _run("--quick", "--only", "PSPNet,sgd,digits,0", "--out", str(tmp_path))
    rows = _rows(tmp_path / "results.jsonl")
    assert [r["arm"] for r in rows] == ["baseline", "equalized", "preserve"]
    assert all(0 <= r["miou"] <= 1 and r["grads"] for r in rows)
    out = _run("--quick", "--only", "PSPNet,sgd,digits,0", "--out", str(tmp_path))  # nothing left to do
    assert len(_rows(tmp_path / "results.jsonl")) == 3
    assert "| PSPNet | sgd | digits | 1 |" in out and (tmp_path / "evidence.png").exists()


@pytest.mark.slow
def test_a_recorded_pair_reproduces(tmp_path):
    recorded = [r for r in _rows(ROOT / "docs" / "evidence" / "results.jsonl")
                if (r["model"], r["optimizer"], r["data"], r["seed"]) == ("PSPNet", "sgd", "shapes", 0)]
    assert recorded
    _run("--only", "PSPNet,sgd,shapes,0", "--out", str(tmp_path))
    again = {r["arm"]: r["miou"] for r in _rows(tmp_path / "results.jsonl")}
    for r in recorded:
        assert abs(again[r["arm"]] - r["miou"]) <= 1e-3, (r["arm"], r["miou"], again[r["arm"]])
