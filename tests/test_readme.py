"""The front door cannot go stale: the README's Python blocks run as written (offline, in a fresh folder), its test
command is the one CI runs, and every relative link in the README and docs/ points at a file that exists."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


@pytest.mark.slow
def test_the_readmes_python_blocks_run_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope: dict = {"__name__": "readme"}
    blocks = _blocks((ROOT / "README.md").read_text(), "python")
    assert len(blocks) >= 2
    for block in blocks:  # in order, in one namespace, as a reader pastes them
        exec(compile(block, str(ROOT / "README.md"), "exec"), scope)
    assert (tmp_path / "equalized.pt").exists() and (tmp_path / "model.onnx").exists()


def test_ci_runs_the_readmes_test_command():
    commands = [c.strip() for c in _blocks((ROOT / "README.md").read_text(), "sh")]
    test = next(c for c in commands if "pytest" in c)
    assert test in (ROOT / ".ci" / "run").read_text()


def test_every_relative_link_points_at_a_file():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    missing = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if not target.startswith(("http://", "https://")) and not (page.parent / target).exists():
                missing.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not missing, missing


def test_the_readme_stays_a_front_door():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
    cited = [p for p in ROOT.rglob("*.py") if ".venv" not in p.parts and p != Path(__file__) and
             "METHOD.md" in p.read_text()]
    assert not cited and (ROOT / "docs" / "method.md").exists()
