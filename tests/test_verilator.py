"""The Verilator backend: the whole device compiled with Verilator, driven by the host driver over its UART.

The long statistical runs of the gateware live here, because only this path is fast enough for them: a
sampling distribution through the full device against exact enumeration, and the statistics of the lane
generators' words. One device build (and one generator build) serves the whole session; both come from
the build cache after the first run on a machine.
"""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from amaranth.hdl import ClockDomain, Module
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from opentsu import verilator
from opentsu.cli import main
from opentsu.compiler import compile_model
from opentsu.emulator import Emulator, sample
from opentsu.exact import exact_distribution, moment_errors
from opentsu.formats import SEED_STEPS, lane_seed_states, seed_injection, xoroshiro64_step
from opentsu.gateware.rng import LaneRNG
from opentsu.link import Device, HostLatency, LinkError, Transport
from opentsu.model import save_model
from opentsu.protocol import Command, Flags, FrameDecoder
from opentsu.sequence import sampling_sequence

from .util import grid_model

#: A frustrated 4×4 torus with two clamped nodes: 14 free spins, enumerable; ``--fabric auto`` gives it a
#: 4×4 fabric with 8 lanes, 4 cycles a sweep, so a sample is 4 bytes on the UART.
MODEL = dict(rows=4, cols=4, jumps=((0, 1),), torus=True, seed=71, scale=0.6, field=0.3,
             clamp=[0] * 6 + [1] + [0] * 8 + [-1])


@pytest.fixture(scope="module")
def model():
    return grid_model(**MODEL)


@pytest.fixture(scope="module")
def program(model):
    return compile_model(model, fabric="auto")


@pytest.fixture(scope="module")
def device_build(program):
    return verilator.build(program.geometry)


def open_transport(build):
    return verilator.VerilatorTransport(build.executable, clock_hz=build.clock_hz, divisor=build.divisor)


