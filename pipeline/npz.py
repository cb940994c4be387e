"""ADM-format `.npz` files (`arr_0` uint8 NHWC images, `arr_1` labels): in-memory blobs, streamed assembly of many
chunks into one file without holding it in memory, and row lookups across committed chunks."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.manifest import atomic_write_with


def npz_bytes(**arrays: np.ndarray) -> bytes:
    """An uncompressed .npz in memory, readable by np.load, with fixed zip timestamps (np.savez stamps the current
    time, so the same arrays would give other bytes a second later)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(arr), allow_pickle=False)
    return buf.getvalue()


def write_npz_streaming(path: Path, names_shapes: dict[str, tuple[np.dtype, tuple]],
                        parts: list[Callable[[], dict[str, np.ndarray]]]) -> None:
    """Write an uncompressed npz whose arrays are the concatenation (axis 0) of `parts`, one part in memory at a time.

    `names_shapes` gives each array's dtype and final shape (written in the .npy header up front); each part is a
    callable returning a mapping name -> rows (called once per array). Written to a temporary file, fsynced and
    renamed. Readable by np.load and by the ADM evaluator's streaming reader.
    """
    atomic_write_with(path, lambda tmp: _write_npz_members(tmp, names_shapes, parts))


def _write_npz_members(tmp: Path, names_shapes: dict, parts: list) -> None:
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, (dtype, shape) in names_shapes.items():
            with zf.open(name + ".npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_2_0(
                    f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                        "shape": tuple(shape)})
                written = 0
                for part in parts:
                    arr = np.ascontiguousarray(part()[name], dtype=dtype)
                    f.write(arr.tobytes())
                    written += len(arr)
                if written != shape[0]:
                    raise ValueError(f"{name}: parts hold {written} rows, header says {shape[0]}")


def rows_from_chunks(out: Path, records: list[dict], indices: list[int], key: str = "arr_0") -> np.ndarray:
    """Rows `indices` of a chunked output (records with name/start/stop; only the chunks that hold them are read)."""
    found: dict[int, np.ndarray] = {}
    for rec in records:
        wanted = [i for i in indices if rec["start"] <= i < rec["stop"]]
        if wanted:
            with np.load(out / rec["name"]) as z:
                arr = z[key]
                found.update({i: arr[i - rec["start"]] for i in wanted})
    return np.stack([found[i] for i in indices])
