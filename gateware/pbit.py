"""The p-bit's random path: random word and effective bias → threshold θ, off the spin path.

The spin path then only compares: ``s = +1 iff Σ_d ±w_d >= θ`` (``opentsu.formats`` defines the rule as
``F >= Z(r)`` with ``F = Σ_d ±w_d + b``, so ``θ = Z(r) - b``).
"""

from amaranth import *
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from opentsu.formats import EFFECTIVE_BIAS, PBIT, WEIGHT, field_bits

__all__ = ["Threshold", "SpinSum", "theta_bits"]


def theta_bits(degree: int) -> int:
    """Width of θ: one bit more than the neighbour sum, so the clamp codes lie beyond every sum."""
    return field_bits(degree) + 1


def _leading_zeros(m, bits):
    """``(any, count)`` for a power-of-two number of bits: whether one is set, and how many zeros lie
    above the highest one, as a tree of halves."""
    if len(bits) == 1:
        return bits[0], Const(0, 0)
    half = len(bits) // 2
    assert half * 2 == len(bits) and half & (half - 1) == 0
    any_lo, count_lo = _leading_zeros(m, bits[:half])
    any_hi, count_hi = _leading_zeros(m, bits[half:])
    # A kept wire at the top cuts the tree for the LUT mapper, which otherwise maps it as one deep chain
    # (six LUT levels; four with the cut). Cutting it at the 8-bit groups too (three levels) costs 2 more
    # LUTs per lane, and at the 4-bit groups 6, for no Fmax on the 8-lane datapath, whose critical path
    # is in SpinSum.
    attrs = {"keep": 1} if len(bits) >= 16 else {}
    any_, count = Signal(attrs=attrs), Signal(len(count_hi) + 1, attrs=attrs)
    m.d.comb += [any_.eq(any_lo | any_hi), count.eq(Mux(any_hi, count_hi, Cat(count_lo, Const(1, 1))))]
    return any_, count


def _less_than(value, const):
    """``value < const`` for an unsigned value and a constant, as plain logic (no carry chain): from the
    least significant bit up, ``lt = ~v_i | lt`` where the constant has a one and ``~v_i & lt`` where it
    has a zero."""
    if const >= 1 << len(value):
        return Const(1, 1)
    lt = Const(0, 1)
    for i in range(len(value)):
        lt = (~value[i] | lt) if const >> i & 1 else (~value[i] & lt)
    return lt


