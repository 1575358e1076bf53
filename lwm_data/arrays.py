"""Arrow list columns as flat numpy arrays: the few helpers every columnar reader here shares."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def flat_values(array: pa.Array | pa.ChunkedArray, dtype=None) -> np.ndarray:
    """The values of a list column, concatenated over rows."""
    values = pc.list_flatten(array).to_numpy(zero_copy_only=False)
    return values if dtype is None else values.astype(dtype, copy=False)


def list_lengths(array: pa.Array | pa.ChunkedArray, null_as: int = -1) -> np.ndarray:
    """Each row's list length (`null_as` for a null list)."""
    return pc.list_value_length(array).fill_null(null_as).to_numpy(zero_copy_only=False).astype(np.int64)


def flagged_per_list(flags: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """How many of each list's values are flagged, for flat `flags` and list `offsets` (n + 1)."""
    return np.diff(np.concatenate([[0], np.cumsum(flags, dtype=np.int64)])[np.asarray(offsets, np.int64)])


def run_starts(values: np.ndarray) -> np.ndarray:
    """Where each run of equal consecutive values starts (bool mask)."""
    return np.r_[True, values[1:] != values[:-1]] if len(values) else np.zeros(0, bool)
