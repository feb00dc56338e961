import json
import os

import numpy as np
import pytest

from opentsu.cli import main
from opentsu.model import IsingModel, save_model

from .util import grid_model


def run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "m.npz"
    model = grid_model(5, 5, ((0, 1), (2, 1)), seed=40, clamp=[0] * 24 + [-1])
    save_model(path, model)
    return path, model


def test_sample_writes_the_contract_array(model_file, tmp_path, capsys):
    path, model = model_file
    out = tmp_path / "s.npy"
    code, _, err = run(["sample", str(path), "-o", str(out), "-n", "300", "--chains", "3", "--seed", "5",
                        "--burn-in", "10", "--thin", "2"], capsys)
    assert code == 0, err
    samples = np.load(out)
    assert samples.dtype == np.int8 and samples.shape == (300, 25)
    assert set(np.unique(samples).tolist()) <= {-1, 1}
    assert np.all(samples[:, 24] == -1)
    again = tmp_path / "t.npy"
    assert run(["sample", str(path), "-o", str(again), "-n", "300", "--chains", "3", "--seed", "5",
                "--burn-in", "10", "--thin", "2"], capsys)[0] == 0
    assert np.array_equal(np.load(again), samples)


def test_sample_runs_general_graphs_on_the_reference(tmp_path, capsys):
    path = tmp_path / "g.npz"
    J = np.array([[0, 0.5, -0.25], [0.5, 0, 0.75], [-0.25, 0.75, 0]])
    save_model(path, IsingModel(np.zeros(3), J))
    code, _, err = run(["sample", str(path), "-o", str(tmp_path / "g.npy"), "-n", "10", "--chains", "1"], capsys)
    assert code == 0, err
    assert np.load(tmp_path / "g.npy").shape == (10, 3)


def write_npz(path, **arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)


BAD_MODELS = {
    "asymmetric": (dict(h=np.zeros(4), J=np.triu(np.ones((4, 4)), 1)), "not symmetric"),
    "diagonal": (dict(h=np.zeros(2), J=np.eye(2)), "diagonal"),
    "nan": (dict(h=np.array([0.0, np.nan]), J=np.zeros((2, 2))), "non-finite"),
    "inf": (dict(h=np.zeros(2), J=np.array([[0, np.inf], [np.inf, 0]])), "non-finite"),
    "shape": (dict(h=np.zeros(3), J=np.zeros((4, 4))), "shape"),
    "grid": (dict(h=np.zeros(4), J=np.zeros((4, 4)), grid=np.array([3, 3])), "does not match"),
    "clamp": (dict(h=np.zeros(2), J=np.zeros((2, 2)), clamp=np.array([0, 2], dtype=np.int8)), "clamp"),
    "missing": (dict(h=np.zeros(2)), "missing key"),
    "beta": (dict(h=np.zeros(2), J=np.zeros((2, 2)), beta=np.array([1.0, 2.0])), "beta"),
}


@pytest.mark.parametrize("case", list(BAD_MODELS))
@pytest.mark.parametrize("command", ["sample", "compile"])
def test_bad_models_exit_2_and_leave_nothing(case, command, tmp_path, capsys):
    arrays, message = BAD_MODELS[case]
    path = tmp_path / "bad.npz"
    write_npz(path, **arrays)
    out = tmp_path / "out.bin"
    code, _, err = run([command, str(path), "-o", str(out)], capsys)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and os.listdir(tmp_path) == ["bad.npz"]


def test_degree_above_fabric_maximum(tmp_path, capsys):
    model = grid_model(16, 16, ((0, 1), (2, 1), (3, 1)), torus=True, seed=41)
    path = tmp_path / "deg12.npz"
    save_model(path, model)
    code, _, err = run(["compile", str(path), "-o", str(tmp_path / "p.tsu")], capsys)
    assert code == 2 and "above the fabric maximum" in err
    assert not (tmp_path / "p.tsu").exists()


