"""UART PHY: an 8N1 receiver and transmitter with ``lib.stream`` byte ports.

Both blocks run in the ``sync`` domain and time every bit with an integer ``divisor``: the number
of clock cycles per bit, so ``baud = f_clk / divisor``. There is no fractional divider, so the
divisor has to divide the clock cleanly.

Choosing the divisor
====================

The iCEBreaker's FT2232H divides its 12 MHz baud base by a divisor in eighths, so 3 Mbaud (12 MHz / 4)
is exact on its side. Run the fabric clock at a multiple of 3 MHz and the link has no rate error at
all:

=========  ==============  =======
f_clk      baud            divisor
=========  ==============  =======
48 MHz     3 Mbaud         16
60 MHz     3 Mbaud         20
72 MHz     3 Mbaud         24
12 MHz     3 Mbaud         4 (the minimum)
12 MHz     1 Mbaud         12
=========  ==============  =======

:func:`baud_divisor` computes the divisor and refuses a clock whose rounding error exceeds a
tolerance (1 % by default). A clock such as 50 MHz gives 16.67 cycles per bit: rounding to 17 is a
2 % error, which eats more than half of the receiver's margin at the far end of a frame.

Receiver tolerance: the receiver locks to the falling edge of the start bit (to within one clock)
and samples each bit at a fixed offset from it, so a sender whose rate is off accumulates its error
over the frame, worst at the stop bit 9.5 bit times in. Measured with the bit-level line driver of
``tests/test_uart.py``, back-to-back frames and the sender at seven phases against the receiver clock, in steps
of 0.2 %:

=========  ========  ====================  ====================
divisor    majority  sender fast by up to  sender slow by up to
=========  ========  ====================  ====================
4          no        5.0 %                 3.0 %
8          no        5.0 %                 4.2 %
16         yes       4.4 %                 4.2 %
16         no        5.0 %                 4.8 %
24         yes       4.6 %                 4.6 %
=========  ========  ====================  ====================

The test suite holds the receiver to ±2.5 % at divisor 4, ±3.5 % at 8 and ±4 % from 16 up.
"""

from amaranth.hdl import Cat, Module, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.cdc import FFSynchronizer
from amaranth.lib.wiring import In, Out

__all__ = ["UARTRx", "UARTTx", "baud_divisor", "MIN_DIVISOR"]

#: Fewest clock cycles per bit the receiver can time (half a bit must be at least 2 cycles).
MIN_DIVISOR = 4


def _check_divisor(divisor):
    if isinstance(divisor, bool) or not isinstance(divisor, int):
        raise TypeError(f"UART divisor must be an integer, not {divisor!r}")
    if divisor < MIN_DIVISOR:
        raise ValueError(f"UART divisor must be at least {MIN_DIVISOR} clock cycles per bit, not {divisor!r}")
    return divisor


def baud_divisor(clk_freq, baud, *, tolerance=0.01):
    """Clock cycles per bit for ``baud`` at a clock of ``clk_freq`` Hz.

    Returns the nearest integer divisor. Raises ``ValueError`` if it is below :data:`MIN_DIVISOR`
    or if the resulting rate is off by more than ``tolerance`` (relative); keep the sum of both
    ends' errors well inside the receiver's margin (see the module documentation).
    """
    if clk_freq <= 0 or baud <= 0:
        raise ValueError(f"clock and baud rate must be positive, not {clk_freq!r} and {baud!r}")
    divisor = round(clk_freq / baud)
    if divisor < MIN_DIVISOR:
        raise ValueError(f"a {clk_freq / 1e6:g} MHz clock is too slow for {baud:g} baud: "
                         f"{clk_freq / baud:.2f} cycles per bit, need at least {MIN_DIVISOR}")
    error = clk_freq / divisor / baud - 1
    if abs(error) > tolerance:
        raise ValueError(f"a {clk_freq / 1e6:g} MHz clock cannot make {baud:g} baud: divisor {divisor} is off by "
                         f"{error:+.2%} (tolerance {tolerance:.2%}); choose a clock that is a multiple of the "
                         f"baud rate")
    return divisor


