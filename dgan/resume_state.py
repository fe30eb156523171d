"""What a resume restores besides the weights, and the check that a checkpoint fits the config:
the Python/numpy/torch/CUDA RNG streams (as tensors and ints, so that weights_only loading keeps
working), strict state-dict loading with a one-line summary of a mismatch, and the comparison of
a checkpoint's config with the current one (architecture keys must match, recipe changes are named)."""
from __future__ import annotations

import json
import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dgan.checkpoint import CheckpointError
from dgan.errors import one_line


def capture_rng_state(device: torch.device | None = None) -> dict:
    """Python, numpy, torch and (if present) CUDA RNG states, all loadable with weights_only=True."""
    name, key, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        # A tuple of ints (and None) round-trips through the weights_only unpickler unchanged.
        "python": random.getstate(),
        # numpy's key is an ndarray, which weights_only refuses; int64 holds every uint32 exactly.
        "numpy": {"bit_generator": name, "key": torch.from_numpy(key.astype(np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        index = device.index if device is not None and device.type == "cuda" else None
        state["cuda"] = torch.cuda.get_rng_state(index if index is not None else "cuda")
    return state


def restore_rng_state(state: Mapping[str, Any], device: torch.device | None = None) -> None:
    """Inverse of capture_rng_state. A saved CUDA state is ignored when resuming on CPU."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))  # tolerate lists from other serialisers
    np_state = state["numpy"]
    key = np.asarray(torch.as_tensor(np_state["key"]).cpu().numpy(), dtype=np.uint32)
    np.random.set_state((np_state["bit_generator"], key, int(np_state["pos"]),
                         int(np_state["has_gauss"]), float(np_state["cached_gaussian"])))
    torch.set_rng_state(torch.as_tensor(state["torch"]).cpu())
    if "cuda" in state and torch.cuda.is_available():
        index = device.index if device is not None and device.type == "cuda" else None
        torch.cuda.set_rng_state(torch.as_tensor(state["cuda"]).cpu(), index if index is not None else "cuda")


_MISSING = object()


def _lookup(config: Mapping[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _normalise(value: Any) -> Any:
    # YAML gives lists, dataclasses.asdict may give tuples: [1, 2] and (1, 2) are the same config.
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    return value


def _fmt(value: Any) -> str:
    if value is _MISSING:
        return "<not set>"
    if isinstance(value, list):
        return json.dumps(value, separators=(",", ":"))  # no spaces: pastes as one shell word
    return "null" if value is None else str(value)


def check_compatible(saved: Mapping[str, Any], current: Mapping[str, Any], keys: list[str],
                     saved_config: str = "runs/<run>/config.yaml") -> None:
    """Raise one CheckpointError listing every dotted key whose value differs between configs."""
    mismatches, overrides = [], []
    for key in keys:
        old, new = _normalise(_lookup(saved, key)), _normalise(_lookup(current, key))
        if old is _MISSING and new is _MISSING or old == new:
            continue
        mismatches.append(f"{key}: checkpoint has {_fmt(old)}, config has {_fmt(new)}")
        if old is not _MISSING:
            overrides.append(f"{key}={_fmt(old)}")
    if mismatches:
        hint = f" or the overrides {' '.join(overrides)}" if overrides else ""
        raise CheckpointError(
            "checkpoint does not match the config: " + "; ".join(mismatches)
            + f" -- pass the checkpoint's config (--config {saved_config}){hint}"
        )


# Keys a resume may change without changing what is trained: the run's length, where it runs and
# reads its data, how it saves. log.* and eval.* are all of that kind, so only these sections count.
RECIPE_SECTIONS = ("model", "diffusion", "gan", "data", "train")
RUN_CONTROL_KEYS = frozenset({
    "model.encoder_weights", "model.encoder_weights_path", "model.channels_last", "model.compile",
    "data.path", "data.shards", "data.val_shards", "data.cache_dir", "data.num_workers",
    "train.total_kimg", "train.device", "train.threads", "train.resume", "train.ckpt_every_kimg",
    "train.ckpt_every_min", "train.keep_last", "train.max_skipped_steps"})


def recipe_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """'key=old (now new)' for every recipe key whose value a resume changes.

    Why: a resume trains with the current config, which may differ from the checkpoint's on purpose
    (a lower lr) or by accident (a default that changed between dgan versions, or a forgotten
    override). Either is allowed, but never silently. `saved` should carry the legacy defaults, so
    that a key the checkpoint predates compares as what it meant then."""
    changes = []
    for section in RECIPE_SECTIONS:
        for key, value in current.get(section, {}).items():
            dotted = f"{section}.{key}"
            old, new = _normalise(_lookup(saved, dotted)), _normalise(value)
            if dotted not in RUN_CONTROL_KEYS and old is not _MISSING and old != new:
                changes.append(f"{dotted}={_fmt(old)} (now {_fmt(new)})")
    return changes


_SIZE_RE = re.compile(r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[.*?\])\) "
                      r"from checkpoint, the shape in current model is torch\.Size\((\[.*?\])\)")


def _summarise_keys(label: str, line: str) -> str:
    keys = re.findall(r'"([^"]+)"', line)
    more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
    return f"{label} {', '.join(keys[:3])}{more}"


def _summarise_load_error(message: str) -> str:
    parts, sizes = [], []
    for raw in message.splitlines()[1:]:
        line = raw.strip()
        size = _SIZE_RE.search(line)
        if size:
            sizes.append(f"{size.group(1)} is {size.group(2)} in the checkpoint but {size.group(3)} in the model")
        elif line.startswith("Missing key(s)"):
            parts.append(_summarise_keys("missing keys", line))
        elif line.startswith("Unexpected key(s)"):
            parts.append(_summarise_keys("unexpected keys", line))
            if re.search(r'"(module|_orig_mod)\.', line):
                parts.append("keys carry a DDP/compile prefix: save the unwrapped module")
        elif line:
            parts.append(one_line(RuntimeError(line), 120))
    if sizes:
        more = f" (+{len(sizes) - 3} more size mismatches)" if len(sizes) > 3 else ""
        parts.insert(0, "; ".join(sizes[:3]) + more)
    return "; ".join(parts) or one_line(RuntimeError(message))


def load_state_dict_strict(module: torch.nn.Module, sd: Mapping[str, Any], what: str, path: str | Path) -> None:
    """module.load_state_dict(strict=True), with key/shape errors as one line naming `what` and `path`."""
    try:
        module.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        if "Error(s) in loading state_dict" not in str(e):
            raise
        raise CheckpointError(
            f"{what} in {path} does not fit the model: {_summarise_load_error(str(e))} -- the checkpoint "
            "was made with another model config; pass its config (--config runs/<run>/config.yaml)"
        ) from None
