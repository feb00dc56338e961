# amaranth: UnusedElaboratable=no
"""UART PHY tests: a bit-level Python line model against the RX, cycle-exact checks of the TX, loopback.

(The first line keeps Amaranth from warning about components that a parameter test builds and drops.)
"""

import random

import pytest
from amaranth.hdl import Elaboratable, Module
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opentsu.gateware.uart import MIN_DIVISOR, UARTRx, UARTTx, baud_divisor

from .streams import get, get_all, idle, monitor, put_all, simulate

PERIOD_NS = 20.0                # simulated clock; only ratios to the bit time matter
PERIOD_S = PERIOD_NS * 1e-9


# --- the reference: an 8N1 frame and a continuous-time line driver ----------------------------------------

def frame_bits(byte):
    """Line levels of one 8N1 frame: start (0), eight data bits LSB first, stop (1)."""
    return [0] + [(byte >> k) & 1 for k in range(8)] + [1]


def waveform(frames, bit_time, gaps=None):
    """``(level, duration)`` segments for ``frames`` (lists of levels), with idle-high ``gaps`` after each."""
    segments = []
    for index, bits in enumerate(frames):
        segments += [(level, bit_time) for level in bits]
        if gaps is not None and gaps[index]:
            segments.append((1, gaps[index]))
    return segments


def line_driver(pin, segments, *, lead=0.0, after=None):
    """Testbench that drives ``pin`` through ``segments`` in continuous time, starting ``lead`` seconds in.

    Edges land wherever the segment durations put them, not on clock edges, as from a real sender.
    ``after`` (an async callable) runs once the line is back to idle.
    """
    async def bench(ctx):
        ctx.set(pin, 1)
        if lead:
            await ctx.delay(lead)
        for level, duration in segments:
            ctx.set(pin, level)
            await ctx.delay(duration)
        ctx.set(pin, 1)
        if after is not None:
            await after(ctx)
    return bench


def strobe_counter(*signals):
    """Background testbench counting the cycles each of ``signals`` is high; returns (bench, counts)."""
    counts = {signal.name: 0 for signal in signals}

    async def bench(ctx):
        while True:
            _, _, *values = await ctx.tick().sample(*signals)
            for signal, value in zip(signals, values):
                counts[signal.name] += value
    return bench, counts


def random_bytes(rng, count):
    # The extremes first: all-zero and all-one data are the frames most sensitive to timing.
    return ([0x00, 0xFF, 0x55, 0xAA] + [rng.randrange(256) for _ in range(count)])[:max(count, 4)]


class Loopback(Elaboratable):
    """A transmitter wired to a receiver."""

    def __init__(self, divisor):
        self.tx = UARTTx(divisor)
        self.rx = UARTRx(divisor)

    def elaborate(self, platform):
        m = Module()
        m.submodules.tx = self.tx
        m.submodules.rx = self.rx
        m.d.comb += self.rx.rx.eq(self.tx.tx)
        return m


def receive(request, divisor, segments, count, *, lead=0.0, majority=None, name=None):
    """Drive the RX line through ``segments``; return (``count`` bytes received, strobe counts)."""
    dut = UARTRx(divisor, majority=majority)
    received = []
    strobes, counts = strobe_counter(dut.framing_error, dut.line_break, dut.overrun)
    watch, record = monitor(dut.o)

    async def sink(ctx):
        received.extend(await get_all(ctx, dut.o, count))

    async def settle(ctx):
        await idle(ctx, 4 * divisor)      # any late strobe shows up in the counts

    total = lead + sum(duration for _, duration in segments)
    benches = [line_driver(dut.rx, segments, lead=lead, after=settle)]
    if count:
        benches.append(sink)
    simulate(dut, *benches, name=name or request.node.name, period_ns=PERIOD_NS, background=[strobes, watch],
             max_cycles=int(total / PERIOD_S) + 100 * divisor)
    record.check()
    return received, counts


