"""The gateware fabric against the emulator, bit for bit, and its host-facing behaviour."""

import numpy as np
import pytest
from amaranth.sim import Simulator

from opentsu.compiler import FloatLayer, compile_layers, compile_model
from opentsu.devicemap import Control, Reg, Region, Status, program_writes, sequence_writes
from opentsu.emulator import Emulator
from opentsu.exact import moment_errors
from opentsu.fabric import PRESETS, FabricConfig, FabricGeometry
from opentsu.formats import PBIT, SEED_STEPS, lane_seed_states, seed_injection, xoroshiro64_step
from opentsu.gateware.fabric import Fabric
from opentsu.gateware.pbit import Threshold
from opentsu.gateware.rng import LaneRNG, held_masks, held_next_state
from opentsu.sequence import Op, Opcode
from opentsu.topology import Grid

from .fabricsim import bus_read, bus_write, run_chains
from .util import grid_model


def expected(program, ops, seed, chain=0):
    emu = Emulator(program, chains=1, seed=seed, first_chain=chain)
    out = emu.run(ops, full=True)[0]
    emu.close()
    return out


OPS = [Op(Opcode.LOAD, 0), Op(Opcode.RANDOMIZE), Op(Opcode.SWEEP, 2), Op(Opcode.THIN, 2), Op(Opcode.CAPTURE, 3),
       Op(Opcode.SWEEP, 1), Op(Opcode.CAPTURE, 1)]

