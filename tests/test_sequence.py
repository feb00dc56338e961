import numpy as np
import pytest

from opentsu.compiler import compile_model
from opentsu.emulator import Emulator
from opentsu.dtm import chain_sequence
from opentsu.sequence import (MAX_ARG, Op, Opcode, SequenceError, decode, encode, moments_sequence,
                               previous_run_dependence, sampling_sequence)

from .util import grid_model


def test_encoding_round_trip():
    ops = [Op(Opcode.LOAD, 3), Op(Opcode.RANDOMIZE), Op(Opcode.SWEEP, 50), Op(Opcode.THIN, 4), Op(Opcode.CAPTURE, 7)]
    words = encode(ops)
    assert words[-1] == 0 and all(0 <= w < 1 << 32 for w in words)
    assert decode(words) == ops


def test_bad_ops_are_refused():
    with pytest.raises(SequenceError):
        decode([0xF0000000])
    with pytest.raises(SequenceError):
        Op(Opcode.SWEEP, 1 << 16)
    with pytest.raises(SequenceError):
        decode([Opcode.SWEEP << 28 | 1 << 20])   # reserved bits
    with pytest.raises(SequenceError):
        Op(Opcode.CAPTURE, 0)


def test_run_equals_the_individual_operations():
    program = compile_model(grid_model(6, 6, ((0, 1), (2, 1)), seed=50))
    a = Emulator(program, chains=8, seed=4)
    got = a.run(sampling_sequence(5, burn_in=3, thin=2))
    b = Emulator(program, chains=8, seed=4)
    b.load_layer(0)
    b.randomize()
    b.sweep(3)
    expected = []
    for k in range(5):
        if k:
            b.sweep(2)
        expected.append(b.spins)
    assert np.array_equal(got, np.stack(expected, axis=1))


def test_long_runs_split_into_ops_that_fit():
    ops = sampling_sequence(70_000, burn_in=100_000, thin=3)
    assert all(op.arg <= MAX_ARG for op in ops)
    assert sum(op.arg for op in ops if op.code is Opcode.CAPTURE) == 70_000
    assert sum(op.arg for op in ops if op.code is Opcode.SWEEP) == 100_000 + 3   # burn-in, then one thin gap
    # The gap between the two CAPTURE ops is a thin's worth of sweeps, as inside one op.
    k = [i for i, op in enumerate(ops) if op.code is Opcode.CAPTURE]
    assert ops[k[0] + 1:k[1]] == [Op(Opcode.SWEEP, 3)]


def test_split_capture_equals_one_long_capture():
    program = compile_model(grid_model(4, 4, ((0, 1),), seed=5))
    ops = [Op(Opcode.LOAD, 0), Op(Opcode.RANDOMIZE), Op(Opcode.THIN, 2)]
    a = Emulator(program, chains=4, seed=9).run(ops + [Op(Opcode.CAPTURE, 6)])
    b = Emulator(program, chains=4, seed=9).run(ops + [Op(Opcode.CAPTURE, 2), Op(Opcode.SWEEP, 2),
                                                       Op(Opcode.CAPTURE, 4)])
    assert np.array_equal(a, b)


def test_accumulate_counts_what_capture_sees():
    program = compile_model(grid_model(6, 6, ((0, 1), (2, 1)), seed=51))
    g = program.geometry
    head = [Op(Opcode.LOAD, 0), Op(Opcode.RANDOMIZE), Op(Opcode.SWEEP, 3), Op(Opcode.THIN, 2)]
    captured = Emulator(program, chains=3, seed=8).run(head + [Op(Opcode.CAPTURE, 40)], full=True)
    emu = Emulator(program, chains=3, seed=8)
    emu.run(head + [Op(Opcode.ACCUMULATE, 40)])
    moments = emu.moments
    assert moments.samples.tolist() == [40, 40, 40]
    # Counted independently from the captured states: s_i = +1, and s_i = s_j along each owned offset.
    for c in range(3):
        for i in range(g.n):
            r, col = divmod(i, g.cols)
            assert moments.plus[c, i] == np.sum(captured[c, :, i] == 1)
            for k, (dr, dc) in enumerate(g.moment_offsets):
                j = ((r + dr) % g.rows) * g.cols + (col + dc) % g.cols
                assert moments.agree[c, i, k] == np.sum(captured[c, :, i] == captured[c, :, j])
    # Each undirected edge of the grid is owned exactly once.
    owned = {frozenset((i, int(j))) for i in range(g.n) for j in g.moment_partners[i]}
    edges = {frozenset((i, int(j))) for i in range(g.n) for j in g.neighbours[i] if j >= 0}
    assert owned == edges


@pytest.mark.parametrize("ops, conditioned, problem", [
    # the usual runs: RANDOMIZE first; a layer without conditioning latches no spin, so one LOAD will do
    (sampling_sequence(5, burn_in=3, thin=2), (), None),
    (moments_sequence(5, burn_in=0, thin=1), (), None),
    # a DTM chain LOADs each conditioned layer again after RANDOMIZE
    (chain_sequence(3, 4), (0, 1, 2), None),
    # a conditioned layer LOADed only before RANDOMIZE carries the previous run's spins in its biases
    (sampling_sequence(5, burn_in=3, thin=2), (0,), "LOAD it again after RANDOMIZE"),
    ([Op(Opcode.LOAD, 1), Op(Opcode.RANDOMIZE), Op(Opcode.LOAD, 0), Op(Opcode.SWEEP, 1)], (1,), None),
    ([Op(Opcode.LOAD, 0), Op(Opcode.RANDOMIZE), Op(Opcode.LOAD, 1), Op(Opcode.CAPTURE, 1)], (0,), None),
    # sampling before any RANDOMIZE starts from the previous run's spins, conditioned or not
    ([Op(Opcode.LOAD, 0), Op(Opcode.SWEEP, 2), Op(Opcode.CAPTURE, 1)], (), "before any RANDOMIZE"),
    ([Op(Opcode.LOAD, 0), Op(Opcode.CAPTURE, 1), Op(Opcode.RANDOMIZE)], (), "before any RANDOMIZE"),
    ([Op(Opcode.LOAD, 0), Op(Opcode.SWEEP, 0), Op(Opcode.RANDOMIZE), Op(Opcode.CAPTURE, 1)], (), None),
])
def test_runs_that_depend_on_the_previous_run_are_named(ops, conditioned, problem):
    found = previous_run_dependence(ops, lambda layer: layer in conditioned)
    if problem is None:
        assert found is None, found
    else:
        assert found is not None and problem in found
