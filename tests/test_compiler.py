import struct
import zlib

import numpy as np
import pytest

from opentsu.compiler import ImageError, Program, compile_layers, compile_model, FloatLayer
from opentsu.fabric import PRESETS
from opentsu.formats import WEIGHT
from opentsu.model import IsingModel, ModelError
from opentsu.topology import Grid, TopologyError, opposite

from .util import grid_model


def test_eighth_grid_model_compiles_with_no_rounding():
    model = grid_model(16, 16, ((0, 1), (2, 1)), torus=True, seed=1, scale=2.0, field=2.0)
    model.J = np.clip(model.J, -4, 4)
    model.h = np.clip(model.h, -4, 4)
    program = compile_model(model)
    assert program.report.exact
    layer = program.layers[0]
    nbr = program.geometry.neighbours
    for node in range(model.n):
        for d in range(program.geometry.degree):
            assert layer.weights[node, d] == model.J[node, nbr[node, d]] * 8
    assert np.array_equal(layer.bias, (model.h * 8).astype(int))


def test_extremes_of_the_contract_range_are_exact():
    model = grid_model(4, 4, seed=2)
    model.J = np.where(model.J != 0, np.where(model.J > 0, 4.0, -4.0), 0.0)
    model.h = np.full(16, -4.0)
    assert compile_model(model).report.exact


def test_rounding_is_reported():
    model = grid_model(4, 4, seed=3, eighths=False)
    report = compile_model(model).report
    assert not report.exact
    edges = model.J[model.J != 0]
    expected_max = np.abs(edges - np.round(edges * 8) / 8).max()
    assert report.weight_max_error == pytest.approx(expected_max)
    assert 0 < report.field_mean_error <= report.field_max_error
    assert "quantisation error" in report.describe()


def test_beta_is_folded_into_the_codes():
    model = grid_model(4, 4, seed=4)
    model.beta = 2.0
    program = compile_model(model)
    assert program.report.exact
    assert np.array_equal(program.layers[0].bias[program.node_map], (model.h * 16).astype(int))


def test_extreme_weights_saturate():
    model = grid_model(4, 4, seed=5)
    model.J = np.where(model.J != 0, np.sign(model.J) * 1000, 0.0)
    model.h = np.full(16, -50.0)
    program = compile_model(model)
    w = program.layers[0].weights
    assert set(np.unique(w[w != 0]).tolist()) <= {-63, 63}
    assert np.all(program.layers[0].bias[program.node_map] == -63)
    assert program.report.saturated > 0


def test_open_model_is_embedded_with_clamped_padding():
    model = grid_model(5, 7, PRESETS["icebreaker"].jumps, seed=6)
    program = compile_model(model, fabric="icebreaker")
    g = program.geometry
    assert g.rows == 16 and program.n_model == 35
    padding = np.setdiff1d(np.arange(g.n), program.node_map)
    assert np.all(program.layers[0].clamp[padding] == 1)
    assert np.all(program.layers[0].weights[padding] == 0)
    # No coupling crosses the open boundary, not even through the torus wiring.
    inside = np.zeros(g.n, dtype=bool)
    inside[program.node_map] = True
    w = program.layers[0].weights
    assert np.all(w[inside][~inside[g.neighbours[inside]]] == 0)


def test_models_that_do_not_fit_are_refused():
    with pytest.raises(TopologyError, match="torus"):
        compile_model(grid_model(8, 8, torus=True), fabric="icebreaker")
    with pytest.raises(TopologyError, match="not wired"):
        compile_model(grid_model(8, 8, ((1, 1),)), fabric="icebreaker")
    with pytest.raises(TopologyError, match="above the fabric maximum"):
        compile_model(grid_model(16, 16, ((0, 1), (2, 1), (3, 1)), torus=True))
    general = IsingModel(np.zeros(3), np.array([[0, 1, 1], [1, 0, 1], [1, 1, 0]], dtype=float))
    with pytest.raises(TopologyError, match="no grid"):
        compile_model(general)
    assert not compile_model(general, allow_virtual=True).on_fabric


