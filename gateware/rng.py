"""Per-lane random streams: one xoroshiro64 generator per lane (``opentsu.formats.xoroshiro64_step``)."""

from amaranth import *
from amaranth.hdl import Instance
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from opentsu.formats import RNG_RESET_STATE, RNG_WORD_BITS

__all__ = ["LaneRNG", "xor_lut_init", "held_masks", "held_next_state"]


def _rotl(x, k):
    return Cat(x[32 - k:], x[:32 - k])


def xor_lut_init(inputs: int) -> int:
    """``SB_LUT4`` truth table (``O = INIT[{I3, I2, I1, I0}]``) of the XOR of inputs I0 .. I(inputs-1)."""
    if not 1 <= inputs <= 4:
        raise ValueError(f"an SB_LUT4 XORs 1 to 4 inputs, not {inputs}")
    return sum((bin(index & ((1 << inputs) - 1)).count("1") & 1) << index for index in range(16))


def _xor(m, bits, invert, name):
    """The XOR of up to four bits, inverted if ``invert``, as one ``SB_LUT4`` instance: synthesis cannot then
    re-express one next-state function through another, which gives that LUT a second load and keeps it out
    of its flip-flop's logic cell (a third of the bank's cells were flip-flops on their own)."""
    out = Signal(name=name)
    init = xor_lut_init(len(bits)) ^ (0xFFFF if invert else 0)
    pins = {f"i_I{k}": bits[k] if k < len(bits) else Const(0, 1) for k in range(4)}
    m.submodules[name] = Instance("SB_LUT4", p_LUT_INIT=Const(init, 16), o_O=out, **pins)
    return out


def held_masks() -> tuple[int, int]:
    """What the flip-flops of ``(s0, u)`` hold each word XORed with: the reset state, so that they reset (and
    power up, as iCE40 flip-flops do) to 0. The masks are folded into the next-state functions."""
    reset0, reset1 = RNG_RESET_STATE
    return reset0, reset0 ^ reset1


def held_next_state() -> list[list[tuple[list[tuple[int, int]], int]]]:
    """Each held bit's next value as an XOR of held bits: ``[register][bit] = (terms, invert)``, register 0
    being ``s0`` and 1 being ``u``, each term a ``(register, bit)`` pair of the current held state, ``invert``
    the constant the masks leave. ``s0' = rotl(s0,26) ^ u ^ u<<9``, ``u' = s0' ^ rotl(u,13)`` (the entropy
    bit comes on top of ``u'`` bit 0). Every function has at most four terms: one ``SB_LUT4`` each."""
    masks = held_masks()
    r26 = [(0, (i - 26) % 32) for i in range(32)]
    r13 = [(1, (i - 13) % 32) for i in range(32)]
    terms_of = [[[r26[i], (1, i)] + ([(1, i - 9)] if i >= 9 else []) for i in range(32)]]
    terms_of.append([terms + [r13[i]] for i, terms in enumerate(terms_of[0])])
    return [[(terms, ((masks[reg] >> i) ^ sum(masks[r] >> k for r, k in terms)) & 1)
             for i, terms in enumerate(functions)] for reg, functions in enumerate(terms_of)]


class LaneRNG(wiring.Component):
    """A bank of ``lanes`` xoroshiro64 generators.

    Each lane keeps ``(s0, u)`` with ``u = s0 ^ s1``: the same engine in other coordinates, in which both
    next-state functions are single-LUT XORs (``s0' = rotl(s0,26) ^ u ^ u<<9``,
    ``u' = s0' ^ rotl(u,13)``) and pack with their flip-flops. The plain ``(s0, s1)`` form needs
    ``t = s0 ^ s1`` twice, and the shared XOR left half the state in flip-flops of their own.

    Elaborated for a platform (hardware), each next-state bit is an explicit ``SB_LUT4`` (``held_next_state``);
    with ``platform=None`` (simulation, Verilog export) the same step is written on whole words.

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
        masks = held_masks()
        for lane in range(self._lanes):
            held = [Signal(32, name=f"s0_{lane}"), Signal(32, name=f"u_{lane}")]
            if platform is None:
                # Simulation: the same step as whole words, which a simulator computes in a few operations
                # rather than bit by bit (the bitwise form took two fifths of the iCEBreaker Verilator
                # model's time).
                s0, u = held[0] ^ masks[0], held[1] ^ masks[1]
                s0_next = _rotl(s0, 26) ^ u ^ (u << 9)[:32]
                u_next = s0_next ^ _rotl(u, 13) ^ entropy[lane]
                nexts = [s0_next ^ masks[0], u_next ^ masks[1]]
            else:
                nexts = []
                for reg, functions in enumerate(held_next_state()):
                    bits = []
                    for i, (terms, invert) in enumerate(functions):
                        inputs = [held[r][k] for r, k in terms]
                        if reg == 1 and i == 0:
                            inputs.append(entropy[lane])   # bit 0 has no u << 9 term
                        bits.append(_xor(m, inputs, invert, f"{('s0', 'u')[reg]}_{lane}_next{i}"))
                    nexts.append(Cat(*bits))
            m.d.comb += self.words[lane].eq(held[0] ^ masks[0])
            with m.If(self.reset):
                m.d.sync += [reg.eq(0) for reg in held]
            with m.Elif(self.advance):
                m.d.sync += [reg.eq(nxt) for reg, nxt in zip(held, nexts)]
        return m
