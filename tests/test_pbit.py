"""The per-lane p-bit datapath (``gateware.pbit``, ``gateware.rng``) against plain integer arithmetic."""

import numpy as np
import pytest
from amaranth.hdl import Const, Fragment, Instance, Signal

from opentsu.formats import PBIT, RNG_RESET_STATE, WEIGHT, xoroshiro64_step
from opentsu.gateware.pbit import SpinSum, Threshold, theta_bits
from opentsu.gateware.rng import LaneRNG

from .streams import simulate


@pytest.mark.parametrize("degree,latency", [(8, 3), (8, 2), (8, 4), (4, 3), (5, 3), (1, 3), (2, 3), (7, 2)])
def test_spin_sum_compares_the_signed_sum_with_theta(degree, latency):
    """(Latency 1 has no clock of its own; the fabric tests cover it.)"""
    dut = SpinSum(degree, latency)
    rng = np.random.default_rng(degree * 10 + latency)
    n = 600
    # The full code range, -64 included, and runs of all-negative and all-positive spins.
    weights = rng.integers(-64, 64, size=(n, degree))
    weights[:8] = -64
    weights[8:16] = 63
    spins = rng.integers(0, 2, size=(n, degree))
    spins[:4] = 0
    spins[8:12] = 0
    spins[4:8] = 1
    zero = rng.random(n) < 0.1
    sums = np.where(zero, 0, ((2 * spins - 1) * weights).sum(axis=1))
    # Thresholds near the sum (both sides of it) and anywhere in the θ range.
    limit = 1 << (theta_bits(degree) - 1)
    near = sums + rng.integers(-3, 4, size=n)
    anywhere = rng.integers(-limit + 2, limit - 1, size=n)
    targets = np.clip(np.where(rng.random(n) < 0.7, near, anywhere), -limit + 1, limit - 2)
    P, at = latency, dut.theta_stage

    async def bench(ctx):
        borrows = {}
        for k in range(n + P):
            if k < n:
                ctx.set(dut.spins, int(sum(int(b) << d for d, b in enumerate(spins[k]))))
                ctx.set(dut.weights, int(sum((int(w) & 0x7F) << (WEIGHT.bits * d) for d, w in enumerate(weights[k]))))
                ctx.set(dut.zero, int(zero[k]))
                borrows[k] = ctx.get(dut.borrow) if dut.uses_borrow else 0
            j = k - at
            if 0 <= j < n:
                ctx.set(dut.theta, int(targets[j]) - borrows[j])
            j = k - (P - 1)
            if 0 <= j < n:
                assert ctx.get(dut.spin) == int(sums[j] >= targets[j]), (j, sums[j], targets[j])
            await ctx.tick()

    simulate(dut, bench, name=f"spin_sum_{degree}_{latency}")


def test_threshold_covers_every_cell_of_the_table():
    """Every (fold, octave, mantissa) cell of ``PBIT.threshold_table``, with random biases and borrows."""
    dut = Threshold(8)
    p = PBIT
    fold, e, mant = np.meshgrid(np.arange(2), np.arange(p.octaves), np.arange(1 << p.mant_bits), indexing="ij")
    fold, e, mant = fold.ravel(), e.ravel(), mant.ravel()
    field = np.where(e == p.exp_bits, 0, 1 << (p.exp_bits - 1 - np.minimum(e, p.exp_bits - 1)))
    rng = np.random.default_rng(11)
    # Random bits below the leading one of the octave field and below the mantissa must not matter.
    noise = rng.integers(0, 1 << 32, size=len(e), dtype=np.uint64)
    below_lead = np.where(e >= p.exp_bits - 1, 0, field - 1)
    words = ((fold.astype(np.uint64) << p.fold_bit) | (field.astype(np.uint64) << p.exp_lsb)
             | ((noise >> 40) & below_lead.astype(np.uint64)) << p.exp_lsb
             | (mant.astype(np.uint64) << p.mant_lsb) | (noise & ((1 << p.mant_lsb) - 1)))
    want_z = p.threshold_table[fold, e, mant].astype(np.int64)
    assert np.array_equal(p.threshold(words), want_z)
    biases = rng.integers(-127, 128, size=len(words))
    borrows = rng.integers(0, 2, size=len(words))
    L = Threshold.LATENCY

    async def bench(ctx):
        for k in range(len(words) + L):
            if k < len(words):
                ctx.set(dut.word, int(words[k]))
            if L - 1 <= k < len(words) + L - 1:
                ctx.set(dut.bias, int(biases[k - L + 1]) & 0xFF)
                ctx.set(dut.borrow, int(borrows[k - L + 1]))
            if k >= L:
                j = k - L
                assert ctx.get(dut.theta) == want_z[j] - biases[j] - borrows[j], j
            await ctx.tick()

    simulate(dut, bench, name="threshold_table")


def _instances(fragment):
    for sub, _name, _src in fragment.subfragments:
        if isinstance(sub, Instance):
            yield sub
        else:
            yield from _instances(sub)


def test_lane_rng_hardware_luts_are_the_generator_step():
    """Elaborated for hardware, the bank's next-state bits are ``SB_LUT4`` instances; evaluated from their
    truth tables they take the stored state (each word XORed with its reset value) one step on."""
    lanes = 2
    dut = LaneRNG(lanes)
    fragment = Fragment.get(dut, platform=object())
    luts = [inst for inst in _instances(fragment) if inst.type == "SB_LUT4"]
    assert len(luts) == 64 * lanes
    masks = (RNG_RESET_STATE[0], RNG_RESET_STATE[0] ^ RNG_RESET_STATE[1])
    rng = np.random.default_rng(3)
    for trial in range(20):
        s0, s1 = (int(x) for x in rng.integers(0, 1 << 32, size=2, dtype=np.uint64))
        entropy = int(rng.integers(0, 1 << lanes))
        values = {}
        for lane in range(lanes):
            values[f"s0_{lane}"] = s0 ^ masks[0]
            values[f"u_{lane}"] = s0 ^ s1 ^ masks[1]
        values["entropy"] = entropy

        def bit(value):
            if isinstance(value, Const):
                return value.value
            if isinstance(value, Signal):
                return values[value.name] & 1
            assert value.stop == value.start + 1
            return values[value.value.name] >> value.start & 1

        got = {}
        for inst in luts:
            index = sum(bit(inst.ports[f"I{k}"][0]) << k for k in range(4))
            got[inst.ports["O"][0].name] = inst.parameters["LUT_INIT"].value >> index & 1
        _, n0, n1 = xoroshiro64_step(np.uint32(s0), np.uint32(s1))
        for lane in range(lanes):
            s0_next = sum(got[f"s0_{lane}_next{i}"] << i for i in range(32))
            u_next = sum(got[f"u_{lane}_next{i}"] << i for i in range(32))
            assert s0_next == int(n0) ^ masks[0], (trial, lane)
            assert u_next == int(n0) ^ int(n1) ^ (entropy >> lane & 1) ^ masks[1], (trial, lane)
