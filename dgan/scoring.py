"""Scoring a generator: metric requests, reconstruction PSNR/SSIM, and FID/KID/FRD of seeded samples
against a reference set. Used by `python -m dgan.evaluate` and by the trainer's periodic evaluation.

Every function here is collective where it says so: call it on every rank at the same point.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from dgan import distributed as dist
from dgan.audit import (AUDIT_METRICS, DEFAULT_UTILITY_PER_CLASS, MIN_BASELINE_IMAGES, audit_scores,
                        check_audit_request, check_utility_data)
from dgan.config_checks import METRICS
from dgan.diffusion import SAMPLERS
from dgan.errors import EvalError
from dgan.generation import generate_distributed, guided_model_fn
from dgan.pixels import edge_energy, to_uint8
from dgan.reference import (EvalResult, conditioning_labels, load_reference, load_reference_u8, reference_cache_key,
                            reference_info)
from dgan.runinfo import file_sha256
from dgan.seeding import Stream, stream_generator

# Without a metric flag. FRD is opt-in: it needs the optional `frd` extra (PyRadiomics).
DEFAULT_METRICS = ("fid", "kid", "psnr", "ssim")
SAMPLE_METRICS = {"fid", "kid", "frd", "sharpness", *AUDIT_METRICS}  # scored on samples: they need a generation
FEATURE_METRICS = {"fid", "kid", "prdc", "memorization"}  # computed in the extractor's feature space
DEFAULT_T_VALUES = (50, 100, 250, 500)
DEFAULT_RECON_IMAGES = 1000


@torch.no_grad()
def reconstruction_metrics(G: torch.nn.Module, diffusion, x0: torch.Tensor, labels: Optional[torch.Tensor],
                           t_values: Sequence[int], *, seed: int, batch_size: int,
                           device: torch.device) -> dict[str, float]:
    """PSNR/SSIM of one-step x0 predictions from q(x0, t), per t: {"psnr_t50": ..., "ssim_t50": ...}."""
    from dgan.metrics import psnr_ssim  # torch-fidelity: slow to import

    out: dict[str, float] = {}
    was_training = G.training
    G.eval()
    try:
        for t in t_values:
            # All of eps at once from one generator: the numbers do not depend on batch_size.
            gen = stream_generator(None, seed, Stream.RECON_NOISE, t)
            eps = torch.randn(x0.shape, generator=gen)
            preds = []
            for start in range(0, x0.shape[0], batch_size):
                xb, eb = x0[start:start + batch_size].to(device), eps[start:start + batch_size].to(device)
                tb = torch.full((xb.shape[0],), int(t), dtype=torch.long, device=device)
                yb = None if labels is None else labels[start:start + batch_size].to(device)
                x_t = diffusion.q_sample(xb, tb, eb)
                out_b = guided_model_fn(G, yb, 1.0)(x_t, tb)
                preds.append(diffusion.model_x0(x_t, tb, out_b).clamp(-1, 1).cpu())
            scores = psnr_ssim(torch.cat(preds), x0, data_range=2.0)
            out[f"psnr_t{t}"], out[f"ssim_t{t}"] = scores["psnr"], scores["ssim"]
    finally:
        G.train(was_training)
    return out


def check_request(metrics: Iterable[str], *, sampler: str, steps: int, num_samples: int, t_values: Sequence[int],
                  num_steps: Optional[int], extractor_path=None, fid_weights=None) -> dict[str, Any]:
    """Validate everything that can be checked before any work; return the feature-extractor record.

    Raises EvalError, or MetricError for missing Inception weights or a missing `frd` extra: nothing is
    downloaded, so this is where an offline run without them stops, before a long generation.
    """
    from dgan.metrics import INCEPTION, resolve_inception_weights  # torch-fidelity: slow to import

    chosen = set(metrics)
    if not chosen or chosen - set(METRICS):
        raise EvalError(f"metrics {sorted(chosen)}: choose from {', '.join(METRICS)}")
    if sampler not in SAMPLERS:
        raise EvalError(f"sampler {sampler!r}: use one of {', '.join(SAMPLERS)}")
    if steps < 1 or (num_steps is not None and steps > num_steps and sampler != "ddpm"):
        raise EvalError(f"--steps {steps}: must be in 1..{num_steps or 'T'}")
    if chosen & {"psnr", "ssim"}:
        # T is unknown before the checkpoint is read (num_steps None): then only the sign is checked.
        bad = [t for t in t_values if t < 0 or (num_steps is not None and t >= num_steps)]
        if not t_values or bad:
            top = num_steps - 1 if num_steps is not None else "T-1"
            raise EvalError(f"--t-values {list(t_values)}: need timesteps in 0..{top}")
    if "frd" in chosen:
        from dgan.metrics import require_frd  # torch-fidelity: slow to import

        require_frd()  # MetricError with the install command when the optional extra is missing
    if chosen & SAMPLE_METRICS and num_samples < 2:
        raise EvalError(f"--num-samples {num_samples}: FID/KID/FRD need at least 2 samples")
    if not chosen & FEATURE_METRICS:
        return {"name": None}
    if extractor_path is not None:
        path = Path(extractor_path).expanduser()
        if not path.is_file():
            raise EvalError(f"--feature-extractor {path}: no such file (a TorchScript module, uint8 NxCxHxW -> NxD)")
        return {"name": "torchscript", "path": str(path.resolve()), "sha256": file_sha256(path)}
    return {"name": INCEPTION, "path": str(resolve_inception_weights(fid_weights))}


@dataclass
class _Evaluation:
    """One evaluation request, and rank 0's reference data (kept out of the broadcasts)."""
    G: torch.nn.Module
    diffusion: Any
    cfg: Any
    chosen: set[str]
    seed: int
    device: torch.device
    extractor_path: Any
    fid_weights: Any
    cache_dir: Any
    batch_size: int
    per_class: bool
    utility_per_class: int
    scores: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    ref: dict[str, Any] = field(default_factory=dict)

    def load(self, reference: str, reference_images: Optional[int], recon_images: int, t_values) -> None:
        """Rank 0, before the long generation, so that data problems fail now."""
        cfg, chosen = self.cfg, self.chosen
        self.ref["real"], self.ref["labels"] = real, labels = load_reference(cfg, reference, reference_images)
        self.ref["key"] = reference_cache_key(cfg, reference, real) if chosen & {"fid", "kid"} else None
        self.info["reference"] = reference_info(cfg, reference, real.shape[0], self.ref["key"])
        if "memorization" in chosen and real.shape[0] < MIN_BASELINE_IMAGES:
            raise EvalError(f"--memorization: the held-out split has {real.shape[0]} images; its baseline needs at "
                            f"least {MIN_BASELINE_IMAGES} (raise --reference-images, or hold out more data)")
        if chosen & {"memorization", "utility"}:  # the training images, as the model saw them
            # uint8, read in chunks: 100k training images never exist as float32 at once
            self.ref["train"], self.ref["train_labels"] = load_reference_u8(cfg, "train")
            self.info["reference"]["train_images"] = int(self.ref["train"].shape[0])
            if "utility" in chosen:
                check_utility_data(self.ref["train_labels"], cfg.model.num_classes, self.utility_per_class)
        if chosen & {"psnr", "ssim"}:
            n = min(recon_images, real.shape[0])
            recon = reconstruction_metrics(self.G, self.diffusion, real[:n], conditioning_labels(cfg, labels[:n]),
                                           t_values, seed=self.seed, batch_size=self.batch_size, device=self.device)
            self.scores.update({k: v for k, v in recon.items() if k.split("_t")[0] in chosen})
            self.info["reference"]["recon_images"] = n

    def score(self, samples: torch.Tensor) -> tuple[dict[str, float], dict[str, Any]]:
        """Rank 0, which holds the samples."""
        real, labels, key, chosen, cfg = self.ref["real"], self.ref["labels"], self.ref["key"], self.chosen, self.cfg
        common = (self.extractor_path, self.fid_weights, self.cache_dir, key, cfg, self.device, self.batch_size)
        if chosen & {"fid", "kid"}:
            self.scores.update(fid_kid_of(real, samples, chosen, *common))
            for c in range(cfg.model.num_classes if self.per_class else 0):
                self.scores.update(class_fid_kid(c, real, labels, samples, chosen, *common))
        if "frd" in chosen:
            from dgan.metrics import frd  # torch-fidelity: slow to import

            self.scores["frd"] = frd(to_uint8(real), samples)  # the reference first: FRD z-scores against it
        if "sharpness" in chosen:
            # 1 = as much fine detail as the data. Why: the adversarial term sharpens every sampler's output
            # by about the same amount, so the best step count is the one that lands near 1, not above it
            # (benchmarks/RESULTS.md, "The term's gain against the sampler's step count").
            reference = edge_energy(to_uint8(real))
            if reference == 0:
                raise EvalError("--sharpness: the reference images are flat (no pixel differs from its neighbours), "
                                "so there is no sharpness to compare with; drop --sharpness")
            self.scores["sharpness"] = edge_energy(samples) / reference
        if chosen & set(AUDIT_METRICS):
            train = self.ref.get("train")
            more, self.ref["artefacts"] = audit_scores(
                chosen, cfg, samples, to_uint8(real), labels, train,
                self.ref.get("train_labels"), extractor_path=self.extractor_path, fid_weights=self.fid_weights,
                device=self.device, seed=self.seed, utility_per_class=self.utility_per_class)
            self.scores.update(more)
        return self.scores, self.info


