"""python -m dgan.export (issue 12): a synthetic dataset as dgan shards (+ DICOM), streamed and
distributed, marked synthetic, with per-sample provenance; the loader reads it back."""
from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import run_cli
from PIL import Image

from dgan.export import sample_arrays
from dgan.runinfo import file_sha256

pytestmark = pytest.mark.slow  # CLI runs


def checkpoint_of(run: Path) -> Path:
    return sorted((run / "checkpoints").glob("ckpt-0*.pt"))[-1]


def pngs_by_index(out: Path) -> dict[int, np.ndarray]:
    """index -> image, read from the tars through provenance.jsonl (key -> index)."""
    index = {}
    for line in (out / "provenance.jsonl").read_text().splitlines():
        row = json.loads(line)
        index[row["key"]] = row["index"]
    images = {}
    for tar in sorted(out.glob("train-*.tar")):
        with tarfile.open(tar) as t:
            for member in t.getmembers():
                if member.name.endswith(".png"):
                    key = member.name[:-4]
                    images[index[key]] = np.asarray(Image.open(io.BytesIO(t.extractfile(member).read())))
    return images


def test_export_writes_a_marked_streamed_shard_set_with_dicom(tiny_run_dir, tmp_path):
    from dgan.data import build_train_data
    from data_helpers import data_cfg

    ckpt, out = checkpoint_of(tiny_run_dir), tmp_path / "synthetic"
    cmd = [sys.executable, "-m", "dgan.export", "--checkpoint", str(ckpt), "--num-samples", "40", "--out", str(out),
           "--steps", "3", "--batch-size", "16", "--maxcount", "16", "--dicom"]
    r = run_cli(cmd)
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    src = manifest["source"]
    assert src["kind"] == "synthetic" and src["checkpoint_sha256"] == file_sha256(ckpt) and src["steps"] == 3
    assert manifest["splits"]["train"]["count"] == 40 and len(manifest["splits"]["train"]["shards"]) == 3
    rows = [json.loads(line) for line in (out / "provenance.jsonl").read_text().splitlines()]
    assert sorted(row["index"] for row in rows) == list(range(40))
    assert all(row["generation"]["seed"] == 0 and row["generation"]["sampler"] == "ddim" for row in rows)
    data = build_train_data(data_cfg(shards=str(out / "train-*.tar")), image_size=32, channels=1, batch_size=8,
                            seed=0, rank=0, world_size=1)
    assert sum(x.shape[0] for x, _ in data.epoch(0)) == 40  # dgan reads it as training data

    import pydicom
    images = pngs_by_index(out)
    files = sorted((out / "dicom").glob("*.dcm"))
    assert len(files) == 40
    ds = pydicom.dcmread(files[7])
    assert str(ds.PatientName) == "SYNTHETIC^DGAN" and "SYNTHETIC" in ds.ImageType and ds.ConversionType == "SYN"
    assert np.array_equal(ds.pixel_array, images[7])
    # nothing is overwritten: a second export into the same folder stops in one line
    before = (out / "manifest.json").read_bytes()
    again = run_cli(cmd)
    assert again.returncode == 2 and "exists" in again.stderr and (out / "manifest.json").read_bytes() == before


def test_two_ranks_export_the_same_images_as_one(tiny_run_dir, tmp_path):
    ckpt = checkpoint_of(tiny_run_dir)
    common = ["-m", "dgan.export", "--checkpoint", str(ckpt), "--num-samples", "12", "--steps", "3", "--batch-size", "4"]
    one = run_cli([sys.executable, *common, "--out", str(tmp_path / "one")])
    two = run_cli([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *common,
                   "--out", str(tmp_path / "two")])
    assert one.returncode == 0 and two.returncode == 0, (one.stderr + two.stderr)[-3000:]
    a, b = pngs_by_index(tmp_path / "one"), pngs_by_index(tmp_path / "two")
    assert sorted(a) == sorted(b) == list(range(12))
    # float rounding between batch compositions may move a pixel by one grey level, no more
    assert all(np.abs(a[i].astype(int) - b[i].astype(int)).max() <= 1 for i in a)


def test_sixteen_bit_stays_sixteen_bit():
    x = torch.linspace(-1, 1, 2 * 1 * 4 * 4).reshape(2, 1, 4, 4)
    v16, v8 = sample_arrays(x, 16), sample_arrays(x, 8)
    assert v16.dtype == np.uint16 and v16.shape == (2, 4, 4) and v16.max() == 65535 and v16.min() == 0
    assert v8.dtype == np.uint8 and len(np.unique(v16)) == 32
