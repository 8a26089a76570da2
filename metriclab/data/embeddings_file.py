"""Checks of an embeddings array read from a user's file (`embeddings=<npz>`): one clear line for each way it can be
wrong, never a raw traceback or a silent cast. Torch-free."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from metriclab.core.errors import ConfigError

#: the largest magnitude a float32 holds; a bigger float64 would become inf when cast
FLOAT32_MAX = float(np.finfo(np.float32).max)
EXPECTED = "expected N x D floats (float32), as written by export_embeddings=true"


def read_npz_array(npz: Any, key: str, path: str | Path) -> np.ndarray:
    """`npz[key]` of an `np.load(..., allow_pickle=False)` archive; an array of Python objects (which numpy refuses
    to unpickle) is a ConfigError naming the file and the array."""
    try:
        return npz[key]
    except ValueError as e:  # numpy: "Object arrays cannot be loaded when allow_pickle=False"
        raise ConfigError(f"embeddings={path}: array `{key}` holds Python objects (dtype object); save it as a "
                          f"plain numeric array") from e


def check_embeddings_array(arr: np.ndarray, path: str | Path) -> np.ndarray:
    """The embeddings as float32, after checking they are numbers that float32 holds exactly enough: an object,
    string, bool or complex array, a value beyond float32's range, or a NaN/inf is a ConfigError naming `path`."""
    arr = np.asarray(arr)
    kind = arr.dtype.kind
    if kind == "O":
        raise ConfigError(f"embeddings={path}: `embeddings` holds Python objects (dtype object); {EXPECTED}")
    if kind in "USV":
        raise ConfigError(f"embeddings={path}: `embeddings` holds text or raw bytes (dtype {arr.dtype}); {EXPECTED}")
    if kind == "b":
        raise ConfigError(f"embeddings={path}: `embeddings` is boolean, not embeddings; {EXPECTED}")
    if kind not in "iuf":  # complex, datetimes, timedeltas
        raise ConfigError(f"embeddings={path}: `embeddings` has dtype {arr.dtype}; {EXPECTED}")
    if arr.size and not np.isfinite(arr).all():
        raise ConfigError(f"embeddings={path}: `embeddings` contains NaN or inf")
    if arr.size and kind == "f" and arr.dtype.itemsize > 4:
        largest = float(np.abs(arr).max())
        if largest > FLOAT32_MAX:  # casting would turn these into inf: refuse instead of changing the values
            raise ConfigError(f"embeddings={path}: `embeddings` has a value of magnitude {largest:.3g}, beyond "
                              f"float32's {FLOAT32_MAX:.3g}; rescale the embeddings before saving them")
    return arr.astype(np.float32, copy=False)


__all__ = ["FLOAT32_MAX", "check_embeddings_array", "read_npz_array"]
