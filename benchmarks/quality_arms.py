"""benchmarks/quality.py's arms: the built-in ones, how a command defines more, and which overrides
an arm is built with (what the command gives it to train; what its ARM.pt recorded, to sample)."""
from __future__ import annotations

import argparse

# dgan arms: name -> config overrides; "peer" is the diffusers DDPM (peer_ddpm.py). hybrid is the
# shipped recipe as it stands, so the benchmark follows the defaults (RESULTS.md says whose day ran)
ARMS = {"hybrid": [], "diffusion": ["gan.adv_weight=0"]}
PEER = "peer"


def parse_arm(spec: str) -> tuple[str, list[str]]:
    name, _, rest = spec.partition(":")
    if not name or name == PEER:
        raise argparse.ArgumentTypeError(f"--arm {spec!r}: expected 'NAME:key=value ...' with NAME not '{PEER}'")
    return name, rest.replace(";", " ").split()  # ';' too: quality_gpu.sh's EXTRA is split at spaces


def run_overrides(args: argparse.Namespace, arm: str) -> list[str]:
    """The overrides the command gives this arm: --set, then the arm's own."""
    return [*args.set, *args.arm_overrides.get(arm, [])]


def trained_overrides(args: argparse.Namespace, arm: str, record: dict) -> list[str]:
    """The overrides `arm` was trained with, as its ARM.pt (`record`) has them.

    Why not the command's: a sample command that forgot an --arm or --set would rebuild another G or
    another diffusion, silently where the weights still fit (diffusion.prediction, a gan-only
    change). What the command says explicitly (the arm's --arm, any --set) must match the record;
    without it, the record is used as it stands (also for a built-in arm whose recipe has moved on)."""
    stored = record.get("overrides")
    if stored is None:  # an ARM.pt from before the overrides were recorded
        return run_overrides(args, arm)
    # what the command states: its --set, then the arm's --arm (unstated: the record's own part)
    given = [*args.set, *(args.defined[arm] if arm in args.defined else stored[len(args.set):])]
    if given != stored:
        raise SystemExit(f"arm {arm} was trained with {stored}, but this command gives it {given}: "
                         f"leave out --set and --arm {arm}:... (its {arm}.pt records them), or train it again")
    return stored
