"""The DTM: forward process, gradient estimator, ACP, the chain on the fabric, the shipped model and the CLI."""

import itertools
import os

import numpy as np
import pytest

from opentsu import dtm
from opentsu.cli import main
from opentsu.compiler import compile_layers
from opentsu.datasets import load_digits
from opentsu.dtm_eval import BernoulliMixture, Evaluator, IndependentPixels, frechet_distance
from opentsu.emulator import Emulator
from opentsu.sequence import Op, Opcode

from .util import spec_run


# --------------------------------------------------------------------------------------------------
# forward process

def test_geometric_schedule_meets_its_ends():
    flips = dtm.geometric_schedule(8, final=0.03, total=0.495)
    assert len(flips) == 8 and flips[0] == pytest.approx(0.03)
    ratios = flips[1:] / flips[:-1]
    assert np.all(ratios > 1) and np.allclose(ratios, ratios[0])
    assert 0.5 * (1 - np.prod(1 - 2 * flips)) == pytest.approx(0.495, abs=1e-9)
    assert dtm.geometric_schedule(1, total=0.5).tolist() == [0.5]
    with pytest.raises(dtm.DTMError):
        dtm.geometric_schedule(3, final=0.3, total=0.4)  # three steps of 0.3 already pass 0.4


def test_forward_process_flips_at_the_scheduled_rates():
    flips = np.array([0.05, 0.1, 0.2])
    rng = np.random.default_rng(1)
    x0 = np.ones((4000, 64), dtype=np.int8)
    count = x0.size
    q = 0.0
    for t in (1, 2, 3):
        previous, current = dtm.forward_pair(x0, flips, t, rng)
        step = np.mean(previous != current)
        assert abs(step - flips[t - 1]) < 5 * np.sqrt(flips[t - 1] * (1 - flips[t - 1]) / count)
        q = q * (1 - flips[t - 1]) + (1 - q) * flips[t - 1]  # a pixel is off after t steps
        assert abs(np.mean(current == -1) - q) < 5 * np.sqrt(q * (1 - q) / count)
        assert dtm.cumulative_flips(flips)[t] == pytest.approx(q)
        # pixels are flipped independently: the flip indicators of two pixels are uncorrelated
        flipped = (previous != current).astype(float)
        corr = np.corrcoef(flipped[:, 0], flipped[:, 1])[0, 1]
        assert abs(corr) < 5 / np.sqrt(len(x0))


# --------------------------------------------------------------------------------------------------
# the conditional EBM against exact enumeration

def tiny_model(steps=1, seed=0, flips=None):
    """A 2×2 image on a 4×4 torus with nearest-neighbour couplings: 4 visible and 12 latent nodes, every
    value on the fabric's 1/8 grid (so quantisation changes nothing)."""
    rng = np.random.default_rng(seed)
    layout = dtm.Layout.spaced(2, 2, jumps=((0, 1),))
    n, edges = layout.n, layout.grid.edges
    h = rng.integers(-4, 5, size=(steps, n)) / 8
    J = rng.integers(-6, 7, size=(steps, len(edges))) / 8
    c = np.zeros((steps, n))
    c[:, layout.visible] = rng.integers(2, 9, size=(steps, len(layout.visible))) / 8
    flips = np.full(steps, 0.2) if flips is None else flips
    return dtm.DTM(layout, flips, 40, h, J, c, edges)


def exact_statistics(model, clamp_visible, condition):
    """⟨s⟩, ⟨s_a s_b⟩ on the edges and ⟨x_i s_i⟩ on the visible nodes, by enumerating every state of the
    conditional model (and the covariance of each edge), optionally with the visible nodes clamped."""
    layout = model.layout
    n = layout.n
    states = np.array(list(itertools.product((-1, 1), repeat=n)), dtype=np.float64)
    a, b = model.edges[:, 0], model.edges[:, 1]
    x = np.zeros(n)
    x[layout.visible] = condition
    log_w = states @ model.h[0] + (states[:, a] * states[:, b]) @ model.J[0] + states @ (model.c[0] * x)
    if clamp_visible is not None:
        keep = np.all(states[:, layout.visible] == clamp_visible, axis=1)
        states, log_w = states[keep], log_w[keep]
    p = np.exp(log_w - log_w.max())
    p /= p.sum()
    mean = p @ states
    pair = p @ (states[:, a] * states[:, b])
    cond = (p @ states)[layout.visible] * condition
    return [mean, pair, cond], pair - mean[a] * mean[b]


