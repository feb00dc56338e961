"""Topologies: grids with jump offsets (what the fabric holds) and general sparse graphs (reference only).

A grid topology is ``rows × cols`` nodes, node index ``r·cols + c``, torus or open boundary. Each jump
``(dr, dc)`` stands for its four rotations ``(dr, dc), (-dc, dr), (-dr, -dc), (dc, -dr)``, as in the DTM
paper: ``(0, 1)`` alone gives the 4-neighbour grid, adding ``(2, 1)`` gives degree 8.

Neighbour tables have one column per offset, in the fixed order: jumps in the order given, each with its
four rotations in the order above. Column ``d`` and column ``opposite(d)`` are mutually inverse offsets.
This is the order the fabric's weight words use. Missing neighbours (beyond an open boundary) are -1.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from math import gcd

import numpy as np

__all__ = [
    "rotations", "canonical_jump", "opposite", "Grid", "SparseGraph", "Colouring", "lattice_colouring",
    "checkerboard", "dsatur", "colour", "detect_grid", "parse_jumps", "TopologyError",
]


class TopologyError(ValueError):
    """A topology that cannot be built, or a model that does not fit one."""


def rotations(jump: tuple[int, int]) -> tuple[tuple[int, int], ...]:
    """The four rotations of a jump, in the fixed order."""
    a, b = jump
    return (a, b), (-b, a), (-a, -b), (b, -a)


def canonical_jump(offset: tuple[int, int]) -> tuple[int, int]:
    """The rotation of ``offset`` with ``dr >= 0`` and ``dc > 0``: one name for each class of four offsets."""
    if offset == (0, 0):
        raise TopologyError("a jump of (0, 0) joins a node to itself")
    for r in rotations(offset):
        if r[0] >= 0 and r[1] > 0:
            return r
    raise AssertionError("unreachable")  # pragma: no cover


def parse_jumps(text: str) -> tuple[tuple[int, int], ...]:
    """Jumps written ``DR,DC[;DR,DC...]`` (e.g. ``0,1;4,3``), as given. Raises ``TopologyError`` naming the
    problem."""
    parts = text.strip().split(";")
    if not all(re.fullmatch(r"\s*-?\d+\s*,\s*-?\d+\s*", part) for part in parts):
        raise TopologyError(f"jumps {text!r} are not DR,DC[;DR,DC...] (e.g. 0,1;4,3)")
    jumps = tuple(tuple(int(x) for x in part.split(",")) for part in parts)
    for jump in jumps:
        canonical_jump(jump)
    return jumps


def opposite(column: int) -> int:
    """The neighbour-table column whose offset is the negative of ``column``'s."""
    return column - column % 4 + (column % 4 + 2) % 4


@dataclass(frozen=True)
class Grid:
    """A grid topology. ``jumps`` are stored in canonical form, in the order given."""

    rows: int
    cols: int
    jumps: tuple[tuple[int, int], ...]
    torus: bool = True

    def __post_init__(self):
        if not (isinstance(self.rows, (int, np.integer)) and isinstance(self.cols, (int, np.integer))):
            raise TopologyError(f"grid dimensions must be integers, not {self.rows!r} × {self.cols!r}")
        if self.rows < 1 or self.cols < 1:
            raise TopologyError(f"grid dimensions must be positive, not {self.rows} × {self.cols}")
        object.__setattr__(self, "rows", int(self.rows))
        object.__setattr__(self, "cols", int(self.cols))
        if not self.jumps:
            raise TopologyError("a grid needs at least one jump")
        canon = tuple(canonical_jump((int(a), int(b))) for a, b in self.jumps)
        if len(set(canon)) != len(canon):
            raise TopologyError(f"jumps {list(self.jumps)} repeat an offset class")
        object.__setattr__(self, "jumps", canon)
        if self.torus:
            seen = {}
            for dr, dc in self.offsets:
                key = (dr % self.rows, dc % self.cols)
                if key == (0, 0):
                    raise TopologyError(f"offset {(dr, dc)} wraps onto the node itself on a "
                                        f"{self.rows}×{self.cols} torus")
                if key in seen:
                    raise TopologyError(f"offsets {seen[key]} and {(dr, dc)} reach the same neighbour on a "
                                        f"{self.rows}×{self.cols} torus; use a larger grid")
                seen[key] = (dr, dc)

    @property
    def n(self) -> int:
        return self.rows * self.cols

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows, self.cols

    @cached_property
    def offsets(self) -> tuple[tuple[int, int], ...]:
        return tuple(o for j in self.jumps for o in rotations(j))

    @property
    def degree(self) -> int:
        """Neighbour-table width (the degree of an interior node)."""
        return len(self.offsets)

    @cached_property
    def neighbours(self) -> np.ndarray:
        """(n, degree) int32 table; -1 where an open boundary cuts the edge."""
        r, c = np.divmod(np.arange(self.n), self.cols)
        table = np.empty((self.n, self.degree), dtype=np.int32)
        for d, (dr, dc) in enumerate(self.offsets):
            rr, cc = r + dr, c + dc
            if self.torus:
                table[:, d] = (rr % self.rows) * self.cols + cc % self.cols
            else:
                inside = (rr >= 0) & (rr < self.rows) & (cc >= 0) & (cc < self.cols)
                table[:, d] = np.where(inside, rr * self.cols + cc, -1)
        table.setflags(write=False)
        return table

    @cached_property
    def edges(self) -> np.ndarray:
        """(E, 2) int array of undirected edges ``i < j``, sorted."""
        return _edges_from_table(self.neighbours)

    def describe(self) -> str:
        kind = "torus" if self.torus else "open"
        return f"{self.rows}×{self.cols} {kind}, jumps {list(self.jumps)}, degree {self.degree}"


