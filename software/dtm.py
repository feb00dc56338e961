"""Denoising Thermodynamic Models (DTMs) on the fabric: forward process, conditional EBMs, training, chain.

A DTM (Jelinčič et al., arXiv 2510.23972) learns to undo a binary forward process one step at a time. The
forward process flips every pixel of an image ``x_0 ∈ {-1,+1}^V`` independently, with probability ``p_t`` at
step ``t = 1..T``; after ``t`` steps a pixel is flipped with the cumulative probability
``q_t = (1 - Π_{s<=t} (1 - 2 p_s)) / 2``, and ``q_T ≈ 1/2`` makes ``x_T`` uniform noise.

Step ``t`` of the reverse process is a conditional Ising model on a fabric grid (one fabric layer). Its spins
``s = (v, z)`` are the visible nodes ``v = x_{t-1}`` (one pixel each, all in one colour class) and latent nodes
``z`` (every other node), and each visible node is coupled to its own pixel of the conditioning input ``x_t``::

    P_t(v, z | x_t) ∝ exp( Σ_i h_i s_i + Σ_{(i,j)∈E} J_ij s_i s_j + Σ_{i∈V} c_i x_{t,i} s_i )

On the fabric, ``LOAD`` of layer ``t - 1`` makes each node's bias ``h_i + c_i·x_i`` with ``x_i`` the node's
current spin, i.e. the visible output of the previous layer: the whole chain (``chain_sequence``) runs on the
fabric and the host only reads the final images.

Training maximises ``log P_t(x_{t-1} | x_t)`` over forward-process pairs with the two-phase gradient
``⟨∂φ⟩_{z | x_{t-1}, x_t} - ⟨∂φ⟩_{v, z | x_t}``, both phases estimated by block Gibbs on the emulator's kernel
with the model's quantised codes (so training is quantisation-aware throughout and the fabric runs what was
trained). The negative chains start from fresh noise and run ``sweeps`` sweeps, exactly like the chain on
the fabric. The steps are independent given the forward process, so all of them train in parallel.

The adaptive correlation penalty (ACP) keeps every layer's chain mixing: the gradient of each coupling gets
a term ``-λ_t · Cov_t(s_i, s_j | x_t)`` that pulls the model toward the product of its conditional marginals,
and ``λ_t`` is raised while the layer's measured lag-``sweeps`` autocorrelation exceeds a threshold and
lowered otherwise (see ``docs/dtm.md``).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib import resources

import numpy as np

from .emulator import FORCE as _FORCE  # the kernel's clamp: a bias beyond any field
from .fabric import PRESETS
from .formats import BIAS, COUPLING, WEIGHT
from .sequence import Op, Opcode
from .topology import Grid, TopologyError, colour, parse_jumps

__all__ = [
    "DTMError", "cumulative_flips", "geometric_schedule", "flip", "forward_pair", "Layout", "DTM", "chain_sequence",
    "sample", "sample_float", "TrainConfig", "StepTrainer", "train", "default_model_path", "default_mebm_path",
    "load", "save", "register",
]

#: The grid's jumps by default: the iCEBreaker fabric's, so a trained model runs on that board as it is.
DEFAULT_JUMPS = PRESETS["icebreaker"].jumps
_FORMAT = "opentsu-dtm"
_VERSION = 1


class DTMError(ValueError):
    """A DTM file or request that cannot be used. The message names the problem."""


def single_blas_thread():
    """A context in which BLAS runs on one thread: the products here are small, and on shared cores extra
    BLAS threads only spin against the emulator kernel and the other training steps."""
    try:
        from threadpoolctl import threadpool_limits  # installed with scikit-learn
    except ImportError:  # pragma: no cover
        import contextlib
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


# --------------------------------------------------------------------------------------------------
# forward process

def cumulative_flips(flips) -> np.ndarray:
    """``q_t`` for t = 0..T: the probability that a pixel of ``x_t`` differs from ``x_0``."""
    flips = np.asarray(flips, dtype=np.float64)
    return np.concatenate([[0.0], (1.0 - np.cumprod(1.0 - 2.0 * flips)) / 2.0])


def geometric_schedule(steps: int, final: float = 0.03, total: float = 0.495) -> np.ndarray:
    """Per-step flip probabilities ``p_1..p_T`` growing geometrically from ``p_1 = final`` so that the
    cumulative flip probability after ``T`` steps is ``total``. With one step, ``p_1 = total``."""
    if steps < 1:
        raise DTMError(f"a schedule needs at least one step, not {steps}")
    if not 0 < total <= 0.5:
        raise DTMError(f"the total flip probability must be in (0, 0.5], not {total}")
    if steps == 1:
        return np.array([total])
    if not 0 < final < 0.5:
        raise DTMError(f"the final flip probability must be in (0, 0.5), not {final}")
    if cumulative_flips(np.full(steps, final))[-1] >= total:
        raise DTMError(f"{steps} steps of flip probability {final} already exceed a total of {total}")

    def flips(ratio):
        return np.minimum(final * ratio ** np.arange(steps), 0.5)

    lo, hi = 1.0, 2.0
    while cumulative_flips(flips(hi))[-1] < total:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cumulative_flips(flips(mid))[-1] < total else (lo, mid)
    return flips(hi)


def flip(x: np.ndarray, p: float, rng: np.random.Generator) -> np.ndarray:
    """``x`` (±1) with every entry flipped independently with probability ``p``."""
    x = np.asarray(x)
    return np.where(rng.random(x.shape) < p, -x, x).astype(x.dtype)


def forward_pair(x0: np.ndarray, flips, t: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A draw of ``(x_{t-1}, x_t)`` from the forward process started at ``x0`` (±1), for ``t`` in 1..T."""
    q = cumulative_flips(flips)
    previous = flip(x0, q[t - 1], rng)
    return previous, flip(previous, flips[t - 1], rng)


# --------------------------------------------------------------------------------------------------
# layout

