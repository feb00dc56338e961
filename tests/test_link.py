"""Host-side failures: missing, busy, silent and lying devices surface as clear exceptions and CLI messages.

The devices here are scripted in Python (``ScriptedDevice``), so each failure is exact and fast; a serial
port is a pseudo-terminal pair (``os.openpty``) whose far end is silent or runs the script in a thread.
The gateware's own behaviour is tested in ``test_protocol.py``.
"""

import collections
import os
import struct
import threading
import time

import numpy as np
import pytest

from opentsu.cli import main
from opentsu.compiler import compile_model
from opentsu.fabric import FabricConfig
from opentsu.link import (Device, DeviceRejected, EntropyAlarm, Link, LinkError, MissingFeature, ProgramMismatch,
                          SerialTransport, Transport)
from opentsu.model import save_model
from opentsu.protocol import (PROTOCOL_VERSION, Command, Flags, FrameDecoder, Identity, Result, StatusReport,
                              crc16)
from opentsu.sequence import sampling_sequence

from .util import grid_model

CLOCK, DIVISOR = 12_000_000, 4


def response(code, seq, payload=b""):
    body = bytes([code, seq]) + len(payload).to_bytes(2, "little") + payload
    return b"\xA5\x5A" + body + crc16(body).to_bytes(2, "little")


def identity_for(config, cycles, degree, **changes):
    fields = dict(version=PROTOCOL_VERSION, rows=config.rows, cols=config.cols, jumps=config.jumps,
                  lanes=config.lanes, latency=config.latency, cycles=cycles, degree=degree, layers=config.layers,
                  sequence_depth=64, sample_word_bytes=1, fifo_depth=64, clock_hz=CLOCK, divisor=DIVISOR,
                  trng=False)
    fields.update(changes)
    return Identity(**fields)


CONFIG = FabricConfig(4, 4, ((0, 1),), lanes=2, latency=1)


@pytest.fixture(scope="module")
def program():
    return compile_model(grid_model(4, 4, ((0, 1),), seed=3), fabric=CONFIG)


class Script:
    """A device in Python: answers each request frame with ``handle(command, seq, payload)``."""

    def __init__(self, identity, samples=None, running=False):
        self.identity = identity
        self.samples = samples          # callable(max words) -> (first index, words, running flag)
        self.running = running
        self.commands = []

    def handle(self, command, seq, payload):
        self.commands.append(Command(command))
        flags = bytes([Flags.RUNNING if self.running else 0])
        if command == Command.IDENTIFY:
            return response(Result.OK, seq, flags + self.identity.to_bytes())
        if command == Command.STATUS:
            return response(Result.OK, seq, flags + bytes(StatusReport.size()))
        if command == Command.WRITE and self.running:
            return response(Result.BUSY, seq, flags)
        if command == Command.START:
            self.running = True
            return response(Result.OK, seq, bytes([Flags.RUNNING]))
        if command == Command.SAMPLES:
            first, words, self.running = self.samples(struct.unpack("<H", payload)[0])
            flags = bytes([Flags.RUNNING if self.running else 0])
            return response(Result.OK, seq, flags + struct.pack("<I", first) + bytes(words))
        return response(Result.OK, seq, flags)


class ScriptedDevice(Transport):
    """A transport to a ``Script``, on device time: a silent read lets its whole timeout pass."""

    def __init__(self, script):
        self.script = script
        self.t = 0.0
        self.out = b""
        self.decoder = FrameDecoder()

    def write(self, data):
        for code, seq, payload in self.decoder.feed(data):
            self.out += self.script.handle(code, seq, payload)

    def read_some(self, timeout):
        out, self.out = self.out, b""
        if not out:
            self.t += timeout
        return out

    def now(self):
        return self.t

    def idle(self, seconds):
        self.t += seconds


# ------------------------------------------------------------------------------------------------ exceptions

