"""Benchmarks behind ``opentsu bench``.

``emulator``
    The bit-exact emulator's p-bit updates per second on a model, after warm-up (CONTRACTS §5).
``thrml``
    thrml's block Gibbs sampler on the same model, colouring, chain count and sweep count, in this
    interpreter when thrml is importable, or in another one (``python=``, e.g. a throwaway venv), so thrml
    need not be installed next to OpenTSU.
``simulators``
    Clock cycles per second of the whole device (UART, command engine, FIFO, fabric) in Amaranth's simulator
    and in its Verilator build, on the same device and the same host session; their ratio; and Verilator's
    rate running free and while sampling a real program.
``link``
    Samples per second of device time over the UART from the Verilator device, with a model of the host's
    turnaround latency, with and without a SAMPLES request queued in the device.
``fabric_report``
    The fabric's flips/ns from ``opentsu build``'s ``report.json``.
``suite``
    All of the above, with the emulator's scaling in model size and chain count: a printed table, a JSON
    file and PNG plots.

Each benchmark returns a dict of plain numbers and strings (the JSON output).
"""

from __future__ import annotations

import inspect
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

from .compiler import Program
from .model import IsingModel

__all__ = ["emulator", "thrml", "simulators", "link", "fabric_report", "scaling", "suite", "grid_benchmark_model",
           "format_table"]


# -- emulator and thrml -----------------------------------------------------------------------------------

def _timed(run, repeats: int, min_seconds: float) -> list[float]:
    """Wall times of ``run()``: at least ``repeats`` of them, more (up to 100) until ``min_seconds`` passed."""
    times = []
    while len(times) < repeats or (sum(times) < min_seconds and len(times) < 100):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def emulator(program: Program, chains: int = 64, sweeps: int = 200, warmup: int = 20, repeats: int = 3,
             min_seconds: float = 0.2) -> dict:
    """Emulator p-bit updates per second on ``program``: ``sweeps`` sweeps timed after ``warmup``, repeated
    (at least ``repeats`` times and ``min_seconds``); ``flips_per_s`` is the median rate, ``best_flips_per_s``
    the fastest (the least disturbed by other load on the machine)."""
    from .emulator import Emulator
    emu = Emulator(program, chains=chains, seed=1)
    try:
        emu.load_layer(0)
        emu.randomize()
        emu.sweep(warmup)
        times = _timed(lambda: emu.sweep(sweeps), repeats, min_seconds)
    finally:
        emu.close()
    flips = program.n_model * chains * sweeps
    return {
        "benchmark": "emulator",
        "nodes": program.n_model,
        "fabric_nodes": program.geometry.n,
        "chains": chains,
        "sweeps": sweeps,
        "repeats": len(times),
        "seconds": round(float(np.median(times)), 5),
        "flips_per_s": round(flips / float(np.median(times))),
        "best_flips_per_s": round(flips / min(times)),
        "geometry": program.geometry.describe(),
    }


