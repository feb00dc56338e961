"""The p-bit's random path: random word and effective bias → threshold θ, off the spin path.

The spin path then only compares: ``s = +1 iff Σ_d ±w_d >= θ`` (``opentsu.formats`` defines the rule as
``F >= Z(r)`` with ``F = Σ_d ±w_d + b``, so ``θ = Z(r) - b``).
"""

from amaranth import *
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from opentsu.formats import CLAMP_MINUS, CLAMP_PLUS, EFFECTIVE_BIAS, PBIT, WEIGHT, field_bits

__all__ = ["Threshold", "SpinSum", "theta_bits"]


def theta_bits(degree: int) -> int:
    """Width of θ: one bit more than the neighbour sum, so the clamp codes lie beyond every sum."""
    return field_bits(degree) + 1


class Threshold(wiring.Component):
    """Pipelined ``θ = Z(word) - bias`` for one lane, elaborated from ``opentsu.formats.PBIT``.

    Timing, counted in enabled cycles (``en`` high): ``word`` is sampled at the end of step t, ``bias``
    (and ``randomize``) at the end of step t + 2, and ``theta`` holds the result during step t + 3
    (``LATENCY = 3``). With ``en`` low every stage holds.

    Ports
    -----
    en : In(1)            advance the pipeline
    word : In(32)         the lane's random word
    bias : In(8)          effective bias code (two's complement; ±127 are clamp codes)
    randomize : In(1)     treat the bias as zero unless it is a clamp code (zero-field sweep)
    theta : Out(signed)   ``theta_bits(degree)`` wide; the clamp codes give the most negative value
                          (always +1) and the most positive one (always -1)
    """

    LATENCY = 3

    def __init__(self, degree: int):
        self._degree = degree
        self._bits = theta_bits(degree)
        super().__init__({
            "en": In(1, init=1),
            "word": In(32),
            "bias": In(EFFECTIVE_BIAS.bits),
            "randomize": In(1),
            "theta": Out(signed(self._bits)),
        })

    def elaborate(self, platform):
        m = Module()
        p = PBIT
        lo_table, bound_tables = p.tables

        # Stage 1: split the word; octave = leading zeros of the octave field.
        fold1 = Signal()
        octave1 = Signal(range(p.octaves))
        mant1 = Signal(p.mant_bits)
        field = self.word[p.exp_lsb:p.exp_lsb + p.exp_bits]
        octave = Signal(range(p.octaves))
        m.d.comb += octave.eq(p.exp_bits)
        for bit in range(p.exp_bits):  # later (higher) bits win: the leading one decides
            with m.If(field[bit]):
                m.d.comb += octave.eq(p.exp_bits - 1 - bit)
        with m.If(self.en):
            m.d.sync += [fold1.eq(self.word[p.fold_bit]), octave1.eq(octave),
                         mant1.eq(self.word[p.mant_lsb:p.mant_lsb + p.mant_bits])]

        # Stage 2: the octave's base threshold and its mantissa comparisons.
        fold2 = Signal()
        lo2 = Signal(signed(8))
        below2 = Signal(p.boundaries)
        # The octave selects four mantissa bounds from small tables; four comparators then count them.
        bounds = [Signal(p.mant_bits + 1, name=f"bound{k}") for k in range(p.boundaries)]
        lo = Signal(signed(8))
        with m.Switch(octave1):
            for e in range(p.octaves):
                with m.Case(e):
                    m.d.comb += lo.eq(lo_table[e])
                    m.d.comb += [bound.eq(table[e]) for bound, table in zip(bounds, bound_tables)]
        with m.If(self.en):
            m.d.sync += [fold2.eq(fold1), lo2.eq(lo), below2.eq(Cat(*(mant1 < bound for bound in bounds)))]

        # Stage 3: Z = Z_low (lower half) or 1 - Z_low (upper half); θ = Z - b; clamps override.
        z_low = Signal(signed(8))
        m.d.comb += z_low.eq(lo2 - sum(below2[k] for k in range(p.boundaries)))
        z = Signal(signed(9))
        m.d.comb += z.eq(Mux(fold2, 1 - z_low, z_low))
        bias = self.bias.as_signed()
        clamp_plus = bias == CLAMP_PLUS
        clamp_minus = bias == CLAMP_MINUS
        lowest, highest = -(1 << (self._bits - 1)), (1 << (self._bits - 1)) - 1
        with m.If(self.en):
            with m.If(clamp_plus):
                m.d.sync += self.theta.eq(lowest)
            with m.Elif(clamp_minus):
                m.d.sync += self.theta.eq(highest)
            with m.Elif(self.randomize):
                m.d.sync += self.theta.eq(z)
            with m.Else():
                m.d.sync += self.theta.eq(z - bias)
        return m


class SpinSum(wiring.Component):
    """The spin path of one lane: ``Σ_d s_d·w_d >= θ``, cut into ``latency`` pipeline stages.

    ``spins`` (bit d = 1 for s_d = +1) and ``weights`` (weight d in bits [7d, 7d+7)) are sampled in step A;
    ``theta`` in step A + latency - 1, when ``spin`` gives the result (combinationally, for the write-back
    at the end of that step). ``±w`` is ``w ^ mask`` plus a count of negative spins (STYLE.md: the mux form
    costs 35% more logic). With ``zero`` high in step A the neighbour sum is forced to 0. Stages advance
    on ``en``.
    """

    def __init__(self, degree: int, latency: int):
        if degree < 1 or latency < 1:
            raise ValueError(f"need degree >= 1 and latency >= 1, not {degree} and {latency}")
        self._degree, self._latency = degree, latency
        super().__init__({
            "en": In(1, init=1),
            "spins": In(degree),
            "weights": In(WEIGHT.bits * degree),
            "zero": In(1),
            "theta": In(signed(theta_bits(degree))),
            "spin": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        D, P, wbits = self._degree, self._latency, WEIGHT.bits
        sum_w = field_bits(D) + 1
        values, negatives = [], []
        for d in range(D):
            neg = ~self.spins[d] & ~self.zero
            term = Signal(signed(wbits), name=f"term{d}")
            weight = self.weights[d * wbits:(d + 1) * wbits].as_signed()
            m.d.comb += term.eq(Mux(self.zero, 0, weight ^ neg.replicate(wbits).as_signed()))
            values.append(term)
            negatives.append(neg)
        count = sum(negatives)
        levels = max(1, (D - 1).bit_length())
        cuts = [max(1, round(levels * k / P)) for k in range(1, P)]
        for level in range(1, levels + 1):
            values = [values[i] + values[i + 1] if i + 1 < len(values) else values[i]
                      for i in range(0, len(values), 2)]
            for _ in range(cuts.count(level)):
                regs = [Signal(signed(sum_w), name=f"acc{level}_{k}") for k in range(len(values))]
                held = Signal(range(D + 1), name=f"negs{level}")
                with m.If(self.en):
                    m.d.sync += [reg.eq(v) for reg, v in zip(regs, values)]
                    m.d.sync += held.eq(count)
                values, count = regs, held
        field = Signal(signed(sum_w + 1))
        m.d.comb += field.eq(values[0] + count)
        m.d.comb += self.spin.eq(field >= self.theta)
        return m
