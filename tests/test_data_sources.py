"""Round trips: real files -> `python -m dgan.data.shards` -> real tar shards -> loader -> source pixels."""
from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from data_helpers import data_cfg, tree_digest
from dgan.data import DataError, build_eval_images, build_train_data, iter_eval_images
from dgan.data.shards import main as shards_main

NPZ = Path(__file__).resolve().parents[2] / "shared" / "data" / "pneumoniamnist.npz"


def stated_resize(img: np.ndarray, size: int) -> np.ndarray:
    """The documented resize, written out independently: pad to square with the minimum, area/bilinear."""
    h, w = img.shape[:2]
    side = max(h, w)
    canvas = np.full((side, side) + img.shape[2:], img.min(), img.dtype)
    canvas[(side - h) // 2:(side - h) // 2 + h, (side - w) // 2:(side - w) // 2 + w] = img
    if side == size:
        return canvas
    return cv2.resize(canvas, (size, size), interpolation=cv2.INTER_AREA if side > size else cv2.INTER_LINEAR)


def loader_pixels(out: Path, size: int, *, bits: int = 8, split: str = "train", channels: int = 1) -> Counter:
    """Every training sample once (batch 1, one rank), as a multiset of (integer pixels, label)."""
    cfg = data_cfg(shards=str(out / f"{split}-*.tar"), shuffle_buffer=8)
    data = build_train_data(cfg, image_size=size, channels=channels, batch_size=1, seed=0, rank=0, world_size=1)
    scale = 2 ** bits - 1
    got = Counter()
    for x, y in data.epoch(0):
        assert x.dtype.is_floating_point and -1.0 <= x.min() and x.max() <= 1.0
        ints = np.rint((x[0].numpy() + 1.0) / 2.0 * scale).astype(np.int64)
        got[(ints.tobytes(), int(y[0]))] += 1
    assert data.skipped() == {}
    return got


def key(img: np.ndarray, label: int, channels: int = 1) -> tuple[bytes, int]:
    arr = img.astype(np.int64)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    assert arr.shape[0] == channels
    return arr.tobytes(), label


def convert(src: Path, out: Path, *args: str) -> dict:
    assert shards_main(["--input", str(src), "--output", str(out), "--no-progress", *args]) == 0
    return json.loads((out / "manifest.json").read_text())


def test_png_folder_two_classes(tmp_path):
    src = tmp_path / "input"
    rng = np.random.default_rng(0)
    expected = Counter()
    for label, name in enumerate(["benign", "malignant"]):
        (src / name).mkdir(parents=True)
        for i in range(3):
            shape = (20, 20) if i < 2 else (14, 20)  # one non-square image: letterboxed
            img = rng.integers(0, 256, shape, dtype=np.uint8)
            Image.fromarray(img).save(src / name / f"img{i}.png")
            expected[key(stated_resize(img, 16), label)] += 1
    rgb = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(src / "malignant" / "colour.jpg", quality=100)
    decoded = np.asarray(Image.open(src / "malignant" / "colour.jpg").convert("L"))
    before = tree_digest(src)
    manifest = convert(src, tmp_path / "out", "--resolution", "16")
    assert tree_digest(src) == before, "the input folder was modified"
    assert manifest["classes"] == ["benign", "malignant"]
    assert manifest["splits"]["train"]["count"] == 7 and manifest["splits"]["train"]["classes"] == {"0": 3, "1": 4}
    got = loader_pixels(tmp_path / "out", 16)
    jpg = [k for k in got if k not in expected]
    assert got - Counter({jpg[0]: 1}) == expected and len(jpg) == 1
    # the JPEG went to gray by luminance; allow PIL's and OpenCV's rounding to differ by 1
    jpg_pixels = np.frombuffer(jpg[0][0], np.int64).reshape(16, 16)
    assert np.abs(jpg_pixels - decoded.astype(np.int64)).max() <= 1 and jpg[0][1] == 1


def test_tiff_16bit_keeps_precision(tmp_path):
    import tifffile

    src = tmp_path / "input"
    src.mkdir()
    img = np.random.default_rng(1).integers(0, 65536, (24, 24), dtype=np.uint16)
    tifffile.imwrite(src / "scan.tif", img)
    manifest = convert(src, tmp_path / "out", "--resolution", "12")
    assert manifest["splits"]["train"]["bit_depths"] == {"16": 1}
    expected = Counter({key(stated_resize(img, 12), 0): 1})
    assert loader_pixels(tmp_path / "out", 12, bits=16) == expected
    # 8-bit would have lost this: the stored values are not multiples of 257
    assert np.any(stated_resize(img, 12) % 257 != 0)


def dicom_expected(name: str, window: tuple[float, float] | None, size: int) -> np.ndarray:
    """Rescale slope/intercept, then the window (given, else the header's, else percentiles), as uint16."""
    import pydicom
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file(name))
    values = ds.pixel_array.astype(np.float64) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    if window is None and "WindowCenter" in ds:
        window = (float(ds.WindowCenter), float(ds.WindowWidth))
    if window is not None:
        unit = np.clip((values - (window[0] - window[1] / 2)) / window[1], 0, 1)
    else:
        lo, hi = np.percentile(values, (0.5, 99.5))
        unit = np.clip((values - lo) / (hi - lo), 0, 1)
    return stated_resize(np.round(unit.astype(np.float32) * 65535).astype(np.uint16), size)


