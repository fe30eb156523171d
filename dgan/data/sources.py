"""Readers that turn a user's medical images into (image array, metadata) records.

One reader per format: PNG/JPG/TIFF (8 and 16 bit), DICOM, NIfTI and MedMNIST-style npz.
Every reader only *reads*: files are opened read-only and nothing in the input folder is
ever written, renamed or touched. A file that cannot be used becomes a `Skipped` record
with a reason, so the shard writer can count and report it instead of dropping it silently.

Stored pixel conventions (what ends up in the shards):
- integer image files keep their bit depth: 8-bit stays uint8, 16-bit stays uint16;
- DICOM and NIfTI carry physical or scanner units, so they are normalised to [0, 1]
  (DICOM: window, else percentiles; NIfTI: per-volume percentiles) and stored as uint16
  so the normalisation loses no precision;
- every image is letterboxed to a square (padded with its minimum value, no distortion,
  no cropped anatomy) and then resized to the target resolution, see `letterbox_resize`.
"""
from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import cv2
import numpy as np

from dgan.errors import DganError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
DICOM_SUFFIXES = (".dcm", ".dicom")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
# Path parts like "patient_012", "sub-07", "case3" identify a patient; users can pass their own.
DEFAULT_PATIENT_REGEX = r"(?i)(?:patient|pat|subject|sub|case)[-_ ]?([A-Za-z0-9]+)"


class DataError(DganError, ValueError):
    """A data problem the user must fix; the message names the path and the fix, on one line."""


class ChannelError(DataError):
    """An image whose channel count cannot be converted to the requested one."""


@dataclass
class SampleMeta:
    source: str                         # path relative to the input (or "file.npz:train[12]")
    label: int = 0
    class_name: str = ""
    original_size: tuple[int, int] = (0, 0)  # (height, width) before any resize
    bit_depth: int = 8                  # of the stored image: 8 or 16
    patient: Optional[str] = None
    series: Optional[str] = None
    index: Optional[int] = None         # slice or frame index inside a volume
    volume: Optional[int] = None        # 4D NIfTI: which 3D volume
    generation: Optional[dict] = None   # synthetic images (dgan.export): checkpoint, sampler, steps, seed

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class Record:
    image: np.ndarray                   # uint8/uint16 HxW or HxWxC (RGB), or float32 in [0, 1]
    meta: SampleMeta


@dataclass
class Skipped:
    reason: str                         # short machine-readable reason, e.g. "corrupt_file"
    source: str
    detail: str = ""


@dataclass
class SourceItem:
    """One discovered input file, before any pixels are decoded."""
    path: Path
    rel: str
    kind: str                           # "image" | "dicom" | "nifti"
    class_name: str = ""
    patient: Optional[str] = None
    series: Optional[str] = None

    @property
    def group(self) -> str:
        # Split unit: the patient when known, else the file itself (so the slices of one
        # volume can never straddle train and val).
        return f"patient:{self.patient}" if self.patient else f"file:{self.rel}"


@dataclass
class ReadOptions:
    channels: int = 1
    window: Optional[tuple[float, float]] = None   # DICOM (center, width); None: header, else percentiles
    percentiles: tuple[float, float] = (0.5, 99.5)
    dicom_norm: str = "auto"            # auto (window if known, else percentiles) | window | percentile
    nifti_axis: int = 2
    min_foreground: float = 0.01        # NIfTI: slices with less foreground than this are empty
    labels: str = "subfolders"          # subfolders | none
    patient_regex: str = DEFAULT_PATIENT_REGEX
    class_to_index: dict[str, int] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------
# Pixel helpers shared by the writer, the loader and the tests


def letterbox_resize(image: np.ndarray, size_px: int) -> np.ndarray:
    """Pad to a square with the image minimum, then resize to size_px x size_px.

    Padding instead of cropping keeps every pixel of the anatomy; the minimum is the
    background in CT/MR/X-ray, so the padding looks like more background. Downscaling
    uses area averaging (no aliasing); upscaling is bilinear. The dtype is preserved.
    """
    h, w = image.shape[:2]
    if h != w:
        side = max(h, w)
        top, left = (side - h) // 2, (side - w) // 2
        pad = [(top, side - h - top), (left, side - w - left)] + [(0, 0)] * (image.ndim - 2)
        image = np.pad(image, pad, mode="constant", constant_values=image.min())
    if image.shape[0] == size_px:
        return np.ascontiguousarray(image)
    interp = cv2.INTER_AREA if image.shape[0] > size_px else cv2.INTER_LINEAR
    out = cv2.resize(image, (size_px, size_px), interpolation=interp)
    return out.reshape(size_px, size_px, *image.shape[2:])


