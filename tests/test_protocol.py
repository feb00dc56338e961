"""The UART command protocol: host encoding, the gateware's CRC, and the device's command engine under attack.

Two harnesses drive the real ``CommandEngine`` with the real fabric and sample FIFO behind it:

* ``ByteTransport`` feeds the engine's byte streams directly, paced like a UART (one byte every ten cycles;
  a byte arriving while the previous one is still waiting is dropped, as the receiver drops it), and counts
  every fabric bus write in gateware. It is fast enough for the property-based tests.
* ``link.SimTransport`` drives the whole ``gateware.device.Device`` at its UART pins, bit by bit, for the
  cases where the line itself matters.

Both are ``link.Transport`` objects, so the host driver under test is the one that talks to a board.
"""

import collections
import random
import struct

import pytest
from amaranth import Module, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out
from amaranth.sim import Simulator
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from opentsu.compiler import compile_model
from opentsu.devicemap import REGION_SHIFT, Region, Reg, Status, program_writes, sequence_writes
from opentsu.emulator import Emulator
from opentsu.fabric import FabricConfig
from opentsu.gateware.device import Device as DeviceTop, identity_of
from opentsu.gateware.fabric import Fabric
from opentsu.gateware.fifo import StreamFIFO
from opentsu.gateware.protocol import CommandEngine, crc16_update
from opentsu.link import Device, DeviceRejected, Link, LinkError, SimTransport, Transport
from opentsu.protocol import (MAX_REQUEST_PAYLOAD, SYNC, TIMEOUT_BIT_TIMES, Command, Flags, FrameDecoder,
                              Identity, ProtocolError, Result, StatusReport, crc16, encode_frame)
from opentsu.sequence import Op, Opcode, sampling_sequence

from .util import grid_model

CLOCK = 12_000_000
DIVISOR = 4
BYTE_CYCLES = 10          # the byte harness: one byte every 10 cycles, i.e. a UART at divisor 1
ERRORS = {r for r in Result if r is not Result.OK}


def frame(code, seq, payload=b""):
    """A request frame built by hand from the layout in docs/protocol.md (not with ``encode_frame``)."""
    body = bytes([code, seq]) + len(payload).to_bytes(2, "little") + payload
    return b"\xA5\x5A" + body + crc16(body).to_bytes(2, "little")


def region_payload(region, offset, data=b""):
    return bytes([int(region)]) + offset.to_bytes(3, "little") + data


# ------------------------------------------------------------------------------------------------ host encoding

def test_crc_is_ccitt_false():
    # The published check value of CRC-16/CCITT-FALSE.
    assert crc16(b"123456789") == 0x29B1
    assert crc16(b"") == 0xFFFF


def test_encode_frame_matches_the_documented_layout():
    assert encode_frame(Command.READ, 7, b"\x02\x01\x00\x00\x04") == frame(Command.READ, 7, b"\x02\x01\x00\x00\x04")
    with pytest.raises(ValueError):
        encode_frame(Command.IDENTIFY, 256)


def test_decoder_skips_garbage_and_bad_frames_and_reassembles_split_input():
    good = [frame(Result.OK, k, bytes([k]) * k) for k in range(1, 5)]
    broken = bytearray(frame(Result.OK, 9, b"xyz"))
    broken[-1] ^= 0x10
    stream_ = b"\x00\xA5\x11" + good[0] + bytes(broken) + good[1] + b"\x5A\xA5" + good[2] + good[3]
    decoder = FrameDecoder()
    frames = []
    for k in range(0, len(stream_), 3):            # fed in small pieces
        frames += decoder.feed(stream_[k:k + 3])
    assert [(c, s, p) for c, s, p in frames] == [(Result.OK, k, bytes([k]) * k) for k in range(1, 5)]
    assert decoder.bad_frames >= 1 and decoder.skipped >= 3


def test_identity_and_status_round_trip():
    ident = Identity(1, 16, 16, ((0, 1), (2, 1)), 8, 3, 32, 8, 8, 64, 1, 256, 48_000_000, 16, False)
    assert Identity.from_bytes(ident.to_bytes()) == ident
    with pytest.raises(ProtocolError):
        Identity.from_bytes(ident.to_bytes()[:-3])
    report = StatusReport(1, 2, 0x030201, 300, 0x01020304, 5, 6, 7, 8, 9, 10)
    assert StatusReport.from_bytes(report.to_bytes()) == report
    assert len(report.to_bytes()) == StatusReport.size() == 17