@dataclass(frozen=True, eq=False)
class Layout:
    """Where the pixels of an ``image_shape`` image sit on a grid: ``visible[k]`` is the node of pixel ``k``
    (row-major). All visible nodes share one colour class; every other node is a latent."""

    grid: Grid
    visible: np.ndarray
    image_shape: tuple[int, int]

    def __post_init__(self):
        object.__setattr__(self, "image_shape", tuple(int(v) for v in self.image_shape))
        height, width = self.image_shape
        visible = np.asarray(self.visible, dtype=np.int64)
        object.__setattr__(self, "visible", visible)
        if visible.shape != (height * width,):
            raise DTMError(f"{height}×{width} images need {height * width} visible nodes, not {visible.shape}")
        if visible.min() < 0 or visible.max() >= self.grid.n or len(set(visible.tolist())) != len(visible):
            raise DTMError("visible nodes must be distinct nodes of the grid")
        colours = self.colouring.colours[visible]
        if np.any(colours != colours[0]):
            raise DTMError("the visible nodes must all lie in one colour class")

    @classmethod
    def spaced(cls, height: int, width: int, jumps=DEFAULT_JUMPS, spacing: int = 2) -> "Layout":
        """Pixel (i, j) on node (spacing·i, spacing·j) of a (spacing·H)×(spacing·W) torus: with spacing 2 and
        odd jumps the pixels fill one checkerboard class at a quarter of the nodes."""
        grid = Grid(spacing * height, spacing * width, tuple(jumps), torus=True)
        i, j = np.divmod(np.arange(height * width), width)
        return cls(grid, spacing * i * grid.cols + spacing * j, (height, width))

    @classmethod
    def diamond(cls, height: int, width: int, jumps=DEFAULT_JUMPS, size: int | None = None) -> "Layout":
        """Pixel (i, j) on node (i + j, i - j) of a ``size``×``size`` torus (default ``2·max(H, W)``): the
        image turned by 45° into a diamond of one checkerboard class, neighbouring pixels diagonal to each
        other, so that every latent inside the image touches up to eight pixels."""
        size = size or 2 * max(height, width)
        grid = Grid(size, size, tuple(jumps), torus=True)
        i, j = np.divmod(np.arange(height * width), width)
        return cls(grid, ((i + j) % size) * size + (i - j) % size, (height, width))

    @property
    def colouring(self):
        return colour(self.grid)

    @property
    def n(self) -> int:
        return self.grid.n

    @property
    def latent(self) -> np.ndarray:
        mask = np.ones(self.n, dtype=bool)
        mask[self.visible] = False
        return np.flatnonzero(mask)


def _edge_table(grid: Grid, edges: np.ndarray) -> np.ndarray:
    """(n, degree): the index in ``edges`` of the edge each neighbour-table entry stands for, -1 for none."""
    n = grid.n
    lookup = {(int(a), int(b)): k for k, (a, b) in enumerate(edges)}
    nbr = grid.neighbours
    table = np.full(nbr.shape, -1, dtype=np.int64)
    for i in range(n):
        for d, j in enumerate(nbr[i]):
            if j >= 0:
                table[i, d] = lookup.get((min(i, int(j)), max(i, int(j))), -1)
    return table


# --------------------------------------------------------------------------------------------------
# the model

@dataclass(eq=False)
class DTM:
    """A trained (or initial) DTM: ``layout``, per-step flip probabilities ``flips`` (p_1..p_T), Gibbs
    ``sweeps`` per step, and per-step parameters ``h`` (T, n), ``J`` (T, E) on ``edges`` (E, 2), ``c`` (T, n).

    Index ``t - 1`` of every per-step array is step ``t`` (layer ``t - 1`` on the fabric); ``c`` is zero off
    the visible nodes. ``info`` carries free-form metadata (training configuration, timings).
    """

    layout: Layout
    flips: np.ndarray
    sweeps: int
    h: np.ndarray
    J: np.ndarray
    c: np.ndarray
    edges: np.ndarray
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        self.flips = np.asarray(self.flips, dtype=np.float64).reshape(-1)
        steps, n = self.steps, self.layout.n
        self.edges = np.asarray(self.edges, dtype=np.int64).reshape(-1, 2)
        self.h = np.asarray(self.h, dtype=np.float64).reshape(steps, n)
        self.J = np.asarray(self.J, dtype=np.float64).reshape(steps, len(self.edges))
        self.c = np.asarray(self.c, dtype=np.float64).reshape(steps, n)
        if not (np.all(self.flips > 0) and np.all(self.flips <= 0.5)):
            raise DTMError("flip probabilities must lie in (0, 0.5]")
        if int(self.sweeps) < 1:
            raise DTMError(f"sweeps per step must be positive, not {self.sweeps}")
        self.sweeps = int(self.sweeps)
        for name in ("h", "J", "c"):
            if not np.all(np.isfinite(getattr(self, name))):
                raise DTMError(f"{name} has non-finite values")
        off = np.ones(n, dtype=bool)
        off[self.layout.visible] = False
        if np.any(self.c[:, off] != 0):
            raise DTMError("conditioning couplings c must be zero off the visible nodes")

    @classmethod
    def initial(cls, layout: Layout, flips, sweeps: int, data: np.ndarray | None = None, init_scale: float = 0.15,
                seed: int = 0) -> "DTM":
        """A starting point for training: each layer is the exact reverse step for independent pixels
        (visible biases from the pixel means of ``data``, ±1 of shape (N, V); ``c_t = atanh(1 - 2 p_t)``),
        with random couplings of standard deviation ``init_scale`` to break the latents' symmetry."""
        flips = np.asarray(flips, dtype=np.float64)
        steps, n = len(flips), layout.n
        edges = layout.grid.edges
        rng = np.random.default_rng(seed)
        mean = np.zeros(len(layout.visible)) if data is None else np.asarray(data, dtype=np.float64).mean(axis=0)
        q = cumulative_flips(flips)
        h = np.zeros((steps, n))
        c = np.zeros((steps, n))
        for t in range(1, steps + 1):
            prior = np.clip(mean * (1 - 2 * q[t - 1]), -0.96, 0.96)
            h[t - 1, layout.visible] = np.arctanh(prior)
            if flips[t - 1] < 0.5:
                c[t - 1, layout.visible] = np.arctanh(1 - 2 * flips[t - 1])
        J = rng.normal(0.0, init_scale, size=(steps, len(edges)))
        return cls(layout, flips, sweeps, h, J, c, edges)

    # -- facts
    @property
    def steps(self) -> int:
        return len(self.flips)

    @property
    def image_shape(self) -> tuple[int, int]:
        return self.layout.image_shape

    @property
    def total_sweeps(self) -> int:
        return self.steps * self.sweeps

    def describe(self) -> str:
        g = self.layout.grid
        height, width = self.image_shape
        return (f"DTM: {self.steps} steps × {self.sweeps} sweeps, {height}×{width} images on a {g.describe()} "
                f"({len(self.layout.visible)} visible, {g.n - len(self.layout.visible)} latent nodes), "
                f"flips {np.array2string(self.flips, precision=3, separator=', ')}")

    # -- fabric
    def dense_J(self, t: int) -> np.ndarray:
        """The (n, n) couplings of step ``t`` (1..T)."""
        n = self.layout.n
        J = np.zeros((n, n))
        a, b = self.edges[:, 0], self.edges[:, 1]
        J[a, b] = J[b, a] = self.J[t - 1]
        return J

    def layers(self):
        """The fabric layers in layer order (layer ``t - 1`` is step ``t``), as the compiler's FloatLayers."""
        from .compiler import FloatLayer
        return [FloatLayer(self.h[t - 1].copy(), self.dense_J(t), 1.0, self.c[t - 1].copy())
                for t in range(1, self.steps + 1)]

    def compile(self, fabric="icebreaker", allow_virtual: bool = False):
        """Compile all T layers for one fabric (``compiler.compile_layers``); the layers stay resident."""
        from .compiler import compile_layers
        return compile_layers(self.layout.grid, self.layers(), fabric=fabric, allow_virtual=allow_virtual)

    def quantised(self) -> "DTM":
        """This model with every value rounded to the fabric's 1/8 grid exactly as the compiler rounds it."""
        h = BIAS.to_float(BIAS.quantize(self.h)[0])
        J = WEIGHT.to_float(WEIGHT.quantize(self.J)[0])
        c = COUPLING.to_float(COUPLING.quantize(self.c)[0])
        return DTM(self.layout, self.flips, self.sweeps, h, J, c, self.edges, dict(self.info))

    def to_images(self, spins: np.ndarray) -> np.ndarray:
        """(N, n) model spins → (N, H, W) uint8 images of the visible nodes (+1 → 1, -1 → 0)."""
        visible = np.asarray(spins)[:, self.layout.visible]
        return (visible > 0).astype(np.uint8).reshape(-1, *self.image_shape)