def test_dicom_ct_and_mr(tmp_path):
    from pydicom.data import get_testdata_file

    src = tmp_path / "input"
    for name in ("CT_small.dcm", "MR_small.dcm"):
        (src / name[:2]).mkdir(parents=True)
        # exports often have no suffix: MR goes in as "IM0001", found by its DICM magic
        shutil.copy(get_testdata_file(name), src / name[:2] / (name if name.startswith("CT") else "IM0001"))
    # MR_small has a header window (600/1600); CT_small has none, so percentiles
    manifest = convert(src, tmp_path / "out", "--resolution", "64")
    assert manifest["splits"]["train"]["patients"] == 2 and manifest["classes"] == ["CT", "MR"]
    expected = Counter({key(dicom_expected("CT_small.dcm", None, 64), 0): 1,
                        key(dicom_expected("MR_small.dcm", None, 64), 1): 1})
    assert _close(loader_pixels(tmp_path / "out", 64, bits=16), expected, tol=1)
    # an explicit soft-tissue window in HU only matches if the intercept (-1024) was applied
    convert(src / "CT", tmp_path / "out_w", "--resolution", "32", "--window", "40,400")
    expected = Counter({key(dicom_expected("CT_small.dcm", (40.0, 400.0), 32), 0): 1})
    assert _close(loader_pixels(tmp_path / "out_w", 32, bits=16), expected, tol=1)


def _close(got: Counter, expected: Counter, tol: int) -> bool:
    """Same multiset up to `tol` per pixel (float32 vs float64 windowing may round differently)."""
    assert sum(got.values()) == sum(expected.values())
    for (pixels, label), _ in expected.items():
        want = np.frombuffer(pixels, np.int64)
        assert any(lab == label and np.abs(np.frombuffer(p, np.int64) - want).max() <= tol for p, lab in got), \
            f"no loader image matches a label-{label} source image"
    return True


def test_nifti_slices_and_empty_slices(tmp_path):
    import nibabel as nib
    from nibabel.testing import data_path

    src = tmp_path / "input"
    src.mkdir()
    shutil.copy(Path(data_path) / "anatomical.nii", src / "sub-01_T1w.nii")
    # a blank band at the start of the volume must be skipped, not written
    img = nib.load(str(src / "sub-01_T1w.nii"))
    vol = np.asarray(nib.as_closest_canonical(img).dataobj, dtype=np.float32)
    vol[:, :, :3] = vol.min()
    nib.save(nib.Nifti1Image(vol, nib.as_closest_canonical(img).affine), str(src / "sub-01_T1w.nii"))
    lo, hi = np.percentile(vol, (0.5, 99.5))
    unit = np.clip((vol - lo) / (hi - lo), 0, 1)
    expected = Counter()
    for z in range(vol.shape[2]):
        plane = unit[:, :, z]
        if (plane > 0.05).mean() >= 0.01:
            stored = np.round(np.flipud(plane.T) * 65535).astype(np.uint16)
            expected[key(stated_resize(stored, 32), 0)] += 1
    manifest = convert(src, tmp_path / "out", "--resolution", "32", "--axis", "2")
    assert manifest["skipped"].get("empty_slice", 0) >= 3
    assert manifest["splits"]["train"]["count"] == sum(expected.values()) == vol.shape[2] - manifest["skipped"]["empty_slice"]
    got = loader_pixels(tmp_path / "out", 32, bits=16)
    assert _close(got, expected, tol=1)
    patients = {json.loads(line).get("patient") for line in (tmp_path / "out" / "provenance.jsonl").open()}
    assert patients == {"01"}


