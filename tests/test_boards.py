# amaranth: UnusedElaboratable=no
"""Boards and bitstreams: PLL settings, board top levels on their platforms, the build report, the CLI verbs.

``test_icebreaker_bitstream_builds_and_meets_timing`` runs the real yowasp flow (minutes); it is the only
test here that places and routes.
"""

import gc
import json
import os
import re
import stat
from fractions import Fraction

import pytest

from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out
from amaranth.sim import Simulator

from opentsu.boards import BOARDS, UART_BAUD, BoardTop, PLLError, pll_parameters
from opentsu.boards.top import LockReset
from opentsu.boards.pll import OUT_RANGE, PFD_RANGE, VCO_RANGE, PLLParameters
from opentsu.build import (BOARD_NAMES, REPORT_KEYS, BuildError, FitError, _packed_fit_check, build,
                           fastest_clock, make_report, module_breakdown, parse_fabric, parse_module_stats,
                           parse_yosys_cells, yowasp_tools)
from opentsu.cli import main
from opentsu.fabric import PRESETS, FabricConfig, FabricGeometry


def run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# --- PLL ---------------------------------------------------------------------------------------------------

def test_pll_makes_every_multiple_of_3_mhz_exactly_from_12_mhz():
    for mhz in range(36, 133, 3):
        p = pll_parameters(12_000_000, mhz * 1_000_000, exact=True)
        # The output frequency from the divider fields alone, as the data sheet defines it.
        assert Fraction(12_000_000 * (p.divf + 1), (p.divr + 1) * 2 ** p.divq) == mhz * 1_000_000
        assert PFD_RANGE[0] <= p.f_pfd <= PFD_RANGE[1] and VCO_RANGE[0] <= p.f_vco <= VCO_RANGE[1]
        assert 0 <= p.divr <= 15 and 0 <= p.divf <= 127 and 1 <= p.divq <= 6


def test_pll_matches_icepll_for_48_mhz():
    # icepll -i 12 -o 48: DIVR 0, DIVF 63 (0111111), DIVQ 4 (100), FILTER_RANGE 1 (001), VCO 768 MHz.
    p = pll_parameters(12e6, 48e6)
    assert (p.divr, p.divf, p.divq, p.filter_range) == (0, 63, 4, 1)
    assert p.f_vco == 768_000_000


def test_pll_filter_range_follows_the_pfd_frequency():
    assert pll_parameters(12e6, 60e6).filter_range == 1          # PFD 12 MHz
    assert PLLParameters(Fraction(30_000_000), 0, 31, 4).filter_range == 3   # PFD 30 MHz
    assert PLLParameters(Fraction(100_000_000), 0, 7, 1).filter_range == 5   # PFD 100 MHz


def test_pll_closest_and_refusals():
    p = pll_parameters(12e6, 50e6)                   # not exact: 12·(f+1)/2^q never hits 50 MHz on this grid
    assert p.f_out != 50_000_000 and abs(p.f_out - 50_000_000) <= 250_000
    with pytest.raises(PLLError, match="exactly 50 MHz"):
        pll_parameters(12e6, 50e6, exact=True)
    with pytest.raises(PLLError, match="output range"):
        pll_parameters(12e6, 300e6)
    with pytest.raises(PLLError, match="input range"):
        pll_parameters(5e6, 48e6)
    with pytest.raises(PLLError, match="VCO"):
        PLLParameters(Fraction(12_000_000), 0, 10, 1).check()


# --- board top levels on their platforms ---------------------------------------------------------------------

def _rtlil_params(rtlil, cell_type):
    """Parameters of the one instance of ``cell_type`` in an RTLIL text, as integers where binary."""
    match = re.search(rf"cell \\{cell_type} .*?\n(.*?)\n\s*end", rtlil, re.S)
    assert match, f"no {cell_type} in the design"
    params = {}
    for name, width, bits in re.findall(r"parameter \\(\w+) (\d+)'([01]+)", match.group(1)):
        params[name] = int(bits, 2)
    for name, text in re.findall(r'parameter \\(\w+) "([^"]*)"', match.group(1)):
        params[name] = text
    return params


