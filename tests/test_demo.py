"""``opentsu demo`` (what ``make demo`` runs before the bitstream build) works end to end."""

import numpy as np

from opentsu.cli import main


def test_demo_runs_and_every_comparison_holds(tmp_path, capsys):
    code = main(["demo", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert "on-chip edge correlations within" in out
    assert "identical to the emulator's: yes" in out
    assert out.count("   PASS  ") == 7 and "FAIL" not in out
    for name in ("dtm_emulator.png", "dtm_verilator.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    # The Ising part's largest deviation from exact enumeration, in standard errors, is printed and small.
    line = next(line for line in out.splitlines() if "largest deviation" in line)
    deviation = float(line.split("correlations: ")[1].split(" σ")[0])
    assert np.isfinite(deviation) and deviation < 4
