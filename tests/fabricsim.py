"""Drive ``gateware.fabric.Fabric`` in the Amaranth simulator through its host bus."""

from __future__ import annotations

import os

import numpy as np
from amaranth.sim import Simulator

from opentsu.devicemap import (Control, Reg, Region, address, moments_from_words, program_writes, region_words,
                               seed_writes, sequence_writes, unpack_capture)
from opentsu.gateware.fabric import Fabric


async def bus_write(ctx, dut, region, offset, value):
    ctx.set(dut.bus.addr, address(region, offset))
    ctx.set(dut.bus.w_data, value)
    ctx.set(dut.bus.w_en, 1)
    await ctx.tick()
    ctx.set(dut.bus.w_en, 0)


async def bus_read(ctx, dut, region, offset):
    ctx.set(dut.bus.addr, address(region, offset))
    ctx.set(dut.bus.r_en, 1)
    await ctx.tick()
    ctx.set(dut.bus.r_en, 0)
    for _ in range(4):  # the answer comes a few cycles later, marked by r_valid
        if ctx.get(dut.bus.r_valid):
            return ctx.get(dut.bus.r_data)
        await ctx.tick()
    raise AssertionError("the fabric did not answer a bus read")


def vcd(name):
    """A VCD file name when OPENTSU_VCD is set, so each test can keep its own trace."""
    return f"{name}.vcd" if os.environ.get("OPENTSU_VCD") else None


async def read_moments(ctx, dut, geometry):
    """The fabric's MOMENTS region and MOMENT_SAMPLES register, as ``emulator.Moments`` of one chain."""
    g = geometry
    words = [await bus_read(ctx, dut, Region.MOMENTS, k)
             for k in range(region_words(Region.MOMENTS, g.lanes, g.cycles, g.degree, g.config.layers))]
    return moments_from_words(words, await bus_read(ctx, dut, Region.REGS, Reg.MOMENT_SAMPLES), g)


def run_chains(program, ops, seed, chains=(0,), extra=None, name="fabric", max_cycles=2_000_000, moments=None):
    """Run ``ops`` once per chain (re-seeding, program loaded once) and return the captures.

    Returns a list (per chain) of (captures, fabric nodes) int8 arrays. ``extra`` is an optional async
    function ``extra(ctx, dut)`` run after the last chain. With a list for ``moments``, each chain's
    on-chip moments (``read_moments``) are appended to it.
    """
    dut = Fabric(program.geometry)
    g = program.geometry
    results = []

    async def bench(ctx):
        for region, offset, value in program_writes(program) + sequence_writes(ops):
            await bus_write(ctx, dut, region, offset, value)
        for chain in chains:
            for region, offset, value in seed_writes(seed, chain, g.lanes):
                await bus_write(ctx, dut, region, offset, value)
            await bus_write(ctx, dut, Region.REGS, Reg.CONTROL, Control.START)
            ctx.set(dut.samples.ready, 1)
            for _ in range(6):  # START is registered: the run begins within a few cycles
                if ctx.get(dut.running):
                    break
                await ctx.tick()
            words, cycles = [], 0
            while True:
                _, _, valid, payload, running = await ctx.tick().sample(
                    dut.samples.valid, dut.samples.payload, dut.running)
                cycles += 1
                if valid:
                    words.append(payload)
                if not running:
                    break
                assert cycles < max_cycles, "the fabric did not finish"
            ctx.set(dut.samples.ready, 0)
            captures = [unpack_capture(words[k:k + g.cycles], g) for k in range(0, len(words), g.cycles)]
            results.append(np.array(captures, dtype=np.int8).reshape(-1, g.n))
            if moments is not None:
                moments.append(await read_moments(ctx, dut, g))
        if extra is not None:
            await extra(ctx, dut)

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    trace = vcd(name)
    if trace:
        with sim.write_vcd(trace):
            sim.run()
    else:
        sim.run()
    return results