@pytest.mark.parametrize("name", BOARD_NAMES)
def test_board_elaborates_on_its_platform(name):
    board = BOARDS[name]
    top = BoardTop(board)
    plan = board.make_platform().prepare(top, name=f"opentsu_{name}")
    rtlil = plan.files[f"opentsu_{name}.il"]
    pcf = plan.files[f"opentsu_{name}.pcf"]

    # The PLL that goes to synthesis makes exactly the board clock, and the UART divisor is exact.
    primitive = "SB_PLL40_PAD" if board.pll_pad else "SB_PLL40_CORE"
    params = _rtlil_params(rtlil, primitive)
    assert params["FEEDBACK_PATH"] == "SIMPLE"
    f_out = Fraction(12_000_000 * (params["DIVF"] + 1), (params["DIVR"] + 1) * 2 ** params["DIVQ"])
    assert f_out == board.clock_hz == top.clock_hz
    assert OUT_RANGE[0] <= f_out <= OUT_RANGE[1]
    assert params["FILTER_RANGE"] == top.pll_parameters.filter_range
    assert board.clock_hz % UART_BAUD == 0 and top.divisor * UART_BAUD == board.clock_hz

    # The device tells the host the clock and divisor it was built for.
    assert top.device.identity == top.identity
    assert (top.identity.clock_hz, top.identity.divisor) == (board.clock_hz, board.clock_hz // UART_BAUD)
    assert top.identity.trng and top.has_trng and top.identity.lanes == board.fabric.lanes

    # The fabric clock is constrained on the PLL output, at the board clock (nextpnr aims for it).
    assert f"set_frequency clk_fabric {board.clock_hz / 1e6}" in pcf
    # UART pins and one LED per role are placed.
    platform = board.make_platform()
    uart = platform.lookup("uart", 0)
    for sub in uart.ios:
        if sub.name in ("rx", "tx"):
            assert f"set_io uart_0__{sub.name}__io {sub.ios[0].names[0]}" in pcf
    assert pcf.count("set_io led") == len(board.leds) == 4

    # Memories: explicit primitives (no inferred block RAM), SPRAM only on the UP5K.
    assert ("SB_SPRAM256KA" in rtlil) == (board.target == "ice40-up5k")
    assert "cell \\SB_RAM40_4K " in rtlil and "$mem" not in rtlil


def test_boards_report_whether_they_have_the_moment_counters():
    # The HX parts' scratch banks are block RAMs with no room for them (gateware.fabric.Fabric).
    assert {name: BoardTop(board).identity.moments for name, board in BOARDS.items()} == {
        "icebreaker": True, "hx8k": False, "icestick": False}


def test_lock_reset_holds_reset_until_the_pll_has_been_locked_long_enough():
    dut = LockReset(5)
    trace = []

    async def bench(ctx):
        for cycle in range(40):
            ctx.set(dut.lock, 3 <= cycle < 25 or cycle >= 30)
            await ctx.tick()
            trace.append(ctx.get(dut.reset))

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
    # trace[k] is reset after clock edge k + 1. lock rises before edge 4 and leaves the synchroniser after
    # edge 5; the timer then counts 5 cycles and reset falls at edge 11.
    released = trace.index(0)
    assert released == 3 + 2 + 5 and all(trace[:released])
    # lock falls before edge 26, leaves the synchroniser after edge 27: reset again from edge 28 ...
    lost = trace.index(1, released)
    assert lost == 25 + 2 and not any(trace[released:lost])
    # ... until the PLL has been locked again for 5 cycles.
    assert all(trace[lost:30 + 2 + 5]) and trace[30 + 2 + 5:] == [0] * 3
    with pytest.raises(ValueError):
        LockReset(0)


def test_board_top_refuses_clocks_the_uart_or_pll_cannot_make():
    with pytest.raises(ValueError, match="multiple of the baud rate|cannot make"):
        BoardTop(BOARDS["icebreaker"], clock_hz=50_000_000)
    with pytest.raises(PLLError):
        BoardTop(BOARDS["icebreaker"], clock_hz=9_000_000)    # below the PLL's 16 MHz output minimum
    with pytest.raises(TypeError):
        BoardTop("icebreaker")


def test_fastest_clock_steps_down_to_a_uart_exact_pll_clock():
    board = BOARDS["icebreaker"]
    assert fastest_clock(board, 20.05) == 18_000_000
    assert fastest_clock(board, 63.0) == 63_000_000
    assert fastest_clock(board, 71.9) == 69_000_000
    assert fastest_clock(board, 17.5) is None        # 15 MHz is below the PLL's output range


def test_board_names_match_the_registry():
    assert set(BOARD_NAMES) == set(BOARDS)
    assert {b.device for b in BOARDS.values()} == {"iCE40UP5K", "iCE40HX1K", "iCE40HX8K"}


# --- the report ------------------------------------------------------------------------------------------------

NEXTPNR_REPORT = {
    "utilization": {
        "ICESTORM_LC": {"used": 4321, "available": 5280},
        "ICESTORM_RAM": {"used": 30, "available": 30},
        "ICESTORM_SPRAM": {"used": 4, "available": 4},
        "SB_WARMBOOT": {"used": 0, "available": 1},
        "ICESTORM_HFOSC": {"used": 0, "available": 0},
    },
    "fmax": {"clk_fabric": {"achieved": 51.7, "constraint": 48.0}},
    "critical_paths": [{
        "from": "posedge clk_fabric", "to": "posedge clk_fabric",
        "path": [
            {"type": "clk-to-q", "from": {"cell": "a", "port": "CLK"}, "to": {"cell": "a", "port": "O"}, "delay": 0.5},
            {"type": "routing", "from": {"cell": "a", "port": "O"}, "to": {"cell": "b", "port": "I0"}, "delay": 2.0,
             "net": "n1"},
            {"type": "logic", "from": {"cell": "b", "port": "I0"}, "to": {"cell": "b", "port": "O"}, "delay": 0.4},
            {"type": "routing", "from": {"cell": "b", "port": "O"}, "to": {"cell": "c", "port": "I3"}, "delay": 1.1,
             "net": "n2"},
            {"type": "setup", "from": {"cell": "c", "port": "I3"}, "to": {"cell": "c", "port": "D"}, "delay": 0.3},
        ],
    }],
}


def _report(board="icebreaker", nextpnr=NEXTPNR_REPORT, clock_hz=48_000_000):
    top = BoardTop(BOARDS[board], clock_hz=clock_hz)
    return top, make_report(board=BOARDS[board], top=top, nextpnr_report=nextpnr, yosys_cells={"SB_LUT4": 4000},
                            seconds={"total": 90.0}, versions={"yosys": "Yosys 0.70"}, bitstream="x.bin")


def test_report_has_the_contract_keys_and_derived_values():
    top, report = _report()
    assert set(REPORT_KEYS) <= set(report)
    assert report["board"] == "icebreaker" and report["device"] == "iCE40UP5K-SG48"
    assert report["clock_mhz"] == 48.0 and report["fmax_mhz"] == 51.7 and report["timing_met"]
    upc = FabricGeometry(BOARDS["icebreaker"].fabric).updates_per_cycle
    assert report["updates_per_cycle"] == upc
    assert report["flips_per_ns"] == pytest.approx(upc * 48.0 / 1000)
    # Resources the part has are listed with their capacity; absent ones are left out.
    assert report["utilization"]["ICESTORM_LC"] == {"used": 4321, "available": 5280}
    assert "ICESTORM_HFOSC" not in report["utilization"]
    assert "16×16 torus" in report["reference_layer"] and "degree 8" in report["reference_layer"]
    assert report["critical_path"]["delay_ns"] == pytest.approx(4.3)
    assert report["critical_path"]["logic_levels"] == 1
    assert report["critical_path"]["routing_ns"] == pytest.approx(3.1)
    assert (report["critical_path"]["start"], report["critical_path"]["end"]) == ("a", "c")
    assert report["pll"]["divf"] == 63 and report["uart"] == {"baud": 3_000_000, "divisor": 16}
    json.dumps(report)   # serialisable as it stands


def test_report_flags_a_missed_clock_and_refuses_a_missing_constraint():
    missed = dict(NEXTPNR_REPORT, fmax={"clk_fabric": {"achieved": 41.0, "constraint": 48.0}})
    assert not _report(nextpnr=missed)[1]["timing_met"]
    wrong = dict(NEXTPNR_REPORT, fmax={"clk12_0__io": {"achieved": 200.0, "constraint": 12.0}})
    with pytest.raises(BuildError, match="no clock constrained at 48 MHz"):
        _report(nextpnr=wrong)


def test_report_follows_a_clock_override():
    _, report = _report(nextpnr=dict(NEXTPNR_REPORT, fmax={"clk_fabric": {"achieved": 66.2, "constraint": 60.0}}),
                        clock_hz=60_000_000)
    assert report["clock_mhz"] == 60.0 and report["uart"]["divisor"] == 20
    assert report["flips_per_ns"] == pytest.approx(report["updates_per_cycle"] * 0.06)
    # A period nextpnr rounds to whole picoseconds: 96 MHz is constrained as 1/10.416 ns.
    _, report = _report(nextpnr=dict(NEXTPNR_REPORT, fmax={"clk_fabric": {"achieved": 97.7, "constraint": 96.0096}}),
                        clock_hz=96_000_000)
    assert report["clock_mhz"] == 96.0 and report["fmax_mhz"] == 97.7 and report["timing_met"]


YOSYS_LOG = """
2.50. Printing statistics.

=== top ===

        +----------Local Count, excluding submodules.
        |
       78 cells
       37   $scopeinfo
        6   SB_IO
       30   SB_RAM40_4K
     9579 submodules
     1592   SB_CARRY
     2541   SB_DFFESR
       49   SB_DFFSR
     5393   SB_LUT4

=== design hierarchy ===
     5393   SB_LUT4
"""


def test_yosys_statistics_parse():
    assert parse_yosys_cells(YOSYS_LOG) == {"SB_IO": 6, "SB_RAM40_4K": 30, "SB_CARRY": 1592, "SB_DFFESR": 2541,
                                            "SB_DFFSR": 49, "SB_LUT4": 5393}
    modules = parse_module_stats(YOSYS_LOG.replace("=== top ===", "=== top.fabric ==="))
    assert modules == {"top.fabric": parse_yosys_cells(YOSYS_LOG)}


def _counter_rtlil(path):
    """RTLIL of a top module ``t`` with one submodule ``t.count``: a 6-bit counter with an enable."""
    from amaranth.back import rtlil
    from amaranth.hdl import Module, Signal

    class Counter(wiring.Component):
        en: In(1)
        value: Out(6)

        def elaborate(self, platform):
            m = Module()
            with m.If(self.en):
                m.d.sync += self.value.eq(self.value + 1)
            return m

    class Top(wiring.Component):
        en: In(1)
        value: Out(6)

        def elaborate(self, platform):
            m = Module()
            m.submodules.count = count = Counter()
            m.d.comb += [count.en.eq(self.en), self.value.eq(count.value)]
            return m

    top = Top()
    path.write_text(rtlil.convert(top, name="t", ports=[top.en, top.value]))
    return str(path)


def _yosys_wrapper(tmp_path, fail_unless):
    """A stand-in yosys that fails like yowasp's ABC crash unless the script contains ``fail_unless``."""
    script = tmp_path / "yosys"
    script.write_text(f"#!/bin/sh\ngrep -q -- '{fail_unless}' breakdown.ys || {{ echo 'ABC: crashed' >&2; exit 1; }}\n"
                      f"exec {yowasp_tools()['yosys']} \"$@\"\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return {"yosys": str(script)}


def test_module_breakdown_counts_each_module_and_falls_back_when_abc_fails(tmp_path):
    il = _counter_rtlil(tmp_path / "design.il")
    rows = {r["module"]: r for r in module_breakdown(il, "t", device="u")}
    # The counter's six state bits are six flip-flops, all inside t.count; the top only wires them.
    assert rows["t.count"]["FF"] == 6 and rows["t"]["FF"] == 6
    assert rows["t"]["LUT4"] >= rows["t.count"]["LUT4"] > 0
    assert {r["mapping"] for r in rows.values()} == {"abc9"}
    # yowasp's ABC crashes on some unflattened designs: the rows then come from yosys's own LUT mapping.
    fallback = {r["module"]: r for r in module_breakdown(il, "t", _yosys_wrapper(tmp_path, "-noabc"), device="u")}
    assert {r["mapping"] for r in fallback.values()} == {"yosys"}
    assert fallback["t.count"]["FF"] == 6 and fallback["t.count"]["LUT4"] > 0
    with pytest.raises(BuildError, match="abc9: ABC: crashed; yosys: ABC: crashed"):
        module_breakdown(il, "t", _yosys_wrapper(tmp_path, "no such option"), device="u")


def test_packer_overflow_is_a_fit_error():
    log = ("Info: Packing LUT-FFs..\nInfo:     3558 LCs used as LUT4 only\nInfo:     1102 LCs used as DFF only\n"
           "Info: Device utilisation:\nInfo: \t         ICESTORM_LC:    6656/   5280   126%\n"
           "Info: \t        ICESTORM_RAM:      30/     30   100%\nERROR: Failed to expand region\n")
    with pytest.raises(FitError, match="6656 ICESTORM_LC of 5280.*1102 LCs used as DFF only"):
        _packed_fit_check(BOARDS["icebreaker"], log)
    _packed_fit_check(BOARDS["icebreaker"], log.replace("6656/", "5000/"))   # fits: no error


def test_fabric_specs_parse():
    assert parse_fabric("icebreaker") == PRESETS["icebreaker"]
    assert parse_fabric("16x16:0,1;2,1:4:8") == FabricConfig(16, 16, ((0, 1), (2, 1)), lanes=4, layers=8)
    assert parse_fabric("8x8:0,1:2") == FabricConfig(8, 8, ((0, 1),), lanes=2, layers=1)
    with pytest.raises(ValueError, match="neither a preset"):
        parse_fabric("16x16")


# --- command line ----------------------------------------------------------------------------------------------

def test_build_usage_errors_exit_2_and_leave_nothing(tmp_path, capsys):
    out = tmp_path / "b"
    for argv, message in [
        (["build", "--board", "nope"], "invalid choice"),
        (["build", "--board", "icebreaker", "-o", str(out), "--clock-mhz", "50"], "50 MHz"),
        (["build", "--board", "icebreaker", "-o", str(out), "--fabric", "16x16"], "neither a preset"),
        (["build", "--board", "icebreaker", "-o", str(tmp_path / "missing" / "b")], "does not exist"),
    ]:
        code, _, err = run(argv, capsys)
        assert code == 2 and message in err and err.count("\n") == 1, (argv, err)
    assert os.listdir(tmp_path) == []


def test_build_of_a_design_too_big_exits_1_and_leaves_nothing(tmp_path, capsys):
    # The iCEBreaker's full fabric on the iCEstick's HX1K: the fit check stops it after synthesis.
    code, _, err = run(["build", "--board", "icestick", "--fabric", "icebreaker", "-o", str(tmp_path / "b"), "-q"],
                       capsys)
    assert code == 1 and "does not fit the iCE40HX1K" in err
    assert os.listdir(tmp_path) == []


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_build_reports_an_elaboration_failure_and_leaves_nothing(tmp_path, monkeypatch):
    import opentsu.boards.top
    from opentsu.gateware.device import Device
    from opentsu.gateware.uart import UARTRx

    class BrokenDevice(Device):
        def elaborate(self, platform):
            UARTRx(4)                      # made, then abandoned by the failure: must not warn
            raise RuntimeError("boom")

    monkeypatch.setattr(opentsu.boards.top, "Device", BrokenDevice)
    with pytest.raises(BuildError, match="^elaboration failed: RuntimeError: boom$"):
        build("icebreaker", str(tmp_path / "b"))
    assert os.listdir(tmp_path) == []
    gc.collect()    # any abandoned part of the design would warn now, and the warning fails the test


def _fake_tool(directory, name):
    path = directory / name
    path.write_text(f'#!/bin/sh\necho "$@" > "{directory}/{name}.args"\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return directory / f"{name}.args"


def test_flash_uses_iceprog_then_openfpgaloader(tmp_path, capsys, monkeypatch):
    bitstream = tmp_path / "x.bin"
    bitstream.write_bytes(b"\0" * 16)
    tools = tmp_path / "bin"
    tools.mkdir()
    monkeypatch.setenv("PATH", str(tools))
    ofl_args = _fake_tool(tools, "openFPGALoader")
    code, out, err = run(["flash", "--board", "icebreaker", "--bitstream", str(bitstream)], capsys)
    assert code == 0, err
    assert ofl_args.read_text().split() == ["-b", "icebreaker", str(bitstream)]
    iceprog_args = _fake_tool(tools, "iceprog")
    code, out, err = run(["flash", "--board", "icestick", "--bitstream", str(bitstream)], capsys)
    assert code == 0 and "iceprog" in out
    assert iceprog_args.read_text().split() == [str(bitstream)]


def test_flash_without_a_programmer_or_a_bitstream(tmp_path, capsys, monkeypatch):
    bitstream = tmp_path / "x.bin"
    bitstream.write_bytes(b"\0")
    monkeypatch.setenv("PATH", str(tmp_path))
    code, _, err = run(["flash", "--board", "icebreaker", "--bitstream", str(bitstream)], capsys)
    assert code == 1 and "neither iceprog nor openFPGALoader" in err
    code, _, err = run(["flash", "--board", "hx8k", "-i", str(tmp_path / "none")], capsys)
    assert code == 2 and "opentsu build --board hx8k" in err


def test_export_verilog(tmp_path, capsys):
    out = tmp_path / "d.v"
    code, stdout, err = run(["export-verilog", "--fabric", "8x8:0,1:2:1", "--clock-mhz", "12", "-o", str(out)],
                            capsys)
    assert code == 0, err
    text = out.read_text()
    assert re.search(r"^module opentsu_device\(", text, re.M)
    for port in ("clk", "rst", "rx", "tx", "running", "error"):
        assert re.search(rf"^\s*(input|output) (reg )?{port};", text, re.M), port
    assert "SB_" not in text     # generic memories only
    assert out.stat().st_mode & 0o777 == 0o666 & ~_umask()
    code, _, err = run(["export-verilog", "--fabric", "8x8", "-o", str(tmp_path / "e.v")], capsys)
    assert code == 2 and not (tmp_path / "e.v").exists()
    code, _, err = run(["export-verilog", "--board", "icestick", "--clock-mhz", "50", "-o", str(tmp_path / "e.v")],
                       capsys)
    assert code == 2 and not (tmp_path / "e.v").exists()


# --- the real build ----------------------------------------------------------------------------------------------

def test_icebreaker_bitstream_builds_and_meets_timing(tmp_path):
    """The whole yowasp flow for the iCEBreaker board's default design, as CI and `make demo` run it."""
    out = tmp_path / "icebreaker"
    report = build("icebreaker", str(out))
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == report
    assert set(REPORT_KEYS) <= set(report)
    board = BOARDS["icebreaker"]
    assert report["timing_met"] and report["fmax_mhz"] >= report["clock_mhz"] == board.clock_hz / 1e6
    assert report["fabric"]["lanes"] == board.fabric.lanes and "degree 8" in report["reference_layer"]
    pll = report["pll"]
    assert 12e6 * (pll["divf"] + 1) / ((pll["divr"] + 1) * 2 ** pll["divq"]) == board.clock_hz
    assert "nextpnr" in report["tools"]["nextpnr-ice40"] and report["tools"]["yosys"].startswith("Yosys")
    assert report["flips_per_ns"] == pytest.approx(report["updates_per_cycle"] * report["clock_mhz"] / 1000)
    lc = report["utilization"]["ICESTORM_LC"]
    assert 0 < lc["used"] <= lc["available"] == 5280
    assert report["utilization"]["ICESTORM_SPRAM"]["used"] >= 1
    bitstream = out / report["bitstream"]
    assert bitstream.stat().st_size > 100_000    # an UP5K image is ~104 kB
    assert sorted(os.listdir(out)) == sorted(["report.json", "opentsu_icebreaker.bin", "nextpnr-report.json",
                                              "yosys.log", "nextpnr.log"])
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []
    assert (out / "report.json").stat().st_mode & 0o777 == 0o666 & ~_umask()
