"""``make demo``: the main job on the built-in defaults, narrated.

1. A bundled 4×4 Ising model sampled on the emulator, its moments next to exact enumeration; the same
   moments counted by the fabric's on-chip accumulators (ACCUMULATE).
2. The shipped digits DTM: the whole denoising chain on the emulator (a PNG grid of samples), then the
   same chains on the simulated board, through its UART pins, checked identical to the emulator.
3. ``opentsu selftest``'s bring-up checks on the simulated iCEBreaker device (Verilator only).
4. (``make demo`` then builds the iCEBreaker bitstream with ``opentsu build``.)
"""

from __future__ import annotations

import os
import time
from importlib import resources

import numpy as np

__all__ = ["run", "demo_model_path"]


def demo_model_path() -> str:
    """The bundled 4×4 frustrated grid model (open boundary, jumps (0,1) and (2,1), 1/8-grid values)."""
    return str(resources.files("opentsu") / "data" / "demo_4x4.npz")


def _ising(model, program):
    from .emulator import Emulator
    from .exact import exact_moments, moment_errors
    from .sequence import moments_sequence
    chains, per_chain = 64, 2000
    emu = Emulator(program, chains=chains, seed=2024)
    try:
        emu.load_layer(0)
        emu.randomize()
        start = time.perf_counter()
        samples = emu.sample(per_chain, burn_in=100, thin=1)
        elapsed = time.perf_counter() - start
        emu.run(moments_sequence(per_chain, burn_in=100, thin=1))
        on_chip = emu.moments.for_model(program)
    finally:
        emu.close()
    mean, corr = exact_moments(model)
    z_mean, z_pair = moment_errors(samples, model)
    measured = samples.reshape(-1, model.n).mean(axis=0)
    print(f"   {chains} chains × {per_chain} samples in {elapsed:.2f} s on the emulator; then as many sweeps again,"
          " counted by the fabric's on-chip accumulators (ACCUMULATE: no samples leave the fabric)")
    print("   node   <s> samples   <s> on-chip   <s> exact   samples' deviation/σ")
    for i in range(model.n):
        print(f"   {i:4d}   {measured[i]:+11.4f}   {on_chip['mean'][i]:+11.4f}   {mean[i]:+9.4f}   {z_mean[i]:+8.2f}")
    pairs = on_chip["edges"]
    model_edges = np.abs(corr[pairs[:, 0], pairs[:, 1]] - on_chip["correlation"])
    print(f"   largest deviation over {len(z_mean)} means and {len(z_pair)} edge correlations: "
          f"{max(np.abs(z_mean).max(), np.abs(z_pair).max()):.2f} σ; on-chip edge correlations within "
          f"{model_edges.max():.3f} of exact")


def _simulated_backend() -> tuple[str, int]:
    """Verilator when it is installed (fast), else the Amaranth simulator; and how many chains to run."""
    from .verilator import ToolchainError, toolchain
    try:
        toolchain()
        return "verilator", 8
    except ToolchainError as exc:
        print(f"   ({exc}: using the Amaranth simulator, which is about 200× slower, for one chain)")
        return "sim", 1


def _dtm(out):
    from . import dtm
    from .png import image_grid, write_png
    model = dtm.load(dtm.default_model_path())
    program = model.compile("icebreaker")
    print(f"   {model.steps} layers × {model.sweeps} sweeps, {model.layout.n} nodes per layer, compiled for "
          f"{program.geometry.describe()}")
    start = time.perf_counter()
    images = dtm.sample(model, 100, seed=7, backend="reference", program=program)
    elapsed = time.perf_counter() - start
    png = os.path.join(out, "dtm_emulator.png")
    write_png(png, image_grid(images, columns=10))
    print(f"   100 chains on the emulator in {elapsed:.2f} s -> {png}")
    backend, chains = _simulated_backend()
    start = time.perf_counter()
    simulated = dtm.sample(model, chains, seed=7, backend=backend, program=program)
    elapsed = time.perf_counter() - start
    same = np.array_equal(simulated, images[:chains])
    png = os.path.join(out, f"dtm_{backend}.png")
    write_png(png, image_grid(simulated, columns=min(10, chains)))
    print(f"   {chains} chain(s) on the simulated board ({backend}: the whole device, driven through its UART "
          f"pins) in {elapsed:.1f} s -> {png}")
    print(f"   identical to the emulator's: {'yes' if same else 'NO'}")
    if not same:
        raise RuntimeError("the simulated board disagrees with the emulator")


def _selftest():
    """``opentsu selftest``'s checks, which a board gets after flashing, on the Verilator device."""
    from . import selftest
    from .backends import SIM_TIMEOUT, transport_for_geometry
    from .fabric import PRESETS, FabricGeometry
    from .link import Device
    from .verilator import ToolchainError, toolchain
    try:
        toolchain()
    except ToolchainError as exc:
        print(f"   (skipped: {exc}; the Amaranth simulator would take minutes)")
        return
    transport = transport_for_geometry("verilator", FabricGeometry(PRESETS["icebreaker"]), None)
    try:
        checks = selftest.run_checks(Device(transport, timeout=SIM_TIMEOUT),
                                     log=lambda check: print(f"   {selftest.format_check(check)}"))
    finally:
        transport.close()
    if any(check.passed is False for check in checks):
        raise RuntimeError("the simulated board failed its self-test")


def run(args):
    from .compiler import compile_model
    from .model import load_model
    os.makedirs(args.out, exist_ok=True)
    path = demo_model_path()
    model = load_model(path)
    program = compile_model(model)
    print(f"1. Ising model {os.path.basename(path)}: {model.topology.describe()}")
    print(f"   compiled for {program.geometry.describe()}")
    print(f"   {program.report.describe()}")
    _ising(model, program)
    print("2. Denoising Thermodynamic Model (the shipped digits model)")
    _dtm(args.out)
    print("3. Bring-up self-test (`opentsu selftest --port DEV` on a board), on the simulated iCEBreaker device")
    _selftest()