def test_silent_device_gives_a_link_error_after_the_retries():
    transport = ScriptedDevice(None)
    transport.write = lambda data: None
    with pytest.raises(LinkError, match=r"^IDENTIFY: no answer after 3 attempts$"):
        Device(transport, timeout=0.1, retries=2)
    assert transport.t == pytest.approx(0.3)


def test_garbage_only_gives_a_link_error():
    class Babbler(ScriptedDevice):
        def write(self, data):
            self.out += bytes(range(256)) + b"\xA5\x5A\x00\x01\x03\x00\x00"

    with pytest.raises(LinkError, match="no answer"):
        Link(Babbler(None), timeout=0.01, retries=1).request(Command.IDENTIFY)


def test_unknown_result_codes_are_not_accepted():
    class Liar(ScriptedDevice):
        def write(self, data):
            self.out += response(0x99, data[3], b"\x00")

    with pytest.raises(LinkError, match="unknown result code 0x99 after 2 attempts"):
        Link(Liar(None), timeout=0.01, retries=1).request(Command.IDENTIFY)


def test_device_errors_surface_as_device_rejected(program):
    script = Script(identity_for(CONFIG, program.geometry.cycles, program.geometry.degree), running=True)
    device = Device(ScriptedDevice(script))
    with pytest.raises(DeviceRejected, match="^device rejected WRITE: BUSY$") as info:
        device.load_program(program)
    assert info.value.result is Result.BUSY and info.value.command == Command.WRITE


@pytest.mark.parametrize("change,message", [
    (dict(version=PROTOCOL_VERSION + 1), "protocol version"),
    (dict(formats=2), "number-format revision 2"),
])
def test_incompatible_devices_are_refused(program, change, message):
    script = Script(identity_for(CONFIG, program.geometry.cycles, program.geometry.degree, **change))
    with pytest.raises(LinkError, match=message):
        Device(ScriptedDevice(script))


@pytest.mark.parametrize("change", [dict(rows=8, cols=8), dict(lanes=4), dict(jumps=((0, 1), (2, 1))),
                                    dict(latency=3), dict(layers=0)])
def test_a_program_for_another_fabric_is_refused(program, change):
    script = Script(identity_for(CONFIG, program.geometry.cycles, program.geometry.degree, **change))
    device = Device(ScriptedDevice(script))
    with pytest.raises(ProgramMismatch, match="compiled for a 4×4|layers"):
        device.load_program(program)
    assert Command.WRITE not in script.commands


def test_a_lost_sample_word_is_an_error_not_a_shifted_sample(program):
    sent = [0]

    def samples(max_words):
        first = sent[0] + (1 if sent[0] else 0)         # the second response skips a word
        sent[0] = first + 3
        return first, [1, 2, 3], True

    script = Script(identity_for(CONFIG, program.geometry.cycles, program.geometry.degree), samples=samples)
    device = Device(ScriptedDevice(script))
    with pytest.raises(LinkError, match="lost words: expected word 3 next, the device sent word 4"):
        device.run(program, sampling_sequence(4, 0, 1), seed=0, chain=0)


def test_a_run_that_ends_short_is_an_error(program):
    script = Script(identity_for(CONFIG, program.geometry.cycles, program.geometry.degree),
                    samples=lambda max_words: (0, [], False))
    device = Device(ScriptedDevice(script))
    with pytest.raises(LinkError, match="finished the sequence after 0 of 16 capture words"):
        device.run(program, sampling_sequence(2, 0, 1), seed=0, chain=0)


def test_a_run_that_never_ends_times_out_and_stops_the_device(program):
    script = Script(identity_for(CONFIG, program.geometry.cycles, program.geometry.degree),
                    samples=lambda max_words: (0, [], True))
    transport = ScriptedDevice(script)
    device = Device(transport, timeout=0.01)
    with pytest.raises(LinkError, match="produced 0 of 16 capture words"):
        device.run(program, sampling_sequence(2, 0, 1), seed=0, chain=0, timeout=0.5)
    assert script.commands[-1] is Command.STOP
    assert 0.5 <= transport.t < 0.6


