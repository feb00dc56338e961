"""iCE40-specific building blocks."""

from amaranth import *
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

__all__ = ["SPRAMBanks", "IncrementOrLoad", "SPRAM_DEPTH", "SPRAM_BLOCKS"]

#: Words in one iCE40UP5K SPRAM block (16 bits each).
SPRAM_DEPTH = 16384
#: SPRAM blocks on an iCE40UP5K.
SPRAM_BLOCKS = 4


class SPRAMBanks(wiring.Component):
    """``fabric.ScratchBanks`` on iCE40UP5K single-port RAMs (one ``SB_SPRAM256KA`` per bank).

    Same ports and timing as the generic banks: read data the cycle after the address, held while ``r_en``
    is low; a cycle either reads or writes (read data is undefined after a write); ``w_en`` has one bit
    per byte (the SPRAM's nibble masks take them in pairs). Amaranth's simulator cannot run the primitive
    (simulate with ``ScratchBanks``); the gate-level Verilator build (``opentsu.verilator.build(board=...)``)
    runs yosys's model of it.
    """

    def __init__(self, banks: int, depth: int):
        if not 1 <= banks <= SPRAM_BLOCKS:
            raise ValueError(f"an iCE40UP5K has {SPRAM_BLOCKS} SPRAM blocks; {banks} banks do not fit")
        if not 1 <= depth <= SPRAM_DEPTH:
            raise ValueError(f"SPRAM depth is at most {SPRAM_DEPTH} words, not {depth}")
        self._banks, self._depth = banks, depth
        super().__init__({
            "addr": In(range(depth)),
            "r_en": In(1),
            "r_data": Out(data.ArrayLayout(16, banks)),
            "w_en": In(2 * banks),
            "w_data": In(data.ArrayLayout(16, banks)),
        })

    @property
    def banks(self):
        return self._banks

    @property
    def depth(self):
        return self._depth

    def elaborate(self, platform):
        m = Module()
        for b in range(self._banks):
            m.submodules[f"spram{b}"] = Instance(
                "SB_SPRAM256KA",
                i_ADDRESS=self.addr,
                i_DATAIN=self.w_data[b],
                i_MASKWREN=Cat(self.w_en[2 * b], self.w_en[2 * b], self.w_en[2 * b + 1], self.w_en[2 * b + 1]),
                i_WREN=self.w_en[2 * b:2 * b + 2].any(),
                # Deselected, the block keeps its output: r_data holds until the next read, as EBRs do.
                i_CHIPSELECT=self.r_en | self.w_en[2 * b:2 * b + 2].any(),
                i_CLOCK=ClockSignal(),
                i_STANDBY=Const(0, 1),
                i_SLEEP=Const(0, 1),
                i_POWEROFF=Const(1, 1),
                o_DATAOUT=self.r_data[b],
            )
        return m


class IncrementOrLoad(wiring.Component):
    """``o = load ? value : a + inc`` (combinational, ``width`` bits, wrapping).

    On iCE40 targets (``target != "generic"``) bits 1 and up are one logic cell each: the carry chain
    adds ``inc`` to ``a`` and the cell's LUT picks ``value`` on ``load``. yosys's own adder keeps its
    LUTs to the sum and spends a second LUT per bit on the pick.
    """

    TARGETS = ("generic", "ice40", "ice40-up5k")

    def __init__(self, width: int, target: str = "generic"):
        if width < 2:
            raise ValueError(f"IncrementOrLoad needs at least 2 bits, not {width}")
        if target not in self.TARGETS:
            raise ValueError(f"unknown target {target!r}; choose from {self.TARGETS}")
        self._width, self._target = width, target
        super().__init__({"a": In(width), "inc": In(1), "load": In(1), "value": In(width), "o": Out(width)})

    def elaborate(self, platform):
        m = Module()
        if self._target == "generic":
            m.d.comb += self.o.eq(Mux(self.load, self.value, self.a + self.inc))
            return m
        m.d.comb += self.o[0].eq(Mux(self.load, self.value[0], self.a[0] ^ self.inc))
        carry = Signal(self._width, name="carry")   # carry[i]: into bit i
        # The chain starts in a carry cell of its own, so `inc` enters it without a feed-in cell.
        m.submodules.carry0 = Instance("SB_CARRY", i_I0=self.a[0], i_I1=self.inc, i_CI=Const(0, 1),
                                       o_CO=carry[1])
        # LUT inputs: I0 value, I1 a, I2 load, I3 carry in; the carry's operands are I1 and I2, so with
        # `load` low it carries a & carry in, and with `load` high its carry is never looked at.
        init = sum(1 << k for k in range(16)
                   if ((k & 1) if (k >> 2) & 1 else ((k >> 1) & 1) ^ ((k >> 3) & 1)))
        for i in range(1, self._width):
            m.submodules[f"lut{i}"] = Instance("SB_LUT4", p_LUT_INIT=Const(init, 16), i_I0=self.value[i],
                                               i_I1=self.a[i], i_I2=self.load, i_I3=carry[i], o_O=self.o[i])
            if i + 1 < self._width:
                m.submodules[f"carry{i}"] = Instance("SB_CARRY", i_I0=self.a[i], i_I1=self.load,
                                                     i_CI=carry[i], o_CO=carry[i + 1])
        return m
