"""Sampling backends other than the reference emulator: the simulated board and a real board.

Both drive a device through ``opentsu.link.Device``, the same host driver, and differ only in the transport:
``sim`` builds ``gateware.device.Device`` for the program's geometry and simulates it bit by bit at its UART
pins (``link.SimTransport``); ``verilator`` runs the same device compiled by Verilator
(``verilator.VerilatorTransport``); ``board`` opens a serial port (``link.SerialTransport``). Chains run one after
another on the one device, chain ``c`` seeded as global chain ``c``, which is what the emulator does side by
side, so the samples are the reference backend's, bit for bit (CONTRACTS.md §2).

Errors follow the CLI's exit codes: ``UsageError`` (exit 2) for bad usage (``board`` without ``--port``, a
program compiled for a fabric other than the board's, a sequence argument out of range) and
``DeviceError`` (exit 1) for a device that is missing, silent, or fails.
"""

from __future__ import annotations

import contextlib

import numpy as np

from .cli import DeviceError, UsageError

__all__ = ["run_sample", "run_sequence", "run_moments", "open_device", "board_fabric", "check_entropy", "check_port",
           "transport_for_geometry", "SIM_CLOCK_HZ", "SIM_DIVISOR", "BOARD_BAUD"]

#: The simulated board: a 12 MHz clock and the UART at 3 Mbaud (the iCEBreaker's link), divisor 4.
SIM_CLOCK_HZ = 12_000_000
SIM_DIVISOR = 4
#: Host-side timeout of one response in the simulation (device seconds beyond the bytes' wire time).
SIM_TIMEOUT = 0.005
#: The serial link to a real board.
BOARD_BAUD = 3_000_000
BOARD_TIMEOUT = 0.5


@contextlib.contextmanager
def open_device(backend: str, program, port: str | None = None):
    """A ``link.Device`` for ``backend`` (``sim`` or ``board``), ready for ``program``; closed on exit.

    The device is reset (stopped, sample FIFO emptied) and checked against the program's fabric.
    """
    from .link import DeviceRejected, LinkError, MissingFeature, ProgramMismatch
    check_port(backend, port)
    if backend not in ("sim", "verilator", "board"):
        raise DeviceError(f"the {backend} backend is not available in this build")
    if not getattr(program, "on_fabric", False):
        raise UsageError("the model has no grid; only the reference backend runs general graphs")
    try:
        transport = transport_for_geometry(backend, program.geometry, port)
    except (LinkError, DeviceRejected) as exc:
        raise DeviceError(_describe(exc, backend, port)) from None
    try:
        from .link import Device
        timeout = BOARD_TIMEOUT if backend == "board" else SIM_TIMEOUT
        device = Device(transport, timeout=timeout)
        device.reset()
        device.check_program(program)
        yield device
    except ProgramMismatch as exc:
        raise UsageError(f"{exc}; compile for the board's fabric (--fabric)") from None
    except MissingFeature as exc:
        raise UsageError(str(exc)) from None
    except (LinkError, DeviceRejected) as exc:
        raise DeviceError(_describe(exc, backend, port)) from None
    finally:
        transport.close()


def check_entropy(backend: str, entropy: str) -> None:
    """Raise ``UsageError`` unless ``entropy`` is a source ``backend`` has (the emulator has no TRNG)."""
    from .link import ENTROPY_SOURCES
    if entropy not in ENTROPY_SOURCES:
        raise UsageError(f"unknown entropy source {entropy!r}; choose from {', '.join(ENTROPY_SOURCES)}")
    if entropy == "trng" and backend == "reference":
        raise UsageError("--entropy trng needs a device (--backend sim, verilator or board): the reference "
                         "emulator has no TRNG")


def check_port(backend: str, port: str | None) -> None:
    """Raise ``UsageError`` if ``backend`` is ``board`` and no port is given."""
    if backend == "board" and not port:
        raise UsageError("--backend board needs --port DEV (the board's serial port)")


def transport_for_geometry(backend: str, geometry, port: str | None):
    """The transport of ``backend``: the serial port ``port`` of a board, or the simulated device of
    ``geometry``'s fabric (``sim``: Amaranth's simulator; ``verilator``: compiled, cached per design)."""
    from .link import SerialTransport, SimTransport
    if backend == "board":
        return SerialTransport(port, BOARD_BAUD)
    if backend == "verilator":
        from .verilator import transport_for
        return transport_for(geometry, clock_hz=SIM_CLOCK_HZ, divisor=SIM_DIVISOR)
    from .gateware.device import Device as DeviceTop
    top = DeviceTop(geometry, clock_hz=SIM_CLOCK_HZ, divisor=SIM_DIVISOR)
    return SimTransport(top, clock_hz=SIM_CLOCK_HZ, divisor=SIM_DIVISOR)