# --- parameters -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [UARTRx, UARTTx])
def test_parameters_are_checked(cls):
    with pytest.raises(ValueError, match="3"):
        cls(3)
    with pytest.raises(TypeError, match="16.0"):
        cls(16.0)
    with pytest.raises(TypeError, match="True"):
        cls(True)
    dut = cls(MIN_DIVISOR)
    assert dut.divisor == MIN_DIVISOR
    with pytest.raises(AttributeError):
        dut.divisor = 8


def test_rx_majority_parameter():
    assert UARTRx(16).majority and UARTRx(24).majority and not UARTRx(8).majority
    assert UARTRx(8, majority=True).majority and not UARTRx(16, majority=False).majority
    with pytest.raises(TypeError, match="'yes'"):
        UARTRx(16, majority="yes")


def test_baud_divisor():
    assert baud_divisor(48e6, 3e6) == 16
    assert baud_divisor(72e6, 3e6) == 24
    assert baud_divisor(12e6, 3e6) == 4
    assert baud_divisor(12e6, 115200, tolerance=0.01) == 104      # 0.16 % off
    with pytest.raises(ValueError, match=r"divisor 17 is off by -1\.96%"):
        baud_divisor(50e6, 3e6)                                      # 17 cycles: 1.96 % off
    with pytest.raises(ValueError, match="too slow"):
        baud_divisor(6e6, 3e6)


# --- TX ---------------------------------------------------------------------------------------------------

def line_sampler(pin, samples):
    """Background testbench: ``samples[j]`` is the level of ``pin`` during the cycle ending at edge ``j``."""
    async def bench(ctx):
        while True:
            _, _, level = await ctx.tick().sample(pin)
            samples.append(level)
    return bench


@pytest.mark.parametrize("divisor", [4, 5, 16, 24])
def test_tx_bit_timing(request, divisor):
    # One byte: the start bit begins on the cycle after the transfer edge and every bit lasts exactly
    # `divisor` cycles; the line is high before and after.
    dut = UARTTx(divisor)
    samples = []
    watch, record = monitor(dut.i)

    async def producer(ctx):
        await idle(ctx, 3)
        await put_all(ctx, dut.i, [0xA5])
        await idle(ctx, 12 * divisor)

    simulate(dut, producer, name=request.node.name, background=[line_sampler(dut.tx, samples), watch])
    record.check()
    (transfer,) = record.transfers
    assert transfer.payload == 0xA5
    start = transfer.cycle + 1
    assert samples[:start] == [1] * start
    for k, level in enumerate(frame_bits(0xA5)):
        assert samples[start + k * divisor:start + (k + 1) * divisor] == [level] * divisor, f"bit {k}"
    assert set(samples[start + 10 * divisor:]) == {1}


@pytest.mark.parametrize("divisor", [4, 16, 24])
def test_tx_back_to_back_throughput(request, divisor):
    # A producer that always has a byte ready gets one accepted every 10 bit times, and the line carries
    # the frames with no idle gap between them.
    rng = random.Random(divisor)
    data = random_bytes(rng, 12)
    dut = UARTTx(divisor)
    samples = []
    watch, record = monitor(dut.i)

    async def producer(ctx):
        await put_all(ctx, dut.i, data)
        await idle(ctx, 11 * divisor)

    simulate(dut, producer, name=request.node.name, background=[line_sampler(dut.tx, samples), watch])
    record.check()
    assert record.payloads == data
    cycles = [t.cycle for t in record.transfers]
    assert [b - a for a, b in zip(cycles, cycles[1:])] == [10 * divisor] * (len(data) - 1)
    start = cycles[0] + 1
    expected = [level for byte in data for level in frame_bits(byte) for _ in range(divisor)]
    assert samples[start:start + len(expected)] == expected


# --- RX against the bit-level driver ---------------------------------------------------------------------

@pytest.mark.parametrize("divisor", [4, 8, 16, 24])
def test_rx_exact_rate(request, divisor):
    rng = random.Random(divisor)
    data = random_bytes(rng, 16)
    bit = divisor * PERIOD_S
    segments = waveform([frame_bits(b) for b in data], bit)
    received, counts = receive(request, divisor, segments, len(data), lead=rng.random() * 5 * PERIOD_S)
    assert received == data
    assert counts == {"framing_error": 0, "line_break": 0, "overrun": 0}