def chain_sequence(steps: int, sweeps: int, captures: int = 1) -> list[Op]:
    """The fabric sequence that runs a whole T-step denoising chain (layer ``t - 1`` is step ``t``).

    ``LOAD T-1; RANDOMIZE`` makes ``x_T`` uniform noise; then, for t = T..1, ``LOAD t-1`` latches
    ``h + c·x_t`` from the current visible spins, ``RANDOMIZE`` starts the chain for ``x_{t-1}`` afresh and
    ``SWEEP sweeps`` runs it; a final ``CAPTURE`` emits ``x_0`` (the visible nodes of the model spins).
    """
    if steps < 1 or sweeps < 1 or captures < 1:
        raise DTMError("a chain needs at least one step, one sweep and one capture")
    ops = [Op(Opcode.LOAD, steps - 1), Op(Opcode.RANDOMIZE)]
    for t in range(steps, 0, -1):
        ops += [Op(Opcode.LOAD, t - 1), Op(Opcode.RANDOMIZE), Op(Opcode.SWEEP, sweeps)]
    return ops + [Op(Opcode.CAPTURE, captures)]


# --------------------------------------------------------------------------------------------------
# files

def default_model_path() -> str:
    """The shipped DTM: scikit-learn's 8×8 digits binarized at value >= 8, for the iCEBreaker fabric."""
    return str(resources.files("opentsu") / "data" / "dtm_digits.npz")


def default_mebm_path() -> str:
    """The shipped single-step baseline (MEBM) of the same size, trained like the DTM."""
    return str(resources.files("opentsu") / "data" / "mebm_digits.npz")


def save(path, model: DTM):
    """Write ``model`` as a ``.npz`` file (atomically)."""
    from .fileio import atomic_write
    g = model.layout.grid
    arrays = dict(
        format=np.array(_FORMAT), version=np.int64(_VERSION), grid=np.array([g.rows, g.cols], dtype=np.int64),
        jumps=np.array(g.jumps, dtype=np.int64), torus=np.bool_(g.torus), visible=model.layout.visible,
        image_shape=np.array(model.image_shape, dtype=np.int64), flips=model.flips, sweeps=np.int64(model.sweeps),
        h=model.h, J=model.J, c=model.c, edges=model.edges.astype(np.int32), info=np.array(json.dumps(model.info)),
    )
    with atomic_write(path) as f:
        np.savez_compressed(f, **arrays)


def load(path) -> DTM:
    """Read a DTM file. Raises ``DTMError`` naming the problem."""
    from .fileio import npz_arrays, open_npz
    path = os.fspath(path)
    archive = open_npz(path, DTMError, "DTM file")
    with archive:
        keys = set(archive.files)
        if "format" not in keys or str(npz_arrays(archive, ["format"], DTMError, path)["format"]) != _FORMAT:
            raise DTMError(f"{path}: not an OpenTSU DTM file (no format key '{_FORMAT}')")
        missing = {"grid", "jumps", "torus", "visible", "image_shape", "flips", "sweeps", "h", "J", "c", "edges"} - keys
        if missing:
            raise DTMError(f"{path}: missing key(s) {', '.join(sorted(missing))}")
        a = npz_arrays(archive, keys, DTMError, path)
    for key in ("version", "grid", "jumps", "visible", "image_shape", "edges", "sweeps"):
        if key in a and a[key].dtype.kind not in "iu":
            raise DTMError(f"{path}: {key} must hold integers, got dtype {a[key].dtype}")
    for key in ("flips", "h", "J", "c"):
        if a[key].dtype.kind not in "iuf":
            raise DTMError(f"{path}: {key} must hold real numbers, got dtype {a[key].dtype}")
    version = a.get("version", np.int64(0))
    if version.shape != ():
        raise DTMError(f"{path}: version must be one integer, got an array of shape {version.shape}")
    if int(version) != _VERSION:
        raise DTMError(f"{path}: DTM file version {int(version)} is not supported (this build reads {_VERSION})")
    from .topology import TopologyError
    try:
        rows, cols = (int(v) for v in a["grid"])
        if a["h"].ndim != 2 or rows * cols != a["h"].shape[1]:
            raise DTMError(f"grid {rows}×{cols} does not match h of shape {a['h'].shape} (layers, nodes)")
        grid = Grid(rows, cols, tuple(tuple(int(x) for x in j) for j in a["jumps"]), bool(a["torus"]))
        layout = Layout(grid, a["visible"].reshape(-1), tuple(int(v) for v in a["image_shape"]))
        edges = a["edges"].astype(np.int64)
        if edges.ndim != 2 or edges.shape[1] != 2 or not np.array_equal(edges, grid.edges):
            raise DTMError("the edge list does not match the grid")
        info = json.loads(str(a["info"])) if "info" in a else {}
        return DTM(layout, a["flips"], int(a["sweeps"]), a["h"], a["J"], a["c"], edges, info)
    except (DTMError, TopologyError, ValueError, TypeError) as exc:
        raise DTMError(f"{path}: {exc}") from None


# --------------------------------------------------------------------------------------------------
# Gibbs engines

class _KernelEngine:
    """Block-Gibbs over many chains of one grid with the emulator's C kernel: integer codes and the fabric's
    own p-bit, so the chains are those of the fabric up to the order of updates inside a colour class."""

    def __init__(self, layout: Layout, edges: np.ndarray):
        from . import _kernel
        from .emulator import key_thresholds
        grid = layout.grid
        self._kernel = _kernel
        self.n, self.degree = grid.n, grid.degree
        nbr = grid.neighbours
        self.nbr = np.ascontiguousarray(np.where(nbr >= 0, nbr, 0), dtype=np.int32)
        self.edge_of = _edge_table(grid, edges)
        colours = layout.colouring.colours
        self.classes = [np.flatnonzero(colours == k) for k in range(int(colours.max()) + 1)]
        self.order = np.ascontiguousarray(np.concatenate(self.classes).reshape(-1, 1), dtype=np.int32)
        self.keys = key_thresholds()

    #: Bias that clamps a node; the value of one unit of field; the type of biases.
    force, unit, bias_type = _FORCE, 1.0 / 8, np.int16

    def weight_codes(self, J: np.ndarray) -> np.ndarray:
        codes = WEIGHT.quantize(J)[0]
        table = np.where(self.edge_of >= 0, codes[np.maximum(self.edge_of, 0)], 0)
        return np.ascontiguousarray(table, dtype=np.int16)

    def params(self, h, J, c):
        """The layer as the engine runs it: (weights (n, degree), h, c) in its own units (here, codes)."""
        return (self.weight_codes(J), BIAS.quantize(h)[0].astype(np.int16), COUPLING.quantize(c)[0].astype(np.int16))

    def new_streams(self, chains: int, rng: np.random.Generator):
        state = rng.integers(1, 1 << 32, size=(2, 1, chains), dtype=np.uint32)
        return np.ascontiguousarray(state[0]), np.ascontiguousarray(state[1])

    def run(self, spins, bias, streams, weights, sweeps: int, randomize: bool = False):
        """``sweeps`` sweeps in place; ``spins`` (n, chains) int8, ``bias`` (n, chains) int16 (±4096 clamps)."""
        chains = spins.shape[1]
        self._kernel.sweeps(spins, bias, streams[0], streams[1], self.order, self.nbr, weights, self.keys, chains,
                            self.order.shape[0], 1, self.degree, sweeps, randomize, 0, chains)


