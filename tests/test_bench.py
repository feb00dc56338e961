"""``opentsu bench``: the emulator benchmark (CONTRACTS §5), the simulator comparison, the suite's table,
JSON and plots, and the PNG line plots themselves."""

import json
import struct
import zlib

import numpy as np
import pytest

from opentsu import bench
from opentsu.cli import main
from opentsu.compiler import compile_model
from opentsu.model import save_model
from opentsu.plots import line_plot, write_line_plot

from .test_verilator import MODEL
from .util import grid_model


def read_png(path) -> np.ndarray:
    """Decode an 8-bit greyscale, non-interlaced PNG with filter type 0 rows (what opentsu.png writes)."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0] == zlib.crc32(kind + body)
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + length
    width, height, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, colour) == (8, 0)
    rows = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), dtype=np.uint8).reshape(height, width + 1)
    assert np.all(rows[:, 0] == 0)
    return rows[:, 1:]


# -- plots ------------------------------------------------------------------------------------------------

def test_line_plot_draws_each_series(tmp_path):
    one = [("a", [1, 10, 100], [5, 50, 500])]
    two = one + [("b", [1, 10, 100], [500, 50, 5])]
    img1 = line_plot(one, title="t", xlabel="x", ylabel="y", logx=True, logy=True, width=320, height=240)
    img2 = line_plot(two, title="t", xlabel="x", ylabel="y", logx=True, logy=True, width=320, height=240)
    assert img1.shape == (240, 320) and img1.dtype == np.uint8
    assert (img2 != img1).sum() > 200          # the second line adds ink
    path = tmp_path / "p.png"
    write_line_plot(path, two, logx=True, logy=True, width=320, height=240)
    assert np.array_equal(read_png(path), line_plot(two, logx=True, logy=True, width=320, height=240))


def test_line_plot_rising_series_rises():
    img = line_plot([("up", [0, 1], [0, 1])], width=300, height=300)
    ink = img < 128
    rows, cols = np.nonzero(ink[60:240, 90:270])        # well inside the axes, away from the labels
    left, right = rows[cols < 40], rows[cols > 140]
    assert left.mean() > right.mean() + 50             # image rows grow downwards


def test_line_plot_skips_unplottable_points():
    img = line_plot([("s", [1, 2, 3], [np.nan, 0, 4])], logy=True)
    assert img.min() == 0
    with pytest.raises(ValueError, match="nothing to plot"):
        line_plot([("s", [1, 2], [0, -1])], logy=True)


# -- benchmarks ---------------------------------------------------------------------------------------------

def test_bench_emulator_prints_one_json_line(tmp_path, capsys):
    path = tmp_path / "m.npz"
    save_model(path, grid_model(6, 6, ((0, 1), (2, 1)), seed=3))
    assert main(["bench", "emulator", str(path), "--chains", "8", "--sweeps", "20"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["flips_per_s"] > 0 and result["nodes"] == 36 and result["chains"] == 8


def test_thrml_absent_is_reported_not_fatal():
    result = bench.thrml(grid_model(4, 4, seed=1), chains=2, sweeps=2, python="/nonexistent/python")
    assert "thrml_error" in result and "thrml_flips_per_s" not in result


def test_fabric_report(tmp_path):
    assert "absent" in bench.fabric_report(None)
    report = {"board": "icebreaker", "device": "up5k", "clock_mhz": 48.0, "fmax_mhz": 52.3,
              "utilization": {}, "updates_per_cycle": 8.0, "flips_per_ns": 0.384, "reference_layer": "16x16"}
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    got = bench.fabric_report(path)
    assert got["flips_per_ns"] == 0.384 and got["board"] == "icebreaker" and got["clock_mhz"] == 48.0
    path.write_text("{}")
    with pytest.raises(ValueError, match="not a build report"):
        bench.fabric_report(path)
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")     # not UTF-8: the decoder's error, named as such
    with pytest.raises(ValueError, match="not a readable build report"):
        bench.fabric_report(path)


def test_simulators_compare_amaranth_and_verilator():
    program = compile_model(grid_model(**MODEL), fabric="auto")    # the device test_verilator builds
    result = bench.simulators(program.geometry.config, min_seconds=0.3, sampling=50)
    # The same session costs the same device time on both (within the transports' read granularity).
    assert result["workload_cycles"] == pytest.approx(result["amaranth_cycles"], rel=0.1)
    assert result["verilator_vs_amaranth"] == pytest.approx(
        result["verilator_cycles_per_s"] / result["amaranth_cycles_per_s"], rel=0.01)
    assert result["verilator_vs_amaranth"] > 5
    assert result["verilator_free_cycles_per_s"] > 0 and result["verilator_sampling"]["samples_per_s"] > 0
    # Running free, the fabric swept all along: 2·10^6 cycles at 4 cycles a sweep.
    assert result["verilator_free_sweeps"] == pytest.approx(2_000_000 / program.geometry.cycles, rel=0.01)


def test_link_bench_measures_the_queued_and_the_plain_drain():
    program = compile_model(grid_model(**MODEL), fabric="auto")    # the device test_verilator builds
    result = bench.link(program.geometry.config, samples=500, latencies=(0.001,))
    # 257 words a full response (the FIFO and its output register), 4 to a sample, 270 bytes of 10 bits.
    assert result["line_samples_per_s"] == round(257 / 4 * 3e6 / 10 / 270)
    # Two runs per case, apart by whole pairs of full responses (514 words).
    assert result["samples"] == [257, 514]
    queued, plain = result["runs"]
    assert queued["queued"] and not plain["queued"] and queued["host_latency_ms"] == plain["host_latency_ms"] == 1
    assert queued["samples_per_s"] > 1.8 * plain["samples_per_s"]
    assert queued["samples_per_s"] > queued["run_samples_per_s"] and queued["resent"] == plain["resent"] == 0


def test_link_bench_needs_a_preset(capsys):
    assert main(["bench", "link", "--fabric", "8x8"]) == 2
    assert "bench link needs a fabric preset" in capsys.readouterr().err


def test_suite_writes_table_json_and_plots(tmp_path, capsys):
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"board": "icebreaker", "clock_mhz": 48.0, "updates_per_cycle": 8.0,
                                  "flips_per_ns": 0.384, "reference_layer": "16x16"}))
    out = tmp_path / "bench"
    code = main(["bench", "suite", "--quick", "--no-simulators", "--chains", "8", "--sweeps", "20", "-o", str(out),
                 "--report", str(report)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "emulator" in printed and "0.384 flips/ns" in printed and "thrml" in printed
    result = json.loads((out / "bench.json").read_text())
    assert result["emulator"]["flips_per_s"] > 0 and result["fabric"]["flips_per_ns"] == 0.384
    assert [row["nodes"] for row in result["scaling"]["size"]] == [16, 256, 1024]
    assert [row["chains"] for row in result["scaling"]["chains"]] == [1, 16, 256]
    for name in ("emulator_size.png", "emulator_chains.png"):
        assert read_png(out / name).shape == (420, 640)


def test_suite_refuses_a_missing_report(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "suite", "--quick", "--no-simulators", "-o", str(out), "--report",
                 str(tmp_path / "nope.json")]) == 2
    assert "no such build report" in capsys.readouterr().err
    assert not out.exists()