# ------------------------------------------------------------------------------------------------ queued SAMPLES

class Paced(ScriptedDevice):
    """A ``Script`` that answers one request after the other, as the device does: each read hands the host
    the next response only. ``faults`` maps the n-th SAMPLES request (from 1) to what goes wrong: ``lose``
    (executed, but the response never arrives), ``ignore`` (never reaches the device) or ``bad_crc`` (the
    device saw it corrupted). ``backlog`` lists, per request, its command and those of the responses the
    host had not read yet when it arrived."""

    def __init__(self, script, faults=None):
        super().__init__(script)
        self.faults = dict(faults or {})
        self.responses = collections.deque()
        self.backlog = []
        self.samples_requests = 0
        self.pauses = 0

    def write(self, data):
        for code, seq, payload in self.decoder.feed(data):
            fault = None
            if code == Command.SAMPLES:
                self.samples_requests += 1
                fault = self.faults.get(self.samples_requests)
            if fault == "ignore":
                continue
            self.backlog.append((Command(code), [c for c, _ in self.responses]))
            if fault == "bad_crc":
                frame = response(Result.BAD_CRC, seq, bytes([Flags.LINK_ERROR]))
            else:
                frame = self.script.handle(code, seq, payload)
            if fault != "lose":
                self.responses.append((Command(code), frame))

    def read_some(self, timeout):
        if not self.responses:
            self.t += timeout
            return b""
        self.t += 1e-4
        return self.responses.popleft()[1]

    def idle(self, seconds):
        self.pauses += 1
        super().idle(seconds)


def chunked(words, sizes, stops_at=None, drops=None):
    """``samples`` for a ``Script``: hands out ``words`` in the n-th response at most ``sizes[n % len]`` of
    them; the fabric runs until all are handed out, or until word ``stops_at`` is. Word ``drops`` is lost
    inside the device."""
    sent, calls = [0], [0]

    def samples(max_words):
        if sent[0] == drops:
            sent[0] += 1
        n = min(sizes[calls[0] % len(sizes)], max_words, len(words) - sent[0])
        calls[0] += 1
        first = sent[0]
        sent[0] += n
        return first, words[first:sent[0]], sent[0] < (len(words) if stops_at is None else stops_at)
    return samples


def paced(program, captures, sizes, *, faults=None, stops_at=None, drops=None, queue=True):
    """A ``Paced`` script whose capture words carry their own index, for a sampling sequence of ``captures``
    captures; returns the transport, a ``Device`` on it, the sequence and the captures the driver must
    return."""
    from opentsu.devicemap import unpack_capture
    g = program.geometry
    words = [k % (1 << g.lanes) for k in range(captures * g.cycles)]
    script = Script(identity_for(CONFIG, g.cycles, g.degree), samples=chunked(words, sizes, stops_at, drops))
    transport = Paced(script, faults)
    expected = np.array([unpack_capture(words[c * g.cycles:(c + 1) * g.cycles], g) for c in range(captures)])
    return transport, Device(transport, timeout=0.01, queue_samples=queue), sampling_sequence(captures, 0, 1), expected


def run_paced(program, captures, sizes, **options):
    transport, device, ops, expected = paced(program, captures, sizes, **options)
    return transport, device, device.run(program, ops, seed=0, chain=0), expected


def samples_backlogs(transport):
    return [len(waiting) for command, waiting in transport.backlog if command is Command.SAMPLES]


def test_a_run_keeps_one_samples_request_queued_never_two(program):
    transport, device, got, expected = run_paced(program, 16, [5])
    assert np.array_equal(got, expected)
    # The first request goes alone; once a response brings words, two go out back to back, then one per
    # response: one always waits behind the response on its way, never two.
    backlogs = samples_backlogs(transport)
    assert backlogs[:2] == [0, 0] and set(backlogs[2:]) == {1}
    # 128 words in responses of 5: 26 responses, and the request queued behind the last one is answered
    # (empty) before the run returns.
    assert transport.samples_requests == 27 and not transport.responses
    assert all(Command.SAMPLES not in waiting for command, waiting in transport.backlog
               if command is not Command.SAMPLES)
    assert device.link.resent == 0