def test_image_round_trip():
    model = grid_model(6, 6, ((0, 1), (2, 1)), seed=7, clamp=[0] * 30 + [1, -1, 0, 0, 1, 0])
    program = compile_model(model)
    image = program.to_bytes()
    back = Program.from_bytes(image)
    a, b = back.geometry.config, program.geometry.config
    assert (a.rows, a.cols, a.jumps, a.lanes, a.latency) == (b.rows, b.cols, b.jumps, b.lanes, b.latency)
    assert np.array_equal(back.geometry.schedule, program.geometry.schedule)
    assert np.array_equal(back.node_map, program.node_map)
    for a, b in zip(program.layers, back.layers):
        for name in ("weights", "bias", "coupling", "clamp"):
            assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert back.to_bytes() == image


def test_multilayer_image_with_conditioning():
    grid = Grid(6, 6, ((0, 1),), torus=False)
    rng = np.random.default_rng(8)
    layers = []
    for _ in range(3):
        J = np.zeros((36, 36))
        for i, j in grid.edges:
            J[i, j] = J[j, i] = rng.integers(-8, 9) / 8
        layers.append(FloatLayer(rng.integers(-8, 9, 36) / 8, J, 1.0, rng.integers(-8, 9, 36) / 8))
    program = compile_layers(grid, layers)
    back = Program.from_bytes(program.to_bytes())
    assert len(back.layers) == 3
    assert np.array_equal(back.layers[2].coupling, program.layers[2].coupling)


def resealed(image: bytes) -> bytes:
    body = image[:-4]
    return body + struct.pack("<I", zlib.crc32(body))


def test_corrupt_images_are_rejected():
    image = compile_model(grid_model(4, 4, seed=9)).to_bytes()
    with pytest.raises(ImageError, match="magic"):
        Program.from_bytes(b"XXXX" + image[4:])
    flipped = bytearray(image)
    flipped[len(image) // 2] ^= 0x10
    with pytest.raises(ImageError, match="CRC"):
        Program.from_bytes(bytes(flipped))
    with pytest.raises(ImageError):
        Program.from_bytes(image[:40])
    with pytest.raises(ImageError, match="version"):
        Program.from_bytes(resealed(image[:4] + struct.pack("<H", 99) + image[6:]))
    with pytest.raises(ImageError, match="trailing"):
        Program.from_bytes(resealed(image[:-4] + b"\0\0" + image[-4:]))


def test_inconsistent_image_content_is_rejected():
    program = compile_model(grid_model(4, 4, seed=10))
    image = bytearray(program.to_bytes())
    # The first node word: a clamp code for p = h + c but not for q = h - c.
    g = program.geometry
    word_bytes = (WEIGHT.bits * g.degree + 7) // 8
    header = len(image) - 4 - g.lanes * g.cycles * (word_bytes + 2)
    node_words = header + g.lanes * g.cycles * word_bytes
    bad = bytearray(image)
    bad[node_words:node_words + 2] = bytes([0x7F, 0x00])
    with pytest.raises(ImageError, match="clamp code on one side"):
        Program.from_bytes(resealed(bytes(bad[:-4]) + b"\0\0\0\0"))
    bad[node_words:node_words + 2] = bytes([0x03, 0x00])  # p + q odd
    with pytest.raises(ImageError, match="odd"):
        Program.from_bytes(resealed(bytes(bad[:-4]) + b"\0\0\0\0"))
    # An asymmetric weight: change one weight code of the first scheduled node.
    bad = bytearray(image)
    bad[header] ^= 0x01
    with pytest.raises(ImageError, match="symmetric|idle"):
        Program.from_bytes(resealed(bytes(bad[:-4]) + b"\0\0\0\0"))
