"""The README's times, measured: each command in a child process, wall and CPU seconds (user + system of the child
and everything it starts), written between the README's ``times`` markers.

    python benchmarks/readme_times.py            # demo, inspect, the fast tier (a few minutes on 2 cores)
    python benchmarks/readme_times.py --full     # and the whole test suite (about a quarter of an hour)

Run it on a quiet machine: other work inflates the wall times (the CPU times much less).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
COMMANDS = [
    ("`se-surgery demo`", [str(BIN / "se-surgery"), "demo", "--quiet"]),
    ("`se-surgery inspect --model 'smp:UPerNet?encoder_name=resnet18&classes=5' --synthetic 8 --size 128 --plot "
     "scales.png`", [str(BIN / "se-surgery"), "inspect", "--model", "smp:UPerNet?encoder_name=resnet18&classes=5",
                     "--synthetic", "8", "--size", "128", "--plot", "/tmp/se_surgery_scales.png", "--quiet"]),
    ("fast tier: `python -m pytest -q -m \"not slow\"`", [sys.executable, "-m", "pytest", "-q", "-m", "not slow",
                                                        "-p", "no:cacheprovider"]),
]
FULL = ("the whole suite: `python -m pytest -q`", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"])


def measure(command: list[str]) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of the child and its children, exit code)."""
    before = os.times()
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = os.times()
    return wall, (after.children_user - before.children_user) + (after.children_system - before.children_system), \
        done.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="also time the whole test suite")
    args = parser.parse_args()
    rows = ["| command | wall (s) | CPU (s) |", "|---|---|---|"]
    for label, command in COMMANDS + ([FULL] if args.full else []):
        wall, cpu, code = measure(command)
        if code != 0:
            raise SystemExit(f"{label} failed (exit {code})")
        rows.append(f"| {label} | {wall:.0f} | {cpu:.0f} |")
        print(rows[-1], flush=True)
    import torch

    threads = os.environ.get("OMP_NUM_THREADS") or f"torch's default, {torch.get_num_threads()}"
    machine = (f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}, threads: "
               f"{threads}; a quiet machine")
    command = "python benchmarks/readme_times.py" + (" --full" if args.full else "")
    section = "\n".join(rows) + f"\n\n({machine}; `{command}`.)\n"
    readme = ROOT / "README.md"
    text = readme.read_text()
    new = re.sub(r"(<!-- times:begin.*?-->\n).*?(?=<!-- times:end -->)", lambda m: m.group(1) + section, text,
                 flags=re.S)
    readme.write_text(new)


if __name__ == "__main__":
    main()