def test_shared_npz_through_builtin_cache(tmp_path):
    with np.load(NPZ) as data:
        images, labels = data["train_images"], data["train_labels"][:, 0]
    cfg = data_cfg(source="npz", path=str(NPZ), cache_dir=str(tmp_path / "cache"), shuffle_buffer=64)
    data = build_train_data(cfg, image_size=28, channels=1, batch_size=1, seed=0, rank=0, world_size=1)
    assert data.batches_per_epoch == len(images) == 3882
    assert data.manifest["splits"]["train"]["classes"] == {"0": int((labels == 0).sum()), "1": int((labels == 1).sum())}
    got = Counter()
    for x, y in data.epoch(0):
        got[(np.rint((x[0, 0].numpy() + 1) / 2 * 255).astype(np.uint8).tobytes(), int(y[0]))] += 1
    assert got == Counter((img.tobytes(), int(lab)) for img, lab in zip(images, labels))
    # evaluation reads the val split with the same preprocessing (here at 32 px: resized)
    ex, ey = build_eval_images(cfg, image_size=32, channels=3, split="val", max_images=50)
    assert ex.shape == (50, 3, 32, 32) and ey.shape == (50,) and torch_equal_channels(ex)


def torch_equal_channels(x) -> bool:
    return bool((x[:, 0] == x[:, 1]).all() and (x[:, 1] == x[:, 2]).all())