CASES = {
    # name: (fabric config, model rows, cols, jumps, torus)
    "8x8-deg4-2lanes-lat3": (FabricConfig(8, 8, ((0, 1),), lanes=2), 7, 6, ((0, 1),), False),
    "8x8-deg8-2lanes-lat2": (FabricConfig(8, 8, ((0, 1), (2, 1)), lanes=2, latency=2), 8, 8, ((0, 1), (2, 1)), True),
    "6x6-deg4-4lanes-lat1": (FabricConfig(6, 6, ((0, 1),), lanes=4, latency=1), 6, 6, ((0, 1),), True),
    "8x8-king-4colours": (FabricConfig(8, 8, ((0, 1), (1, 1)), lanes=4, latency=2), 8, 8, ((0, 1), (1, 1)), True),
    "12x8-deg4-4lanes": (FabricConfig(12, 8, ((0, 1),), lanes=4), 12, 8, ((0, 1),), True),
    "icebreaker": ("icebreaker", 16, 16, PRESETS["icebreaker"].jumps, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fabric_matches_emulator(case):
    fabric, rows, cols, jumps, torus = CASES[case]
    clamp = np.zeros(rows * cols, dtype=np.int8)
    clamp[[1, rows * cols // 2]] = [1, -1]
    model = grid_model(rows, cols, jumps, torus, seed=hash(case) % 1000, scale=0.8, field=0.5, clamp=clamp)
    program = compile_model(model, fabric=fabric)
    ops = OPS if case != "icebreaker" else OPS[:5]
    got = run_chains(program, ops, seed=77, chains=(0, 5), name=case)
    for k, chain in enumerate((0, 5)):
        want = expected(program, ops, seed=77, chain=chain)
        assert got[k].shape == want.shape
        assert np.array_equal(got[k], want), f"chain {chain}: {np.argwhere(got[k] != want)[:5]}"


def test_conditioning_and_layer_switching_match_emulator():
    grid = Grid(8, 8, ((0, 1),), torus=False)
    rng = np.random.default_rng(3)
    layers = []
    for _ in range(3):
        J = np.zeros((64, 64))
        for i, j in grid.edges:
            J[i, j] = J[j, i] = rng.integers(-8, 9) / 8
        clamp = np.zeros(64, dtype=np.int8)
        clamp[rng.integers(0, 64, 2)] = [1, -1]
        layers.append(FloatLayer(rng.integers(-8, 9, 64) / 8, J, 1.0, rng.integers(-24, 25, 64) / 8, clamp))
    program = compile_layers(grid, layers, fabric=FabricConfig(8, 8, ((0, 1),), lanes=2, layers=3))
    # A DTM-like chain: noise, then each layer conditioned on the previous one's output.
    ops = [Op(Opcode.LOAD, 2), Op(Opcode.RANDOMIZE), Op(Opcode.LOAD, 2), Op(Opcode.RANDOMIZE), Op(Opcode.SWEEP, 2),
           Op(Opcode.LOAD, 1), Op(Opcode.RANDOMIZE), Op(Opcode.SWEEP, 2), Op(Opcode.CAPTURE, 1),
           Op(Opcode.LOAD, 0), Op(Opcode.SWEEP, 3), Op(Opcode.CAPTURE, 1)]
    got = run_chains(program, ops, seed=11, name="conditioning")[0]
    assert np.array_equal(got, expected(program, ops, seed=11))


def test_extreme_values_never_wrap():
    # Every weight ±7.875 and biases at the ends of the range: the field spans ±(8·63 + 126) codes.
    model = grid_model(8, 8, ((0, 1), (2, 1)), torus=True, seed=5)
    signs = np.sign(model.J)
    model.J = np.where(signs != 0, np.where(np.random.default_rng(0).random(model.J.shape) < 0.5, 7.875, -7.875), 0)
    model.J = np.triu(model.J, 1) + np.triu(model.J, 1).T
    model.h = np.where(np.arange(64) % 2, 7.875, -7.875)
    program = compile_model(model, fabric=FabricConfig(8, 8, ((0, 1), (2, 1)), lanes=2, latency=2))
    assert program.report.exact
    ops = [Op(Opcode.LOAD, 0), Op(Opcode.RANDOMIZE), Op(Opcode.SWEEP, 3), Op(Opcode.CAPTURE, 2)]
    assert np.array_equal(run_chains(program, ops, seed=3, name="extremes")[0], expected(program, ops, seed=3))


def test_distribution_through_gateware_matches_exact_enumeration():
    model = grid_model(4, 4, ((0, 1),), torus=False, seed=8, scale=0.7, field=0.4)
    program = compile_model(model, fabric=FabricConfig(4, 4, ((0, 1),), lanes=2, latency=1))
    per_chain, chains = 200, 4
    ops = [Op(Opcode.LOAD, 0), Op(Opcode.RANDOMIZE), Op(Opcode.SWEEP, 10), Op(Opcode.THIN, 2),
           Op(Opcode.CAPTURE, per_chain)]
    got = run_chains(program, ops, seed=21, chains=range(chains), name="distribution")
    samples = np.stack([g[:, program.node_map] for g in got])
    z_mean, z_pair = moment_errors(samples, model)
    assert np.abs(z_mean).max() < 4 and np.abs(z_pair).max() < 4


@pytest.mark.parametrize("case", ["8x8-deg8-2lanes-lat2", "12x8-deg4-4lanes", "icebreaker"])
def test_moment_counters_match_emulator(case):
    fabric, rows, cols, jumps, torus = CASES[case]
    model = grid_model(rows, cols, jumps, torus, seed=31, scale=0.6, field=0.3)
    program = compile_model(model, fabric=fabric)
    # Captures and accumulations interleave; moments count only the ACCUMULATE samples.
    ops = [Op(Opcode.LOAD, 0), Op(Opcode.RANDOMIZE), Op(Opcode.SWEEP, 2), Op(Opcode.THIN, 2),
           Op(Opcode.ACCUMULATE, 3), Op(Opcode.CAPTURE, 1), Op(Opcode.ACCUMULATE, 2)]
    if case == "icebreaker":
        ops = ops[:5]
    got = []
    captures = run_chains(program, ops, seed=5, chains=(0, 3), moments=got, name=f"moments-{case}")
    for k, chain in enumerate((0, 3)):
        emu = Emulator(program, chains=1, seed=5, first_chain=chain)
        want_captures = emu.run(ops, full=True)[0]
        assert np.array_equal(captures[k], want_captures)
        want = emu.moments
        assert got[k].samples.tolist() == want.samples.tolist()
        active = np.zeros(program.geometry.n, dtype=bool)
        active[program.geometry.schedule[program.geometry.schedule >= 0]] = True
        assert np.array_equal(got[k].plus[0, active], want.plus[0, active])
        assert np.array_equal(got[k].agree[0, active], want.agree[0, active])
        emu.close()


def test_moment_counting_stops_at_the_limit(monkeypatch):
    import opentsu.devicemap
    import opentsu.emulator
    import opentsu.gateware.fabric
    for module in (opentsu.devicemap, opentsu.emulator, opentsu.gateware.fabric):
        monkeypatch.setattr(module, "MOMENT_LIMIT", 3)
    fabric, rows, cols, jumps, torus = CASES["8x8-deg8-2lanes-lat2"]
    program = compile_model(grid_model(rows, cols, jumps, torus, seed=32), fabric=fabric)
    ops = [Op(Opcode.LOAD, 0), Op(Opcode.RANDOMIZE), Op(Opcode.ACCUMULATE, 5), Op(Opcode.CAPTURE, 1)]
    got = []
    captures = run_chains(program, ops, seed=6, moments=got, name="moment-limit")
    emu = Emulator(program, chains=1, seed=6)
    assert np.array_equal(captures[0], emu.run(ops, full=True)[0])   # the chain ran all 5 samples' sweeps
    assert got[0].samples.tolist() == [3] and emu.moments.samples.tolist() == [3]
    assert np.array_equal(got[0].plus, emu.moments.plus) and np.array_equal(got[0].agree, emu.moments.agree)
    assert got[0].plus.max() <= 3


def test_host_bus_reads_back_and_refuses_writes_while_running():
    model = grid_model(6, 6, ((0, 1),), seed=9)
    program = compile_model(model, fabric=FabricConfig(8, 8, ((0, 1),), lanes=2))
    params = [w for w in program_writes(program) if w[0] == Region.PARAMS][:6]
    loaded = [Op(Opcode.LOAD, 0), Op(Opcode.CAPTURE, 1)]
    long_run = sequence_writes([Op(Opcode.LOAD, 0), Op(Opcode.SWEEP, 40), Op(Opcode.CAPTURE, 1)])

    async def extra(ctx, dut):
        for region, offset, value in params + sequence_writes(loaded):
            assert await bus_read(ctx, dut, region, offset) == value
        status = await bus_read(ctx, dut, Region.REGS, Reg.STATUS)
        assert status & Status.RUNNING == 0 and status & Status.WRITE_REFUSED == 0
        for region, offset, value in long_run:
            await bus_write(ctx, dut, region, offset, value)
        await bus_write(ctx, dut, Region.REGS, Reg.CONTROL, Control.START)
        await ctx.tick().repeat(5)
        assert (await bus_read(ctx, dut, Region.REGS, Reg.STATUS)) & Status.RUNNING
        region, offset, value = params[0]
        await bus_write(ctx, dut, region, offset, value ^ 0x0101)   # refused: keeps the old word
        assert (await bus_read(ctx, dut, Region.REGS, Reg.STATUS)) & Status.WRITE_REFUSED
        await ctx.tick().repeat(400)  # past the LOAD pass, into the 40 sweeps (32 cycles each)
        await bus_write(ctx, dut, Region.REGS, Reg.CONTROL, Control.STOP)
        for _ in range(2000):
            await ctx.tick()
            if not ctx.get(dut.running):
                break
        assert not ctx.get(dut.running)
        assert await bus_read(ctx, dut, region, offset) == value
        assert 0 < await bus_read(ctx, dut, Region.REGS, Reg.SWEEPS) < 40
        await bus_write(ctx, dut, Region.REGS, Reg.STATUS, Status.WRITE_REFUSED)
        assert not (await bus_read(ctx, dut, Region.REGS, Reg.STATUS)) & Status.WRITE_REFUSED

    run_chains(program, loaded, seed=1, extra=extra, name="bus")


def test_bad_sequence_sets_a_flag_and_stops():
    program = compile_model(grid_model(4, 4, seed=10), fabric=FabricConfig(8, 8, ((0, 1),), lanes=2, layers=1))
    ops = [Op(Opcode.LOAD, 0), Op(Opcode.LOAD, 3), Op(Opcode.CAPTURE, 1)]  # layer 3 does not exist

    async def extra(ctx, dut):
        assert (await bus_read(ctx, dut, Region.REGS, Reg.STATUS)) & Status.BAD_SEQUENCE

    got = run_chains(program, ops, seed=1, extra=extra, name="bad_sequence")[0]
    assert len(got) == 0


def test_lane_rng_seeds_by_injection_and_is_the_software_stream():
    lanes = 3
    dut = LaneRNG(lanes)
    states = lane_seed_states(42, [7], lanes)[0]
    bits = [seed_injection(int(states[lane, 0]), int(states[lane, 1])) for lane in range(lanes)]

    async def bench(ctx):
        ctx.set(dut.reset, 1)
        await ctx.tick()
        ctx.set(dut.reset, 0)
        ctx.set(dut.advance, 1)
        for k in range(SEED_STEPS):
            ctx.set(dut.inject, sum(((bits[lane] >> k) & 1) << lane for lane in range(lanes)))
            await ctx.tick()
        ctx.set(dut.inject, 0)
        s0, s1 = states[:, 0].copy(), states[:, 1].copy()
        for step in range(600):
            word, s0, s1 = xoroshiro64_step(s0, s1)
            await ctx.tick()   # the draw
            assert [ctx.get(dut.words[lane]) for lane in range(lanes)] == word.tolist(), step

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()


def test_lane_rng_hardware_form_is_the_software_step():
    # The bitstream's generators are one SB_LUT4 per held bit (held_next_state), which no Amaranth simulation
    # runs: evaluate those functions on random states and compare with the reference step.
    functions = held_next_state()
    assert all(len(terms) <= 4 - (reg == 1 and bit == 0)
               for reg, bits in enumerate(functions) for bit, (terms, _) in enumerate(bits))
    m0, m1 = held_masks()
    rng = np.random.default_rng(9)
    for s0, s1, entropy in zip(rng.integers(0, 1 << 32, 500), rng.integers(0, 1 << 32, 500),
                               rng.integers(0, 2, 500)):
        held = (int(s0) ^ m0, int(s0) ^ int(s1) ^ m1)
        nxt = [sum((((sum(held[r] >> k for r, k in terms) + invert) & 1) << bit)
                   for bit, (terms, invert) in enumerate(bits)) for bits in functions]
        nxt[1] ^= int(entropy)
        _, n0, n1 = xoroshiro64_step(np.uint32(s0), np.uint32(s1))
        assert (nxt[0] ^ m0, nxt[1] ^ m1) == (int(n0), int(n0) ^ int(n1) ^ int(entropy))


def test_threshold_unit_is_the_pbit_rule():
    dut = Threshold(8)
    rng = np.random.default_rng(4)
    words = rng.integers(0, 1 << 32, size=3000, dtype=np.uint64)
    words[:16] = [0, 1 << 31, 0x7FFFFFFF, 0xFFFFFFFF] + [1 << k for k in range(16, 28)]
    biases = rng.integers(-127, 128, size=len(words))
    borrows = rng.integers(0, 2, size=len(words))
    z = PBIT.threshold(words)

    async def bench(ctx):
        late = Threshold.LATENCY - 1  # the bias and the borrow are sampled this many steps after the word
        for k in range(len(words) + Threshold.LATENCY):
            if k < len(words):
                ctx.set(dut.word, int(words[k]))
            if late <= k < len(words) + late:
                ctx.set(dut.bias, int(biases[k - late]) & 0xFF)
                ctx.set(dut.borrow, int(borrows[k - late]))
            if k >= Threshold.LATENCY:
                j = k - Threshold.LATENCY
                assert ctx.get(dut.theta) == int(z[j]) - int(biases[j]) - int(borrows[j]), j
            await ctx.tick()

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()


def test_fabric_without_moment_counters_refuses_accumulate_and_reads_zero():
    geometry = FabricGeometry(FabricConfig(8, 8, ((0, 1),), lanes=1))
    dut = Fabric(geometry, moments=False)
    assert not dut.moments

    async def bench(ctx):
        for region, offset, value in sequence_writes([Op(Opcode.LOAD, 0), Op(Opcode.ACCUMULATE, 2)]):
            await bus_write(ctx, dut, region, offset, value)
        await bus_write(ctx, dut, Region.REGS, Reg.CONTROL, Control.START)
        for _ in range(2000):
            await ctx.tick()
            if not ctx.get(dut.running):
                break
        assert (await bus_read(ctx, dut, Region.REGS, Reg.STATUS)) & Status.BAD_SEQUENCE
        assert await bus_read(ctx, dut, Region.REGS, Reg.MOMENT_SAMPLES) == 0
        assert await bus_read(ctx, dut, Region.MOMENTS, 0) == 0

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
