"""Fabric sequences: the short op lists the fabric's sequencer runs on its own.

A sequence is what lets the fabric run a whole DTM denoising chain, or a whole sampling run, with the host
only starting it and reading results. The emulator (``Emulator.run``) and the gateware sequencer execute
the same list; the encoding below is what the host writes into the device's sequence memory.

Ops (one 32-bit word each: opcode in bits 31..28, bits 27..16 zero, argument in bits 15..0):

``LOAD l``       select layer ``l``; every node's effective bias becomes ``h + c·x`` with ``x`` its current
                 spin (clamped nodes: their clamp)
``RANDOMIZE``    one zero-field sweep: free nodes become ±1 with probability 1/2
``SWEEP k``      ``k`` block-Gibbs sweeps
``CAPTURE k``    emit the current state as a sample; then ``k - 1`` more times, each after ``thin`` sweeps,
                 where ``thin`` is the argument of the most recent ``THIN`` op (default 1)
``THIN t``       set the sweeps between the samples of later ``CAPTURE`` and ``ACCUMULATE`` ops
``ACCUMULATE k`` like ``CAPTURE k``, but each sample is counted into the on-chip moments
                 (``devicemap`` MOMENTS) instead of being sent; a run counts at most
                 ``devicemap.MOMENT_LIMIT`` samples, later ones only advance the chain
``END``          stop (also implied after the last op)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["Opcode", "Op", "encode", "decode", "sampling_sequence", "moments_sequence", "sweeps", "ARG_BITS",
           "MAX_ARG", "OPCODE_SHIFT", "SequenceError", "previous_run_dependence"]

#: Bits of an op's argument: longer runs are split over several ops (``sampling_sequence`` does it), which
#: keeps the sequencer's counters 16 bits wide.
ARG_BITS = 16
MAX_ARG = (1 << ARG_BITS) - 1
#: The opcode sits in the top four bits of the 32-bit op word; the bits between are reserved (zero).
OPCODE_SHIFT = 28


class SequenceError(ValueError):
    """A sequence that cannot run."""


class Opcode(enum.IntEnum):
    END = 0
    LOAD = 1
    RANDOMIZE = 2
    SWEEP = 3
    CAPTURE = 4
    THIN = 5
    ACCUMULATE = 6


@dataclass(frozen=True)
class Op:
    code: Opcode
    arg: int = 0

    def __post_init__(self):
        if not 0 <= self.arg <= MAX_ARG:
            raise SequenceError(f"{self.code.name} argument {self.arg} is outside [0, {MAX_ARG}]")
        if self.code in (Opcode.CAPTURE, Opcode.THIN, Opcode.ACCUMULATE) and self.arg < 1:
            raise SequenceError(f"{self.code.name} needs a positive argument")

    def __str__(self):
        return self.code.name if self.code in (Opcode.RANDOMIZE, Opcode.END) else f"{self.code.name} {self.arg}"


def encode(ops: list[Op]) -> list[int]:
    """32-bit op words (an END is appended)."""
    return [int(op.code) << OPCODE_SHIFT | op.arg for op in ops] + [int(Opcode.END) << OPCODE_SHIFT]


def decode(words) -> list[Op]:
    """Ops up to the first END. Raises ``SequenceError`` for unknown opcodes."""
    ops = []
    for word in words:
        code = word >> OPCODE_SHIFT
        if word >> ARG_BITS & ((1 << (OPCODE_SHIFT - ARG_BITS)) - 1):
            raise SequenceError(f"op word {word:#010x} has reserved bits set")
        try:
            opcode = Opcode(code)
        except ValueError:
            raise SequenceError(f"unknown sequence opcode {code}") from None
        if opcode is Opcode.END:
            break
        ops.append(Op(opcode, word & MAX_ARG))
    return ops


def previous_run_dependence(ops: list[Op], conditioned) -> str | None:
    """Why ``ops`` would depend on the spins a previous run left on the fabric, or None.

    A device's spins at START are those its last run ended with; the emulator starts every chain from all
    +1. The two agree on every sequence that, before its first SWEEP, CAPTURE or ACCUMULATE, has a
    RANDOMIZE, and whose layer in use then was LOADed after that RANDOMIZE unless it has no conditioning
    (``conditioned(layer)`` is False: every ``c`` code is zero, so ``LOAD`` latches no spin).
    """
    randomized, latched_stale = False, False
    for op in ops:
        if op.code is Opcode.LOAD:
            latched_stale = not randomized and conditioned(op.arg)
        elif op.code is Opcode.RANDOMIZE:
            randomized = True
        elif op.code in (Opcode.SWEEP, Opcode.CAPTURE, Opcode.ACCUMULATE) and (op.code is not Opcode.SWEEP or op.arg):
            if not randomized:
                return f"{op} comes before any RANDOMIZE, so it would start from the spins of the previous run"
            if latched_stale:
                return (f"{op} uses a conditioned layer LOADed before the first RANDOMIZE, whose biases h + c·x "
                        f"hold the spins of the previous run; LOAD it again after RANDOMIZE")
    return None


def captures(ops: list[Op]) -> int:
    """Samples a sequence emits."""
    return sum(op.arg for op in ops if op.code is Opcode.CAPTURE)


def sweeps(ops: list[Op]) -> int:
    """Update sweeps a sequence runs (a RANDOMIZE counts as one), not counting read passes."""
    thin, total = 1, 0
    for op in ops:
        if op.code is Opcode.THIN:
            thin = op.arg
        elif op.code is Opcode.SWEEP:
            total += op.arg
        elif op.code is Opcode.RANDOMIZE:
            total += 1
        elif op.code in (Opcode.CAPTURE, Opcode.ACCUMULATE):
            total += (op.arg - 1) * thin
    return total


def _sweep_ops(count: int) -> list[Op]:
    return [Op(Opcode.SWEEP, min(MAX_ARG, count - k)) for k in range(0, count, MAX_ARG)]


def _take_ops(code: Opcode, samples: int, thin: int) -> list[Op]:
    """``samples`` takes (CAPTURE or ACCUMULATE) ``thin`` sweeps apart, split into ops of at most MAX_ARG."""
    ops = []
    for k in range(0, samples, MAX_ARG):
        if k:
            ops += _sweep_ops(thin)   # a new op takes its first sample at once
        ops.append(Op(code, min(MAX_ARG, samples - k)))
    return ops


def _chain_start(burn_in: int, thin: int, layer: int) -> list[Op]:
    if burn_in < 0 or thin < 1 or not 0 <= thin <= MAX_ARG:
        raise SequenceError(f"need burn_in >= 0 and 1 <= thin <= {MAX_ARG}, not {burn_in} and {thin}")
    return [Op(Opcode.LOAD, layer), Op(Opcode.RANDOMIZE)] + _sweep_ops(burn_in) + [Op(Opcode.THIN, thin)]


def sampling_sequence(samples: int, burn_in: int, thin: int, layer: int = 0) -> list[Op]:
    """One chain of contract §2 sampling: load, randomize, ``burn_in`` sweeps, then a sample every ``thin``."""
    ops = _chain_start(burn_in, thin, layer)
    return ops + _take_ops(Opcode.CAPTURE, samples, thin) if samples else ops[:-1]


def moments_sequence(samples: int, burn_in: int, thin: int, layer: int = 0) -> list[Op]:
    """Like ``sampling_sequence``, but the samples are counted into the on-chip moments, not sent."""
    ops = _chain_start(burn_in, thin, layer)
    return ops + _take_ops(Opcode.ACCUMULATE, samples, thin) if samples else ops[:-1]
