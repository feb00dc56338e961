"""The moving torus: the fabric's spins in flip-flops, rotated by ``v`` on demand, read and written only at
the lanes' fixed stations (``opentsu.fabric.FabricGeometry``)."""

from amaranth import *
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from opentsu.fabric import FabricGeometry

__all__ = ["SpinTorus"]


class SpinTorus(wiring.Component):
    """Spins of a ``rows × cols`` torus, all +1 after reset (the emulator's initial state too).

    Elaborated for a platform (hardware), every spin is a one-bit signal of its own; with ``platform=None``
    (simulation, Verilog export) each row is one ``cols``-bit signal, which simulators rotate as a word.

    Ports (per lane ℓ; station indices refer to ``geometry.lane_stations[ℓ]``)
    -----
    rotate : In(1)
        At the end of the cycle every flip-flop at ``p`` takes the value at ``p + v``.
    sel_a : In(ArrayLayout(sel, lanes)), shift_a : In(lanes), neighbours : Out(ArrayLayout(degree, lanes))
        Bit d of ``neighbours[ℓ]`` is 1 when the spin at ``station[sel_a[ℓ]] + offset_d`` is +1; with
        ``shift_a[ℓ]`` high, the spin at ``station[sel_a[ℓ]] + offset_d + v``, which the next rotation
        brings to ``station + offset_d``.
    sel_r : In(ArrayLayout(sel, lanes)), here : Out(lanes)
        Bit ℓ of ``here`` is the spin at ``station[sel_r[ℓ]]``.
    write, value : In(lanes), sel_w : In(ArrayLayout(sel, lanes))
        With ``rotate`` and ``write[ℓ]`` high, the flip-flop at ``station[sel_w[ℓ]] - latency·v`` takes
        ``value[ℓ]`` instead of its rotated value (the node read ``latency`` rotations earlier lands there).
    """

    def __init__(self, geometry: FabricGeometry):
        self._g = geometry
        self._sel_bits = max(1, (max(max(len(s) for s in geometry.lane_stations), 1) - 1).bit_length())
        L = geometry.lanes
        super().__init__({
            "rotate": In(1),
            "sel_a": In(data.ArrayLayout(self._sel_bits, L)),
            "shift_a": In(L),
            "neighbours": Out(data.ArrayLayout(geometry.degree, L)),
            "sel_r": In(data.ArrayLayout(self._sel_bits, L)),
            "here": Out(L),
            "write": In(L),
            "value": In(L),
            "sel_w": In(data.ArrayLayout(self._sel_bits, L)),
        })

    @property
    def sel_bits(self) -> int:
        return self._sel_bits

    def elaborate(self, platform):
        m = Module()
        g = self._g
        rows, cols, v, P = g.rows, g.cols, g.v, g.latency
        if platform is None:
            # Simulation: a row of spins per signal, which a simulator rotates in a few word operations
            # rather than as rows × cols one-bit registers.
            packed = [Signal(cols, init=(1 << cols) - 1, name=f"row_{r}") for r in range(rows)]
            spins = [[packed[r][c] for c in range(cols)] for r in range(rows)]
        else:
            packed = None
            spins = [[Signal(init=1, name=f"s_{r}_{c}") for c in range(cols)] for r in range(rows)]

        def at(r, c):
            return spins[r % rows][c % cols]

        def tap(lane, select, offset, shift=None):
            """The spin at ``station[select] + offset`` (``+ v`` with ``shift``), as a balanced tree of
            two-way multiplexers on the bits of ``Cat(select, shift)``."""
            stations = g.lane_stations[lane]
            if not stations:  # a lane the schedule never uses
                return Const(0, 1)
            options = [at(st[0] + offset[0], st[1] + offset[1]) for st in stations]
            options += options[-1:] * ((1 << len(select)) - len(options))
            index = select
            if shift is not None:
                options += [at(st[0] + offset[0] + v[0], st[1] + offset[1] + v[1]) for st in stations]
                options += options[-1:] * ((2 << len(select)) - len(options))
                index = Cat(select, shift)
            for bit in index:
                options = [Mux(bit, options[k + 1], options[k]) for k in range(0, len(options), 2)]
            return options[0]

        for lane in range(g.lanes):
            m.d.comb += self.neighbours[lane].eq(Cat(*(tap(lane, self.sel_a[lane], o, self.shift_a[lane])
                                                       for o in g.offsets)))
            m.d.comb += self.here[lane].eq(tap(lane, self.sel_r[lane], (0, 0)))

        writers = {}
        for lane in range(g.lanes):
            for k, st in enumerate(g.lane_stations[lane]):
                pos = ((st[0] - P * v[0]) % rows, (st[1] - P * v[1]) % cols)
                writers.setdefault(pos, []).append((self.write[lane] & (self.sel_w[lane] == k), self.value[lane]))
        with m.If(self.rotate):
            for r in range(rows):
                if packed is not None:
                    m.d.sync += packed[r].eq(packed[(r + v[0]) % rows].rotate_right(v[1] % cols))
                for c in range(cols):
                    if packed is None:
                        m.d.sync += spins[r][c].eq(at(r + v[0], c + v[1]))
                    for enable, value in writers.get((r, c), []):
                        with m.If(enable):
                            m.d.sync += spins[r][c].eq(value)
        return m
