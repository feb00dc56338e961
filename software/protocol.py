"""The UART command protocol: the one definition that the device decoder and the host driver share.

Frames (both directions), all multi-byte fields little endian::

    0xA5 0x5A | code u8 | seq u8 | length u16 | payload (length bytes) | crc u16

``crc`` is CRC-16/CCITT-FALSE (polynomial 0x1021, initial 0xFFFF, no reflection, no final XOR) over
``code`` through the end of the payload. A request's ``code`` is a ``Command``; a response's is a
``Result`` and echoes the request's ``seq``. Every response payload starts with one byte of device
``Flags`` (the "ack plus status"); the command-specific fields follow.

==========  ===================================================  ========================================
command     request payload                                       response payload after the flags byte
==========  ===================================================  ========================================
IDENTIFY    —                                                     ``identity`` blob (see ``Identity``)
WRITE       region u8, offset u24, words (1..; whole words only)  —
READ        region u8, offset u24, count u8                       ``count`` words
START       run flags u8 (``devicemap.Flags``)                    —
STOP        —                                                     —
STATUS      —                                                     ``StatusReport`` fields
SAMPLES     max words u16                                         first word index u32, then words
RESET       —                                                     —
==========  ===================================================  ========================================

Words are ``devicemap.region_word_bits`` wide, sent in ``word_bytes`` bytes. A SAMPLES word is one
capture word (``lanes`` bits) in ``sample_word_bytes`` bytes; the response carries as many as are
waiting, up to the maximum asked for, and the index of the first so the host notices a loss.

The device rejects, with an error ``Result`` and no change to any memory: a bad CRC, an unknown
command, a length that does not fit the command or exceeds ``MAX_REQUEST_PAYLOAD``, an unknown
region or an out-of-range offset or count, memory access while a sequence runs (``BUSY``), and a frame
whose bytes stop arriving for ``TIMEOUT_BIT_TIMES`` bit times. It hunts for the next sync after any of
them. Bytes outside frames are ignored.

Flow control: the host may pipeline WRITEs (each response is shorter than its request) and keep one
SAMPLES request waiting in the device behind the one being answered (sending the next only once a whole
response has arrived); any other request waits for its response. A START that repeats the sequence number
of the request executed just before is a resend and does not start the fabric again. See ``docs/protocol.md``.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from .devicemap import Region, region_word_bits

__all__ = ["SYNC", "PROTOCOL_VERSION", "MAX_REQUEST_PAYLOAD", "MAX_READ_COUNT", "TIMEOUT_BIT_TIMES", "Command",
           "Result", "Flags", "crc16", "encode_frame", "FrameDecoder", "Identity", "StatusReport", "word_bytes",
           "ProtocolError", "HEADER_BYTES", "FRAME_OVERHEAD", "ADDRESS_BYTES", "SAMPLE_INDEX_BYTES",
           "samples_response_bytes", "REQUEST_PAYLOAD_BYTES"]

SYNC = b"\xA5\x5A"
PROTOCOL_VERSION = 1
#: Longest request payload the device buffers (a WRITE of one 64-bit word, or four 16-bit words).
MAX_REQUEST_PAYLOAD = 12
#: Most words one READ returns.
MAX_READ_COUNT = 64
#: Bit times of silence inside a frame after which the device abandons it.
TIMEOUT_BIT_TIMES = 200
#: code, seq, length.
HEADER_BYTES = 4
#: The address at the front of a WRITE's and a READ's payload: region u8, offset u24.
ADDRESS_BYTES = 4
#: The first-index field at the front of a SAMPLES response's words (after the flags byte).
SAMPLE_INDEX_BYTES = 4
#: Bytes a frame adds to its payload: sync, header, CRC.
FRAME_OVERHEAD = len(SYNC) + HEADER_BYTES + 2


class Command(enum.IntEnum):
    IDENTIFY = 0x01
    WRITE = 0x02
    READ = 0x03
    START = 0x04
    STOP = 0x05
    STATUS = 0x06
    SAMPLES = 0x07
    RESET = 0x08


#: The payload length of every request but WRITE, whose payload is the address and then whole words.
REQUEST_PAYLOAD_BYTES = {Command.IDENTIFY: 0, Command.READ: ADDRESS_BYTES + 1, Command.START: 1, Command.STOP: 0,
                         Command.STATUS: 0, Command.SAMPLES: 2, Command.RESET: 0}


class Result(enum.IntEnum):
    OK = 0x00
    BAD_CRC = 0x01
    UNKNOWN_COMMAND = 0x02
    BAD_LENGTH = 0x03
    BAD_ARGUMENT = 0x04
    BUSY = 0x05
    TIMEOUT = 0x06


class Flags(enum.IntFlag):
    """The first byte of every response."""

    RUNNING = 1 << 0        # a sequence is executing
    TRNG_ALARM = 1 << 1     # sticky: the TRNG's health tests failed
    FABRIC_ERROR = 1 << 2   # sticky: a refused write or a bad sequence (details in STATUS)
    LINK_ERROR = 1 << 3     # sticky: a frame was rejected since the last STATUS


class ProtocolError(Exception):
    """A frame the host cannot use."""


def crc16(data: bytes, crc: int = 0xFFFF) -> int:
    """CRC-16/CCITT-FALSE of ``data`` (check value for b"123456789": 0x29B1)."""
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
    return crc


def encode_frame(code: int, seq: int, payload: bytes = b"") -> bytes:
    if not 0 <= seq < 256:
        raise ValueError(f"sequence number {seq} does not fit a byte")
    if len(payload) >= 1 << 16:
        raise ValueError(f"payload of {len(payload)} bytes is too long")
    body = struct.pack("<BBH", code, seq, len(payload)) + bytes(payload)
    return SYNC + body + struct.pack("<H", crc16(body))


class FrameDecoder:
    """Incremental decoder of response frames: feed bytes, collect ``(code, seq, payload)`` tuples.

    Garbage before a sync is skipped (and counted in ``skipped``); a frame with a bad CRC is dropped
    (``bad_frames``) and the search resumes one byte after its sync.
    """

    def __init__(self, max_payload: int = 1 << 16):
        self._buffer = bytearray()
        self.max_payload = max_payload
        self.skipped = 0
        self.bad_frames = 0

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        self._buffer += data
        frames = []
        while True:
            start = self._buffer.find(SYNC)
            if start < 0:
                keep = 1 if self._buffer.endswith(SYNC[:1]) else 0
                self.skipped += len(self._buffer) - keep
                del self._buffer[:len(self._buffer) - keep]
                return frames
            if start:
                self.skipped += start
                del self._buffer[:start]
            if len(self._buffer) < len(SYNC) + HEADER_BYTES:
                return frames
            code, seq, length = struct.unpack_from("<BBH", self._buffer, len(SYNC))
            if length > self.max_payload:
                self.bad_frames += 1
                del self._buffer[:1]
                continue
            end = len(SYNC) + HEADER_BYTES + length + 2
            if len(self._buffer) < end:
                # Incomplete, or a garbled length that would swallow what follows: if a good frame is
                # already complete further on, this one was garbage.
                later = self._next_good_frame()
                if later is None:
                    return frames
                self.bad_frames += 1
                self.skipped += later
                del self._buffer[:later]
                continue
            body = bytes(self._buffer[len(SYNC):end - 2])
            (crc,) = struct.unpack_from("<H", self._buffer, end - 2)
            if crc != crc16(body):
                self.bad_frames += 1
                del self._buffer[:1]
                continue
            frames.append((code, seq, body[HEADER_BYTES:]))
            del self._buffer[:end]

    def _next_good_frame(self):
        """Offset of the first complete frame with a good CRC after the buffer's first byte, or None."""
        buf = self._buffer
        start = buf.find(SYNC, 1)
        while start >= 0:
            if len(buf) >= start + len(SYNC) + HEADER_BYTES:
                (length,) = struct.unpack_from("<H", buf, start + len(SYNC) + 2)
                end = start + len(SYNC) + HEADER_BYTES + length + 2
                if length <= self.max_payload and end <= len(buf):
                    body = bytes(buf[start + len(SYNC):end - 2])
                    if struct.unpack_from("<H", buf, end - 2)[0] == crc16(body):
                        return start
            start = buf.find(SYNC, start + 1)
        return None


