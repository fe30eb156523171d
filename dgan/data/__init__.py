"""Data: medical images -> webdataset shards -> DDP-safe training batches.

- `sources`    discovery, pixel conventions, MedMNIST npz, and the patient split
- `readers`    one reader per file format: PNG/JPG/TIFF, DICOM, NIfTI
- `shards`     the writer CLI (`python -m dgan.data.shards`) and manifests
- `shard_sets` shard patterns -> ShardSet, and the built-in sources' cache
- `loader`     `TrainData`: DDP-safe batches from shards
- `build`      `build_train_data` (shards or a built-in source), `build_eval_images` and its
               chunked form `iter_eval_images`
- `transforms` albumentations training augmentation
- `synthetic`  procedural phantoms, the built-in default dataset

The names below are imported on first use, so `python -m dgan.data.shards` does not pay
for (or double-import through) the torch-based loader.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"TrainData": "dgan.data.loader", "build_train_data": "dgan.data.build",
            "build_eval_images": "dgan.data.build", "iter_eval_images": "dgan.data.build",
            "DataError": "dgan.data.sources"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dgan.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
