"""Byte transports to a device, request/response exchange over them, and the device API.

A ``Transport`` moves bytes: ``SerialTransport`` over pyserial to a real board, ``SimTransport`` into the
Amaranth simulation of the whole device through its UART pins, bit by bit. ``Link`` sends request frames
(``opentsu.protocol``) and collects the responses, with timeouts, retries and resynchronisation. ``Device``
is the API on top (identify, load a program, run a sequence, read samples); one driver serves every
transport.

Failures surface as exceptions with a one-line message:

* ``LinkError``: no usable answer (a missing or silent port, garbage only, a lost sample word, a run that
  does not finish in time);
* ``DeviceRejected``: the device answered with an error ``Result`` (e.g. ``BUSY``);
* ``ProgramMismatch``: the program was compiled for a different fabric than the device's.
"""

from __future__ import annotations

import collections
import struct
import time

from .protocol import (FRAME_OVERHEAD, MAX_READ_COUNT, MAX_REQUEST_PAYLOAD, PROTOCOL_VERSION, SAMPLE_INDEX_BYTES,
                       Command, Flags, FrameDecoder, Identity, ProtocolError, Result, StatusReport, encode_frame,
                       samples_response_bytes, word_bytes)

__all__ = ["Transport", "SerialTransport", "SimTransport", "HostLatency", "Link", "Device", "LinkError",
           "DeviceRejected", "MissingFeature", "ProgramMismatch", "EntropyAlarm", "ENTROPY_SOURCES", "FORMATS_REVISION"]

#: The number-format revision (``Identity.formats``) this host's compiler and emulator implement.
FORMATS_REVISION = 1


class LinkError(Exception):
    """No usable answer from the device: nothing came, or only garbage, within the timeout and retries."""


class DeviceRejected(Exception):
    """The device answered with an error ``Result``."""

    def __init__(self, command, result: Result):
        self.command, self.result = command, result
        super().__init__(f"device rejected {Command(command).name}: {result.name}")


class ProgramMismatch(Exception):
    """The program targets a fabric other than the device's."""


class MissingFeature(Exception):
    """The device was built without a feature the request needs (``Identity``: TRNG, moment counters)."""


class EntropyAlarm(LinkError):
    """The TRNG's health tests raised their alarm during a run that mixed its bits into the lanes."""


#: The lanes' random sources a run may use: ``prng`` alone (reproducible: the emulator's streams) or ``trng``,
#: the ring-oscillator TRNG's bits mixed into them (``devicemap.Flags.TRNG_MIX``; not reproducible).
ENTROPY_SOURCES = ("prng", "trng")


# ------------------------------------------------------------------------------------------------- transports

class Transport:
    """Bytes to and from a device.

    ``write(data)`` queues bytes for the device. ``read_some(timeout)`` returns every byte that has arrived,
    waiting up to ``timeout`` seconds for the first one (empty on timeout). ``now()`` is the clock those
    timeouts are measured on, and ``idle(seconds)`` lets that much of it pass with no traffic. For a real
    device both are wall-clock time; a simulated device counts its own clock cycles instead, so a timeout
    lasts as long as it would on a board however slowly the simulation runs.
    """

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def read_some(self, timeout: float) -> bytes:
        raise NotImplementedError

    def now(self) -> float:
        return time.monotonic()

    def idle(self, seconds: float) -> None:
        time.sleep(max(0.0, seconds))

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SerialTransport(Transport):
    """A serial port through pyserial, 8N1 at ``baud``.

    Opening a missing or busy port raises ``LinkError`` at once; so does a port that fails while in use.
    The port is opened for exclusive use.
    """

    POLL = 0.01   # seconds one blocking read may take; read_some loops on it up to its own timeout

    def __init__(self, port: str, baud: int = 3_000_000):
        import serial
        self.port = port
        try:
            self._serial = serial.Serial(port, baud, timeout=self.POLL, write_timeout=2.0, exclusive=True)
        except (serial.SerialException, OSError, ValueError) as exc:
            import os
            errno = getattr(exc, "errno", None)
            reason = os.strerror(errno) if isinstance(errno, int) else str(exc)
            if "lock" in str(exc).lower():
                reason = "it is in use by another program"
            raise LinkError(f"cannot open serial port {port}: {reason}") from None

    def write(self, data: bytes) -> None:
        import serial
        try:
            self._serial.write(data)
        except (serial.SerialException, OSError) as exc:
            raise LinkError(f"writing to {self.port} failed: {exc}") from None

    def read_some(self, timeout: float) -> bytes:
        import serial
        deadline = time.monotonic() + max(0.0, timeout)
        try:
            while True:
                data = self._serial.read(max(1, self._serial.in_waiting))
                if data:
                    return data + self._serial.read(self._serial.in_waiting)
                if time.monotonic() >= deadline:
                    return b""
        except (serial.SerialException, OSError) as exc:
            raise LinkError(f"reading from {self.port} failed: {exc}") from None

    def close(self) -> None:
        self._serial.close()


