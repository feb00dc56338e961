"""Fabric sequences: the short op lists the fabric's sequencer runs on its own.

A sequence is what lets the fabric run a whole DTM denoising chain, or a whole sampling run, with the host
only starting it and reading results. The emulator (``Emulator.run``) and the gateware sequencer execute
the same list; the encoding below is what the host writes into the device's sequence memory.

Ops (one 32-bit word each: opcode in bits 31..28, argument in bits 27..0):

``LOAD l``       select layer ``l``; every node's effective bias becomes ``h + c·x`` with ``x`` its current
                 spin (clamped nodes: their clamp)
``RANDOMIZE``    one zero-field sweep: free nodes become ±1 with probability 1/2
``SWEEP k``      ``k`` block-Gibbs sweeps
``CAPTURE k``    emit the current state as a sample; then ``k - 1`` more times, each after ``thin`` sweeps,
                 where ``thin`` is the argument of the most recent ``THIN`` op (default 1)
``THIN t``       set the sweeps between the samples of later ``CAPTURE`` ops
``END``          stop (also implied after the last op)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["Opcode", "Op", "encode", "decode", "sampling_sequence", "ARG_BITS", "MAX_ARG", "SequenceError"]

ARG_BITS = 28
MAX_ARG = (1 << ARG_BITS) - 1


class SequenceError(ValueError):
    """A sequence that cannot run."""


class Opcode(enum.IntEnum):
    END = 0
    LOAD = 1
    RANDOMIZE = 2
    SWEEP = 3
    CAPTURE = 4
    THIN = 5


@dataclass(frozen=True)
class Op:
    code: Opcode
    arg: int = 0

    def __post_init__(self):
        if not 0 <= self.arg <= MAX_ARG:
            raise SequenceError(f"{self.code.name} argument {self.arg} is outside [0, {MAX_ARG}]")
        if self.code in (Opcode.CAPTURE, Opcode.THIN) and self.arg < 1:
            raise SequenceError(f"{self.code.name} needs a positive argument")

    def __str__(self):
        return self.code.name if self.code in (Opcode.RANDOMIZE, Opcode.END) else f"{self.code.name} {self.arg}"


def encode(ops: list[Op]) -> list[int]:
    """32-bit op words (an END is appended)."""
    return [int(op.code) << ARG_BITS | op.arg for op in ops] + [int(Opcode.END) << ARG_BITS]


def decode(words) -> list[Op]:
    """Ops up to the first END. Raises ``SequenceError`` for unknown opcodes."""
    ops = []
    for word in words:
        code = word >> ARG_BITS
        try:
            opcode = Opcode(code)
        except ValueError:
            raise SequenceError(f"unknown sequence opcode {code}") from None
        if opcode is Opcode.END:
            break
        ops.append(Op(opcode, word & MAX_ARG))
    return ops


def captures(ops: list[Op]) -> int:
    """Samples a sequence emits."""
    return sum(op.arg for op in ops if op.code is Opcode.CAPTURE)


def sampling_sequence(samples: int, burn_in: int, thin: int, layer: int = 0) -> list[Op]:
    """One chain of contract §2 sampling: load, randomize, ``burn_in`` sweeps, then a sample every ``thin``."""
    ops = [Op(Opcode.LOAD, layer), Op(Opcode.RANDOMIZE)]
    if burn_in:
        ops.append(Op(Opcode.SWEEP, burn_in))
    if samples:
        ops += [Op(Opcode.THIN, thin), Op(Opcode.CAPTURE, samples)]
    return ops