def test_gateware_crc_step_matches_the_reference():
    crc, byte, out = Signal(16), Signal(8), Signal(16)
    m = Module()
    m.d.comb += out.eq(crc16_update(crc, byte))
    rng = random.Random(4)
    cases = [(0xFFFF, 0x00), (0x0000, 0xFF), (0x8000, 0x01)] + [(rng.randrange(1 << 16), rng.randrange(256))
                                                                for _ in range(200)]

    async def bench(ctx):
        for c, b in cases:
            ctx.set(crc, c)
            ctx.set(byte, b)
            assert ctx.get(out) == crc16(bytes([b]), c), (hex(c), hex(b))

    sim = Simulator(m)
    sim.add_testbench(bench)
    sim.run()


# ------------------------------------------------------------------------------------------------ byte harness

class EngineBench(wiring.Component):
    """The command engine, fabric and sample FIFO of a device, with the UART replaced by byte streams.

    ``bus_writes`` counts every cycle in which the engine writes the fabric bus (any region).
    """

    rx: In(stream.Signature(8))
    tx: Out(stream.Signature(8))
    bus_writes: Out(32)

    def __init__(self, geometry, fifo_depth=64):
        self.geometry = geometry
        # Divisor 1: the engine's frame timeout is TIMEOUT_BIT_TIMES cycles, 20 byte slots of this harness.
        self.identity = identity_of(geometry, CLOCK, 1, fifo_depth, trng=False)
        super().__init__()

    def elaborate(self, platform):
        m = Module()
        m.submodules.engine = engine = CommandEngine(self.identity, 1)
        m.submodules.fabric = fabric = Fabric(self.geometry)
        m.submodules.fifo = fifo = StreamFIFO(8 * self.identity.sample_word_bytes, self.identity.fifo_depth)
        wiring.connect(m, wiring.flipped(self.rx), engine.rx)
        wiring.connect(m, engine.tx, wiring.flipped(self.tx))
        wiring.connect(m, engine.bus, fabric.bus)
        m.d.comb += [fifo.i.valid.eq(fabric.samples.valid), fifo.i.payload.eq(fabric.samples.payload),
                     fabric.samples.ready.eq(fifo.i.ready)]
        wiring.connect(m, fifo.o, engine.samples)
        m.d.comb += [engine.samples_level.eq(fifo.level), fifo.flush.eq(engine.samples_flush),
                     engine.running.eq(fabric.running), engine.fabric_error.eq(fabric.error)]
        with m.If(engine.bus.w_en):
            m.d.sync += self.bus_writes.eq(self.bus_writes + 1)
        return m


class ByteTransport(Transport):
    """``EngineBench`` in simulation, paced like a UART: a received byte is offered for one byte slot of
    ``BYTE_CYCLES`` cycles and held until taken, and a byte whose slot comes while the previous one still
    waits is dropped (``overruns``); the transmit side accepts one byte per slot. Device time as in
    ``SimTransport``."""

    def __init__(self, bench: EngineBench):
        self.bench = bench
        self.cycles = 0
        self.bus_writes = 0
        self.overruns = 0
        self._to_device = collections.deque()
        self._from_device = bytearray()
        self._sim = Simulator(bench)
        self._sim.add_clock(1e-8)
        self._sim.add_testbench(self._pump, background=True)

    async def _pump(self, ctx):
        rx, tx = self.bench.rx, self.bench.tx
        pending = False
        tx_busy = 0
        ctx.set(tx.ready, 1)
        slot = 0
        while True:
            if slot == 0 and self._to_device:
                byte = self._to_device.popleft()
                if pending:
                    self.overruns += 1
                else:
                    pending = True
                    ctx.set(rx.payload, byte)
                    ctx.set(rx.valid, 1)
            _, _, rx_ready, tx_valid, tx_ready, tx_payload, writes = await ctx.tick().sample(
                rx.ready, tx.valid, tx.ready, tx.payload, self.bench.bus_writes)
            self.bus_writes = writes
            if pending and rx_ready:
                pending = False
                ctx.set(rx.valid, 0)
            if tx_valid and tx_ready:
                self._from_device.append(tx_payload)
                tx_busy = BYTE_CYCLES - 1
                ctx.set(tx.ready, 0)
            elif tx_busy:
                tx_busy -= 1
                if not tx_busy:
                    ctx.set(tx.ready, 1)
            slot = (slot + 1) % BYTE_CYCLES

    def write(self, data):
        self._to_device.extend(data)

    def run(self, cycles):
        self.cycles += max(0, int(cycles))
        self._sim.run_until(self.cycles * 1e-8)

    def now(self):
        return self.cycles / CLOCK

    def idle(self, seconds):
        self.run(max(1, round(seconds * CLOCK)))

    def read_some(self, timeout):
        budget = max(1, int(timeout * CLOCK))
        spent = 0
        while not self._from_device and spent < budget:
            step = min(BYTE_CYCLES * 4, budget - spent)
            self.run(step)
            spent += step
        out = bytes(self._from_device)
        self._from_device.clear()
        return out


