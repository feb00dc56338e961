"""Benchmarks behind ``opentsu bench``: each returns a dict that the CLI prints as one JSON line."""

from __future__ import annotations

import time

import numpy as np

from .compiler import Program
from .model import IsingModel

__all__ = ["emulator", "thrml"]


def emulator(program: Program, chains: int = 64, sweeps: int = 200, warmup: int = 20) -> dict:
    """Emulator p-bit updates per second on ``program``, timed after ``warmup`` sweeps."""
    from .emulator import Emulator
    emu = Emulator(program, chains=chains, seed=1)
    try:
        emu.load_layer(0)
        emu.randomize()
        emu.sweep(warmup)
        start = time.perf_counter()
        emu.sweep(sweeps)
        elapsed = time.perf_counter() - start
    finally:
        emu.close()
    flips = program.n_model * chains * sweeps
    return {
        "benchmark": "emulator",
        "nodes": program.n_model,
        "fabric_nodes": program.geometry.n,
        "chains": chains,
        "sweeps": sweeps,
        "seconds": round(elapsed, 4),
        "flips_per_s": round(flips / elapsed),
        "geometry": program.geometry.describe(),
    }


def thrml(model: IsingModel, chains: int = 64, sweeps: int = 200) -> dict:
    """thrml's block Gibbs on the same model and colouring, when thrml and jax are importable."""
    try:
        import jax
        import jax.numpy as jnp
        from thrml import Block, SamplingSchedule, SpinNode, sample_states
        from thrml.models.ising import IsingEBM, IsingSamplingProgram, hinton_init
    except ImportError as exc:
        return {"thrml_error": f"thrml is not installed ({exc.name}); pip install thrml 'jax[cpu]'"}
    from .topology import colour
    n = model.n
    nodes = [SpinNode() for _ in range(n)]
    i, j = np.nonzero(np.triu(model.J, 1))
    ebm = IsingEBM(nodes, [(nodes[a], nodes[b]) for a, b in zip(i, j)], jnp.asarray(model.h),
                   jnp.asarray(model.J[i, j]), jnp.asarray(model.beta))
    classes = colour(model.topology).classes()
    blocks = [Block([nodes[k] for k in members]) for members in classes]
    program = IsingSamplingProgram(ebm, blocks, [])
    schedule = SamplingSchedule(n_warmup=sweeps, n_samples=1, steps_per_sample=1)
    key_init, key_run = jax.random.split(jax.random.key(0))
    init = hinton_init(key_init, ebm, blocks, (chains,))
    keys = jax.random.split(key_run, chains)
    run = jax.jit(jax.vmap(lambda k, s: sample_states(k, program, schedule, s, [], [Block(nodes)])))
    jax.block_until_ready(run(keys, init))  # compile
    start = time.perf_counter()
    jax.block_until_ready(run(keys, init))
    elapsed = time.perf_counter() - start
    import thrml as thrml_module
    return {
        "thrml_version": getattr(thrml_module, "__version__", "unknown"),
        "thrml_seconds": round(elapsed, 4),
        "thrml_flips_per_s": round(n * chains * (sweeps + 1) / elapsed),
    }
