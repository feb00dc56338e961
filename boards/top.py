"""Board top levels: a ``gateware.device.Device`` with a PLL clock, power-on reset, UART pins and LEDs.

A :class:`Board` names an amaranth-boards platform and what OpenTSU builds on it (fabric, clock, memory
target, LEDs); :data:`BOARDS` holds the supported ones. :class:`BoardTop` is the design handed to the
platform's ``build``/``prepare``.
"""


from dataclasses import dataclass, field

from amaranth.hdl import ClockDomain, ClockSignal, DomainRenamer, Module, ResetSignal, Signal
from amaranth.lib import io, wiring
from amaranth.lib.cdc import FFSynchronizer
from amaranth.lib.wiring import In, Out
from amaranth_boards.ice40_hx8k_b_evn import ICE40HX8KBEVNPlatform
from amaranth_boards.icebreaker import ICEBreakerPlatform
from amaranth_boards.icestick import ICEStickPlatform

from opentsu.fabric import PRESETS, FabricConfig, FabricGeometry
from opentsu.gateware.device import Device, identity_of
from opentsu.gateware.fabric import Fabric
from opentsu.gateware.uart import baud_divisor

from .pll import PLL, pll_parameters

__all__ = ["Board", "BOARDS", "BoardTop", "LockReset", "clock_plan", "LED_ROLES", "UART_BAUD", "POR_SECONDS"]

#: Line rate of every board's UART: the FT2232H on these boards makes 3 Mbaud exactly (12 MHz / 4).
UART_BAUD = 3_000_000
#: What the LEDs show, in the order boards list their LEDs for them.
LED_ROLES = ("running", "error", "alarm", "heartbeat")
#: How long the design is held in reset after the PLL locks. iCE40 block RAMs read as zero for ~3 µs after
#: configuration; this leaves a 5× margin.
POR_SECONDS = 16e-6


@dataclass(frozen=True)
class Board:
    """What OpenTSU builds for one board.

    ``leds`` maps each of :data:`LED_ROLES` to a ``(resource name, number)`` of the platform (a role may be
    missing). ``clock_hz`` is the fabric clock the PLL makes from the board oscillator: a multiple of
    :data:`UART_BAUD` so the UART divisor is exact, and one the fabric closes timing at on this part.
    ``pll_pad`` uses ``SB_PLL40_PAD`` on the clock pin (the pin is the PLL's dedicated input), otherwise
    ``SB_PLL40_CORE`` after the pin's global buffer. ``extra_resources`` names a platform attribute with
    resources to add (the iCEBreaker's snap-off PMOD). ``identity_rom`` keeps the command engine's IDENTIFY
    answer in a block RAM (on a part with one to spare) rather than in logic cells.
    """

    name: str
    platform: type
    fabric: FabricConfig
    target: str
    clock_hz: int
    pll_pad: bool
    leds: dict = field(default_factory=dict)
    fifo_depth: int = 256
    extra_resources: str | None = None
    identity_rom: bool = False
    description: str = ""

    def make_platform(self):
        """A fresh platform instance (amaranth platforms build once each)."""
        platform = self.platform()
        if self.extra_resources:
            platform.add_resources(getattr(platform, self.extra_resources))
        return platform

    @property
    def device(self) -> str:
        return self.platform.device

    @property
    def package(self) -> str:
        return self.platform.package