def test_npz_cli_writes_its_own_splits(tmp_path):
    src = tmp_path / "tiny.npz"
    rng = np.random.default_rng(3)
    arrays = {f"{s}_images": rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for s, n in (("train", 9), ("val", 4))}
    arrays.update({f"{s}_labels": rng.integers(0, 2, (n, 1)) for s, n in (("train", 9), ("val", 4))})
    np.savez(src, **arrays)
    manifest = convert(src, tmp_path / "out", "--resolution", "28")
    assert {s: v["count"] for s, v in manifest["splits"].items()} == {"train": 9, "val": 4}
    cfg = data_cfg(shards=str(tmp_path / "out" / "train-*.tar"), val_shards=str(tmp_path / "out" / "val-*.tar"))
    vx, vy = build_eval_images(cfg, image_size=28, channels=1, split="val")
    got = Counter((np.rint((x[0].numpy() + 1) / 2 * 255).astype(np.uint8).tobytes(), int(y)) for x, y in zip(vx, vy))
    assert got == Counter((img.tobytes(), int(lab)) for img, lab in zip(arrays["val_images"], arrays["val_labels"][:, 0]))
    # the chunked read (how the audit loads 100k training images) is the same images, in order,
    # from shards and from the npz itself, with a chunk border inside the set and at its end
    npz_cfg = data_cfg(source="npz", path=str(src))
    for source_cfg, split, n in ((cfg, "val", 4), (cfg, "train", 9), (npz_cfg, "train", 9)):
        whole_x, whole_y = build_eval_images(source_cfg, image_size=28, channels=1, split=split)
        parts = list(iter_eval_images(source_cfg, image_size=28, channels=1, split=split, chunk=4))
        assert [len(x) for x, _ in parts] == [4] * (n // 4) + [n % 4] * (n % 4 > 0)
        assert torch.equal(torch.cat([x for x, _ in parts]), whole_x)
        assert torch.equal(torch.cat([y for _, y in parts]), whole_y)
    three = list(iter_eval_images(npz_cfg, image_size=28, channels=1, split="train", max_images=6, chunk=4))
    assert [len(x) for x, _ in three] == [4, 2]


def test_patient_split_never_leaks(tmp_path):
    src = tmp_path / "input"
    for p in range(12):
        folder = src / ("sick" if p % 3 == 0 else "healthy") / f"patient_{p:02d}"
        folder.mkdir(parents=True)
        for i in range(1 + p % 4):  # patients with 1 to 4 images each
            img = np.full((16, 16), 10 * p + i, np.uint8)
            Image.fromarray(img).save(folder / f"view{i}.png")
    manifest = convert(src, tmp_path / "out", "--resolution", "16", "--val-fraction", "0.3",
                       "--split-by", "patient", "--seed", "5")
    assert manifest["splits"]["val"]["count"] > 0 and manifest["splits"]["train"]["count"] > 0
    cfg = data_cfg(shards=str(tmp_path / "out" / "train-*.tar"), val_shards=str(tmp_path / "out" / "val-*.tar"))
    patients = {}
    for split in ("train", "val"):
        x, _ = build_eval_images(cfg, image_size=16, channels=1, split=split)
        values = np.rint((x[:, 0, 0, 0].numpy() + 1) / 2 * 255).astype(int)
        patients[split] = {v // 10 for v in values}
    assert not patients["train"] & patients["val"], "a patient is in both train and val"
    assert patients["train"] | patients["val"] == set(range(12))
    # provenance tells the same story
    rows = [json.loads(line) for line in (tmp_path / "out" / "provenance.jsonl").open()]
    by_split = {s: {r["patient"] for r in rows if r["split"] == s} for s in ("train", "val")}
    assert not by_split["train"] & by_split["val"] and len(by_split["train"] | by_split["val"]) == 12


def test_bad_inputs_are_skipped_counted_and_reported(tmp_path, capsys):
    import tifffile

    src = tmp_path / "input"
    src.mkdir()
    Image.fromarray(np.zeros((16, 16), np.uint8) + 50).save(src / "good.png")
    (src / "empty.png").write_bytes(b"")
    (src / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    tifffile.imwrite(src / "five.tif", np.zeros((8, 8, 5), np.uint8), planarconfig="contig", photometric="minisblack")
    (src / "notes.txt").write_text("not an image: ignored, and listed as such")
    before = tree_digest(src)
    manifest = convert(src, tmp_path / "out", "--resolution", "16")
    assert tree_digest(src) == before
    assert manifest["splits"]["train"]["count"] == 1
    assert sum(manifest["skipped"].values()) == 3
    assert manifest["skipped"]["empty_file"] == 1 and manifest["skipped"]["corrupt_file"] == 1
    reasons = {e["source"]: e["reason"] for e in manifest["skipped_files"]}
    assert reasons == {"empty.png": "empty_file", "garbage.png": "corrupt_file", "five.tif": "bad_channels"}
    assert manifest["source"]["ignored_files"] == ["notes.txt"]
    out = capsys.readouterr().out
    assert "skipped: 3" in out and "empty.png" in out and "garbage.png" in out and "notes.txt" in out


def test_colour_images_in_a_grayscale_set_are_named_not_converted_silently(tmp_path, capsys):
    # issue 11, bug 7: an RGB image in a grayscale folder was converted without a word
    src = tmp_path / "input"
    src.mkdir()
    grey = np.full((8, 8, 3), 90, np.uint8)  # grey stored as RGB: nothing is lost, nothing to say
    colour = np.zeros((8, 8, 3), np.uint8)
    colour[..., 0] = 200
    Image.fromarray(grey).save(src / "grey.png")
    Image.fromarray(colour).save(src / "red.png")
    assert shards_main(["--input", str(src), "--output", str(tmp_path / "out"), "--resolution", "8"]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["colour_to_gray"] == ["red.png"]
    out = capsys.readouterr().out
    assert "converted to grayscale: 1 colour image(s)" in out and "red.png" in out


def test_cli_fails_when_every_input_was_skipped(tmp_path, capsys):
    # issue 11, bug 7: exit 0 after writing 0 images
    src = tmp_path / "input"
    src.mkdir()
    (src / "empty.png").write_bytes(b"")
    (src / "garbage.png").write_bytes(b"not a png")
    assert shards_main(["--input", str(src), "--output", str(tmp_path / "out"), "--resolution", "8"]) == 1
    captured = capsys.readouterr()
    assert "skipped: 2" in captured.out and "no image was written" in captured.err


def test_cli_refuses_output_inside_input_and_existing_output(tmp_path, capsys):
    src = tmp_path / "input"
    src.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(src / "a.png")
    before = tree_digest(src)
    assert shards_main(["--input", str(src), "--output", str(src / "shards"), "--resolution", "8"]) == 2
    assert "inside --input" in capsys.readouterr().err and tree_digest(src) == before
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert shards_main(["--input", str(src), "--output", str(tmp_path / "full"), "--resolution", "8"]) == 2
    assert "not empty" in capsys.readouterr().err and (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert shards_main(["--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o"), "--resolution", "8"]) == 2
    assert str(tmp_path / "nope") in capsys.readouterr().err
    with pytest.raises(DataError, match="no PNG/JPG"):
        from dgan.data.sources import ReadOptions, discover
        (tmp_path / "txt").mkdir()
        (tmp_path / "txt" / "a.txt").write_text("x")
        discover(tmp_path / "txt", ReadOptions())