def samples_response_bytes(words: int, word_bytes: int) -> int:
    """Bytes on the line of a SAMPLES response frame carrying ``words`` capture words of ``word_bytes`` each:
    the frame around the flags byte, the first-word index and the words."""
    return FRAME_OVERHEAD + 1 + SAMPLE_INDEX_BYTES + words * word_bytes


def word_bytes(region: Region, degree: int) -> int:
    """Bytes that carry one word of ``region``."""
    return (region_word_bits(region, degree) + 7) // 8


@dataclass(frozen=True)
class Identity:
    """What IDENTIFY returns: the protocol version and the build parameters the host needs.

    The blob's last byte holds the device's optional features: bit 0 ``trng`` (the ring-oscillator
    TRNG), bit 1 ``moments`` (the on-chip moment counters: the ACCUMULATE op and region MOMENTS).
    """

    version: int
    rows: int
    cols: int
    jumps: tuple[tuple[int, int], ...]
    lanes: int
    latency: int
    cycles: int
    degree: int
    layers: int
    sequence_depth: int
    sample_word_bytes: int
    fifo_depth: int
    clock_hz: int
    divisor: int
    trng: bool
    formats: int = 1  # opentsu.formats revision: 7-bit weights, PBIT octave rule, xoroshiro64 lanes
    moments: bool = True

    def to_bytes(self) -> bytes:
        out = struct.pack("<BBBB", self.version, self.formats, self.rows, self.cols)
        out += struct.pack("<B", len(self.jumps)) + b"".join(struct.pack("<bb", *j) for j in self.jumps)
        out += struct.pack("<BBHBBHBHIHB", self.lanes, self.latency, self.cycles, self.degree, self.layers,
                           self.sequence_depth, self.sample_word_bytes, self.fifo_depth, self.clock_hz,
                           self.divisor, int(self.trng) | int(self.moments) << 1)
        return out

    @classmethod
    def from_bytes(cls, data: bytes) -> "Identity":
        try:
            version, formats, rows, cols, n_jumps = struct.unpack_from("<BBBBB", data, 0)
            jumps = tuple(struct.unpack_from("<bb", data, 5 + 2 * k) for k in range(n_jumps))
            rest = struct.unpack_from("<BBHBBHBHIHB", data, 5 + 2 * n_jumps)
        except struct.error:
            raise ProtocolError("identity blob is truncated") from None
        (lanes, latency, cycles, degree, layers, depth, sample_bytes, fifo, clock, divisor, features) = rest
        return cls(version, rows, cols, jumps, lanes, latency, cycles, degree, layers, depth, sample_bytes, fifo,
                   clock, divisor, bool(features & 1), formats, bool(features & 2))

    def config(self):
        from .fabric import FabricConfig
        return FabricConfig(self.rows, self.cols, self.jumps, self.lanes, self.layers, self.latency)


