"""Is the adversarial term worth it? The hybrid (gan.adv_weight=0.1) against pure diffusion
(gan.adv_weight=0) on the shared PneumoniaMNIST at 32 px: same generator, seed and image budget.

    python benchmarks/quality.py                      # CPU preset, about an hour on 2 cores
    python benchmarks/quality.py --preset gpu         # on a GPU: longer training, more samples
    python benchmarks/quality.py --phase train --preset gpu --device cuda   # one phase at a time
    python benchmarks/quality.py --set gan.adv_t_max=200 --set gan.sigma=0.1 --out runs/quality-try

Phases (each reads what the previous wrote under --out, so they can run on different machines):
  prepare  hold out --holdout images of the npz *train* split as the reference set (the val/test
           splits have another label mix, see DESIGN.md), preprocess both parts to 32 px, save
           data.pt; train the domain feature extractor on the training part's pneumonia labels.
  train    train each run in-process with the trainer's own build_trainables/take_step on the
           training part held in memory (no augmentation, the configs' default), runs in parallel
           processes; save each run's EMA generator.
  sample   DDIM 10, DDIM 50 and DDPM 1000 samples from each EMA generator, seeded per sample
           (dgan.evaluate's generation), as uint8.
  score    FID and KID in the domain extractor's feature space, and FRD when the `frd` extra is
           installed, against the held-out reference; also real-vs-real floors. Writes results.json
           and prints the Markdown table for benchmarks/RESULTS.md.

Why a domain extractor rather than Inception: Inception weights need a download (offline here),
and ImageNet features of 32 px grey X-rays are dominated by resizing artefacts. A small CNN trained
to tell pneumonia from normal on the *training part* sees X-ray structure; it never sees the
held-out reference images it scores against.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RUNS = {"hybrid": 0.1, "diffusion": 0.0}  # run name -> gan.adv_weight; everything else is shared
SAMPLINGS = (("ddim", 10), ("ddim", 50), ("ddpm", 1000))
PRESETS = {
    # kimg per run; samples per sampler (DDPM runs all 1000 steps, so it gets fewer on a CPU)
    "cpu": {"kimg": 40, "samples": 1000, "ddpm_samples": 200, "batch": 64},
    "gpu": {"kimg": 400, "samples": 2000, "ddpm_samples": 2000, "batch": 128},
    "smoke": {"kimg": 0.5, "samples": 64, "ddpm_samples": 16, "batch": 16},
}


def run_config(args: argparse.Namespace, adv_weight: float):
    from dgan.config import load_config

    p = PRESETS[args.preset]
    overrides = [f"gan.adv_weight={adv_weight}", f"train.total_kimg={p['kimg']}", f"train.batch_size={p['batch']}",
                 f"train.seed={args.seed}", f"train.device={args.device}", "log.progress=false",
                 f"data.path={args.npz}", *args.set]
    return load_config(REPO / "configs" / "pneumonia32.yaml", overrides)


# --------------------------------------------------------------------------------------------------
# prepare
# --------------------------------------------------------------------------------------------------


def phase_prepare(args: argparse.Namespace, out: Path) -> None:
    from dgan.data import build_eval_images
    from dgan.metrics import to_uint8, train_domain_extractor

    cfg = run_config(args, 0.0)
    images, labels = build_eval_images(cfg.data, image_size=cfg.model.image_size, channels=cfg.model.channels,
                                       split="train")
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(args.seed))
    held, kept = order[:args.holdout], order[args.holdout:]
    data = {"train_images": to_uint8(images[kept]), "train_labels": labels[kept],
            "ref_images": to_uint8(images[held]), "ref_labels": labels[held]}
    torch.save(data, out / "data.pt")
    print(f"prepare: {len(kept)} training images, {len(held)} held-out reference images "
          f"({float(labels[held].float().mean()):.1%} pneumonia)", flush=True)
    clock = time.perf_counter()
    history = train_domain_extractor(data["train_images"], data["train_labels"], out / "extractor.pt",
                                     epochs=args.extractor_epochs, seed=args.seed, device=args.device)
    acc = held_out_accuracy(out / "extractor.pt", data, args.device)
    print(f"prepare: domain extractor, {args.extractor_epochs} epochs in {time.perf_counter() - clock:.0f} s, "
          f"train accuracy {history[-1]['accuracy']:.3f}, held-out balanced accuracy {acc:.3f}", flush=True)
    (out / "extractor.json").write_text(json.dumps({"history": history, "heldout_balanced_accuracy": acc}, indent=2))


@torch.no_grad()
def held_out_accuracy(path: Path, data: dict, device: str) -> float:
    """How well the extractor's features separate the classes on images it never saw: balanced
    accuracy of a nearest-class-mean rule on the features, fitted on the training part. A sanity
    check that the feature space carries the domain signal FID/KID are meant to compare."""
    net = torch.jit.load(str(path), map_location=device).eval()
    feats = {k: torch.cat([net(x.to(device)).cpu() for x in data[f"{k}_images"].split(256)])
             for k in ("train", "ref")}
    means = torch.stack([feats["train"][data["train_labels"] == c].mean(0) for c in (0, 1)])
    pred = torch.cdist(feats["ref"], means).argmin(1)
    # Balanced (mean per-class recall): with 89% pneumonia, plain accuracy rewards a constant answer.
    return float(torch.stack([(pred[data["ref_labels"] == c] == c).float().mean() for c in (0, 1)]).mean())


# --------------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------------


def batches(images: torch.Tensor, batch: int, seed: int, device: torch.device):
    """Endless shuffled batches in [-1, 1] without replacement within an epoch, like the loader."""
    gen = torch.Generator().manual_seed(seed)
    x = images.to(device).float().div(127.5).sub(1.0)
    while True:
        order = torch.randperm(x.shape[0], generator=gen)
        for start in range(0, x.shape[0] - batch + 1, batch):
            yield x[order[start:start + batch].to(device)]


def train_one(args: argparse.Namespace, out: Path, name: str) -> None:
    """One run, in this process: the trainer's own build and step code, data from memory."""
    from dgan.train import MetricWindow, TrainState, build_trainables, global_batch_size, seed_everything, take_step

    cfg = run_config(args, RUNS[name])
    device = torch.device(cfg.train.device)
    seed_everything(cfg.train.seed)
    data = torch.load(out / "data.pt", weights_only=True)
    tr, ema, scheds = build_trainables(cfg, device)
    state, window = TrainState(), MetricWindow()
    stream = batches(data["train_images"], cfg.train.batch_size, cfg.train.seed, device)
    total_steps = round(cfg.train.total_kimg * 1000 / global_batch_size(cfg))
    no_label = torch.zeros(cfg.train.batch_size, dtype=torch.long, device=device)
    clock = time.perf_counter()
    log_every = max(1, total_steps // 10)
    while state.step < total_steps:
        window.add(take_step(tr, ema, scheds, state, cfg, [(next(stream), no_label)]))
        if state.step % log_every == 0 or state.step == total_steps:
            m = window.reduce()  # the one host sync per interval
            print(f"{name}: step {state.step}/{total_steps} L_diff {m['L_diff']:.4f} L_adv {m['L_adv']:.3f} "
                  f"L_D {m['L_D']:.3f} T_adapt {int(tr.ada.t_adapt)} "
                  f"{state.images_seen / (time.perf_counter() - clock):.0f} img/s", flush=True)
    torch.save({"ema": ema.module.state_dict(), "overrides": list(args.set), "adv_weight": cfg.gan.adv_weight,
                "kimg": cfg.train.total_kimg, "train_s": time.perf_counter() - clock,
                "t_adapt": int(tr.ada.t_adapt)}, out / f"{name}.pt")


def phase_train(args: argparse.Namespace, out: Path) -> None:
    """Every run in its own process at once: on a GPU they share it (each alone is launch-bound at
    this size), on a CPU they split the cores."""
    threads = max(1, (os.cpu_count() or 2) // len(args.runs))
    procs = {}
    for name in args.runs:
        cmd = [sys.executable, __file__, "--phase", "_train_one", "--only", name, *forwarded(args)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        procs[name] = subprocess.Popen(cmd, env=env)
    failed = [name for name, proc in procs.items() if proc.wait() != 0]
    if failed:
        raise SystemExit(f"train: run(s) {failed} failed; see their output above")


def forwarded(args: argparse.Namespace) -> list[str]:
    flags = ["--out", str(args.out), "--preset", args.preset, "--seed", str(args.seed), "--npz", str(args.npz),
             "--device", args.device, "--runs", ",".join(args.runs)]
    return flags + [f for kv in args.set for f in ("--set", kv)]


# --------------------------------------------------------------------------------------------------
# sample and score
# --------------------------------------------------------------------------------------------------


def phase_sample(args: argparse.Namespace, out: Path) -> None:
    from dgan.diffusion import Diffusion
    from dgan.evaluate import generate_indices
    from dgan.train import build_models

    p = PRESETS[args.preset]
    for name in args.runs:
        cfg = run_config(args, RUNS[name])
        device = torch.device(cfg.train.device)
        G, _ = build_models(cfg, device)
        G.load_state_dict(torch.load(out / f"{name}.pt", weights_only=True)["ema"])
        diffusion = Diffusion.from_config(cfg.diffusion, device=device)
        for sampler, steps in SAMPLINGS:
            n = p["ddpm_samples"] if sampler == "ddpm" else p["samples"]
            clock = time.perf_counter()
            x = generate_indices(G, diffusion, range(n), sampler=sampler, steps=steps, seed=args.seed,
                                 channels=cfg.model.channels, image_size=cfg.model.image_size, num_classes=0,
                                 batch_size=500, device=device)
            # float16 here, uint8 when scored: this phase must not need torch-fidelity (the GPU
            # machine lacks it); fp16 keeps ~11 bits, far more than the 8 that are scored.
            torch.save(x.half(), out / f"samples-{name}-{sampler}{steps}.pt")
            print(f"sample: {name} {sampler}{steps}: {n} images in {time.perf_counter() - clock:.0f} s", flush=True)


def score_set(real: torch.Tensor, fake: torch.Tensor, extractor: Path, frd_samples: int) -> dict[str, float]:
    """FID/KID on all samples; FRD (frd_samples > 0) on the first frd_samples of them: its radiomics
    extraction costs ~0.1 s per image per core, the reference included, on every call."""
    from dgan.metrics import fid_kid

    scores = fid_kid(real, fake, extractor_path=extractor, batch_size=256)
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


def phase_score(args: argparse.Namespace, out: Path) -> dict:
    from dgan.metrics import to_uint8

    data = torch.load(out / "data.pt", weights_only=True)
    real, extractor = data["ref_images"], out / "extractor.pt"
    frd_samples = args.frd_samples if frd_available() and not args.no_frd else 0
    if not frd_samples:
        print("score: FRD skipped (pip install -e '.[frd]' to add it)", flush=True)
    results: dict = {"preset": args.preset, "overrides": list(args.set), "reference_images": int(real.shape[0]),
                     "seed": args.seed, "frd_samples": frd_samples,
                     "runs": {}, "floors": {}}
    # Real-vs-real floors at the two sample counts: FID/KID of held-out reals against training
    # reals of the same size say what "as good as the data" reads on this extractor.
    for n in sorted({PRESETS[args.preset]["samples"], PRESETS[args.preset]["ddpm_samples"]}):
        results["floors"][f"train{n}"] = score_set(real, data["train_images"][:n], extractor, frd_samples)
    for name in args.runs:
        for sampler, steps in SAMPLINGS:
            fake = to_uint8(torch.load(out / f"samples-{name}-{sampler}{steps}.pt", weights_only=True))
            results["runs"].setdefault(name, {})[f"{sampler}{steps}"] = score_set(real, fake, extractor, frd_samples)
            print(f"score: {name} {sampler}{steps}: {results['runs'][name][f'{sampler}{steps}']}", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(markdown_table(results))
    return results


def markdown_table(results: dict) -> str:
    cols = [f"{s}{n}" for s, n in SAMPLINGS]
    first = next(iter(results["runs"].values()))
    keys = [k for k in ("fid", "kid", "frd") if k in first[cols[0]]]
    lines = ["| run | " + " | ".join(f"{k.upper()} {c}" for k in keys for c in cols) + " |",
             "|---|" + "---:|" * (len(keys) * len(cols))]
    for name, by_col in results["runs"].items():
        lines.append(f"| {name} | " + " | ".join(fmt(by_col[c][k]) for k in keys for c in cols) + " |")
    for floor, scores in results["floors"].items():
        lines.append(f"| real {floor} | " + " | ".join(fmt(scores[k]) for k in keys for _ in cols) + " |")
    return "\n".join(lines)


def fmt(v: float) -> str:
    return f"{v:.4f}" if abs(v) < 1 else f"{v:.2f}"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phase", default="all", choices=["all", "prepare", "train", "sample", "score", "_train_one"])
    p.add_argument("--only", choices=list(RUNS), help=argparse.SUPPRESS)
    p.add_argument("--preset", default="cpu", choices=list(PRESETS))
    p.add_argument("--out", type=Path, default=REPO / "runs" / "quality")
    p.add_argument("--npz", type=Path, default=REPO.parent / "shared" / "data" / "pneumoniamnist.npz")
    p.add_argument("--holdout", type=int, default=1000, help="train-split images held out as the reference")
    p.add_argument("--extractor-epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--set", action="append", default=[], help="a config override for both runs (repeatable)")
    p.add_argument("--runs", type=lambda s: s.split(","), default=list(RUNS),
                   help=f"which of {','.join(RUNS)} (hyperparameter tries: --runs hybrid --set ...)")
    p.add_argument("--no-frd", action="store_true", help="skip FRD even when the extra is installed")
    p.add_argument("--frd-samples", type=int, default=1000, help="samples per set scored by FRD (it is slow)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.phase == "_train_one":
        return train_one(args, out, args.only)
    clock = time.perf_counter()
    phases = {"prepare": phase_prepare, "train": phase_train, "sample": phase_sample, "score": phase_score}
    for name, fn in phases.items():
        if args.phase in ("all", name):
            fn(args, out)
            print(f"[{name} done at {time.perf_counter() - clock:.0f} s]", flush=True)


if __name__ == "__main__":
    main()