# Receiver tolerance claimed in gateware/uart.py (measured limits there, with some margin).
MISMATCH = [(4, -0.025), (4, +0.025), (8, -0.035), (8, +0.035), (16, -0.04), (16, +0.04), (24, -0.04),
            (24, +0.04)]


@pytest.mark.parametrize("divisor,mismatch", MISMATCH)
@pytest.mark.parametrize("phase", [0.0, 0.37, 0.81])
def test_rx_baud_mismatch(request, divisor, mismatch, phase):
    # Back-to-back frames from a sender whose bit time is off by `mismatch`; the error accumulates over
    # each frame, worst at the stop bit. Every phase of the sender against the clock must work.
    rng = random.Random(f"{divisor}{mismatch}{phase}")
    data = random_bytes(rng, 12)
    bit = divisor * PERIOD_S * (1 + mismatch)
    segments = waveform([frame_bits(b) for b in data], bit)
    received, counts = receive(request, divisor, segments, len(data), lead=(3 + phase) * PERIOD_S)
    assert received == data
    assert counts == {"framing_error": 0, "line_break": 0, "overrun": 0}


@pytest.mark.parametrize("divisor", [8, 16, 24])
def test_rx_ignores_short_low_pulses(request, divisor):
    # Low pulses of at most half a bit on an idle line are not start bits: nothing is received and no
    # error is raised. A real byte afterwards is received intact.
    rng = random.Random(divisor)
    bit = divisor * PERIOD_S
    segments = []
    for width in [0.1, 0.25, 0.4, 0.5] + [rng.uniform(0.05, 0.5) for _ in range(8)]:
        segments += [(0, width * bit), (1, rng.uniform(1.0, 2.0) * bit)]
    segments += waveform([frame_bits(0x3C)], bit)
    received, counts = receive(request, divisor, segments, 1, lead=rng.random() * PERIOD_S)
    assert received == [0x3C]
    assert counts == {"framing_error": 0, "line_break": 0, "overrun": 0}


