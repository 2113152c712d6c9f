"""Evidence, round 4: which placement of the equalizers should be the default? The test written down in
``docs/evidence/round4-plan.md`` before its first run, run and judged here mechanically.

The regime is round 3's pretrained one (``evidence.py --preset pretrained``: ImageNet EfficientNet-Lite0 encoder,
new decoders, SGD, 400 steps at 128 px on scenes cut from real photos), on four decoders (PSPNet, UPerNet, FPN,
DeepLabV3+), both photo data sets, fresh seeds :data:`SEEDS`. Arms (:data:`PLACEMENTS`) are ``se.equalize``'s
choices of sites; on a model where two arms pick the same sites, only the first is run (:func:`static_arms`), and the
measured arm, whose sites depend on the seed's weights, stands for the run with the same sites when there is one
(its row says ``same_sites_as``). Then the long phase: 3x the steps on PSPNet and UPerNet on mosaic, for the
baseline and the two leading placements by the plan's ranking, at seeds :data:`LONG_SEEDS`.

Runs are grouped by (model, data, seed, phase); a group runs its baseline first on this machine (again, if the
baseline on file came from another machine) and its arms after, each row naming the baseline row it pairs with
(``baseline_id``), the commit and whether the tree was dirty, and the machine. Rows go to one file per shard,
``docs/evidence/round4/rows-K-of-N.jsonl`` (nothing rewrites a file another shard appends to); ``--report`` reads
them all, pairs each arm with its own baseline, applies Holm's correction over every interval it prints, and the
plan's decision rule, and writes ``docs/evidence/round4/results.md``, the plot and the README's section.

    python examples/round4.py --shard 0/2 & python examples/round4.py --shard 1/2   # two cores; resumes
    python examples/round4.py --report
    python examples/round4.py --quick --out /tmp/r4   # the test suite's smoke run
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import statistics
import subprocess
import uuid
import warnings
from pathlib import Path

import evidence as ev
import torch
from scipy import stats

import se_surgery as se
from se_surgery.capture import capture
from se_surgery.where import choose, resolve

MODELS = ("PSPNet", "UPerNet", "FPN", "DeepLabV3Plus")
DATA = ("mosaic", "photoshapes")
SEEDS = tuple(range(100, 112))          # fresh: rounds 1-3 used 0-23
LONG_SEEDS = tuple(range(100, 108))
LONG_STEPS = 1200                        # 3x the main phase's 400
LONG_CONFIGS = (("PSPNet", "mosaic"), ("UPerNet", "mosaic"))
# The placements compared, in the order that breaks ties (today's default first); each is se.equalize's options.
PLACEMENTS = {"every": {"where": "every"}, "paper": {"where": "paper"}, "final": {"where": "final"},
              "cat": {"where": "cat"}, "measured": {"where": "measured"}, "all": {"branches": "all"}}
ALPHA = 0.05
OUT = ev.ROOT / "docs" / "evidence" / "round4"
SETTINGS = {**ev.PRESETS["pretrained"], "preset": "pretrained", "batch": 8, "threads": 1}


def _git(*words: str) -> str:
    done = subprocess.run(["git", *words], cwd=ev.ROOT, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else ""


COMMIT = _git("rev-parse", "--short=12", "HEAD") or "unknown"
DIRTY = bool(_git("status", "--porcelain", "--", "se_surgery", "examples"))


def machine() -> str:
    """torch, the CPU's model name and vector extension: runs are bit-paired only on one such machine."""
    name = platform.processor()
    try:
        name = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, {name}"


# ----------------------------------------------------------------------------------------------------------------
# The plan