@dataclass(frozen=True, eq=False)
class SparseGraph:
    """A general graph given by its neighbour lists (the reference emulator colours and runs it)."""

    neighbours: np.ndarray = field(repr=False)

    def __post_init__(self):
        table = np.asarray(self.neighbours, dtype=np.int32)
        if table.ndim != 2:
            raise TopologyError("neighbour table must be two-dimensional")
        table = table.copy()
        table.setflags(write=False)
        object.__setattr__(self, "neighbours", table)

    @classmethod
    def from_adjacency(cls, mask: np.ndarray) -> "SparseGraph":
        """Build from a symmetric boolean (n, n) adjacency mask."""
        mask = np.asarray(mask, dtype=bool)
        n = mask.shape[0]
        lists = [np.flatnonzero(mask[i]) for i in range(n)]
        width = max((len(x) for x in lists), default=0)
        table = np.full((n, width), -1, dtype=np.int32)
        for i, x in enumerate(lists):
            table[i, :len(x)] = x
        return cls(table)

    @property
    def n(self) -> int:
        return self.neighbours.shape[0]

    @property
    def degree(self) -> int:
        return self.neighbours.shape[1]

    @cached_property
    def edges(self) -> np.ndarray:
        return _edges_from_table(self.neighbours)

    def describe(self) -> str:
        return f"sparse graph, {self.n} nodes, {len(self.edges)} edges, max degree {self.degree}"


def _edges_from_table(table: np.ndarray) -> np.ndarray:
    i = np.repeat(np.arange(table.shape[0]), table.shape[1])
    j = table.reshape(-1)
    keep = j >= 0
    pairs = np.stack([np.minimum(i[keep], j[keep]), np.maximum(i[keep], j[keep])], axis=1)
    if len(pairs) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    return np.unique(pairs, axis=0).astype(np.int64)


# --------------------------------------------------------------------------------------------------
# colourings

@dataclass(frozen=True, eq=False)
class Colouring:
    """A proper colouring. ``kind`` is ``"checkerboard"``, ``"lattice"`` or ``"dsatur"``.

    For lattice colourings (every grid colouring the fabric can run), the colour of ``(r, c)`` is
    ``((a1·r + b1·c) mod k1) · k2 + (a2·r + b2·c) mod k2`` with ``lattice = (a1, b1, k1, a2, b2, k2)``;
    all colour classes then have the same size and are translates of one another.
    """

    colours: np.ndarray = field(repr=False)
    kind: str
    lattice: tuple[int, int, int, int, int, int] | None = None

    @property
    def count(self) -> int:
        return int(self.colours.max()) + 1 if len(self.colours) else 0

    def classes(self) -> list[np.ndarray]:
        return [np.flatnonzero(self.colours == k) for k in range(self.count)]


def _lattice_colours(rows, cols, lattice):
    a1, b1, k1, a2, b2, k2 = lattice
    r, c = np.divmod(np.arange(rows * cols), cols)
    return ((a1 * r + b1 * c) % k1) * k2 + (a2 * r + b2 * c) % k2


def _lattice_is_proper(grid: Grid, lattice) -> bool:
    a1, b1, k1, a2, b2, k2 = lattice
    if grid.torus and ((a1 * grid.rows) % k1 or (b1 * grid.cols) % k1
                       or (a2 * grid.rows) % k2 or (b2 * grid.cols) % k2):
        return False  # not well defined across the wrap
    for dr, dc in grid.offsets:
        if (a1 * dr + b1 * dc) % k1 == 0 and (a2 * dr + b2 * dc) % k2 == 0:
            return False
    colours = _lattice_colours(grid.rows, grid.cols, lattice)
    return len(np.unique(colours)) == k1 * k2


