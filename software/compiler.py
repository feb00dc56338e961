"""Compiler: float Ising/DTM layers → the fabric's fixed-point program (and its binary image).

A ``Program`` holds, per layer and in fabric node order, the quantised weights (one column per topology
offset, zero where the model has no edge), biases ``h``, conditioning couplings ``c`` and clamps; the
fabric geometry (schedule and colour phases); where each model node sits on the fabric; and a
quantisation report. ``Program.to_bytes`` gives the versioned image that travels over the UART; its
memory sections are in the order the fabric consumes them (per lane, per sweep cycle).

Image layout (little endian), version 1::

    "OTSU"  u16 version  u16 flags(0)
    u16 rows  u16 cols  u8 jumps  {i8 dr  i8 dc} × jumps  u16 lanes  u8 latency  u16 cycles  u8 degree
    u16 layers  u32 model_nodes  u16 model_rows  u16 model_cols  u8 model_torus
    f64 beta  f64 × 5 report (weight max/mean, bias max, field max/mean error)  u32 saturated
    per layer:  lanes × cycles weight words, ceil(7·degree/8) bytes each, weight d in bits [7d, 7d+7)
                lanes × cycles node words, u16: p = h + c in bits 7..0, q = h - c in bits 15..8
                (a clamped node: p = q = its clamp code ±127; see ``formats.node_words``)
    u32 CRC-32 of everything before it
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

import numpy as np

from .fabric import PRESETS, FabricConfig, FabricGeometry, VirtualGeometry, DEFAULT_LATENCY
from .formats import BIAS, CLAMP_MINUS, CLAMP_PLUS, COUPLING, EFFECTIVE_BIAS, WEIGHT, node_fields, node_words
from .model import IsingModel, ModelError
from .topology import Grid, SparseGraph, TopologyError, canonical_jump, opposite

__all__ = ["LayerCodes", "QuantReport", "Program", "ImageError", "FloatLayer", "choose_fabric", "compile_model",
           "compile_layers", "IMAGE_VERSION", "MAGIC"]

MAGIC = b"OTSU"
IMAGE_VERSION = 1


class ImageError(ValueError):
    """A program image that is corrupt, truncated or inconsistent."""


@dataclass(eq=False)
class FloatLayer:
    """One layer in model units (before β and quantisation), in model node order.

    ``c`` couples each node to its conditioning input (the DTM's x_t), so the node sees ``β·(h + c·x)``
    as its bias; zero for plain Ising models.
    """

    h: np.ndarray
    J: np.ndarray
    beta: float = 1.0
    c: np.ndarray | None = None
    clamp: np.ndarray | None = None

    def __post_init__(self):
        n = len(self.h)
        if self.c is None:
            self.c = np.zeros(n)
        if self.clamp is None:
            self.clamp = np.zeros(n, dtype=np.int8)


@dataclass(eq=False)
class LayerCodes:
    """A quantised layer in fabric node order: integer codes in 1/8 units (see ``opentsu.formats``).

    A clamped node has a zero weight row, zero ``bias`` and ``coupling``; its neighbours keep the
    couplings to it in their own rows."""

    weights: np.ndarray   # (n, degree) int16
    bias: np.ndarray      # (n,) int16, the h codes
    coupling: np.ndarray  # (n,) int16, the c codes
    clamp: np.ndarray     # (n,) int8: 0, +1, -1


@dataclass
class QuantReport:
    """Quantisation error introduced by the compiler, in field units (β·J, β·h), over all layers."""

    weight_max_error: float = 0.0
    weight_mean_error: float = 0.0
    bias_max_error: float = 0.0
    field_max_error: float = 0.0
    field_mean_error: float = 0.0
    saturated: int = 0

    @property
    def exact(self) -> bool:
        return self.weight_max_error == 0 and self.bias_max_error == 0 and self.saturated == 0

    def describe(self) -> str:
        if self.exact:
            return "compiled with no rounding"
        return (f"quantisation error: weights max {self.weight_max_error:.4g} mean {self.weight_mean_error:.4g}, "
                f"biases max {self.bias_max_error:.4g}, fields max {self.field_max_error:.4g} "
                f"mean {self.field_mean_error:.4g}, {self.saturated} values saturated")


@dataclass(eq=False)
class Program:
    """A compiled program: geometry, quantised layers, model placement and quantisation report."""

    geometry: FabricGeometry | VirtualGeometry
    layers: list[LayerCodes]
    node_map: np.ndarray                   # (n_model,) fabric node of each model node
    model_grid: tuple[int, int, bool] | None = None  # (rows, cols, torus) of the model, for grid models
    beta: float = 1.0
    report: QuantReport = field(default_factory=QuantReport)

    @property
    def n_model(self) -> int:
        return len(self.node_map)

    @property
    def lanes(self) -> int:
        return self.geometry.lanes

    @property
    def on_fabric(self) -> bool:
        return isinstance(self.geometry, FabricGeometry)

    # -- memory images, in consumption order
    def weight_image(self, layer: int) -> np.ndarray:
        """(lanes, cycles) uint64: the weight word each lane reads on each sweep cycle (0 when idle)."""
        codes = self.layers[layer].weights
        degree = codes.shape[1]
        packed = np.zeros(self.geometry.n, dtype=np.uint64)
        for d in range(degree):
            packed |= WEIGHT.to_unsigned(codes[:, d]).astype(np.uint64) << np.uint64(WEIGHT.bits * d)
        return _by_schedule(self.geometry.schedule, packed)

    def node_image(self, layer: int) -> np.ndarray:
        """(lanes, cycles) uint16: the node word (``formats.node_words``) each lane reads on each sweep cycle."""
        lay = self.layers[layer]
        words = node_words(lay.bias, lay.coupling, lay.clamp).astype(np.uint64)
        return _by_schedule(self.geometry.schedule, words).astype(np.uint16)

    def clamp_image(self, layer: int) -> np.ndarray:
        """(banks, cycles) uint16: the bias the zero-field sweep (RANDOMIZE) reads, two lanes per word:
        lane 2·bank in bits 7..0, lane 2·bank+1 in bits 15..8; 0 for a free node, its clamp code for a
        clamped one (so the sweep keeps clamps while every free node gets probability 1/2)."""
        lay = self.layers[layer]
        code = np.where(lay.clamp == 1, CLAMP_PLUS, np.where(lay.clamp == -1, CLAMP_MINUS, 0))
        per_lane = _by_schedule(self.geometry.schedule, EFFECTIVE_BIAS.to_unsigned(code).astype(np.uint64))
        lanes = per_lane.shape[0]
        if lanes % 2:
            per_lane = np.concatenate([per_lane, np.zeros((1, per_lane.shape[1]), dtype=per_lane.dtype)])
        return (per_lane[0::2] | per_lane[1::2] << np.uint64(8)).astype(np.uint16)

    # -- binary image
    def to_bytes(self) -> bytes:
        if not self.on_fabric:
            raise ImageError("general graphs have no fabric image; only the reference backend runs them")
        g = self.geometry
        cfg = g.config
        out = bytearray(MAGIC)
        out += struct.pack("<HH", IMAGE_VERSION, 0)
        out += struct.pack("<HHB", cfg.rows, cfg.cols, len(cfg.jumps))
        for dr, dc in g.grid.jumps:
            out += struct.pack("<bb", dr, dc)
        out += struct.pack("<HBHB", g.lanes, g.latency, g.cycles, g.degree)
        mr, mc, mt = self.model_grid
        out += struct.pack("<HIHHB", len(self.layers), self.n_model, mr, mc, int(mt))
        r = self.report
        out += struct.pack("<d5dI", self.beta, r.weight_max_error, r.weight_mean_error, r.bias_max_error,
                           r.field_max_error, r.field_mean_error, r.saturated)
        word_bytes = _weight_word_bytes(g.degree)
        for layer in range(len(self.layers)):
            weights = self.weight_image(layer).reshape(-1)
            out += b"".join(int(w).to_bytes(word_bytes, "little") for w in weights)
            out += self.node_image(layer).astype("<u2").tobytes()
        out += struct.pack("<I", zlib.crc32(out))
        return bytes(out)

    @classmethod
    def from_bytes(cls, data: bytes) -> "Program":
        """Decode and check an image. Raises ``ImageError`` naming the problem."""
        reader = _Reader(data)
        if len(data) < 8 or data[:4] != MAGIC:
            raise ImageError("not an OpenTSU program image (bad magic)")
        if len(data) < 12 or zlib.crc32(data[:-4]) != struct.unpack("<I", data[-4:])[0]:
            raise ImageError("image CRC mismatch: the file is corrupt or truncated")
        reader.take(4)
        version, _flags = reader.unpack("<HH")
        if version != IMAGE_VERSION:
            raise ImageError(f"image format version {version} is not supported (this build reads {IMAGE_VERSION})")
        rows, cols, n_jumps = reader.unpack("<HHB")
        jumps = tuple(reader.unpack("<bb") for _ in range(n_jumps))
        lanes, latency, cycles, degree = reader.unpack("<HBHB")
        n_layers, n_model, mr, mc, mt = reader.unpack("<HIHHB")
        beta, *errors, saturated = reader.unpack("<d5dI")
        try:
            geometry = FabricGeometry(FabricConfig(rows, cols, jumps, lanes, max(1, n_layers), latency))
        except (TopologyError, ValueError) as exc:
            raise ImageError(f"image describes an impossible fabric: {exc}") from None
        if geometry.cycles != cycles or geometry.degree != degree:
            raise ImageError("image schedule does not match its fabric description")
        if n_layers < 1:
            raise ImageError("image holds no layers")
        if not (0 < mr <= rows and 0 < mc <= cols and mr * mc == n_model) or (mt and (mr, mc) != (rows, cols)):
            raise ImageError(f"image places a {mr}×{mc} model on a {rows}×{cols} fabric")
        word_bytes = _weight_word_bytes(degree)
        layers = []
        for _ in range(n_layers):
            raw = reader.take(lanes * cycles * word_bytes)
            words = np.array([int.from_bytes(raw[k:k + word_bytes], "little")
                              for k in range(0, len(raw), word_bytes)], dtype=np.uint64).reshape(lanes, cycles)
            node_words = np.frombuffer(reader.take(lanes * cycles * 2), dtype="<u2").reshape(lanes, cycles)
            layers.append(_decode_layer(geometry, words, node_words))
        if reader.remaining() != 4:
            raise ImageError(f"image has {reader.remaining() - 4} unexpected trailing bytes")
        node_map = _grid_node_map(mr, mc, cols)
        report = QuantReport(*errors, saturated=saturated)
        return cls(geometry, layers, node_map, (mr, mc, bool(mt)), beta, report)


def _weight_word_bytes(degree: int) -> int:
    return (WEIGHT.bits * degree + 7) // 8


def _by_schedule(schedule: np.ndarray, per_node: np.ndarray) -> np.ndarray:
    safe = np.where(schedule >= 0, schedule, 0)
    return np.where(schedule >= 0, per_node[safe], 0).T.copy()


class _Reader:
    def __init__(self, data):
        self.data, self.pos = data, 0

    def take(self, count):
        if self.pos + count > len(self.data) - 4:
            raise ImageError("image is truncated")
        chunk = self.data[self.pos:self.pos + count]
        self.pos += count
        return chunk

    def unpack(self, fmt):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))

    def remaining(self):
        return len(self.data) - self.pos


def _decode_layer(geometry: FabricGeometry, words: np.ndarray, node_words: np.ndarray) -> LayerCodes:
    n, degree = geometry.n, geometry.degree
    weights = np.zeros((n, degree), dtype=np.int16)
    bias = np.zeros(n, dtype=np.int16)
    coupling = np.zeros(n, dtype=np.int16)
    clamp = np.zeros(n, dtype=np.int8)
    sched = geometry.schedule
    node_word_of = np.zeros(n, dtype=np.int64)
    for lane in range(geometry.lanes):
        for tau in range(geometry.cycles):
            node = sched[tau, lane]
            word, nword = int(words[lane, tau]), int(node_words[lane, tau])
            if node < 0:
                if word or nword:
                    raise ImageError(f"lane {lane} cycle {tau} is idle but its memory words are not zero")
                continue
            if word >> (WEIGHT.bits * degree):
                raise ImageError(f"weight word of node {node} has bits above its {degree} weights")
            for d in range(degree):
                weights[node, d] = WEIGHT.from_unsigned(word >> (WEIGHT.bits * d))
            node_word_of[node] = nword
    try:
        bias, coupling, clamp = node_fields(node_word_of)
    except ValueError as exc:
        raise ImageError(f"a {exc}") from None
    for name, codes, fmt in (("weight", weights, WEIGHT), ("bias", bias, BIAS), ("coupling", coupling, COUPLING)):
        if np.any(codes < fmt.min_code) or np.any(codes > fmt.max_code):
            raise ImageError(f"a {name} code lies outside [{fmt.min_code}, {fmt.max_code}]")
    if np.any(weights[clamp != 0]):
        raise ImageError("a clamped node's weight row is not zero")
    nbr = geometry.neighbours
    for d in range(degree):
        # J_ij = J_ji, read from whichever end is free (a clamped node's row is zero).
        both_free = (clamp == 0) & (clamp[nbr[:, d]] == 0)
        if not np.array_equal(weights[both_free, d], weights[nbr[both_free, d], opposite(d)]):
            raise ImageError("image weights are not symmetric (J_ij != J_ji)")
    return LayerCodes(weights, bias, coupling, clamp)


def _grid_node_map(model_rows: int, model_cols: int, fabric_cols: int) -> np.ndarray:
    r, c = np.divmod(np.arange(model_rows * model_cols), model_cols)
    return (r * fabric_cols + c).astype(np.int64)


# --------------------------------------------------------------------------------------------------
# fabric choice

def fits(grid: Grid, config: FabricConfig) -> str | None:
    """None when ``grid`` can run on ``config``, else the reason it cannot."""
    fabric_jumps = {canonical_jump(j) for j in config.jumps}
    missing = [j for j in grid.jumps if j not in fabric_jumps]
    if missing:
        return f"jumps {missing} are not wired in the fabric ({list(config.jumps)})"
    if grid.torus and (grid.rows, grid.cols) != (config.rows, config.cols):
        return f"a {grid.rows}×{grid.cols} torus needs a fabric of exactly that size, not {config.rows}×{config.cols}"
    if not grid.torus and (grid.rows > config.rows or grid.cols > config.cols):
        return f"a {grid.rows}×{grid.cols} grid does not fit a {config.rows}×{config.cols} fabric"
    return None


def _auto_config(grid: Grid, lanes: int | None) -> FabricConfig:
    rows, cols = grid.rows, grid.cols
    reach_r = max(abs(dr) for dr, _ in grid.offsets)
    reach_c = max(abs(dc) for _, dc in grid.offsets)
    if not grid.torus:
        rows, cols = max(rows + rows % 2, 2 * reach_r + 2), max(cols + cols % 2, 2 * reach_c + 2)
    lane_options = [lanes] if lanes else [8, 4, 2, 1]
    last_error = None
    for grow in range(0, 1 if grid.torus else 8):
        r, c = rows + 2 * grow, cols + 2 * grow
        for latency in (DEFAULT_LATENCY, 2, 1):
            for count in lane_options:
                config = FabricConfig(r, c, grid.jumps, count, 1, latency)
                try:
                    FabricGeometry(config)
                    return config
                except (TopologyError, ValueError) as exc:
                    last_error = exc
    raise TopologyError(f"no fabric runs {grid.describe()}: {last_error}")


def choose_fabric(topology: Grid | SparseGraph, fabric: str | FabricConfig | None = None,
                  lanes: int | None = None, layers: int = 1, allow_virtual: bool = False
                  ) -> FabricGeometry | VirtualGeometry:
    """The geometry a model runs on.

    ``fabric`` is a preset name (``icebreaker``, ``hx8k``, ``icestick``), ``"auto"`` (a fabric sized to the
    model), a ``FabricConfig``, or None: the iCEBreaker's fabric when the model fits it, else ``auto``.
    With ``allow_virtual`` (the reference backend), general graphs and grids no fabric can hold get a
    ``VirtualGeometry`` instead. Raises ``TopologyError`` when the model cannot run.
    """
    if isinstance(topology, SparseGraph):
        if not allow_virtual:
            raise TopologyError("the model has no grid; only the reference backend runs general graphs")
        return VirtualGeometry(topology, lanes or 8)
    if allow_virtual and fabric is None:
        try:
            return choose_fabric(topology, None, lanes, layers)
        except TopologyError:
            return VirtualGeometry(topology, lanes or 8)
    if isinstance(fabric, FabricConfig):
        config = fabric
    elif fabric is None:
        preset = PRESETS["icebreaker"]
        if fits(topology, preset) is None and layers <= preset.layers and lanes in (None, preset.lanes):
            config = preset
        else:
            config = _auto_config(topology, lanes)
    elif fabric == "auto":
        config = _auto_config(topology, lanes)
    elif fabric in PRESETS:
        config = PRESETS[fabric]
    else:
        raise TopologyError(f"unknown fabric {fabric!r}; choose from {', '.join(PRESETS)} or auto")
    reason = fits(topology, config)
    if reason:
        raise TopologyError(reason)
    if layers > config.layers:
        config = FabricConfig(config.rows, config.cols, config.jumps, config.lanes, layers, config.latency)
    return FabricGeometry(config)


# --------------------------------------------------------------------------------------------------
# compilation

def compile_layers(topology: Grid | SparseGraph, layers: list[FloatLayer], fabric=None,
                   lanes: int | None = None, allow_virtual: bool = False) -> Program:
    """Quantise ``layers`` (all on ``topology``) for the chosen fabric (see ``choose_fabric``). Raises
    ``ModelError`` or ``TopologyError`` naming the problem."""
    geometry = choose_fabric(topology, fabric, lanes, layers=len(layers), allow_virtual=allow_virtual)
    n_model = topology.n
    if isinstance(geometry, FabricGeometry):
        node_map = _grid_node_map(topology.rows, topology.cols, geometry.cols)
        model_grid = (topology.rows, topology.cols, topology.torus)
        model_nbr = _model_neighbours(topology, geometry)
    else:
        node_map = np.arange(n_model, dtype=np.int64)
        model_grid = None
        model_nbr = geometry.neighbours
    n, degree = geometry.n, geometry.degree
    inside = np.zeros(n, dtype=bool)
    inside[node_map] = True
    fabric_of = np.full(n, -1, dtype=np.int64)
    fabric_of[node_map] = np.arange(n_model)  # fabric node -> model node

    codes, report = [], QuantReport()
    w_err_sum = w_err_count = f_err_sum = 0.0
    beta = layers[0].beta if layers else 1.0
    for layer in layers:
        J = np.asarray(layer.J, dtype=np.float64)
        beta = float(layer.beta)
        # Dense model couplings gathered into the fabric's (node, offset) table.
        target = np.zeros((n, degree))
        model_i = fabric_of[np.arange(n)]
        for d in range(degree):
            model_j = model_nbr[:, d]
            ok = inside & (model_j >= 0)
            target[ok, d] = J[model_i[ok], model_j[ok]]
        placed = np.count_nonzero(target)
        if placed != np.count_nonzero(J):
            missing = np.argwhere(J != 0)
            placed_pairs = {(int(model_i[i]), int(model_nbr[i, d])) for i, d in np.argwhere(target != 0)}
            i, j = next((int(a), int(b)) for a, b in missing if (a, b) not in placed_pairs)
            raise ModelError(f"coupling J[{i},{j}] has no place on the fabric ({geometry.describe()})")
        scaled_w = beta * target
        w_codes, w_sat = WEIGHT.quantize(scaled_w)
        h_full = np.zeros(n)
        h_full[node_map] = layer.h
        c_full = np.zeros(n)
        c_full[node_map] = layer.c
        b_codes, b_sat = BIAS.quantize(beta * h_full)
        c_codes, c_sat = COUPLING.quantize(beta * c_full)
        clamp = np.ones(n, dtype=np.int8)  # padding nodes sit at +1 and couple to nothing
        clamp[node_map] = np.asarray(layer.clamp, dtype=np.int8)
        # A clamp overrides bias, conditioning and the node's own neighbour sum: zero them, so every
        # layer has one encoding and the fabric's clamp is simply a zero row with a ±127 bias code.
        b_codes = np.where(clamp != 0, 0, b_codes).astype(np.int16)
        c_codes = np.where(clamp != 0, 0, c_codes).astype(np.int16)
        w_codes = np.where((clamp != 0)[:, None], 0, w_codes).astype(np.int16)
        codes.append(LayerCodes(w_codes, b_codes, c_codes, clamp))

        # A clamped node's own row is zero on purpose (its neighbours carry the couplings): not an error.
        w_err = np.where((clamp != 0)[:, None], 0.0, np.abs(scaled_w - WEIGHT.to_float(w_codes)))
        free = clamp == 0  # a clamped node's h and c do not matter
        b_err = np.where(free, np.abs(beta * h_full - BIAS.to_float(b_codes)), 0.0)
        c_err = np.where(free, np.abs(beta * c_full - COUPLING.to_float(c_codes)), 0.0)
        edge = (target != 0) & (clamp == 0)[:, None]
        report.weight_max_error = max(report.weight_max_error, float(w_err.max(initial=0)))
        w_err_sum += float(w_err[edge].sum())
        w_err_count += int(edge.sum())
        report.bias_max_error = max(report.bias_max_error, float(b_err.max(initial=0)), float(c_err.max(initial=0)))
        field_err = (b_err + c_err + w_err.sum(axis=1))[node_map]
        report.field_max_error = max(report.field_max_error, float(field_err.max(initial=0)))
        f_err_sum += float(field_err.mean()) / len(layers)
        report.saturated += int(w_sat[edge].sum() + (b_sat & free).sum() + (c_sat & free).sum())
    report.weight_mean_error = w_err_sum / w_err_count if w_err_count else 0.0
    report.field_mean_error = f_err_sum
    return Program(geometry, codes, node_map, model_grid, beta, report)


def _model_neighbours(grid: Grid, geometry: FabricGeometry) -> np.ndarray:
    """(n_fabric, degree): the model node each fabric offset reaches from a model node, -1 if none."""
    n, degree = geometry.n, geometry.degree
    out = np.full((n, degree), -1, dtype=np.int64)
    fr, fc = np.divmod(np.arange(n), geometry.cols)
    model_jumps = set(grid.jumps)
    for d, (dr, dc) in enumerate(geometry.offsets):
        if canonical_jump((dr, dc)) not in model_jumps:
            continue
        inside = (fr < grid.rows) & (fc < grid.cols)
        rr, cc = fr + dr, fc + dc
        if grid.torus:
            rr, cc = rr % grid.rows, cc % grid.cols
        else:
            inside &= (rr >= 0) & (rr < grid.rows) & (cc >= 0) & (cc < grid.cols)
        out[inside, d] = (rr * grid.cols + cc)[inside]
    return out


def compile_model(model: IsingModel, fabric=None, lanes: int | None = None, allow_virtual: bool = False) -> Program:
    """Compile a contract §1 model (one layer)."""
    return compile_layers(model.topology, [FloatLayer(model.h, model.J, model.beta, None, model.clamp)], fabric,
                          lanes, allow_virtual)
