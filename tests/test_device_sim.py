"""End to end: the host driver talks to the simulated device over its UART pins."""

import numpy as np

from opentsu.compiler import compile_model
from opentsu.devicemap import Region
from opentsu.emulator import Emulator
from opentsu.fabric import FabricConfig
from opentsu.gateware.device import Device as DeviceTop
from opentsu.link import Device, SimTransport
from opentsu.sequence import sampling_sequence

from .util import grid_model

CLOCK, DIVISOR = 12_000_000, 4


def test_sampling_over_the_simulated_uart_matches_the_emulator():
    model = grid_model(4, 4, ((0, 1),), torus=False, seed=60, clamp=[0] * 15 + [-1])
    program = compile_model(model, fabric=FabricConfig(4, 4, ((0, 1),), lanes=2, latency=1))
    top = DeviceTop(program.geometry, clock_hz=CLOCK, divisor=DIVISOR, fifo_depth=64)
    with SimTransport(top, clock_hz=CLOCK, divisor=DIVISOR) as transport:
        device = Device(transport, timeout=0.02)
        assert device.identity.lanes == 2 and device.identity.cycles == program.geometry.cycles
        device.load_program(program)
        params = [w for r, o, w in __import__("opentsu.devicemap", fromlist=["x"]).program_writes(program)
                  if r == Region.PARAMS]
        assert device.read_words(Region.PARAMS, 0, 4) == params[:4]
        ops = sampling_sequence(6, burn_in=3, thin=2)
        got = [device.run(program, ops, seed=9, chain=c) for c in (0, 1)]
    for chain in (0, 1):
        emu = Emulator(program, chains=1, seed=9, first_chain=chain)
        assert np.array_equal(got[chain], emu.run(ops, full=True)[0])