def exchange(transport, data, cycles_per_byte, quiet=None):
    """Send raw ``data``, let the device run until it has been quiet for longer than its frame timeout, and
    return the response frames ``(Result or code, seq, payload)`` it sent meanwhile."""
    quiet = quiet or (TIMEOUT_BIT_TIMES + 40) * cycles_per_byte // 10
    transport.write(data)
    transport.run(len(data) * cycles_per_byte)
    received = b""
    silent = 0
    while silent < quiet:
        transport.run(4 * cycles_per_byte)
        chunk = transport.read_some(1e-12)
        received += chunk
        silent = 0 if chunk else silent + 4 * cycles_per_byte
    def result(code):
        try:
            return Result(code)
        except ValueError:
            return code
    return [(result(c), s, p) for c, s, p in FrameDecoder().feed(received)]


def small_program(seed=60):
    model = grid_model(4, 4, ((0, 1),), torus=False, seed=seed, clamp=[0] * 15 + [-1])
    return compile_model(model, fabric=FabricConfig(4, 4, ((0, 1),), lanes=2, latency=1))


#: A sequence stored in the device before the attacks; it must read back unchanged after each.
STORED_OPS = sampling_sequence(3, burn_in=2, thin=1)


class Harness:
    """A device behind a transport with a program and a sequence loaded, and what to expect of its memory."""

    def __init__(self, transport, program, cycles_per_byte, timeout):
        self.transport = transport
        self.program = program
        self.cycles_per_byte = cycles_per_byte
        self.device = Device(transport, timeout=timeout)
        self.device.load_program(program)
        self.device.writes(sequence_writes(STORED_OPS))
        self.params = [w for r, o, w in sorted(program_writes(program), key=lambda x: x[1]) if r == Region.PARAMS]
        self.sequence = [w for _, _, w in sequence_writes(STORED_OPS)]

    def exchange(self, data):
        return exchange(self.transport, data, self.cycles_per_byte)

    def memory_intact(self, params=None):
        """Read PARAMS and SEQUENCE back (WEIGHTS and SEEDS are write-only by design)."""
        count = len(self.params) if params is None else params
        assert self.device.read_words(Region.PARAMS, 0, count) == self.params[:count]
        assert self.device.read_words(Region.SEQUENCE, 0, len(self.sequence)) == self.sequence

    def answers_identify(self):
        ident = Identity.from_bytes(self.device.link.request(Command.IDENTIFY)[1:])
        assert ident == self.device.identity


@pytest.fixture(scope="module")
def byte_harness():
    program = small_program()
    bench = EngineBench(program.geometry)
    return Harness(ByteTransport(bench), program, BYTE_CYCLES, timeout=0.0005)


@pytest.fixture(scope="module")
def uart_harness():
    program = small_program()
    top = DeviceTop(program.geometry, clock_hz=CLOCK, divisor=DIVISOR, fifo_depth=64)
    transport = SimTransport(top, clock_hz=CLOCK, divisor=DIVISOR)
    yield Harness(transport, program, 10 * DIVISOR, timeout=0.002)
    transport.close()


# ------------------------------------------------------------------------------------------------ rejections

def write_params_frame(seq, offset=0, words=(0x1234, 0x5678)):
    return frame(Command.WRITE, seq, region_payload(Region.PARAMS, offset, b"".join(struct.pack("<H", w)
                                                                                      for w in words)))


