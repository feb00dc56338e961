import numpy as np
import pytest

from opentsu.compiler import compile_model
from opentsu.emulator import Emulator
from opentsu.sequence import Op, Opcode, SequenceError, decode, encode, sampling_sequence

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
        Op(Opcode.SWEEP, 1 << 28)
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