def test_without_queueing_every_samples_request_waits_for_its_response(program):
    transport, _, got, expected = run_paced(program, 16, [5], queue=False)
    assert np.array_equal(got, expected)
    assert set(samples_backlogs(transport)) == {0} and transport.samples_requests == 26


def test_empty_and_short_responses_stop_the_queue_until_words_come(program):
    transport, _, got, expected = run_paced(program, 6, [0, 0, 3, 1, 0, 7, 2])
    assert np.array_equal(got, expected)
    assert max(samples_backlogs(transport)) == 1
    # After an empty response the host sends nothing until the request already queued is answered, and
    # after two empty ones in a row it pauses before it asks again.
    assert transport.pauses >= 2


def test_the_queue_stops_when_the_fabric_stops(program):
    # The fabric stops once word 64 of 96 is in the FIFO; the host then takes the rest one response at a time.
    transport, _, got, expected = run_paced(program, 12, [10], stops_at=64)
    assert np.array_equal(got, expected)
    # Responses of 10 words: the 7th (words 60-69) says the fabric stopped, while request 8 already waits.
    backlogs = samples_backlogs(transport)
    assert backlogs[:2] == [0, 0] and set(backlogs[2:8]) == {1}
    assert set(backlogs[8:]) == {0} and len(backlogs) == 10


def test_a_lost_response_with_words_is_a_link_error_not_a_shift(program):
    with pytest.raises(LinkError, match="lost words: expected word 10 next, the device sent word 15"):
        run_paced(program, 16, [5], faults={3: "lose"})


def test_a_gap_found_with_a_request_queued_is_an_error_once_that_request_is_answered(program):
    transport, device, ops, _ = paced(program, 16, [5], drops=10)
    with pytest.raises(LinkError, match="lost words: expected word 10 next, the device sent word 11"):
        device.run(program, ops, seed=0, chain=0)
    # The request queued behind the response that showed the gap was answered before the error: nothing
    # arrives behind the host's next request.
    assert transport.samples_requests == 4 and not transport.responses


@pytest.mark.parametrize("fault", ["lose", "ignore", "bad_crc"])
def test_a_request_lost_without_words_costs_a_resend_not_samples(program, fault):
    # The fourth response would be the empty one of [5, 5, 5, 0]: losing it, or its request, loses no word.
    transport, device, got, expected = run_paced(program, 16, [5, 5, 5, 0], faults={4: fault})
    assert np.array_equal(got, expected)
    assert device.link.resent == 1 and max(samples_backlogs(transport)) == 1 and not transport.responses


def test_losing_the_answer_to_the_last_queued_request_sends_nothing_again(program):
    # 128 words in responses of 5: the 27th request waits behind the 26th response, which completes the
    # run. Its (empty) answer is lost; no word is missing, so no request replaces it.
    transport, device, got, expected = run_paced(program, 16, [5], faults={27: "lose"})
    assert np.array_equal(got, expected)
    assert transport.samples_requests == 27 and device.link.resent == 0


def test_a_device_that_stops_answering_samples_is_a_link_error(program):
    faults = {k: "ignore" for k in range(3, 40)}
    with pytest.raises(LinkError, match=r"^SAMPLES: no answer after 4 attempts$"):
        run_paced(program, 16, [5], faults=faults)


# ------------------------------------------------------------------------------------------------ serial ports

def test_missing_serial_port_fails_at_once():
    start = time.monotonic()
    with pytest.raises(LinkError, match="^cannot open serial port /nonexistent/ttyX: No such file or directory$"):
        SerialTransport("/nonexistent/ttyX")
    assert time.monotonic() - start < 1


@pytest.fixture
def pty_pair():
    master, slave = os.openpty()
    yield master, os.ttyname(slave)
    for fd in (master, slave):
        try:
            os.close(fd)
        except OSError:
            pass


