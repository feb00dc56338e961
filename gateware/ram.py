"""Simple dual-port RAMs with one timing on every target.

``target="generic"`` uses ``amaranth.lib.memory.Memory`` (simulation, other FPGAs). ``target="ice40"``
instantiates ``SB_RAM40_4K`` blocks in 256×16 mode directly: yosys would otherwise wrap inferred block
RAMs in read-first collision logic (about one LUT and two flip-flops per data bit), which the fabric
does not need because it never reads a word in the cycle it writes it.
"""

from amaranth import *
from amaranth.lib import wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

__all__ = ["RAM", "TARGETS", "EBR_DEPTH", "EBR_WIDTH"]

TARGETS = ("generic", "ice40")
#: Rows and bits of one iCE40 EBR in 256×16 mode.
EBR_DEPTH, EBR_WIDTH = 256, 16


def _ebr_address(addr):
    low = addr[:8]
    return Cat(low, Const(0, 11 - len(low)))


class RAM(wiring.Component):
    """``depth`` words of ``width`` bits; writes in granules of ``granularity`` bits.

    Ports
    -----
    r_addr, r_en : In   read data appears on ``r_data`` the cycle after ``r_en`` (held while ``r_en`` is low)
    r_data : Out(width)
    w_addr, w_data : In
    w_en : In(width // granularity)   one enable per granule, written at the end of the cycle

    Reading and writing the same word in one cycle gives an undefined read value. ``init`` gives the
    words' initial values (the rest are 0); with ``w_en`` tied low the RAM is a ROM.
    """

    def __init__(self, width: int, depth: int, granularity: int | None = None, target: str = "generic",
                 init=()):
        granularity = granularity or width
        if width < 1 or depth < 1 or width % granularity:
            raise ValueError(f"bad RAM shape: width {width}, depth {depth}, granularity {granularity}")
        if target not in TARGETS:
            raise ValueError(f"unknown RAM target {target!r}; choose from {TARGETS}")
        init = [int(word) for word in init]
        if len(init) > depth or any(not 0 <= word < 1 << width for word in init):
            raise ValueError(f"RAM init {init!r} does not fit {depth} words of {width} bits")
        self._width, self._depth, self._granularity, self._target = width, depth, granularity, target
        self._init = init
        super().__init__({
            "r_addr": In(range(depth)),
            "r_en": In(1),
            "r_data": Out(width),
            "w_addr": In(range(depth)),
            "w_data": In(width),
            "w_en": In(width // granularity),
        })

    @property
    def blocks(self) -> int:
        """EBRs used on iCE40."""
        return -(-self._width // EBR_WIDTH) * -(-self._depth // EBR_DEPTH)

    def elaborate(self, platform):
        m = Module()
        if self._target == "generic":
            mem = Memory(shape=self._width, depth=self._depth, init=self._init)
            m.submodules.mem = mem
            rd = mem.read_port()
            wr = mem.write_port(granularity=self._granularity)
            m.d.comb += [rd.addr.eq(self.r_addr), rd.en.eq(self.r_en), self.r_data.eq(rd.data),
                         wr.addr.eq(self.w_addr), wr.data.eq(self.w_data), wr.en.eq(self.w_en)]
            return m
        bit_enable = Cat(*(self.w_en[bit // self._granularity] for bit in range(self._width)))
        columns = -(-self._width // EBR_WIDTH)
        rows = -(-self._depth // EBR_DEPTH)
        padded = columns * EBR_WIDTH
        pad = padded - self._width
        wdata = Cat(self.w_data, Const(0, pad)) if pad else self.w_data
        wmask = Cat(~bit_enable, Const((1 << pad) - 1, pad)) if pad else ~bit_enable
        row_bits = max(0, (rows - 1).bit_length())
        read_row = Signal(max(1, row_bits))
        with m.If(self.r_en):
            m.d.sync += read_row.eq(self.r_addr[8:8 + row_bits] if row_bits else 0)
        rdata = Signal(padded)
        for row in range(rows):
            selected_w = (self.w_addr[8:8 + row_bits] == row) if row_bits else Const(1, 1)
            selected_r = (self.r_addr[8:8 + row_bits] == row) if row_bits else Const(1, 1)
            row_data = Signal(padded, name=f"row{row}_data")
            for col in range(columns):
                bits = slice(col * EBR_WIDTH, (col + 1) * EBR_WIDTH)
                words = [(word >> bits.start) & ((1 << EBR_WIDTH) - 1)
                         for word in self._init[row * EBR_DEPTH:(row + 1) * EBR_DEPTH]]
                inits = {f"p_INIT_{k:X}": Const(sum(word << (EBR_WIDTH * j) for j, word in
                                                    enumerate(words[16 * k:16 * (k + 1)])), 256)
                         for k in range(16) if any(words[16 * k:16 * (k + 1)])}
                m.submodules[f"ebr_{row}_{col}"] = Instance(
                    "SB_RAM40_4K",
                    p_READ_MODE=0, p_WRITE_MODE=0, **inits,
                    i_RADDR=_ebr_address(self.r_addr), i_RCLK=ClockSignal(),
                    i_RCLKE=self.r_en & selected_r, i_RE=Const(1, 1), o_RDATA=row_data[bits],
                    i_WADDR=_ebr_address(self.w_addr), i_WDATA=wdata[bits], i_MASK=wmask[bits],
                    i_WCLK=ClockSignal(), i_WCLKE=bit_enable[bits.start:min(bits.stop, self._width)].any() & selected_w,
                    i_WE=Const(1, 1),
                )
            with m.If(read_row == row):
                m.d.comb += rdata.eq(row_data)
        m.d.comb += self.r_data.eq(rdata[:self._width])
        return m
