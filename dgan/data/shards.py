"""Write medical images to webdataset tar shards, with a manifest; and read manifests back.

CLI:
    python -m dgan.data.shards --input DIR_OR_FILE --output shards/ --resolution 128 \
        [--val-fraction 0.1 --split-by patient --channels 1 --seed 0 --maxcount 2000]

Layout of the output folder (written to a temporary sibling first, then renamed, so a
killed conversion never leaves a half-written output):
    train-000000.tar ...   samples: <key>.png (8- or 16-bit) and <key>.cls (label)
    val-000000.tar ...     only with --val-fraction > 0 (or an npz with a val split)
    provenance.jsonl       one line per sample: key, split, shard, source file, patient, series,
                           original size, bit depth (kept out of the tars: the loader reads
                           fewer tar members per sample, which is most of its cost at 32 px)
    manifest.json          counts per split/class/shard, resolution, channels, source, content hash,
                           and every skipped input with its reason

The input is only read. The output may not lie inside the input folder.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Union

import cv2
import numpy as np

from dgan.atomic import write_text_atomic
from dgan.data.readers import read_item
from dgan.data.sources import (
    ChannelError,
    DataError,
    ReadOptions,
    Record,
    SampleMeta,
    Skipped,
    discover,
    is_inside,
    letterbox_resize,
    npz_splits,
    read_npz,
    split_items,
    to_stored,
)
from dgan.runinfo import file_sha256

MANIFEST_NAME = "manifest.json"
PROVENANCE_NAME = "provenance.jsonl"
FORMAT = "dgan-shards"
FORMAT_VERSION = 1     # bump when the sample layout or pixel pipeline changes (part of cache keys)
SHARD_PATTERN = "{split}-%06d.tar"


@dataclass
class SplitStats:
    count: int = 0
    classes: Counter = field(default_factory=Counter)
    shards: dict[str, int] = field(default_factory=dict)     # shard file name -> samples
    patients: set = field(default_factory=set)
    bit_depths: Counter = field(default_factory=Counter)
    colour_to_gray: list[str] = field(default_factory=list)  # sources whose colour was dropped


def has_colour(image: np.ndarray) -> bool:
    """True for an H x W x (3|4) image whose R, G and B differ somewhere (not grey stored as RGB)."""
    return image.ndim == 3 and image.shape[2] >= 3 and not (
        np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 0], image[..., 2]))


@dataclass
class WriteResult:
    manifest: dict
    out_dir: Path


# ----------------------------------------------------------------------------------------
# Core writer: records -> shards + manifest, used by the CLI and by the built-in cache


def encode_png(image: np.ndarray) -> bytes:
    """Lossless PNG of a uint8/uint16 gray or RGB image (16 bits stay 16 bits)."""
    if image.ndim == 3:
        image = np.ascontiguousarray(image[:, :, ::-1])  # OpenCV writes BGR
    ok, buf = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise DataError(f"PNG encoding failed for an image of shape {image.shape} and dtype {image.dtype}")
    return buf.tobytes()


def _write_split(split: str, records: Iterable[Union[Record, Skipped]], tmp_dir: Path, *, resolution: int,
                 channels: int, maxcount: int, maxsize: int, digest, skipped: list[dict], provenance,
                 on_item: Callable[[], None], key_prefix: str = "") -> SplitStats:
    import webdataset as wds

    stats = SplitStats()
    pattern = str(tmp_dir / SHARD_PATTERN.format(split=split))
    # mtime=0 makes identical inputs give byte-identical tars
    with wds.ShardWriter(pattern, maxcount=maxcount, maxsize=maxsize, verbose=0, mtime=0) as sink:
        for rec in records:
            if rec is None:  # end of one input file: advances the progress bar
                on_item()
                continue
            if isinstance(rec, Skipped):
                skipped.append({"split": split, "reason": rec.reason, "source": rec.source, "detail": rec.detail})
                continue
            if channels == 1 and has_colour(rec.image):  # said in the manifest and the summary, never silent
                stats.colour_to_gray.append(rec.meta.source)
            try:
                stored = letterbox_resize(to_stored(rec.image, channels), resolution)
            except DataError as exn:
                reason = "bad_channels" if isinstance(exn, ChannelError) else "unsupported_file"
                skipped.append({"split": split, "reason": reason, "source": rec.meta.source, "detail": str(exn)})
                continue
            rec.meta.bit_depth = 16 if stored.dtype == np.uint16 else 8
            key = f"{key_prefix}{split}{stats.count:08d}"
            png, cls = encode_png(stored), str(rec.meta.label).encode()
            for part in (key.encode(), png, cls):
                digest.update(len(part).to_bytes(8, "little") + part)
            sink.write({"__key__": key, "png": png, "cls": cls})
            shard = Path(sink.fname).name
            line = {"key": key, "split": split, "shard": shard, **rec.meta.to_json()}
            provenance.write(json.dumps(line, sort_keys=True) + "\n")
            stats.shards[shard] = stats.shards.get(shard, 0) + 1
            stats.count += 1
            stats.classes[rec.meta.label] += 1
            stats.bit_depths[rec.meta.bit_depth] += 1
            if rec.meta.patient:
                stats.patients.add(rec.meta.patient)
    return stats


def write_shards(splits: dict[str, Iterable[Union[Record, Skipped, None]]], out_dir: Path, *, resolution: int,
                 channels: int, classes: list[str], source: dict, maxcount: int = 5000, maxsize: int = 1 << 30,
                 progress_total: int = 0, progress: bool = True, extra: Optional[dict] = None,
                 key_prefix: str = "") -> WriteResult:
    """Write each split's records to `<split>-NNNNNN.tar` shards in out_dir, atomically.
    `key_prefix` keeps sample keys unique when several writers' shards are merged (dgan.export).

    `splits` maps a split name to its records in the final (already shuffled) order; a
    `None` record marks the end of one input file for the progress bar. Everything is
    written to a temporary sibling folder that is renamed to out_dir at the end.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DataError(f"output {out_dir} exists and is not empty; choose a new folder (nothing is overwritten)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        digest = hashlib.sha256(f"{FORMAT}/{FORMAT_VERSION}/{resolution}/{channels}".encode())
        skipped: list[dict] = []
        stats = {}
        with _progress(progress_total, progress) as advance, open(tmp_dir / PROVENANCE_NAME, "w") as prov:
            for split, records in splits.items():
                stats[split] = _write_split(split, records, tmp_dir, resolution=resolution, channels=channels,
                                            maxcount=maxcount, maxsize=maxsize, digest=digest,
                                            skipped=skipped, provenance=prov, on_item=advance, key_prefix=key_prefix)
        manifest = _manifest(stats, tmp_dir, digest.hexdigest(), resolution=resolution, channels=channels,
                             classes=classes, source=source, skipped=skipped, extra=extra or {})
        _write_json(tmp_dir / MANIFEST_NAME, manifest)
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        os.rename(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return WriteResult(manifest, out_dir)


def _manifest(stats: dict[str, SplitStats], tmp_dir: Path, digest: str, *, resolution: int, channels: int,
              classes: list[str], source: dict, skipped: list[dict], extra: dict) -> dict:
    splits = {}
    for split, st in stats.items():
        shards = [{"name": name, "count": n, "bytes": (tmp_dir / name).stat().st_size}
                  for name, n in sorted(st.shards.items())]
        splits[split] = {"count": st.count, "classes": {str(k): v for k, v in sorted(st.classes.items())},
                         "patients": len(st.patients), "bit_depths": {str(k): v for k, v in st.bit_depths.items()},
                         "shards": shards}
    return {
        "format": FORMAT, "version": FORMAT_VERSION, "hash": digest,
        "resolution": resolution, "channels": channels, "classes": classes,
        "splits": splits, "source": source,
        "skipped": dict(Counter(s["reason"] for s in skipped)), "skipped_files": skipped,
        "colour_to_gray": [src for st in stats.values() for src in st.colour_to_gray],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra,
    }


def _write_json(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=1))


class _progress:
    """A rich progress bar over input files when stderr is a terminal; a no-op otherwise."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled, self.bar = total, enabled and total > 0, None

    def __enter__(self) -> Callable[[], None]:
        if not self.enabled:
            return lambda: None
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(TextColumn("writing shards"), BarColumn(), MofNCompleteColumn(),
                            TimeRemainingColumn(), transient=False)
        self.bar.start()
        task = self.bar.add_task("files", total=self.total)
        return lambda: self.bar.advance(task)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


# ----------------------------------------------------------------------------------------
# Reading manifests and resolving shard patterns


# ----------------------------------------------------------------------------------------
# Built-in sources (phantoms, npz) are written once to a keyed cache folder


def array_records(images: np.ndarray, labels: np.ndarray, source: str,
                  order: Optional[np.ndarray] = None) -> Iterator[Union[Record, None]]:
    """Records from in-memory arrays (phantoms, npz) in `order` (default: as stored), one progress tick each.

    The provenance names each record by its index in the arrays, whatever the write order.
    """
    for i in (range(len(images)) if order is None else order):
        image = images[i]
        yield Record(image, SampleMeta(f"{source}[{i}]", int(labels[i]), "", image.shape[:2],
                                       16 if image.dtype == np.uint16 else 8))
        yield None


# ----------------------------------------------------------------------------------------
# CLI


def _parse_pair(text: Optional[str], name: str) -> Optional[tuple[float, float]]:
    if text is None:
        return None
    try:
        a, b = (float(v) for v in text.split(","))
    except ValueError:
        raise DataError(f"--{name} {text!r}: expected two numbers like 40,400") from None
    return a, b


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dgan.data.shards", description=__doc__.split("\n")[0])
    p.add_argument("--input", required=True, help="folder of PNG/JPG/TIFF/DICOM/NIfTI (class subfolders), or a .npz")
    p.add_argument("--output", required=True, help="new folder for the shards (must not exist or be empty)")
    p.add_argument("--resolution", type=int, required=True, help="square output size in pixels")
    p.add_argument("--channels", type=int, choices=(1, 3), default=1)
    p.add_argument("--val-fraction", type=float, default=0.0, help="hold this fraction out as the val split")
    p.add_argument("--split-by", choices=("patient", "image"), default="patient")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and of the write order")
    p.add_argument("--maxcount", type=int, default=5000, help="samples per shard at most")
    p.add_argument("--maxsize-mb", type=float, default=1024.0, help="shard size at most (MB)")
    p.add_argument("--labels", choices=("subfolders", "none"), default="subfolders")
    p.add_argument("--patient-regex", default=None, help="regex whose group 1 is the patient id in a path")
    p.add_argument("--axis", type=int, default=2, help="NIfTI slicing axis in RAS: 0 sagittal, 1 coronal, 2 axial")
    p.add_argument("--window", default=None, help="DICOM window CENTER,WIDTH (default: from the header)")
    p.add_argument("--dicom-norm", choices=("auto", "window", "percentile"), default="auto")
    p.add_argument("--percentiles", default="0.5,99.5", help="LOW,HIGH percentiles for percentile normalisation")
    p.add_argument("--min-foreground", type=float, default=0.01, help="NIfTI: skip slices with less foreground")
    p.add_argument("--no-progress", action="store_true")
    return p


def convert(args: argparse.Namespace) -> WriteResult:
    """Run one conversion from parsed CLI arguments."""
    src, out = Path(args.input), Path(args.output)
    if not src.exists():
        raise DataError(f"--input {src} does not exist; pass a folder of images or a .npz file")
    if src.is_dir() and is_inside(out, src):
        raise DataError(f"--output {out} is inside --input {src}; write the shards outside the input folder")
    if args.resolution < 8:
        raise DataError(f"--resolution {args.resolution}: must be at least 8")
    common = dict(resolution=args.resolution, channels=args.channels, maxcount=args.maxcount,
                  maxsize=int(args.maxsize_mb * 2**20), progress=not args.no_progress)
    settings = {k: v for k, v in vars(args).items() if k not in ("input", "output", "no_progress")}
    if src.is_file() and src.suffix.lower() == ".npz":
        return _convert_npz(src, out, settings, **common)
    opts = ReadOptions(channels=args.channels, window=_parse_pair(args.window, "window"),
                       percentiles=_parse_pair(args.percentiles, "percentiles"), dicom_norm=args.dicom_norm,
                       nifti_axis=args.axis, min_foreground=args.min_foreground, labels=args.labels)
    if args.patient_regex:
        opts.patient_regex = args.patient_regex
    found = discover(src, opts)
    items, classes = found.items, found.classes
    opts.class_to_index = {name: i for i, name in enumerate(classes)}
    _read_dicom_patients(items)
    splits = split_items(items, args.val_fraction, args.seed, args.split_by)
    streams = {name: _item_records(split_list, opts) for name, split_list in splits.items()}
    source = {"kind": "folder", "input": str(src.resolve()), "files": len(items),
              "kinds": dict(Counter(it.kind for it in items)), "ignored_files": found.ignored}
    return write_shards(streams, out, classes=classes, source=source, progress_total=len(items),
                        extra={"settings": settings}, **common)


def _item_records(items: list, opts: ReadOptions) -> Iterator[Union[Record, Skipped, None]]:
    for item in items:
        yield from read_item(item, opts)
        yield None


def _read_dicom_patients(items: list) -> None:
    """Patient ids from DICOM headers (cheap: pixels are not read) so the split can use them."""
    import pydicom

    for item in items:
        if item.kind != "dicom" or item.path.stat().st_size == 0:
            continue
        try:
            ds = pydicom.dcmread(item.path, stop_before_pixels=True)
        except Exception:
            continue  # the reader reports the corrupt file later
        item.patient = str(ds.get("PatientID", "") or "") or item.patient
        item.series = str(ds.get("SeriesInstanceUID", "") or "") or None


def _convert_npz(src: Path, out: Path, settings: dict, **common) -> WriteResult:
    """An npz carries its own splits, so --val-fraction does not re-split it; the write order is seeded."""
    arrays = {split: read_npz(src, split) for split in npz_splits(src)}
    if not arrays:
        raise DataError(f"{src}: no train_images/val_images/test_images arrays (MedMNIST layout expected)")
    rng = np.random.default_rng(settings["seed"])
    streams = {split: array_records(images, labels, f"{src.name}:{split}", rng.permutation(len(images)))
               for split, (images, labels) in arrays.items()}
    classes = [str(c) for c in np.unique(np.concatenate([labels for _, labels in arrays.values()]))]
    source = {"kind": "npz", "input": str(src.resolve()), "sha256": file_sha256(src)}
    return write_shards(streams, out, classes=classes, source=source,
                        progress_total=sum(len(images) for images, _ in arrays.values()),
                        extra={"settings": settings}, **common)


def summary_lines(manifest: dict, out_dir: Path) -> list[str]:
    lines = [f"wrote {out_dir}  (hash {manifest['hash'][:16]}, {manifest['resolution']}px, "
             f"{manifest['channels']} channel(s))"]
    names = manifest.get("classes") or []
    for split, info in manifest["splits"].items():
        classes = ", ".join(f"{names[int(k)] if int(k) < len(names) else k}: {v}" for k, v in info["classes"].items())
        classes = classes if names else "none (unlabelled)"
        lines.append(f"  {split}: {info['count']} images in {len(info['shards'])} shard(s); classes {classes or '-'}; "
                     f"patients {info['patients']}")
    total_skipped = sum(manifest["skipped"].values())
    lines.append(f"  skipped: {total_skipped}" + (" (" + ", ".join(f"{r}: {n}" for r, n in
                                                                   sorted(manifest["skipped"].items())) + ")"
                                                   if total_skipped else ""))
    colour = manifest.get("colour_to_gray", [])
    if colour:
        lines.append(f"  converted to grayscale: {len(colour)} colour image(s) in a 1-channel set, e.g. "
                     f"{', '.join(colour[:3])}; pass --channels 3 to keep colour")
    ignored = manifest["source"].get("ignored_files", [])
    if ignored:
        lines.append(f"  not images, ignored: {len(ignored)} file(s), e.g. {', '.join(ignored[:3])}")
    for entry in manifest["skipped_files"][:10]:
        lines.append(f"    {entry['reason']}: {entry['source']} {entry['detail']}".rstrip())
    if total_skipped > 10:
        lines.append(f"    ... all {total_skipped} listed in {out_dir / MANIFEST_NAME}")
    return lines


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = convert(args)
    except DataError as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 2
    print("\n".join(summary_lines(result.manifest, result.out_dir)))
    written = sum(info["count"] for info in result.manifest["splits"].values())
    if written == 0:  # a dataset of nothing is a failure, whatever was skipped on the way
        print(f"error: no image was written to {result.out_dir}: every input was skipped (reasons above); "
              "fix the inputs or the options and convert again into an empty --output", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