def _thrml_time(spec: dict) -> dict:
    """Time thrml on ``spec`` (h, edges, weights, beta, blocks, chains, sweeps). Self-contained: it also runs
    as a script in another interpreter, which needs only numpy, jax and thrml."""
    import importlib.metadata
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np
    import thrml
    from thrml import Block, SamplingSchedule, SpinNode, sample_states
    from thrml.models.ising import IsingEBM, IsingSamplingProgram, hinton_init

    n, chains, sweeps = len(spec["h"]), spec["chains"], spec["sweeps"]
    nodes = [SpinNode() for _ in range(n)]
    edges = [(nodes[a], nodes[b]) for a, b in spec["edges"]]
    ebm = IsingEBM(nodes, edges, jnp.asarray(spec["h"], dtype=jnp.float32),
                   jnp.asarray(spec["weights"], dtype=jnp.float32), jnp.asarray(spec["beta"], dtype=jnp.float32))
    blocks = [Block([nodes[k] for k in members]) for members in spec["blocks"]]
    program = IsingSamplingProgram(ebm, blocks, [])
    schedule = SamplingSchedule(n_warmup=sweeps, n_samples=1, steps_per_sample=1)
    key_init, key_run = jax.random.split(jax.random.key(0))
    init = hinton_init(key_init, ebm, blocks, (chains,))
    keys = jax.random.split(key_run, chains)
    run = jax.jit(jax.vmap(lambda k, s: sample_states(k, program, schedule, s, [], [Block(nodes)])))
    start = time.perf_counter()
    jax.block_until_ready(run(keys, init))
    compile_seconds = time.perf_counter() - start
    times = []   # as bench._timed: at least 3 runs, more until 0.2 s have passed
    while len(times) < 3 or (sum(times) < 0.2 and len(times) < 100):
        start = time.perf_counter()
        jax.block_until_ready(run(keys, init))
        times.append(time.perf_counter() - start)
    elapsed = float(np.median(times))
    flips = n * chains * (sweeps + 1)   # sample_states runs n_warmup sweeps, then one per sample
    return {
        "thrml_version": getattr(thrml, "__version__", None) or importlib.metadata.version("thrml"),
        "jax_version": jax.__version__,
        "thrml_compile_seconds": round(compile_seconds, 3),
        "thrml_repeats": len(times),
        "thrml_seconds": round(elapsed, 5),
        "thrml_flips_per_s": round(flips / elapsed),
        "thrml_best_flips_per_s": round(flips / min(times)),
    }


def _thrml_spec(model: IsingModel, chains: int, sweeps: int) -> dict:
    from .topology import colour
    i, j = np.nonzero(np.triu(model.J, 1))
    classes = colour(model.topology).classes()
    return {"h": model.h.tolist(), "edges": np.stack([i, j], axis=1).tolist(), "weights": model.J[i, j].tolist(),
            "beta": float(model.beta), "blocks": [np.asarray(c).tolist() for c in classes], "chains": chains,
            "sweeps": sweeps}


def thrml(model: IsingModel, chains: int = 64, sweeps: int = 200, python: str | None = None) -> dict:
    """thrml's block Gibbs on the same model and colouring, here when thrml and jax are importable, or in
    the interpreter ``python``. The result has ``thrml_flips_per_s``, or ``thrml_error`` saying why not."""
    spec = _thrml_spec(model, chains, sweeps)
    if python is None:
        try:
            import jax  # noqa: F401
            import thrml  # noqa: F401
        except ImportError as exc:
            return {"thrml_error": f"thrml is not installed ({exc.name}); pip install 'opentsu[thrml]' or "
                                   "pass --thrml-python PY"}
        return _thrml_time(spec)
    source = inspect.getsource(_thrml_time) + (
        "\nimport json, sys\nprint(json.dumps(_thrml_time(json.load(sys.stdin))))\n")
    try:
        done = subprocess.run([python, "-c", source], input=json.dumps(spec), capture_output=True, text=True,
                              timeout=3600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"thrml_error": f"cannot run {python}: {exc}"}
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        return {"thrml_error": f"{python}: {lines[-1] if lines else f'exit {done.returncode}'}"}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["thrml_python"] = python
    return result


# -- simulators ------------------------------------------------------------------------------------------

def grid_benchmark_model(rows: int, cols: int, seed: int = 0, jumps=((0, 1), (2, 1)), torus: bool = False
                         ) -> IsingModel:
    """A random grid model (by default open, of degree 8), weights and biases in eighths."""
    from .topology import Grid
    rng = np.random.default_rng(seed)
    grid = Grid(rows, cols, jumps, torus=torus)
    J = np.zeros((grid.n, grid.n))
    for i, j in grid.edges:
        J[i, j] = J[j, i] = np.round(rng.normal() * 0.4 * 8) / 8
    h = np.round(rng.normal(size=grid.n) * 0.3 * 8) / 8
    return IsingModel(h, J, 1.0, (rows, cols), np.zeros(grid.n, dtype=np.int8))


