"""The ``opentsu`` command line (shared/CONTRACTS.md §2–§5).

Exit codes: 0 success; 2 bad input or usage (one line on stderr, no output file left behind); 1 when a
device or an internal step fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

__all__ = ["main", "UsageError", "DeviceError"]


class UsageError(Exception):
    """Bad input or usage: exit 2."""


class DeviceError(Exception):
    """A device, simulator or toolchain step failed: exit 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{self.prog}: {message}")


def _positive(kind):
    def parse(text):
        try:
            value = int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind}: {text!r}") from None
        if value < (0 if kind in ("seed", "count") else 1):
            sign = "non-negative" if kind in ("seed", "count") else "positive"
            raise argparse.ArgumentTypeError(f"{kind} must be {sign}, not {value}")
        if kind == "seed" and value >= 1 << 64:
            raise argparse.ArgumentTypeError(f"seed must fit in 64 bits, not {value}")
        return value
    return parse


def _load_program(path, fabric=None, lanes=None, allow_virtual=False, board_port=None):
    """The model file at ``path`` and its program for ``fabric``; with no ``fabric`` and a ``board_port``,
    for the fabric of the board on that port (its IDENTIFY answer), asked once the file has been read."""
    from .compiler import compile_model
    from .model import ModelError, load_model
    from .topology import TopologyError
    try:
        model = load_model(path)
        if fabric is None and board_port:
            from .backends import board_fabric
            fabric = board_fabric(board_port)
        return model, compile_model(model, fabric=fabric, lanes=lanes, allow_virtual=allow_virtual)
    except (ModelError, TopologyError) as exc:
        raise UsageError(str(exc)) from None


def _check_output(path):
    import os
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise UsageError(f"{path}: directory {directory} does not exist")
    if os.path.isdir(path):
        raise UsageError(f"{path}: is a directory")


# --------------------------------------------------------------------------------------------------
# sample

def cmd_sample(args):
    from .backends import check_entropy
    from .fileio import save_npy
    _check_output(args.output)
    check_entropy(args.backend, args.entropy)
    model, program = _load_program(args.model, args.fabric, allow_virtual=args.backend == "reference",
                                   board_port=args.port if args.backend == "board" else None)
    if args.chains > args.n and args.n > 0:
        raise UsageError(f"--chains {args.chains} is more than the {args.n} samples asked for")
    start = time.perf_counter()
    if args.backend == "reference":
        from .emulator import sample
        samples = sample(program, args.n, chains=args.chains, burn_in=args.burn_in, thin=args.thin, seed=args.seed)
    else:
        from .backends import run_sample
        samples = run_sample(args.backend, program, args.n, args.chains, args.burn_in, args.thin, args.seed,
                             port=args.port, entropy=args.entropy)
    elapsed = time.perf_counter() - start
    save_npy(args.output, samples.astype(np.int8))
    if not args.quiet:
        print(f"{args.n} samples of {program.n_model} spins on {args.backend} "
              f"({program.geometry.describe()}) in {elapsed:.2f} s -> {args.output}", file=sys.stderr)
        if not program.report.exact:
            print(program.report.describe(), file=sys.stderr)


# --------------------------------------------------------------------------------------------------
# moments

def cmd_moments(args):
    from .backends import check_entropy, run_moments
    from .fileio import atomic_write
    _check_output(args.output)
    check_entropy(args.backend, args.entropy)
    model, program = _load_program(args.model, args.fabric,
                                   board_port=args.port if args.backend == "board" else None)
    if not program.on_fabric:
        raise UsageError(f"{args.model}: the model has no grid; on-chip moments need a fabric")
    if args.chains > args.n and args.n > 0:
        raise UsageError(f"--chains {args.chains} is more than the {args.n} samples asked for")
    start = time.perf_counter()
    moments = run_moments(args.backend, program, args.n, args.chains, args.burn_in, args.thin, args.seed,
                          port=args.port, entropy=args.entropy)
    elapsed = time.perf_counter() - start
    summary = moments.for_model(program)
    with atomic_write(args.output) as f:
        np.savez(f, samples=np.int64(summary["samples"]), mean=summary["mean"], edges=summary["edges"],
                 correlation=summary["correlation"], per_chain_samples=moments.samples)
    if not args.quiet:
        print(f"moments of {summary['samples']} samples ({len(summary['edges'])} edges) on {args.backend} "
              f"({program.geometry.describe()}) in {elapsed:.2f} s -> {args.output}", file=sys.stderr)


# --------------------------------------------------------------------------------------------------
# compile

def cmd_compile(args):
    from .compiler import ImageError
    from .fileio import atomic_write
    _check_output(args.output)
    model, program = _load_program(args.model, args.fabric, args.lanes)
    if not program.on_fabric:
        raise UsageError(f"{args.model}: the model has no grid; only the reference backend runs general graphs")
    try:
        image = program.to_bytes()
    except ImageError as exc:
        raise UsageError(str(exc)) from None
    with atomic_write(args.output) as f:
        f.write(image)
    print(f"{args.output}: {len(image)} bytes, {program.geometry.describe()}")
    print(program.report.describe())