def convert_channels(image: np.ndarray, channels: int, *, bgr: bool = False) -> np.ndarray:
    """Return HxW (channels=1) or HxWx3 RGB (channels=3); raise DataError if impossible.

    Gray+alpha and RGBA lose their alpha; RGB becomes gray by ITU-R 601 luminance.
    `bgr` says the colour input is in OpenCV's BGR order.
    """
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 3 and image.shape[2] == 2:
        image = image[:, :, 0]
    if image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]
    if image.ndim == 2:
        return image if channels == 1 else np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ChannelError(f"cannot convert an image of shape {image.shape} to {channels} channel(s)")
    if channels == 3:
        return np.ascontiguousarray(image[:, :, ::-1]) if bgr else image
    return cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_BGR2GRAY if bgr else cv2.COLOR_RGB2GRAY)


def to_stored(image: np.ndarray, channels: int) -> np.ndarray:
    """Bring a record's image to the stored dtype (uint8 or uint16) and channel count."""
    if image.dtype.kind == "f":
        # normalised modalities: [0, 1] floats keep 16 bits of precision in the shards
        image = np.round(np.clip(image, 0.0, 1.0) * 65535.0).astype(np.uint16)
    elif image.dtype == np.bool_:
        image = image.astype(np.uint8) * 255
    elif image.dtype not in (np.uint8, np.uint16):
        raise DataError(f"unsupported pixel type {image.dtype}; expected 8- or 16-bit integers")
    return convert_channels(image, channels)


