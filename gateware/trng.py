"""Ring-oscillator true random number generator for iCE40, with NIST SP 800-90B online health tests.

Data path (``docs/trng.md`` has the derivations and the reasons)::

    ring oscillators ──2-FF sync──┐
    (one per `oscillators`)       XOR ── sample every `sample_divisor` cycles ──▶ raw bit
                                                                                 │
                        ┌───────────── repetition count + adaptive proportion ◀──┤
                        ▼                                                        ▼
                 alarm, failures                XOR `decimation` raw bits ─▶ shift into `width`-bit word ─▶ o

* **Noise source.** Each oscillator is an odd-length ring of inverting ``SB_LUT4`` cells (oscillator
  *k* has ``stages + 2k`` of them, so no two run at the same frequency and they are less prone to
  lock to each other). Each ring is sampled through a 2-flip-flop synchroniser and the samples are XORed.
* **Health tests** (:class:`HealthTests`) watch every raw bit: the Repetition Count Test and the
  Adaptive Proportion Test (window 1024) of SP 800-90B §4.4, with cutoffs derived here, at
  elaboration, from the claimed min-entropy per raw bit and the false-positive probability
  (:func:`rct_cutoff`, :func:`apt_cutoff`).
* **Conditioning.** XOR-decimation: each output bit is the XOR of ``decimation`` consecutive raw
  bits; ``width`` such bits make a word, the first in the LSB. A word is produced every
  ``sample_divisor * decimation * width`` clock cycles (at 48 MHz with the defaults, 8 · 8 · 32
  cycles: 23 437 words/s).

Simulation: when elaborated with ``platform=None`` the rings, which a simulator cannot run, are
replaced by :class:`OscillatorModel`, a pseudo-random stand-in for the sampled, XORed oscillator bank
whose behaviour (healthy, biased, stuck, correlated) tests set through its ports at run time.

For the boards: the rings are combinational loops on purpose. yosys keeps them because the cells and
their nets carry ``keep``; **nextpnr-ice40 must be run with ``--ignore-loops``**, or its timing
analysis stops at the loops. The rings are not timing paths; only the synchronisers' first flip-flops
see them, and those are allowed to go metastable.
"""

import math
from fractions import Fraction

from amaranth.hdl import Cat, Const, Instance, Module, Mux, Signal
from amaranth.lib import enum as hdl_enum
from amaranth.lib import stream, wiring
from amaranth.lib.cdc import FFSynchronizer
from amaranth.lib.wiring import In, Out

__all__ = [
    "rct_cutoff", "apt_cutoff", "binomial_upper_tail",
    "MIN_ENTROPY", "ALPHA", "APT_WINDOW",
    "ModelMode", "OscillatorModel", "HealthTests", "TRNG",
]

#: Claimed min-entropy per raw bit (bits). An assumption to be checked on hardware (docs/trng.md).
MIN_ENTROPY = 0.5
#: Probability that a health test fails on a source that meets the claim, per test decision.
ALPHA = 2.0 ** -40
#: Adaptive Proportion Test window for a binary source (SP 800-90B §4.4.2).
APT_WINDOW = 1024

_FAILURE_COUNT_BITS = 16


# --- cutoffs: the one definition ---------------------------------------------------------------------------

