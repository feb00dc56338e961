"""Ising model files (shared/CONTRACTS.md §1): loading, validation, saving.

``P(s) ∝ exp(β·(Σ_i h_i s_i + Σ_{i<j} J_ij s_i s_j))`` over ``s ∈ {-1, +1}^n`` (thrml's IsingEBM convention).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from .fileio import npz_arrays, open_npz
from .topology import Grid, SparseGraph, TopologyError, detect_grid

__all__ = ["IsingModel", "ModelError", "load_model", "save_model"]


class ModelError(ValueError):
    """A model file that does not meet the contract. The message names the problem."""


@dataclass(eq=False)
class IsingModel:
    """An Ising model: biases ``h`` (n,), couplings ``J`` (n, n), ``beta``, optional ``grid`` and ``clamp``."""

    h: np.ndarray
    J: np.ndarray
    beta: float = 1.0
    grid: tuple[int, int] | None = None
    clamp: np.ndarray | None = field(default=None)

    def __post_init__(self):
        for name in ("h", "J"):
            if np.iscomplexobj(getattr(self, name)):
                raise ModelError(f"{name} must be real, got complex values")
        self.h = np.asarray(self.h, dtype=np.float64)
        self.J = np.asarray(self.J, dtype=np.float64)
        if self.clamp is None:
            self.clamp = np.zeros(max(self.n, 0), dtype=np.int8)   # a bad h is validate's to report
        self.validate()

    @property
    def n(self) -> int:
        return int(self.h.shape[0]) if self.h.ndim == 1 else -1

    def validate(self):
        h, J = self.h, self.J
        if h.ndim != 1:
            raise ModelError(f"h must be one-dimensional, got shape {h.shape}")
        n = h.shape[0]
        if n == 0:
            raise ModelError("the model has no nodes")
        if J.shape != (n, n):
            raise ModelError(f"J has shape {J.shape}, expected ({n}, {n}) to match h")
        if not np.all(np.isfinite(h)):
            bad = np.flatnonzero(~np.isfinite(h))[:5].tolist()
            raise ModelError(f"h has non-finite values (NaN or inf) at nodes {bad}")
        if not np.all(np.isfinite(J)):
            i, j = np.argwhere(~np.isfinite(J))[0]
            raise ModelError(f"J has non-finite values (NaN or inf), first at ({i}, {j})")
        if np.any(np.diag(J) != 0):
            i = int(np.flatnonzero(np.diag(J))[0])
            raise ModelError(f"J has a nonzero diagonal: J[{i},{i}] = {J[i, i]:g}")
        if not np.array_equal(J, J.T):
            i, j = np.argwhere(J != J.T)[0]
            raise ModelError(f"J is not symmetric: J[{i},{j}] = {J[i, j]:g} but J[{j},{i}] = {J[j, i]:g}")
        beta = np.asarray(self.beta)
        real = np.issubdtype(beta.dtype, np.number) and not np.issubdtype(beta.dtype, np.complexfloating)
        if beta.shape != () or not real:
            raise ModelError(f"beta must be a real scalar, got {self.beta!r}")
        self.beta = float(beta)
        if not np.isfinite(self.beta) or self.beta < 0:
            raise ModelError(f"beta must be finite and non-negative, got {self.beta:g}")
        if self.grid is not None:
            g = np.asarray(self.grid)
            if g.shape != (2,) or not np.issubdtype(g.dtype, np.integer):
                raise ModelError(f"grid must be two integers (rows, cols), got {self.grid!r}")
            rows, cols = int(g[0]), int(g[1])
            if rows < 1 or cols < 1 or rows * cols != n:
                raise ModelError(f"grid {rows}×{cols} does not match n = {n} nodes")
            self.grid = (rows, cols)
        clamp = np.asarray(self.clamp)
        if clamp.shape != (n,):
            raise ModelError(f"clamp has shape {clamp.shape}, expected ({n},)")
        if not np.issubdtype(clamp.dtype, np.integer) and not np.all(np.isin(clamp, (-1.0, 0.0, 1.0))):
            raise ModelError("clamp must hold integers")
        if not np.all(np.isin(clamp, (-1, 0, 1))):
            bad = np.flatnonzero(~np.isin(clamp, (-1, 0, 1)))[0]
            raise ModelError(f"clamp values must be 0, +1 or -1; node {bad} has {clamp[bad]}")
        self.clamp = clamp.astype(np.int8)

    @property
    def topology(self) -> Grid | SparseGraph:
        """The grid topology the couplings fit (when ``grid`` is given), else the general sparse graph."""
        if self.grid is None:
            return SparseGraph.from_adjacency(self.J != 0)
        try:
            return detect_grid(self.J != 0, *self.grid)
        except TopologyError as exc:
            raise ModelError(f"couplings do not fit the {self.grid[0]}×{self.grid[1]} grid: {exc}") from None

    def energy_terms(self, spins: np.ndarray) -> np.ndarray:
        """``Σ h s + Σ_{i<j} J s s`` (without β) for spins of shape (..., n)."""
        s = np.asarray(spins, dtype=np.float64)
        return s @ self.h + 0.5 * np.einsum("...i,ij,...j->...", s, self.J, s)


def load_model(path) -> IsingModel:
    """Read and validate a model file. Raises ``ModelError`` naming the problem."""
    path = os.fspath(path)
    archive = open_npz(path, ModelError, "model file")
    with archive:
        keys = set(archive.files)
        missing = {"h", "J"} - keys
        if missing:
            raise ModelError(f"{path}: missing key(s) {', '.join(sorted(missing))}")
        arrays = npz_arrays(archive, keys & {"h", "J", "beta", "grid", "clamp"}, ModelError, path)
    for key in ("h", "J", "beta"):
        if key in arrays and not (np.issubdtype(arrays[key].dtype, np.number) or arrays[key].dtype == bool):
            raise ModelError(f"{path}: {key} must be numeric, got dtype {arrays[key].dtype}")
    try:
        return IsingModel(
            h=arrays["h"], J=arrays["J"], beta=arrays.get("beta", np.float64(1.0)),
            grid=(tuple(arrays["grid"].tolist()) if "grid" in arrays and arrays["grid"].ndim == 1
                  else arrays.get("grid")),
            clamp=arrays.get("clamp"),
        )
    except ModelError as exc:
        raise ModelError(f"{path}: {exc}") from None


def save_model(path, model: IsingModel):
    """Write ``model`` as a contract §1 ``.npz`` file (atomically: a partial file is never left behind)."""
    arrays = {"h": model.h, "J": model.J, "beta": np.float64(model.beta), "clamp": model.clamp.astype(np.int8)}
    if model.grid is not None:
        arrays["grid"] = np.asarray(model.grid, dtype=np.int64)
    from .fileio import atomic_write
    with atomic_write(path) as f:
        np.savez(f, **arrays)
