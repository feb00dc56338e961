"""``opentsu selftest``: bring-up checks of a device over its link, for a board just flashed.

Each check drives the device through the host driver (``link.Device``) and compares what comes back with a
known answer: words read back against the words written, samples and on-chip moments bit for bit against
the emulator running the same program, seeds and sequence. The program is made here, at random, for the
fabric the device reports (every layer it holds, couplings, biases, conditioning weights and clamps), so the
check needs no file and exercises every weight, parameter and clamp bank. It overwrites the device's
memories: a run after it loads its own program, as every run does.

Exit status of the command: 0 every check passed; 1 a check failed or the device failed (``--json`` still
writes the results of the checks that ran); 2 bad usage, with nothing written.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["Check", "format_check", "random_program", "selftest_sequence", "run_checks", "register"]

#: Sweeps each layer runs in the sampling check, and the samples the moment check counts.
SWEEPS_PER_LAYER = 3
MOMENT_SAMPLES = 200


@dataclass(frozen=True)
class Check:
    """One check's outcome: ``passed`` is None when the device lacks the feature (skipped)."""

    name: str
    passed: bool | None
    detail: str


def format_check(check: Check) -> str:
    """One line: PASS, FAIL or skip, the check's name and what it found."""
    return f"{ {True: 'PASS', False: 'FAIL', None: 'skip'}[check.passed]}  {check.name:9s} {check.detail}"


