"""End to end: the host driver talks to the simulated device over its UART pins, bit by bit."""

import numpy as np

from opentsu.cli import main
from opentsu.compiler import compile_model
from opentsu.devicemap import Region, program_writes
from opentsu.emulator import Emulator
from opentsu.fabric import FabricConfig
from opentsu.gateware.device import Device as DeviceTop
from opentsu.link import Device, SimTransport
from opentsu.model import save_model
from opentsu.sequence import sampling_sequence

from .util import grid_model

CLOCK, DIVISOR = 12_000_000, 4


def test_sampling_over_the_simulated_uart_matches_the_emulator():
    model = grid_model(4, 4, ((0, 1),), torus=False, seed=60, clamp=[0] * 15 + [-1])
    program = compile_model(model, fabric=FabricConfig(4, 4, ((0, 1),), lanes=2, latency=1))
    top = DeviceTop(program.geometry, clock_hz=CLOCK, divisor=DIVISOR, fifo_depth=64)
    with SimTransport(top, clock_hz=CLOCK, divisor=DIVISOR) as transport:
        device = Device(transport, timeout=0.005)
        assert device.identity.lanes == 2 and device.identity.cycles == program.geometry.cycles
        device.load_program(program)
        params = sorted((o, w) for r, o, w in program_writes(program) if r == Region.PARAMS)
        assert device.read_words(Region.PARAMS, 0, len(params)) == [w for _, w in params]
        ops = sampling_sequence(6, burn_in=3, thin=2)
        got = [device.run(program, ops, seed=9, chain=c) for c in (0, 1)]
        assert device.link.resent == 0 and device.link.garbage == 0
    for chain in (0, 1):
        emu = Emulator(program, chains=1, seed=9, first_chain=chain)
        assert np.array_equal(got[chain], emu.run(ops, full=True)[0])


def test_cli_sim_backend_matches_the_reference(tmp_path, capsys):
    """CONTRACTS §2: the same seed, model and options give the same OUT.npy on reference and sim."""
    path = tmp_path / "m.npz"
    save_model(path, grid_model(4, 4, ((0, 1),), torus=False, seed=61, clamp=[0] * 5 + [1] + [0] * 10))
    options = ["-n", "7", "--chains", "2", "--burn-in", "3", "--thin", "2", "--seed", "12", "--fabric", "auto",
               "-q"]
    outputs = {}
    for backend in ("reference", "sim"):
        out = tmp_path / f"{backend}.npy"
        assert main(["sample", str(path), "-o", str(out), "--backend", backend] + options) == 0, \
            capsys.readouterr().err
        outputs[backend] = np.load(out)
    assert outputs["sim"].shape == (7, 16) and outputs["sim"].dtype == np.int8
    assert np.all(outputs["sim"][:, 5] == 1)
    assert np.array_equal(outputs["sim"], outputs["reference"])