@functools.cache
def static_arms(model: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Per placement, the arm that runs for it on ``model``: itself, the earlier placement that picks the same sites
    (by the graph alone), or ``"baseline"`` where it picks none (``measured`` and ``all`` always run themselves);
    and the sites each static placement picks."""
    built = ev.build(model, 8, SETTINGS["encoder"]).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sites = se.find_sites(capture(built, (torch.randn(1, 3, SETTINGS["size"], SETTINGS["size"]),)))
    chosen, runs = {}, {}
    for arm, options in PLACEMENTS.items():
        if "where" not in options or options["where"] == "measured":
            runs[arm] = arm
            continue
        names = [s.name for s in choose(sites, resolve(options["where"]))[0]]
        runs[arm] = "baseline" if not names else next((a for a, n in chosen.items() if n == names), arm)
        chosen.setdefault(arm, names)
    return runs, chosen


def groups(rows: list[dict]) -> list[tuple[str, str, int, int, tuple[str, ...]]]:
    """(model, data, seed, steps, arms) for every group of runs, main phase seed by seed (so that a sweep cut short
    leaves paired seeds everywhere), then the long phase once the main phase is complete."""
    runs = {m: static_arms(m)[0] for m in {*MODELS, *(m for m, _ in LONG_CONFIGS)}}
    found = [(m, d, s, SETTINGS["steps"], ("baseline", *dict.fromkeys(a for a in runs[m].values() if a != "baseline")))
             for s in SEEDS for d in DATA for m in MODELS]
    table = values(rows, runs, SETTINGS["steps"])
    if all(len(table[(m, d)].get(a, [])) == len(SEEDS) for m in MODELS for d in DATA for a in PLACEMENTS):
        leading = ranking(table, family(table, runs)[1])[:2]  # the plan's two leading placements
        found += [(m, d, s, LONG_STEPS, ("baseline", *dict.fromkeys(runs[m][a] for a in leading
                                                                     if runs[m][a] != "baseline")))
                  for s in LONG_SEEDS for m, d in LONG_CONFIGS]
    return found


# ----------------------------------------------------------------------------------------------------------------
# The sweep


# A run's cost relative to PSPNet's (the plan's estimates: 100, 200, 150, 210 s), to balance the shards.
COST = {"PSPNet": 1.0, "UPerNet": 2.0, "FPN": 1.5, "DeepLabV3Plus": 2.1}


def shard(todo: list[tuple], k: int, n: int) -> list[tuple]:
    """The groups of shard ``k`` of ``n``: each group, in plan order, to the shard with the least estimated work so
    far (every shard computes the same split; the plan's later groups never move the earlier ones)."""
    work, mine = [0.0] * n, []
    for group in todo:
        target = min(range(n), key=lambda i: (work[i], i))
        work[target] += COST[group[0]] * len(group[4]) * group[3]
        if target == k:
            mine.append(group)
    return mine


def read(folder: Path) -> list[dict]:
    return [json.loads(line) for path in sorted(folder.glob("rows-*.jsonl"))
            for line in path.read_text().splitlines() if line.strip()]


def sweep(args) -> None:
    """Run what the plan still needs on this machine; again while that adds groups (the long phase is planned once
    the main phase is complete)."""
    here, path = machine(), args.out / f"rows-{args.shard.replace('/', '-of-') if args.shard else 'all'}.jsonl"
    args.out.mkdir(parents=True, exist_ok=True)
    cache: dict[str, tuple] = {}
    while _sweep_once(args, here, path, cache):
        pass


def _sweep_once(args, here: str, path: Path, cache: dict) -> bool:
    rows = read(args.out)
    todo = groups(rows)
    if args.shard:
        k, n = (int(v) for v in args.shard.split("/"))
        todo = shard(todo, k, n)
    ran = False
    for model, data, seed, steps, arms in todo:
        mine = {r["arm"]: r for r in rows if r["machine"] == here
                and (r["model"], r["data"], r["seed"], r["steps"]) == (model, data, seed, steps)}
        if all(a in mine for a in arms):
            continue
        ran = True
        if data not in cache:
            cache[data] = ev.dataset(data, args)
        args.steps = steps
        for arm in arms:
            if arm in mine:
                continue
            row = _run(model, data, seed, arm, args, cache[data], mine)
            mine[arm] = row
            with path.open("a") as f:  # one line per run: an interrupted sweep resumes after the last one
                f.write(json.dumps(row) + "\n")
            print(f"{model}/{data} seed {seed} {steps} steps {arm}: mIoU {row['miou']:.4f} "
                  f"({row['seconds']} s){' = ' + row['same_sites_as'] if row.get('same_sites_as') else ''}",
                  flush=True)
    return ran


def _run(model: str, data: str, seed: int, arm: str, args, dataset, mine: dict) -> dict:
    """One run of the group ``mine`` (this machine's rows of it so far, the baseline first)."""
    runs, names = static_arms(model)
    picked: list[str] = []

    def shortcut(sites: list[str]) -> dict | None:  # the measured arm, where it picks sites already run
        picked.extend(sites)
        same = "baseline" if not sites else next((a for a, n in names.items() if n == sites and runs[a] == a
                                                  and a in mine), None)
        if same is None:
            return None
        return {**{k: v for k, v in mine[same].items() if k not in ("id", "premise", "grads")}, "arm": arm,
                "same_sites_as": same, "id": uuid.uuid4().hex[:12], "baseline_id": mine["baseline"]["id"],
                "site_names": sites, "commit": COMMIT, "dirty": DIRTY}

    options = PLACEMENTS.get(arm)
    row = ev.run((model, "sgd", data), seed, arm, args, dataset, options=options,
                 shortcut=shortcut if arm == "measured" else None)
    if "same_sites_as" in row:
        return row
    row.pop("grads", None)  # (round 3's per-step gradient panels; the round-4 report does not read them)
    row.update(round=4, preset="round4", id=uuid.uuid4().hex[:12], machine=machine(), commit=COMMIT, dirty=DIRTY)
    if arm == "measured":
        row["site_names"] = picked
    if arm != "baseline":
        row["baseline_id"] = mine["baseline"]["id"]
    return row


# ----------------------------------------------------------------------------------------------------------------
# The report: pairs, Holm, the decision rule


def pairs(rows: list[dict], steps: int) -> dict[tuple, dict[str, list[float]]]:
    """(model, data) -> arm -> paired differences (arm - its own baseline row), one per seed."""
    by_id = {r["id"]: r for r in rows}
    found: dict[tuple, dict[str, list[float]]] = {}
    for r in sorted(rows, key=lambda r: r["seed"]):
        if r["arm"] != "baseline" and r["steps"] == steps:
            base = by_id[r["baseline_id"]]
            found.setdefault((r["model"], r["data"]), {}).setdefault(r["arm"], []).append(r["miou"] - base["miou"])
    return found


def values(rows: list[dict], runs: dict[str, dict[str, str]], steps: int) -> dict[tuple, dict[str, list[float]]]:
    """Per configuration, every placement's paired differences: its own runs, the runs of the arm that picks the
    same sites, or zeros where it picks none (it is the baseline there)."""
    found = pairs(rows, steps)
    table = {}
    for model in MODELS:
        for data in DATA:
            own = found.get((model, data), {})
            seeds = len(own.get("every", []))
            table[(model, data)] = {arm: [0.0] * seeds if runs[model][arm] == "baseline" else
                                    own.get(runs[model][arm], []) for arm in PLACEMENTS}
    return table


def test(diffs: list[float]) -> tuple[float, float, float]:
    """Mean, 95% t half-width and the two-sided p-value of a paired t-test."""
    mean, sd = statistics.mean(diffs), statistics.stdev(diffs)
    if not sd:
        return mean, 0.0, 1.0 if mean == 0 else 0.0
    error = sd / math.sqrt(len(diffs))
    return mean, float(stats.t.ppf(0.975, len(diffs) - 1)) * error, \
        float(2 * stats.t.sf(abs(mean) / error, len(diffs) - 1))


def holm(pvalues: dict) -> dict:
    """Holm's step-down adjustment of a family of p-values (same keys)."""
    adjusted, running = {}, 0.0
    for i, k in enumerate(sorted(pvalues, key=pvalues.get)):
        running = max(running, min(1.0, (len(pvalues) - i) * pvalues[k]))
        adjusted[k] = running
    return adjusted


SECONDARY = ("UPerNet", "every", "paper")  # the plan's secondary comparison: the cost of the chained additions


def secondary(rows: list[dict]) -> dict[tuple, list[float]]:
    """(model, data) -> per seed, arm minus arm of :data:`SECONDARY`, paired within a group (one baseline)."""
    model, first, second = SECONDARY
    by = {(r["data"], r["baseline_id"], r["arm"]): r["miou"] for r in rows
          if r["model"] == model and r["arm"] in (first, second) and r["steps"] == SETTINGS["steps"]}
    found: dict[tuple, list[float]] = {}
    for data, base, arm in sorted(by):
        if arm == first and (data, base, second) in by:
            found.setdefault((model, data), []).append(by[(data, base, first)] - by[(data, base, second)])
    return found


def family(table: dict, runs: dict[str, dict[str, str]], long_table: dict | None = None,
           extra: dict | None = None) -> tuple[dict, dict]:
    """Every distinct interval the report prints, keyed (config, arm) or ("long", config, arm): its test, and the
    Holm-adjusted p-values over all of them. A placement that picks the same sites as another on a model is that
    interval (counted once, its adjusted p copied); one that picks none is the baseline (no interval)."""
    tests = {}
    for config, arms in table.items():
        for arm, diffs in arms.items():
            if runs[config[0]][arm] == arm and len(diffs) > 1 and any(diffs):  # (all 0: it picked no site)
                tests[(config, arm)] = test(diffs)
    for config, arms in (long_table or {}).items():
        for arm, diffs in arms.items():
            if len(diffs) > 1:
                tests[("long", config, arm)] = test(diffs)
    for config, diffs in (extra or {}).items():
        if len(diffs) > 1:
            tests[("secondary", config)] = test(diffs)
    adjusted = holm({k: v[2] for k, v in tests.items()})
    for config in table:
        for arm, same in runs[config[0]].items():
            if same not in (arm, "baseline") and (config, same) in adjusted:
                tests[(config, arm)], adjusted[(config, arm)] = tests[(config, same)], adjusted[(config, same)]
    return tests, adjusted


def _outcomes(table: dict, adjusted: dict, arm: str) -> tuple[int, int, float]:
    """(configurations significantly below 0, above 0, mean paired difference over the configurations)."""
    signs = [(statistics.mean(arms[arm]), adjusted.get((config, arm), 1.0)) for config, arms in table.items()
             if arms[arm]]
    if not signs:
        return 0, 0, -math.inf
    return (sum(m < 0 and p < ALPHA for m, p in signs), sum(m > 0 and p < ALPHA for m, p in signs),
            statistics.mean(m for m, _ in signs))


def ranking(table: dict, adjusted: dict) -> list[str]:
    """The placements in the plan's order of preference: fewest configurations significantly below 0 (Holm-adjusted
    p < ALPHA) first, then the highest mean paired difference over the configurations; ties by :data:`PLACEMENTS`'
    order (today's default first)."""
    order = list(PLACEMENTS)
    return sorted(order, key=lambda a: (_outcomes(table, adjusted, a)[0], -_outcomes(table, adjusted, a)[2],
                                        order.index(a)))


def verdict(table: dict, adjusted: dict) -> tuple[str, str]:
    """The plan's decision rule, applied: (the default placement, the sentence that says why)."""
    best = ranking(table, adjusted)[0]
    lost, gained, mean = _outcomes(table, adjusted, best)
    if lost:
        return best, (f"every placement is below the baseline somewhere after Holm's correction; the safest, "
                      f"'{best}', in {lost} configuration(s) (mean {mean:+.4f}): no placement gains reliably")
    why = (f"'{best}' is below the baseline nowhere after Holm's correction and has the highest mean paired "
           f"difference of those that are ({mean:+.4f}); it is significantly above the baseline in {gained} of "
           f"{len(table)} configurations")
    return best, why + ("" if gained else ": no placement gains reliably")


def judged(rows: list[dict]) -> tuple:
    """What the report prints, computed once: (runs per model, the main table, the long phase's pairs, the
    secondary differences, every interval's test, Holm-adjusted p-values, whether the main phase is complete)."""
    runs = {m: static_arms(m)[0] for m in MODELS}
    table = values(rows, runs, SETTINGS["steps"])
    long_pairs = pairs(rows, LONG_STEPS)
    extra = secondary(rows)
    tests, adjusted = family(table, runs, long_pairs, extra)
    complete = all(len(arms[a]) == len(SEEDS) for arms in table.values() for a in PLACEMENTS)
    return runs, table, long_pairs, extra, tests, adjusted, complete


def headline(rows: list[dict]) -> str:
    """The README's round-4 section: per configuration and placement the mean paired difference (bold where its
    Holm-adjusted p < ALPHA), the decision rule's verdict and the secondary comparison."""
    runs, table, _, extra, tests, adjusted, complete = judged(rows)
    lines = ["| model | data | seeds | " + " | ".join(f"`{a}`" for a in PLACEMENTS) + " |",
             "|---|---|---|" + "---|" * len(PLACEMENTS)]
    for (model, data), arms in table.items():
        cells = []
        for arm in PLACEMENTS:
            key = ((model, data), arm)
            if runs[model][arm] == "baseline" or arms[arm] and not any(arms[arm]):
                cells.append("0")
            elif key in tests:
                text = f"{tests[key][0]:+.4f}"
                cells.append(f"**{text}**" if adjusted[key] < ALPHA else text)
            else:
                cells.append("-")
        lines.append(f"| {model} | {data} | {len(arms['every'])} | " + " | ".join(cells) + " |")
    state = "final" if complete else f"provisional, {len(rows)} rows: the main phase is not complete"
    if any(arms["every"] for arms in table.values()):
        best, why = verdict(table, adjusted)
        lines += ["", f"Decision rule ({state}): the default placement is `{best}`: {why}.", ""]
    for (model, data), diffs in extra.items():
        if (key := ("secondary", (model, data))) in tests:
            mean, half, _ = tests[key]
            lines.append(f"- {model}/{data}, `{SECONDARY[1]}` minus `{SECONDARY[2]}` (the chained additions' share): "
                         f"{mean:+.4f} [{mean - half:+.4f}, {mean + half:+.4f}] ({len(diffs)} seeds).")
    return "\n".join(lines) + "\n"


def report(args) -> str:
    rows = read(args.out)
    runs, table, long_pairs, extra, tests, adjusted, complete = judged(rows)
    distinct = sum(1 for k in tests if k[0] in ("long", "secondary") or runs[k[0][0]][k[1]] == k[1])
    lines = [f"Round 4 ({len(rows)} rows; plan: docs/evidence/round4-plan.md). Arm minus its own baseline, test "
             f"mIoU: mean [95% t interval] (paired seeds) and the Holm-adjusted p over all {distinct} distinct "
             f"intervals; **bold**: adjusted p < {ALPHA}. `=x`: picks the same sites as arm x on that model; `0`: "
             f"picks none (it is the baseline).", "",
             "| model | data | " + " | ".join(PLACEMENTS) + " |", "|---|---|" + "---|" * len(PLACEMENTS)]
    for (model, data), arms in table.items():
        cells = []
        for arm in PLACEMENTS:
            same, key = runs[model][arm], ((model, data), arm)
            if same == "baseline" or arms[arm] and not any(arms[arm]):
                cells.append("0")
            elif key in tests:
                mean, half, _ = tests[key]
                text = f"{mean:+.4f} [{mean - half:+.4f}, {mean + half:+.4f}] ({len(arms[arm])}) p={adjusted[key]:.2g}"
                cells.append((f"**{text}**" if adjusted[key] < ALPHA else text) + (f" ={same}" if same != arm else ""))
            else:
                cells.append("-")
        lines.append(f"| {model} | {data} | " + " | ".join(cells) + " |")
    if long_pairs:
        lines += ["", f"Long phase ({LONG_STEPS} steps):", "", "| model | data | arm | difference |",
                  "|---|---|---|---|"]
        for (model, data), arms in long_pairs.items():
            for arm, diffs in arms.items():
                if (key := ("long", (model, data), arm)) in tests:
                    mean, half, _ = tests[key]
                    lines.append(f"| {model} | {data} | {arm} | {mean:+.4f} [{mean - half:+.4f}, {mean + half:+.4f}] "
                                 f"({len(diffs)}) p={adjusted[key]:.2g} |")
    for (model, data), diffs in extra.items():
        if (key := ("secondary", (model, data))) in tests:
            mean, half, _ = tests[key]
            lines += ["", f"Secondary: {model}/{data}, {SECONDARY[1]} minus {SECONDARY[2]} (paired within seed): "
                          f"{mean:+.4f} [{mean - half:+.4f}, {mean + half:+.4f}] ({len(diffs)}) p={adjusted[key]:.2g}"]
    if any(arms["every"] for arms in table.values()):
        best, why = verdict(table, adjusted)
        lines += ["", f"Decision rule ({'final' if complete else 'provisional: the main phase is not complete'}): "
                      f"the default placement is '{best}': {why}."]
    lines += ["", provenance(rows)]
    text = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(text + "\n")
    if args.out.resolve() == OUT.resolve():
        ev._between(ev.ROOT / "README.md", "round4-headline", headline(rows))
    print(text)
    return text


def provenance(rows: list[dict]) -> str:
    """Every pair on one machine and one commit, or the pairs that are not; dirty trees."""
    by_id = {r["id"]: r for r in rows}
    apart = [r for r in rows if r["arm"] != "baseline" and by_id[r["baseline_id"]]["machine"] != r["machine"]]
    commits = [r for r in rows if r["arm"] != "baseline" and by_id[r["baseline_id"]]["commit"] != r["commit"]]
    dirty = [r for r in rows if r.get("dirty")]
    text = (f"Provenance: {len(rows)} rows from commit(s) {', '.join(sorted({r['commit'] for r in rows}))} on "
            f"{len({r['machine'] for r in rows})} machine(s); {len(apart)} pair(s) across machines, {len(commits)} "
            f"across commits, {len(dirty)} row(s) from a dirty tree.")
    for r in (apart + commits)[:20]:
        text += f"\n- {r['model']}/{r['data']} seed {r['seed']} {r['arm']} ({r['commit']}, {r['machine']})"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shard", help="K/N: run every N-th group of the plan, starting at the K-th (0-based)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--report", action="store_true", help="only write the report")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 seed, 2 models, 6 steps")
    args = parser.parse_args()
    for name, value in SETTINGS.items():
        setattr(args, name, value)
    torch.set_num_threads(args.threads)
    if args.quick:
        global MODELS, DATA, SEEDS, LONG_SEEDS, LONG_STEPS, LONG_CONFIGS
        MODELS, DATA, SEEDS, LONG_SEEDS, LONG_STEPS = ("PSPNet", "FPN"), ("mosaic",), (100, 101), (100, 101), 8
        LONG_CONFIGS = (("PSPNet", "mosaic"),)
        args.steps, args.train, args.test, SETTINGS["steps"] = 4, 16, 8, 4
    if not args.report:
        sweep(args)
    report(args)


if __name__ == "__main__":
    main()