def run_evaluation(G: torch.nn.Module, diffusion, cfg, *, num_samples: int, sampler: str, steps: int, seed: int,
                   metrics: Iterable[str], device: torch.device, extractor_path=None, fid_weights=None,
                   reference: str = "val", batch_size: int = 64, t_values: Sequence[int] = DEFAULT_T_VALUES,
                   recon_images: int = DEFAULT_RECON_IMAGES, reference_images: Optional[int] = None,
                   cache_dir=None, guidance: float = 1.0, per_class: bool = False,
                   utility_per_class: int = DEFAULT_UTILITY_PER_CLASS, eta: float = 0.0) -> EvalResult:
    """Collective: call on every rank. Metrics and info are broadcast to all ranks; samples (and the
    audit's pictures, `artefacts`) stay on rank 0.
    per_class: also FID/KID of each class's samples against that class's reference images."""
    chosen = set(metrics)
    if per_class and cfg.model.num_classes < 1:
        raise EvalError("--per-class needs a class-conditional model (model.num_classes > 0); this one has none")
    if per_class and not chosen & {"fid", "kid"}:
        raise EvalError("--per-class scores FID/KID per class; add --fid and/or --kid")
    extractor = check_request(chosen, sampler=sampler, steps=steps, num_samples=num_samples, t_values=t_values,
                              num_steps=diffusion.num_steps, extractor_path=extractor_path, fid_weights=fid_weights)
    check_audit_request(chosen, cfg, reference, num_samples, utility_per_class)
    ev = _Evaluation(G, diffusion, cfg, chosen, seed, device, extractor_path, fid_weights, cache_dir, batch_size,
                     per_class, utility_per_class)
    dist.on_main(lambda: ev.load(reference, reference_images, recon_images, t_values))  # an error stops every rank
    samples = ranks = None
    clock = time.perf_counter()
    if chosen & SAMPLE_METRICS:
        samples, ranks = generate_distributed(G, diffusion, cfg, num_samples=num_samples, sampler=sampler,
                                              steps=steps, seed=seed, batch_size=batch_size, device=device,
                                              guidance=guidance, eta=eta)
    ev.info.update(generation_s=round(time.perf_counter() - clock, 3), extractor=extractor,
                   world_size=dist.get_world_size())
    scores, info = dist.on_main(lambda: ev.score(samples))  # every rank gets the numbers, or rank 0's error
    return EvalResult(metrics=scores, info=info, samples=samples, sample_ranks=ranks,
                      artefacts=ev.ref.get("artefacts") or {})