def percentile_normalise(values: np.ndarray, percentiles: tuple[float, float]) -> np.ndarray:
    lo, hi = np.percentile(values, percentiles)
    if hi <= lo:
        hi = lo + 1.0  # a constant image maps to 0 instead of dividing by zero
    return np.clip((values.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0)


# ----------------------------------------------------------------------------------------
# Discovery


def file_suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _kind(path: Path) -> Optional[str]:
    suffix = file_suffix(path)
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in DICOM_SUFFIXES:
        return "dicom"
    if suffix in NIFTI_SUFFIXES:
        return "nifti"
    # DICOM exports often have no suffix at all ("IM0001"); the preamble magic tells
    try:
        with open(path, "rb") as fh:
            return "dicom" if fh.read(132)[128:] == b"DICM" else None
    except OSError:
        return None


def patient_from_path(rel: str, regex: str) -> Optional[str]:
    """The first path part (folders first, then the file stem) matching the patient regex."""
    parts = Path(rel).parts
    for part in list(parts[:-1]) + [parts[-1].split(".")[0]]:
        match = re.search(regex, part)
        if match:
            return match.group(1) if match.groups() else match.group(0)
    return None


@dataclass
class Discovery:
    items: list[SourceItem]
    classes: list[str]
    ignored: list[str]        # files that are not images we can read (reported, not silently dropped)


def discover(input_path: Path, opts: ReadOptions) -> Discovery:
    """List the usable files under input_path (sorted), the class names, and the ignored files.

    Class names are the first-level subfolders (labels="subfolders"); files directly in the
    root folder then have no class, which is refused rather than guessed. Hidden files
    (macOS "._x.png" and the like) are not data and are ignored.
    """
    if not input_path.exists():
        raise DataError(f"input not found: {input_path} (pass an existing folder or file to --input)")
    root = input_path if input_path.is_dir() else input_path.parent
    files = sorted(p for p in input_path.rglob("*") if p.is_file()) if input_path.is_dir() else [input_path]
    items, ignored = [], []
    for path in files:
        rel = path.relative_to(root).as_posix()
        if any(part.startswith(".") for part in Path(rel).parts):
            continue
        kind = _kind(path)
        if kind is None:
            ignored.append(rel)
            continue
        parts = Path(rel).parts
        class_name = parts[0] if (opts.labels == "subfolders" and input_path.is_dir() and len(parts) > 1) else ""
        items.append(SourceItem(path, rel, kind, class_name, patient_from_path(rel, opts.patient_regex)))
    if not items:
        raise DataError(f"no PNG/JPG/TIFF/DICOM/NIfTI files under {input_path} "
                        f"(supported suffixes: {', '.join(IMAGE_SUFFIXES + DICOM_SUFFIXES + NIFTI_SUFFIXES)})")
    classes = sorted({it.class_name for it in items if it.class_name})
    if classes and any(not it.class_name for it in items):
        loose = next(it.rel for it in items if not it.class_name)
        raise DataError(f"{input_path}: images both in class subfolders and at the top level (e.g. {loose}); "
                        "move them into a class folder, or pass --labels none")
    return Discovery(items, classes, ignored)


# ----------------------------------------------------------------------------------------
# Readers: each yields Record or Skipped for one input file


# ----------------------------------------------------------------------------------------
# npz (MedMNIST layout)


def read_npz(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images [N,H,W] or [N,H,W,C] and int64 labels [N] of one split of a MedMNIST-style npz."""
    if not path.is_file():
        raise DataError(f"npz file not found: {path} (set data.path to a MedMNIST-style .npz)")
    with open_npz(path) as data:
        key = f"{split}_images"
        if key not in data.files:
            have = sorted({k.rsplit("_", 1)[0] for k in data.files if k.endswith("_images")})
            raise DataError(f"{path}: no '{key}' array; splits in this file: {', '.join(have) or 'none'}")
        images = data[key]
        labels = data[f"{split}_labels"] if f"{split}_labels" in data.files else np.zeros(len(images), np.int64)
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{path}: {split}_labels has shape {labels.shape}; expected [N] or [N,1] "
                        "(multi-label npz files are not supported)")
    return images, labels.astype(np.int64)


def open_npz(path: Path):
    """np.load of an .npz, with a file that is not one (or holds pickled objects) as one DataError line."""
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{path} is not a readable .npz of arrays ({str(e).splitlines()[0][:120]}); "
                        "set data.path to a MedMNIST-style .npz") from None
    if not hasattr(data, "files"):  # a plain .npy passed as data.path
        raise DataError(f"{path} is a single .npy array, not an .npz of named splits; set data.path to a .npz")
    return data


def npz_splits(path: Path) -> list[str]:
    with open_npz(path) as data:
        return [s for s in ("train", "val", "test") if f"{s}_images" in data.files]


# ----------------------------------------------------------------------------------------
# Splitting: patient level, deterministic


def split_items(items: list[SourceItem], val_fraction: float, seed: int, split_by: str) -> dict[str, list[SourceItem]]:
    """Hold out about val_fraction of the files as val, whole groups at a time.

    split_by="patient" groups by patient id (from DICOM or the path) and falls back to the
    file for items without one; split_by="image" groups by file. Either way the slices of a
    volume stay together. The order of each split is shuffled from `seed` so shards mix classes.
    """
    rng = random.Random(seed)
    if val_fraction <= 0:
        train = list(items)
        rng.shuffle(train)
        return {"train": train}
    if not 0 < val_fraction < 1:
        raise DataError(f"--val-fraction {val_fraction}: must be in [0, 1)")
    key = (lambda it: it.group) if split_by == "patient" else (lambda it: f"file:{it.rel}")
    groups: dict[str, list[SourceItem]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    names = sorted(groups)
    rng.shuffle(names)
    target = max(1, round(val_fraction * len(items)))
    val, train = [], []
    for name in names:
        (val if len(val) < target else train).extend(groups[name])
    if not train or not val:
        raise DataError(f"cannot hold out {val_fraction:.0%} at {split_by} level: only {len(groups)} "
                        f"{split_by} group(s); add data, lower --val-fraction, or use --split-by image")
    rng.shuffle(train)
    rng.shuffle(val)
    return {"train": train, "val": val}


def is_inside(child: Path, parent: Path) -> bool:
    child, parent = Path(os.path.realpath(child)), Path(os.path.realpath(parent))
    return child == parent or parent in child.parents