@pytest.mark.parametrize("verb", ["sample", "moments"])
def test_trng_entropy_on_the_emulator_is_bad_usage(verb, tmp_path, capsys):
    model = tmp_path / "m.npz"
    save_model(model, grid_model(4, 4))
    out = tmp_path / ("o.npy" if verb == "sample" else "o.npz")
    code, _, err = run([verb, str(model), "-o", str(out), "--entropy", "trng"], capsys)
    assert code == 2 and "the reference emulator has no TRNG" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_unreadable_inputs_and_outputs(tmp_path, capsys):
    for target, message in ((tmp_path / "nope.npz", "no such file"), (tmp_path, "directory")):
        code, _, err = run(["sample", str(target), "-o", str(tmp_path / "o.npy")], capsys)
        assert code == 2 and message in err
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a zip file")
    code, _, err = run(["sample", str(garbage), "-o", str(tmp_path / "o.npy")], capsys)
    assert code == 2 and "not an .npz model file" in err and "zip header" in err
    one_array = tmp_path / "one.npy"
    np.save(one_array, np.zeros(4))
    code, _, err = run(["sample", str(one_array), "-o", str(tmp_path / "o.npy")], capsys)
    assert code == 2 and "a single .npy array, not an .npz archive" in err
    truncated = tmp_path / "truncated.npz"
    save_model(truncated, grid_model(3, 3))
    truncated.write_bytes(truncated.read_bytes()[:40])
    for command in (["sample"], ["dtm", "sample"]):
        code, _, err = run([*command, str(truncated), "-o", str(tmp_path / "o.npy")], capsys)
        assert code == 2 and "not a readable .npz" in err and len(err.strip().splitlines()) == 1
    model = tmp_path / "ok.npz"
    save_model(model, grid_model(3, 3))
    code, _, err = run(["sample", str(model), "-o", str(tmp_path / "missing" / "o.npy")], capsys)
    assert code == 2 and "does not exist" in err
    code, _, err = run(["sample", str(model), "-o", str(tmp_path / "o.npy"), "-n", "abc"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.npy").exists()


def test_damaged_archives_and_odd_arrays_exit_2(tmp_path, capsys):
    """Damage that numpy or zipfile report with errors other than the usual ones, and arrays of the wrong kind:
    each is one line and exit 2, for model files and DTM files alike (found by fuzzing the loaders)."""
    import zipfile
    from importlib import resources

    def refused(command, path, *words):
        out = tmp_path / "o.npy"
        code, _, err = run([*command, str(path), "-o", str(out)], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and not out.exists(), err
        assert all(word in err for word in words), err

    # A central directory entry that names a compression method zipfile does not know (99).
    unknown_method = tmp_path / "method.npz"
    save_model(unknown_method, grid_model(3, 3))
    raw = bytearray(unknown_method.read_bytes())
    entry = raw.index(b"PK\x01\x02")
    raw[entry + 10:entry + 12] = (99).to_bytes(2, "little")
    unknown_method.write_bytes(raw)
    refused(["sample"], unknown_method, "compression method")

    for name, arrays, words in (("h2d", dict(h=np.zeros((3, 3)), J=np.zeros((9, 9))), ("h must be one-dimensional",)),
                                ("complex", dict(h=np.zeros(4), J=np.zeros((4, 4), complex)), ("J must be real",))):
        np.savez(tmp_path / f"{name}.npz", **arrays)
        refused(["sample"], tmp_path / f"{name}.npz", *words)

    with np.load(str(resources.files("opentsu") / "data" / "dtm_digits.npz")) as shipped:
        arrays = {key: shipped[key] for key in shipped.files}
    # A compressed member whose deflate stream is damaged.
    compressed = tmp_path / "compressed.npz"
    np.savez_compressed(compressed, **arrays)
    raw = bytearray(compressed.read_bytes())
    with zipfile.ZipFile(compressed) as archive:
        member = archive.getinfo("J.npy")
    start = member.header_offset + 30 + len(member.filename) + len(member.extra)
    raw[start:start + 64] = b"\xff" * 64      # zlib: invalid block type
    compressed.write_bytes(raw)
    refused(["dtm", "sample"], compressed, "corrupt array", "decompressing")
    for key, value, words in (("version", np.ones((2, 2), np.int64), ("version",)),
                              ("visible", np.full(64, np.nan), ("visible must hold integers",)),
                              ("grid", np.array([10 ** 7, 10 ** 7]), ("does not match h",))):
        np.savez(tmp_path / f"{key}.npz", **{**arrays, key: value})
        refused(["dtm", "sample"], tmp_path / f"{key}.npz", *words)


def test_compile_writes_an_image(model_file, tmp_path, capsys):
    from opentsu.compiler import Program
    path, _ = model_file
    out = tmp_path / "p.tsu"
    code, stdout, _ = run(["compile", str(path), "-o", str(out)], capsys)
    assert code == 0 and "no rounding" in stdout
    assert Program.from_bytes(out.read_bytes()).n_model == 25


def test_bench_emulator_prints_json(model_file, capsys):
    path, _ = model_file
    code, out, _ = run(["bench", "emulator", str(path), "--chains", "16", "--sweeps", "20"], capsys)
    assert code == 0
    result = json.loads(out)
    assert result["flips_per_s"] > 0 and result["chains"] == 16


def test_outputs_get_ordinary_permissions(tmp_path):
    import os
    import stat

    from opentsu.fileio import save_npy
    umask = os.umask(0o022)
    try:
        save_npy(tmp_path / "a.npy", np.zeros(3))
    finally:
        os.umask(umask)
    assert stat.S_IMODE(os.stat(tmp_path / "a.npy").st_mode) == 0o644


@pytest.mark.parametrize("module", ["opentsu", "opentsu.cli"])
def test_python_dash_m_reports_errors_like_the_command(module, tmp_path):
    import subprocess
    import sys
    missing = tmp_path / "nope.npz"
    result = subprocess.run([sys.executable, "-m", module, "sample", str(missing), "-o", str(tmp_path / "o.npy")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == f"opentsu: error: {missing}: no such file"
    assert not (tmp_path / "o.npy").exists()
