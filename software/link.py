"""Byte transports to a device, and request/response exchange over them.

A ``Transport`` moves bytes: ``SerialTransport`` over pyserial to a real board, ``SimTransport`` into the
Amaranth simulation of the whole device through its UART pins, bit by bit. ``Link`` sends request frames
(``opentsu.protocol``) and collects the responses, with timeouts, retries and resynchronisation.
"""

from __future__ import annotations

import collections
import time

from .protocol import Command, FrameDecoder, Result, encode_frame

__all__ = ["Transport", "SerialTransport", "SimTransport", "Link", "LinkError", "DeviceRejected"]


class LinkError(Exception):
    """No usable answer from the device: nothing came, or only garbage, within the timeout and retries."""


class DeviceRejected(Exception):
    """The device answered with an error ``Result``."""

    def __init__(self, command, result: Result):
        self.command, self.result = command, result
        super().__init__(f"device rejected {Command(command).name}: {result.name}")


class Transport:
    """Bytes to and from a device.

    ``read_some(timeout)`` returns every byte that has arrived, waiting up to ``timeout`` seconds for the
    first one (empty on timeout). ``now()`` is the clock those timeouts are measured on.
    """

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def read_some(self, timeout: float) -> bytes:
        raise NotImplementedError

    def now(self) -> float:
        return time.monotonic()

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SerialTransport(Transport):
    """A serial port through pyserial. Opening a missing or busy port raises ``LinkError`` at once."""

    def __init__(self, port: str, baud: int = 3_000_000):
        import serial
        try:
            self._serial = serial.Serial(port, baud, timeout=0, write_timeout=2.0)
        except (serial.SerialException, OSError, ValueError) as exc:
            raise LinkError(f"cannot open serial port {port}: {exc}") from None
        self.port = port

    def write(self, data: bytes) -> None:
        import serial
        try:
            self._serial.write(data)
        except (serial.SerialException, OSError) as exc:
            raise LinkError(f"writing to {self.port} failed: {exc}") from None

    def read_some(self, timeout: float) -> bytes:
        import serial
        try:
            self._serial.timeout = max(0.0, timeout)
            first = self._serial.read(1)
            if not first:
                return b""
            return first + self._serial.read(self._serial.in_waiting)
        except (serial.SerialException, OSError) as exc:
            raise LinkError(f"reading from {self.port} failed: {exc}") from None

    def close(self) -> None:
        self._serial.close()