@dataclass(frozen=True)
class StatusReport:
    """What STATUS returns after the flags byte: ``FIELDS`` in order, each little endian."""

    fabric_status: int     # devicemap.Status bits
    op_index: int
    sweeps: int            # sweeps issued since START (24 bits, wraps)
    samples_waiting: int   # capture words in the device FIFO
    samples_sent: int      # capture words sent since START (wraps)
    crc_errors: int        # the counters saturate at 255 and clear when STATUS is answered
    framing_errors: int
    overruns: int
    timeouts: int
    rejected: int          # frames rejected for any other reason
    trng_failures: int

    #: (field, bytes) in wire order.
    FIELDS = (("fabric_status", 1), ("op_index", 1), ("sweeps", 3), ("samples_waiting", 2), ("samples_sent", 4),
              ("crc_errors", 1), ("framing_errors", 1), ("overruns", 1), ("timeouts", 1), ("rejected", 1),
              ("trng_failures", 1))

    def to_bytes(self) -> bytes:
        return b"".join(int(getattr(self, name)).to_bytes(size, "little") for name, size in self.FIELDS)

    @classmethod
    def from_bytes(cls, data: bytes) -> "StatusReport":
        if len(data) < cls.size():
            raise ProtocolError("status report is truncated")
        values, pos = {}, 0
        for name, size in cls.FIELDS:
            values[name] = int.from_bytes(data[pos:pos + size], "little")
            pos += size
        return cls(**values)

    @classmethod
    def size(cls) -> int:
        return sum(size for _, size in cls.FIELDS)