class _FloatEngine(_KernelEngine):
    """The same block Gibbs with float parameters and exact conditionals ``P(s=+1) = σ(2·field)`` (numpy):
    the float model, for training without quantisation. About 15× slower than the kernel."""

    force, unit, bias_type = 1e4, 1.0, np.float32

    def params(self, h, J, c):
        table = np.where(self.edge_of >= 0, J[np.maximum(self.edge_of, 0)], 0.0).astype(np.float32)
        return table, h.astype(np.float32), c.astype(np.float32)

    def new_streams(self, chains: int, rng: np.random.Generator):
        return (np.random.default_rng(rng.integers(1 << 63)),)

    def run(self, spins, bias, streams, weights, sweeps: int, randomize: bool = False):
        rng = streams[0]
        clamped = np.abs(bias) >= self.force
        if randomize:
            fresh = np.where(rng.random(spins.shape, dtype=np.float32) < 0.5, 1, -1)
            spins[:] = np.where(clamped, np.sign(bias), fresh)
            return
        dense = np.zeros((self.n, self.n), dtype=np.float32)
        np.add.at(dense, (np.repeat(np.arange(self.n), self.degree), self.nbr.reshape(-1)), weights.reshape(-1))
        state = spins.astype(np.float32)
        for _ in range(sweeps):
            for members in self.classes:
                field = bias[members] + dense[members] @ state
                p = 0.5 * (1 + np.tanh(field))
                state[members] = np.where(rng.random(p.shape, dtype=np.float32) < p, 1.0, -1.0)
        spins[:] = state.astype(np.int8)


def sample_float(model: DTM, n: int, seed: int = 0, sweeps: int | None = None, batch: int = 1000) -> np.ndarray:
    """The chain of ``chain_sequence`` run with the float model and exact Gibbs conditionals (numpy):
    (n, H, W) uint8 images. This is the float reference that the quantised fabric path is compared with."""
    rng = np.random.default_rng(seed)
    engine = _FloatEngine(model.layout, model.edges)
    layers = [engine.params(model.h[t], model.J[t], model.c[t]) for t in range(model.steps)]
    out = []
    for start in range(0, n, batch):
        count = min(batch, n - start)
        streams = engine.new_streams(count, rng)
        spins = np.ones((model.layout.n, count), dtype=np.int8)
        engine.run(spins, np.zeros(spins.shape, np.float32), streams, layers[0][0], 1, randomize=True)
        for t in range(model.steps, 0, -1):
            weights, h, c = layers[t - 1]
            bias = h[:, None] + c[:, None] * spins
            engine.run(spins, bias, streams, weights, 1, randomize=True)
            engine.run(spins, bias, streams, weights, sweeps or model.sweeps)
        out.append(model.to_images(spins.T))
    return np.concatenate(out, axis=0) if out else np.zeros((0, *model.image_shape), np.uint8)


def sample(model: DTM, n: int, seed: int = 0, backend: str = "reference", fabric="icebreaker", port=None,
           program=None, entropy: str = "prng") -> np.ndarray:
    """Run the whole chain on a backend: (n, H, W) uint8 images, one chain per image.

    ``reference`` is the bit-exact emulator running ``chain_sequence`` on the compiled program; ``float``
    is ``sample_float``. Other backends run the same program and sequence through ``opentsu.backends``,
    ``entropy="trng"`` with the device's TRNG mixed into the lanes.
    """
    if n < 0:
        raise DTMError(f"sample count must be non-negative, not {n}")
    if backend == "float":
        return sample_float(model, n, seed)
    program = program or model.compile(fabric)
    ops = chain_sequence(model.steps, model.sweeps)
    if n == 0:
        return np.zeros((0, *model.image_shape), np.uint8)
    if backend == "reference":
        from .emulator import Emulator
        emu = Emulator(program, chains=n, seed=seed)
        try:
            captured = emu.run(ops)
        finally:
            emu.close()
    else:
        from . import backends
        from .cli import DeviceError
        run_sequence = getattr(backends, "run_sequence", None)
        if run_sequence is None:
            raise DeviceError(f"the {backend} backend cannot run fabric sequences in this build yet")
        captured = run_sequence(backend, program, ops, n, seed, port=port, entropy=entropy)
    return model.to_images(captured[:, -1])


# --------------------------------------------------------------------------------------------------
# training

@dataclass
class TrainConfig:
    """Everything that determines a training run (with ``seed``, the run is reproducible)."""

    steps: int = 8
    final_flip: float = 0.03
    total_flip: float = 0.495
    flips: tuple | None = None          # explicit p_1..p_T, overriding the geometric schedule
    sweeps: int = 50                    # negative-phase sweeps = generation sweeps per step
    positive_sweeps: int = 20           # sweeps of the latents with x_{t-1} and x_t clamped
    batch: int = 256                    # data pairs per iteration (the negative phase runs 2 chains each)
    iterations: int = 3000
    learning_rate: float = 0.03
    final_learning_rate: float = 0.003
    weight_decay: float = 1e-4
    init_scale: float = 0.15
    acp: bool = True
    acp_threshold: float = 0.05         # target lag-`sweeps` autocorrelation of the visible nodes
    acp_every: int = 10
    acp_rate: float = 0.2
    acp_floor: float = 0.01
    seed: int = 0
    engine: str = "fabric"              # "fabric": the kernel with quantised codes; "float": exact float Gibbs
    layout: str = "spaced"              # "spaced" (Layout.spaced) or "diamond" (Layout.diamond)
    spacing: int = 2
    jumps: tuple = DEFAULT_JUMPS

    def schedule(self) -> np.ndarray:
        if self.flips is not None:
            flips = np.asarray(self.flips, dtype=np.float64)
            if len(flips) != self.steps:
                raise DTMError(f"{len(flips)} flip probabilities given for {self.steps} steps")
            return flips
        return geometric_schedule(self.steps, self.final_flip, self.total_flip)


