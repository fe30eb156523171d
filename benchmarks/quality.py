"""Sample quality on held-out PneumoniaMNIST at 32 px: dgan's hybrid, dgan's pure diffusion
(gan.adv_weight=0) and a plain diffusers DDPM (the peer), each trained for the same wall-clock
budget on the same data and machine, one after another, and scored in one feature space.

    python benchmarks/quality.py                      # CPU preset: 15 min per arm on 2 cores
    python benchmarks/quality.py --arms hybrid,diffusion --seed 3 --minutes 6
    python benchmarks/quality.py --arms base,v --arm "base:diffusion.prediction=eps" --arm v: --minutes 4
    python benchmarks/quality.py --preset gpu --device cuda   # a fixed 400 kimg per dgan arm
    bash benchmarks/quality_gpu.sh runs/qgpu 540 0,1,2 3,4   # the gpu preset, several seeds at once

Arms: `hybrid`, `diffusion` and `peer` are built in; `--arm "NAME:key=value key=value"` adds a dgan
arm with its own config overrides (an ablation), and `--set` applies to every dgan arm. Each arm's
ARM.pt records the overrides it trained with: sample (and spacing.py) rebuild the arm from that
record, sample and score take a trained arm without its --arm, and sample refuses an --arm/--set
that contradicts the record.

Phases (each reads what the previous wrote under --out, so they can run on different machines):
  prepare  hold out --holdout images of the npz *train* split as the reference set (the val/test
           splits have another label mix, see DESIGN.md), preprocess both parts to 32 px, save
           data.pt; train the domain feature extractor on the training part's pneumonia labels.
  train    each arm in its own process, one after another, with the machine to itself. With a
           time budget, a few timed steps first plan the run's length, so the lr schedule knows its
           horizon; the run then stops at that step count or at the budget, whichever comes first.
           dgan arms use the Trainer's own build, step and D-health guard on the training
           part held in memory; the peer is benchmarks/peer_ddpm.py. Saves each arm's EMA weights.
  sample   DDIM 10 and 50 (and DPM-Solver++ 10 with --dpm, DDPM 1000 with --ddpm) from each arm's EMA
           weights, from the same per-sample seeded noise for every arm, as uint8 (what is scored); a
           grid of the first 64 per arm. --samples N sets the count (not DDPM's): an earlier DDIM or
           DPM-Solver++ file whose first image this arm, seed and sampler still draw is extended (or
           cut) rather than drawn again (sample i's noise depends on i alone).
  score    FID and KID in the domain extractor's feature space, FRD when the `frd` extra is
           installed, and the blob rate, against the held-out reference; real-vs-real floors.
           Writes results.json (keeping the arms an earlier score command scored and this one
           did not), prints the Markdown table and the dgan/peer ratios.

Why a domain extractor rather than Inception: Inception weights need a download (offline here),
and ImageNet features of 32 px grey X-rays are dominated by resizing artefacts. A small CNN trained
to tell pneumonia from normal on the *training part* sees X-ray structure; it never sees the
held-out reference images it scores against.

Blob rate: the share of samples whose fine-detail energy (mean squared difference from a 3x3 box
blur) exceeds the 99th percentile of the reference images': textured noise with no anatomy.
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

from dgan.pixels import to_uint8  # noqa: E402  (light: no torch-fidelity, which sample must not need)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import peer_ddpm  # noqa: E402  (benchmarks/ is not a package)
from quality_arms import ARMS, PEER, parse_arm, run_overrides, trained_overrides  # noqa: E402
from quality_score import frd_available, held_out_accuracy, keep_earlier_arms, markdown_table  # noqa: E402
from quality_score import peer_ratios, score_set  # noqa: E402

PRESETS = {
    # minutes: wall-clock training budget per arm (None: a fixed kimg per dgan arm);
    # samples per sampler (DDPM runs all 1000 steps, so it gets fewer on a CPU)
    "cpu": {"minutes": 15.0, "kimg": None, "samples": 1000, "ddpm_samples": 200, "batch": 64},
    "gpu": {"minutes": None, "kimg": 400, "samples": 2000, "ddpm_samples": 2000, "batch": 128},
    "ablation": {"minutes": None, "kimg": 28, "samples": 500, "ddpm_samples": 100, "batch": 64},
    "smoke": {"minutes": 0.1, "kimg": None, "samples": 64, "ddpm_samples": 16, "batch": 16},
}


def sample_count(args: argparse.Namespace, sampler: str) -> int:
    """Samples per cell: --samples, else the preset's (DDPM, which runs all 1000 steps: the preset's)."""
    p = PRESETS[args.preset]
    return p["ddpm_samples"] if sampler == "ddpm" else args.samples or p["samples"]


def samplings(args: argparse.Namespace) -> tuple[tuple[str, int], ...]:
    return ((("ddim", 10), ("ddim", 50)) + ((("dpmpp2m", 10),) if args.dpm else ())
            + ((("ddpm", 1000),) if args.ddpm else ()))


def run_config(args: argparse.Namespace, overrides: list[str], kimg: float | None = None):
    """pneumonia32.yaml with the preset's run settings and an arm's `overrides` (run_overrides or
    trained_overrides)."""
    from dgan.config import load_config

    p = PRESETS[args.preset]
    run = [f"train.total_kimg={kimg or args.kimg or p['kimg'] or 1}", f"train.batch_size={p['batch']}",
           f"train.seed={args.seed}", f"train.device={args.device}", "log.progress=false", f"data.path={args.npz}"]
    return load_config(REPO / "configs" / "pneumonia32.yaml", [*run, *overrides])


def budget_minutes(args: argparse.Namespace) -> float | None:
    if args.kimg is not None:
        return None
    return args.minutes if args.minutes is not None else PRESETS[args.preset]["minutes"]


# --------------------------------------------------------------------------------------------------
# prepare
# --------------------------------------------------------------------------------------------------


def phase_prepare(args: argparse.Namespace, out: Path) -> None:
    from dgan.data import build_eval_images
    from dgan.metrics import train_domain_extractor

    cfg = run_config(args, run_overrides(args, "hybrid"))
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


def build_dgan_run(args: argparse.Namespace, arm: str, images: torch.Tensor, kimg: float | None = None):
    """The trainer, built and seeded as dgan.train builds it, fed from the images held in memory."""
    from dgan.trainer import Trainer

    cfg = run_config(args, run_overrides(args, arm), kimg)
    device = torch.device(cfg.train.device)
    trainer = Trainer.build(cfg, device, data=False)
    return trainer, batches(images, cfg.train.batch_size, cfg.train.seed, device)


def dgan_seconds_per_step(args: argparse.Namespace, arm: str, images: torch.Tensor, probe_steps: int = 20) -> float:
    """Time some steps of a throwaway run of this arm (after two warm-up steps). Short probes
    overestimate the step time (allocator and thread-pool warm-up), which ends runs early."""
    trainer, stream = build_dgan_run(args, arm, images)
    label = torch.zeros(trainer.cfg.train.batch_size, dtype=torch.long, device=trainer.device)
    for i in range(2 + probe_steps):
        if i == 2:
            clock = time.perf_counter()
        trainer.step([(next(stream), label)])
    return (time.perf_counter() - clock) / probe_steps


def train_dgan(args: argparse.Namespace, out: Path, arm: str) -> None:
    """One dgan arm, in this process: the trainer's own build and step code, data from memory."""
    from dgan.monitor import MetricWindow

    images = torch.load(out / "data.pt", weights_only=True)["train_images"]
    minutes, kimg = budget_minutes(args), None
    if minutes is not None:  # plan the run's length so that the lr schedule decays over the budget
        batch = PRESETS[args.preset]["batch"]
        kimg = minutes * 60 / dgan_seconds_per_step(args, arm, images) * batch / 1000
    trainer, stream = build_dgan_run(args, arm, images, kimg)
    cfg, tr, ema, state, guard = trainer.cfg, trainer.tr, trainer.ema, trainer.state, trainer.guard
    total_steps = round(cfg.train.total_kimg * 1000 / trainer.global_batch)
    label = torch.zeros(cfg.train.batch_size, dtype=torch.long, device=trainer.device)
    window, clock = MetricWindow(), time.perf_counter()
    deadline = clock + (minutes * 60 if minutes is not None else float("inf"))
    log_every = max(1, min(cfg.log.every_steps, total_steps // 10))
    while state.step < total_steps and time.perf_counter() < deadline:
        window.add(trainer.step([(next(stream), label)]))
        if state.step % log_every == 0 or state.step == total_steps:
            m = window.reduce()  # the one host sync per interval
            event = guard.check(m, state.step)
            print(f"{arm}: step {state.step}/{total_steps} L_diff {m['L_diff']:.4f} L_adv {m['L_adv']:.3f} "
                  f"L_D {m['L_D']:.3f} T_adapt {int(tr.ada.t_adapt)} "
                  f"{state.images_seen / (time.perf_counter() - clock):.0f} img/s{' ' + event if event else ''}",
                  flush=True)
    torch.save({"ema": ema.module.state_dict(), "overrides": run_overrides(args, arm), "steps": state.step,
                "kimg": state.images_seen / 1000, "train_s": time.perf_counter() - clock,
                "t_adapt": int(tr.ada.t_adapt), "guard_events": guard.events}, out / f"{arm}.pt")


def train_one(args: argparse.Namespace, out: Path, arm: str) -> None:
    if arm != PEER:
        return train_dgan(args, out, arm)
    minutes = budget_minutes(args)
    if minutes is None:
        raise SystemExit("the peer arm trains for a wall-clock budget: give --minutes")
    images = torch.load(out / "data.pt", weights_only=True)["train_images"]
    result = peer_ddpm.train_peer(images, minutes=minutes, seed=args.seed, device=torch.device(args.device),
                                  log=lambda line: print(line, flush=True))
    torch.save(result, out / f"{PEER}.pt")


def phase_train(args: argparse.Namespace, out: Path) -> None:
    """Each arm in its own process, one after another: each gets every core for its whole budget."""
    for arm in args.arms:
        cmd = [sys.executable, __file__, "--phase", "_train_one", "--only", arm, *forwarded(args)]
        if subprocess.run(cmd).returncode != 0:
            raise SystemExit(f"train: arm {arm} failed; see its output above")


def forwarded(args: argparse.Namespace) -> list[str]:
    flags = ["--out", str(args.out), "--preset", args.preset, "--seed", str(args.seed), "--npz", str(args.npz),
             "--device", args.device, "--arms", ",".join(args.arms)]
    if args.minutes is not None:
        flags += ["--minutes", str(args.minutes)]
    if args.kimg is not None:
        flags += ["--kimg", str(args.kimg)]
    flags += [f for spec in args.arm for f in ("--arm", spec)]
    return flags + [f for kv in args.set for f in ("--set", kv)]


# --------------------------------------------------------------------------------------------------
# sample and score
# --------------------------------------------------------------------------------------------------


SAMPLE_BATCH = 500  # sample_arm's batch for dgan arms


def load_arm(args: argparse.Namespace, out: Path, arm: str, sampling: tuple[str, ...] = ()):
    """(EMA G in eval mode, its Diffusion, its config) of a trained dgan arm, rebuilt from its record."""
    from dgan.diffusion import Diffusion
    from dgan.trainer import build_models

    state = torch.load(out / f"{arm}.pt", weights_only=True)
    cfg = run_config(args, [*trained_overrides(args, arm, state), *sampling])
    device = torch.device(cfg.train.device)
    G, _ = build_models(cfg, device)
    G.load_state_dict(state["ema"])
    return G.eval(), Diffusion.from_config(cfg.diffusion, device=device), cfg


def sample_arm(args: argparse.Namespace, out: Path, arm: str, sampler: str, steps: int, n: int,
               first: int = 0, sampling: tuple[str, ...] = ()) -> torch.Tensor:
    """Samples first..n-1 of this arm; with `first` a multiple of SAMPLE_BATCH the batches are those
    of one run of 0..n-1, so the images are bit-identical to it (DDPM's step noise, seeded per
    batch, is the same too). `sampling`: overrides that change only how it samples
    (benchmarks/sample_floor.py's diffusion.sample_t_min)."""
    from dgan.generation import generate_indices, initial_noise

    if arm == PEER:
        if sampler != "ddim":
            raise SystemExit("the peer arm samples with DDIM only (its recipe); drop --ddpm/--dpm or the peer arm")
        state = torch.load(out / f"{arm}.pt", weights_only=True)
        x_T = initial_noise(range(first, n), args.seed, (1, 32, 32)).to(args.device)
        return peer_ddpm.sample_peer(state["ema"], x_T, steps)
    G, diffusion, cfg = load_arm(args, out, arm, sampling)
    device = torch.device(cfg.train.device)
    return generate_indices(G, diffusion, range(first, n), sampler=sampler, steps=steps, seed=args.seed,
                            channels=cfg.model.channels, image_size=cfg.model.image_size, num_classes=0,
                            batch_size=SAMPLE_BATCH, device=device)


def samples_to_keep(args: argparse.Namespace, out: Path, arm: str, sampler: str, steps: int, path: Path,
                    n: int, sampling: tuple[str, ...] = ()) -> torch.Tensor | None:
    """The images of an earlier samples file that a run of 0..n-1 would make again, so --samples
    need not draw them twice; else None (draw all n). Kept only from a deterministic sampler (DDPM
    draws fresh noise per step), as uint8 (older files are float16), a whole number of batches
    unless it holds n already (sample_arm's `first`), and when its first image is what this arm,
    seed, sampler and `sampling` overrides draw now: another seed or retrained weights change every
    pixel, while a batch of 1 against 500 moves none by more than float rounding."""
    if sampler == "ddpm" or not path.is_file():
        return None
    kept = torch.load(path, weights_only=True)
    if kept.dtype != torch.uint8 or (kept.shape[0] < n and kept.shape[0] % SAMPLE_BATCH):
        return None
    probe = to_uint8(sample_arm(args, out, arm, sampler, steps, 1, sampling=sampling))[0]
    return kept[:n] if (probe.int() - kept[0].int()).abs().max() <= 2 else None


def extend_cell(args: argparse.Namespace, out: Path, arm: str, sampler: str, steps: int, n: int,
                kept: torch.Tensor | None, sampling: tuple[str, ...] = ()) -> tuple[torch.Tensor, int]:
    """The n uint8 samples (what is scored) of one arm and sampler: `kept` (samples_to_keep's) and the
    rest drawn; returns them and how many were kept. Saves nothing."""
    first = 0 if kept is None else kept.shape[0]
    parts = [] if kept is None else [kept]
    if first < n:
        parts.append(to_uint8(sample_arm(args, out, arm, sampler, steps, n, first, sampling)))
    return torch.cat(parts), first


def phase_sample(args: argparse.Namespace, out: Path) -> None:
    from dgan.generation import save_grid

    for arm in args.arms:
        for sampler, steps in samplings(args):
            n, path = sample_count(args, sampler), out / f"samples-{arm}-{sampler}{steps}.pt"
            clock = time.perf_counter()
            kept = samples_to_keep(args, out, arm, sampler, steps, path, n) if args.samples else None
            x, first = extend_cell(args, out, arm, sampler, steps, n, kept)
            # uint8 (half fp16's bytes, so a GPU run's samples travel back); cut to n, the count scored
            torch.save(x, path)
            save_grid(x[:64].float().div(127.5).sub(1.0), out / f"grid-{arm}-{sampler}{steps}.png", nrow=8)
            print(f"sample: {arm} {sampler}{steps}: {n - first} images in {time.perf_counter() - clock:.0f} s"
                  f"{f' (the first {first} kept)' if first else ''}", flush=True)


def phase_score(args: argparse.Namespace, out: Path) -> dict:
    data = torch.load(out / "data.pt", weights_only=True)
    real, extractor = data["ref_images"], out / "extractor.pt"
    frd_samples = args.frd_samples if frd_available() and not args.no_frd else 0
    if not frd_samples:
        print("score: FRD skipped (pip install -e '.[frd]' to add it, or drop --no-frd)", flush=True)
    results: dict = {"preset": args.preset, "minutes": budget_minutes(args), "overrides": list(args.set),
                     "reference_images": int(real.shape[0]), "seed": args.seed, "frd_samples": frd_samples,
                     "samples": sample_count(args, "ddim"), "arms": {}, "runs": {}, "floors": {}}
    # Real-vs-real floors at the sample counts: FID/KID of held-out reals against training reals of
    # the same size say what "as good as the data" reads on this extractor.
    counts = {sample_count(args, sampler) for sampler, _ in samplings(args)}
    for n in sorted(counts):
        results["floors"][f"train{n}"] = score_set(real, data["train_images"][:n], extractor, frd_samples)
    for arm in args.arms:
        info = torch.load(out / f"{arm}.pt", weights_only=True)
        results["arms"][arm] = {k: info[k] for k in ("kimg", "train_s", "overrides", "t_adapt", "guard_events")
                                if k in info}
        for sampler, steps in samplings(args):
            fake = torch.load(out / f"samples-{arm}-{sampler}{steps}.pt", weights_only=True)
            fake = fake if fake.dtype == torch.uint8 else to_uint8(fake)  # float16 before 2026-12-04
            if fake.shape[0] != sample_count(args, sampler):  # FID's bias depends on the count
                fix = "sample it again" if sampler == "ddpm" else "give the --samples it was sampled with"
                raise SystemExit(f"score: samples-{arm}-{sampler}{steps}.pt holds {fake.shape[0]} images, this "
                                 f"command scores {sample_count(args, sampler)}: {fix}")
            results["runs"].setdefault(arm, {})[f"{sampler}{steps}"] = score_set(real, fake, extractor, frd_samples)
            print(f"score: {arm} {sampler}{steps}: {results['runs'][arm][f'{sampler}{steps}']}", flush=True)
    # a results.json from before "samples" was recorded was scored at its preset's count
    results = keep_earlier_arms(results, out / "results.json", {"samples": PRESETS[args.preset]["samples"]})
    results["peer_ratios"] = peer_ratios(results, PEER)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(markdown_table(results, samplings(args)))
    for line in results["peer_ratios"]:
        print(line)
    return results


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phase", default="all", choices=["all", "prepare", "train", "sample", "score", "_train_one"])
    p.add_argument("--only", help=argparse.SUPPRESS)
    p.add_argument("--preset", default="cpu", choices=list(PRESETS))
    p.add_argument("--minutes", type=float, help="wall-clock training budget per arm (default: the preset's)")
    p.add_argument("--kimg", type=float, help="a fixed training length per dgan arm instead of a time budget")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "quality")
    p.add_argument("--npz", type=Path, default=REPO.parent / "shared" / "data" / "pneumoniamnist.npz")
    p.add_argument("--holdout", type=int, default=1000, help="train-split images held out as the reference")
    p.add_argument("--extractor-epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--set", action="append", default=[], help="a config override for every dgan arm (repeatable)")
    p.add_argument("--arm", action="append", default=[],
                   help="'NAME:key=value ...' (or key=value;key=value): a dgan arm with overrides")
    p.add_argument("--arms", type=lambda s: s.split(","), default=["hybrid", "diffusion", PEER],
                   help="which arms, in order (default hybrid,diffusion,peer)")
    p.add_argument("--ddpm", action="store_true", help="also sample DDPM 1000 (dgan arms only; slow on a CPU)")
    p.add_argument("--dpm", action="store_true", help="also sample DPM-Solver++(2M) 10 (dgan arms only)")
    p.add_argument("--samples", type=int, help="samples per sampler, DDPM aside (default: the preset's)")
    p.add_argument("--no-frd", action="store_true", help="skip FRD even when the extra is installed")
    p.add_argument("--frd-samples", type=int, default=1000, help="samples per set scored by FRD (it is slow)")
    args = p.parse_args(argv)
    if args.samples is not None and args.samples < 1:
        p.error(f"--samples {args.samples}: give at least 1 (or leave it out for the preset's count)")
    args.defined = dict(parse_arm(spec) for spec in args.arm)  # the arms this command defines
    args.arm_overrides = {**ARMS, **args.defined, PEER: []}
    # sample and score read a trained arm's overrides from its ARM.pt (trained_overrides)
    trained = args.phase in ("sample", "score")
    unknown = [a for a in args.arms
               if a not in args.arm_overrides and not (trained and (args.out / f"{a}.pt").exists())]
    if unknown:
        p.error(f"unknown arm(s) {unknown}: define them with --arm 'NAME:key=value ...' (sample and score "
                "also take an arm trained under --out)")
    return args


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
