"""A first-word-fall-through FIFO on ``ram.RAM`` (one EBR on iCE40, no collision logic)."""

from amaranth import *
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from .ram import RAM

__all__ = ["StreamFIFO"]


class StreamFIFO(wiring.Component):
    """``depth`` words of ``width`` bits between two streams.

    Ports
    -----
    i : In(stream.Signature(width))   accepted while not full
    o : Out(stream.Signature(width))  first word falls through; follows the stream handshake rules
    level : Out(range(depth + 2))     words held (including the one on ``o``)
    flush : In(1)                     drop every word (takes effect at the end of the cycle)
    """

    def __init__(self, width: int, depth: int, target: str = "generic"):
        if depth < 2 or depth & (depth - 1):
            raise ValueError(f"FIFO depth must be a power of two of at least 2, not {depth}")
        self._width, self._depth, self._target = width, depth, target
        super().__init__({
            "i": In(stream.Signature(width)),
            "o": Out(stream.Signature(width)),
            "level": Out(range(depth + 2)),
            "flush": In(1),
        })

    @property
    def depth(self) -> int:
        return self._depth

    def elaborate(self, platform):
        m = Module()
        m.submodules.ram = ram = RAM(self._width, self._depth, target=self._target)
        bits = (self._depth - 1).bit_length()
        write_ptr = Signal(bits)
        read_ptr = Signal(bits)
        # The count kept is `level` (words held, the one on `o` included) rather than the words in the RAM
        # alone: `level` is then a flip-flop, not an adder after `out_valid` (whose carry chain was on the
        # path from `out_valid` into the command engine's response word).
        level = Signal(range(self._depth + 2))
        out_valid = Signal()                      # the RAM's read register holds the word on `o`
        top = self._depth.bit_length() - 1        # level[top]: level >= depth
        full = Signal()                           # depth words in the RAM
        m.d.comb += full.eq(level[top] & (level[0] | ~out_valid))
        # Whether the RAM holds a word decides every read, which the consumer's `ready` starts: it is kept
        # in flip-flops (any word, exactly one; two is read off `level`), so a read is one LUT from `ready`.
        ram_any = Signal()
        ram_one = Signal()
        ram_two = Signal()
        m.d.comb += ram_two.eq(Mux(out_valid, level == 3, level == 2))

        push = Signal()
        m.d.comb += [self.i.ready.eq(~full), push.eq(self.i.valid & self.i.ready)]
        m.d.comb += [ram.w_addr.eq(write_ptr), ram.w_data.eq(self.i.payload), ram.w_en.eq(push)]

        pop = Signal()
        m.d.comb += [self.o.valid.eq(out_valid), self.o.payload.eq(ram.r_data), pop.eq(self.o.valid & self.o.ready)]
        # Read the next word into the RAM's output register whenever `o` is empty or being taken.
        fetch = Signal()
        m.d.comb += fetch.eq(ram_any & (~out_valid | pop))
        m.d.comb += [ram.r_addr.eq(read_ptr), ram.r_en.eq(fetch)]
        m.d.comb += self.level.eq(level)

        with m.If(self.flush):
            m.d.sync += [write_ptr.eq(0), read_ptr.eq(0), level.eq(0), out_valid.eq(0), ram_any.eq(0),
                         ram_one.eq(0)]
        with m.Else():
            m.d.sync += level.eq(level + push - pop)
            with m.If(push & ~fetch):
                m.d.sync += [ram_any.eq(1), ram_one.eq(~ram_any)]
            with m.If(fetch & ~push):
                m.d.sync += [ram_any.eq(~ram_one), ram_one.eq(ram_two)]
            with m.If(push):
                m.d.sync += write_ptr.eq(write_ptr + 1)
            with m.If(fetch):
                m.d.sync += [read_ptr.eq(read_ptr + 1), out_valid.eq(1)]
            with m.Elif(pop):
                m.d.sync += out_valid.eq(0)
        return m
