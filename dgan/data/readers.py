"""One reader per file format: PNG/JPG (8 bit), TIFF (8 and 16 bit), DICOM and NIfTI.

Each returns the image as stored (see dgan/data/sources.py for the pixel conventions) or a
`Skipped` record with the reason; files are opened read-only.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Union

import cv2
import numpy as np

from dgan.data.sources import (ChannelError, DataError, ReadOptions, Record, SampleMeta, Skipped, SourceItem,
                               file_suffix, percentile_normalise)


def read_image_file(item: SourceItem, opts: ReadOptions) -> Iterator[Union[Record, Skipped]]:
    if item.path.stat().st_size == 0:
        yield Skipped("empty_file", item.rel, "zero bytes")
        return
    suffix = file_suffix(item.path)
    readers = {".tif": _read_tiff, ".tiff": _read_tiff, ".png": _read_png}
    image = readers.get(suffix, _read_pil)(item.path)
    if image.ndim == 3 and image.shape[2] not in (1, 2, 3, 4):
        yield Skipped("bad_channels", item.rel, f"{image.shape[2]} channels cannot be converted")
        return
    meta = SampleMeta(item.rel, opts.class_to_index.get(item.class_name, 0), item.class_name,
                      image.shape[:2], 16 if image.dtype == np.uint16 else 8, item.patient)
    yield Record(image, meta)



def _read_png(path: Path) -> np.ndarray:
    """PNG via OpenCV, which keeps 16-bit colour (PIL reduces it to 8 bits); PIL as fallback."""
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None or image.dtype not in (np.uint8, np.uint16):
        return _read_pil(path)
    if image.ndim == 3 and image.shape[2] in (3, 4):
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB if image.shape[2] == 3 else cv2.COLOR_BGRA2RGBA)
    return image



def _read_pil(path: Path) -> np.ndarray:
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)  # phone/scanner JPEGs may be stored rotated
        if img.mode in ("I;16", "I;16B", "I;16L"):
            return np.asarray(img).astype(np.uint16)
        if img.mode == "I":
            arr = np.asarray(img)
            if arr.min() < 0 or arr.max() > 65535:
                raise DataError(f"{path}: 32-bit integer pixels outside 0..65535")
            return arr.astype(np.uint16)
        if img.mode not in ("L", "LA", "RGB", "RGBA"):
            img = img.convert("RGBA" if "A" in img.mode or img.mode == "P" else "RGB")
        return np.asarray(img)



def _read_tiff(path: Path) -> np.ndarray:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        axes = series.axes
        image = series.asarray()
    # 'S' is the samples (colour) axis; anything beyond Y, X and S is a stack we do not slice
    if axes == "SYX":  # planar colour: channels first
        image, axes = np.moveaxis(image, 0, -1), "YXS"
    if axes not in ("YX", "YXS"):
        raise DataError(f"{path}: TIFF with axes {axes!r} (a stack?); convert stacks to NIfTI or single images")
    if image.dtype.kind == "f":
        raise DataError(f"{path}: floating-point TIFF; save it as 8- or 16-bit integers")
    if image.dtype not in (np.uint8, np.uint16):
        if image.min() < 0 or image.max() > 65535:
            raise DataError(f"{path}: {image.dtype} pixels outside 0..65535")
        image = image.astype(np.uint16)
    return image  # an unconvertible channel count is skipped by the caller as bad_channels



def read_dicom(item: SourceItem, opts: ReadOptions) -> Iterator[Union[Record, Skipped]]:
    import pydicom
    from pydicom.pixels import apply_modality_lut

    if item.path.stat().st_size == 0:
        yield Skipped("empty_file", item.rel, "zero bytes")
        return
    ds = pydicom.dcmread(item.path)
    if "PixelData" not in ds:
        yield Skipped("dicom_no_pixels", item.rel, "no PixelData element")
        return
    pixels = ds.pixel_array
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    is_colour = photometric not in ("MONOCHROME1", "MONOCHROME2")
    if frames == 1:
        pixels = pixels[None]
    patient = str(ds.get("PatientID", "") or "") or item.patient
    series = str(ds.get("SeriesInstanceUID", "") or "") or None
    for index, frame in enumerate(pixels):
        image = frame if is_colour else _normalise_dicom(apply_modality_lut(frame, ds), ds, photometric, opts)
        meta = SampleMeta(item.rel, opts.class_to_index.get(item.class_name, 0), item.class_name,
                          frame.shape[:2], 8 if is_colour and frame.dtype == np.uint8 else 16,
                          patient, series, index if frames > 1 else None)
        yield Record(image, meta)



def _normalise_dicom(values: np.ndarray, ds, photometric: str, opts: ReadOptions) -> np.ndarray:
    window = opts.window
    if window is None and opts.dicom_norm != "percentile":
        center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
        if center is not None and width is not None:
            window = (_first_value(center), _first_value(width))
    if opts.dicom_norm == "window" and window is None:
        raise DataError("no window in the DICOM header; pass --window CENTER,WIDTH or --dicom-norm percentile")
    if window is not None and opts.dicom_norm != "percentile":
        center, width = window
        out = np.clip((values.astype(np.float32) - (center - width / 2.0)) / max(width, 1e-6), 0.0, 1.0)
    else:
        out = percentile_normalise(values, opts.percentiles)
    return 1.0 - out if photometric == "MONOCHROME1" else out  # MONOCHROME1: high values are dark



def _first_value(value) -> float:
    # multi-valued window elements list alternatives; the first is the primary one
    try:
        return float(value)
    except TypeError:
        return float(value[0])



def read_nifti(item: SourceItem, opts: ReadOptions) -> Iterator[Union[Record, Skipped]]:
    """2D slices along opts.nifti_axis of the canonical (RAS) orientation; empty slices skipped.

    Intensities are normalised per 3D volume, not per slice, so that slices keep their
    relative brightness. A 4D file gives every 3D volume (none is dropped).
    """
    import nibabel as nib

    if item.path.stat().st_size == 0:
        yield Skipped("empty_file", item.rel, "zero bytes")
        return
    img = nib.as_closest_canonical(nib.load(str(item.path)))
    data = np.asarray(img.dataobj, dtype=np.float32)
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim not in (3, 4):
        yield Skipped("unsupported_shape", item.rel, f"{data.ndim}D NIfTI; expected 2D, 3D or 4D")
        return
    volumes = data[..., None] if data.ndim == 3 else data
    if not 0 <= opts.nifti_axis <= 2:
        raise DataError(f"--axis {opts.nifti_axis}: must be 0, 1 or 2")
    for vol_index in range(volumes.shape[3]):
        volume = percentile_normalise(volumes[..., vol_index], opts.percentiles)
        for index in range(volume.shape[opts.nifti_axis]):
            plane = np.take(volume, index, axis=opts.nifti_axis)
            source = f"{item.rel}[vol {vol_index}, slice {index}]"
            if float((plane > 0.05).mean()) < opts.min_foreground:
                yield Skipped("empty_slice", source, f"foreground below {opts.min_foreground:.0%}")
                continue
            # array axes are (first, second) in RAS; show the second axis upwards like a viewer
            image = np.ascontiguousarray(np.flipud(plane.T))
            meta = SampleMeta(item.rel, opts.class_to_index.get(item.class_name, 0), item.class_name,
                              image.shape[:2], 16, item.patient, None, index,
                              vol_index if volumes.shape[3] > 1 else None)
            yield Record(image, meta)



def read_item(item: SourceItem, opts: ReadOptions) -> Iterator[Union[Record, Skipped]]:
    """Dispatch to the reader; a file that fails to decode becomes one Skipped record."""
    reader = {"image": read_image_file, "dicom": read_dicom, "nifti": read_nifti}[item.kind]
    try:
        yield from reader(item, opts)
    except ChannelError as exn:
        yield Skipped("bad_channels", item.rel, str(exn))
    except DataError as exn:
        yield Skipped("unsupported_file", item.rel, str(exn))
    except Exception as exn:  # a corrupt file must not stop a conversion of thousands
        yield Skipped("corrupt_file", item.rel, f"{type(exn).__name__}: {exn}"[:300])