class SimTransport(Transport):
    """The Amaranth simulation of a ``gateware.device.Device`` (or anything with ``rx``/``tx`` pins),
    driven at bit level: every byte written becomes a start bit, eight data bits and a stop bit on ``rx``,
    ``divisor`` clock cycles each; ``tx`` is decoded the same way, sampling mid-bit. Time is *device* time:
    ``now()`` is simulated cycles over ``clock_hz``.

    The line driver and listener wake once per bit rather than once per clock (they wait with ``delay``
    a quarter period off the clock edges), so most of the simulation time goes to the design itself.
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

    # Both testbenches use only plain awaits (no ``.repeat()``/``.until()``), so abandoning them when the
    # simulation is dropped leaves no async generator to close.
    async def _drive(self, ctx):
        rx, bit_time = self._device.rx, self._divisor * self.PERIOD
        ctx.set(rx, 1)
        await ctx.tick()
        await ctx.delay(self.PERIOD / 4)
        while True:
            if not self._to_device:
                await ctx.delay(bit_time)
                continue
            byte = self._to_device.popleft()
            for bit in [0] + [(byte >> k) & 1 for k in range(8)] + [1]:
                ctx.set(rx, bit)
                await ctx.delay(bit_time)

    async def _listen(self, ctx):
        tx, d = self._device.tx, self._divisor
        while True:
            if ctx.get(tx):
                await ctx.negedge(tx)           # just after the clock edge that starts the start bit
            await ctx.delay((d // 2 + 0.25) * self.PERIOD)
            if ctx.get(tx):                     # a glitch, not a start bit
                continue
            byte = 0
            for k in range(8):
                await ctx.delay(d * self.PERIOD)
                byte |= ctx.get(tx) << k
            await ctx.delay(d * self.PERIOD)    # the stop bit
            self._from_device.append(byte)

    def write(self, data: bytes) -> None:
        self._to_device.extend(data)

    def run(self, cycles: int) -> None:
        """Advance the device by ``cycles`` clock cycles."""
        self.cycles += max(0, int(cycles))
        self._sim.run_until(self.cycles * self.PERIOD)

    def now(self) -> float:
        return self.cycles / self._clock_hz

    def idle(self, seconds: float) -> None:
        self.run(max(1, round(seconds * self._clock_hz)))

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


class HostLatency(Transport):
    """A simulated device (``SimTransport``, ``VerilatorTransport``) seen by a host that is slow to turn
    around: every byte from the device reaches ``read_some`` ``latency`` seconds of device time after the
    device sent it, as behind a USB serial adapter whose latency timer holds short reads back (an FT2232H:
    1 ms at best); bytes to the device go out at once. For measuring what that latency costs.

    The device is advanced ``step`` seconds at a time; a byte counts as sent at the end of the step in
    which it arrived, so the host sees it between ``latency`` and ``latency + step`` after it was sent.
    """

    def __init__(self, inner: Transport, latency: float, *, step: float = 1e-5):
        if latency < 0 or step <= 0:
            raise ValueError(f"need a latency >= 0 and a step > 0, not {latency!r}, {step!r}")
        self.inner = inner
        self.latency = latency
        self.step = step
        self._arrived = collections.deque()   # (device time the host sees them, bytes)

    def _advance(self, until: float) -> None:
        """Run the device one step toward device time ``until``, keeping what it sends with when it is due."""
        data = self.inner.read_some(min(self.step, until - self.inner.now()))
        if data:
            self._arrived.append((self.inner.now() + self.latency, data))

    def write(self, data: bytes) -> None:
        self.inner.write(data)

    def read_some(self, timeout: float) -> bytes:
        deadline = self.inner.now() + max(0.0, timeout)
        while True:
            out = bytearray()
            while self._arrived and self._arrived[0][0] <= self.inner.now():
                out += self._arrived.popleft()[1]
            if out or self.inner.now() >= deadline:
                return bytes(out)
            self._advance(min(deadline, self._arrived[0][0]) if self._arrived else deadline)

    def now(self) -> float:
        return self.inner.now()

    def idle(self, seconds: float) -> None:
        until = self.inner.now() + max(0.0, seconds)
        while self.inner.now() < until:
            self._advance(until)

    def close(self) -> None:
        self.inner.close()


# ------------------------------------------------------------------------------------------------- link

class Link:
    """Request/response exchange with sequence numbers, timeouts, retries and resynchronisation.

    A response is accepted only if its CRC is good and it echoes the request's sequence number; stale or
    garbled frames are skipped (the decoder hunts for the next sync). A request is sent again after a
    timeout or an answer that corruption on the line can cause (``RETRYABLE``: a bad CRC, a frame cut
    short, or a length the device refused before it could check the CRC), up to ``retries`` times; then
    ``LinkError``, or ``DeviceRejected`` if the device kept refusing the length.

    ``timeout`` is how long to wait for a response beyond the time its bytes take on the wire, which is
    ``byte_time`` seconds a byte (``Device`` sets it from the device's identity).
    """

    RETRYABLE = (Result.BAD_CRC, Result.TIMEOUT, Result.BAD_LENGTH)

    def __init__(self, transport: Transport, timeout: float = 0.5, retries: int = 3, byte_time: float = 0.0):
        if timeout <= 0 or retries < 0:
            raise ValueError(f"need a positive timeout and non-negative retries, not {timeout!r}, {retries!r}")
        self.transport = transport
        self.timeout = timeout
        self.retries = retries
        self.byte_time = byte_time
        self.resent = 0             # requests sent again, over the link's life
        self._seq = 0
        self._decoder = FrameDecoder()
        self._pending = collections.deque()

    @property
    def max_response(self) -> int:
        """Longest response payload accepted; a frame announcing more is garbage."""
        return self._decoder.max_payload

    @max_response.setter
    def max_response(self, value: int):
        self._decoder.max_payload = value

    @property
    def garbage(self) -> int:
        """Bytes skipped and frames dropped by the response decoder so far."""
        return self._decoder.skipped + self._decoder.bad_frames

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFF
        return self._seq

    def _wait(self, frame: bytes, response_bytes: int) -> float:
        return self.timeout + (len(frame) + FRAME_OVERHEAD + 1 + response_bytes) * self.byte_time

    def _receive(self, seqs, timeout: float):
        """The next response frame echoing one of ``seqs``, or None after ``timeout`` seconds."""
        deadline = self.transport.now() + timeout
        while True:
            while self._pending:
                frame = self._pending.popleft()
                if frame[1] in seqs:
                    return frame
            remaining = deadline - self.transport.now()
            if remaining <= 0:
                return None
            chunk = self.transport.read_some(remaining)
            if not chunk:
                return None
            self._pending.extend(self._decoder.feed(chunk))

    @staticmethod
    def _classify(response):
        """``(Result or None, body)``; None for a frame the host cannot use (an unknown result code, or
        an OK without its flags byte)."""
        code, _, body = response
        try:
            result = Result(code)
        except ValueError:
            return None, f"unknown result code {code:#04x}"
        if result is Result.OK and not body:
            return None, "a response without its flags byte"
        return result, body

    def request(self, command: Command, payload: bytes = b"", *, response_bytes: int = 0,
                timeout: float | None = None) -> bytes:
        """Send one request; return the response payload (flags byte first). Raises ``DeviceRejected`` for
        an error result other than the retryable ones, ``LinkError`` when no usable answer comes.

        ``response_bytes`` is the longest response payload expected, to allow for its time on the wire.
        """
        seq = self._next_seq()
        frame = encode_frame(command, seq, payload)
        wait = self._wait(frame, response_bytes) if timeout is None else timeout
        last = last_result = None
        for attempt in range(self.retries + 1):
            if attempt:
                self.resent += 1
            self.transport.write(frame)
            response = self._receive({seq}, wait)
            result = None
            if response is None:
                last = "no answer"
            else:
                result, body = self._classify(response)
                if result is None:
                    last = body
                elif result in self.RETRYABLE:
                    last = f"the device reported {result.name}"
                elif result is not Result.OK:
                    raise DeviceRejected(command, result)
                else:
                    return body
            last_result = result
        if last_result is Result.BAD_LENGTH:
            raise DeviceRejected(command, last_result)
        raise LinkError(f"{Command(command).name}: {last} after {self.retries + 1} attempts")

    def post(self, command: Command, payload: bytes = b"") -> int:
        """Send one request and return its sequence number, without waiting for the response (``collect``
        it). No retries: the caller decides what a missing answer means, and keeps to the flow-control
        rules of ``docs/protocol.md`` (a request that completes while the device already holds one waiting
        request is lost to receiver overruns)."""
        seq = self._next_seq()
        self.transport.write(encode_frame(command, seq, payload))
        return seq

    def collect(self, seqs, timeout: float):
        """The next response echoing one of ``seqs`` (requests ``post``ed), as ``(seq, result, body)`` with
        ``result`` a ``Result``, or None for a frame the host cannot use (``body`` then says why); None when
        no such response comes within ``timeout`` seconds. The device answers in order, so a response
        also means that no answer will come for a request posted before it."""
        response = self._receive(set(seqs), timeout)
        if response is None:
            return None
        result, body = self._classify(response)
        return response[1], result, body

    def pipeline(self, command: Command, payloads, *, window: int = 16) -> list[bytes]:
        """Send ``payloads`` as requests back to back, up to ``window`` awaiting their responses, and return
        the response payloads in order.

        Only for requests that may run in any order and more than once, and whose responses are shorter
        than the requests (WRITE: see the flow-control rules in ``docs/protocol.md``). A request that gets
        no answer or a retryable error is sent again (with a new sequence number) after the ones in
        flight, up to ``retries`` times.
        """
        payloads = list(payloads)
        bodies = [None] * len(payloads)
        attempts = [0] * len(payloads)
        queue = collections.deque(range(len(payloads)))
        inflight = collections.OrderedDict()   # seq -> (index, frame)
        failure = {}

        def resend(index, reason, result=None):
            if attempts[index] > self.retries:
                if result is Result.BAD_LENGTH:
                    raise DeviceRejected(command, result)
                raise LinkError(f"{Command(command).name}: {reason} after {attempts[index]} attempts")
            failure[index] = reason
            self.resent += 1
            queue.append(index)

        while queue or inflight:
            while queue and len(inflight) < window:
                index = queue.popleft()
                seq = self._next_seq()
                if seq in inflight:    # the window must not wrap the sequence numbers
                    queue.appendleft(index)
                    break
                frame = encode_frame(command, seq, payloads[index])
                attempts[index] += 1
                inflight[seq] = (index, frame)
                self.transport.write(frame)
            wait = self.timeout + sum(len(f) + FRAME_OVERHEAD + 1 for _, f in inflight.values()) * self.byte_time
            response = self._receive(set(inflight), wait)
            if response is None:
                for index, _ in inflight.values():
                    resend(index, "no answer")
                inflight.clear()
                continue
            index, _ = inflight.pop(response[1])
            result, body = self._classify(response)
            if result is None:
                resend(index, body)
            elif result in self.RETRYABLE:
                resend(index, f"the device reported {result.name}", result)
            elif result is not Result.OK:
                raise DeviceRejected(command, result)
            else:
                bodies[index] = body
        return bodies


# ------------------------------------------------------------------------------------------------- device API

def fabric_cycles(ops, geometry) -> int:
    """Clock cycles a fabric takes for a sequence, roughly (an upper estimate, for timeouts)."""
    from .devicemap import moment_kinds
    from .sequence import Opcode, sweeps
    per_sweep = geometry.cycles + 8
    total = 200 + sweeps(ops) * per_sweep
    for op in ops:
        if op.code is Opcode.CAPTURE:
            total += op.arg * per_sweep
        elif op.code is Opcode.ACCUMULATE:
            total += op.arg * (4 * moment_kinds(geometry.degree) * geometry.cycles + 8)
        elif op.code is Opcode.LOAD:
            total += 4 * per_sweep
    return total


class Device:
    """The device API: identify, load programs, run sequences, read samples and status.

    One class for every transport; the simulated board, Verilator and a real board differ only in the
    ``Transport`` underneath. Construction sends IDENTIFY and checks the protocol version and number
    formats; ``identity`` holds the answer and ``flags`` the device flags of the latest response.

    ``queue_samples`` (default True): while a run streams capture words, keep one SAMPLES request waiting
    in the device behind the one it is answering (``run``), so the host's turnaround does not leave the
    line idle; False sends each SAMPLES request only after the previous response (for comparisons).
    """

    def __init__(self, transport: Transport, timeout: float = 0.5, retries: int = 3, *, queue_samples: bool = True):
        self.link = Link(transport, timeout=timeout, retries=retries)
        self.queue_samples = bool(queue_samples)
        # A run that ended in an exception may leave the fabric running and capture words in the FIFO, which
        # START does not empty: the next run RESETs first, so they cannot pass for its own first words.
        self._run_interrupted = False
        body = self.link.request(Command.IDENTIFY, response_bytes=64)
        self.flags = Flags(body[0] & 0xF)
        try:
            self.identity = Identity.from_bytes(body[1:])
        except ProtocolError as exc:
            raise LinkError(f"the device's identity is malformed: {exc}") from None
        ident = self.identity
        if ident.version != PROTOCOL_VERSION:
            raise LinkError(f"the device speaks protocol version {ident.version}; this host speaks {PROTOCOL_VERSION}")
        if ident.formats != FORMATS_REVISION:
            raise LinkError(f"the device uses number-format revision {ident.formats}; this host implements "
                            f"{FORMATS_REVISION}")
        if ident.clock_hz <= 0 or ident.divisor <= 0:
            raise LinkError(f"the device reports a {ident.clock_hz} Hz clock and UART divisor {ident.divisor}")
        self.link.byte_time = 10 * ident.divisor / ident.clock_hz
        # The longest response this device can send: a garbled length beyond it is recognised at once.
        self.link.max_response = max(1 + MAX_READ_COUNT * 8, 5 + (ident.fifo_depth + 1) * ident.sample_word_bytes,
                                     1 + len(body), 1 + StatusReport.size())

    @property
    def transport(self) -> Transport:
        return self.link.transport

    # -- requests
    def _request(self, command, payload=b"", response_bytes=0):
        body = self.link.request(command, payload, response_bytes=response_bytes)
        self.flags = Flags(body[0] & 0xF)
        return body[1:]

    def _word_bytes(self, region) -> int:
        return word_bytes(region, self.identity.degree)

    def write_words(self, region, offset: int, words) -> None:
        """Write consecutive words of ``region`` from ``offset`` (see ``writes``)."""
        self.writes([(region, offset + k, word) for k, word in enumerate(words)])

    def writes(self, items) -> None:
        """Apply ``(region, offset, word)`` writes: runs of consecutive offsets share frames, and frames are
        pipelined in batches within which no word is written twice (so a resent frame cannot reorder two
        writes of one word)."""
        items = list(items)
        batch, touched = [], set()

        def flush():
            if batch:
                self._write_batch(batch)
            batch.clear()
            touched.clear()

        for region, offset, word in items:
            key = (int(region), offset)
            if key in touched:
                flush()
            touched.add(key)
            batch.append((region, offset, word))
        flush()

    def _write_batch(self, items):
        # No word repeats within a batch, so the writes commute: sort them into runs of consecutive offsets.
        items = sorted(items, key=lambda item: (int(item[0]), item[1]))
        size_of = {}
        payloads = []
        start = 0
        while start < len(items):
            region, offset, _ = items[start]
            size = size_of.setdefault(region, self._word_bytes(region))
            per_frame = max(1, (MAX_REQUEST_PAYLOAD - 4) // size)
            end = start + 1
            while (end < len(items) and end - start < per_frame and items[end][0] == region
                   and items[end][1] == offset + (end - start)):
                end += 1
            payload = struct.pack("<B", int(region)) + offset.to_bytes(3, "little")
            payloads.append(payload + b"".join(int(w).to_bytes(size, "little") for _, _, w in items[start:end]))
            start = end
        bodies = self.link.pipeline(Command.WRITE, payloads)
        if bodies:
            self.flags = Flags(bodies[-1][0] & 0xF)

    def read_words(self, region, offset: int, count: int) -> list[int]:
        size = self._word_bytes(region)
        out = []
        for start in range(0, count, MAX_READ_COUNT):
            n = min(MAX_READ_COUNT, count - start)
            payload = struct.pack("<B", int(region)) + (offset + start).to_bytes(3, "little") + bytes([n])
            body = self._request(Command.READ, payload, response_bytes=1 + n * size)
            if len(body) != n * size:
                raise LinkError(f"READ of {n} words returned {len(body)} bytes")
            out += [int.from_bytes(body[k * size:(k + 1) * size], "little") for k in range(n)]
        return out

    def status(self) -> StatusReport:
        try:
            return StatusReport.from_bytes(self._request(Command.STATUS, response_bytes=1 + StatusReport.size()))
        except ProtocolError as exc:
            raise LinkError(str(exc)) from None

    def start(self, flags: int = 0) -> None:
        self._request(Command.START, bytes([flags]))

    def stop(self) -> None:
        self._request(Command.STOP)

    def reset(self, timeout: float = 1.0) -> None:
        """RESET (stop the fabric, empty the sample FIFO, clear the link counters) until the fabric is idle
        and the FIFO empty: a capture blocked on a full FIFO only ends once the FIFO is emptied, and then
        pushes the rest of its words, which must not pass for the next run's."""
        deadline = self.transport.now() + timeout
        while True:
            self._request(Command.RESET)
            status = self.status()
            if not status.fabric_status & 1 and not status.samples_waiting:
                return
            if self.transport.now() > deadline:
                raise LinkError(f"the fabric did not stop after RESET ({status.samples_waiting} capture words "
                                f"still waiting)")
            self.transport.idle(20 * self.link.byte_time)

    def read_samples(self, max_words: int = 4096):
        """``(index of the first word, words)``: the capture words waiting in the device, up to ``max_words``."""
        max_words = max(0, min(max_words, 0xFFFF))
        size = self.identity.sample_word_bytes
        longest = min(max_words, self.identity.fifo_depth + 1)
        payload = samples_response_bytes(longest, size) - FRAME_OVERHEAD     # flags, index, words
        body = self._request(Command.SAMPLES, struct.pack("<H", max_words), response_bytes=payload)
        return self._sample_words(body)

    def _sample_words(self, body):
        """``(index of the first word, words)`` of a SAMPLES response body (after the flags byte)."""
        size = self.identity.sample_word_bytes
        if len(body) < SAMPLE_INDEX_BYTES or (len(body) - SAMPLE_INDEX_BYTES) % size:
            raise LinkError(f"a SAMPLES response of {len(body)} bytes does not hold whole words")
        first = int.from_bytes(body[:SAMPLE_INDEX_BYTES], "little")
        words = [int.from_bytes(body[k:k + size], "little") for k in range(SAMPLE_INDEX_BYTES, len(body), size)]
        return first, words

    # -- programs and runs
    def check_program(self, program) -> None:
        """Raise ``ProgramMismatch`` unless ``program`` was compiled for this device's fabric."""
        from .fabric import FabricGeometry
        ident = self.identity
        mine = (f"{ident.rows}×{ident.cols} torus, jumps {[list(j) for j in ident.jumps]}, {ident.lanes} lanes, "
                f"latency {ident.latency}, {ident.layers} layers")
        g = program.geometry
        if not isinstance(g, FabricGeometry):
            raise ProgramMismatch(f"the program has no fabric geometry (a general graph); the device has a {mine}")
        cfg = g.config
        same = ((ident.rows, ident.cols, tuple(map(tuple, ident.jumps)), ident.lanes, ident.latency, ident.cycles,
                 ident.degree) ==
                (cfg.rows, cfg.cols, tuple(map(tuple, g.grid.jumps)), cfg.lanes, cfg.latency, g.cycles, g.degree))
        if not same:
            raise ProgramMismatch(f"the program was compiled for a {g.describe()} fabric; the device has a {mine}")
        if len(program.layers) > ident.layers:
            raise ProgramMismatch(f"the program has {len(program.layers)} layers; the device holds {ident.layers}")

    def load_program(self, program) -> None:
        from .devicemap import program_writes
        self.check_program(program)
        self.writes(program_writes(program))

    def run(self, program, ops, seed: int, chain: int, *, poll: float = 0.002, timeout: float | None = None,
            entropy: str = "prng"):
        """Run ``ops`` (``opentsu.sequence``) for global chain ``chain`` and return its captures,
        (captures, fabric nodes) int8.

        Seeds the lanes for ``chain``, stores the sequence, STARTs it and drains the sample FIFO until every
        capture word has arrived, checking each response's first-word index, so a lost word is an error
        rather than a shifted sample. While the responses bring words and the fabric runs, one SAMPLES
        request waits in the device behind the one it answers (``queue_samples``); otherwise the host sends
        the next request after the response, pausing up to ``poll`` seconds after an empty one. ``timeout``
        (device seconds) bounds the run; by default it allows four times the fabric's own time plus the time
        the words take on the UART. Returns with no request outstanding. After a run that raised (the
        link failed, or the caller was interrupted), the next run first RESETs the device. A sequence whose
        result would depend on the spins the previous run left (``sequence.previous_run_dependence``) raises
        ``SequenceError`` before anything is sent.

        ``entropy="trng"`` mixes the TRNG's bits into the lane generators (the device must have one, else
        ``MissingFeature`` before anything is sent); the samples are then no longer the emulator's. If the
        TRNG's health tests raise their sticky alarm during such a run, the samples are discarded and
        ``EntropyAlarm`` raised.
        """
        import numpy as np
        from .devicemap import Flags as RunFlags
        from .devicemap import seed_writes, sequence_writes, unpack_capture
        from .sequence import Opcode, SequenceError, captures, previous_run_dependence
        g = program.geometry
        ident = self.identity
        layers = program.layers
        problem = previous_run_dependence(ops, lambda l: l < len(layers) and bool(np.any(layers[l].coupling)))
        if problem:
            raise SequenceError(problem)
        if entropy not in ENTROPY_SOURCES:
            raise ValueError(f"entropy must be one of {', '.join(ENTROPY_SOURCES)}, not {entropy!r}")
        if entropy == "trng" and not ident.trng:
            raise MissingFeature("this device was built without the ring-oscillator TRNG (--no-trng, or a "
                                 "simulation without it): sample with the PRNG streams (--entropy prng)")
        accumulates = any(op.code is Opcode.ACCUMULATE for op in ops)
        if accumulates:
            self.require_moments()
        if self._run_interrupted:
            self.reset()
            self._run_interrupted = False
        self._run_interrupted = True           # until the run returns
        self.writes(seed_writes(seed, chain, g.lanes) + sequence_writes(ops))
        expected = captures(ops) * g.cycles
        fabric_time = fabric_cycles(ops, g) / ident.clock_hz
        wire_time = expected * ident.sample_word_bytes * self.link.byte_time
        if timeout is None:
            timeout = 10 * self.link.timeout + 4 * (fabric_time + wire_time)
        self.start(RunFlags.TRNG_MIX if entropy == "trng" else 0)
        started = self.transport.now()
        deadline = started + timeout

        def pause():
            left = fabric_time - (self.transport.now() - started)
            self.transport.idle(min(poll, max(20 * self.link.byte_time, left)))

        words = self._drain(expected, deadline, timeout, pause)
        while accumulates and self.flags & Flags.RUNNING:   # moments are complete when the run ends
            if self.transport.now() > deadline:
                self.stop()
                raise LinkError(f"the device did not finish its accumulation in {timeout:.3g} s (device time)")
            pause()
            self.status()
        self._run_interrupted = False
        if entropy == "trng" and self.flags & Flags.TRNG_ALARM:
            raise EntropyAlarm("the TRNG's health tests raised their alarm during the run (its bits were mixed "
                               "into the lanes unchecked), so its samples are discarded; RESET clears the alarm")
        caps = [unpack_capture(words[k:k + g.cycles], g) for k in range(0, expected, g.cycles)]
        return np.array(caps, dtype=np.int8).reshape(-1, g.n)

    def _drain(self, expected: int, deadline: float, timeout: float, pause) -> list[int]:
        """The ``expected`` capture words of the run just started, read with SAMPLES requests.

        At most two requests are outstanding, and a second one only while the last response brought words
        and said the fabric runs: then the device answers one while the other waits, which is all its
        receiver allows (``docs/protocol.md``, flow control). A new request goes out only once a whole
        response has arrived. Any anomaly (no answer, an unusable frame, a retryable error result) drops
        the pipeline: the requests still in flight are answered or given up before the next one goes out
        alone, and the first-word index of the next response shows whether words were lost. More than
        ``retries`` anomalies in a row raise ``LinkError``. Returns, or raises, with no request in flight.
        """
        link = self.link
        size = self.identity.sample_word_bytes
        # Wire time of one exchange: the request, and the longest response (the FIFO's words and the one
        # in its output register).
        request_bytes = len(encode_frame(Command.SAMPLES, 0, bytes(2)))
        response_bytes = samples_response_bytes(self.identity.fifo_depth + 1, size)
        exchange = (request_bytes + response_bytes) * link.byte_time
        words = []
        inflight = collections.deque()    # sequence numbers of the SAMPLES requests not answered yet, oldest first
        queue = False                     # keep a second request waiting behind the one being answered
        failures = 0
        finished_empty = 0
        replacing = False                 # the next request replaces one that failed (counted as a resend)

        def anomaly(reason, result=None):
            nonlocal failures, queue, replacing
            failures += 1
            queue = False
            if failures > link.retries:
                if result is Result.BAD_LENGTH:
                    raise DeviceRejected(Command.SAMPLES, result)
                raise LinkError(f"SAMPLES: {reason} after {failures} attempts")
            replacing = True

        try:
            while len(words) < expected or inflight:
                if len(words) < expected:
                    while len(inflight) < (2 if queue else 1):
                        inflight.append(link.post(Command.SAMPLES, struct.pack("<H", min(4096, expected - len(words)))))
                        link.resent += replacing
                        replacing = False
                answer = link.collect(inflight, link.timeout + len(inflight) * exchange)
                if answer is None:        # nothing for any request in flight within their time
                    inflight.clear()
                    anomaly("no answer")
                    continue
                seq, result, body = answer
                skipped = inflight.index(seq)     # answered in order: those before it got no answer
                for _ in range(skipped + 1):
                    inflight.popleft()
                for _ in range(skipped):
                    anomaly("no answer")
                if result is None:
                    anomaly(body)
                    continue
                if result in Link.RETRYABLE:
                    anomaly(f"the device reported {result.name}", result)
                    continue
                if result is not Result.OK:
                    raise DeviceRejected(Command.SAMPLES, result)
                self.flags = Flags(body[0] & 0xF)
                first, got = self._sample_words(body[1:])
                if first != len(words):
                    raise LinkError(f"the sample stream lost words: expected word {len(words)} next, the device "
                                    f"sent word {first}")
                words += got
                if len(words) > expected:
                    raise LinkError(f"the device sent {len(words)} capture words; the sequence makes {expected}")
                failures = 0
                running = bool(self.flags & Flags.RUNNING)
                queue = self.queue_samples and running and bool(got)
                if got:
                    finished_empty = 0
                    continue
                if not running:
                    # Not running and nothing waiting, twice in a row (the first time, the last words may have
                    # entered the FIFO after the device counted it): the run ended short.
                    finished_empty += 1
                    if finished_empty >= 2:
                        raise LinkError(f"the device finished the sequence after {len(words)} of {expected} "
                                        f"capture words{self._fabric_problem()}")
                    continue
                if inflight:              # the request already waiting is the next poll
                    continue
                if self.transport.now() > deadline:
                    self.stop()
                    raise LinkError(f"the device produced {len(words)} of {expected} capture words in "
                                    f"{timeout:.3g} s (device time)")
                pause()
        except (LinkError, DeviceRejected):
            self._settle(inflight, exchange)
            raise
        return words

    def _settle(self, inflight, exchange: float) -> None:
        """Wait for the answers to the requests in ``inflight`` (or their time), so that none arrives
        behind the next request; the answers are dropped."""
        try:
            while inflight:
                answer = self.link.collect(inflight, self.link.timeout + len(inflight) * exchange)
                if answer is None:
                    break
                while inflight and inflight.popleft() != answer[0]:
                    pass
        except LinkError:
            pass
        inflight.clear()

    def read_moments(self, program):
        """The on-chip moments of the last run (``emulator.Moments`` of one chain, by fabric node)."""
        from .devicemap import Reg, Region, moments_from_words, region_words
        self.require_moments()
        g = program.geometry
        count = region_words(Region.MOMENTS, g.lanes, g.cycles, g.degree, g.config.layers)
        words = self.read_words(Region.MOMENTS, 0, count)
        samples = self.read_words(Region.REGS, Reg.MOMENT_SAMPLES, 1)[0]
        return moments_from_words(words, samples, g)

    def require_moments(self) -> None:
        """Raise ``MissingFeature`` unless the device has the on-chip moment counters (ACCUMULATE, MOMENTS)."""
        if not self.identity.moments:
            raise MissingFeature("this device was built without the on-chip moment counters (ACCUMULATE, region "
                                 "MOMENTS; the iCE40 HX boards leave them out): use `opentsu sample` and count "
                                 "the moments on the host, or `--backend reference`")

    def _fabric_problem(self) -> str:
        if not self.flags & Flags.FABRIC_ERROR:
            return ""
        from .devicemap import Status
        status = Status(self.status().fabric_status)
        problems = [flag.name for flag in (Status.WRITE_REFUSED, Status.BAD_SEQUENCE) if status & flag]
        return f" (fabric error: {', '.join(problems) or 'unknown'})"