def board_fabric(port: str):
    """The fabric of the board on ``port``, from its IDENTIFY answer (``opentsu.fabric.FabricConfig``): what a
    program for it is compiled for when no ``--fabric`` is given."""
    from .link import Device, DeviceRejected, LinkError
    try:
        transport = transport_for_geometry("board", None, port)
    except (LinkError, DeviceRejected) as exc:
        raise DeviceError(_describe(exc, "board", port)) from None
    try:
        return Device(transport, timeout=BOARD_TIMEOUT).identity.config()
    except (LinkError, DeviceRejected) as exc:
        raise DeviceError(_describe(exc, "board", port)) from None
    finally:
        transport.close()


def _describe(exc, backend, port) -> str:
    where = {"board": f"board on {port}", "verilator": "Verilator board"}.get(backend, "simulated board")
    return f"{where}: {exc}"


def _sequence_error(exc) -> UsageError:
    return UsageError(f"cannot run on the fabric: {exc}")


def run_sequence(backend, program, ops, chains, seed, port=None, entropy="prng") -> np.ndarray:
    """Run ``ops`` once per chain, chain ``c`` seeded as global chain ``c``: (chains, captures, model nodes)
    int8, as ``Emulator(program, chains, seed).run(ops)`` returns (with ``entropy="prng"``; ``"trng"`` mixes
    the device's TRNG into the lanes, ``link.Device.run``)."""
    from .sequence import SequenceError, captures
    check_entropy(backend, entropy)
    if chains < 0:
        raise UsageError(f"chain count must be non-negative, not {chains}")
    if chains == 0:
        return np.zeros((0, captures(ops), program.n_model), dtype=np.int8)
    with open_device(backend, program, port) as device:
        try:
            device.load_program(program)
            out = [device.run(program, ops, seed=seed, chain=c, entropy=entropy)[:, program.node_map]
                   for c in range(chains)]
        except SequenceError as exc:
            raise _sequence_error(exc) from None
    return np.stack(out).astype(np.int8)


def run_sample(backend, program, n, chains, burn_in, thin, seed, port=None, entropy="prng") -> np.ndarray:
    """Contract §2 sampling on a device: (n, model nodes) int8, chain-major, equal to ``emulator.sample`` (with
    ``entropy="prng"``; ``"trng"`` mixes the device's TRNG into the lanes, ``link.Device.run``).

    Chain ``c`` runs ``sequence.sampling_sequence(count_c, burn_in, thin)`` with its own sample count.
    """
    from .emulator import chain_counts
    from .sequence import SequenceError, sampling_sequence
    check_entropy(backend, entropy)
    if chains < 1 or n < 0:
        raise UsageError("need at least one chain and a non-negative sample count")
    counts = chain_counts(n, chains)
    try:
        sequences = [sampling_sequence(count, burn_in, thin) if count else None for count in counts]
    except SequenceError as exc:
        raise _sequence_error(exc) from None
    parts = []
    with open_device(backend, program, port) as device:
        try:
            device.load_program(program)
            for chain, ops in enumerate(sequences):
                if ops is not None:
                    parts.append(device.run(program, ops, seed=seed, chain=chain, entropy=entropy)[:, program.node_map])
        except SequenceError as exc:
            raise _sequence_error(exc) from None
    if not parts:
        return np.zeros((0, program.n_model), dtype=np.int8)
    return np.concatenate(parts, axis=0).astype(np.int8)


def run_moments(backend, program, n, chains, burn_in, thin, seed, port=None, entropy="prng"):
    """On-chip moments (``sequence.moments_sequence``): ``emulator.Moments`` with one row per chain, chain
    ``c`` counting its ``emulator.chain_counts`` share of ``n`` samples. The reference backend is the
    emulator, whose counts the devices match bit for bit."""
    from .emulator import Emulator, Moments, chain_counts
    from .sequence import SequenceError, moments_sequence
    if chains < 1 or n < 0:
        raise UsageError("need at least one chain and a non-negative sample count")
    if not hasattr(program.geometry, "moment_partners"):
        raise UsageError("the model has no grid: on-chip moments need a fabric")
    check_entropy(backend, entropy)
    counts = chain_counts(n, chains)
    try:
        sequences = [moments_sequence(count, burn_in, thin) for count in counts]
    except SequenceError as exc:
        raise _sequence_error(exc) from None
    parts = []
    if backend == "reference":
        for chain, ops in enumerate(sequences):
            emu = Emulator(program, chains=1, seed=seed, first_chain=chain)
            try:
                emu.run(ops)
            finally:
                emu.close()
            parts.append(emu.moments)
        return Moments.concatenate(parts)
    with open_device(backend, program, port) as device:
        device.require_moments()      # before loading anything
        try:
            device.load_program(program)
            for chain, ops in enumerate(sequences):
                device.run(program, ops, seed=seed, chain=chain, entropy=entropy)
                parts.append(device.read_moments(program))
        except SequenceError as exc:
            raise _sequence_error(exc) from None
    return Moments.concatenate(parts)
