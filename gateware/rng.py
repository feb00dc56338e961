"""Per-lane random streams: one xoroshiro64 generator per lane (``opentsu.formats.xoroshiro64_step``)."""

from amaranth import *
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from opentsu.formats import RNG_RESET_STATE, RNG_WORD_BITS

__all__ = ["LaneRNG"]


def _rotl(x, k):
    return Cat(x[32 - k:], x[:32 - k])


class LaneRNG(wiring.Component):
    """A bank of ``lanes`` xoroshiro64 generators.

    Each lane keeps ``(s0, u)`` with ``u = s0 ^ s1``: the same engine in other coordinates, in which both
    next-state functions are single-LUT XORs (``s0' = rotl(s0,26) ^ u ^ u<<9``,
    ``u' = s0' ^ rotl(u,13)``) and pack with their flip-flops. The plain ``(s0, s1)`` form needs
    ``t = s0 ^ s1`` twice, and the shared XOR left half the state in flip-flops of their own.

    Ports
    -----
    words : Out(ArrayLayout(32, lanes))
        Each lane's current word ``s0``: the word of the last draw (registered).
    advance : In(1)
        Draw: step every generator at the end of this cycle.
    inject : In(lanes)
        On a draw, bit ℓ is XORed into bit 0 of lane ℓ's new ``s1``. Starting from ``reset``, 64 draws
        with the bits of ``formats.seed_injection`` leave a lane in any state wanted: seeding needs no
        64-bit load multiplexer.
    reset : In(1)
        Put every lane in ``formats.RNG_RESET_STATE`` (wins over ``advance``).
    mix : In(stream.Signature(lanes)), mix_enable : In(1)
        Entropy bits (from the TRNG), injected the same way: while ``mix_enable`` is high and a word is
        pending, a draw also XORs bit ℓ into lane ℓ and consumes the word. With ``mix_enable`` low the
        streams are exactly the reproducible ones the emulator computes.
    """

    def __init__(self, lanes: int):
        if not isinstance(lanes, int) or lanes < 1:
            raise ValueError(f"lanes must be a positive integer, not {lanes!r}")
        self._lanes = lanes
        super().__init__({
            "words": Out(data.ArrayLayout(RNG_WORD_BITS, lanes)),
            "advance": In(1),
            "inject": In(lanes),
            "reset": In(1),
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
        entropy = Signal(self._lanes)
        m.d.comb += entropy.eq(self.inject ^ Mux(take_mix, self.mix.payload, 0))
        reset0, reset1 = RNG_RESET_STATE
        for lane in range(self._lanes):
            s0 = Signal(32, name=f"s0_{lane}", init=reset0)
            u = Signal(32, name=f"u_{lane}", init=reset0 ^ reset1)
            m.d.comb += self.words[lane].eq(s0)
            shared = u ^ (u << 9)[:32]
            with m.If(self.reset):
                m.d.sync += [s0.eq(reset0), u.eq(reset0 ^ reset1)]
            with m.Elif(self.advance):
                m.d.sync += [s0.eq(_rotl(s0, 26) ^ shared),
                             u.eq(_rotl(s0, 26) ^ _rotl(u, 13) ^ shared ^ entropy[lane])]
        return m
