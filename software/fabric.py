"""Fabric geometry: which node every lane updates on every clock, and where the gateware finds it.

The fabric keeps the spins of a ``rows × cols`` torus in flip-flops and **rotates** the whole torus by a
fixed vector ``v`` every cycle of a sweep (the "moving torus"). A lane sits at a fixed physical position
(its *station*), so the node it updates moves past it and that node's neighbours are always at the same
physical offsets from the station: fixed wires, no per-node multiplexers. A lane has one station per
colour phase (and per block, when a phase needs several passes), chosen by a small multiplexer.

Colours come from a lattice colouring (``topology.lattice_colouring``); ``v`` lies in the colouring's
kernel, so during a phase every lane sees only nodes of that phase's colour. Each phase starts its orbits
at an *entry shift* chosen so that a node of the next colour is never updated within ``latency`` cycles
of a neighbour's update: the spin path can then be pipelined ``latency`` deep with no bubbles, and the
result equals plain colour-by-colour block Gibbs bit for bit.

Definitions (all normative, the gateware elaborates from them):

* physical position ``p`` holds node ``p + τ·v`` at cycle ``τ`` of a sweep (coordinates mod the torus);
  at the end of every sweep cycle the flip-flop at ``p`` takes the value of ``p + v``;
* ``schedule[τ, ℓ]`` is the node lane ``ℓ`` updates at cycle ``τ`` (-1: idle); every node appears once per
  sweep; every lane draws one random word on every cycle of a sweep, idle or not;
* a lane reads the neighbours of the node at its station on cycle ``τ`` and its result lands in the
  flip-flop at ``station - latency·v`` at the end of cycle ``τ + latency - 1``.

``VirtualGeometry`` gives general graphs the same schedule form (DSATUR colours, nodes dealt to lanes
round robin); only the reference emulator runs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from math import gcd

import numpy as np

from .topology import Grid, SparseGraph, TopologyError, dsatur, lattice_colouring

__all__ = ["FabricConfig", "FabricGeometry", "VirtualGeometry", "PRESETS", "DEFAULT_LATENCY", "MAX_DEGREE"]

#: Pipeline depth of the gateware's spin path, in cycles (read neighbours → new spin visible).
DEFAULT_LATENCY = 3
#: Most neighbours per node the fabric's weight word holds.
MAX_DEGREE = 8


@dataclass(frozen=True)
class FabricConfig:
    """Build parameters of a fabric: torus size, jumps, update lanes, resident layers, spin-path latency."""

    rows: int
    cols: int
    jumps: tuple[tuple[int, int], ...]
    lanes: int
    layers: int = 1
    latency: int = DEFAULT_LATENCY

    def __post_init__(self):
        for name in ("rows", "cols", "lanes", "layers", "latency"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"fabric {name} must be a positive integer, not {value!r}")
        object.__setattr__(self, "jumps", tuple(tuple(int(x) for x in j) for j in self.jumps))

    @property
    def grid(self) -> Grid:
        return Grid(self.rows, self.cols, self.jumps, torus=True)

    def describe(self) -> str:
        return (f"{self.rows}×{self.cols} torus, jumps {list(self.jumps)}, {self.lanes} lanes, "
                f"{self.layers} layers")


#: Fabric configurations of the supported boards (see boards/ and docs/boards.md for what each costs). The
#: iCEBreaker's is the reference layer (16×16, degree 8); its lane count is what fits the UP5K's logic cells
#: beside the command engine, and the HX8K's what fits its 32 block RAMs. The iCEBreaker's second jump is
#: (4,3) rather than (2,1) because the shipped DTM is much better with it (docs/dtm.md); it costs the same.
PRESETS = {
    "icebreaker": FabricConfig(16, 16, ((0, 1), (4, 3)), lanes=8, layers=8),
    "hx8k": FabricConfig(16, 16, ((0, 1), (2, 1)), lanes=4, layers=4),
    "icestick": FabricConfig(8, 8, ((0, 1),), lanes=2, layers=2),
}


def _order(v, rows, cols) -> int:
    dr, dc = v
    a = rows // gcd(dr % rows, rows) if dr % rows else 1
    b = cols // gcd(dc % cols, cols) if dc % cols else 1
    return a * b // gcd(a, b)


class _Schedule:
    """Shared helpers for anything with ``schedule`` (cycles, lanes) and ``neighbours``."""

    schedule: np.ndarray
    lanes: int

    @property
    def cycles(self) -> int:
        """Clock cycles (and random draws per lane) in one sweep."""
        return self.schedule.shape[0]

    @property
    def updates_per_cycle(self) -> float:
        return float(np.count_nonzero(self.schedule >= 0)) / self.cycles

    @cached_property
    def update_cycle(self) -> np.ndarray:
        """(n,) cycle at which each node is updated within a sweep."""
        out = np.full(self.n, -1, dtype=np.int64)
        tau, lane = np.nonzero(self.schedule >= 0)
        out[self.schedule[tau, lane]] = tau
        return out

    @cached_property
    def update_lane(self) -> np.ndarray:
        """(n,) lane that updates each node."""
        out = np.full(self.n, -1, dtype=np.int64)
        tau, lane = np.nonzero(self.schedule >= 0)
        out[self.schedule[tau, lane]] = lane
        return out

    def hazard_slack(self) -> int:
        """Fewest cycles between an update and the next update that reads it (across the sweep wrap)."""
        table = self.neighbours
        i = np.repeat(np.arange(self.n), table.shape[1])
        j = table.reshape(-1)
        keep = j >= 0
        ti, tj = self.update_cycle[i[keep]], self.update_cycle[j[keep]]
        gap = (tj - ti) % self.cycles  # j updated `gap` cycles after i (wrapping into the next sweep)
        if np.any(gap == 0):
            raise AssertionError("neighbours updated on the same cycle")
        return int(gap.min()) if len(gap) else self.cycles

    def _check_schedule(self):
        nodes = self.schedule[self.schedule >= 0]
        if len(nodes) != self.n or len(np.unique(nodes)) != self.n:
            raise AssertionError("schedule does not update every node exactly once")


class FabricGeometry(_Schedule):
    """Schedule and wiring of a moving-torus fabric built from ``config``. Raises ``TopologyError`` for
    jumps the fabric cannot colour, ``ValueError`` for impossible lane counts."""

    def __init__(self, config: FabricConfig):
        self.config = config
        self.grid = config.grid
        if self.grid.degree > MAX_DEGREE:
            raise TopologyError(f"degree {self.grid.degree} is above the fabric maximum of {MAX_DEGREE}")
        colouring = lattice_colouring(self.grid)
        if colouring is None:
            raise TopologyError(f"{self.grid.describe()} has no translation-invariant colouring; "
                                "only the reference backend runs it")
        self.colouring = colouring
        self.lanes = config.lanes
        self.latency = config.latency
        self.v = self._rotation_vector()
        self._build()
        self._check_schedule()
        slack = self.hazard_slack()
        if slack < self.latency:
            raise ValueError(f"{config.describe()}: no schedule leaves {self.latency} cycles between dependent "
                             f"updates (best is {slack}); use fewer lanes or a larger grid")

    # -- basic facts
    @property
    def n(self) -> int:
        return self.grid.n

    @property
    def rows(self) -> int:
        return self.grid.rows

    @property
    def cols(self) -> int:
        return self.grid.cols

    @property
    def neighbours(self) -> np.ndarray:
        return self.grid.neighbours

    @property
    def degree(self) -> int:
        return self.grid.degree

    @property
    def colours(self) -> int:
        return self.colouring.count

    @property
    def offsets(self):
        return self.grid.offsets

    @cached_property
    def moment_offsets(self) -> list[tuple[int, int]]:
        """The offsets of the edges each node owns for the on-chip moments: of every opposite pair in
        ``offsets`` the first one, so each edge is counted once (``degree // 2`` of them)."""
        owned = []
        for dr, dc in self.offsets:
            if (-dr, -dc) not in owned:
                owned.append((dr, dc))
        return owned[:self.degree // 2]

    @cached_property
    def moment_partners(self) -> np.ndarray:
        """(n, degree // 2) node at ``moment_offsets[k]`` from each node."""
        out = np.empty((self.n, len(self.moment_offsets)), dtype=np.int64)
        for node in range(self.n):
            r, c = self.position(node)
            for k, (dr, dc) in enumerate(self.moment_offsets):
                out[node, k] = self.node(r + dr, c + dc)
        return out

    def position(self, node) -> tuple[int, int]:
        return divmod(int(node), self.cols)

    def node(self, r, c) -> int:
        return (r % self.rows) * self.cols + c % self.cols

    def shift(self, pos, k: int):
        """Position ``pos + k·v``."""
        return ((pos[0] + k * self.v[0]) % self.rows, (pos[1] + k * self.v[1]) % self.cols)

    # -- construction
    def _rotation_vector(self):
        a1, b1, k1, a2, b2, k2 = self.colouring.lattice
        best = None
        for dr in range(self.rows):
            for dc in range(self.cols):
                if (dr, dc) == (0, 0):
                    continue
                if (a1 * dr + b1 * dc) % k1 or (a2 * dr + b2 * dc) % k2:
                    continue
                sr = dr if dr <= self.rows // 2 else dr - self.rows
                sc = dc if dc <= self.cols // 2 else dc - self.cols
                key = (-_order((dr, dc), self.rows, self.cols), abs(sr) + abs(sc), sr < 0, sc < 0, abs(sr))
                if best is None or key < best[0]:
                    best = (key, (sr, sc))
        return best[1]

    def _orbits(self, colour: int) -> list[list[int]]:
        """Orbits of ``v`` within one colour class, each starting at its lowest node index."""
        members = set(np.flatnonzero(self.colouring.colours == colour).tolist())
        orbits = []
        while members:
            start = min(members)
            orbit, pos = [], self.position(start)
            for _ in range(self.order):
                node = self.node(*pos)
                orbit.append(node)
                members.discard(node)
                pos = self.shift(pos, 1)
            orbits.append(orbit)
        return orbits

    @cached_property
    def order(self) -> int:
        return _order(self.v, self.rows, self.cols)

    def _build(self):
        orbits = [self._orbits(q) for q in range(self.colours)]
        n_orbits = len(orbits[0])
        if self.lanes <= n_orbits:
            blocks, per_orbit = -(-n_orbits // self.lanes), 1
        else:
            per_orbit = max(a for a in range(1, self.lanes // n_orbits + 1) if self.order % a == 0)
            blocks = 1
        self.blocks, self.lanes_per_orbit = blocks, per_orbit
        self.phase_cycles = blocks * self.order // per_orbit
        cycles = self.colours * self.phase_cycles
        cycles += -cycles % self.order  # the frame must come back to identity after every sweep
        # Entry shift per phase, chosen greedily to maximise the hazard slack.
        shifts = [0]
        for q in range(1, self.colours):
            best = None
            for k in range(self.order):
                self._layout(orbits, shifts + [k] + [0] * (self.colours - q - 1), cycles)
                slack = self._partial_slack(q)
                if best is None or slack > best[0]:
                    best = (slack, k)
            shifts.append(best[1])
        self.entry_shifts = tuple(shifts)
        self._layout(orbits, shifts, cycles)

    def _layout(self, orbits, shifts, cycles):
        L, seg = self.lanes, self.order // self.lanes_per_orbit
        schedule = np.full((cycles, L), -1, dtype=np.int32)
        stations = np.full((cycles, L, 2), -1, dtype=np.int32)  # physical station in use per cycle
        for q in range(self.colours):
            for m in range(self.blocks):
                tau0 = q * self.phase_cycles + m * seg
                for lane in range(L):
                    orbit_index, part = divmod(lane, self.lanes_per_orbit)
                    orbit_index += m * (L // self.lanes_per_orbit)
                    if orbit_index >= len(orbits[q]) or lane >= len(orbits[q]) * self.lanes_per_orbit:
                        continue
                    orbit = orbits[q][orbit_index]
                    first = (shifts[q] + part * seg) % self.order
                    start = self.position(orbit[first])
                    station = self.shift(start, -tau0)
                    for k in range(seg):
                        schedule[tau0 + k, lane] = orbit[(first + k) % self.order]
                        stations[tau0 + k, lane] = station
        self.schedule = schedule
        self._stations = stations
        self.__dict__.pop("update_cycle", None)
        self.__dict__.pop("update_lane", None)

    def _partial_slack(self, upto: int) -> int:
        colours = self.colouring.colours
        table = self.neighbours
        cyc = np.full(self.n, -1, dtype=np.int64)
        tau, lane = np.nonzero(self.schedule >= 0)
        cyc[self.schedule[tau, lane]] = tau
        i = np.repeat(np.arange(self.n), table.shape[1])
        j = table.reshape(-1)
        keep = (colours[i] <= upto) & (colours[j] <= upto)
        if upto == self.colours - 1:
            gap = (cyc[j[keep]] - cyc[i[keep]]) % self.cycles
        else:
            later = keep & (colours[j] > colours[i])
            gap = cyc[j[later]] - cyc[i[later]]
        return int(gap.min()) if len(gap) else self.cycles

    # -- wiring the gateware elaborates from
    @cached_property
    def lane_stations(self) -> list[list[tuple[int, int]]]:
        """Per lane, its distinct physical stations (row, col) in first-use order."""
        out = []
        for lane in range(self.lanes):
            seen = []
            for tau in range(self.cycles):
                st = tuple(int(x) for x in self._stations[tau, lane])
                if st[0] >= 0 and st not in seen:
                    seen.append(st)
            out.append(seen)
        return out

    @cached_property
    def station_select(self) -> np.ndarray:
        """(cycles, lanes) index into ``lane_stations[lane]`` used on each cycle (-1: idle)."""
        out = np.full((self.cycles, self.lanes), -1, dtype=np.int32)
        for tau in range(self.cycles):
            for lane in range(self.lanes):
                st = tuple(int(x) for x in self._stations[tau, lane])
                if st[0] >= 0:
                    out[tau, lane] = self.lane_stations[lane].index(st)
        return out

    def node_at(self, pos, tau: int) -> int:
        """Node held by physical position ``pos`` at sweep cycle ``tau``."""
        return self.node(*self.shift(pos, tau))

    @cached_property
    def capture_schedule(self) -> np.ndarray:
        """(cycles, lanes): node whose spin lane ``ℓ`` reports on cycle ``τ`` of a sweep (-1: none).

        During phase q a lane reports, at the station it used in phase q-1 for the same block, the spin of
        a colour-(q-1) node; phase 0 reports the last colour of the previous sweep. These spins are final
        for the sweep being captured (at least ``phase_cycles >= latency`` cycles old) and are not
        overwritten before they are read, so a full sample leaves the fabric while it keeps sampling.
        """
        out = np.full((self.cycles, self.lanes), -1, dtype=np.int32)
        for tau in range(self.colours * self.phase_cycles):
            q = tau // self.phase_cycles
            prev = tau - self.phase_cycles if q > 0 else tau + (self.colours - 1) * self.phase_cycles
            for lane in range(self.lanes):
                st = self._stations[prev, lane]
                if st[0] >= 0:
                    frame = tau if q > 0 else tau + self.cycles  # phase 0 shows the next sweep's frame
                    out[tau, lane] = self.node_at(tuple(st), frame)
        return out

    def describe(self) -> str:
        return (f"{self.config.describe()}: {self.colouring.kind} colouring ({self.colours} colours), "
                f"rotation {self.v}, {self.cycles} cycles/sweep, {self.updates_per_cycle:g} updates/cycle, "
                f"hazard slack {self.hazard_slack()}")


class VirtualGeometry(_Schedule):
    """Schedule for a general graph: DSATUR colour classes, nodes dealt to lanes round robin per phase."""

    def __init__(self, graph: SparseGraph | Grid, lanes: int = 8):
        if lanes < 1:
            raise ValueError(f"lanes must be positive, not {lanes}")
        self.graph = graph
        self.lanes = lanes
        colouring = dsatur(graph.neighbours)
        self.colouring = colouring
        rows = []
        for members in colouring.classes():
            for start in range(0, len(members), lanes):
                row = np.full(lanes, -1, dtype=np.int32)
                chunk = members[start:start + lanes]
                row[:len(chunk)] = chunk
                rows.append(row)
        self.schedule = np.array(rows, dtype=np.int32).reshape(-1, lanes)
        self._check_schedule()

    @property
    def n(self) -> int:
        return self.graph.n

    @property
    def neighbours(self) -> np.ndarray:
        return self.graph.neighbours

    @property
    def degree(self) -> int:
        return self.graph.degree

    @property
    def colours(self) -> int:
        return self.colouring.count

    def describe(self) -> str:
        return (f"virtual fabric for a {self.graph.describe()}: {self.colours} DSATUR colours, {self.lanes} lanes, "
                f"{self.cycles} cycles/sweep")