def random_program(geometry, seed: int):
    """A program of random layers for ``geometry``'s fabric, one per layer it holds: couplings on every edge
    and biases in [-1, 1], conditioning weights in [-1/2, 1/2] and a few clamped nodes, all multiples of 1/8,
    so nothing is rounded and the device holds exactly the program's codes."""
    from .compiler import FloatLayer, compile_layers
    from .topology import Grid
    cfg = geometry.config
    grid = Grid(cfg.rows, cfg.cols, tuple(tuple(j) for j in cfg.jumps), torus=True)
    rng = np.random.default_rng(seed)
    eighths = lambda low, high, size: rng.integers(8 * low, 8 * high + 1, size=size) / 8   # noqa: E731
    edges, clamped = grid.edges, max(1, grid.n // 32)
    layers = []
    for _ in range(cfg.layers):
        J = np.zeros((grid.n, grid.n))
        J[edges[:, 0], edges[:, 1]] = eighths(-1, 1, len(edges))
        J[edges[:, 1], edges[:, 0]] = J[edges[:, 0], edges[:, 1]]
        clamp = np.zeros(grid.n, dtype=np.int8)
        clamp[rng.choice(grid.n, size=clamped, replace=False)] = rng.choice((-1, 1), size=clamped)
        layers.append(FloatLayer(h=eighths(-1, 1, grid.n), J=J, c=eighths(-0.5, 0.5, grid.n), clamp=clamp))
    return compile_layers(grid, layers, fabric=cfg)


def selftest_sequence(layers: int):
    """Every layer in turn from one random start, a capture after each: ``LOAD 0, RANDOMIZE`` then, per
    layer ``k``, ``LOAD k, SWEEP 3, CAPTURE 1``. Layer k's conditioning input is the state layer k-1 left,
    as in a DTM chain."""
    from .sequence import Op, Opcode
    ops = [Op(Opcode.LOAD, 0), Op(Opcode.RANDOMIZE)]
    for layer in range(layers):
        ops += [Op(Opcode.LOAD, layer), Op(Opcode.SWEEP, SWEEPS_PER_LAYER), Op(Opcode.CAPTURE, 1)]
    return ops


def _emulate(program, ops, seed: int, chain: int):
    """The emulator's captures (fabric nodes) and moments for one chain."""
    from .emulator import Emulator
    emu = Emulator(program, chains=1, seed=seed, first_chain=chain)
    try:
        return emu.run(ops, full=True)[0], emu.moments
    finally:
        emu.close()


def _contiguous(offsets) -> list[tuple[int, int]]:
    """``(first, count)`` of each run of consecutive values in the sorted ``offsets``."""
    runs = []
    for offset in offsets:
        if runs and runs[-1][0] + runs[-1][1] == offset:
            runs[-1][1] += 1
        else:
            runs.append([offset, 1])
    return [tuple(run) for run in runs]


def _first_difference(got: np.ndarray, want: np.ndarray) -> str:
    index = tuple(int(i) for i in np.argwhere(got != want)[0])
    return f"{int((got != want).sum())} of {got.size} differ, the first at {index}"


def run_checks(device, seed: int = 1, log=None) -> list[Check]:
    """Run every check on an open ``link.Device``; ``log(check)`` hears each as it finishes. Raises only
    what the driver raises when the link itself fails (``LinkError``, ``DeviceRejected``)."""
    from .devicemap import Region, program_writes, sequence_writes
    from .fabric import FabricGeometry
    from .link import EntropyAlarm
    from .protocol import Flags
    from .sequence import Op, Opcode

    checks = []

    def record(name, passed, detail):
        checks.append(Check(name, passed, detail))
        if log is not None:
            log(checks[-1])

    ident = device.identity
    geometry = FabricGeometry(ident.config())
    features = ", ".join(name for name, on in (("TRNG", ident.trng), ("on-chip moments", ident.moments)) if on)
    record("identity", True, f"{geometry.describe()}; {ident.clock_hz / 1e6:g} MHz, "
                             f"{ident.clock_hz / ident.divisor / 1e6:g} Mbaud; {features or 'no optional features'}")

    device.reset()
    # What the host saw before (a previous session's stale bytes, say) is not this device's link health.
    resent, garbage = device.link.resent, device.link.garbage
    program = random_program(geometry, seed)
    device.load_program(program)
    written = {offset: word for region, offset, word in program_writes(program) if region is Region.PARAMS}
    offsets = sorted(written)
    got = {}
    for first, count in _contiguous(offsets):      # the region has holes the device does not answer for
        got.update(zip(range(first, first + count), device.read_words(Region.PARAMS, first, count)))
    wrong = [offset for offset in offsets if got[offset] != written[offset]]
    record("memory", not wrong,
           f"{len(program.layers)} layers loaded; {len(offsets)} PARAMS words read back" +
           (f": {len(wrong)} differ, the first at offset {wrong[0]} ({got[wrong[0]]:#06x}, wrote "
            f"{written[wrong[0]]:#06x})" if wrong else ", identical"))

    ops = sampling_ops = selftest_sequence(len(program.layers))
    chain = 3
    captured = device.run(program, ops, seed=seed, chain=chain)
    expected, _ = _emulate(program, ops, seed, chain)
    same = captured.shape == expected.shape and np.array_equal(captured, expected)
    record("sampling", same,
           f"{len(program.layers)} layers × {SWEEPS_PER_LAYER} sweeps, {len(expected)} captures of "
           f"{geometry.n} spins: " + ("bit for bit the emulator's" if same else
                                      _first_difference(captured, expected) if captured.shape == expected.shape
                                      else f"shape {captured.shape}, expected {expected.shape}"))

    stored = [word for _, _, word in sorted(sequence_writes(ops))]
    back = device.read_words(Region.SEQUENCE, 0, len(stored))
    record("sequence", back == stored, f"{len(stored)} sequence words read back" +
           (", identical" if back == stored else f": {sum(a != b for a, b in zip(back, stored))} differ"))

    if ident.moments:
        # The layer is LOADed again after RANDOMIZE: its conditioning input is then this run's random state.
        ops = [Op(Opcode.LOAD, 0), Op(Opcode.RANDOMIZE), Op(Opcode.LOAD, 0), Op(Opcode.SWEEP, 2),
               Op(Opcode.ACCUMULATE, MOMENT_SAMPLES)]
        device.run(program, ops, seed=seed, chain=chain + 1)
        counted = device.read_moments(program)
        _, expected = _emulate(program, ops, seed, chain + 1)
        same = counted == expected
        record("moments", same, f"{MOMENT_SAMPLES} samples counted on chip: " +
               ("the emulator's counts exactly" if same else "the counts differ from the emulator's"))
    else:
        record("moments", None, "this device has no on-chip moment counters")

    if ident.trng:
        # The sampling check's run again with the TRNG mixed in: the chain must leave the PRNG's streams.
        try:
            mixed = device.run(program, sampling_ops, seed=seed, chain=chain, entropy="trng")
            differ = int((mixed != captured).sum())
        except EntropyAlarm:
            differ = None
        status = device.status()
        alarm = bool(device.flags & Flags.TRNG_ALARM)
        record("trng", not alarm and status.trng_failures == 0 and bool(differ),
               f"health-test alarm {'raised' if alarm else 'clear'}, {status.trng_failures} failures counted; "
               + ("the mixed run was discarded" if differ is None else
                  f"mixed into the lanes, the same run ends {differ} of {captured.size} spins away from the "
                  "PRNG-only one"))
    else:
        status = device.status()
        record("trng", None, "this device has no TRNG")

    errors = {"CRC errors": status.crc_errors, "framing errors": status.framing_errors,
              "overruns": status.overruns, "timeouts": status.timeouts, "rejected frames": status.rejected}
    resent, garbage = device.link.resent - resent, device.link.garbage - garbage
    clean = not any(errors.values()) and not device.flags & Flags.LINK_ERROR and not resent and not garbage
    record("link", clean, ", ".join(f"{count} {name}" for name, count in errors.items()) +
           f" since the last STATUS; host: {resent} requests resent, {garbage} stray bytes during the checks")
    return checks


# --------------------------------------------------------------------------------------------------
# command line

def _open(args):
    """(transport, description) for the backend the arguments name."""
    from .backends import SIM_CLOCK_HZ, SIM_DIVISOR, BOARD_BAUD, transport_for_geometry
    from .fabric import PRESETS, FabricGeometry
    if args.backend == "board":
        return transport_for_geometry("board", None, args.port), f"board on {args.port} ({BOARD_BAUD} baud)"
    geometry = FabricGeometry(PRESETS[args.fabric])
    return (transport_for_geometry(args.backend, geometry, None),
            f"the {args.fabric} device in Verilator ({SIM_CLOCK_HZ / 1e6:g} MHz, divisor {SIM_DIVISOR})")


def cmd_selftest(args):
    from .backends import BOARD_TIMEOUT, SIM_TIMEOUT, check_port
    from .cli import DeviceError, UsageError, _check_output
    from .fabric import PRESETS
    from .fileio import atomic_write
    from .link import Device, DeviceRejected, LinkError
    check_port(args.backend, args.port)
    if args.backend != "board" and args.port:
        raise UsageError(f"--port is for --backend board, not {args.backend}")
    if args.backend != "board" and args.fabric not in PRESETS:
        raise UsageError(f"unknown fabric {args.fabric!r}; choose from {', '.join(PRESETS)}")
    if args.json is not None:
        _check_output(args.json)
    try:
        transport, where = _open(args)
    except (LinkError, DeviceRejected) as exc:
        raise DeviceError(f"cannot open the {args.backend} device: {exc}") from None
    def show(check):
        print(f"  {format_check(check)}", flush=True)

    start = time.perf_counter()
    print(f"opentsu selftest: {where}")
    try:
        device = Device(transport, timeout=BOARD_TIMEOUT if args.backend == "board" else SIM_TIMEOUT)
        checks = run_checks(device, seed=args.seed, log=show)
    except (LinkError, DeviceRejected) as exc:
        raise DeviceError(f"{where}: {exc}") from None
    finally:
        transport.close()
    failed = [check.name for check in checks if check.passed is False]
    ran = sum(check.passed is not None for check in checks)
    if args.json is not None:
        with atomic_write(args.json) as f:
            f.write(json.dumps({"device": where, "passed": not failed, "seconds": round(time.perf_counter() - start, 2),
                                "checks": [asdict(check) for check in checks]}, indent=1).encode())
    if failed:
        raise DeviceError(f"{len(failed)} of {ran} checks failed: {', '.join(failed)}")
    print(f"all {ran} checks passed in {time.perf_counter() - start:.1f} s", file=sys.stderr)


def register(sub):
    """Add ``selftest`` to the ``opentsu`` subcommand parser ``sub``."""
    from .cli import _positive
    p = sub.add_parser("selftest", help="bring-up checks of a device: memories, sampling and moments against "
                                        "the emulator, TRNG and link health")
    p.add_argument("--backend", choices=("board", "verilator"), default="board",
                   help="board (default; needs --port), or the device compiled by Verilator")
    p.add_argument("--port", help="serial port of the board")
    p.add_argument("--fabric", default="icebreaker", help="fabric preset of the Verilator device")
    p.add_argument("--seed", type=_positive("seed"), default=1, help="seed of the random program and the lanes")
    p.add_argument("--json", metavar="FILE.json", help="also write the results as JSON")
    p.set_defaults(func=cmd_selftest)
