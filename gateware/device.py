"""The board-independent device: UART, command engine, sample FIFO and fabric.

Boards (``opentsu.boards``) wrap it with clocks, pins and LEDs; simulation and Verilator drive its UART pins
directly, through the same host driver that talks to a real board.
"""

from amaranth import *
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from opentsu.devicemap import SEQUENCE_DEPTH
from opentsu.fabric import FabricGeometry
from opentsu.protocol import PROTOCOL_VERSION, Identity

from .fabric import Fabric
from .fifo import StreamFIFO
from .protocol import CommandEngine
from .trng import TRNG
from .uart import UARTRx, UARTTx

__all__ = ["Device", "identity_of"]


def identity_of(geometry: FabricGeometry, clock_hz: int, divisor: int, fifo_depth: int, trng: bool,
                moments: bool = True) -> Identity:
    """What a device built with these parameters answers to IDENTIFY."""
    cfg = geometry.config
    return Identity(version=PROTOCOL_VERSION, rows=cfg.rows, cols=cfg.cols, jumps=geometry.grid.jumps,
                    lanes=cfg.lanes, latency=cfg.latency, cycles=geometry.cycles, degree=geometry.degree,
                    layers=cfg.layers, sequence_depth=SEQUENCE_DEPTH, sample_word_bytes=(cfg.lanes + 7) // 8,
                    fifo_depth=fifo_depth, clock_hz=clock_hz, divisor=divisor, trng=trng, moments=moments)


class Device(wiring.Component):
    """A complete OpenTSU device.

    Parameters
    ----------
    geometry : FabricGeometry
    clock_hz : int        the ``sync`` clock, reported by IDENTIFY
    divisor : int         clock cycles per UART bit
    target : str          memory primitives (``Fabric.TARGETS``); the fabric has the on-chip moment
                          counters where ``Fabric.builds_moments(target)``, and IDENTIFY says so
    fifo_depth : int      capture words buffered for SAMPLES

    trng : bool           include the ring-oscillator TRNG (its bits reach the lanes only while the run
                          flag ``TRNG_MIX`` is set; in simulation it is the TRNG's oscillator model)
    identity_rom : bool   keep the command engine's IDENTIFY answer in a block RAM rather than in logic
                          (for a part with a block RAM to spare: the iCEstick)

    Ports
    -----
    rx : In(1), tx : Out(1)     UART pins (idle high, 8N1)
    running, error : Out(1)     for LEDs: a sequence runs; a sticky fabric or link error is set
    trng_alarm : Out(1)         for a LED: the TRNG's health tests failed (sticky until RESET)
    """

    rx: In(1, init=1)
    tx: Out(1, init=1)
    running: Out(1)
    error: Out(1)
    trng_alarm: Out(1)

    def __init__(self, geometry: FabricGeometry, *, clock_hz: int, divisor: int, target: str = "generic",
                 fifo_depth: int = 256, trng: bool = True, identity_rom: bool = False):
        self._g = geometry
        self._clock_hz = clock_hz
        self._divisor = divisor
        self._target = target
        self._fifo_depth = fifo_depth
        self._trng = trng
        self._identity_rom = bool(identity_rom)
        self._identity = identity_of(geometry, clock_hz, divisor, fifo_depth, trng=trng,
                                     moments=Fabric.builds_moments(target))
        super().__init__()

    @property
    def identity(self) -> Identity:
        return self._identity

    def elaborate(self, platform):
        m = Module()
        g = self._g
        m.submodules.uart_rx = uart_rx = UARTRx(self._divisor)
        m.submodules.uart_tx = uart_tx = UARTTx(self._divisor)
        # The engine's and the FIFO's memories are plain block RAMs on every iCE40 part (`ram.TARGETS`).
        ram_target = "generic" if self._target == "generic" else "ice40"
        m.submodules.engine = engine = CommandEngine(self._identity, self._divisor,
                                                     rom=ram_target if self._identity_rom else None)
        m.submodules.fabric = fabric = Fabric(g, target=self._target)
        m.submodules.fifo = fifo = StreamFIFO(8 * self._identity.sample_word_bytes, self._fifo_depth,
                                              target=ram_target)

        m.d.comb += [uart_rx.rx.eq(self.rx), self.tx.eq(uart_tx.tx)]
        wiring.connect(m, uart_rx.o, engine.rx)
        wiring.connect(m, engine.tx, uart_tx.i)
        m.d.comb += [engine.framing_error.eq(uart_rx.framing_error), engine.overrun.eq(uart_rx.overrun)]
        wiring.connect(m, engine.bus, fabric.bus)
        m.d.comb += [fifo.i.valid.eq(fabric.samples.valid), fifo.i.payload.eq(fabric.samples.payload),
                     fabric.samples.ready.eq(fifo.i.ready)]
        wiring.connect(m, fifo.o, engine.samples)
        m.d.comb += [engine.samples_level.eq(fifo.level), fifo.flush.eq(engine.samples_flush),
                     engine.running.eq(fabric.running), engine.fabric_error.eq(fabric.error)]
        m.d.comb += [self.running.eq(fabric.running), self.error.eq(fabric.error | engine.link_error)]
        if self._trng:
            m.submodules.trng = trng = TRNG(g.lanes)
            wiring.connect(m, trng.o, fabric.mix)
            m.d.comb += [engine.trng_alarm.eq(trng.alarm), self.trng_alarm.eq(trng.alarm),
                         engine.trng_failures.eq(Mux(trng.failures > 255, 255, trng.failures)),
                         trng.clear.eq(engine.samples_flush)]
        return m
