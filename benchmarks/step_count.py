"""Sample quality against the sampler's step count, on trained weights: FID, KID and edge energy of
the same checkpoints from the same seeded noise, per sampler and number of steps.

    python benchmarks/step_count.py runs/a3 --seed 3 --arms d48,h48 \
        --cells ddim10,ddim20,ddim50,ddim100,dpmpp2m10,dpmpp2m20
    python benchmarks/step_count.py summary runs/a0 runs/a1 runs/a2 runs/a3 runs/a4 --arms d48,h48

The folder is a quality.py --out folder; --seed and --preset must be the ones it was made with. A
cell is SAMPLERSTEPS, with tTMIN for the samplers' floor (diffusion.sample_t_min): ddim50t9. Its
samples are quality.py's own file when that holds them all (only read), else this script's
samples-ARM-SAMPLERSTEPS-tminT.pt, which sample_floor.py shares; drawn once, then reused. Each
folder's scores go to its step_count.json and each cell's first 64 samples to grid-ARM-CELL.png
(for benchmarks/grids.py's ARM@CELL); `summary` prints the means over folders, and per cell on how
many folders the first arm beats the second.

Why: the adversarial term sharpens G's x0 estimate by about the same amount whichever sampler is
used, while a sampler's own blur falls as its steps grow. Edge energy (the mean absolute difference of
neighbouring pixels, relative to the held-out reals') shows where each arm sits for each sampler,
and FID whether the term's gain holds up as the steps grow (benchmarks/RESULTS.md, issue 10).
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

import torch

from dgan.atomic import write_text_atomic
from dgan.generation import save_grid
from dgan.pixels import edge_energy

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_folder  # noqa: E402  (benchmarks/ is not a package)
from quality_score import score_set  # noqa: E402

RESULTS = "step_count.json"


def parse_cell(cell: str) -> tuple[str, int, int]:
    """SAMPLERSTEPS[tT] -> (sampler, steps, t_min): ddim50, dpmpp2m20t9 (the samplers' floor at t = 9)."""
    m = re.fullmatch(r"(ddim|dpmpp2m)(\d+)(?:t(\d+))?", cell)
    if not m or int(m.group(2)) < 1:
        raise SystemExit(f"--cells: {cell!r} is not SAMPLERSTEPS[tTMIN] with a sampler ddim or dpmpp2m, "
                         "e.g. ddim50 or dpmpp2m20t9")
    return m.group(1), int(m.group(2)), int(m.group(3) or 0)


def cell_name(sampler: str, steps: int, t_min: int) -> str:
    return f"{sampler}{steps}" + (f"t{t_min}" if t_min else "")


def measure(argv: list[str]) -> None:
    p = quality_folder.folder_parser(__doc__)
    p.add_argument("--cells", default="ddim10,ddim20,ddim50,dpmpp2m10,dpmpp2m20",
                   help="comma-separated SAMPLERSTEPS[tTMIN] cells: sampler ddim or dpmpp2m, and tTMIN "
                        "the samplers' floor (diffusion.sample_t_min), e.g. ddim50t9")
    p.add_argument("--samples", type=int, default=1000, help="samples per cell")
    a = p.parse_args(argv)
    args = quality_folder.folder_args(a)
    cells = [parse_cell(c) for c in a.cells.split(",")]
    real = torch.load(a.out / "data.pt", weights_only=True)["ref_images"]
    real_edge = edge_energy(real)
    path = a.out / RESULTS
    results = json.loads(path.read_text()) if path.is_file() else {}
    print(f"{a.out}, seed {a.seed}: {a.samples} samples per cell, {real.shape[0]} held-out reals; "
          "FID (edge energy / the reals')")
    print("| arm | " + " | ".join(cell_name(*c) for c in cells) + " |")
    print("|---" * (len(cells) + 1) + "|")
    for arm in a.arms.split(","):
        row = []
        for sampler, steps, t_min in cells:
            fake = quality_folder.kept_cell(args, a.out, arm, sampler, steps, a.samples, t_min, "step_count")
            # quality.py's grid name, so benchmarks/grids.py can put this cell beside its own (ARM@CELL)
            grid = a.out / f"grid-{arm}-{cell_name(sampler, steps, t_min)}.png"
            save_grid(fake[:64].float().div(127.5).sub(1.0), grid, nrow=8)
            score = score_set(real, fake, a.out / "extractor.pt", 0)
            edge = edge_energy(fake) / real_edge
            results.setdefault(arm, {})[cell_name(sampler, steps, t_min)] = {
                "fid": score["fid"], "kid": score["kid"], "edge": edge, "samples": a.samples}
            row.append(f"{score['fid']:.3f} ({edge:.3f})")
            # atomic: the file holds every earlier run's cells too, and a kill mid-write must not lose them
            write_text_atomic(path, json.dumps({**results, "seed": a.seed}, indent=1))
        print(f"| {arm} | " + " | ".join(row) + " |", flush=True)


def summary(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description="the mean over step_count.py's folders")
    p.add_argument("outs", nargs="+", type=Path)
    p.add_argument("--arms", required=True, help="two arms: the first is compared with the second")
    a = p.parse_args(argv)
    arm_a, arm_b = a.arms.split(",")
    folders = [json.loads((out / RESULTS).read_text()) for out in a.outs]
    missing = [str(out) for out, f in zip(a.outs, folders) if arm_a not in f or arm_b not in f]
    if missing:
        raise SystemExit(f"summary: {', '.join(missing)} lack {arm_a} or {arm_b}: run step_count.py there first")
    cells = [c for c in folders[0][arm_a] if all(c in f[arm_a] and c in f[arm_b] for f in folders)]
    print(f"{len(folders)} folders; mean FID {arm_b} / {arm_a} (change), wins of {arm_a}, mean edge energy")
    print("| cell | " + f"FID {arm_b} / {arm_a} | change | wins | edge {arm_b} / {arm_a} |")
    print("|---|---|---|---|---|")
    for c in cells:
        fa, fb = [f[arm_a][c]["fid"] for f in folders], [f[arm_b][c]["fid"] for f in folders]
        ea, eb = [f[arm_a][c]["edge"] for f in folders], [f[arm_b][c]["edge"] for f in folders]
        ma, mb = statistics.mean(fa), statistics.mean(fb)
        print(f"| {c} | {mb:.3f} / {ma:.3f} | {(ma / mb - 1) * 100:+.1f}% | {sum(x < y for x, y in zip(fa, fb))} "
              f"of {len(fa)} | {statistics.mean(eb):.3f} / {statistics.mean(ea):.3f} |")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["summary"]:
        summary(argv[1:])
    else:
        measure(argv)


if __name__ == "__main__":
    main()