def _cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system) a process has used so far, where /proc tells."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _session(transport, program, ops, chain: int) -> int:
    """The simulator workload: IDENTIFY, then one run of ``ops`` (seeds, sequence, START, drain the samples).
    Returns the device cycles it took."""
    from .link import Device
    start = transport.cycles
    device = Device(transport, timeout=0.005)
    device.run(program, ops, seed=1, chain=chain)
    return transport.cycles - start


def simulators(fabric="icebreaker", samples: int = 2, burn_in: int = 20, min_seconds: float = 2.0,
               sampling: int = 1000) -> dict:
    """Cycles per second of the whole device, for ``fabric`` (a preset name or a ``FabricConfig``), in
    Amaranth's simulator and in Verilator.

    The workload is the same host session on both: IDENTIFY, then seed the lanes, store a sequence
    (LOAD, RANDOMIZE, ``burn_in`` sweeps, ``samples`` captures), START it and read every capture word over
    the UART. Amaranth runs it once; Verilator runs it again and again for at least ``min_seconds``. Also
    measured on Verilator: the model running free with the fabric sweeping and the UART idle, and
    contract §2 sampling of a random grid model (``sampling`` samples, the program loaded over the UART)
    with the host driver's own overhead. Build and elaboration times are reported, not counted.
    """
    from . import verilator
    from .compiler import compile_model
    from .fabric import PRESETS
    from .gateware.device import Device as DeviceTop
    from .link import Device, SimTransport
    from .sequence import MAX_ARG, Op, Opcode, sampling_sequence

    config = PRESETS[fabric] if isinstance(fabric, str) else fabric
    model = grid_benchmark_model(config.rows, config.cols, seed=5, jumps=config.jumps, torus=True)
    program = compile_model(model, fabric=config)
    ops = sampling_sequence(samples, burn_in, 1)
    clock, divisor = verilator.CLOCK_HZ, verilator.DIVISOR
    out = {"benchmark": "simulators", "fabric": fabric if isinstance(fabric, str) else "custom",
           "geometry": program.geometry.describe(),
           "clock_hz": clock, "divisor": divisor,
           "workload": f"IDENTIFY, seed, store and run LOAD/RANDOMIZE/SWEEP {burn_in}/CAPTURE {samples}, "
                       "read the captures over the UART"}

    # Verilator first: a failed build should not cost the Amaranth run.
    build = verilator.build(program.geometry, clock_hz=clock, divisor=divisor)
    out["verilator_build_seconds"] = round(build.seconds, 2)
    out["verilator_built"] = build.built
    with verilator.VerilatorTransport(build.executable, clock_hz=clock, divisor=divisor) as transport:
        cycles, runs = 0, 0
        start = time.perf_counter()
        while runs == 0 or time.perf_counter() - start < min_seconds:
            cycles += _session(transport, program, ops, chain=runs)
            runs += 1
        elapsed = time.perf_counter() - start
        out["workload_cycles"] = cycles // runs
        out["verilator_runs"] = runs
        out["verilator_cycles_per_s"] = round(cycles / elapsed)

        # Free running: a long sweep on the fabric (longer than the run below), nothing on the UART.
        device = Device(transport, timeout=0.005)
        from .devicemap import seed_writes, sequence_writes
        device.writes(seed_writes(1, 0, program.geometry.lanes) +
                      sequence_writes([Op(Opcode.LOAD, 0), Op(Opcode.RANDOMIZE)] + [Op(Opcode.SWEEP, MAX_ARG)] * 40))
        device.start()
        free = 2_000_000
        swept = device.status().sweeps
        cpu = _cpu_seconds(transport.pid)
        start = time.perf_counter()
        transport.run(free)
        out["verilator_free_cycles_per_s"] = round(free / (time.perf_counter() - start))
        out["verilator_free_sweeps"] = (device.status().sweeps - swept) % (1 << 24)   # the fabric kept busy
        if cpu is not None:   # per second of the harness's own CPU time: what other load on the machine costs
            out["verilator_free_cycles_per_cpu_s"] = round(free / max(_cpu_seconds(transport.pid) - cpu, 1e-3))
        device.reset()

    # Sampling a real program, host driver included (what `opentsu sample --backend verilator` does).
    with verilator.VerilatorTransport(build.executable, clock_hz=clock, divisor=divisor) as transport:
        start = time.perf_counter()
        device = Device(transport, timeout=0.005)
        device.load_program(program)
        device.run(program, sampling_sequence(sampling, 100, 1), seed=1, chain=0)
        elapsed = time.perf_counter() - start
        out["verilator_sampling"] = {"samples": sampling, "nodes": program.n_model, "cycles": transport.cycles,
                                     "seconds": round(elapsed, 3),
                                     "cycles_per_s": round(transport.cycles / elapsed),
                                     "samples_per_s": round(sampling / elapsed)}

    # Amaranth: the same session once.
    start = time.perf_counter()
    top = DeviceTop(program.geometry, clock_hz=clock, divisor=divisor)
    transport = SimTransport(top, clock_hz=clock, divisor=divisor)
    out["amaranth_setup_seconds"] = round(time.perf_counter() - start, 2)
    with transport:
        start = time.perf_counter()
        cycles = _session(transport, program, ops, chain=0)
        elapsed = time.perf_counter() - start
    out["amaranth_cycles"] = cycles
    out["amaranth_seconds"] = round(elapsed, 3)
    out["amaranth_cycles_per_s"] = round(cycles / elapsed)
    out["verilator_vs_amaranth"] = round(out["verilator_cycles_per_s"] / out["amaranth_cycles_per_s"], 1)
    out["verilator_free_vs_amaranth"] = round(out["verilator_free_cycles_per_s"] / out["amaranth_cycles_per_s"], 1)
    return out


