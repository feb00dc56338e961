"""Stream helpers for Amaranth 0.5 async testbenches, and the one way tests run a simulation.

Every gateware test drives and drains ``lib.stream`` ports through these helpers, so the four
handshake rules of Amaranth's ``docs/stdlib/stream.rst`` are exercised the same way everywhere:

* :func:`put` / :func:`get` move one payload; :func:`put_all` / :func:`get_all` move many, optionally
  with random gaps (producer side) or random back-pressure (consumer side) drawn from a
  ``random.Random`` so a failing run can be replayed from its seed.
* :func:`monitor` is a background testbench that checks the producer's side of the rules on a stream
  it does not drive (rule 2: once ``valid`` is high, neither ``valid`` nor ``payload`` may change
  until a transfer), and records every transfer with the cycle it happened on.
* :func:`simulate` builds the simulator, adds the clock and the testbenches, runs it, and writes a
  VCD named after the test only when ``OPENTSU_VCD=1`` (into ``$OPENTSU_VCD_DIR``, default
  ``out/vcd``).

Conventions: all helpers are called from *testbenches* (``sim.add_testbench``), which see the
design's state after each clock edge has settled. A call returns just after the clock edge on which
its last transfer happened; the next call can start a transfer on the very next cycle, so
back-to-back transfers are possible. Streams with ``always_ready`` / ``always_valid`` are handled:
the helpers never drive a port that is tied to a constant.

Testbenches that have not finished when the simulation ends (background ones, or any testbench when
a watchdog fires) are abandoned mid-``await``. If that ``await`` is inside Amaranth's
``.until()``/``.repeat()`` or an ``async for`` over a trigger, closing the open async generator raises
an unraisable ``RuntimeError`` that pytest (warnings as errors) turns into a confusing failure. So
these helpers wait with plain ``await ctx.tick().sample(...)`` loops, and so should background
testbenches; :func:`idle` replaces ``.repeat()``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from amaranth.hdl import Value
from amaranth.sim import Simulator

__all__ = ["put", "get", "idle", "put_all", "get_all", "Transfer", "Monitor", "monitor", "simulate", "vcd_requested"]


def _always_ready(stream):
    return stream.signature.always_ready


def _always_valid(stream):
    return stream.signature.always_valid


async def put(ctx, stream, payload):
    """Offer ``payload`` on ``stream`` (driven by the testbench) and wait until it is taken.

    ``valid`` goes high at once (a producer never waits for ``ready``), and stays high with the same
    payload until the clock edge that performs the transfer; ``valid`` is low again afterwards.
    """
    if not _always_valid(stream):
        ctx.set(stream.valid, 1)
    ctx.set(stream.payload, payload)
    while True:
        _, _, ready = await ctx.tick().sample(stream.ready)
        if ready:
            break
    if not _always_valid(stream):
        ctx.set(stream.valid, 0)


async def get(ctx, stream):
    """Accept one payload from ``stream`` (driven by the design) and return it.

    ``ready`` is held high until the transfer, then dropped. The payload returned is the one present
    on the clock edge of the transfer.
    """
    if not _always_ready(stream):
        ctx.set(stream.ready, 1)
    while True:
        _, _, valid, payload = await ctx.tick().sample(stream.valid, stream.payload)
        if valid:
            break
    if not _always_ready(stream):
        ctx.set(stream.ready, 0)
    return payload


async def idle(ctx, cycles):
    """Let ``cycles`` clock edges pass (``ctx.tick().repeat()`` without its async generator, see above)."""
    for _ in range(cycles):
        await ctx.tick()


async def put_all(ctx, stream, payloads, *, rng=None, gap=0.0, max_gap=8):
    """Offer every payload of ``payloads`` in order.

    With ``rng`` and ``gap > 0``, each payload is preceded, with probability ``gap``, by 1 to
    ``max_gap`` cycles with ``valid`` low: a bursty producer.
    """
    for payload in payloads:
        if rng is not None and gap and rng.random() < gap:
            await idle(ctx, rng.randint(1, max_gap))
        await put(ctx, stream, payload)


async def get_all(ctx, stream, count, *, rng=None, stall=0.0, max_stall=8):
    """Accept ``count`` payloads and return them as a list.

    With ``rng`` and ``stall > 0``, each payload is preceded, with probability ``stall``, by 1 to
    ``max_stall`` cycles with ``ready`` low: a consumer applying back-pressure.
    """
    payloads = []
    for _ in range(count):
        if rng is not None and stall and rng.random() < stall:
            if not _always_ready(stream):
                ctx.set(stream.ready, 0)
            await idle(ctx, rng.randint(1, max_stall))
        payloads.append(await get(ctx, stream))
    return payloads


@dataclass(frozen=True)
class Transfer:
    """One transfer seen by :func:`monitor`: the cycle index (clock edges since the start) and payload."""

    cycle: int
    payload: object


@dataclass
class Monitor:
    """What :func:`monitor` records: every transfer, and every violation of handshake rule 2."""

    transfers: list = field(default_factory=list)
    violations: list = field(default_factory=list)

    @property
    def payloads(self):
        return [t.payload for t in self.transfers]

    def check(self):
        """Raise ``AssertionError`` listing the first few rule violations, if any."""
        assert not self.violations, "stream rule 2 violated:\n" + "\n".join(self.violations[:5])


def monitor(stream, record=None):
    """Return ``(testbench, record)``: a background testbench watching ``stream`` and its :class:`Monitor`.

    Add the testbench with ``background=True`` (:func:`simulate` does, for its ``background``
    argument). It samples the stream on every clock edge and records transfers; whenever ``valid``
    was high without a transfer, it checks that ``valid`` is still high and ``payload`` unchanged on
    the next edge. Payloads are recorded as integers (the payload's bits, whatever its shape).
    """
    record = Monitor() if record is None else record
    payload_bits = Value.cast(stream.payload)

    async def watch(ctx):
        pending = None
        cycle = 0
        while True:
            _, _, valid, ready, payload = await ctx.tick().sample(stream.valid, stream.ready, payload_bits)
            if pending is not None:
                if not valid:
                    record.violations.append(f"cycle {cycle}: valid dropped before a transfer")
                elif payload != pending:
                    record.violations.append(f"cycle {cycle}: payload changed before a transfer "
                                             f"({pending:#x} -> {payload:#x})")
            if valid and ready:
                record.transfers.append(Transfer(cycle, payload))
            pending = payload if valid and not ready else None
            cycle += 1

    return watch, record


def vcd_requested():
    """True when the environment asks for waveforms (``OPENTSU_VCD=1``)."""
    return os.environ.get("OPENTSU_VCD", "") not in ("", "0")


def simulate(dut, *testbenches, name, period_ns=20.0, background=(), processes=(), max_cycles=None):
    """Simulate ``dut`` in the ``sync`` domain until every testbench in ``testbenches`` returns.

    ``background`` testbenches (e.g. from :func:`monitor`) run alongside and do not keep the
    simulation alive; ``processes`` are added with ``add_process``. ``max_cycles`` bounds simulated
    time: running longer raises ``AssertionError`` instead of hanging. ``name`` (for parametrised tests,
    ``request.node.name``) names the VCD written when :func:`vcd_requested`.
    """
    sim = Simulator(dut)
    sim.add_clock(period_ns * 1e-9)
    for bench in testbenches:
        sim.add_testbench(bench)
    for bench in background:
        sim.add_testbench(bench, background=True)
    for process in processes:
        sim.add_process(process)
    if max_cycles is not None:
        async def watchdog(ctx):
            await ctx.delay(max_cycles * period_ns * 1e-9)
            raise AssertionError(f"{name}: still running after {max_cycles} cycles")
        sim.add_testbench(watchdog, background=True)

    if vcd_requested():
        directory = Path(os.environ.get("OPENTSU_VCD_DIR", "out/vcd"))
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / (re.sub(r"[^\w.-]+", "_", name) + ".vcd")
        with sim.write_vcd(str(path)):
            sim.run()
    else:
        sim.run()