class Threshold(wiring.Component):
    """Pipelined ``θ = Z(word) - bias`` for one lane, elaborated from ``opentsu.formats.PBIT``.

    Timing, counted in enabled cycles (``en`` high): ``word`` is sampled at the end of step t, ``bias``
    and ``borrow`` at the end of step t + ``LATENCY`` - 1, and ``theta = Z - bias - borrow`` holds the
    result during step t + ``LATENCY``. Each stage holds at most one carry chain; the borrow is the carry
    of the last one, so it is free. With ``en`` low every stage holds.

    Clamps need no logic here: a clamped node has a zero weight row and the bias code ±127, which puts θ
    below -79 or above 80 while its neighbour sum is 0. The zero-field sweep (RANDOMIZE) reads a bias
    row of 0 and ±127 that LOAD writes beside the conditioned one.

    Ports
    -----
    en : In(1)            advance the pipeline
    word : In(32)         the lane's random word (``LaneRNG.words`` the step after a draw)
    bias : In(8)          effective bias code (two's complement)
    borrow : In(1)        subtracted too: the spin path's last negative spin (see ``SpinSum``)
    theta : Out(signed)   ``theta_bits(degree)`` wide
    """

    LATENCY = 4

    def __init__(self, degree: int):
        self._degree = degree
        self._bits = theta_bits(degree)
        super().__init__({
            "en": In(1, init=1),
            "word": In(32),
            "bias": In(EFFECTIVE_BIAS.bits),
            "borrow": In(1),
            "theta": Out(signed(self._bits)),
        })

    def elaborate(self, platform):
        m = Module()
        p = PBIT
        lo_table, bound_tables = p.tables

        # Stage 1: split the word; the octave is the leading-zero count of the octave field.
        fold1 = Signal(reset_less=True)
        octave1 = Signal(range(p.octaves), reset_less=True)
        mant1 = Signal(p.mant_bits, reset_less=True)
        field = self.word[p.exp_lsb:p.exp_lsb + p.exp_bits]
        octave = Signal(range(p.octaves))
        # A one below the field makes the all-zero field count p.exp_bits; the count is a tree of halves,
        # not a chain of priority multiplexers.
        m.d.comb += octave.eq(_leading_zeros(m, Cat(Const(1, 1), field))[1])
        with m.If(self.en):
            m.d.sync += [fold1.eq(self.word[p.fold_bit]), octave1.eq(octave),
                         mant1.eq(self.word[p.mant_lsb:p.mant_lsb + p.mant_bits])]

        # Stage 2: the mantissa comparisons c_k = [m < B[k][e]] and an octave table. A bound that is
        # nonzero in a single octave becomes a constant comparison (plain logic, no carry chain) gated
        # by that octave.
        #
        # θ = Z - b - borrow is computed as ~(~Z + b + borrow), so the bias enters the last adder as it
        # is (no inverters in front of it), and ~Z = r ^ fold with r = (-LO[e] - 1) + count + 2·fold:
        # with nZ = count - LO[e] = -Z_low, the lower half has ~Z = nZ - 1 = r and the upper half
        # ~Z = ~(1 - Z_low) = ~(nZ + 1) = ~r. The XOR with the fold is absorbed by the adder's LUTs.
        offsets = [-lo_table[e] - 1 for e in range(p.octaves)]
        r_shape = _signed_for(min(offsets), max(offsets) + p.boundaries + 2)
        fold2 = Signal(reset_less=True)
        offset2 = Signal(r_shape, reset_less=True)
        below2 = Signal(p.boundaries, reset_less=True)
        offset = Signal(r_shape)
        with m.Switch(octave1):
            for e in range(p.octaves):
                with m.Case(e):
                    m.d.comb += offset.eq(offsets[e])
        below = []
        for k, table in enumerate(bound_tables):
            used = [e for e in range(p.octaves) if table[e]]
            if len(used) <= 1:
                below.append(Const(0, 1) if not used else (octave1 == used[0]) & _less_than(mant1, table[used[0]]))
            else:
                # Mantissa bits above every bound of the table must be 0; the rest is one carry chain.
                width = max(table).bit_length()
                bound = Signal(width, name=f"bound{k}")
                with m.Switch(octave1):
                    for e in range(p.octaves):
                        with m.Case(e):
                            m.d.comb += bound.eq(table[e])
                below.append(~mant1[width:].any() & (mant1[:width] < bound))
        with m.If(self.en):
            m.d.sync += [fold2.eq(fold1), offset2.eq(offset), below2.eq(Cat(*below))]

        # Stage 3: ~Z = (offset + count + 2·fold) ^ fold, with count + 2·fold a table of the five
        # registered bits, so the stage holds one carry chain.
        count = Signal(range(p.boundaries + 3))
        with m.Switch(Cat(below2, fold2)):
            for code in range(1 << (p.boundaries + 1)):
                with m.Case(code):
                    m.d.comb += count.eq(bin(code % (1 << p.boundaries)).count("1") + 2 * (code >> p.boundaries))
        not_z = Signal(r_shape)
        m.d.comb += not_z.eq(offset2 + count)
        not_z3 = Signal(r_shape, reset_less=True)
        with m.If(self.en):
            m.d.sync += not_z3.eq(not_z ^ fold2.replicate(len(not_z)).as_signed())

        # Stage 4: θ = ~(~Z + b + borrow), one carry chain with the borrow as its carry-in, as wide as
        # its range (the port's upper bits repeat the sign).
        bias_lo, bias_hi = _span(self.bias.as_signed())
        total = Signal(_signed_for(_span(not_z3)[0] + bias_lo, _span(not_z3)[1] + bias_hi + 1))
        m.d.comb += total.eq(not_z3 + self.bias.as_signed() + self.borrow)
        with m.If(self.en):
            m.d.sync += self.theta.eq(~total)
        return m