def rejection_cases():
    """(name, bytes sent, the Result expected) — each a frame the device must refuse without touching memory."""
    w = write_params_frame(0x41)
    flipped = bytearray(w)
    flipped[9] ^= 0x04                                          # a payload bit
    flipped_code = bytearray(w)
    flipped_code[2] ^= 0x01                                     # WRITE becomes READ, but the CRC catches it
    flipped_crc = bytearray(w)
    flipped_crc[-1] ^= 0x80
    oversized = frame(Command.WRITE, 0x42, region_payload(Region.PARAMS, 0, bytes(range(1, 41))))
    return [
        ("payload bit flipped", bytes(flipped), Result.BAD_CRC),
        ("command bit flipped", bytes(flipped_code), Result.BAD_CRC),
        ("crc bit flipped", bytes(flipped_crc), Result.BAD_CRC),
        ("truncated", w[:-3], Result.TIMEOUT),
        ("header only", w[:4], Result.TIMEOUT),
        ("oversized", oversized, Result.BAD_LENGTH),
        ("longer than the limit by one", frame(Command.WRITE, 0x43, region_payload(
            Region.PARAMS, 0, bytes(MAX_REQUEST_PAYLOAD - 3))), Result.BAD_LENGTH),
        ("unknown opcode", frame(0x7E, 0x44, b"\x01\x02"), Result.UNKNOWN_COMMAND),
        ("opcode zero", frame(0x00, 0x45), Result.UNKNOWN_COMMAND),
        ("identify with a payload", frame(Command.IDENTIFY, 0x46, b"\x00"), Result.BAD_LENGTH),
        ("write of half a word", frame(Command.WRITE, 0x47, region_payload(Region.PARAMS, 0, b"\x01\x02\x03")),
         Result.BAD_LENGTH),
        ("write without data", frame(Command.WRITE, 0x48, region_payload(Region.PARAMS, 0)), Result.BAD_LENGTH),
        ("write to an unknown region", frame(Command.WRITE, 0x49, region_payload(9, 0, b"\x01\x02")),
         Result.BAD_ARGUMENT),
        ("write to the registers", frame(Command.WRITE, 0x4A, region_payload(Region.REGS, 0, bytes(4))),
         Result.BAD_ARGUMENT),
        ("write past the end", frame(Command.WRITE, 0x4B, region_payload(Region.SEQUENCE, 127, bytes(4))),
         Result.BAD_ARGUMENT),
        ("write at a huge offset", frame(Command.WRITE, 0x4C, region_payload(Region.PARAMS, 0xFFFFFF, bytes(2))),
         Result.BAD_ARGUMENT),
        ("read of the weights", frame(Command.READ, 0x4D, region_payload(Region.WEIGHTS, 0, b"\x01")),
         Result.BAD_ARGUMENT),
        ("read of zero words", frame(Command.READ, 0x4E, region_payload(Region.PARAMS, 0, b"\x00")),
         Result.BAD_ARGUMENT),
        ("read past the end", frame(Command.READ, 0x4F, region_payload(Region.SEQUENCE, 120, b"\x09")),
         Result.BAD_ARGUMENT),
        ("start without flags", frame(Command.START, 0x50), Result.BAD_LENGTH),
    ]


CASES = rejection_cases()


def check_rejection(harness, sent, expected):
    before = harness.transport.bus_writes if isinstance(harness.transport, ByteTransport) else None
    responses = harness.exchange(sent)
    assert [r[0] for r in responses] == [expected]
    code, seq, payload = responses[0]
    assert len(payload) == 1 and payload[0] & Flags.LINK_ERROR
    assert seq == sent[3]                                      # the response echoes the sequence number
    if before is not None:
        assert harness.transport.bus_writes == before          # not a single bus write
    harness.answers_identify()


@pytest.mark.parametrize("name,sent,expected", CASES, ids=[c[0] for c in CASES])
def test_engine_rejects_bad_frames(byte_harness, name, sent, expected):
    check_rejection(byte_harness, sent, expected)
    byte_harness.memory_intact(params=8)


