"""iCE40-specific building blocks."""

from amaranth import *
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

__all__ = ["SPRAMBanks", "SPRAM_DEPTH", "SPRAM_BLOCKS"]

#: Words in one iCE40UP5K SPRAM block (16 bits each).
SPRAM_DEPTH = 16384
#: SPRAM blocks on an iCE40UP5K.
SPRAM_BLOCKS = 4


class SPRAMBanks(wiring.Component):
    """``fabric.ScratchBanks`` on iCE40UP5K single-port RAMs (one ``SB_SPRAM256KA`` per bank).

    Same ports and timing as the generic banks: read data the cycle after the address, held while ``r_en``
    is low; a cycle either reads or writes (read data is undefined after a write); ``w_en`` has one bit
    per byte (the SPRAM's nibble masks take them in pairs). Simulation cannot run the primitive; simulate
    with ``ScratchBanks``.
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