def test_silent_serial_port_times_out(pty_pair):
    _, path = pty_pair
    with SerialTransport(path) as transport:
        start = time.monotonic()
        with pytest.raises(LinkError, match="IDENTIFY: no answer after 2 attempts"):
            Device(transport, timeout=0.2, retries=1)
        assert 0.4 <= time.monotonic() - start < 1.5


def test_busy_serial_port_is_reported(pty_pair):
    _, path = pty_pair
    with SerialTransport(path):
        with pytest.raises(LinkError, match="in use by another program"):
            SerialTransport(path)


def serve(master, script, stop):
    """Run ``script`` as the device at the far end of a pty until ``stop`` is set."""
    import select
    decoder = FrameDecoder()
    while not stop.is_set():
        ready, _, _ = select.select([master], [], [], 0.02)
        if ready:
            try:
                data = os.read(master, 4096)
            except OSError:
                return
            for code, seq, payload in decoder.feed(data):
                os.write(master, script.handle(code, seq, payload))


@pytest.fixture
def pty_device(pty_pair):
    master, path = pty_pair
    threads = []
    stop = threading.Event()

    def start(script):
        thread = threading.Thread(target=serve, args=(master, script, stop), daemon=True)
        thread.start()
        threads.append(thread)
        return path

    yield start
    stop.set()
    for thread in threads:
        thread.join()


def test_serial_transport_talks_to_a_device(pty_device, program):
    script = Script(identity_for(CONFIG, program.geometry.cycles, program.geometry.degree))
    with SerialTransport(pty_device(script)) as transport:
        device = Device(transport, timeout=0.5)
        assert device.identity == script.identity
        assert device.status().crc_errors == 0


# ------------------------------------------------------------------------------------------------ CLI

def run_cli(argv, capsys):
    start = time.monotonic()
    code = main(argv)
    _, err = capsys.readouterr()
    return code, err, time.monotonic() - start


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "m.npz"
    save_model(path, grid_model(4, 4, ((0, 1),), seed=3))
    return path


def test_cli_board_without_port_is_a_usage_error(model_file, tmp_path, capsys):
    out = tmp_path / "s.npy"
    code, err, _ = run_cli(["sample", str(model_file), "-o", str(out), "--backend", "board", "-n", "4"], capsys)
    assert code == 2 and "--port" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_missing_port_fails_at_once(model_file, tmp_path, capsys):
    out = tmp_path / "s.npy"
    code, err, elapsed = run_cli(["sample", str(model_file), "-o", str(out), "--backend", "board",
                                  "--port", "/nonexistent/ttyX", "-n", "4"], capsys)
    assert code == 1 and elapsed < 3
    assert err.strip() == ("opentsu: failed: board on /nonexistent/ttyX: cannot open serial port /nonexistent/ttyX: "
                           "No such file or directory")
    assert not out.exists()


def test_cli_silent_port_fails_within_seconds(model_file, tmp_path, pty_pair, capsys):
    out = tmp_path / "s.npy"
    code, err, elapsed = run_cli(["sample", str(model_file), "-o", str(out), "--backend", "board",
                                  "--port", pty_pair[1], "-n", "4"], capsys)
    assert code == 1 and elapsed < 5
    assert "no answer" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_board_with_another_fabric_is_a_usage_error(model_file, tmp_path, pty_device, capsys):
    # The model is compiled for the iCEBreaker fabric, as asked; this board has a 4×4 one.
    program = compile_model(grid_model(4, 4, ((0, 1),), seed=3), fabric=CONFIG)
    script = Script(identity_for(CONFIG, program.geometry.cycles, program.geometry.degree))
    out = tmp_path / "s.npy"
    code, err, _ = run_cli(["sample", str(model_file), "-o", str(out), "--backend", "board", "--fabric",
                            "icebreaker", "--port", pty_device(script), "-n", "4"], capsys)
    assert code == 2 and "compiled for a 16×16" in err and "the device has a 4×4" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()
    assert Command.WRITE not in script.commands