def test_rejections_are_counted_and_status_clears_the_counters(byte_harness):
    device = byte_harness.device
    device.status()                                           # clears the counters
    for name, sent, _ in CASES:
        byte_harness.exchange(sent)
    report = device.status()
    by_result = collections.Counter(expected for _, _, expected in CASES)
    assert report.crc_errors == by_result[Result.BAD_CRC]
    assert report.timeouts == by_result[Result.TIMEOUT]
    assert report.rejected == sum(by_result[r] for r in (Result.BAD_LENGTH, Result.BAD_ARGUMENT,
                                                         Result.UNKNOWN_COMMAND))
    assert device.flags & Flags.LINK_ERROR
    report = device.status()
    assert (report.crc_errors, report.timeouts, report.rejected) == (0, 0, 0)
    assert not device.flags & Flags.LINK_ERROR


def contains_valid_frame(data: bytes) -> bool:
    """Whether a well-formed frame (good CRC) starts at any sync in ``data``."""
    start = data.find(SYNC)
    while start >= 0:
        if len(data) >= start + 6:
            length = int.from_bytes(data[start + 4:start + 6], "little")
            end = start + 8 + length
            if end <= len(data):
                body = data[start + 2:end - 2]
                if crc16(body) == int.from_bytes(data[end - 2:end], "little"):
                    return True
        start = data.find(SYNC, start + 1)
    return False


VALID_REQUESTS = [
    write_params_frame(0x61, 2, (0xBEEF, 0x0102, 0x0304, 0x0506)),
    frame(Command.WRITE, 0x62, region_payload(Region.SEQUENCE, 0, b"\x01\x02\x03\x04")),
    frame(Command.WRITE, 0x63, region_payload(Region.WEIGHTS, 3, bytes([0x55] * 4))),
    frame(Command.START, 0x64, b"\x00"),
    frame(Command.READ, 0x65, region_payload(Region.PARAMS, 0, b"\x02")),
    frame(Command.IDENTIFY, 0x66),
    frame(Command.RESET, 0x67),
]


@st.composite
def mutated_frames(draw):
    """A valid request with a few random edits: bit flips, byte replacements, insertions, deletions,
    truncation, garbage around it."""
    data = bytearray(draw(st.sampled_from(VALID_REQUESTS)))
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "replace", "insert", "delete", "truncate", "prefix", "suffix"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "replace" and data:
            data[pos] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        elif kind == "delete" and data:
            del data[pos:pos + draw(st.integers(1, 3))]
        elif kind == "truncate":
            del data[pos:]
        elif kind == "prefix":
            data[:0] = draw(st.binary(max_size=6))
        elif kind == "suffix":
            data += draw(st.binary(max_size=6))
    return bytes(data)


#: Random streams rich in sync bytes, so that many of them start frames.
garbage = st.lists(st.one_of(st.sampled_from([0xA5, 0x5A, 0x00, 0x0C]), st.integers(0, 255)),
                   min_size=1, max_size=40).map(bytes)


def check_no_effect(harness, data):
    """``data`` holds no valid frame: every answer is an error, no bus write happens, and the device still
    identifies itself with its memory intact."""
    before = harness.transport.bus_writes
    responses = harness.exchange(data)
    assert all(code in ERRORS for code, _, _ in responses), responses
    assert all(len(p) == 1 and p[0] & Flags.LINK_ERROR for _, _, p in responses)
    assert harness.transport.bus_writes == before
    harness.answers_identify()
    harness.memory_intact(params=6)


