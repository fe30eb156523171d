"""Summarise several seeds of benchmarks/quality.py: per-seed FID, wins, means, and runaway checks.

    python benchmarks/seeds_summary.py runs/hd0 runs/hd1 runs/hd2 runs/hd3 runs/hd4

Each argument is a quality.py --out folder with results.json; its console log (the folder name +
".log", next to it) is read for the largest logged L_D of each arm. A runaway is a logged interval
with L_D above the D-health guard's threshold (gan.guard_max_loss, 10), or a guard event.
Prints a Markdown table, then the acceptance checks of issue 10 for `--a` against `--b`.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

RUNAWAY_L_D = 10.0


def max_l_d(log: Path, arm: str) -> float:
    if not log.is_file():
        return float("nan")
    values = [float(m.group(1)) for m in re.finditer(rf"^{arm}: step .*? L_D ([0-9.e+-]+)", log.read_text(), re.M)]
    return max(values, default=float("nan"))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("outs", nargs="+", type=Path)
    p.add_argument("--a", default="hybrid")
    p.add_argument("--b", default="diffusion")
    args = p.parse_args(argv)
    rows, fids = [], {}
    for out in args.outs:
        r = json.loads((out / "results.json").read_text())
        seed = r["seed"]
        for arm in (args.a, args.b):
            info = r["arms"][arm]
            runs = r["runs"][arm]
            for key, score in runs.items():
                fids.setdefault((arm, key), {})[seed] = score["fid"]
            rows.append(f"| {seed} | {arm} | {info['kimg']:.1f} | " + " | ".join(
                f"{runs[k]['fid']:.3f}" for k in sorted(runs)) + f" | {info.get('t_adapt', '-')} | "
                f"{info.get('guard_events', '-')} | {max_l_d(out.with_suffix('.log'), arm):.2f} |")
    keys = sorted({k for _, k in fids})
    print("| seed | arm | kimg | " + " | ".join(f"FID {k}" for k in keys) + " | T_adapt | guard events | max L_D |")
    print("|---|---|---:|" + "---:|" * len(keys) + "---:|---:|---:|")
    print("\n".join(rows))
    print()
    for k in keys:
        a, b = fids[(args.a, k)], fids[(args.b, k)]
        seeds = sorted(set(a) & set(b))
        wins = sum(a[s] < b[s] for s in seeds)
        ma, mb = statistics.mean(a[s] for s in seeds), statistics.mean(b[s] for s in seeds)
        # the per-seed change's standard error says whether the mean change stands out of seed noise
        change = [a[s] / b[s] - 1 for s in seeds]
        se = statistics.stdev(change) / len(change) ** 0.5 if len(change) > 1 else float("nan")
        print(f"{k}: {args.a} better on {wins}/{len(seeds)} seeds; mean FID {ma:.3f} vs {mb:.3f} "
              f"({(ma / mb - 1) * 100:+.1f}%; per-seed change {statistics.mean(change) * 100:+.1f}%, "
              f"standard error {se * 100:.1f}%)")
    if ("ddim10" in keys) and ("ddim50" in keys):
        seeds = sorted(set(fids[(args.a, "ddim10")]) & set(fids[(args.b, "ddim50")]))
        ma = statistics.mean(fids[(args.a, "ddim10")][s] for s in seeds)
        mb = statistics.mean(fids[(args.b, "ddim50")][s] for s in seeds)
        print(f"{args.a} at DDIM 10 vs {args.b} at DDIM 50: mean FID {ma:.3f} vs {mb:.3f} "
              f"({'no worse' if ma <= mb else 'worse'})")


if __name__ == "__main__":
    main()