class _Adam:
    def __init__(self, shapes, beta1=0.9, beta2=0.999, eps=1e-8):
        self.m = [np.zeros(s) for s in shapes]
        self.v = [np.zeros(s) for s in shapes]
        self.beta1, self.beta2, self.eps, self.count = beta1, beta2, eps, 0

    def ascend(self, params, grads, lr):
        self.count += 1
        b1, b2 = self.beta1, self.beta2
        for p, g, m, v in zip(params, grads, self.m, self.v):
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * g * g
            p += lr * (m / (1 - b1 ** self.count)) / (np.sqrt(v / (1 - b2 ** self.count)) + self.eps)


class StepTrainer:
    """Trains step ``t`` of ``model`` in place (its rows ``t - 1`` of h, J and c) on ±1 ``data`` (N, V)."""

    def __init__(self, model: DTM, t: int, data: np.ndarray, config: TrainConfig, engine: _KernelEngine | None = None):
        self.model, self.t, self.config = model, t, config
        self.data = np.asarray(data, dtype=np.int8)
        self.engine = engine or _KernelEngine(model.layout, model.edges)
        self.rng = np.random.default_rng([config.seed, t])
        self.flip_prob = float(model.flips[t - 1])
        self.previous_flip = float(cumulative_flips(model.flips)[t - 1])
        self.conditioned = self.flip_prob < 0.5
        layout = model.layout
        self.visible = layout.visible
        self.edge_a, self.edge_b = model.edges[:, 0], model.edges[:, 1]
        self.last = self.engine.classes[-1]
        self.adam = _Adam([model.h.shape[1], model.J.shape[1], len(self.visible)])
        self.acp_lambda = 0.0
        self.autocorrelation = float("nan")
        self.iteration = 0
        B = config.batch
        self._pos_streams = self.engine.new_streams(B, self.rng)
        self._neg_streams = self.engine.new_streams(2 * B, self.rng)

    # -- statistics
    def _codes(self):
        m, i = self.model, self.t - 1
        return self.engine.params(m.h[i], m.J[i], m.c[i])

    def _expected(self, spins, bias, weights):
        """(chains, n) float32: the spins with the last colour class replaced by its conditional means
        (Rao-Blackwellisation; every edge joins two classes, so pair statistics stay unbiased)."""
        s = spins.T.astype(np.float32)
        last = self.last
        field = bias[last].T.astype(np.float32) + np.einsum(
            "bkd,kd->bk", s[:, self.engine.nbr[last]], weights[last].astype(np.float32))
        s[:, last] = np.tanh(field * self.engine.unit)
        return s

    def _pairs(self, a, b) -> np.ndarray:
        """Per edge (i, j): mean over chains of ``(a_i b_j + b_i a_j) / 2`` for (chains, n) arrays."""
        if self.engine.n <= 1024:
            gram = a.T @ b
            return ((gram[self.edge_a, self.edge_b] + gram[self.edge_b, self.edge_a]) / (2 * len(a))).astype(np.float64)
        ea, eb = self.edge_a, self.edge_b
        return ((a[:, ea] * b[:, eb] + b[:, ea] * a[:, eb]).mean(axis=0) / 2).astype(np.float64)

    def _stats(self, s, xt):
        return [s.mean(axis=0, dtype=np.float64), self._pairs(s, s),
                (s[:, self.visible] * xt).mean(axis=0, dtype=np.float64)]

    def phases(self, previous: np.ndarray, current: np.ndarray, acp: bool = False):
        """Estimate the positive and negative statistics for the pairs ``(x_{t-1}, x_t)`` = (previous,
        current), each ±1 (B, V). Returns ``(positive, negative, covariance, chains)``: lists of the h, J and
        c statistics, the ACP covariance estimate of each edge (or None) and the final negative chains."""
        config, engine = self.config, self.engine
        weights, h_codes, c_codes = self._codes()
        B = len(previous)
        n = engine.n
        # positive phase: x_{t-1} clamped on the visible nodes, x_t as conditioning; latents sampled
        bias = np.repeat(h_codes[:, None], B, axis=1)
        bias[self.visible] = np.where(previous.T > 0, engine.force, -engine.force)
        spins = np.ones((n, B), dtype=np.int8)
        streams = self._pos_streams if B == config.batch else engine.new_streams(B, self.rng)
        engine.run(spins, bias, streams, weights, 1, randomize=True)
        engine.run(spins, bias, streams, weights, config.positive_sweeps)
        positive = self._stats(self._expected(spins, bias, weights), current)
        # negative phase: only x_t, through the conditioning couplings; two chains per pair
        cond = np.repeat(current, 2, axis=0)
        bias = np.repeat(h_codes[:, None], 2 * B, axis=1)
        bias[self.visible] += (c_codes[self.visible, None] * cond.T).astype(engine.bias_type)
        spins = np.ones((n, 2 * B), dtype=np.int8)
        streams = self._neg_streams if B == config.batch else engine.new_streams(2 * B, self.rng)
        engine.run(spins, bias, streams, weights, 1, randomize=True)
        engine.run(spins, bias, streams, weights, config.sweeps)
        s = self._expected(spins, bias, weights)
        negative = self._stats(s, cond)
        covariance = None
        if acp:
            # chains 2k and 2k+1 share x_t: products across them estimate the product of conditional means
            covariance = negative[1] - self._pairs(s[0::2], s[1::2])
        return positive, negative, covariance, (spins, bias, weights, streams)

    def measure_autocorrelation(self, chains) -> float:
        """Lag-``sweeps`` autocorrelation of the visible nodes of the negative chains (pairs of chains share
        x_t, so the cross-chain products remove the conditional means)."""
        spins, bias, weights, streams = chains
        before = spins[self.visible].T.astype(np.float64)
        spins = spins.copy()
        self.engine.run(spins, bias, streams, weights, self.config.sweeps)
        after = spins[self.visible].T.astype(np.float64)
        a0, b0, a1, b1 = before[0::2], before[1::2], after[0::2], after[1::2]
        auto = (a0 * a1 + b0 * b1).mean() / 2 - (a0 * b1 + b0 * a1).mean() / 2
        variance = 1 - (a0 * b0).mean()
        return float(auto / variance) if variance > 1e-3 else 0.0

    def learning_rate(self) -> float:
        c = self.config
        frac = min(1.0, self.iteration / max(1, c.iterations))
        return c.final_learning_rate + 0.5 * (c.learning_rate - c.final_learning_rate) * (1 + math.cos(math.pi * frac))

    def update(self) -> dict:
        """One training iteration. Returns progress figures."""
        config, model, i = self.config, self.model, self.t - 1
        x0 = self.data[self.rng.integers(len(self.data), size=config.batch)]
        previous, current = forward_pair(x0, model.flips, self.t, self.rng)
        acp = config.acp
        positive, negative, covariance, chains = self.phases(previous, current, acp=acp)
        grads = [p - q for p, q in zip(positive, negative)]
        grads[1] -= config.weight_decay * model.J[i]
        if acp and self.acp_lambda > 0:
            grads[1] -= self.acp_lambda * covariance
        if not self.conditioned:
            grads[2][:] = 0
        mismatch = float(np.abs(positive[1] - negative[1]).mean())
        if acp and self.iteration % config.acp_every == 0:
            self.autocorrelation = self.measure_autocorrelation(chains)
            if self.autocorrelation > config.acp_threshold:
                self.acp_lambda = max(self.acp_lambda * (1 + config.acp_rate), config.acp_floor)
            else:
                self.acp_lambda *= 1 - config.acp_rate
                if self.acp_lambda < config.acp_floor / 10:
                    self.acp_lambda = 0.0
        c_visible = model.c[i, self.visible]
        params = [model.h[i], model.J[i], c_visible]
        self.adam.ascend(params, grads, self.learning_rate())
        model.c[i, self.visible] = c_visible
        self.iteration += 1
        return {"mismatch": mismatch, "autocorrelation": self.autocorrelation, "lambda": self.acp_lambda}

    # -- checkpoints
    def state(self) -> dict:
        return {"iteration": self.iteration, "lambda": self.acp_lambda, "autocorrelation": self.autocorrelation,
                "adam_count": self.adam.count, "m": [m.tolist() for m in self.adam.m],
                "v": [v.tolist() for v in self.adam.v], "rng": self.rng.bit_generator.state,
                "pos_streams": _streams_state(self._pos_streams), "neg_streams": _streams_state(self._neg_streams)}

    def restore(self, state: dict):
        self.iteration = int(state["iteration"])
        self.acp_lambda = float(state["lambda"])
        self.autocorrelation = float(state["autocorrelation"])
        self.adam.count = int(state["adam_count"])
        self.adam.m = [np.array(m, dtype=np.float64) for m in state["m"]]
        self.adam.v = [np.array(v, dtype=np.float64) for v in state["v"]]
        self.rng.bit_generator.state = state["rng"]
        self._pos_streams = _restore_streams(self._pos_streams, state["pos_streams"])
        self._neg_streams = _restore_streams(self._neg_streams, state["neg_streams"])