def checkerboard(grid: Grid) -> Colouring | None:
    """The checkerboard ``(r + c) mod 2``, when every jump has odd Manhattan length (and, on a torus,
    both dimensions are even); otherwise None."""
    lattice = (1, 1, 2, 0, 0, 1)
    if all((abs(a) + abs(b)) % 2 for a, b in grid.jumps) and _lattice_is_proper(grid, lattice):
        return Colouring(_lattice_colours(grid.rows, grid.cols, lattice), "checkerboard", lattice)
    return None


def lattice_colouring(grid: Grid, max_colours: int = 9) -> Colouring | None:
    """The translation-invariant colouring with the fewest colours (at most ``max_colours``), or None."""
    board = checkerboard(grid)
    if board is not None:
        return board
    for k in range(2, max_colours + 1):
        for k2 in range(1, k + 1):
            if k % k2 or (k // k2) % k2:
                continue
            k1 = k // k2
            for a1 in range(k1):
                for b1 in range(k1):
                    if gcd(gcd(a1, b1), k1) != 1:
                        continue
                    for a2 in range(k2):
                        for b2 in range(k2):
                            lattice = (a1, b1, k1, a2, b2, k2)
                            if _lattice_is_proper(grid, lattice):
                                return Colouring(_lattice_colours(grid.rows, grid.cols, lattice), "lattice", lattice)
    return None


def dsatur(neighbours: np.ndarray) -> Colouring:
    """Brélaz's DSATUR greedy colouring of any graph given by a padded neighbour table."""
    n = neighbours.shape[0]
    adj = [set(int(j) for j in row if j >= 0 and j != i) for i, row in enumerate(neighbours)]
    colours = np.full(n, -1, dtype=np.int64)
    saturation = [set() for _ in range(n)]
    uncoloured = set(range(n))
    while uncoloured:
        node = max(uncoloured, key=lambda v: (len(saturation[v]), len(adj[v]), -v))
        used = saturation[node]
        c = 0
        while c in used:
            c += 1
        colours[node] = c
        uncoloured.discard(node)
        for m in adj[node]:
            saturation[m].add(c)
    return Colouring(colours, "dsatur")


def colour(topology) -> Colouring:
    """Checkerboard when every jump is odd, else the best lattice colouring, else DSATUR."""
    if isinstance(topology, Grid):
        lattice = lattice_colouring(topology)
        if lattice is not None:
            return lattice
    return dsatur(topology.neighbours)


# --------------------------------------------------------------------------------------------------
# detection

def _jump_classes(offsets) -> list[tuple[int, int]]:
    return sorted({canonical_jump(o) for o in offsets})


def detect_grid(mask: np.ndarray, rows: int, cols: int) -> Grid:
    """The grid topology (jumps, torus or open) whose edges contain the nonzero pattern ``mask``.

    ``mask`` is a symmetric (n, n) boolean array with n = rows·cols. Of the open and torus readings, the
    one with fewer jump classes wins, open on a tie (it adds no wrap edges). Raises ``TopologyError``.
    """
    n = rows * cols
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != (n, n):
        raise TopologyError(f"grid {rows}×{cols} needs {n} nodes, the couplings have shape {mask.shape}")
    i, j = np.nonzero(np.triu(mask, 1))
    if len(i) == 0:
        # No couplings: any grid holds the model; use the nearest-neighbour one.
        return Grid(rows, cols, ((0, 1),), torus=False)
    ri, ci = np.divmod(i, cols)
    rj, cj = np.divmod(j, cols)
    raw = list(zip((rj - ri).tolist(), (cj - ci).tolist()))
    open_jumps = _jump_classes(raw)
    half_r, half_c = rows // 2, cols // 2
    wrapped = [((dr + half_r) % rows - half_r, (dc + half_c) % cols - half_c) for dr, dc in raw]
    candidates = [(len(open_jumps), 0, open_jumps, False)]
    if (0, 0) not in wrapped:
        torus_jumps = _jump_classes(wrapped)
        candidates.append((len(torus_jumps), 1, torus_jumps, True))
    errors = []
    for _, _, jumps, torus in sorted(candidates):
        try:
            grid = Grid(rows, cols, tuple(jumps), torus)
        except TopologyError as exc:
            errors.append(str(exc))
            continue
        edges = {tuple(e) for e in grid.edges.tolist()}
        if all((a, b) in edges for a, b in zip(i.tolist(), j.tolist())):
            return grid
    raise TopologyError("the couplings fit no grid topology" + (f" ({errors[0]})" if errors else ""))