BOARDS = {
    "icebreaker": Board(
        name="icebreaker", platform=ICEBreakerPlatform, fabric=PRESETS["icebreaker"], target="ice40-up5k",
        # A multiple of 3 MHz (an exact 3 Mbaud UART) at or below the 8-lane preset's Fmax over placement
        # seeds: docs/boards.md.
        clock_hz=48_000_000, pll_pad=True, extra_resources="break_off_pmod",
        # led 0 is the red LED by the USB connector, led 1 the green one; led_r 1 is the snap-off PMOD's red
        # LED (LED1) and led_g 1 its green LED2.
        leds={"running": ("led_g", 0), "error": ("led_r", 0), "alarm": ("led_r", 1), "heartbeat": ("led_g", 1)},
        description="1BitSquared iCEBreaker (iCE40UP5K-SG48): SPRAM and EBR weights",
    ),
    "hx8k": Board(
        name="hx8k", platform=ICE40HX8KBEVNPlatform, fabric=PRESETS["hx8k"], target="ice40",
        # The 4-lane preset's Fmax on this part is 94.7–100.4 MHz over three seeds (docs/boards.md).
        clock_hz=90_000_000, pll_pad=False,
        leds={"running": ("led", 0), "error": ("led", 1), "alarm": ("led", 2), "heartbeat": ("led", 7)},
        description="Lattice iCE40-HX8K breakout board (iCE40HX8K-CT256): EBR weights",
    ),
    "icestick": Board(
        name="icestick", platform=ICEStickPlatform, fabric=PRESETS["icestick"], target="ice40",
        clock_hz=48_000_000, pll_pad=False,
        # led 0–3 are the red LEDs round the edge, led 4 the green one in the middle.
        leds={"running": ("led", 4), "error": ("led", 0), "alarm": ("led", 1), "heartbeat": ("led", 2)},
        fifo_depth=128, identity_rom=True,
        description="Lattice iCEstick (iCE40HX1K-TQ144): EBR weights",
    ),
}