def _streams_state(streams) -> list:
    """JSON form of an engine's random streams: kernel lane states, or numpy generator states."""
    return [s.bit_generator.state if isinstance(s, np.random.Generator) else s.tolist() for s in streams]


def _restore_streams(streams, saved) -> tuple:
    out = []
    for current, value in zip(streams, saved):
        if isinstance(current, np.random.Generator):
            current.bit_generator.state = value
            out.append(current)
        else:
            out.append(np.ascontiguousarray(np.array(value, dtype=np.uint32)))
    return tuple(out)


def _checkpoint(path, model: DTM, trainers, config: TrainConfig, elapsed: float):
    model.info.update(config=_config_json(config), elapsed_s=round(elapsed, 1),
                      checkpoint={"trainers": [tr.state() for tr in trainers]})
    save(path, model)
    del model.info["checkpoint"]


def _config_json(config: TrainConfig) -> dict:
    d = asdict(config)
    d["jumps"] = [list(j) for j in config.jumps]
    d["flips"] = None if config.flips is None else [float(p) for p in config.flips]
    return d


def train(config: TrainConfig, images: np.ndarray, jobs: int = 1, log=None, log_every: int = 100,
          checkpoint=None, checkpoint_every: int = 500, resume: DTM | None = None, steps_to_train=None) -> DTM:
    """Train a DTM on binary ``images`` (N, H, W) of 0/1. Every step trains in lockstep, ``jobs`` at a time
    (threads: the kernel releases the GIL). ``log`` receives progress lines; ``checkpoint`` is a path written
    every ``checkpoint_every`` iterations (and at the end), from which ``resume`` continues exactly.
    ``steps_to_train`` restricts training to some steps (1..T), e.g. to train them in separate processes."""
    images = np.asarray(images)
    height, width = images.shape[1:]
    data = np.where(images.reshape(len(images), -1) > 0, 1, -1).astype(np.int8)
    if resume is not None:
        model = resume
        state = model.info.pop("checkpoint", None)
        if state is None:
            raise DTMError("the model to resume holds no checkpoint state")
    else:
        if config.layout == "diamond":
            layout = Layout.diamond(height, width, config.jumps)
        elif config.layout == "spaced":
            layout = Layout.spaced(height, width, config.jumps, config.spacing)
        else:
            raise DTMError(f"unknown layout {config.layout!r}: use 'spaced' or 'diamond'")
        model = DTM.initial(layout, config.schedule(), config.sweeps, data, config.init_scale, config.seed)
        state = None
    if config.engine not in ("fabric", "float"):
        raise DTMError(f"unknown engine {config.engine!r}: use 'fabric' or 'float'")
    engine = (_FloatEngine if config.engine == "float" else _KernelEngine)(model.layout, model.edges)
    trainers = [StepTrainer(model, t, data, config, engine) for t in range(1, model.steps + 1)]
    if state is not None:
        for tr, st in zip(trainers, state["trainers"]):
            tr.restore(st)
    active = [tr for tr in trainers if steps_to_train is None or tr.t in steps_to_train]
    start = time.perf_counter() - float(model.info.get("elapsed_s", 0.0) if resume is not None else 0.0)
    if log:
        log(model.describe())
        log(f"training {len(active)} step(s) × {config.iterations} iterations, batch {config.batch}, "
            f"{config.positive_sweeps}/{config.sweeps} positive/negative sweeps, ACP {'on' if config.acp else 'off'}, "
            f"{config.engine} Gibbs")
    pool = ThreadPoolExecutor(jobs) if jobs > 1 else None
    blas = single_blas_thread()
    blas.__enter__()
    try:
        first = min(tr.iteration for tr in active)
        for it in range(first, config.iterations):
            todo = [tr for tr in active if tr.iteration <= it]
            results = list(pool.map(StepTrainer.update, todo)) if pool else [tr.update() for tr in todo]
            done = it + 1
            if checkpoint and done % checkpoint_every == 0 and done < config.iterations:
                _checkpoint(checkpoint, model, trainers, config, time.perf_counter() - start)
            if log and (done % log_every == 0 or done == config.iterations):
                parts = " ".join(f"t{tr.t}:{r['mismatch']:.3f}/{r['autocorrelation']:.2f}/{r['lambda']:.2f}"
                                 for tr, r in zip(todo, results))
                log(f"it {done:5d}/{config.iterations} {time.perf_counter() - start:7.1f}s "
                    f"lr {todo[0].learning_rate():.4f} | mismatch/autocorr/λ {parts}")
    finally:
        blas.__exit__(None, None, None)
        if pool:
            pool.shutdown()
    elapsed = time.perf_counter() - start
    model.info.update(config=_config_json(config), elapsed_s=round(elapsed, 1), jobs=jobs)
    if checkpoint:
        _checkpoint(checkpoint, model, trainers, config, elapsed)
    return model


# --------------------------------------------------------------------------------------------------
# command line (`opentsu dtm ...`, registered by opentsu.cli)

#: The configuration of the shipped single-step baseline: one step straight to noise, as many sweeps as the
#: shipped DTM's whole chain, trained the same way.
def mebm_config(reference: TrainConfig | None = None) -> TrainConfig:
    ref = reference or TrainConfig()
    return TrainConfig(**{**asdict(ref), "steps": 1, "flips": (0.5,), "sweeps": ref.steps * ref.sweeps})


