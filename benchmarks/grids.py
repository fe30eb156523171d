"""Put sample grids side by side in one small PNG, labelled, for benchmarks/RESULTS.md.

    python benchmarks/grids.py runs/quality --arms real,hybrid,diffusion,peer --sampling ddim50 \\
        --out benchmarks/quality-grids.png

`real` is the first 64 held-out reference images of the run's data.pt; the others are the
grid-ARM-SAMPLING.png files that benchmarks/quality.py's sample phase wrote. `ARM@SAMPLING` gives
one panel its own sampling (`--arms real,diffusion@ddim50,hybrid@dpmpp2m10`).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image, ImageDraw

GAP_PX = 8
LABEL_PX = 14


def load_grid(run: Path, arm: str, sampling: str) -> Image.Image:
    if arm != "real":
        return Image.open(run / f"grid-{arm}-{sampling}.png").convert("L")
    from dgan.generation import save_grid

    ref = torch.load(run / "data.pt", weights_only=True)["ref_images"][:64].float() / 127.5 - 1.0
    path = run / "grid-real.png"
    save_grid(ref, path, nrow=8)
    return Image.open(path).convert("L")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path)
    p.add_argument("--arms", type=lambda s: s.split(","), default=["real", "hybrid", "diffusion", "peer"])
    p.add_argument("--sampling", default="ddim50")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    panels = [(arm.partition("@")[0], arm.partition("@")[2] or args.sampling) for arm in args.arms]
    grids = [load_grid(args.run, arm, sampling) for arm, sampling in panels]
    w, h = grids[0].size
    sheet = Image.new("L", (len(grids) * (w + GAP_PX) - GAP_PX, h + LABEL_PX), 255)
    draw = ImageDraw.Draw(sheet)
    for i, ((arm, sampling), grid) in enumerate(zip(panels, grids)):
        sheet.paste(grid, (i * (w + GAP_PX), LABEL_PX))
        draw.text((i * (w + GAP_PX) + 2, 1), arm if arm == "real" else f"{arm} {sampling}", fill=0)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out, optimize=True)
    print(f"wrote {args.out} ({sheet.size[0]}x{sheet.size[1]} px)")


if __name__ == "__main__":
    main()