class BoardTop(wiring.Component):
    """The complete design for ``board``: give it to ``board.make_platform().build(...)``.

    Parameters override the board's defaults: ``fabric`` (a ``FabricConfig``), ``clock_hz`` (must be a
    PLL-exact multiple of :data:`UART_BAUD`), ``fifo_depth``; ``trng=False`` leaves out the ring-oscillator
    TRNG. Raises ``ValueError`` (``PLLError``) if the PLL cannot make the clock exactly, and ``ValueError`` if
    the UART divisor would not be exact.

    The design: the PLL makes ``clock_hz`` (constrained at that frequency for nextpnr); ``sync`` is held in
    reset until the PLL has been locked for :data:`POR_SECONDS`; the device's UART sits on the board's USB
    serial port; LEDs show a running sequence, a sticky error, the TRNG health-test alarm and a heartbeat of
    about 1 Hz once the clock runs.

    The top level has no ports of its own (everything is a board pin).
    """

    def __init__(self, board: Board, *, fabric: FabricConfig | None = None, clock_hz: int | None = None,
                 fifo_depth: int | None = None, trng: bool = True):
        if not isinstance(board, Board):
            raise TypeError(f"a board top needs a Board, not {board!r}")
        self._board = board
        self._config = fabric if fabric is not None else board.fabric
        self._geometry = FabricGeometry(self._config)
        self._clock_hz = int(clock_hz if clock_hz is not None else board.clock_hz)
        self._pll, self._divisor = clock_plan(board, self._clock_hz)
        self._fifo_depth = fifo_depth or board.fifo_depth
        self._trng = bool(trng)
        self._device = None     # made by elaborate(), so an unbuilt top leaves no unused elaboratable
        super().__init__({})

    @property
    def board(self) -> Board:
        return self._board

    @property
    def geometry(self) -> FabricGeometry:
        return self._geometry

    @property
    def clock_hz(self) -> int:
        return self._clock_hz

    @property
    def pll_parameters(self):
        return self._pll

    @property
    def divisor(self) -> int:
        return self._divisor

    @property
    def device(self) -> Device | None:
        """The ``Device`` inside, once the top has been elaborated (None before)."""
        return self._device

    @property
    def identity(self):
        """What the built device answers to IDENTIFY."""
        if self._device is not None:
            return self._device.identity
        return identity_of(self._geometry, self._clock_hz, self._divisor, self._fifo_depth, trng=self._trng,
                           moments=Fabric.builds_moments(self._board.target))

    @property
    def has_trng(self) -> bool:
        """The device contains the ring-oscillator TRNG (nextpnr then needs ``--ignore-loops``)."""
        return bool(self.identity.trng)

    def elaborate(self, platform):
        m = Module()
        board = self._board

        # Clock: board oscillator → PLL → global net, constrained at the fabric clock.
        clk_port = platform.request(platform.default_clk, dir="-")
        if board.pll_pad:
            m.submodules.pll = pll = PLL(self._pll, pad=clk_port)
        else:
            m.submodules.clk_buf = clk_buf = io.Buffer("i", clk_port)
            m.submodules.pll = pll = PLL(self._pll)
            m.d.comb += pll.reference.eq(clk_buf.i)
        clk = Signal(name="clk_fabric")
        m.d.comb += clk.eq(pll.clk)
        platform.add_clock_constraint(clk, self._clock_hz)

        # Reset: held until the PLL has been locked for POR_SECONDS.
        m.domains.sync = ClockDomain("sync")
        m.domains.por = ClockDomain("por", reset_less=True, local=True)
        m.d.comb += [ClockSignal("sync").eq(clk), ClockSignal("por").eq(clk)]
        m.submodules.lock_reset = lock_reset = DomainRenamer("por")(
            LockReset(max(1, round(POR_SECONDS * self._clock_hz))))
        m.d.comb += [lock_reset.lock.eq(pll.lock), ResetSignal("sync").eq(lock_reset.reset)]

        # The device on the USB serial port.
        self._device = device = Device(self._geometry, clock_hz=self._clock_hz, divisor=self._divisor,
                                       target=board.target, fifo_depth=self._fifo_depth, trng=self._trng,
                                       identity_rom=board.identity_rom)
        m.submodules.device = device
        uart = platform.request("uart", 0, dir="-")
        m.submodules.uart_rx = rx_buf = io.Buffer("i", uart.rx)
        m.submodules.uart_tx = tx_buf = io.Buffer("o", uart.tx)
        m.d.comb += [device.rx.eq(rx_buf.i), tx_buf.o.eq(device.tx)]

        # LEDs.
        heartbeat = Signal(max(2, (self._clock_hz // 2).bit_length()))
        m.d.sync += heartbeat.eq(heartbeat + 1)
        shown = {"running": device.running, "error": device.error, "alarm": device.trng_alarm,
                 "heartbeat": heartbeat[-1]}
        for role, (resource, number) in board.leds.items():
            led = platform.request(resource, number, dir="-")
            buf = io.Buffer("o", led)
            m.submodules[f"led_{role}"] = buf
            m.d.comb += buf.o.eq(shown[role])
        return m


class LockReset(wiring.Component):
    """A reset that is held until a clock source has been locked for ``cycles`` clock cycles.

    ``lock`` is asynchronous (a PLL's LOCK output) and passes through a 2-flip-flop synchroniser. ``reset``
    is high from configuration until ``lock`` has been high for ``cycles`` cycles after the synchroniser,
    and goes high again on the cycle after a loss of lock leaves the synchroniser. The block itself has no
    reset: use it in a reset-less domain clocked by the source it watches.

    Ports
    -----
    lock : In(1)      the source is locked
    reset : Out(1)    hold the design in reset
    """

    lock: In(1)
    reset: Out(1, init=1)

    def __init__(self, cycles: int):
        if not isinstance(cycles, int) or cycles < 1:
            raise ValueError(f"reset delay must be a positive number of cycles, not {cycles!r}")
        self._cycles = cycles
        super().__init__()

    @property
    def cycles(self) -> int:
        return self._cycles

    def elaborate(self, platform):
        m = Module()
        locked = Signal()
        m.submodules.lock_sync = FFSynchronizer(self.lock, locked)
        timer = Signal(range(self._cycles + 1))
        with m.If(~locked):
            m.d.sync += [timer.eq(0), self.reset.eq(1)]
        with m.Elif(timer == self._cycles):
            m.d.sync += self.reset.eq(0)
        with m.Else():
            m.d.sync += timer.eq(timer + 1)
        return m


def clock_plan(board: Board, clock_hz: int):
    """``(PLLParameters, UART divisor)`` for running ``board`` at ``clock_hz``.

    Raises ``ValueError`` (``PLLError``) unless the PLL makes ``clock_hz`` exactly from the board oscillator
    and ``clock_hz`` is a whole multiple of :data:`UART_BAUD`.
    """
    reference_hz = int(board.platform().default_clk_frequency)
    pll = pll_parameters(reference_hz, clock_hz, exact=True)
    return pll, baud_divisor(clock_hz, UART_BAUD, tolerance=0)