def _usage(message):
    from .cli import UsageError
    return UsageError(message)


def _load_model(path) -> DTM:
    try:
        return load(path or default_model_path())
    except DTMError as exc:
        raise _usage(str(exc)) from None


def _check_output(path):
    from .cli import _check_output as check    # the CLI's own check, one definition for every verb
    check(path)


def _images(args):
    from .datasets import DataError, load_dataset
    try:
        return load_dataset(args.data, getattr(args, "labels", None), getattr(args, "threshold", None))
    except DataError as exc:
        raise _usage(str(exc)) from None


def cmd_train(args):
    _check_output(args.output)
    images, _ = _images(args)
    resume = None
    if args.resume:
        resume = _load_model(args.resume)
        if "checkpoint" not in resume.info:
            raise _usage(f"{args.resume}: holds no checkpoint state to resume from")
        saved = dict(resume.info["config"])
        saved["jumps"] = tuple(tuple(j) for j in saved["jumps"])
        saved["flips"] = None if saved["flips"] is None else tuple(saved["flips"])
        config = TrainConfig(**saved)
    else:
        base = TrainConfig()
        overrides = {k: getattr(args, k) for k in ("steps", "sweeps", "iterations", "batch", "final_flip", "seed",
                                                   "learning_rate", "positive_sweeps", "engine")
                     if getattr(args, k) is not None}
        if args.jumps is not None:
            try:
                overrides["jumps"] = parse_jumps(args.jumps)
            except TopologyError as exc:
                raise _usage(str(exc)) from None
        if args.no_acp:
            overrides["acp"] = False
        if args.mebm:
            config = mebm_config(TrainConfig(**{**asdict(base), **overrides}))
        else:
            config = TrainConfig(**{**asdict(base), **overrides})
        try:
            config.schedule()
        except DTMError as exc:
            raise _usage(str(exc)) from None
    log = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    checkpoint = args.checkpoint or (args.output + ".ckpt.npz")
    model = train(config, images, jobs=args.jobs, log=log, log_every=args.log_every, checkpoint=checkpoint,
                  checkpoint_every=args.checkpoint_every, resume=resume)
    model.info["data"] = "digits" if args.data == "digits" else os.path.basename(args.data)
    save(args.output, model)
    if log:
        log(f"trained in {model.info['elapsed_s']:.0f} s with {args.jobs} job(s) -> {args.output} "
            f"(checkpoint {checkpoint})")


def cmd_sample(args):
    from .compiler import ModelError
    from .fileio import save_npy
    from .topology import TopologyError
    _check_output(args.output)
    if args.png:
        _check_output(args.png)
    from .backends import check_entropy
    check_entropy(args.backend, args.entropy)
    model = _load_model(args.model)
    fabric = args.fabric or ("icebreaker" if args.model is None else None)
    if args.fabric is None and args.backend == "board" and args.port:   # the board's own fabric
        from .backends import board_fabric
        fabric = board_fabric(args.port)
    try:
        program = model.compile(fabric, allow_virtual=args.backend == "reference" and fabric is None)
    except (ModelError, TopologyError) as exc:
        raise _usage(f"{args.model or default_model_path()}: {exc}") from None
    start = time.perf_counter()
    images = sample(model, args.n, seed=args.seed, backend=args.backend, program=program, port=args.port,
                    entropy=args.entropy)
    elapsed = time.perf_counter() - start
    save_npy(args.output, images.astype(np.uint8))
    if args.png:
        from .png import image_grid, write_png
        shown = images[:args.png_count]
        if len(shown):
            write_png(args.png, image_grid(shown, columns=min(10, len(shown))))
    if not args.quiet:
        print(f"{args.n} images from {model.steps} layers × {model.sweeps} sweeps on {args.backend} "
              f"({program.geometry.describe()}) in {elapsed:.2f} s -> {args.output}", file=sys.stderr)
        if not program.report.exact:
            print(program.report.describe(), file=sys.stderr)


def cmd_eval(args):
    from . import dtm_eval
    from .cli import UsageError
    from .fileio import read_npy
    images, labels = _images(args)
    if labels is None:
        raise _usage("eval needs class labels: give --labels with an IDX data file")
    if args.n < 2:
        raise _usage(f"-n must be at least 2, not {args.n}")
    seeds = args.seeds
    models = []
    model = _load_model(args.model)
    if model.image_shape != images.shape[1:]:
        raise _usage(f"the model makes {model.image_shape} images, the data holds {images.shape[1:]}")
    program = _compile_for_eval(model, args.model or default_model_path(), args.fabric)
    models.append(("DTM, fabric (quantised)", model.total_sweeps, lambda n, s: sample(model, n, s, program=program)))
    if not args.no_float:
        models.append(("DTM, float", model.total_sweeps, lambda n, s: sample_float(model, n, s)))
    if args.mebm != "none":
        mebm = _load_model(args.mebm or default_mebm_path())
        if mebm.image_shape != images.shape[1:]:
            raise _usage(f"the MEBM makes {mebm.image_shape} images, the data holds {images.shape[1:]}")
        mebm_program = _compile_for_eval(mebm, args.mebm or default_mebm_path(), args.fabric)
        models.append((f"MEBM ({mebm.steps} step), fabric", mebm.total_sweeps,
                       lambda n, s: sample(mebm, n, s, program=mebm_program)))
    for path in args.samples or ():
        extra = read_npy(path, UsageError, "sample file")
        if extra.ndim != 3 or extra.shape[1:] != images.shape[1:] or len(extra) < 2:
            raise _usage(f"{path}: expected (N, {images.shape[1]}, {images.shape[2]}) images, found {extra.shape}")
        models.append((os.path.basename(path), None, lambda n, s, e=extra: e))
    mixture = dtm_eval.BernoulliMixture(images, components=args.components, seed=0)
    models.append((f"Bernoulli mixture ({args.components})", 0, mixture.sample))
    independent = dtm_eval.IndependentPixels(images)
    models.append(("independent pixels", 0, independent.sample))
    with single_blas_thread():
        evaluator = dtm_eval.Evaluator(images, labels)
        rows = []
        for name, sweeps, draw in models:
            reports = [evaluator.report(draw(args.n, seed)) for seed in seeds]
            rows.append(_summarise(name, sweeps, reports))
        floor = _data_floor(evaluator, images)
    lines = [f"{'model':30s} {'sweeps':>6s} {'FD':>13s} {'patch TV':>8s} {'coverage':>8s} {'class TV':>8s} "
             f"{'conf':>6s} {'copies':>7s} {'NN dist':>7s}"]
    for row in [floor] + rows:
        fd = f"{row['fd']:.3f}±{row['fd_sd']:.3f}"
        sweeps = "-" if row["sweeps"] is None else str(row["sweeps"])
        lines.append(f"{row['name']:30s} {sweeps:>6s} {fd:>13s} {row['patch_tv']:8.3f} {row['coverage']:8.1f} "
                     f"{row['class_tv']:8.3f} {row['confidence']:6.3f} {row['copy_rate']:7.3f} "
                     f"{row['nn_hamming']:7.2f}")
    print("\n".join(lines))
    print(f"FD: feature-space Fréchet distance to the data (MLP hidden layer), mean ± sd over seeds "
          f"{', '.join(map(str, seeds))} with {args.n} samples each; data row: one half of the data against "
          f"the other (a noise floor).", file=sys.stderr)
    if args.json:
        from .fileio import atomic_write
        _check_output(args.json)
        with atomic_write(args.json) as f:
            f.write(json.dumps({"n": args.n, "seeds": list(seeds), "rows": [floor] + rows}, indent=1).encode())


