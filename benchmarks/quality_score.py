"""benchmarks/quality.py's scoring: how well the domain extractor separates the classes, FID/KID
(and FRD) of one sample set against the held-out reference, the blob rate, and the Markdown table
and dgan/peer ratios of a results.json.

dgan.metrics is imported where it is used: quality.py imports this module, and its sample phase
must run where torch-fidelity (and the frd extra) are not installed."""
from __future__ import annotations

import json
from pathlib import Path

import torch


@torch.no_grad()
def held_out_accuracy(path: Path, data: dict, device: str) -> float:
    """How well the extractor's features separate the classes on images it never saw: balanced
    accuracy of a nearest-class-mean rule on the features, fitted on the training part. A sanity
    check that the feature space carries the domain signal FID/KID are meant to compare."""
    from dgan.metrics.fidelity import load_scripted  # torch-fidelity: see the module's docstring

    net = load_scripted(path).to(device)
    feats = {k: torch.cat([net(x.to(device)).cpu() for x in data[f"{k}_images"].split(256)])
             for k in ("train", "ref")}
    means = torch.stack([feats["train"][data["train_labels"] == c].mean(0) for c in (0, 1)])
    pred = torch.cdist(feats["ref"], means).argmin(1)
    # Balanced (mean per-class recall): with 89% pneumonia, plain accuracy rewards a constant answer.
    return float(torch.stack([(pred[data["ref_labels"] == c] == c).float().mean() for c in (0, 1)]).mean())


def detail_energy(images_u8: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared difference from a 3x3 box blur, in [0, 1] units: high for speckle."""
    x = images_u8.float() / 255.0
    blur = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)
    return (x - blur).pow(2).flatten(1).mean(1)


def score_set(real: torch.Tensor, fake: torch.Tensor, extractor: Path, frd_samples: int) -> dict[str, float]:
    """FID/KID on all samples; FRD (frd_samples > 0) on the first frd_samples of them: its radiomics
    extraction costs ~0.1 s per image per core, the reference included, on every call. Blob rate:
    the share above the reference's 99th-percentile detail energy (about 0.01 for real images)."""
    from dgan.metrics import fid_kid

    scores = fid_kid(real, fake, extractor_path=extractor, batch_size=256)
    threshold = torch.quantile(detail_energy(real), 0.99)
    scores["blob"] = float((detail_energy(fake) > threshold).float().mean())
    if frd_samples > 0:
        from dgan.metrics import frd

        scores["frd"] = frd(real, fake[:frd_samples])
    return scores


def frd_available() -> bool:
    from dgan.metrics import MetricError, require_frd

    try:
        require_frd()
    except MetricError:
        return False
    return True


def peer_ratios(results: dict, peer: str) -> list[str]:
    """'ARM/peer FID x.xx, KID y.yy at ddim50' for every dgan arm, when the peer was run."""
    runs = results["runs"]
    if peer not in runs:
        return []
    lines = []
    for arm, by_col in runs.items():
        for col in (c for c in by_col if c in runs[peer] and arm != peer):
            kid = by_col[col]["kid"] / runs[peer][col]["kid"] if runs[peer][col]["kid"] > 0 else float("nan")
            lines.append(f"ratio {arm}/peer at {col}: FID {by_col[col]['fid'] / runs[peer][col]['fid']:.3f}, "
                         f"KID {kid:.3f}")
    return lines


def markdown_table(results: dict, cols_spec) -> str:
    cols = [f"{s}{n}" for s, n in cols_spec]
    have = {k for by_col in results["runs"].values() for cell in by_col.values() for k in cell}
    keys = [k for k in ("fid", "kid", "frd", "blob") if k in have]
    lines = ["| arm | kimg | " + " | ".join(f"{k.upper()} {c}" for k in keys for c in cols) + " |",
             "|---|---:|" + "---:|" * (len(keys) * len(cols))]
    for name, by_col in results["runs"].items():
        kimg = results["arms"].get(name, {}).get("kimg", float("nan"))
        cells = (fmt(by_col[c][k]) if k in by_col.get(c, {}) else "-" for k in keys for c in cols)
        lines.append(f"| {name} | {kimg:.1f} | " + " | ".join(cells) + " |")
    for floor, scores in results["floors"].items():
        lines.append(f"| real {floor} | | " + " | ".join(fmt(scores[k]) if k in scores else "-"
                                                        for k in keys for _ in cols) + " |")
    return "\n".join(lines)


# What makes two score commands' cells comparable, beside the folder's data.pt and extractor
SCORED_ALIKE = ("preset", "seed", "reference_images", "frd_samples", "samples")


def keep_earlier_arms(results: dict, path: Path, unrecorded: dict | None = None) -> dict:
    """`results` with the arms of an earlier results.json at `path` that it did not score again.

    Why: a score command that lists only the new arms would otherwise drop the older arms' scores
    from the folder's record. An earlier file scored differently (SCORED_ALIKE) is not mixed in but
    kept beside it, as the first free results-earlier-N.json. `unrecorded`: what an earlier file that
    lacks a SCORED_ALIKE key (written before it was recorded) was scored with."""
    if not path.is_file():
        return results
    earlier = {**(unrecorded or {}), **json.loads(path.read_text())}
    if any(earlier.get(k) != results.get(k) for k in SCORED_ALIKE):
        n = next(i for i in range(1, 10_000) if not path.with_name(f"results-earlier-{i}.json").exists())
        path.replace(path.with_name(f"results-earlier-{n}.json"))
        return results
    for part in ("arms", "runs"):
        results[part] = {**{a: v for a, v in earlier.get(part, {}).items() if a not in results["runs"]},
                         **results[part]}
    return results


def fmt(v: float) -> str:
    return f"{v:.4f}" if abs(v) < 1 else f"{v:.2f}"