def test_cli_board_samples_through_the_serial_port(model_file, tmp_path, pty_device, capsys):
    """The whole board path over a real (pseudo) serial port, with a scripted device that returns fixed
    capture words: the CLI writes them, unpacked into spins, in chain order."""
    program = compile_model(grid_model(4, 4, ((0, 1),), seed=3), fabric="auto")   # what the CLI compiles
    g = program.geometry
    pending = []

    def samples(max_words):
        words = pending[:max_words]
        del pending[:len(words)]
        first = samples.sent
        samples.sent += len(words)
        return first, words, bool(pending)
    samples.sent = 0

    class Board(Script):
        def handle(self, command, seq, payload):
            if command == Command.START:     # each chain: 2 captures, all lanes +1, then only lane 0
                pending[:] = [(1 << g.lanes) - 1] * g.cycles + [0b01] * g.cycles
                samples.sent = 0
            return super().handle(command, seq, payload)

    script = Board(identity_for(g.config, g.cycles, g.degree), samples=samples)
    out = tmp_path / "s.npy"
    code, err, _ = run_cli(["sample", str(model_file), "-o", str(out), "--backend", "board", "--fabric", "auto",
                            "--port", pty_device(script), "-n", "4", "--chains", "2"], capsys)
    assert code == 0, err
    got = np.load(out)
    assert got.shape == (4, 16) and got.dtype == np.int8
    lane_of = {int(g.schedule[t, lane]): lane for t in range(g.cycles) for lane in range(g.lanes)
               if g.schedule[t, lane] >= 0}
    lane0_only = np.array([1 if lane_of[int(f)] == 0 else -1 for f in program.node_map])
    for row in (0, 2):
        assert np.all(got[row] == 1)
    for row in (1, 3):
        assert np.array_equal(got[row], lane0_only)
    assert script.commands.count(Command.START) == 2


def test_cli_board_without_fabric_compiles_for_the_boards_own(model_file, tmp_path, pty_device, capsys):
    """No --fabric with --backend board: the program is compiled for the fabric the board reports (here a
    4×4 torus with 2 lanes, which is no preset), then sampled."""
    g = compile_model(grid_model(4, 4, ((0, 1),), seed=3), fabric=CONFIG).geometry
    words = []

    class Board(Script):
        def handle(self, command, seq, payload):
            if command == Command.START:     # one capture, every lane +1
                words[:] = [(1 << g.lanes) - 1] * g.cycles
            return super().handle(command, seq, payload)

    def samples(max_words):
        sent = words[:max_words]
        del words[:len(sent)]
        return 0, sent, False

    script = Board(identity_for(CONFIG, g.cycles, g.degree), samples=samples)
    out = tmp_path / "s.npy"
    code, err, _ = run_cli(["sample", str(model_file), "-o", str(out), "--backend", "board", "--port",
                            pty_device(script), "-n", "1", "--chains", "1", "--burn-in", "0"], capsys)
    assert code == 0, err
    assert "on board (4×4 torus, jumps [(0, 1)], 2 lanes, 1 layers" in err
    assert np.array_equal(np.load(out), np.ones((1, 16), dtype=np.int8))
    assert script.commands.count(Command.IDENTIFY) == 2      # once to compile, once to run


def test_identity_reports_the_optional_features():
    for trng in (False, True):
        for moments in (False, True):
            ident = identity_for(CONFIG, 8, 4, trng=trng, moments=moments)
            back = Identity.from_bytes(ident.to_bytes())
            assert back == ident and (back.trng, back.moments) == (trng, moments)


def test_moments_on_a_device_without_the_counters_is_refused_before_anything_runs(program):
    from opentsu.link import MissingFeature
    from opentsu.sequence import moments_sequence
    script = Script(identity_for(CONFIG, program.geometry.cycles, program.geometry.degree, moments=False))
    device = Device(ScriptedDevice(script))
    with pytest.raises(MissingFeature, match="without the on-chip moment counters"):
        device.run(program, moments_sequence(4, 1, 1), seed=1, chain=0)
    with pytest.raises(MissingFeature, match="without the on-chip moment counters"):
        device.read_moments(program)
    assert Command.WRITE not in script.commands and Command.START not in script.commands