# -- the UART link ---------------------------------------------------------------------------------------

def link(fabric="icebreaker", samples: int = 2000, latencies=(0.0, 0.001), step: float = 1e-5) -> dict:
    """Samples per second of *device* time that the host driver draws from the Verilator device over the
    UART, for ``fabric`` (a preset name or a ``FabricConfig``), for each host turnaround latency in
    ``latencies`` (seconds, ``link.HostLatency`` advancing the device ``step`` seconds at a time), with one
    SAMPLES request queued behind the one being answered (the driver's default) and without. The fabric
    outruns the UART, so the figures are the link's.

    Each case runs ``Device.run`` (seeds, sequence, START, drain) twice, on a short and a long sampling
    sequence at thin 1 (about ``samples`` samples). ``samples_per_s`` is the drain's rate: the extra samples
    of the long run over its extra time, so the start costs nothing; the two runs differ by whole pairs of
    full responses, so they also end alike. ``run_samples_per_s`` is the long run's, start included.
    ``line_samples_per_s`` is what the line carries with no gap: full SAMPLES responses (the FIFO's words
    and the one in its output register) back to back.
    """
    import math

    from . import verilator
    from .compiler import compile_model
    from .fabric import PRESETS
    from .link import Device, HostLatency
    from .protocol import samples_response_bytes
    from .sequence import sampling_sequence

    config = PRESETS[fabric] if isinstance(fabric, str) else fabric
    program = compile_model(grid_benchmark_model(config.rows, config.cols, seed=5, jumps=config.jumps, torus=True),
                            fabric=config)
    g = program.geometry
    clock, divisor = verilator.CLOCK_HZ, verilator.DIVISOR
    build = verilator.build(g, clock_hz=clock, divisor=divisor)
    out = {"benchmark": "link", "fabric": fabric if isinstance(fabric, str) else "custom", "geometry": g.describe(),
           "clock_hz": clock, "divisor": divisor, "baud": clock // divisor, "runs": []}
    with verilator.VerilatorTransport(build.executable, clock_hz=clock, divisor=divisor) as transport:
        ident = Device(transport, timeout=0.005).identity
        words = ident.fifo_depth + 1
        response = samples_response_bytes(words, ident.sample_word_bytes)
        out["line_samples_per_s"] = round(words / g.cycles * clock / (10 * divisor * response))
        period = math.lcm(2 * words, g.cycles) // g.cycles       # samples in a whole number of response pairs
        short = period
        long = short + period * max(1, round((samples - short) / period))
        out["samples"] = [short, long]
        Device(transport, timeout=0.005).load_program(program)
        for latency in latencies:
            for queued in (True, False):
                device = Device(HostLatency(transport, latency, step=step), timeout=0.005, queue_samples=queued)
                seconds = []
                for count in (short, long):
                    start = transport.now()
                    device.run(program, sampling_sequence(count, 0, 1), seed=1, chain=len(out["runs"]))
                    seconds.append(transport.now() - start)
                out["runs"].append({"host_latency_ms": latency * 1e3, "queued": queued,
                                    "samples_per_s": round((long - short) / (seconds[1] - seconds[0])),
                                    "run_samples_per_s": round(long / seconds[1]), "resent": device.link.resent})
    return out


# -- the fabric ------------------------------------------------------------------------------------------

def fabric_report(path) -> dict:
    """The fabric figures of an ``opentsu build`` report (CONTRACTS §4); ``absent`` when ``path`` is None.
    Raises ``ValueError`` for a file that is not a build report."""
    if path is None:
        return {"absent": "no build report given (run `opentsu build --board B -o DIR`, then --report "
                          "DIR/report.json)"}
    try:
        with open(path) as f:
            report = json.load(f)
    except (OSError, ValueError) as exc:     # ValueError: JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path}: not a readable build report ({exc})") from None
    if not isinstance(report, dict) or "flips_per_ns" not in report:
        raise ValueError(f"{path}: not a build report (no flips_per_ns)")
    keys = ("board", "device", "clock_mhz", "fmax_mhz", "updates_per_cycle", "flips_per_ns", "reference_layer")
    out = {key: report[key] for key in keys if key in report}
    out["report"] = os.fspath(path)
    return out


# -- scaling ---------------------------------------------------------------------------------------------

def scaling(sizes=(4, 8, 16, 32, 64), chain_counts=(1, 4, 16, 64, 256, 1024), chains: int = 64,
            sweeps: int = 100, size_for_chains: int = 16, thrml_python: str | None = None,
            with_thrml: bool = False) -> dict:
    """Emulator flips/s against model size (L×L grids, ``chains`` chains) and against the chain count (a
    ``size_for_chains``² grid), with thrml at the same points when asked."""
    from .compiler import compile_model
    out = {"size": [], "chains": []}
    for size in sizes:
        model = grid_benchmark_model(size, size, seed=size)
        row = {"nodes": model.n, **_pick(emulator(compile_model(model, allow_virtual=True), chains, sweeps))}
        if with_thrml:
            row.update(_pick(thrml(model, chains, sweeps, python=thrml_python)))
        out["size"].append(row)
    model = grid_benchmark_model(size_for_chains, size_for_chains, seed=size_for_chains)
    program = compile_model(model, allow_virtual=True)
    for count in chain_counts:
        row = {"chains": count, **_pick(emulator(program, count, sweeps))}
        if with_thrml:
            row.update(_pick(thrml(model, count, sweeps, python=thrml_python)))
        out["chains"].append(row)
    return out


def _pick(result):
    return {k: v for k, v in result.items() if k in ("flips_per_s", "thrml_flips_per_s", "thrml_error", "seconds")}


# -- the suite -------------------------------------------------------------------------------------------

def _si(value, unit):
    for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def format_table(result: dict) -> str:
    """The suite's result as an aligned text table."""
    rows = []
    emu = result["emulator"]
    rows.append(("emulator", _si(emu["flips_per_s"], "flips/s"),
                 f"{emu['nodes']} nodes, {emu['chains']} chains, {emu['sweeps']} sweeps"))
    th = result["thrml"]
    if "thrml_flips_per_s" in th:
        rows.append((f"thrml {th.get('thrml_version', '')}".strip(), _si(th["thrml_flips_per_s"], "flips/s"),
                     f"same model and colouring; emulator/thrml = {result['emulator_vs_thrml']:g}×"))
    else:
        rows.append(("thrml", "-", th.get("thrml_error", "not measured")))
    sims = result.get("simulators")
    if sims and "amaranth_cycles_per_s" in sims:
        rows.append(("Amaranth sim", _si(sims["amaranth_cycles_per_s"], "cycles/s"),
                     f"whole device ({sims['fabric']} fabric), {sims['amaranth_cycles']} cycles"))
        rows.append(("Verilator", _si(sims["verilator_cycles_per_s"], "cycles/s"),
                     f"same device and session; Verilator/Amaranth = {sims['verilator_vs_amaranth']:g}×"))
        per_cpu = sims.get("verilator_free_cycles_per_cpu_s")
        rows.append(("Verilator, free", _si(sims["verilator_free_cycles_per_s"], "cycles/s"),
                     "fabric sweeping, UART idle, no host traffic"
                     + (f"; {_si(per_cpu, 'cycles')} per CPU second" if per_cpu else "")))
        s = sims["verilator_sampling"]
        rows.append(("Verilator, sampling", _si(s["cycles_per_s"], "cycles/s"),
                     f"load + {s['samples']} samples of {s['nodes']} spins incl. host driver, "
                     f"{_si(s['samples_per_s'], 'samples/s')}"))
    elif sims:
        rows.append(("simulators", "-", sims.get("error", "not measured")))
    fab = result["fabric"]
    if "flips_per_ns" in fab:
        detail = ", ".join(f"{k} {fab[k]}" for k in ("board", "clock_mhz", "updates_per_cycle", "reference_layer")
                           if k in fab)
        rows.append(("fabric", f"{fab['flips_per_ns']:g} flips/ns", detail))
    else:
        rows.append(("fabric", "-", fab.get("absent", "")))
    width = [max(len(r[k]) for r in rows) for k in range(2)]
    return "\n".join(f"  {a:<{width[0]}}  {b:>{width[1]}}  {c}" for a, b, c in rows)


def _machine() -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {"cpus": os.cpu_count(), "load_average_1m": round(load[0], 2), "python": platform.python_version(),
            "platform": platform.platform(), "numpy": np.__version__}


def suite(model: IsingModel | None, out_dir, *, chains: int = 64, sweeps: int = 200, report=None,
          thrml_python: str | None = None, with_simulators: bool = True, fabric: str = "icebreaker",
          quick: bool = False, log=None) -> dict:
    """Run every benchmark; write ``out_dir/bench.json`` and the scaling plots; return the result."""
    from .compiler import compile_model
    from .fileio import atomic_write
    from .plots import write_line_plot
    log = log or (lambda message: None)
    os.makedirs(out_dir, exist_ok=True)
    fabric_info = fabric_report(report)    # fail early on a bad report
    if model is None:
        model = grid_benchmark_model(16, 16, seed=1)
    result = {"machine": _machine()}
    log("emulator ...")
    result["emulator"] = emulator(compile_model(model, allow_virtual=True), chains, sweeps)
    log("thrml ...")
    result["thrml"] = thrml(model, chains, sweeps, python=thrml_python)
    if "thrml_flips_per_s" in result["thrml"]:
        result["emulator_vs_thrml"] = round(result["emulator"]["flips_per_s"] /
                                            result["thrml"]["thrml_flips_per_s"], 2)
    if with_simulators:
        log("Amaranth sim and Verilator ...")
        from .link import LinkError
        try:
            result["simulators"] = simulators(fabric, min_seconds=1.0 if quick else 2.0,
                                              sampling=200 if quick else 1000)
        except LinkError as exc:   # no Verilator here: say so and go on
            result["simulators"] = {"error": str(exc)}
    result["fabric"] = fabric_info
    log("scaling ...")
    with_thrml = "thrml_flips_per_s" in result["thrml"]
    if quick:
        result["scaling"] = scaling(sizes=(4, 16, 32), chain_counts=(1, 16, 256), chains=chains, sweeps=50,
                                    thrml_python=thrml_python, with_thrml=with_thrml)
    else:
        result["scaling"] = scaling(chains=chains, sweeps=sweeps, thrml_python=thrml_python,
                                    with_thrml=with_thrml)
    plots = {}
    for axis, xlabel, title in (("size", "nodes", "Emulator scaling: model size"),
                                ("chains", "chains", "Emulator scaling: chain count")):
        rows = result["scaling"][axis]
        key = "nodes" if axis == "size" else "chains"
        series = [("emulator", [r[key] for r in rows], [r["flips_per_s"] for r in rows])]
        if with_thrml:
            series.append(("thrml", [r[key] for r in rows], [r.get("thrml_flips_per_s", np.nan) for r in rows]))
        path = os.path.join(out_dir, f"emulator_{axis}.png")
        write_line_plot(path, series, title=title, xlabel=xlabel, ylabel="flips/s", logx=True, logy=True)
        plots[axis] = path
    result["plots"] = plots
    path = os.path.join(out_dir, "bench.json")
    result["json"] = path
    with atomic_write(path) as f:
        f.write((json.dumps(result, indent=2) + "\n").encode())
    return result


def add_arguments(parser) -> None:
    """Options of ``opentsu bench`` beyond the emulator benchmark's."""
    parser.add_argument("-o", "--out", default="out/bench", help="suite: directory for bench.json and the plots")
    parser.add_argument("--report", help="suite: report.json of `opentsu build`, for the fabric's flips/ns")
    parser.add_argument("--thrml-python", metavar="PY",
                        help="time thrml in this interpreter (e.g. a venv that has thrml and jax)")
    parser.add_argument("--no-simulators", action="store_true", help="suite: skip Amaranth sim and Verilator")
    parser.add_argument("--quick", action="store_true", help="suite: fewer points, shorter runs")


def run_cli(args) -> None:
    """``opentsu bench simulators``, ``opentsu bench link`` and ``opentsu bench suite``."""
    from .cli import DeviceError, UsageError, _load_program
    from .link import LinkError
    fabric = args.fabric or "icebreaker"
    if args.what in ("simulators", "link"):
        from .fabric import PRESETS
        if fabric not in PRESETS:
            raise UsageError(f"bench {args.what} needs a fabric preset ({', '.join(PRESETS)}), not {fabric!r}")
        try:
            print(json.dumps((simulators if args.what == "simulators" else link)(fabric)))
        except LinkError as exc:
            raise DeviceError(str(exc)) from None
        return
    model = _load_program(args.model, None, allow_virtual=True)[0] if args.model else None
    if args.report is not None and not os.path.isfile(args.report):
        raise UsageError(f"{args.report}: no such build report")
    try:
        fabric_report(args.report)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    from .fabric import PRESETS
    if fabric not in PRESETS:
        raise UsageError(f"bench suite runs the simulators on a fabric preset ({', '.join(PRESETS)}), not {fabric!r}")
    result = suite(model, args.out, chains=args.chains, sweeps=args.sweeps, report=args.report,
                   thrml_python=args.thrml_python,
                   with_simulators=not args.no_simulators, fabric=fabric, quick=args.quick,
                   log=lambda message: print(message, file=sys.stderr, flush=True))
    print("OpenTSU benchmarks")
    print(format_table(result))
    print(f"  JSON {result['json']}; plots {', '.join(result['plots'].values())}")