class UARTRx(wiring.Component):
    """8N1 UART receiver.

    Parameters
    ----------
    divisor : int
        Clock cycles per bit, at least :data:`MIN_DIVISOR`.
    majority : bool or None
        Decide each bit by the majority of three samples spaced ``max(1, divisor // 16)`` cycles
        apart around its sample point, so a noise pulse shorter than a clock period cannot flip
        it. It costs some rate tolerance (see the module documentation), too much below divisor 8.
        ``None`` (default) enables it from divisor 16 up.

    Ports
    -----
    rx : In(1)
        The line, idle high. Asynchronous: it passes through a 2-flip-flop synchroniser.
    o : Out(stream.Signature(8))
        Received bytes. The receiver cannot be paused: a byte is held on ``o`` until taken, and a
        byte that completes while the previous one is still waiting is dropped (see ``overrun``).
    framing_error : Out(1)
        One-cycle strobe: a frame's stop bit was low. The byte is dropped, and the receiver waits
        for the line to go high before it looks for the next start bit.
    line_break : Out(1)
        One-cycle strobe, together with ``framing_error``: the whole frame was low (a break). It is
        reported once per low period.
    overrun : Out(1)
        One-cycle strobe: a byte completed while ``o.valid`` was high and ``o.ready`` low; the new
        byte is dropped and the pending one kept.

    A falling edge starts a frame only if the line is still low half a bit later (with majority
    voting: at two of the three samples there), so a low pulse of half a bit or less is ignored.
    Data and stop bits are sampled at :attr:`sample_point`, a little before mid-bit. The receiver
    looks for the next start bit as soon as the stop bit is sampled, so a sender that is slightly
    fast does not lose frames. A byte appears on ``o`` 3 cycles after its stop bit's sample point
    (synchroniser and output register), 2 + ``max(1, divisor // 16)`` more with the vote.
    """

    rx: In(1, init=1)
    o: Out(stream.Signature(8))
    framing_error: Out(1)
    line_break: Out(1)
    overrun: Out(1)

    def __init__(self, divisor, *, majority=None):
        self._divisor = _check_divisor(divisor)
        if majority is None:
            majority = divisor >= 16
        if not isinstance(majority, bool):
            raise TypeError(f"majority must be a bool or None, not {majority!r}")
        self._majority = majority
        super().__init__()

    @property
    def divisor(self):
        return self._divisor

    @property
    def majority(self):
        return self._majority

    @property
    def sample_point(self):
        """Cycles from the start of a data or stop bit to the clock edge that samples it (the middle tap).

        Measured from the first clock edge that sees the start bit (after the synchroniser). It is
        a little before mid-bit, to balance the two ways a frame can fail at its far end: a slow
        sender delays the stop bit by 9 × its error, while a fast one starts the next frame before
        the receiver is back looking for it (which happens ``decision_lag`` cycles after the stop
        bit's sample point). ``round(9 * (divisor - 1 - decision_lag) / 19)`` equalises the two.
        """
        return round(9 * (self.divisor - 1 - self.decision_lag) / 19)

    @property
    def decision_lag(self):
        """Cycles from a bit's sample point to its decision: 0 for a single sample, otherwise the
        vote's late tap (``max(1, divisor // 16)`` cycles) plus its register."""
        return max(1, self.divisor // 16) + 1 if self.majority else 0

    def elaborate(self, platform):
        m = Module()

        line = Signal(init=1)
        m.submodules.rx_sync = FFSynchronizer(self.rx, line, init=1)

        # The vote over three taps (2·spacing ago, spacing ago, now) lands in a flip-flop, so a bit is
        # decided `spacing + 1` cycles after the sample instant it is centred on; `lag` is that delay.
        spacing = max(1, self.divisor // 16) if self.majority else 0
        if spacing:
            history = Signal(2 * spacing, init=(1 << 2 * spacing) - 1)
            m.d.sync += history.eq(Cat(line, history[:-1]))
            taps = (line, history[spacing - 1], history[2 * spacing - 1])
            bit = Signal(init=1)
            m.d.sync += bit.eq((taps[0] & taps[1]) | (taps[0] & taps[2]) | (taps[1] & taps[2]))
        else:
            bit = line
        lag = self.decision_lag

        half = self.divisor // 2
        # `strobe` is `timer == 0`, kept in a flip-flop (compared a cycle ahead) for speed.
        timer = Signal(range(self.divisor))
        strobe = Signal(init=1)

        def start_timer(cycles):
            m.d.sync += [timer.eq(cycles - 1), strobe.eq(cycles == 1)]

        with m.If(~strobe):
            m.d.sync += [timer.eq(timer - 1), strobe.eq(timer == 1)]
        with m.Else():
            start_timer(self.divisor)

        data = Signal(8)
        count = Signal(range(8))
        done = Signal()      # a good frame ends this cycle

        m.d.sync += [self.framing_error.eq(0), self.line_break.eq(0), self.overrun.eq(0)]

        with m.FSM():
            with m.State("Idle"):
                with m.If(~line):
                    # The edge happened up to a cycle ago; the start bit's middle is half a bit on.
                    start_timer(half + lag)
                    m.next = "Start"
            with m.State("Start"):
                with m.If(strobe):
                    with m.If(bit):
                        m.next = "Idle"         # a glitch, not a start bit
                    with m.Else():
                        # The start bit is validated at its middle, the other bits sampled at
                        # `sample_point` (see there).
                        m.d.sync += count.eq(0)
                        start_timer(self.divisor - (half - self.sample_point))
                        m.next = "Data"
            with m.State("Data"):
                with m.If(strobe):
                    m.d.sync += [data.eq(Cat(data[1:], bit)), count.eq(count + 1)]
                    with m.If(count == 7):
                        m.next = "Stop"
            with m.State("Stop"):
                with m.If(strobe):
                    with m.If(bit):
                        m.d.comb += done.eq(1)
                        m.next = "Idle"
                    with m.Else():
                        m.d.sync += [self.framing_error.eq(1), self.line_break.eq(data == 0)]
                        m.next = "Resync"
            with m.State("Resync"):
                with m.If(line):
                    m.next = "Idle"

        with m.If(self.o.ready):
            m.d.sync += self.o.valid.eq(0)
        with m.If(done):
            with m.If(self.o.valid & ~self.o.ready):
                m.d.sync += self.overrun.eq(1)
            with m.Else():
                m.d.sync += [self.o.payload.eq(data), self.o.valid.eq(1)]

        return m


class UARTTx(wiring.Component):
    """8N1 UART transmitter.

    Parameters
    ----------
    divisor : int
        Clock cycles per bit, at least :data:`MIN_DIVISOR`.

    Ports
    -----
    i : In(stream.Signature(8))
        Bytes to send. ``i.ready`` is high while the line is idle and on the last cycle of each stop
        bit, so a byte offered in time follows the previous one with no idle gap: a stream of bytes
        goes out at exactly 10 bit times (``10 * divisor`` cycles) per byte.
    tx : Out(1)
        The line, driven from a flip-flop; high when idle. A byte taken on clock edge *t* starts its
        start bit at *t* and each bit lasts exactly ``divisor`` cycles, LSB first, then one stop bit.
    """

    i: In(stream.Signature(8))
    tx: Out(1, init=1)

    def __init__(self, divisor):
        self._divisor = _check_divisor(divisor)
        super().__init__()

    @property
    def divisor(self):
        return self._divisor

    def elaborate(self, platform):
        m = Module()

        # The frame shifts out LSB first; ones shift in behind it, so the line rests high.
        frame = Signal(10, init=(1 << 10) - 1)
        bits = Signal(range(11))             # bits of the frame not yet finished
        timer = Signal(range(self.divisor))
        m.d.comb += self.tx.eq(frame[0])

        # `ready` comes straight from flip-flops: `last` is `timer == 0`, `idle` is `bits == 0` and
        # `stop` is `bits == 1`, each updated a cycle ahead.
        last = Signal(init=1)
        idle = Signal(init=1)
        stop = Signal()
        with m.If(~last):
            m.d.sync += [timer.eq(timer - 1), last.eq(timer == 1)]
        with m.Elif(~idle):
            m.d.sync += [
                frame.eq(Cat(frame[1:], 1)), bits.eq(bits - 1), idle.eq(stop), stop.eq(bits == 2),
                timer.eq(self.divisor - 1), last.eq(0),
            ]

        m.d.comb += self.i.ready.eq(idle | (stop & last))
        with m.If(self.i.valid & self.i.ready):
            m.d.sync += [
                frame.eq(Cat(0, self.i.payload, 1)), bits.eq(10), idle.eq(0), stop.eq(0),
                timer.eq(self.divisor - 1), last.eq(0),
            ]

        return m
