"""``make demo``: the main job on the built-in defaults, narrated."""

from __future__ import annotations

import os
import time
from importlib import resources

import numpy as np

__all__ = ["run", "demo_model_path"]


def demo_model_path() -> str:
    """The bundled 4×4 frustrated grid model (open boundary, jumps (0,1) and (2,1), 1/8-grid values)."""
    return str(resources.files("opentsu") / "data" / "demo_4x4.npz")


def _moments_table(model, program):
    from .emulator import Emulator
    from .exact import exact_moments, moment_errors
    chains, per_chain = 64, 2000
    emu = Emulator(program, chains=chains, seed=2024)
    try:
        emu.load_layer(0)
        emu.randomize()
        start = time.perf_counter()
        samples = emu.sample(per_chain, burn_in=100, thin=1)
        elapsed = time.perf_counter() - start
    finally:
        emu.close()
    mean, corr = exact_moments(model)
    z_mean, z_pair = moment_errors(samples, model)
    measured = samples.reshape(-1, model.n).mean(axis=0)
    print(f"  {chains} chains × {per_chain} samples in {elapsed:.2f} s on the emulator")
    print("  node   <s> measured   <s> exact   deviation/σ")
    for i in range(model.n):
        print(f"  {i:4d}   {measured[i]:+12.4f}   {mean[i]:+9.4f}   {z_mean[i]:+8.2f}")
    print(f"  largest deviation over {len(z_mean)} means and {len(z_pair)} edge correlations: "
          f"{max(np.abs(z_mean).max(), np.abs(z_pair).max()):.2f} σ")


def run(args):
    from .compiler import compile_model
    from .model import load_model
    os.makedirs(args.out, exist_ok=True)
    path = demo_model_path()
    model = load_model(path)
    program = compile_model(model)
    print(f"1. Ising model {os.path.basename(path)}: {model.topology.describe()}")
    print(f"   compiled for {program.geometry.describe()}")
    print(f"   {program.report.describe()}")
    _moments_table(model, program)