# --------------------------------------------------------------------------------------------------
# bench

def cmd_bench(args):
    from . import bench
    if args.what == "emulator":
        if not args.model:
            raise UsageError("bench emulator needs a MODEL.npz")
        model, program = _load_program(args.model, args.fabric, allow_virtual=True)
        result = bench.emulator(program, chains=args.chains, sweeps=args.sweeps)
        if args.thrml or args.thrml_python:
            result.update(bench.thrml(model, chains=args.chains, sweeps=args.sweeps, python=args.thrml_python))
            if result.get("thrml_flips_per_s"):
                result["speedup_vs_thrml"] = round(result["flips_per_s"] / result["thrml_flips_per_s"], 2)
        print(json.dumps(result))
    else:
        bench.run_cli(args)   # simulators, link, suite


# --------------------------------------------------------------------------------------------------
# demo

def cmd_demo(args):
    from . import demo
    demo.run(args)


def _add_run_options(p, n_help, burn_in_help, thin_help):
    """The options of the verbs that run a model on a backend (``sample``, ``moments``)."""
    p.add_argument("--backend", choices=("reference", "sim", "verilator", "board"), default="reference")
    p.add_argument("-n", type=_positive("count"), default=1000, help=n_help)
    p.add_argument("--chains", type=_positive("chain count"), default=4)
    p.add_argument("--burn-in", type=_positive("count"), default=100, help=burn_in_help)
    p.add_argument("--thin", type=_positive("thinning"), default=1, help=thin_help)
    p.add_argument("--seed", type=_positive("seed"), default=0)
    p.add_argument("--port", help="serial port of the board backend")
    add_entropy_option(p)
    p.add_argument("--fabric", help="fabric preset (icebreaker, hx8k, icestick) or auto; default: the board's own "
                                    "with --backend board, else icebreaker when the model fits it")
    p.add_argument("-q", "--quiet", action="store_true")


def add_entropy_option(p):
    """``--entropy``, for the verbs that run on a device (``link.ENTROPY_SOURCES``)."""
    from .link import ENTROPY_SOURCES
    p.add_argument("--entropy", choices=ENTROPY_SOURCES, default="prng",
                   help="the lanes' random source: prng (default; reproducible, the emulator's streams) or trng "
                        "(the device's ring-oscillator TRNG mixed in; not reproducible; device backends only)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="opentsu", description="Open thermodynamic sampling unit: host tools.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("sample", help="sample an Ising model file")
    p.add_argument("model", metavar="MODEL.npz")
    p.add_argument("-o", "--output", required=True, metavar="OUT.npy")
    _add_run_options(p, "samples in total, across chains", "sweeps per chain before the first sample",
                     "sweeps between samples")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("moments", help="⟨s_i⟩ and ⟨s_i s_j⟩ over the fabric's edges, counted on chip")
    p.add_argument("model", metavar="MODEL.npz")
    p.add_argument("-o", "--output", required=True, metavar="OUT.npz",
                   help="samples, mean (n,), edges (E, 2) and correlation (E,)")
    _add_run_options(p, "samples counted in total, across chains", "sweeps per chain before counting",
                     "sweeps between counted samples")
    p.set_defaults(func=cmd_moments)

    p = sub.add_parser("compile", help="compile a model file into a fabric program image")
    p.add_argument("model", metavar="MODEL.npz")
    p.add_argument("-o", "--output", required=True, metavar="PROG.tsu")
    p.add_argument("--fabric", help="fabric preset or auto (default: icebreaker when the model fits it)")
    p.add_argument("--lanes", type=_positive("lane count"), help="update lanes of an auto fabric")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("bench", help="benchmarks: emulator (a JSON line), simulators, link, suite (table, JSON, "
                                     "plots)")
    p.add_argument("what", choices=("emulator", "simulators", "link", "suite"))
    p.add_argument("model", nargs="?", metavar="MODEL.npz")
    p.add_argument("--chains", type=_positive("chain count"), default=64)
    p.add_argument("--sweeps", type=_positive("sweep count"), default=200)
    p.add_argument("--fabric", help="fabric preset or auto")
    p.add_argument("--thrml", action="store_true", help="also time thrml on the same model (if installed)")
    from .bench import add_arguments as add_bench_arguments
    add_bench_arguments(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="the quick-start demonstration")
    p.add_argument("--out", default="out/demo", help="directory for the demo's files")
    p.set_defaults(func=cmd_demo)

    from .build import register as register_build  # opentsu build, flash, export-verilog (boards/)
    register_build(sub)

    from .dtm import register as register_dtm  # opentsu dtm {train,sample,eval}
    from .selftest import register as register_selftest  # opentsu selftest
    register_dtm(sub)
    register_selftest(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        args.func(args)
    except UsageError as exc:
        print(f"opentsu: error: {exc}", file=sys.stderr)
        return 2
    except DeviceError as exc:
        print(f"opentsu: failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("opentsu: interrupted", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    # Run opentsu.cli's own main, not this __main__ copy, whose error classes the commands do not raise.
    from opentsu.cli import main as cli_main
    sys.exit(cli_main())