@pytest.mark.parametrize("engine", ["fabric", "float"])
def test_gradient_estimator_matches_exact_enumeration(engine):
    model = tiny_model(seed=3)
    previous = np.array([1, -1, -1, 1], dtype=np.int8)
    current = np.array([1, 1, -1, 1], dtype=np.int8)
    chains = 3000
    config = dtm.TrainConfig(batch=chains, sweeps=40, positive_sweeps=30, seed=5, engine=engine)
    sampler = (dtm._FloatEngine if engine == "float" else dtm._KernelEngine)(model.layout, model.edges)
    trainer = dtm.StepTrainer(model, 1, np.zeros((1, 4), np.int8), config, engine=sampler)
    positive, negative, covariance, _ = trainer.phases(np.tile(previous, (chains, 1)),
                                                       np.tile(current, (chains, 1)), acp=True)
    exact_pos, _ = exact_statistics(model, previous, current)
    exact_neg, exact_cov = exact_statistics(model, None, current)
    for got, want, samples in zip(positive + negative, exact_pos + exact_neg, [chains] * 3 + [2 * chains] * 3):
        tolerance = 5 * np.sqrt(np.clip(1 - want ** 2, 0.01, 1) / samples) + 2e-3
        assert np.all(np.abs(got - want) < tolerance)
    gradient = [p - q for p, q in zip(positive, negative)]
    exact_gradient = [p - q for p, q in zip(exact_pos, exact_neg)]
    tolerance = 5 * np.sqrt(1 / chains + 1 / (2 * chains))
    assert max(np.abs(g - e).max() for g, e in zip(gradient, exact_gradient)) < tolerance
    assert np.abs(covariance - exact_cov).max() < 5 * np.sqrt(2 / chains)
    assert np.abs(exact_cov).max() > 0.2  # the check is not vacuous


def test_acp_raises_its_penalty_while_the_chain_does_not_mix():
    # a strongly ferromagnetic layer: two chains of the same input stay frozen in their own phase
    layout = dtm.Layout.spaced(2, 2, jumps=((0, 1),))
    n, edges = layout.n, layout.grid.edges
    model = dtm.DTM(layout, [0.5], 5, np.zeros((1, n)), np.full((1, len(edges)), 3.0), np.zeros((1, n)), edges)
    config = dtm.TrainConfig(batch=64, sweeps=5, positive_sweeps=2, acp_every=1, acp_threshold=0.2,
                             learning_rate=1e-6, final_learning_rate=1e-6, iterations=10)
    data = np.where(np.random.default_rng(0).random((50, 4)) < 0.5, 1, -1).astype(np.int8)
    trainer = dtm.StepTrainer(model, 1, data, config)
    lambdas = [trainer.update()["lambda"] for _ in range(6)]
    assert trainer.autocorrelation > 0.9
    assert lambdas[0] > 0 and all(b > a for a, b in zip(lambdas, lambdas[1:]))
    # a layer without couplings mixes at once and the penalty decays away
    model.J[:] = 0
    for _ in range(40):
        trainer.update()
    assert abs(trainer.autocorrelation) < 0.2 and trainer.acp_lambda < lambdas[-1] / 10


# --------------------------------------------------------------------------------------------------
# the chain on the fabric

def to_spec_ops(ops):
    out = []
    for op in ops:
        if op.code is Opcode.LOAD:
            out.append(("load", op.arg))
        elif op.code is Opcode.RANDOMIZE:
            out.append(("randomize",))
        elif op.code is Opcode.SWEEP:
            out.append(("sweep", op.arg))
    return out


