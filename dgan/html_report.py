"""`dgan.evaluate --report`: one self-contained HTML page per evaluation (pictures embedded as data
URIs, no scripts, no network), for a person to read and to attach to a data-sharing request.

It holds the sample grid, the metric table with each metric's real-data floor beside it, the
memorization picture (closest sample | training-image pairs) and the histogram of nearest-training
distances (samples against held-out real images, with the copy threshold), and where every number
came from: checkpoint, data, reference split, extractor, sampler.
"""
from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any, Optional

import torch

from dgan.atomic import write_text_atomic
from dgan.progress import format_value

HIST_BINS = 30
# What each audit number means, shown under the table (README, "Is my synthetic data safe and useful?").
EXPLAIN = {
    "memorization_rate": "share of samples closer to a training image than 99% of held-out real images are "
                         "(about 0.01 without copying)",
    "holdout_train_duplicates": "held-out images identical to a training image: a leak in the data split",
    "precision": "share of samples inside the real images' manifold (fidelity)",
    "recall": "share of real images inside the samples' manifold (coverage of the distribution)",
    "density": "samples per real neighbourhood, over k (about 1 when samples are as dense as reals)",
    "coverage": "share of real images with a sample in their neighbourhood",
    "ms_ssim": "MS-SSIM between random pairs (near 1: the images look alike)",
    "sharpness": "the samples' edge energy over the reference's (1: as sharp as the data; above 1: grainier)",
    "utility_synthetic_balanced_accuracy": "classifier trained on samples, tested on held-out real images",
}


def floor_key(key: str) -> Optional[str]:
    """The metric's real-data floor key: real_<key>, or utility_real_* for utility_synthetic_*."""
    if key.startswith("utility_synthetic_"):
        return key.replace("utility_synthetic_", "utility_real_")
    return None if key.startswith(("real_", "utility_real_")) else f"real_{key}"


def metric_rows(metrics: dict[str, float]) -> str:
    rows = []
    for key, value in metrics.items():
        floor = floor_key(key)
        if floor is None:
            continue  # a floor is shown beside its metric, not on its own row
        shown = format_value(metrics[floor]) if floor in metrics else ""
        note = html.escape(EXPLAIN.get(key, ""))
        rows.append(f"<tr><td>{html.escape(key)}</td><td>{format_value(value)}</td><td>{shown}</td>"
                    f"<td class=note>{note}</td></tr>")
    return "\n".join(rows)


def png_tag(path: Optional[Path], alt: str) -> str:
    if path is None or not Path(path).is_file():
        return ""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def histogram_svg(fake: torch.Tensor, holdout: torch.Tensor, threshold: float, width: int = 480,
                  height: int = 180) -> str:
    """Two overlaid histograms (share of each set per bin) and the threshold line, as inline SVG."""
    # The axis ends at the 99th percentile of both sets: a few far outliers would squash the rest.
    top = float(torch.quantile(torch.cat([fake, holdout]).float(), 0.99)) or 1.0
    parts = []
    for values, colour in ((holdout, "#888"), (fake, "#1f6fd1")):
        counts = torch.histc(values.float().clamp(max=top), bins=HIST_BINS, min=0, max=top) / max(values.numel(), 1)
        peak = max(float(counts.max()), 1e-9)
        for i, c in enumerate(counts.tolist()):
            h = (height - 20) * c / peak
            x = width * i / HIST_BINS
            parts.append(f'<rect x="{x:.1f}" y="{height - 20 - h:.1f}" width="{width / HIST_BINS - 1:.1f}" '
                         f'height="{h:.1f}" fill="{colour}" fill-opacity="0.55"/>')
    tx = width * threshold / top
    parts.append(f'<line x1="{tx:.1f}" y1="0" x2="{tx:.1f}" y2="{height - 20}" stroke="#d11" stroke-width="2"/>')
    parts.append(f'<text x="2" y="{height - 4}" font-size="11">0</text><text x="{width - 60}" y="{height - 4}" '
                 f'font-size="11">{top:.3g}</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
            f'aria-label="nearest-training distances">{"".join(parts)}</svg>')


def provenance(report: dict[str, Any]) -> str:
    ck, ref, ex = report["checkpoint"], report.get("reference") or {}, report.get("extractor") or {}
    items = {"checkpoint": f"{ck['path']} (step {ck['step']}, {ck['images_seen']} images seen)",
             "run": report["run_dir"], "data": f"{ref.get('source')} {ref.get('path', '')}".strip(),
             "reference": f"split {ref.get('split')}, {ref.get('num_images')} images"
                          + (f"; {ref['train_images']} training images" if ref.get("train_images") else ""),
             "extractor": ex.get("path") or ex.get("name") or "-",
             "samples": f"{report['num_samples']} ({report['sampler']}, {report['steps']} steps"
                        + (f", eta {report['eta']}" if report.get("eta") else "") + ", seed "
                        f"{report['seed']}, guidance {report['guidance']})",
             "written": f"{report['created']} by dgan {report['dgan_version']}"}
    return "\n".join(f"<tr><th>{k}</th><td>{html.escape(str(v))}</td></tr>" for k, v in items.items())


def write_html_report(path: Path, report: dict[str, Any], grid: Optional[Path], artefacts: dict[str, Any],
                      memorization_png: Optional[Path]) -> Path:
    memo = ""
    if "memorization_fake_dist" in artefacts:
        memo = (f"<h2>Memorization</h2><p>Closest samples, each beside its nearest training image:</p>"
                f"{png_tag(memorization_png, 'closest pairs')}<p>Distance to the nearest training image "
                f"(blue: samples, grey: held-out real images; red: the copy threshold):</p>"
                + histogram_svg(artefacts["memorization_fake_dist"], artefacts["memorization_holdout_dist"],
                                artefacts["memorization_threshold"]))
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dgan evaluation, step {report['checkpoint']['step']}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}} td,th{{padding:2px 10px;text-align:left}}
td.note{{color:#555;font-size:90%}} img{{image-rendering:pixelated;max-width:100%}}</style></head><body>
<h1>dgan evaluation</h1>
<table>{provenance(report)}</table>
<h2>Samples</h2>{png_tag(grid, 'sample grid')}
<h2>Metrics</h2>
<table><tr><th>metric</th><th>samples</th><th>real floor</th><th></th></tr>
{metric_rows(report['metrics'])}</table>
{memo}
</body></html>
"""
    return write_text_atomic(path, page)
