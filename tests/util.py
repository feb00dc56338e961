"""Shared test helpers: model builders and a slow, independent re-statement of the fabric's semantics."""

from __future__ import annotations

import numpy as np

from opentsu.formats import PBIT, lane_seed_states, xoroshiro64_step
from opentsu.model import IsingModel
from opentsu.topology import Grid


def grid_model(rows, cols, jumps=((0, 1),), torus=False, seed=0, scale=0.5, field=0.3, eighths=True,
               clamp=None, beta=1.0):
    """A random Ising model on a grid topology; with ``eighths`` every value is a multiple of 1/8."""
    rng = np.random.default_rng(seed)
    grid = Grid(rows, cols, jumps, torus)
    n = grid.n
    J = np.zeros((n, n))
    for i, j in grid.edges:
        value = rng.normal() * scale
        J[i, j] = J[j, i] = value
    h = rng.normal(size=n) * field
    if eighths:
        J, h = np.round(J * 8) / 8, np.round(h * 8) / 8
    clamp = np.zeros(n, dtype=np.int8) if clamp is None else np.asarray(clamp, dtype=np.int8)
    return IsingModel(h, J, beta, (rows, cols), clamp)


def spec_run(program, chains, seed, ops, first_chain=0):
    """Run ``ops`` (("load", l), ("randomize",), ("sweep", k)) straight from the written spec.

    Deliberately naive: one chain, one lane, one node at a time, using only ``opentsu.formats`` and the
    geometry's schedule. Returns (chains, fabric nodes) spins.
    """
    g = program.geometry
    states = lane_seed_states(seed, range(first_chain, first_chain + chains), g.lanes)
    s0, s1 = states[:, :, 0].copy(), states[:, :, 1].copy()
    spins = np.ones((chains, g.n), dtype=np.int64)
    bias = np.zeros((chains, g.n), dtype=np.int64)
    clamp = np.zeros(g.n, dtype=np.int64)
    weights = program.layers[0].weights.astype(np.int64)
    nbr = g.neighbours
    for op in ops:
        if op[0] == "load":
            lay = program.layers[op[1]]
            weights = lay.weights.astype(np.int64)
            clamp = lay.clamp.astype(np.int64)
            bias = lay.bias[None, :].astype(np.int64) + lay.coupling[None, :].astype(np.int64) * spins
            continue
        sweeps = 1 if op[0] == "randomize" else op[1]
        for _ in range(sweeps):
            for tau in range(g.cycles):
                for lane in range(g.lanes):
                    word, s0[:, lane], s1[:, lane] = xoroshiro64_step(s0[:, lane], s1[:, lane])
                    node = g.schedule[tau, lane]
                    if node < 0:
                        continue
                    if op[0] == "randomize":
                        field = np.zeros(chains, dtype=np.int64)
                    else:
                        field = bias[:, node].copy()
                        for d in range(nbr.shape[1]):
                            if nbr[node, d] >= 0:
                                field += weights[node, d] * spins[:, nbr[node, d]]
                    new = np.where(field >= PBIT.threshold(word), 1, -1)
                    if clamp[node]:
                        new = np.full(chains, clamp[node])
                    spins[:, node] = new
    return spins.astype(np.int8)
