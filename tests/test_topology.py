import numpy as np
import pytest

from opentsu.topology import (Grid, SparseGraph, TopologyError, canonical_jump, colour, detect_grid, dsatur,
                              lattice_colouring, opposite, parse_jumps, rotations)


def test_jumps_expand_to_four_rotations():
    grid = Grid(16, 16, ((0, 1), (2, 1)))
    assert grid.degree == 8
    assert grid.offsets[:4] == ((0, 1), (-1, 0), (0, -1), (1, 0))
    assert set(grid.offsets[4:]) == {(2, 1), (-1, 2), (-2, -1), (1, -2)}
    for d, (dr, dc) in enumerate(grid.offsets):
        assert grid.offsets[opposite(d)] == (-dr, -dc)


def test_canonical_jump_names_each_class_once():
    for jump in ((0, 1), (2, 1), (1, 2), (3, 0), (1, 1)):
        assert {canonical_jump(r) for r in rotations(jump)} == {canonical_jump(jump)}
    assert canonical_jump((2, 1)) != canonical_jump((1, 2))


def test_parse_jumps_keeps_the_order_given_and_names_bad_text():
    assert parse_jumps("0,1;4,3") == ((0, 1), (4, 3))
    assert parse_jumps(" 2, 1 ; -1,0") == ((2, 1), (-1, 0))
    for text, message in (("0,1,3", "DR,DC"), ("", "DR,DC"), ("0,1;", "DR,DC"), ("a,b", "DR,DC"),
                          ("0,0", "itself")):
        with pytest.raises(TopologyError, match=message):
            parse_jumps(text)


@pytest.mark.parametrize("torus", [True, False])
def test_neighbour_table_matches_brute_force(torus):
    grid = Grid(6, 8, ((0, 1), (2, 1)), torus)
    for node in range(grid.n):
        r, c = divmod(node, grid.cols)
        for d, (dr, dc) in enumerate(grid.offsets):
            rr, cc = r + dr, c + dc
            if torus:
                expected = (rr % 6) * 8 + cc % 8
            else:
                expected = rr * 8 + cc if 0 <= rr < 6 and 0 <= cc < 8 else -1
            assert grid.neighbours[node, d] == expected
    # Symmetric: j is i's neighbour at d exactly when i is j's neighbour at opposite(d).
    for node in range(grid.n):
        for d in range(grid.degree):
            j = grid.neighbours[node, d]
            if j >= 0:
                assert grid.neighbours[j, opposite(d)] == node


def test_torus_rejects_aliasing_offsets():
    with pytest.raises(TopologyError, match="same neighbour"):
        Grid(2, 2, ((0, 1),))
    with pytest.raises(TopologyError):
        Grid(4, 4, ((0, 2),))
    with pytest.raises(TopologyError, match="repeat"):
        Grid(8, 8, ((0, 1), (1, 0)))


def proper(neighbours, colours):
    for i, row in enumerate(neighbours):
        for j in row:
            if j >= 0 and colours[i] == colours[j]:
                return False
    return True


def test_checkerboard_for_odd_jumps():
    c = colour(Grid(16, 16, ((0, 1), (2, 1))))
    assert c.kind == "checkerboard" and c.count == 2
    assert proper(Grid(16, 16, ((0, 1), (2, 1))).neighbours, c.colours)


def test_lattice_colouring_for_even_jumps():
    grid = Grid(8, 8, ((0, 1), (1, 1)))  # king's graph
    c = lattice_colouring(grid)
    assert c.kind == "lattice" and c.count == 4 and proper(grid.neighbours, c.colours)
    sizes = np.bincount(c.colours)
    assert len(set(sizes.tolist())) == 1


def test_odd_torus_falls_back_to_dsatur():
    grid = Grid(5, 5, ((0, 1),))  # odd cycle rows: no checkerboard, no 2-colouring at all
    c = colour(grid)
    assert proper(grid.neighbours, c.colours) and c.count >= 3


def test_dsatur_on_random_graph():
    rng = np.random.default_rng(0)
    mask = rng.random((40, 40)) < 0.15
    mask = np.triu(mask, 1)
    mask = mask | mask.T
    graph = SparseGraph.from_adjacency(mask)
    c = dsatur(graph.neighbours)
    assert proper(graph.neighbours, c.colours)


def mask_of(grid):
    m = np.zeros((grid.n, grid.n), dtype=bool)
    for i, j in grid.edges:
        m[i, j] = m[j, i] = True
    return m


@pytest.mark.parametrize("grid", [Grid(6, 6, ((0, 1),), True), Grid(6, 6, ((0, 1),), False),
                                  Grid(16, 16, ((0, 1), (2, 1)), True), Grid(5, 7, ((0, 1), (2, 1)), False),
                                  Grid(8, 8, ((1, 1),), True)])
def test_detect_grid_recovers_topology(grid):
    found = detect_grid(mask_of(grid), grid.rows, grid.cols)
    assert found.torus == grid.torus and set(found.jumps) == set(grid.jumps)


def test_detect_grid_rejects_mismatch():
    with pytest.raises(TopologyError, match="needs"):
        detect_grid(np.zeros((10, 10), dtype=bool), 3, 4)
