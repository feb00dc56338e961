"""Per-lane random streams: one xoroshiro64 generator per lane (``opentsu.formats.xoroshiro64_step``)."""

from amaranth import *
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from opentsu.formats import RNG_WORD_BITS

__all__ = ["LaneRNG"]


def _rotl(x, k):
    return Cat(x[32 - k:], x[:32 - k])


class LaneRNG(wiring.Component):
    """A bank of ``lanes`` xoroshiro64 generators.

    Ports
    -----
    words : Out(ArrayLayout(32, lanes))
        Each lane's current output word ``s0``.
    advance : In(1)
        Step every generator at the end of this cycle (a "draw").
    seed_lane, seed_state, seed_en : In
        When ``seed_en`` is high, lane ``seed_lane`` takes ``seed_state`` (bits 31..0 = s0, 63..32 = s1);
        seeding wins over ``advance`` for that lane.
    mix : In(stream.Signature(lanes))
        Entropy bits (from the TRNG). While ``mix_enable`` is high and a word is pending, a draw XORs bit ℓ
        of it into bit 0 of lane ℓ's s1 and consumes the word. One bit per lane per draw is plenty to
        make the streams unpredictable and costs one LUT per lane. With ``mix_enable`` low the streams are
        exactly the reproducible ones the emulator computes.
    """

    def __init__(self, lanes: int):
        if not isinstance(lanes, int) or lanes < 1:
            raise ValueError(f"lanes must be a positive integer, not {lanes!r}")
        self._lanes = lanes
        super().__init__({
            "words": Out(data.ArrayLayout(RNG_WORD_BITS, lanes)),
            "advance": In(1),
            "seed_lane": In(range(max(2, lanes))),
            "seed_state": In(64),
            "seed_en": In(1),
            "mix": In(stream.Signature(lanes)),
            "mix_enable": In(1),
        })

    @property
    def lanes(self) -> int:
        return self._lanes

    def elaborate(self, platform):
        m = Module()
        take_mix = Signal()
        m.d.comb += take_mix.eq(self.advance & self.mix_enable & self.mix.valid)
        m.d.comb += self.mix.ready.eq(self.advance & self.mix_enable)
        for lane in range(self._lanes):
            s0 = Signal(32, name=f"s0_{lane}", init=1)
            s1 = Signal(32, name=f"s1_{lane}")
            m.d.comb += self.words[lane].eq(s0)
            t = Signal(32, name=f"t_{lane}")
            m.d.comb += t.eq(s0 ^ s1)
            with m.If(self.seed_en & (self.seed_lane == lane)):
                m.d.sync += [s0.eq(self.seed_state[:32]), s1.eq(self.seed_state[32:])]
            with m.Elif(self.advance):
                m.d.sync += [s0.eq(_rotl(s0, 26) ^ t ^ (t << 9)[:32]),
                             s1.eq(_rotl(t, 13) ^ (take_mix & self.mix.payload[lane]))]
        return m
