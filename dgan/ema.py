"""Exponential moving average of G, via torch.optim.swa_utils (DESIGN.md: sample with EMA).

The decay comes from a half-life counted in images (EDM's convention), so it does not
change when the batch size or world size does. Early in training the half-life is capped at
`rampup * images_seen`, so the average is not dominated by the random initial weights.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


class EMA(nn.Module):
    def __init__(self, model: nn.Module, *, halflife_kimg: float, rampup: float | None = 0.05) -> None:
        super().__init__()
        self.halflife_images = halflife_kimg * 1000
        self.rampup = rampup
        self.beta = 0.0  # set before every update; read by the averaging function below
        self.averaged = AveragedModel(model, multi_avg_fn=self._lerp, use_buffers=True)
        # AveragedModel tests `n_averaged == 0` on the host every update; keeping that one
        # counter on the CPU makes the test free instead of a CUDA sync per step.
        self.averaged.n_averaged = self.averaged.n_averaged.cpu()
        self.averaged.requires_grad_(False)

    def _lerp(self, avg: list[torch.Tensor], current: list[torch.Tensor], num_averaged) -> None:
        # Integer buffers (e.g. BatchNorm counters) cannot be lerped; copy them.
        floats = [(a, c) for a, c in zip(avg, current) if a.is_floating_point()]
        if floats:
            torch._foreach_lerp_([a for a, _ in floats], [c for _, c in floats], 1.0 - self.beta)
        for a, c in zip(avg, current):
            if not a.is_floating_point():
                a.copy_(c)

    def decay(self, images_seen: int, batch_images: int) -> float:
        halflife = self.halflife_images
        if self.rampup is not None:
            halflife = min(halflife, images_seen * self.rampup)
        return 0.5 ** (batch_images / max(halflife, 1e-8))

    @torch.no_grad()
    def update(self, model: nn.Module, *, images_seen: int, batch_images: int) -> None:
        """Call on every rank after every optimizer step: the ranks' G are identical (DDP), so
        their EMAs stay identical too, and any rank can sample or evaluate with its own."""
        self.beta = self.decay(images_seen, batch_images)
        if int(self.averaged.n_averaged) == 0:  # a CPU counter: reading it costs no sync
            self.averaged.update_parameters(model)  # the first update copies G
            return
        # Later updates run the same multi-avg fn that AveragedModel.update_parameters would,
        # minus its `n_averaged.to(device)`: a blocking host->device copy, i.e. one CUDA
        # stream sync per training step. Same tensors, same order (parameters, then buffers).
        avg = [*self.averaged.module.parameters(), *self.averaged.module.buffers()]
        cur = [t.detach() for t in (*model.parameters(), *model.buffers())]
        if len(avg) != len(cur):
            raise ValueError(f"EMA holds {len(avg)} tensors but the model has {len(cur)}: not the same architecture")
        self._lerp(avg, cur, self.averaged.n_averaged)
        self.averaged.n_averaged += 1

    @property
    def module(self) -> nn.Module:
        """The averaged generator, for sampling and evaluation."""
        return self.averaged.module

    def state_dict(self, *args, **kwargs):
        return self.averaged.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        out = self.averaged.load_state_dict(state_dict, strict=strict)
        self.averaged.n_averaged = self.averaged.n_averaged.cpu()
        return out
