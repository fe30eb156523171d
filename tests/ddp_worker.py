"""Run by tests/test_ddp.py under torchrun: the Trainer's own build and step
for a few steps, then every rank writes its state to a file, so the test can compare the
ranks bit for bit (a checkpoint only ever holds rank 0's).

    torchrun --standalone --nproc_per_node=2 tests/ddp_worker.py OUT STEPS SPEC_JSON

SPEC_JSON maps a variant name to its config overrides; each variant is trained from scratch
in the same process group. Last, the ranks check that a stop signal seen by one rank alone
is agreed on by all of them.
"""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch

from dgan import distributed as dist
from dgan.config import load_config
from dgan.stopping import StopFlag
from dgan.trainer import Trainer


def run_variant(spec: list[str], steps: int, device: torch.device) -> dict:
    """`spec`: config overrides, plus optionally `poison_rank1_step=K` (rank 1 alone gets a
    NaN image at step K: every rank must skip that step)."""
    poison = [int(o.split("=")[1]) for o in spec if o.startswith("poison_rank1_step=")]
    cfg = load_config(None, [o for o in spec if not o.startswith("poison_rank1_step=")])
    trainer = Trainer.build(cfg, device)
    tr, ema, state = trainer.tr, trainer.ema, trainer.state
    init_g = {k: v.clone() for k, v in tr.G_raw.state_dict().items()}
    stream = trainer.batches()
    first_x, channels_last, skipped = None, [], []
    for step in range(steps):
        micro = trainer.next_micro_batches(stream)
        first_x = micro[0][0].clone() if first_x is None else first_x
        channels_last.append(all(x.is_contiguous(memory_format=torch.channels_last) for x, _ in micro))
        if step in poison and dist.get_rank() == 1:
            micro[0][0][0] = float("nan")
        skipped.append(float(trainer.step(micro)["skipped"]))
    return {"G": tr.G_raw.state_dict(), "D": tr.D_raw.state_dict(), "ema": ema.state_dict(),
            "ada": tr.ada.state_dict(), "init_G": init_g, "first_x": first_x, "channels_last": channels_last,
            "wrapped": type(tr.G).__name__, "images_seen": state.images_seen, "skipped": skipped,
            "opt_g_steps": [int(s["step"]) for s in tr.opt_g.state_dict()["state"].values()][:1]}


def stop_agreement() -> dict:
    """Only rank 1 gets SIGUSR1; the per-step flag all-reduce must stop every rank."""
    stop = StopFlag()
    if dist.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGUSR1)  # the handler runs before kill() returns to python
    local = stop.signum is not None
    (agreed,) = dist.any_rank_flags([local])
    return {"local": local, "agreed": agreed}


def main() -> None:
    out, steps, spec = Path(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
    device = dist.init("cpu")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    for name, overrides in spec.items():
        torch.save(run_variant(overrides, steps, device), out / f"{name}-rank{rank}.pt")
    (out / f"stop-rank{rank}.json").write_text(json.dumps(stop_agreement()))
    dist.barrier()
    dist.shutdown()


if __name__ == "__main__":
    main()