PROPERTY = settings(max_examples=30, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@PROPERTY
@given(data=mutated_frames())
def test_mutated_frames_change_nothing(byte_harness, data):
    assume(not contains_valid_frame(data))
    check_no_effect(byte_harness, data)


@PROPERTY
@given(data=garbage)
def test_random_streams_change_nothing(byte_harness, data):
    assume(not contains_valid_frame(data))
    check_no_effect(byte_harness, data)


def test_sequence_numbers_wrap_and_commands_work_after_attacks(byte_harness):
    device = byte_harness.device
    device.link._seq = 250                                    # (private) to cross a sequence-number wrap soon
    for _ in range(10):
        device.link.request(Command.STOP)
    assert device.link._seq == 4
    byte_harness.answers_identify()
    byte_harness.memory_intact()


# ------------------------------------------------------------------------------------------------ at the pins

UART_CASES = [c for c in CASES if c[0] in ("payload bit flipped", "truncated", "oversized", "unknown opcode",
                                           "write past the end")]


@pytest.mark.parametrize("name,sent,expected", UART_CASES, ids=[c[0] for c in UART_CASES])
def test_device_rejects_bad_frames_at_the_pins(uart_harness, name, sent, expected):
    check_rejection(uart_harness, sent, expected)


def test_device_truncated_frame_times_out_after_the_documented_silence(uart_harness):
    transport = uart_harness.transport
    sent = write_params_frame(0x33)[:7]
    transport.write(sent)
    transport.run(len(sent) * 10 * DIVISOR)
    start = transport.cycles
    received = b""
    while not received:
        received += transport.read_some(1e-12)
        transport.run(DIVISOR)
    silence = transport.cycles - start
    limit = TIMEOUT_BIT_TIMES * DIVISOR
    assert limit <= silence <= limit + 20 * DIVISOR           # not before the timeout, and soon after it
    transport.run(20 * 10 * DIVISOR)
    received += transport.read_some(1e-12)
    (code, seq, payload), = FrameDecoder().feed(received)
    assert code == Result.TIMEOUT
    uart_harness.answers_identify()
    uart_harness.memory_intact()


def test_device_resynchronises_after_garbage_at_the_pins(uart_harness):
    rng = random.Random(11)
    noise = bytes(rng.choice([0xA5, 0x5A, rng.randrange(256)]) for _ in range(60))
    assert not contains_valid_frame(noise)
    uart_harness.device.status()
    responses = uart_harness.exchange(noise)
    assert responses and all(code in ERRORS for code, _, _ in responses)
    uart_harness.answers_identify()
    uart_harness.memory_intact()
    # Every byte was a well-formed UART frame. (Garbage that keeps the engine answering rejections may
    # overrun the receiver; that only drops more garbage.)
    assert uart_harness.device.status().framing_errors == 0


def test_pipelined_writes_are_not_lost(uart_harness):
    device, transport = uart_harness.device, uart_harness.transport
    values = [(k * 2654435761) & 0xFFFF for k in range(64)]
    payloads = [region_payload(Region.SEQUENCE, k, b"".join(struct.pack("<H", v) for v in values[k:k + 4]))
                for k in range(0, 64, 4)]
    device.status()
    sent_before = device.link.resent
    start = transport.cycles
    bodies = device.link.pipeline(Command.WRITE, payloads, window=16)
    elapsed = transport.cycles - start
    assert len(bodies) == 16 and device.link.resent == sent_before
    assert device.read_words(Region.SEQUENCE, 0, 64) == values
    status = device.status()
    assert (status.overruns, status.crc_errors, status.timeouts, status.rejected) == (0, 0, 0, 0)
    # Back to back: the 16 requests take about as long as their bytes on the wire, not 16 round trips.
    wire = sum(len(encode_frame(Command.WRITE, 0, p)) for p in payloads) * 10 * DIVISOR
    assert elapsed < wire + 40 * 10 * DIVISOR
    device.writes(sequence_writes(STORED_OPS))               # restore what the harness expects
    uart_harness.memory_intact()


# ------------------------------------------------------------------------------------------------ busy, stop, retries

def test_busy_while_running_then_stop(byte_harness):
    device = byte_harness.device
    device.writes(sequence_writes([Op(Opcode.LOAD, 0), Op(Opcode.SWEEP, 60_000)]))
    device.start()
    assert device.flags & Flags.RUNNING
    before = byte_harness.transport.bus_writes
    for command, payload in [(Command.WRITE, write_params_frame(0)[6:-2]),
                             (Command.READ, region_payload(Region.PARAMS, 0, b"\x01")),
                             (Command.START, b"\x00")]:
        with pytest.raises(DeviceRejected) as info:
            device.link.request(command, payload)
        assert info.value.result is Result.BUSY
    assert byte_harness.transport.bus_writes == before
    status = device.status()                                  # status and registers still answer
    assert status.fabric_status & Status.RUNNING and status.sweeps > 0
    assert device.read_words(Region.REGS, Reg.STATUS, 1)[0] & Status.RUNNING
    device.stop()
    for _ in range(20):
        if not device.status().fabric_status & Status.RUNNING:
            break
        byte_harness.transport.run(200)
    assert not device.status().fabric_status & Status.RUNNING
    assert not device.status().fabric_status & Status.WRITE_REFUSED
    device.writes(sequence_writes(STORED_OPS))
    byte_harness.memory_intact()


class Corrupting(Transport):
    """Wraps a transport and flips a bit in chosen bytes: of the n-th request with a given command, or of
    the response that follows it."""

    def __init__(self, inner):
        self.inner = inner
        self.rules = []
        self.received = 0
        self.flip_at = set()

    def corrupt(self, command, offset, *, nth=1, response=False):
        self.rules.append([command, nth, offset, response])

    def write(self, data):
        out = bytearray(data)
        for rule in self.rules:
            command, nth, offset, response = rule
            if data[2] == command:
                rule[1] -= 1
                if rule[1] == 0:
                    if response:
                        self.flip_at.add(self.received + offset)
                    else:
                        out[offset] ^= 0x08
        self.inner.write(bytes(out))

    def read_some(self, timeout):
        data = bytearray(self.inner.read_some(timeout))
        for k in range(len(data)):
            if self.received + k in self.flip_at:
                data[k] ^= 0x08
        self.received += len(data)
        return bytes(data)

    def now(self):
        return self.inner.now()

    def idle(self, seconds):
        self.inner.idle(seconds)


def test_host_retries_corrupted_requests_and_responses(byte_harness):
    inner = byte_harness.transport
    inner.read_some(1e-12)
    wrapper = Corrupting(inner)
    wrapper.corrupt(Command.WRITE, 9)                      # a payload byte: the device answers BAD_CRC
    wrapper.corrupt(Command.IDENTIFY, 12, response=True)   # the response: the host's decoder drops it
    wrapper.corrupt(Command.READ, 7)                       # the length's high byte: BAD_LENGTH before the CRC
    link = Link(wrapper, timeout=0.0005, retries=3, byte_time=BYTE_CYCLES / CLOCK)
    link.request(Command.WRITE, write_params_frame(0)[6:-2])
    assert Identity.from_bytes(link.request(Command.IDENTIFY)[1:]) == byte_harness.device.identity
    assert link.request(Command.READ, region_payload(Region.PARAMS, 0, b"\x02"))[1:] == bytes.fromhex("34127856")
    assert link.resent == 3
    byte_harness.device.writes([(Region.PARAMS, k, w) for k, w in enumerate(byte_harness.params[:2])])
    byte_harness.memory_intact()


def test_host_gives_up_with_a_link_error_when_every_attempt_is_corrupted(byte_harness):
    wrapper = Corrupting(byte_harness.transport)
    for k in range(1, 5):
        wrapper.corrupt(Command.IDENTIFY, 6, nth=k)        # the CRC of every attempt
    link = Link(wrapper, timeout=0.0005, retries=3, byte_time=BYTE_CYCLES / CLOCK)
    with pytest.raises(LinkError, match="IDENTIFY: the device reported BAD_CRC after 4 attempts"):
        link.request(Command.IDENTIFY)
    byte_harness.answers_identify()


def test_sampling_survives_corruption_and_a_resent_start(uart_harness):
    """Sampling stays bit-exact through a corrupted WRITE in the pipeline, a corrupted START request, a
    lost START response and a corrupted SAMPLES request: the host resends START with the same sequence
    number, and the device answers it without starting the run twice."""
    device, program = uart_harness.device, uart_harness.program
    ops = sampling_sequence(4, burn_in=2, thin=3)
    inner = uart_harness.transport
    inner.read_some(1e-12)
    wrapper = Corrupting(inner)
    wrapper.corrupt(Command.WRITE, 8, nth=3)
    wrapper.corrupt(Command.START, 8)
    wrapper.corrupt(Command.START, 5, nth=2, response=True)
    wrapper.corrupt(Command.SAMPLES, 9)
    resent = device.link.resent
    device.link.transport = wrapper
    try:
        got = device.run(program, ops, seed=5, chain=1)
    finally:
        device.link.transport = inner
    assert device.link.resent - resent == 4
    emu = Emulator(program, chains=1, seed=5, first_chain=1)
    assert (got == emu.run(ops, full=True)[0]).all()
    device.writes(sequence_writes(STORED_OPS))
    uart_harness.memory_intact()


def test_empty_write_list_is_a_no_op(byte_harness):
    before = byte_harness.transport.bus_writes
    byte_harness.device.writes([])
    assert byte_harness.transport.bus_writes == before