def _compile_for_eval(model: DTM, path, fabric):
    """The program ``dtm eval`` samples: for ``fabric`` (a preset, auto, or None: the iCEBreaker's when the model
    fits it, else a fabric sized to it, else the emulator's virtual geometry, as ``dtm sample`` on the reference
    backend). A model no such fabric runs is a usage error naming the file."""
    from .compiler import ModelError
    try:
        return model.compile(fabric, allow_virtual=fabric is None)
    except (ModelError, TopologyError) as exc:
        raise _usage(f"{path}: {exc}") from None


def _summarise(name, sweeps, reports) -> dict:
    fds = np.array([r["fd"] for r in reports])
    keys = ("coverage", "class_tv", "confidence", "patch_tv", "copy_rate", "nn_hamming", "unique")
    row = {"name": name, "sweeps": sweeps, "fd": float(fds.mean()), "fd_sd": float(fds.std()),
           "fd_per_seed": [round(float(v), 4) for v in fds]}
    row.update({k: float(np.mean([r[k] for r in reports])) for k in keys})
    return row


def _data_floor(evaluator, images) -> dict:
    order = np.random.default_rng(0).permutation(len(images))
    half = len(images) // 2
    report = evaluator.report(images[order[half:]], reference=images[order[:half]])
    return _summarise("data: half vs other half", None, [report])


def _seed_list(text):
    import argparse
    try:
        seeds = [int(v, 0) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid seed list: {text!r}") from None
    if not seeds or any(not 0 <= s < 1 << 64 for s in seeds):
        raise argparse.ArgumentTypeError(f"seeds must be unsigned 64-bit integers: {text!r}")
    return seeds


def register(subparsers):
    """Add ``opentsu dtm {train,sample,eval}`` to the CLI's subparsers."""
    from .cli import _positive, add_entropy_option
    parser = subparsers.add_parser("dtm", help="Denoising Thermodynamic Models: train, sample, evaluate")
    sub = parser.add_subparsers(dest="dtm_command", required=True, parser_class=type(parser))

    def data_options(p):
        p.add_argument("--data", default="digits", help="'digits' (scikit-learn's 8×8 digits, binarized at >= 8) "
                                                        "or an IDX image file (MNIST, Fashion-MNIST; .gz is fine)")
        p.add_argument("--labels", help="IDX label file that goes with --data")
        p.add_argument("--threshold", type=float, help="binarization threshold (digits: 8, IDX files: 128)")

    p = sub.add_parser("train", help="train a DTM (the defaults reproduce the shipped model)")
    p.add_argument("-o", "--output", required=True, metavar="MODEL.npz")
    data_options(p)
    p.add_argument("--steps", type=_positive("step count"), help="denoising steps T (layers); default 8")
    p.add_argument("--sweeps", type=_positive("sweep count"), help="Gibbs sweeps per step; default 50")
    p.add_argument("--positive-sweeps", type=_positive("sweep count"), help="positive-phase sweeps; default 20")
    p.add_argument("--iterations", type=_positive("iteration count"), help="training iterations per step")
    p.add_argument("--batch", type=_positive("batch size"), help="data pairs per iteration; default 256")
    p.add_argument("--final-flip", type=float, help="flip probability of the last denoising step; default 0.03")
    p.add_argument("--learning-rate", type=float, help="initial Adam step size; default 0.03")
    p.add_argument("--jumps", metavar="DR,DC;...", help="the grid's jump offsets (default: the iCEBreaker fabric's, "
                   + ";".join(f"{a},{b}" for a, b in DEFAULT_JUMPS) + "); other jumps need a fabric with them")
    p.add_argument("--no-acp", action="store_true", help="train without the adaptive correlation penalty")
    p.add_argument("--engine", choices=("fabric", "float"), help="Gibbs sampler for training: 'fabric' (default) runs "
                                                                  "the emulator kernel on the quantised codes (QAT), "
                                                                  "'float' exact float conditionals (~15x slower)")
    p.add_argument("--mebm", action="store_true", help="train the single-step baseline of the same size instead")
    p.add_argument("--seed", type=_positive("seed"))
    p.add_argument("--jobs", type=_positive("job count"), default=2, help="steps trained at once (threads)")
    p.add_argument("--checkpoint", metavar="CKPT.npz", help="checkpoint path (default: OUTPUT.ckpt.npz)")
    p.add_argument("--checkpoint-every", type=_positive("iteration count"), default=500)
    p.add_argument("--resume", metavar="CKPT.npz", help="continue an interrupted run from its checkpoint")
    p.add_argument("--log-every", type=_positive("iteration count"), default=100)
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="run the whole denoising chain on a backend (CONTRACTS §3)")
    p.add_argument("model", nargs="?", metavar="MODEL", help="DTM file (default: the shipped digits model)")
    p.add_argument("-o", "--output", required=True, metavar="OUT.npy")
    p.add_argument("-n", type=_positive("count"), default=100, help="images (one chain each)")
    p.add_argument("--backend", choices=("reference", "sim", "verilator", "board"), default="reference")
    p.add_argument("--seed", type=_positive("seed"), default=0)
    p.add_argument("--png", metavar="GRID.png", help="also write a grid of the first images as a PNG")
    p.add_argument("--png-count", type=_positive("count"), default=100, help="images in the PNG grid")
    p.add_argument("--fabric", help="fabric preset or auto (default: the board's own with --backend board, "
                                    "else icebreaker for the shipped model)")
    p.add_argument("--port", help="serial port of the board backend")
    add_entropy_option(p)
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="sample quality against the baselines (prints a table)")
    p.add_argument("model", nargs="?", metavar="MODEL", help="DTM file (default: the shipped digits model)")
    data_options(p)
    p.add_argument("-n", type=_positive("count"), default=1000, help="samples per model and seed")
    p.add_argument("--seeds", type=_seed_list, default=[0, 1, 2], help="comma-separated generation seeds")
    p.add_argument("--mebm", help="single-step baseline file (default: the shipped one; 'none' to skip)")
    p.add_argument("--components", type=_positive("component count"), default=50, help="Bernoulli mixture size")
    p.add_argument("--samples", action="append", metavar="FILE.npy", help="also score these images (N, H, W)")
    p.add_argument("--no-float", action="store_true", help="skip the float (unquantised) DTM")
    p.add_argument("--fabric", help="fabric preset or auto for the quantised runs (default: the iCEBreaker's "
                                    "when the model fits it, else one sized to it)")
    p.add_argument("--json", metavar="OUT.json", help="also write the figures as JSON")
    p.set_defaults(func=cmd_eval)
    return parser
