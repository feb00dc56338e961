import numpy as np
import pytest

from opentsu.compiler import FloatLayer, compile_layers, compile_model
from opentsu.emulator import Emulator, sample
from opentsu.exact import moment_errors
from opentsu.fabric import FabricConfig
from opentsu.model import IsingModel
from opentsu.topology import Grid

from .util import grid_model, spec_run


def emulate(program, chains, seed, ops, first_chain=0):
    emu = Emulator(program, chains=chains, seed=seed, first_chain=first_chain)
    for op in ops:
        if op[0] == "load":
            emu.load_layer(op[1])
        elif op[0] == "randomize":
            emu.randomize()
        else:
            emu.sweep(op[1])
    out = emu.fabric_spins
    emu.close()
    return out


@pytest.mark.parametrize("fabric", ["icestick", FabricConfig(8, 8, ((0, 1), (2, 1)), 2, latency=2),
                                    FabricConfig(6, 6, ((0, 1),), 4, latency=1)], ids=str)
def test_emulator_is_the_written_spec(fabric):
    two_jumps = isinstance(fabric, FabricConfig) and len(fabric.jumps) == 2
    model = grid_model(6, 6, ((0, 1), (2, 1)) if two_jumps else ((0, 1),),
                       seed=11, scale=0.8, clamp=[0] * 33 + [1, -1, 0])
    program = compile_model(model, fabric=fabric)
    ops = [("load", 0), ("randomize",), ("sweep", 3)]
    assert np.array_equal(emulate(program, 20, 5, ops), spec_run(program, 20, 5, ops))


def test_emulator_spec_with_conditioning_and_layers():
    grid = Grid(8, 8, ((0, 1),), torus=False)
    rng = np.random.default_rng(12)
    layers = []
    for _ in range(3):
        J = np.zeros((64, 64))
        for i, j in grid.edges:
            J[i, j] = J[j, i] = rng.integers(-6, 7) / 8
        clamp = np.zeros(64, dtype=np.int8)
        clamp[rng.integers(0, 64, 3)] = rng.choice([-1, 1], 3)
        layers.append(FloatLayer(rng.integers(-8, 9, 64) / 8, J, 1.0, rng.integers(-16, 17, 64) / 8, clamp))
    program = compile_layers(grid, layers, fabric="icestick")
    ops = [("load", 0), ("randomize",), ("sweep", 2), ("load", 1), ("sweep", 1), ("load", 2), ("randomize",),
           ("sweep", 2)]
    assert np.array_equal(emulate(program, 33, 9, ops), spec_run(program, 33, 9, ops))


def test_general_graph_runs_on_the_reference():
    rng = np.random.default_rng(13)
    mask = np.triu(rng.random((12, 12)) < 0.3, 1)
    J = np.where(mask | mask.T, 0, 0.0)
    J[mask] = rng.integers(-6, 7, mask.sum()) / 8
    J = J + J.T
    model = IsingModel(rng.integers(-4, 5, 12) / 8, J)
    program = compile_model(model, allow_virtual=True)
    ops = [("load", 0), ("randomize",), ("sweep", 2)]
    assert np.array_equal(emulate(program, 16, 1, ops), spec_run(program, 16, 1, ops))
    samples = sample(program, 64 * 1500, chains=64, burn_in=50, seed=3).reshape(64, 1500, 12)
    z_mean, z_pair = moment_errors(samples, model)
    assert np.abs(z_mean).max() < 4 and np.abs(z_pair).max() < 4


EXACT_CASES = {
    "frustrated-torus": dict(rows=4, cols=4, jumps=((0, 1),), torus=True, seed=21, scale=0.6, field=0.2),
    "degree8-open": dict(rows=4, cols=4, jumps=((0, 1), (2, 1)), torus=False, seed=22, scale=0.6, field=0.3),
    "strong-fields": dict(rows=3, cols=5, jumps=((0, 1),), torus=False, seed=23, scale=0.3, field=2.5),
    "clamped": dict(rows=4, cols=4, jumps=((0, 1), (2, 1)), torus=False, seed=24, scale=0.7, field=0.2,
                    clamp=[1, 0, 0, -1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, -1]),
    "torus-clamped": dict(rows=4, cols=4, jumps=((0, 1),), torus=True, seed=25, scale=0.9, field=0.1,
                          clamp=[0] * 5 + [1] + [0] * 9 + [-1]),
    "ladder": dict(rows=2, cols=6, jumps=((0, 1),), torus=False, seed=26, scale=0.8, field=0.5),
}


@pytest.mark.parametrize("case", list(EXACT_CASES), ids=list(EXACT_CASES))
def test_samples_match_exact_enumeration(case):
    model = grid_model(**EXACT_CASES[case])
    program = compile_model(model, fabric="auto")
    chains, per_chain = 64, 2500
    samples = sample(program, chains * per_chain, chains=chains, burn_in=50, seed=7).reshape(chains, per_chain, -1)
    clamped = np.flatnonzero(model.clamp)
    assert np.all(samples[..., clamped] == model.clamp[clamped])
    z_mean, z_pair = moment_errors(samples, model)
    assert np.abs(z_mean).max() < 4, z_mean
    assert np.abs(z_pair).max() < 4, z_pair


def test_same_seed_same_samples_and_chains_are_independent_of_batching():
    program = compile_model(grid_model(6, 6, ((0, 1), (2, 1)), seed=30))
    a = sample(program, 200, chains=4, burn_in=5, seed=99)
    assert np.array_equal(a, sample(program, 200, chains=4, burn_in=5, seed=99))
    assert not np.array_equal(a, sample(program, 200, chains=4, burn_in=5, seed=100))
    together = Emulator(program, chains=40, seed=99)
    together.load_layer(0)
    together.randomize()
    together.sweep(3)
    for k in (0, 17, 39):
        alone = Emulator(program, chains=1, seed=99, first_chain=k)
        alone.load_layer(0)
        alone.randomize()
        alone.sweep(3)
        assert np.array_equal(alone.fabric_spins[0], together.fabric_spins[k])
        assert np.array_equal(alone.rng_state[0], together.rng_state[k])