def test_chain_sequence_runs_every_layer_in_order():
    model = tiny_model(steps=3, seed=4, flips=np.array([0.1, 0.2, 0.3]))
    model.sweeps = 3
    ops = dtm.chain_sequence(3, 3)
    assert [str(op) for op in ops] == ["LOAD 2", "RANDOMIZE", "LOAD 2", "RANDOMIZE", "SWEEP 3", "LOAD 1", "RANDOMIZE",
                                      "SWEEP 3", "LOAD 0", "RANDOMIZE", "SWEEP 3", "CAPTURE 1"]
    program = model.compile(fabric="auto")
    emu = Emulator(program, chains=16, seed=9)
    got = emu.run(ops)[:, -1]
    expected = spec_run(program, 16, 9, to_spec_ops(ops))[:, program.node_map]
    assert np.array_equal(got, expected)
    images = dtm.sample(model, 16, seed=9, fabric="auto")
    assert np.array_equal(images, (expected[:, model.layout.visible] > 0).reshape(16, 2, 2))


def test_float_chain_matches_the_fabric_chain_in_distribution():
    # every value is on the 1/8 grid, so the float model and the quantised program are the same model
    model = tiny_model(steps=2, seed=8, flips=np.array([0.15, 0.4]))
    model.sweeps = 8
    n = 20000  # two samples of n differ by a TV of about 0.016 over 16 patterns
    fabric = dtm.sample(model, n, seed=1, fabric="auto").reshape(n, 4)
    exact = dtm.sample_float(model, n, seed=1).reshape(n, 4)
    codes = lambda images: images @ (1 << np.arange(4))
    tv = 0.5 * np.abs(np.bincount(codes(fabric), minlength=16) - np.bincount(codes(exact), minlength=16)).sum() / n
    assert tv < 0.035
    assert abs(fabric.mean() - exact.mean()) < 0.03 and 0.1 < fabric.mean() < 0.9


def test_each_layer_is_conditioned_on_the_previous_output():
    # top layer: free random pixels; middle layer copies its input; last layer inverts it
    model = tiny_model(steps=3, seed=1, flips=np.array([0.1, 0.2, 0.3]))
    model.J[:] = 0
    model.h[:] = 0
    model.c[:] = 0
    model.c[1, model.layout.visible] = 7.875    # |field| >= 6: the p-bit is deterministic
    model.c[0, model.layout.visible] = -7.875
    ops = dtm.chain_sequence(3, 2)
    ops.insert(ops.index(Op(Opcode.LOAD, 0)), Op(Opcode.CAPTURE, 1))  # x_1, before the last step
    program = compile_layers(model.layout.grid, model.layers(), fabric="auto")
    captured = Emulator(program, chains=64, seed=3).run(ops)
    x1, x0 = captured[:, 0, model.layout.visible], captured[:, 1, model.layout.visible]
    assert np.array_equal(x0, -x1)
    assert 0.3 < np.mean(x1 > 0) < 0.7


# --------------------------------------------------------------------------------------------------
# the shipped model

def test_shipped_model_compiles_for_the_icebreaker_and_samples():
    model = dtm.load(dtm.default_model_path())
    assert model.steps <= 8 and model.image_shape == (8, 8)
    assert os.path.getsize(dtm.default_model_path()) < 400_000
    program = model.compile("icebreaker")
    assert program.on_fabric and len(program.layers) == model.steps
    assert program.geometry.config.rows == 16 and program.report.saturated == 0
    images = dtm.sample(model, 40, seed=2, program=program)
    assert images.dtype == np.uint8 and images.shape == (40, 8, 8)
    assert set(np.unique(images).tolist()) <= {0, 1}
    assert np.array_equal(images, dtm.sample(model, 40, seed=2, program=program))
    assert 0.15 < images.mean() < 0.5  # digits are mostly background, but not empty