class SimTransport(Transport):
    """The Amaranth simulation of a ``gateware.device.Device`` (or anything with ``rx``/``tx`` pins),
    driven at bit level: every byte written becomes a start bit, eight data bits and a stop bit on ``rx``;
    ``tx`` is decoded the same way. Time is *device* time: ``now()`` is simulated cycles over ``clock_hz``,
    so a host timeout lasts as long as it would on a real board.
    """

    PERIOD = 1e-8   # simulated seconds per clock; only the cycle count matters

    def __init__(self, device, *, clock_hz: int, divisor: int, vcd: str | None = None):
        from amaranth.sim import Simulator
        self._device = device
        self._clock_hz = clock_hz
        self._divisor = divisor
        self._to_device = collections.deque()
        self._from_device = bytearray()
        self.cycles = 0
        sim = Simulator(device)
        sim.add_clock(self.PERIOD)
        sim.add_testbench(self._drive, background=True)
        sim.add_testbench(self._listen, background=True)
        self._sim = sim
        self._vcd = None
        if vcd:
            self._vcd = sim.write_vcd(vcd)
            self._vcd.__enter__()

    async def _drive(self, ctx):
        rx, d = self._device.rx, self._divisor
        ctx.set(rx, 1)
        while True:
            if not self._to_device:
                await ctx.tick()
                continue
            byte = self._to_device.popleft()
            for bit in [0] + [(byte >> k) & 1 for k in range(8)] + [1]:
                ctx.set(rx, bit)
                await ctx.tick().repeat(d)

    async def _listen(self, ctx):
        tx, d = self._device.tx, self._divisor
        while True:
            while ctx.get(tx):
                await ctx.tick()
            await ctx.tick().repeat(d // 2)        # middle of the start bit
            byte = 0
            for k in range(8):
                await ctx.tick().repeat(d)
                byte |= ctx.get(tx) << k
            await ctx.tick().repeat(d)              # stop bit
            self._from_device.append(byte)

    def write(self, data: bytes) -> None:
        self._to_device.extend(data)

    def run(self, cycles: int) -> None:
        """Advance the device by ``cycles`` clock cycles."""
        self.cycles += cycles
        self._sim.run_until(self.cycles * self.PERIOD)

    def now(self) -> float:
        return self.cycles / self._clock_hz

    def read_some(self, timeout: float) -> bytes:
        budget = max(1, int(timeout * self._clock_hz))
        step = 10 * self._divisor   # one byte time
        spent = 0
        while not self._from_device and spent < budget:
            chunk = min(step, budget - spent)
            self.run(chunk)
            spent += chunk
        out = bytes(self._from_device)
        self._from_device.clear()
        return out

    def close(self) -> None:
        if self._vcd is not None:
            self._vcd.__exit__(None, None, None)
            self._vcd = None


class Link:
    """Request/response exchange with sequence numbers, timeouts, retries and resynchronisation.

    A response is accepted only if its CRC is good and it echoes the request's sequence number; stale or
    garbled frames are skipped. A request is sent again (same sequence number) after a timeout or a
    ``BAD_CRC``/``TIMEOUT`` answer, up to ``retries`` times; then ``LinkError``.
    """

    def __init__(self, transport: Transport, timeout: float = 0.5, retries: int = 3):
        self.transport = transport
        self.timeout = timeout
        self.retries = retries
        self._seq = 0
        self._decoder = FrameDecoder()
        self._pending = collections.deque()

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFF
        return self._seq

    def _receive(self, seq: int, timeout: float):
        """The response frame echoing ``seq``, or None after ``timeout`` seconds of the transport's clock."""
        deadline = self.transport.now() + timeout
        while True:
            while self._pending:
                frame = self._pending.popleft()
                if frame[1] == seq:
                    return frame
            remaining = deadline - self.transport.now()
            if remaining <= 0:
                return None
            chunk = self.transport.read_some(remaining)
            if not chunk:
                return None
            self._pending.extend(self._decoder.feed(chunk))

    def request(self, command: Command, payload: bytes = b"", timeout: float | None = None):
        """Send one request; return the response payload (flags byte first). Raises ``DeviceRejected`` for
        an error result other than the retryable ones, ``LinkError`` when no answer comes."""
        timeout = self.timeout if timeout is None else timeout
        seq = self._next_seq()
        frame = encode_frame(command, seq, payload)
        last = None
        for _ in range(self.retries + 1):
            self.transport.write(frame)
            response = self._receive(seq, timeout)
            if response is None:
                last = "no answer"
                continue
            code, _, body = response
            try:
                result = Result(code)
            except ValueError:
                last = f"unknown result code {code}"
                continue
            if result in (Result.BAD_CRC, Result.TIMEOUT):
                last = result.name
                continue
            if result is not Result.OK:
                raise DeviceRejected(command, result)
            return body
        raise LinkError(f"{Command(command).name}: {last} after {self.retries + 1} attempts")


class Device:
    """The device API: identify, load programs, run sequences, read samples and status.

    One class for every transport; the simulated board, Verilator and a real board differ only in the
    ``Transport`` underneath.
    """

    def __init__(self, transport: Transport, timeout: float = 0.5, retries: int = 3):
        from .protocol import Identity
        self.link = Link(transport, timeout=timeout, retries=retries)
        body = self.link.request(Command.IDENTIFY)
        self.identity = Identity.from_bytes(body[1:])
        from .protocol import PROTOCOL_VERSION
        if self.identity.version != PROTOCOL_VERSION:
            raise LinkError(f"device speaks protocol version {self.identity.version}, this host {PROTOCOL_VERSION}")
        self.flags = body[0]

    # -- low level
    def _request(self, command, payload=b"", timeout=None):
        body = self.link.request(command, payload, timeout=timeout)
        self.flags = body[0]
        return body[1:]

    def write_words(self, region, offset: int, words) -> None:
        """Write consecutive words of ``region`` from ``offset``, packing as many per frame as fit."""
        import struct
        from .protocol import MAX_REQUEST_PAYLOAD, word_bytes
        size = word_bytes(region, self.identity.degree)
        per_frame = max(1, (MAX_REQUEST_PAYLOAD - 4) // size)
        words = list(words)
        for start in range(0, len(words), per_frame):
            chunk = words[start:start + per_frame]
            payload = struct.pack("<B", int(region)) + (offset + start).to_bytes(3, "little")
            payload += b"".join(int(w).to_bytes(size, "little") for w in chunk)
            self._request(Command.WRITE, payload)

    def read_words(self, region, offset: int, count: int) -> list[int]:
        import struct
        from .protocol import MAX_READ_COUNT, word_bytes
        size = word_bytes(region, self.identity.degree) if region != 0 else 4
        out = []
        for start in range(0, count, MAX_READ_COUNT):
            n = min(MAX_READ_COUNT, count - start)
            payload = struct.pack("<B", int(region)) + (offset + start).to_bytes(3, "little") + bytes([n])
            body = self._request(Command.READ, payload)
            out += [int.from_bytes(body[k * size:(k + 1) * size], "little") for k in range(n)]
        return out

    def writes(self, items) -> None:
        """Apply ``(region, offset, word)`` writes, grouping runs of consecutive offsets."""
        items = list(items)
        start = 0
        while start < len(items):
            region, offset, _ = items[start]
            end = start + 1
            while end < len(items) and items[end][0] == region and items[end][1] == offset + (end - start):
                end += 1
            self.write_words(region, offset, [w for _, _, w in items[start:end]])
            start = end

    def status(self):
        from .protocol import StatusReport
        return StatusReport.from_bytes(self._request(Command.STATUS))

    def start(self, flags: int = 0) -> None:
        self._request(Command.START, bytes([flags]))

    def stop(self) -> None:
        self._request(Command.STOP)

    def reset(self) -> None:
        self._request(Command.RESET)

    def read_samples(self, max_words: int = 4096):
        """``(first index, words)`` waiting in the device."""
        import struct
        body = self._request(Command.SAMPLES, struct.pack("<H", max_words))
        first = int.from_bytes(body[:4], "little")
        size = self.identity.sample_word_bytes
        words = [int.from_bytes(body[4 + k * size:4 + (k + 1) * size], "little")
                 for k in range((len(body) - 4) // size)]
        return first, words

    # -- high level
    def check_program(self, program) -> None:
        """Raise ``LinkError`` unless ``program`` was compiled for this device's fabric."""
        cfg, ident = program.geometry.config, self.identity
        mine = (ident.rows, ident.cols, tuple(map(tuple, ident.jumps)), ident.lanes, ident.latency)
        theirs = (cfg.rows, cfg.cols, tuple(map(tuple, program.geometry.grid.jumps)), cfg.lanes, cfg.latency)
        if mine != theirs:
            raise LinkError(f"the program targets a {program.geometry.describe()} fabric; the device has "
                            f"{ident.rows}×{ident.cols}, jumps {list(ident.jumps)}, {ident.lanes} lanes")
        if len(program.layers) > ident.layers:
            raise LinkError(f"the program has {len(program.layers)} layers; the device holds {ident.layers}")

    def load_program(self, program) -> None:
        from .devicemap import program_writes
        self.check_program(program)
        self.writes(program_writes(program))

    def run(self, program, ops, seed: int, chain: int, poll: float = 0.05, timeout: float | None = None):
        """Run ``ops`` for one chain and return its captures, (captures, fabric nodes) int8.

        ``timeout`` (device seconds) bounds the whole run; by default it grows with the sweeps asked for.
        """
        import numpy as np
        from .devicemap import seed_writes, sequence_writes, unpack_capture
        from .sequence import Opcode, captures
        g = program.geometry
        self.writes(seed_writes(seed, chain, g.lanes) + sequence_writes(ops))
        expected = captures(ops) * g.cycles
        sweeps = sum(op.arg for op in ops if op.code is Opcode.SWEEP) + captures(ops) * max(
            [op.arg for op in ops if op.code is Opcode.THIN] + [1])
        if timeout is None:
            timeout = 2.0 + 4 * sweeps * g.cycles / self.identity.clock_hz + expected * 20 * \
                self.identity.divisor * self.identity.sample_word_bytes / self.identity.clock_hz
        self.start()
        words = []
        deadline = self.link.transport.now() + timeout
        while len(words) < expected:
            first, got = self.read_samples(min(4096, expected - len(words)))
            if first != len(words):
                raise LinkError(f"sample stream lost words: expected index {len(words)}, got {first}")
            words += got
            if not got:
                if self.link.transport.now() > deadline:
                    raise LinkError(f"the device produced {len(words)} of {expected} capture words in time")
                if isinstance(self.link.transport, SimTransport):
                    self.link.transport.run(max(1, int(poll * self.identity.clock_hz)))
                else:
                    time.sleep(poll)
        caps = [unpack_capture(words[k:k + g.cycles], g) for k in range(0, expected, g.cycles)]
        return np.array(caps, dtype=np.int8).reshape(-1, g.n)