def fid_kid_of(real, samples, chosen, extractor_path, fid_weights, cache_dir, key, cfg, device,
               batch_size) -> dict[str, float]:
    from dgan.metrics import fid_kid  # torch-fidelity: slow to import

    cache = Path(cache_dir) if cache_dir is not None else Path(cfg.log.root) / ".cache" / "fid"
    out = fid_kid(to_uint8(real), samples, extractor_path=extractor_path, fid_weights=fid_weights,
                  cache_dir=cache, real_cache_key=key, device=device, batch_size=batch_size,
                  fid="fid" in chosen, kid="kid" in chosen)
    return out


def class_fid_kid(c: int, real, labels, samples, chosen, extractor_path, fid_weights, cache_dir, key, cfg,
                   device, batch_size) -> dict[str, float]:
    """FID/KID of class c: sample i has label i % K (generate_indices), so class c is samples[c::K]."""
    real_c, fake_c = real[labels == c], samples[c::cfg.model.num_classes]
    if real_c.shape[0] < 2 or fake_c.shape[0] < 2:
        raise EvalError(f"--per-class: class {c} has {real_c.shape[0]} reference image(s) and {fake_c.shape[0]} "
                        "sample(s); need at least 2 of each (raise --num-samples or --reference-images)")
    out = fid_kid_of(real_c, fake_c, chosen, extractor_path, fid_weights, cache_dir, key and f"{key}_c{c}", cfg,
                   device, batch_size)
    return {f"{k}_c{c}": v for k, v in out.items()}


def evaluate_generator(G: torch.nn.Module, diffusion, cfg, *, num_samples: int, sampler: str, steps: int, seed: int,
                       metrics: Iterable[str], extractor_path=None, fid_weights=None, reference: str = "val",
                       device: torch.device, batch_size: int = 64, t_values: Sequence[int] = DEFAULT_T_VALUES,
                       cache_dir=None) -> dict[str, float]:
    """Metrics of generator G (pass the EMA module) as a flat dict, e.g. {"fid", "kid", "kid_std",
    "psnr_t100", "ssim_t100"}.

    Collective: call it on every rank at the same point; every rank gets the same dict. G's train/eval
    mode is restored afterwards and the global RNG streams are not touched (all noise comes from
    seeded generators), so calling it inside a training loop keeps exact resume intact.
    """
    device = torch.device(device)
    # fork_rng: a guarantee rather than a promise; the evaluation draws only from its own generators.
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        return run_evaluation(G, diffusion, cfg, num_samples=num_samples, sampler=sampler, steps=steps, seed=seed,
                              metrics=metrics, device=device, extractor_path=extractor_path, fid_weights=fid_weights,
                              reference=reference, batch_size=batch_size, t_values=t_values,
                              cache_dir=cache_dir).metrics