def test_shipped_mebm_is_one_step_with_the_dtms_sweeps():
    model, mebm = dtm.load(dtm.default_model_path()), dtm.load(dtm.default_mebm_path())
    assert mebm.steps == 1 and mebm.total_sweeps == model.total_sweeps
    assert np.all(mebm.c == 0)  # x_1 is pure noise: nothing to condition on


def test_save_load_round_trip(tmp_path):
    model = tiny_model(steps=2, seed=6, flips=np.array([0.1, 0.3]))
    model.info["note"] = "x"
    dtm.save(tmp_path / "m.npz", model)
    back = dtm.load(tmp_path / "m.npz")
    for name in ("h", "J", "c", "flips", "edges"):
        assert np.array_equal(getattr(back, name), getattr(model, name))
    assert back.sweeps == model.sweeps and back.info == {"note": "x"}
    assert np.array_equal(back.layout.visible, model.layout.visible)


# --------------------------------------------------------------------------------------------------
# training

def small_images():
    images, _ = load_digits()
    return images[:200, 2:6, 2:6]


@pytest.mark.parametrize("engine", ["fabric", "float"])
def test_training_moves_toward_the_data_and_resumes_exactly(tmp_path, engine):
    config = dtm.TrainConfig(steps=2, final_flip=0.1, sweeps=4, positive_sweeps=2, batch=32, iterations=8,
                             acp_every=2, seed=7, engine=engine)
    images = small_images()
    straight = dtm.train(config, images)
    data = np.where(images.reshape(len(images), -1) > 0, 1, -1)
    layout = dtm.Layout.spaced(4, 4)
    initial = dtm.DTM.initial(layout, config.schedule(), config.sweeps, data, config.init_scale, config.seed)
    assert np.all(np.isfinite(straight.J)) and np.abs(straight.J - initial.J).max() > 0.01

    def stop_at_four(line):
        if line.startswith("it     4/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        dtm.train(config, images, log=stop_at_four, log_every=4, checkpoint=tmp_path / "b.npz", checkpoint_every=4)
    checkpoint = dtm.load(tmp_path / "b.npz")
    assert all(t["iteration"] == 4 for t in checkpoint.info["checkpoint"]["trainers"])
    resumed = dtm.train(config, images, resume=checkpoint)
    for name in ("h", "J", "c"):
        assert np.array_equal(getattr(resumed, name), getattr(straight, name))


# --------------------------------------------------------------------------------------------------
# quality measures

def test_frechet_distance_of_known_gaussians():
    # one dimension: (μ1 - μ2)² + (σ1 - σ2)²
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + 1)
    # commuting covariances: the distance is the sum over axes
    a, b = np.diag([1.0, 4.0]), np.diag([9.0, 1.0])
    assert frechet_distance([0, 0], a, [0, 0], b) == pytest.approx((1 - 3) ** 2 + (2 - 1) ** 2)
    rng = np.random.default_rng(0)
    m = rng.normal(size=(6, 6))
    cov = m @ m.T
    assert frechet_distance(np.ones(6), cov, np.ones(6), cov) == pytest.approx(0, abs=1e-8)


@pytest.fixture(scope="module")
def evaluator():
    images, labels = load_digits()
    return images, Evaluator(images, labels)


def test_the_data_scores_perfectly_against_itself(evaluator):
    images, ev = evaluator
    report = ev.report(images)
    assert report["fd"] < 1e-6 and report["coverage"] == 10 and report["class_tv"] < 0.01
    assert report["copy_rate"] == 1.0 and report["nn_hamming"] == 0.0
    assert ev.train_accuracy > 0.95


def test_baselines_rank_as_expected(evaluator):
    images, ev = evaluator
    independent = ev.report(IndependentPixels(images).sample(600, seed=1))
    mixture = ev.report(BernoulliMixture(images, components=20, iterations=30).sample(600, seed=1))
    assert mixture["fd"] < independent["fd"] / 3
    assert mixture["confidence"] > independent["confidence"]
    assert independent["copy_rate"] == 0.0
    # noise makes data worse the more of it there is
    rng = np.random.default_rng(2)
    fds = [ev.fd(np.where(rng.random(images.shape) < p, 1 - images, images)) for p in (0.02, 0.08, 0.2)]
    assert fds[0] < fds[1] < fds[2]