def gone(pid: int) -> bool:
    """The process has exited (reaped, or a zombie waiting for its new parent to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


# -- build cache ----------------------------------------------------------------------------------------

def test_second_build_comes_from_the_cache(program, device_build):
    again = verilator.build(program.geometry)
    assert not again.built and again.key == device_build.key and again.executable == device_build.executable
    assert again.seconds < 5, "a cached build must not regenerate Verilog or recompile"
    assert (device_build.executable.parent / "device.v").read_text().startswith("/*")


# -- the transport ----------------------------------------------------------------------------------------

def test_time_is_device_time(device_build):
    with open_transport(device_build) as transport:
        assert transport.now() == 0
        assert transport.read_some(0.001) == b""          # nobody asked anything: silence
        assert transport.cycles == device_build.clock_hz // 1000
        transport.idle(0.05)
        assert transport.now() == pytest.approx(0.051)


def test_close_reaps_the_harness(device_build):
    transport = open_transport(device_build)
    pid = transport.pid
    assert not gone(pid)
    transport.close()
    assert gone(pid)
    transport.close()   # closing twice is harmless


@pytest.mark.parametrize("harness", ["waiting", "running"])
def test_harness_dies_with_its_host(device_build, harness):
    # The host either waits (the harness blocks on its pipe) or has the harness run the clock for minutes.
    then = "time.sleep(60)" if harness == "waiting" else "t.run(10**10)"
    host = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\n"
         "from opentsu.verilator import VerilatorTransport\n"
         "t = VerilatorTransport(sys.argv[1], clock_hz=12_000_000, divisor=4)\n"
         "print(t.pid, flush=True)\n" + then, str(device_build.executable)],
        stdout=subprocess.PIPE, text=True)
    try:
        pid = int(host.stdout.readline())
        time.sleep(0.3)
        assert not gone(pid)
        host.send_signal(signal.SIGKILL)
        host.wait()
        deadline = time.monotonic() + 10
        while not gone(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gone(pid), "the harness outlived its host"
    finally:
        host.kill()
        host.wait()
        host.stdout.close()


def test_a_dead_harness_is_a_link_error(device_build):
    from opentsu.link import LinkError
    with open_transport(device_build) as transport:
        os.kill(transport.pid, signal.SIGKILL)
        with pytest.raises(LinkError, match="harness exited"):
            transport.read_some(0.001)


# -- missing tools ------------------------------------------------------------------------------------------

def test_missing_verilator_is_reported(program, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("VERILATOR", raising=False)
    with pytest.raises(verilator.ToolchainError, match="verilator is not installed"):
        verilator.build(program.geometry)


def test_missing_compiler_is_reported(program, monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(verilator.ToolchainError, match="no C.. compiler"):
        verilator.build(program.geometry)


def test_cli_reports_a_missing_verilator_in_one_line(model, monkeypatch, tmp_path, capsys):
    path = tmp_path / "model.npz"
    save_model(path, model)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("VERILATOR", raising=False)
    out = tmp_path / "out.npy"
    assert main(["sample", str(path), "-o", str(out), "--backend", "verilator", "--fabric", "auto", "-n", "4"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "verilator is not installed" in err
    assert not out.exists()


# -- sampling -------------------------------------------------------------------------------------------------

def test_cli_sample_is_identical_on_reference_sim_and_verilator(model, device_build, tmp_path):
    path = tmp_path / "model.npz"
    save_model(path, model)
    outputs = {}
    for backend in ("reference", "verilator", "sim"):
        out = tmp_path / f"{backend}.npy"
        args = ["sample", str(path), "-o", str(out), "--backend", backend, "--fabric", "auto", "-n", "30",
                "--chains", "3", "--burn-in", "4", "--thin", "2", "--seed", "17", "-q"]
        assert main(args) == 0
        outputs[backend] = np.load(out)
    assert outputs["reference"].shape == (30, 16) and outputs["reference"].dtype == np.int8
    assert np.array_equal(outputs["verilator"], outputs["reference"])
    assert np.array_equal(outputs["sim"], outputs["reference"])


def test_cli_trng_entropy_reaches_the_device_for_sample_and_dtm_sample(model, device_build, tmp_path):
    """``--entropy trng`` through the CLI: the runs succeed and leave the reproducible (emulator's) results."""
    from opentsu import dtm
    path = tmp_path / "model.npz"
    save_model(path, model)
    common = ["--seed", "17", "-q"]
    for backend in ("reference", "verilator"):
        entropy = ["--entropy", "trng"] if backend == "verilator" else []
        assert main(["sample", str(path), "-o", str(tmp_path / f"{backend}.npy"), "--backend", backend, "--fabric",
                     "auto", "-n", "30", "--chains", "3", *common, *entropy]) == 0
    mixed, reference = np.load(tmp_path / "verilator.npy"), np.load(tmp_path / "reference.npy")
    assert mixed.shape == reference.shape == (30, 16) and not np.array_equal(mixed, reference)
    assert main(["dtm", "sample", "-o", str(tmp_path / "d.npy"), "--backend", "verilator", "-n", "4",
                 "--entropy", "trng", *common]) == 0
    images = np.load(tmp_path / "d.npy")
    assert images.shape == (4, 8, 8) and set(np.unique(images)) <= {0, 1}
    assert not np.array_equal(images, dtm.sample(dtm.load(dtm.default_model_path()), 4, seed=17))


def test_distribution_through_the_device_matches_exact_enumeration(model, program, device_build):
    chains, per_chain, seed = 8, 12_500, 3
    ops = sampling_sequence(per_chain, burn_in=20, thin=1)
    with open_transport(device_build) as transport:
        device = Device(transport, timeout=0.005)
        device.load_program(program)
        runs = [device.run(program, ops, seed=seed, chain=c)[:, program.node_map] for c in range(chains)]
        # Drained with a SAMPLES request always queued behind the one being answered: nothing overran.
        status = device.status()
        assert (status.overruns, status.crc_errors, status.timeouts, device.link.resent) == (0, 0, 0, 0)
    samples = np.stack(runs)
    assert samples.shape == (chains, per_chain, model.n)
    # Bit for bit what the reference computes, all 10^5 samples of them...
    reference = sample(program, chains * per_chain, chains=chains, burn_in=20, seed=seed)
    assert np.array_equal(samples.reshape(-1, model.n), reference)
    # ...and the right distribution: every mean and edge correlation within 4 standard errors (multi-chain
    # ESS) of the exact moments.
    clamped = np.flatnonzero(model.clamp)
    assert np.all(samples[..., clamped] == model.clamp[clamped])
    z_mean, z_pair = moment_errors(samples, model)
    assert np.abs(z_mean).max() < 4, z_mean
    assert np.abs(z_pair).max() < 4, z_pair


def test_trng_mixing_leaves_the_prng_streams_and_keeps_the_distribution(model, program, device_build):
    """``entropy="trng"``: the device's TRNG (here its simulation model) stirs the lanes, so the chains leave
    the emulator's streams, and the samples still have the exact moments."""
    chains, per_chain, seed = 8, 12_500, 3
    ops = sampling_sequence(per_chain, burn_in=20, thin=1)
    with open_transport(device_build) as transport:
        device = Device(transport, timeout=0.005)
        assert device.identity.trng
        device.load_program(program)
        runs = [device.run(program, ops, seed=seed, chain=c, entropy="trng")[:, program.node_map]
                for c in range(chains)]
        assert not device.flags & Flags.TRNG_ALARM
    samples = np.stack(runs)
    reference = sample(program, chains * per_chain, chains=chains, burn_in=20, seed=seed).reshape(samples.shape)
    # Equal by chance only: a chain's samples agree with the PRNG-only chain's as often as two independent
    # draws do, Σ p(s)² over the exact distribution (0.0021 here), within 8 standard errors of that rate.
    _, p = exact_distribution(model)
    collision = float((p ** 2).sum())
    agree = (samples == reference).all(axis=2).mean(axis=1)
    assert agree.max() < collision + 8 * np.sqrt(collision / per_chain), (agree, collision)
    clamped = np.flatnonzero(model.clamp)
    assert np.all(samples[..., clamped] == model.clamp[clamped])
    z_mean, z_pair = moment_errors(samples, model)
    assert np.abs(z_mean).max() < 4, z_mean
    assert np.abs(z_pair).max() < 4, z_pair


def test_queued_samples_hide_the_host_latency(program, device_build):
    """With the host's turnaround modelled (``HostLatency``: it sees each byte 1 ms after the device sent
    it, as behind an FT2232H), one SAMPLES request queued in the device keeps the line busy: bit for bit
    the same samples, no overrun, and about twice the rate of one request per response. Rates are those of
    the drain: the difference of a long and a short run, whose starts (seeds, sequence, START) cost the same
    and whose ends come at the same point of a pair of full responses (257 words each, 4 to a sample)."""
    g = program.geometry
    lengths = (250, 250 + 4 * 257)
    runs = {n: sampling_sequence(n, burn_in=0, thin=1) for n in lengths}
    reference = {n: Emulator(program, chains=1, seed=5, first_chain=0).run(ops, full=True)[0]
                 for n, ops in runs.items()}
    rate = {}
    with open_transport(device_build) as transport:
        Device(transport, timeout=0.005).load_program(program)
        for latency in (0.0, 0.001):
            for queued in (True, False):
                device = Device(HostLatency(transport, latency), timeout=0.005, queue_samples=queued)
                seconds = {}
                for n, ops in runs.items():
                    start = transport.now()
                    assert np.array_equal(device.run(program, ops, seed=5, chain=0), reference[n])
                    seconds[n] = transport.now() - start
                rate[latency, queued] = (lengths[1] - lengths[0]) / (seconds[lengths[1]] - seconds[lengths[0]])
                status = device.status()
                assert (status.overruns, status.crc_errors, status.timeouts, status.rejected) == (0, 0, 0, 0)
                assert device.link.resent == 0 and device.link.garbage == 0
    # A full response: 8 bytes of frame, the flags, the index and the FIFO's 256 words with the one in its
    # output register, 4 to a sample; a request is 10 bytes; a byte is 10 bits at 3 Mbaud.
    byte = 10 / 3e6
    response, request, per_response = (8 + 1 + 4 + 257) * byte, 10 * byte, 257 / g.cycles
    # The measured rate over the one each case is expected to make (less the engine's turnaround and the
    # model's 10 µs read steps).
    def ratio(case, seconds_per_response):
        return rate[case] * seconds_per_response / per_response
    # Queued, responses follow each other: the line's rate.
    assert 0.98 < ratio((0.0, True), response) < 1.005
    # One request per response: each response also waits for the next request (and the host's 1 ms).
    assert 0.98 < ratio((0.0, False), response + request) < 1.005
    assert 0.98 < ratio((0.001, False), response + request + 0.001) < 1.005
    # Queued with 1 ms of latency, longer than a response: two responses per turnaround.
    assert 0.98 < ratio((0.001, True), (response + request + 0.001) / 2) < 1.005


class Unplugged(Transport):
    """``inner``; once ``armed``, the read after the host's first SAMPLES request raises, as a cable pulled
    mid-run would."""

    def __init__(self, inner):
        self.inner, self.armed, self.unplug = inner, False, False
        self._requests = FrameDecoder()

    def write(self, data):
        if any(code == Command.SAMPLES for code, _, _ in self._requests.feed(data)) and self.armed:
            self.armed, self.unplug = False, True
        self.inner.write(data)

    def read_some(self, timeout):
        if self.unplug:
            self.unplug = False
            raise LinkError("unplugged")
        return self.inner.read_some(timeout)

    def now(self):
        return self.inner.now()

    def idle(self, seconds):
        self.inner.idle(seconds)


def test_a_run_after_an_interrupted_one_gets_its_own_samples(program, device_build):
    """A run that fails half way leaves the fabric running, blocked on a full FIFO (START does not empty it),
    and after a RESET the blocked capture still pushes the rest of its words: the next run must still
    return exactly its own samples."""
    long_run, short_run = sampling_sequence(2000, burn_in=0, thin=1), sampling_sequence(30, burn_in=3, thin=2)
    reference = Emulator(program, chains=1, seed=9, first_chain=0).run(short_run, full=True)[0]
    with open_transport(device_build) as transport:
        line = Unplugged(transport)
        device = Device(line, timeout=0.005)
        device.load_program(program)
        line.armed = True
        with pytest.raises(LinkError, match="unplugged"):
            device.run(program, long_run, seed=5, chain=0)
        transport.idle(0.002)                      # the fabric fills the FIFO meanwhile
        assert device.status().fabric_status & 1   # still running: the failed run left it so
        assert np.array_equal(device.run(program, short_run, seed=9, chain=0), reference)
        # The same, left behind by another host process: a new driver RESETs as the backends do on opening.
        line.armed = True
        with pytest.raises(LinkError, match="unplugged"):
            device.run(program, long_run, seed=5, chain=0)
        transport.idle(0.002)
        fresh = Device(transport, timeout=0.005)
        fresh.reset()
        status = fresh.status()
        assert (status.fabric_status & 1, status.samples_waiting) == (0, 0)
        assert np.array_equal(fresh.run(program, short_run, seed=9, chain=0), reference)


# -- lane generators ----------------------------------------------------------------------------------------

LANES, DRAWS = 8, 1 << 18


class RNGTop(wiring.Component):
    """Just ``LaneRNG``, with a clock and no reset, for the ``lane_rng.cpp`` harness."""

    def __init__(self, lanes):
        self._lanes = lanes
        self.domain = ClockDomain("sync", reset_less=True)
        super().__init__({"advance": In(1), "inject": In(lanes), "words": Out(32 * lanes)})

    def elaborate(self, platform):
        m = Module()
        m.domains.sync = self.domain
        m.submodules.rng = rng = LaneRNG(self._lanes)
        m.d.comb += [rng.advance.eq(self.advance), rng.inject.eq(self.inject), self.words.eq(rng.words.as_value())]
        return m


@pytest.fixture(scope="module")
def lane_words():
    """(DRAWS, LANES) uint32 words drawn by the gateware generators, seeded as chain 5 of seed 11."""
    top = RNGTop(LANES)
    build = verilator.build(None, harness="lane_rng.cpp", top=top, name=f"lane_rng_{LANES}",
                            ports=[top.domain.clk, top.advance, top.inject, top.words])
    states = lane_seed_states(11, [5], LANES)[0]
    bits = [seed_injection(int(s0), int(s1)) for s0, s1 in states]
    inject = np.array([sum(((bits[lane] >> k) & 1) << lane for lane in range(LANES)) for k in range(SEED_STEPS)],
                      dtype="<u4")
    run = subprocess.run([str(build.executable), "--draws", str(DRAWS)], input=inject.tobytes(),
                         capture_output=True, check=True)
    return np.frombuffer(run.stdout, dtype="<u4").reshape(DRAWS, LANES), states


def test_gateware_generators_follow_the_reference(lane_words):
    words, states = lane_words
    s0, s1 = states[:, 0].copy(), states[:, 1].copy()
    for k in range(2000):
        expected, s0, s1 = xoroshiro64_step(s0, s1)
        assert np.array_equal(words[k], expected), k


def test_gateware_generator_correlations(lane_words):
    words, _ = lane_words
    u = (words.astype(np.float64) + 0.5) / 2.0 ** 32
    z = (u - u.mean(axis=0)) / u.std(axis=0)
    worst = 0.0
    for lag in range(1, 9):
        lagged = (z[lag:] * z[:-lag]).mean(axis=0)
        worst = max(worst, np.abs(lagged).max())
        assert np.abs(lagged).max() < 0.01, (lag, lagged)
    cross = (z.T @ z) / len(z)
    off = cross[~np.eye(LANES, dtype=bool)]
    assert np.abs(off).max() < 0.01, cross
    # The p-bit reads the fold bit (31) on its own: it must be unbiased and uncorrelated too.
    fold = ((words >> 31) & 1).astype(np.float64) * 2 - 1
    assert np.abs(fold.mean(axis=0)).max() < 0.01
    assert np.abs((fold[1:] * fold[:-1]).mean(axis=0)).max() < 0.01


def chi2_z(stat, dof):
    """Standard-normal score of a chi-square statistic (Wilson-Hilferty): large when the counts are too
    uneven, very negative when they are too even to be random."""
    k = 2 / (9 * dof)
    return ((np.asarray(stat) / dof) ** (1 / 3) - (1 - k)) / np.sqrt(k)


def test_gateware_generator_equidistribution(lane_words):
    words, _ = lane_words
    n = len(words)
    for shift in (24, 16, 8):       # every byte the p-bit reads, in 256 bins
        counts = np.stack([np.bincount((words[:, lane] >> shift) & 0xFF, minlength=256) for lane in range(LANES)])
        stat = ((counts - n / 256) ** 2 / (n / 256)).sum(axis=1)
        assert np.abs(chi2_z(stat, 255)).max() < 4, (shift, stat)
    # Consecutive draws in two dimensions: the top 4 bits of word t and of word t+1, 256 cells.
    top = words >> 28
    pairs = (top[:-1] << 4) | top[1:]
    counts = np.stack([np.bincount(pairs[:, lane], minlength=256) for lane in range(LANES)])
    expected = (n - 1) / 256
    stat = ((counts - expected) ** 2 / expected).sum(axis=1)
    assert np.abs(chi2_z(stat, 255)).max() < 4, stat