def test_cli_moments_on_a_board_without_the_counters_is_a_usage_error(model_file, tmp_path, pty_device, capsys):
    program = compile_model(grid_model(4, 4, ((0, 1),), seed=3), fabric="icestick")
    config = program.geometry.config
    script = Script(identity_for(config, program.geometry.cycles, program.geometry.degree, moments=False))
    out = tmp_path / "moments.npz"
    code, err, _ = run_cli(["moments", str(model_file), "-o", str(out), "--backend", "board", "--fabric", "icestick",
                            "--port", pty_device(script), "-n", "4"], capsys)
    assert code == 2 and "without the on-chip moment counters" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()
    assert Command.WRITE not in script.commands and Command.START not in script.commands


# ------------------------------------------------------------------------------------------------ entropy

class Recording(Script):
    """A ``Script`` that records every START's flags byte and can report the TRNG alarm in its SAMPLES
    responses."""

    def __init__(self, *args, alarm=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.start_flags, self.alarm = [], alarm

    def handle(self, command, seq, payload):
        if command == Command.START:
            self.start_flags.append(payload[0])
        frame = super().handle(command, seq, payload)
        if command == Command.SAMPLES and self.alarm:   # set the flag bit and mend the CRC
            body = bytearray(frame[2:-2])
            body[4] |= Flags.TRNG_ALARM
            frame = frame[:2] + bytes(body) + crc16(bytes(body)).to_bytes(2, "little")
        return frame


def entropy_device(program, *, trng=True, alarm=False):
    from opentsu.devicemap import unpack_capture
    g = program.geometry
    words = [k % (1 << g.lanes) for k in range(2 * g.cycles)]
    script = Recording(identity_for(CONFIG, g.cycles, g.degree, trng=trng), samples=chunked(words, [8]),
                       alarm=alarm)
    expected = np.array([unpack_capture(words[c * g.cycles:(c + 1) * g.cycles], g) for c in range(2)])
    return script, Device(ScriptedDevice(script), timeout=0.01), sampling_sequence(2, 0, 1), expected


def test_trng_entropy_sets_the_mix_flag_of_start(program):
    from opentsu.devicemap import Flags as RunFlags
    script, device, ops, expected = entropy_device(program)
    assert np.array_equal(device.run(program, ops, seed=0, chain=0), expected)
    script.samples = chunked([k % (1 << program.geometry.lanes) for k in range(2 * program.geometry.cycles)], [8])
    assert np.array_equal(device.run(program, ops, seed=0, chain=0, entropy="trng"), expected)
    assert script.start_flags == [0, RunFlags.TRNG_MIX]


def test_trng_entropy_needs_a_trng_and_a_known_source(program):
    script, device, ops, _ = entropy_device(program, trng=False)
    with pytest.raises(MissingFeature, match="without the ring-oscillator TRNG"):
        device.run(program, ops, seed=0, chain=0, entropy="trng")
    with pytest.raises(ValueError, match="entropy must be one of prng, trng, not 'quantum'"):
        device.run(program, ops, seed=0, chain=0, entropy="quantum")
    assert Command.WRITE not in script.commands and Command.START not in script.commands   # nothing sent


def test_a_trng_alarm_during_a_mixed_run_discards_its_samples(program):
    script, device, ops, expected = entropy_device(program, alarm=True)
    with pytest.raises(EntropyAlarm, match="health tests raised their alarm during the run"):
        device.run(program, ops, seed=0, chain=0, entropy="trng")
    # A PRNG-only run does not use the TRNG's bits: the alarm is the TRNG's news, not the run's.
    script.samples = chunked([k % (1 << program.geometry.lanes) for k in range(2 * program.geometry.cycles)], [8])
    assert np.array_equal(device.run(program, ops, seed=0, chain=0), expected)
