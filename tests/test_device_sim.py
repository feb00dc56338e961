"""End to end: the host driver talks to the simulated device over its UART pins, bit by bit."""

import numpy as np
import pytest

from opentsu.cli import main
from opentsu.compiler import compile_model
from opentsu.devicemap import Region, program_writes
from opentsu.emulator import Emulator
from opentsu.fabric import FabricConfig
from opentsu.gateware.device import Device as DeviceTop
from opentsu.link import Device, LinkError, SimTransport, Transport
from opentsu.model import save_model
from opentsu.protocol import Command, FrameDecoder, encode_frame
from opentsu.sequence import sampling_sequence

from .util import grid_model

CLOCK, DIVISOR = 12_000_000, 4


class Watch(Transport):
    """Passes whole response frames to the host, counting the SAMPLES requests sent and not yet answered
    (``most``: the largest count seen); ``lose`` drops the n-th SAMPLES response (from 1)."""

    def __init__(self, inner, lose=None):
        self.inner = inner
        self.lose = lose
        self.waiting = set()
        self.most = 0
        self.answered = 0
        self._requests, self._responses = FrameDecoder(), FrameDecoder()

    def write(self, data):
        self.waiting |= {seq for code, seq, _ in self._requests.feed(data) if code == Command.SAMPLES}
        self.most = max(self.most, len(self.waiting))
        self.inner.write(data)

    def read_some(self, timeout):
        deadline = self.inner.now() + timeout
        out = b""
        while not out and self.inner.now() < deadline:
            for code, seq, payload in self._responses.feed(self.inner.read_some(deadline - self.inner.now())):
                if seq in self.waiting:
                    self.waiting.discard(seq)
                    self.answered += 1
                    if self.answered == self.lose:
                        continue
                out += encode_frame(code, seq, payload)
        return out

    def now(self):
        return self.inner.now()

    def idle(self, seconds):
        self.inner.idle(seconds)


def test_sampling_over_the_simulated_uart_matches_the_emulator():
    """A small FIFO makes each chain several full SAMPLES responses: the host keeps one request queued
    behind the one being answered, the device sees no overrun, and the samples are the emulator's. A
    response lost on the way is a LinkError, and the link stays in step."""
    model = grid_model(4, 4, ((0, 1),), torus=False, seed=60, clamp=[0] * 15 + [-1])
    program = compile_model(model, fabric=FabricConfig(4, 4, ((0, 1),), lanes=2, latency=1))
    top = DeviceTop(program.geometry, clock_hz=CLOCK, divisor=DIVISOR, fifo_depth=16)
    with SimTransport(top, clock_hz=CLOCK, divisor=DIVISOR) as transport:
        device = Device(transport, timeout=0.005)
        assert device.identity.lanes == 2 and device.identity.cycles == program.geometry.cycles
        device.load_program(program)
        params = sorted((o, w) for r, o, w in program_writes(program) if r == Region.PARAMS)
        assert device.read_words(Region.PARAMS, 0, len(params)) == [w for _, w in params]
        ops = sampling_sequence(10, burn_in=3, thin=2)
        watch = Watch(transport)
        device.link.transport = watch
        got = [device.run(program, ops, seed=9, chain=c) for c in (0, 1)]
        # 80 words a chain, at most 17 a response (the FIFO and its output register).
        assert watch.most == 2 and not watch.waiting and watch.answered >= 2 * 5
        status = device.status()
        assert (status.overruns, status.framing_errors, status.crc_errors, status.timeouts, status.rejected) == \
               (0, 0, 0, 0, 0)
        assert device.link.resent == 0 and device.link.garbage == 0

        # The third response, full like the two before it, never arrives: its 17 words are gone.
        device.link.transport = watch = Watch(transport, lose=3)
        with pytest.raises(LinkError, match="lost words: expected word 34 next, the device sent word 51$"):
            device.run(program, ops, seed=9, chain=0)
        assert not watch.waiting
        assert device.status().overruns == 0 and device.link.garbage == 0
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
