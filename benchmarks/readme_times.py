"""The README's times, measured: each command in a child process, wall and CPU seconds (user + system of the child
and everything it starts), written between the README's ``times`` markers.

    python benchmarks/readme_times.py            # demo, inspect, the fast tier, the pretrained equalize (minutes)
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
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
COMMANDS = [
    ("`se-surgery demo`", [str(BIN / "se-surgery"), "demo", "--quiet"]),
    ("`se-surgery inspect --model 'smp:PSPNet?encoder_name=resnet18&classes=5' --synthetic 8 --size 128 --plot "
     "scales.png`", [str(BIN / "se-surgery"), "inspect", "--model", "smp:PSPNet?encoder_name=resnet18&classes=5",
                     "--synthetic", "8", "--size", "128", "--plot", "/tmp/se_surgery_scales.png", "--quiet"]),
    ("fast tier: `python -m pytest -q -m \"not slow\"`", [sys.executable, "-m", "pytest", "-q", "-m", "not slow",
                                                        "-p", "no:cacheprovider"]),
]
# The README's pretrained example (its block, as written, after the imports of the Use block): equalize alone timed
# in the child, against one plain pass over the same batches.
PRETRAINED = """
import re, time, warnings
import segmentation_models_pytorch as smp
import torch
import se_surgery as se
block = re.search(r"```python\\n(from se_surgery.integrations.lite0 .*?)```", open("README.md").read(), re.S).group(1)
setup, call = block.rsplit("eq = ", 1)
exec(setup)
warnings.simplefilter("ignore")
with torch.no_grad():
    model(photos[0])  # (warm)
    start = time.perf_counter(); [model(p) for p in photos]; plain = time.perf_counter() - start
start = time.perf_counter(); exec("eq = " + call); took = time.perf_counter() - start
print(f"{took:.1f} {plain:.2f}")
"""
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
    done = subprocess.run([sys.executable, "-c", PRETRAINED], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the pretrained example failed: {done.stderr[-2000:]}")
    took, plain = (float(v) for v in done.stdout.split())
    print(f"pretrained equalize: {took:.1f} s, a plain pass {plain:.2f} s", flush=True)
    import torch

    threads = os.environ.get("OMP_NUM_THREADS") or f"torch's default, {torch.get_num_threads()}"
    machine = (f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}, threads: "
               f"{threads}; a quiet machine")
    command = "python benchmarks/readme_times.py" + (" --full" if args.full else "")
    section = "\n".join(rows) + f"\n\n({machine}; `{command}`.)\n"
    equalize = (f"That `equalize` (smp PSPNet on the Lite0 encoder, 8 batches of 4 x 3 x 256 x 256, training mode) "
                f"takes {took:.1f} s wall, {took / plain:.1f} times one plain inference pass over the same batches "
                f"({plain:.2f} s), the export of its graph included ({machine}; `{command}`).")
    equalize = textwrap.fill(equalize, 117, break_on_hyphens=False, break_long_words=False) + "\n"
    readme = ROOT / "README.md"
    text = readme.read_text()
    for marker, body in (("times", section), ("equalize-time", equalize)):
        text = re.sub(rf"(<!-- {marker}:begin.*?-->\n).*?(?=<!-- {marker}:end -->)", lambda m: m.group(1) + body,
                      text, flags=re.S)
    readme.write_text(text)


if __name__ == "__main__":
    main()
