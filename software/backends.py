"""Sampling backends other than the reference emulator (simulated board, Verilator, real board)."""

from __future__ import annotations

from .cli import DeviceError

__all__ = ["run_sample"]


def run_sample(backend, program, n, chains, burn_in, thin, seed, port=None):
    raise DeviceError(f"the {backend} backend is not available in this build yet")