def test_rx_takes_a_longer_pulse_as_a_start_bit(request):
    # Just over half a bit low is a start bit; with the line high after it, the frame reads 0xFF.
    divisor = 16
    received, counts = receive(request, divisor, [(0, (divisor // 2 + 2) * PERIOD_S)], 1)
    assert received == [0xFF]


@pytest.mark.parametrize("majority", [True, False])
def test_rx_majority_vote_rejects_short_spikes(request, majority):
    # A spike of 0.8 clock periods centred on the sampling instant of every data bit (the simulated clock
    # rises at (n + 1/2) periods, so with the start edge on a whole period the instants are exact). With the
    # vote, only the middle of the three samples sees it and the bytes are intact; a single-sample receiver
    # reads every data bit inverted.
    divisor = 16
    rng = random.Random(7)
    data = random_bytes(rng, 8)
    bit = divisor * PERIOD_S
    lead = 3 * PERIOD_S                         # the start edge; the first clock edge after it is 0.5 later
    instant = (0.5 + UARTRx(divisor, majority=majority).sample_point) * PERIOD_S   # from the bit start
    spike = 0.8 * PERIOD_S
    segments = []
    for byte in data:
        bits = frame_bits(byte)
        segments.append((bits[0], bit))
        for level in bits[1:9]:
            segments += [(level, instant - spike / 2), (1 - level, spike), (level, bit - instant - spike / 2)]
        segments.append((bits[9], bit))
    received, counts = receive(request, divisor, segments, len(data), lead=lead, majority=majority)
    assert received == (data if majority else [b ^ 0xFF for b in data])
    assert counts == {"framing_error": 0, "line_break": 0, "overrun": 0}


def test_rx_framing_error(request):
    # A frame whose stop bit is low is dropped with one framing_error strobe; the receiver resumes after
    # the line returns high and receives the next byte.
    divisor = 16
    bit = divisor * PERIOD_S
    bad = frame_bits(0x5A)[:-1] + [0, 1, 1]
    segments = waveform([frame_bits(0x11), bad, frame_bits(0x22)], bit)
    received, counts = receive(request, divisor, segments, 2)
    assert received == [0x11, 0x22]
    assert counts == {"framing_error": 1, "line_break": 0, "overrun": 0}


def test_rx_break(request):
    # The line low for three frame times is one break (and one framing error), not a string of bytes.
    divisor = 16
    bit = divisor * PERIOD_S
    segments = [(0, 30 * bit), (1, 2 * bit)] + waveform([frame_bits(0x80)], bit)
    received, counts = receive(request, divisor, segments, 1)
    assert received == [0x80]
    assert counts == {"framing_error": 1, "line_break": 1, "overrun": 0}


def test_rx_overrun(request):
    # Nobody takes bytes: the first is held on `o`, the next two are dropped with an overrun strobe each.
    # Taking the held byte frees the receiver for the next frame.
    divisor = 16
    bit = divisor * PERIOD_S
    dut = UARTRx(divisor)
    strobes, counts = strobe_counter(dut.framing_error, dut.line_break, dut.overrun)
    watch, record = monitor(dut.o)
    received = []

    async def bench(ctx):
        for byte in (0x01, 0x02, 0x03):
            await line_driver(dut.rx, waveform([frame_bits(byte)], bit))(ctx)
        await idle(ctx, 2 * divisor)
        assert counts["overrun"] == 2
        assert ctx.get(dut.o.valid) and ctx.get(dut.o.payload) == 0x01
        received.append(await get(ctx, dut.o))
        await line_driver(dut.rx, waveform([frame_bits(0x04)], bit))(ctx)
        received.append(await get(ctx, dut.o))

    simulate(dut, bench, name=request.node.name, background=[strobes, watch], max_cycles=60 * divisor)
    record.check()
    assert received == [0x01, 0x04]
    assert counts == {"framing_error": 0, "line_break": 0, "overrun": 2}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.lists(st.integers(0, 255), min_size=1, max_size=6),
       divisor=st.sampled_from([8, 16, 20, 24]),
       mismatch=st.floats(-0.03, 0.03),
       phase=st.floats(0.0, 1.0),
       gaps=st.lists(st.floats(0.0, 3.0), min_size=6, max_size=6))
def test_rx_property(request, data, divisor, mismatch, phase, gaps):
    # Any bytes, any sender rate within ±3 %, any phase, any idle gaps between frames: received intact.
    bit = divisor * PERIOD_S * (1 + mismatch)
    segments = waveform([frame_bits(b) for b in data], bit, [g * bit for g in gaps])
    received, counts = receive(request, divisor, segments, len(data), lead=phase * PERIOD_S,
                               name="test_rx_property")
    assert received == data
    assert counts == {"framing_error": 0, "line_break": 0, "overrun": 0}


# --- loopback ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("divisor", [4, 7, 16, 24])
def test_loopback(request, divisor):
    # Random bytes with a bursty producer and a consumer that stalls briefly (never long enough to
    # overrun: a byte waits on `o` for a whole frame).
    rng = random.Random(100 + divisor)
    data = random_bytes(rng, 40)
    dut = Loopback(divisor)
    received = []
    strobes, counts = strobe_counter(dut.rx.framing_error, dut.rx.line_break, dut.rx.overrun)
    watch_in, record_in = monitor(dut.tx.i)
    watch_out, record_out = monitor(dut.rx.o)

    async def producer(ctx):
        await put_all(ctx, dut.tx.i, data, rng=random.Random(1), gap=0.3, max_gap=3 * divisor)

    async def consumer(ctx):
        received.extend(await get_all(ctx, dut.rx.o, len(data), rng=random.Random(2), stall=0.5,
                                      max_stall=4 * divisor))

    simulate(dut, producer, consumer, name=request.node.name, background=[strobes, watch_in, watch_out],
             max_cycles=len(data) * 14 * divisor + 1000)
    record_in.check()
    record_out.check()
    assert received == data
    assert counts == {"framing_error": 0, "line_break": 0, "overrun": 0}