def _check_claim(min_entropy, alpha):
    if isinstance(min_entropy, bool) or not isinstance(min_entropy, (int, float)):
        raise TypeError(f"min-entropy must be a number of bits per raw bit, not {min_entropy!r}")
    if not 0 < min_entropy <= 1:
        raise ValueError(f"min-entropy of a binary source must be in (0, 1] bits, not {min_entropy!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"false-positive probability must be a number, not {alpha!r}")
    # SP 800-90B §4.4: "1 > alpha >= 2^-40", with 2^-20 the weakest it recommends.
    if not 2.0 ** -40 <= alpha <= 2.0 ** -20:
        raise ValueError(f"false-positive probability must be within [2^-40, 2^-20], not {alpha!r}")


def rct_cutoff(min_entropy=MIN_ENTROPY, alpha=ALPHA):
    """Repetition Count Test cutoff C (SP 800-90B §4.4.1): ``1 + ceil(-log2(alpha) / H)``.

    A run of C identical raw bits has probability at most ``alpha`` (per starting point) for a source
    with min-entropy ``H`` per bit, since each repetition has probability at most ``2**-H``.
    """
    _check_claim(min_entropy, alpha)
    # In exact arithmetic on the decimal the caller wrote: 40 / 0.8 is 50, not 50.000000000000001.
    return 1 + math.ceil(Fraction(-math.log2(alpha)) / Fraction(repr(min_entropy)))


def binomial_upper_tail(n, p, k):
    """``P[X >= k]`` for ``X ~ Binomial(n, p)``, summed in log space so tiny tails do not underflow."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    log_n = math.lgamma(n + 1)
    return math.fsum(math.exp(log_n - math.lgamma(j + 1) - math.lgamma(n - j + 1) + j * log_p + (n - j) * log_q)
                     for j in range(k, n + 1))


def apt_cutoff(min_entropy=MIN_ENTROPY, alpha=ALPHA, window=APT_WINDOW):
    """Adaptive Proportion Test cutoff C (SP 800-90B §4.4.2) for a binary source.

    The smallest C with ``P[Binomial(window, 2**-H) >= C] <= alpha``; equivalently SP 800-90B's
    ``1 + CRITBINOM(W, 2^-H, 1 - alpha)``. Raises ``ValueError`` when no C <= ``window`` qualifies
    (the claim is too weak for the test to ever fail).
    """
    _check_claim(min_entropy, alpha)
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise ValueError(f"APT window must be an integer of at least 2 samples, not {window!r}")
    p = 2.0 ** -min_entropy
    # The tail shrinks as C grows; start at the mean and walk up.
    cutoff = max(1, math.floor(window * p))
    while cutoff <= window and binomial_upper_tail(window, p, cutoff) > alpha:
        cutoff += 1
    if cutoff > window:
        raise ValueError(f"min-entropy {min_entropy} is too low for an APT with a window of {window}: "
                         f"no cutoff reaches alpha = {alpha!r}")
    return cutoff


# --- simulation model --------------------------------------------------------------------------------------

class ModelMode(hdl_enum.Enum, shape=3):
    """Behaviour of :class:`OscillatorModel`."""

    #: Independent, unbiased bits (a 64-bit xorshift generator).
    HEALTHY = 0
    #: Independent bits, each 1 with probability ``level / 2**16``.
    BIASED = 1
    STUCK_0 = 2
    STUCK_1 = 3
    #: A Markov chain: each bit differs from the previous one with probability ``level / 2**16``.
    CORRELATED = 4


def _level(probability):
    if isinstance(probability, bool) or not isinstance(probability, (int, float)):
        raise TypeError(f"probability must be a number, not {probability!r}")
    if not 0 <= probability <= 1:
        raise ValueError(f"probability must be within [0, 1], not {probability!r}")
    return min(round(probability * 65536), 65535)


class OscillatorModel(wiring.Component):
    """Simulation stand-in for the sampled, XORed ring-oscillator bank: one raw bit per ``en``.

    Not synthesisable in any useful sense (it is a pseudo-random generator); :class:`TRNG` uses it only
    when elaborated for simulation. The constructor sets the initial behaviour; a testbench changes it
    at any time through ``mode`` and ``level``, e.g. to inject a fault into a running TRNG.

    Parameters
    ----------
    mode : ModelMode
    probability : float
        For ``BIASED``, P(bit = 1); for ``CORRELATED``, P(bit ≠ previous bit). Held as ``level`` with
        16 fractional bits.
    seed : int
        Non-zero 64-bit seed of the underlying xorshift64 generator.

    Ports
    -----
    mode : In(ModelMode)
    level : In(16)
        Probability × 2**16, as above.
    en : In(1)
        Draw: ``o`` takes a new value at the end of a cycle with ``en`` high.
    o : Out(1)
        The current raw bit.
    """

    def __init__(self, mode=ModelMode.HEALTHY, probability=0.5, *, seed=0x9E3779B97F4A7C15):
        if not isinstance(mode, ModelMode):
            raise TypeError(f"mode must be a ModelMode, not {mode!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 < seed < 2 ** 64:
            raise ValueError(f"seed must be a non-zero 64-bit integer, not {seed!r}")
        self._seed = seed
        super().__init__({
            "mode": In(ModelMode, init=mode),
            "level": In(16, init=_level(probability)),
            "en": In(1),
            "o": Out(1),
        })

    @property
    def seed(self):
        return self._seed

    def elaborate(self, platform):
        m = Module()
        state = Signal(64, init=self._seed)
        x1 = state ^ (state << 13)[:64]
        x2 = x1 ^ (x1 >> 7)
        x3 = x2 ^ (x2 << 17)[:64]
        uniform = state[48:]                    # the high bits of xorshift64 are its best
        with m.If(self.en):
            m.d.sync += state.eq(x3)
            with m.Switch(self.mode):
                with m.Case(ModelMode.HEALTHY):
                    m.d.sync += self.o.eq(state[63])
                with m.Case(ModelMode.BIASED):
                    m.d.sync += self.o.eq(uniform < self.level)
                with m.Case(ModelMode.STUCK_0):
                    m.d.sync += self.o.eq(0)
                with m.Case(ModelMode.STUCK_1):
                    m.d.sync += self.o.eq(1)
                with m.Case(ModelMode.CORRELATED):
                    m.d.sync += self.o.eq(self.o ^ (uniform < self.level))
        return m


# --- health tests ------------------------------------------------------------------------------------------

class HealthTests(wiring.Component):
    """SP 800-90B §4.4 continuous health tests on a binary noise source.

    Parameters
    ----------
    min_entropy : float
        Claimed min-entropy H per raw bit, in (0, 1].
    alpha : float
        False-positive probability per test decision, within [2^-40, 2^-20].
    window : int
        Adaptive Proportion Test window W (1024 for a binary source).

    The cutoffs are :attr:`rct_cutoff` and :attr:`apt_cutoff`, derived from these at construction.

    Ports
    -----
    i : In(stream.Signature(1, always_ready=True))
        Raw bits, one per cycle with ``valid`` at most.
    clear : In(1)
        Clears ``alarm`` and ``failures`` and restarts both tests and the start-up test; a raw bit
        arriving in that cycle is ignored.
    alarm : Out(1)
        Sticky: set by any test failure, from the second cycle after the failing bit; cleared only
        by reset or ``clear``.
    failures : Out(16)
        Failure events since reset or ``clear``, saturating. A Repetition Count failure counts once
        per run (when the run reaches the cutoff), an Adaptive Proportion failure once per window.
    fail : Out(1)
        One-cycle strobe with each failure event (the cycle after its bit).
    startup_done : Out(1)
        The start-up test (SP 800-90B §4.3: the health tests over the first ``window`` raw bits)
        finished without a failure. Set after the ``window``-th bit since reset or ``clear``.

    Repetition Count Test: a failure when a run of identical bits reaches the cutoff C.
    Adaptive Proportion Test: windows of W consecutive bits; a failure when the first bit of a window
    occurs C times in it (the first bit included).
    """

    def __init__(self, min_entropy=MIN_ENTROPY, alpha=ALPHA, window=APT_WINDOW):
        self._rct_cutoff = rct_cutoff(min_entropy, alpha)
        self._apt_cutoff = apt_cutoff(min_entropy, alpha, window)
        self._min_entropy, self._alpha, self._window = min_entropy, alpha, window
        super().__init__({
            "i": In(stream.Signature(1, always_ready=True)),
            "clear": In(1),
            "alarm": Out(1),
            "failures": Out(_FAILURE_COUNT_BITS),
            "fail": Out(1),
            "startup_done": Out(1),
        })

    @property
    def min_entropy(self):
        return self._min_entropy

    @property
    def alpha(self):
        return self._alpha

    @property
    def window(self):
        return self._window

    @property
    def rct_cutoff(self):
        return self._rct_cutoff

    @property
    def apt_cutoff(self):
        return self._apt_cutoff

    def elaborate(self, platform):
        m = Module()
        bit = self.i.payload
        sample = self.i.valid & ~self.clear
        rct, apt = self.rct_cutoff, self.apt_cutoff

        # Every comparison of a count with a cutoff is computed a sample ahead into a flag register,
        # so a failure decision is a few gates from flip-flops: the block meets 72 MHz on an iCE40.

        # Repetition Count Test. A run's count stops at the cutoff, so one run is one failure.
        previous = Signal()
        started = Signal()                  # a bit has been seen since reset or clear
        run = Signal(range(rct + 1))
        run_penultimate = Signal()          # run == C - 1: one more repeat fails
        run_full = Signal()                 # run == C: this run has failed already
        repeat = sample & started & (bit == previous)
        rct_fail = Signal()
        m.d.comb += rct_fail.eq(repeat & run_penultimate)
        with m.If(repeat):
            with m.If(~run_full):
                m.d.sync += [run.eq(run + 1), run_penultimate.eq(run == rct - 2), run_full.eq(run_penultimate)]
        with m.Elif(sample):
            m.d.sync += [previous.eq(bit), started.eq(1), run.eq(1), run_penultimate.eq(rct == 2), run_full.eq(0)]

        # Adaptive Proportion Test over windows of `window` bits. The count stops at the cutoff, so one
        # window is one failure.
        opening = Signal(init=1)            # the next bit opens a window
        closing = Signal()                  # the next bit closes it
        index = Signal(range(self.window))
        reference = Signal()
        count = Signal(range(apt + 1))
        count_penultimate = Signal()
        count_full = Signal()
        apt_fail = Signal()
        with m.If(sample):
            with m.If(closing):
                m.d.sync += [index.eq(0), opening.eq(1), closing.eq(0)]
            with m.Else():
                m.d.sync += [index.eq(index + 1), opening.eq(0), closing.eq(index == self.window - 2)]
            with m.If(opening):
                m.d.sync += [reference.eq(bit), count.eq(1), count_penultimate.eq(apt == 2), count_full.eq(0)]
            with m.Elif((bit == reference) & ~count_full):
                m.d.sync += [count.eq(count + 1), count_penultimate.eq(count == apt - 2),
                             count_full.eq(count_penultimate)]
                m.d.comb += apt_fail.eq(count_penultimate)

        window_done = Signal()
        m.d.sync += [self.fail.eq(rct_fail | apt_fail), window_done.eq(sample & closing)]
        with m.If(self.fail):
            m.d.sync += self.alarm.eq(1)
            with m.If(self.failures != (1 << _FAILURE_COUNT_BITS) - 1):
                m.d.sync += self.failures.eq(self.failures + 1)
        with m.If(window_done & ~self.fail & ~self.alarm):
            m.d.sync += self.startup_done.eq(1)

        with m.If(self.clear):
            m.d.sync += [
                self.alarm.eq(0), self.failures.eq(0), self.fail.eq(0), self.startup_done.eq(0),
                started.eq(0), run_full.eq(0), index.eq(0), opening.eq(1), closing.eq(0), window_done.eq(0),
            ]
        return m


# --- the TRNG ----------------------------------------------------------------------------------------------

# SB_LUT4 truth table: O = INIT[{I3, I2, I1, I0}]; 0x5555 makes O = ~I0.
_LUT_INVERTER = 0x5555


class TRNG(wiring.Component):
    """Ring-oscillator TRNG with SP 800-90B health tests and XOR-decimation conditioning.

    Parameters
    ----------
    width : int
        Bits per output word. To feed ``Fabric.mix`` directly, use the fabric's lane count.
    oscillators : int
        Ring oscillators in the bank (at least 1); oscillator *k* has ``stages + 2k`` inverters.
    stages : int
        Inverters in the shortest ring; odd, at least 3 (a loop through one cell runs so fast that
        it may not swing cleanly).
    sample_divisor : int
        Clock cycles per raw bit (at least 1): the rings' jitter accumulates between samples.
    decimation : int
        Raw bits XORed into each output bit (at least 1).
    min_entropy, alpha : float
        The claim the health tests enforce: min-entropy per raw bit, and false-positive probability.
    model : OscillatorModel or None
        The simulation model (default: a healthy one). Used only when elaborated with
        ``platform=None``; available as :attr:`model` for tests to steer at run time.

    Ports
    -----
    o : Out(stream.Signature(width))
        Conditioned random words. None are produced before the start-up test has passed (the first
        1024 raw bits) or while ``alarm`` is set; the partial word is then discarded. A word that
        completes while the previous one is still pending is dropped (the source cannot wait). A
        word already offered when the alarm rises stays offered until taken (stream rule 2), so a
        consumer that must never see a word from a failing source checks ``alarm`` too.
    raw : Out(stream.Signature(1, always_ready=True))
        Every raw (unconditioned) bit, for entropy assessment on hardware.
    clear : In(1)
        Clears the alarm and the failure count; output resumes after a new start-up test.
    alarm : Out(1)
        Sticky health-test failure, see :class:`HealthTests`.
    failures : Out(16)
        Health-test failure events since reset or ``clear``, saturating.

    ``raw.ready`` is a constant (``always_ready``). To convert a TRNG as the top level on its own,
    pass ``ports=`` explicitly to ``rtlil.convert``, without the constant.
    """

    def __init__(self, width=32, *, oscillators=4, stages=3, sample_divisor=8, decimation=8,
                 min_entropy=MIN_ENTROPY, alpha=ALPHA, model=None):
        for name, value, least in (("width", width, 1), ("oscillators", oscillators, 1), ("stages", stages, 3),
                                   ("sample_divisor", sample_divisor, 1), ("decimation", decimation, 1)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"TRNG {name} must be an integer, not {value!r}")
            if value < least:
                raise ValueError(f"TRNG {name} must be at least {least}, not {value!r}")
        if stages % 2 == 0:
            raise ValueError(f"TRNG stages must be odd (a ring of inverters), not {stages!r}")
        if model is not None and not isinstance(model, OscillatorModel):
            raise TypeError(f"model must be an OscillatorModel, not {model!r}")
        self._width, self._oscillators, self._stages = width, oscillators, stages
        self._sample_divisor, self._decimation = sample_divisor, decimation
        # Checked, and the cutoffs derived, now; the block itself is built at elaboration.
        self._min_entropy, self._alpha = min_entropy, alpha
        self._cutoffs = (rct_cutoff(min_entropy, alpha), apt_cutoff(min_entropy, alpha))
        self._model = model
        super().__init__({
            "o": Out(stream.Signature(width)),
            "raw": Out(stream.Signature(1, always_ready=True)),
            "clear": In(1),
            "alarm": Out(1),
            "failures": Out(_FAILURE_COUNT_BITS),
        })

    width = property(lambda self: self._width)
    oscillators = property(lambda self: self._oscillators)
    stages = property(lambda self: self._stages)
    sample_divisor = property(lambda self: self._sample_divisor)
    decimation = property(lambda self: self._decimation)

    @property
    def model(self):
        """The simulation model, used only when elaborated with ``platform=None``.

        Built on first use when none was given, so a hardware build leaves no unused model behind.
        """
        if self._model is None:
            self._model = OscillatorModel()
        return self._model

    min_entropy = property(lambda self: self._min_entropy)
    alpha = property(lambda self: self._alpha)
    rct_cutoff = property(lambda self: self._cutoffs[0], doc="Repetition Count Test cutoff in force.")
    apt_cutoff = property(lambda self: self._cutoffs[1], doc="Adaptive Proportion Test cutoff in force.")

    @property
    def ring_lengths(self):
        """Inverters in each ring."""
        return tuple(self.stages + 2 * k for k in range(self.oscillators))

    @property
    def cycles_per_word(self):
        """Clock cycles per output word, while the consumer keeps up."""
        return self.sample_divisor * self.decimation * self.width

    def _rings(self, m):
        """The oscillator bank, sampled and XORed: one bit per cycle."""
        samples = []
        for k, length in enumerate(self.ring_lengths):
            taps = [Signal(name=f"ring{k}_{j}", attrs={"keep": 1}) for j in range(length)]
            for j in range(length):
                m.submodules[f"ring{k}_lut{j}"] = Instance(
                    "SB_LUT4",
                    a_keep=1,
                    p_LUT_INIT=Const(_LUT_INVERTER, 16),
                    i_I0=taps[j - 1], i_I1=Const(0), i_I2=Const(0), i_I3=Const(0),
                    o_O=taps[j],
                )
            sample = Signal(name=f"ring{k}_sample")
            m.submodules[f"ring{k}_sync"] = FFSynchronizer(taps[-1], sample)
            samples.append(sample)
        noise = Signal()
        m.d.comb += noise.eq(Cat(*samples).xor())
        return noise

    def elaborate(self, platform):
        m = Module()
        m.submodules.health = health = HealthTests(self.min_entropy, self.alpha)

        # One raw bit every `sample_divisor` cycles.
        take = Signal()
        if self.sample_divisor == 1:
            m.d.comb += take.eq(1)
        else:
            divider = Signal(range(self.sample_divisor), init=self.sample_divisor - 1)
            m.d.comb += take.eq(divider == 0)
            m.d.sync += divider.eq(Mux(take, self.sample_divisor - 1, divider - 1))

        if platform is None:
            m.submodules.model = model = self.model
            # The model draws only when sampled, so its CORRELATED mode is a property of raw bits.
            m.d.comb += model.en.eq(take)
            noise = model.o
        else:
            noise = self._rings(m)

        raw_bit = Signal()
        raw_valid = Signal()
        m.d.sync += [raw_bit.eq(noise), raw_valid.eq(take)]
        m.d.comb += [
            self.raw.payload.eq(raw_bit), self.raw.valid.eq(raw_valid),
            health.i.payload.eq(raw_bit), health.i.valid.eq(raw_valid),
            health.clear.eq(self.clear),
            self.alarm.eq(health.alarm), self.failures.eq(health.failures),
        ]

        # XOR-decimation, then packing LSB first. As in the health tests, "the next bit is the last"
        # is a flag computed a bit ahead, and a finished word moves to `o` the cycle after.
        parity = Signal()
        folded = Signal(range(self.decimation))
        fold_last = Signal(init=self.decimation == 1)
        word = Signal(self.width)
        filled = Signal(range(self.width))
        fill_last = Signal(init=self.width == 1)
        word_done = Signal()
        producing = health.startup_done & ~health.alarm & ~self.clear
        m.d.sync += word_done.eq(0)
        with m.If(~producing):
            m.d.sync += [parity.eq(0), folded.eq(0), fold_last.eq(self.decimation == 1),
                         filled.eq(0), fill_last.eq(self.width == 1)]
        with m.Elif(raw_valid):
            bit = parity ^ raw_bit
            with m.If(fold_last):
                m.d.sync += [parity.eq(0), word.eq(Cat(word[1:], bit))]
                if self.decimation > 1:
                    m.d.sync += [folded.eq(0), fold_last.eq(0)]
                with m.If(fill_last):
                    m.d.sync += word_done.eq(1)
                    if self.width > 1:
                        m.d.sync += [filled.eq(0), fill_last.eq(0)]
                if self.width > 1:
                    with m.Else():
                        m.d.sync += [filled.eq(filled + 1), fill_last.eq(filled == self.width - 2)]
            if self.decimation > 1:
                with m.Else():
                    m.d.sync += [parity.eq(bit), folded.eq(folded + 1), fold_last.eq(folded == self.decimation - 2)]

        with m.If(self.o.ready):
            m.d.sync += self.o.valid.eq(0)
        with m.If(word_done & (~self.o.valid | self.o.ready)):
            m.d.sync += [self.o.payload.eq(word), self.o.valid.eq(1)]
        return m