def _span(value):
    """``(lo, hi)`` of a signed value's shape."""
    width = len(value)
    return -(1 << (width - 1)), (1 << (width - 1)) - 1


def _signed_for(lo, hi):
    """The narrowest signed shape holding ``[lo, hi]``."""
    width = 1
    while not -(1 << (width - 1)) <= lo <= hi <= (1 << (width - 1)) - 1:
        width += 1
    return signed(width)


class SpinSum(wiring.Component):
    """The spin path of one lane: ``Σ_d s_d·w_d >= θ``, cut into ``latency`` pipeline stages.

    ``spins`` (bit d = 1 for s_d = +1) and ``weights`` (weight d in bits [7d, 7d+7)) are sampled in stage
    0 ("A"); ``theta`` is read in stage ``theta_stage`` and ``spin`` gives the result in the last stage
    (combinationally, for the write-back at the end of that step). ``±w`` is ``w ^ mask`` plus one for
    each negative spin (STYLE.md: the mux form costs 35% more logic).

    With ``latency >= 3`` those ones cost nothing: each adder of the tree takes one as its carry-in and the
    last one leaves on ``borrow`` (in stage A) for ``Threshold`` to subtract from θ; the whole sum is then
    ready before the last stage, which only compares it with θ. With a shorter pipeline θ comes too late
    for that, and the count is subtracted in the stage before the comparison
    (or in the comparison itself). With ``zero`` high in stage A the neighbour sum is forced to 0.
    Stages advance on ``en``.
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
            "borrow": Out(1),
            "spin": Out(1),
        })

    @staticmethod
    def borrows(latency: int) -> bool:
        """Whether θ must arrive with ``borrow`` already subtracted (``latency >= 3``)."""
        return latency >= 3

    @staticmethod
    def theta_stage_for(latency: int) -> int:
        """Stage (0 = A) in which ``theta`` is read: the last one with the borrow, else the one before."""
        return latency - 1 if SpinSum.borrows(latency) else max(0, latency - 2)

    @property
    def theta_stage(self) -> int:
        return self.theta_stage_for(self._latency)

    @property
    def uses_borrow(self) -> bool:
        return self.borrows(self._latency)

    def elaborate(self, platform):
        m = Module()
        D, P, wbits = self._degree, self._latency, WEIGHT.bits
        sum_w = field_bits(D) + 1
        weight = [self.weights[d * wbits:(d + 1) * wbits].as_signed() for d in range(D)]
        if self.uses_borrow:
            # Tree level 1 adds the terms in pairs, each as s_a·(w_a ± w_b): with p = s_a·s_b,
            # s_a·w_a + s_b·w_b = s_a·(w_a + p·w_b), so only w_b is flipped (p as carry-in for -w_b) and
            # the sign s_a is applied to the sum, as an XOR its adder LUTs absorb, plus a one left pending
            # (its negative spin). That halves the XOR LUTs in front of the tree. `zero` resets stage A's
            # registers (their flip-flops' own synchronous reset) rather than gating every term.
            values, negatives = [], []
            for d in range(0, D - 1, 2):
                neg = Signal(name=f"neg{d}")
                flip = Signal(name=f"flip{d}")
                m.d.comb += [neg.eq(~self.spins[d]), flip.eq(self.spins[d] ^ self.spins[d + 1])]
                inner = Signal(signed(wbits + 1), name=f"inner{d}")
                m.d.comb += inner.eq(weight[d] + (weight[d + 1] ^ flip.replicate(wbits).as_signed()) + flip)
                pair = Signal(signed(wbits + 1), name=f"pair{d}")
                m.d.comb += pair.eq(inner ^ neg.replicate(wbits + 1).as_signed())
                values.append(pair)
                negatives.append(neg)
            if D % 2:
                neg = Signal(name=f"neg{D - 1}")
                term = Signal(signed(wbits), name=f"term{D - 1}")
                m.d.comb += [neg.eq(~self.spins[D - 1]), term.eq(weight[D - 1] ^ neg.replicate(wbits).as_signed())]
                values.append(term)
                negatives.append(neg)
        else:
            values, negatives = [], []
            for d in range(D):
                neg = Signal(name=f"neg{d}")
                m.d.comb += neg.eq(~self.spins[d] & ~self.zero)
                term = Signal(signed(wbits), name=f"term{d}")
                m.d.comb += term.eq(Mux(self.zero, 0, weight[d] ^ neg.replicate(wbits).as_signed()))
                values.append(term)
                negatives.append(neg)
        levels = max(1, (D - 1).bit_length())
        cuts = [max(1, round(levels * k / P)) for k in range(1, P)]   # tree level ending each stage
        if self.uses_borrow:
            # Negative spins ride as carry-ins: one per adder, the last one out on `borrow`.
            m.d.comb += self.borrow.eq(negatives[-1] & ~self.zero)
            pending = negatives[:-1]
            level = 1 if D >= 2 else 0      # the pairs are level 1
            # Stage A ends with the pairs (the weights arrive late, from block RAM), the last stage only
            # compares with θ (one carry chain ahead of the write-back), and the other levels are spread
            # over the stages between.
            middle = max(1, P - 2)
            cuts = [min(level, levels)] + [level + round((levels - level) * k / middle) for k in range(1, P - 1)]
            for stage in range(P - 1):
                while level < cuts[stage]:
                    merged = []
                    for i in range(0, len(values), 2):
                        if i + 1 < len(values):
                            carry = pending.pop(0) if pending else Const(0, 1)
                            # Sized to its exact range: Amaranth's a + b + c is two bits wider than a.
                            lo, hi = _span(values[i])[0] + _span(values[i + 1])[0], \
                                _span(values[i])[1] + _span(values[i + 1])[1] + 1
                            total = Signal(_signed_for(lo, hi), name=f"sum{level}_{i // 2}")
                            m.d.comb += total.eq(values[i] + values[i + 1] + carry)
                            merged.append(total)
                        else:
                            merged.append(values[i])
                    values = merged
                    level += 1
                regs = [Signal(v.shape(), name=f"acc{stage}_{k}", reset_less=True) for k, v in enumerate(values)]
                held = [Signal(name=f"neg{stage}_{k}", reset_less=True) for k in range(len(pending))]
                zero = self.zero if stage == 0 else Const(0, 1)
                with m.If(self.en):
                    m.d.sync += [reg.eq(Mux(zero, 0, v)) for reg, v in zip(regs, values)]
                    m.d.sync += [h.eq(p & ~zero) for h, p in zip(held, pending)]
                values, pending = regs, held
            assert level == levels and len(values) == 1 and not pending, "every negative spin must find a carry-in"
            m.d.comb += self.spin.eq(values[0] >= self.theta)
            return m

        count = sum(negatives)
        threshold = None
        level = 0
        for stage in range(P):
            last_level = cuts[stage] if stage < P - 1 else levels
            while level < last_level:
                values = [values[i] + values[i + 1] if i + 1 < len(values) else values[i]
                          for i in range(0, len(values), 2)]
                level += 1
            if P >= 2 and stage == self.theta_stage:
                threshold = self.theta - count
            if stage == P - 1:
                break
            regs = [Signal(signed(sum_w), name=f"acc{stage}_{k}", reset_less=True) for k in range(len(values))]
            held = Signal(range(D + 1), name=f"negs{stage}", reset_less=True)
            with m.If(self.en):
                m.d.sync += [reg.eq(v) for reg, v in zip(regs, values)]
                m.d.sync += held.eq(count)
            values, count = regs, held
            if threshold is not None:
                thr = Signal(signed(theta_bits(D) + 1), name=f"thr{stage}", reset_less=True)
                with m.If(self.en):
                    m.d.sync += thr.eq(threshold)
                threshold = thr
        if P >= 2:
            m.d.comb += self.spin.eq(values[0] >= threshold)
        else:
            m.d.comb += self.spin.eq(values[0] + count >= self.theta)
        return m