# --------------------------------------------------------------------------------------------------
# command line

def run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_sample_writes_the_contract_array_and_a_png(tmp_path, capsys):
    out, png = tmp_path / "s.npy", tmp_path / "g.png"
    code, _, err = run(["dtm", "sample", "-o", str(out), "-n", "12", "--seed", "4", "--png", str(png)], capsys)
    assert code == 0, err
    images = np.load(out)
    assert images.dtype == np.uint8 and images.shape == (12, 8, 8)
    assert np.array_equal(images, dtm.sample(dtm.load(dtm.default_model_path()), 12, seed=4))
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


@pytest.mark.parametrize("argv, message", [
    (["dtm", "sample", "missing.npz", "-o", "{out}"], "no such file"),
    (["dtm", "sample", "-o", "{out}", "-n", "-3"], "count"),
    (["dtm", "sample", "-o", "{out}", "--backend", "fpga"], "invalid choice"),
    (["dtm", "sample", "-o", "{out}", "--entropy", "trng"], "the reference emulator has no TRNG"),
    (["dtm", "sample", "{bad}", "-o", "{out}"], "not an OpenTSU DTM file"),
    (["dtm", "sample", "-o", "{tmp}/no/such/dir/x.npy"], "does not exist"),
    (["dtm", "eval", "--data", "{tmp}/none.idx", "--no-float"], "no such file"),
    (["dtm", "eval", "--mebm", "none", "--no-float", "--samples", "{bad}"], "not an .npy sample file"),
    (["dtm", "train", "-o", "{out}", "--final-flip", "0.7"], "final flip"),
    (["dtm", "train", "-o", "{out}", "--steps", "0"], "step count"),
    (["dtm", "train", "-o", "{out}", "--jumps", "0,1,3"], "DR,DC"),
    (["dtm", "train", "-o", "{out}", "--jumps", "0,1;0,0"], "joins a node to itself"),
    (["dtm", "train", "-o", "{out}", "--resume", "{bad}"], "not an OpenTSU DTM file"),
])
def test_cli_bad_input_exits_2_and_leaves_no_file(argv, message, tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    np.savez(bad, h=np.zeros(3), J=np.zeros((3, 3)))
    out = tmp_path / "out.npy"
    argv = [a.format(out=out, bad=bad, tmp=tmp_path) for a in argv]
    code, stdout, err = run(argv, capsys)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.npz"]


@pytest.mark.parametrize("fabric, message", [("icebreaker", "(2, 1)] are not wired"), ("auto", "degree 12")])
def test_cli_eval_refuses_a_model_the_fabric_cannot_run(fabric, message, tmp_path, capsys):
    # three jumps make degree 12: more weights than the fabric's weight word holds (checked before sampling)
    layout = dtm.Layout.spaced(8, 8, jumps=((0, 1), (4, 3), (2, 1)))
    model = dtm.DTM.initial(layout, dtm.geometric_schedule(2), sweeps=2)
    path, out = tmp_path / "d12.npz", tmp_path / "figures.json"
    dtm.save(path, model)
    code, _, err = run(["dtm", "eval", str(path), "--fabric", fabric, "--mebm", "none", "--json", str(out)], capsys)
    assert code == 2 and "d12.npz" in err and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_device_failures_exit_1_without_output(tmp_path, capsys):
    # the chain goes to the board through opentsu.backends; a port that does not exist is a device failure
    out = tmp_path / "s.npy"
    code, _, err = run(["dtm", "sample", "-o", str(out), "-n", "4", "--backend", "board",
                        "--port", str(tmp_path / "no-such-tty")], capsys)
    assert code == 1 and "no-such-tty" in err
    assert not out.exists()
    code, _, err = run(["dtm", "sample", "-o", str(out), "-n", "4", "--backend", "board"], capsys)
    assert code == 2 and "--port" in err and not out.exists()
