"""On-chip moments from the host's side: the ``opentsu moments`` verb on every backend."""

import numpy as np

from opentsu.cli import main
from opentsu.compiler import compile_model
from opentsu.model import load_model, save_model

from .util import grid_model

OPTIONS = ["--chains", "2", "--burn-in", "3", "--thin", "2", "--seed", "12", "--fabric", "auto", "-q"]


def _model(tmp_path):
    path = tmp_path / "m.npz"
    save_model(path, grid_model(6, 6, ((0, 1), (2, 1)), torus=True, seed=62, clamp=[0] * 5 + [1] + [0] * 30))
    return path


def test_moments_are_the_counts_of_the_samples_the_same_run_takes(tmp_path, capsys):
    """ACCUMULATE draws exactly as CAPTURE does: the moments equal counts taken from ``opentsu sample``."""
    path = _model(tmp_path)
    n = 600
    assert main(["sample", str(path), "-o", str(tmp_path / "s.npy"), "-n", str(n)] + OPTIONS) == 0
    assert main(["moments", str(path), "-o", str(tmp_path / "out.npz"), "-n", str(n)] + OPTIONS) == 0, \
        capsys.readouterr().err
    samples = np.load(tmp_path / "s.npy").astype(np.int64)
    with np.load(tmp_path / "out.npz") as stored:
        got = dict(stored)
    assert int(got["samples"]) == n and got["per_chain_samples"].tolist() == [300, 300]
    assert np.allclose(got["mean"], samples.mean(axis=0))
    assert got["mean"][5] == 1.0   # the clamped node
    edges = got["edges"]
    # A 6×6 torus of degree 8 has 36·8/2 = 144 edges.
    assert len(edges) == 144 and len({frozenset(e) for e in edges.tolist()}) == 144
    want = (samples[:, edges[:, 0]] * samples[:, edges[:, 1]]).mean(axis=0)
    assert np.allclose(got["correlation"], want)


def test_moments_on_the_simulated_board_equal_the_reference(tmp_path, capsys):
    path = _model(tmp_path)
    outputs = {}
    for backend in ("reference", "sim"):
        out = tmp_path / f"{backend}.npz"
        assert main(["moments", str(path), "-o", str(out), "-n", "9", "--backend", backend] + OPTIONS) == 0, \
            capsys.readouterr().err
        with np.load(out) as stored:
            outputs[backend] = dict(stored)
    for key in ("samples", "mean", "edges", "correlation", "per_chain_samples"):
        assert np.array_equal(outputs["sim"][key], outputs["reference"][key]), key


def test_bad_moments_requests_exit_2_and_leave_nothing(tmp_path, capsys):
    path = _model(tmp_path)
    out = tmp_path / "out.npz"
    assert main(["moments", str(path), "-o", str(out), "-n", "3", "--chains", "4"]) == 2
    assert main(["moments", str(tmp_path / "missing.npz"), "-o", str(out)]) == 2
    assert main(["moments", str(path), "-o", str(out), "--backend", "board"]) == 2   # no --port
    assert not out.exists()
    assert "error" in capsys.readouterr().err
