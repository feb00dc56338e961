"""Number formats of the fabric: the one definition used by the compiler, the emulator and the gateware.

Everything here is integer arithmetic that the gateware reproduces bit for bit. ``docs/fabric.md`` explains
the choices; this module is the normative definition.

Units
-----
Weights, biases, conditioning couplings and fields are integers in units of 1/8 (``UNIT = 1/8``). A model
value ``x`` (already multiplied by β) is stored as the code ``round(x * 8)``.

The p-bit
---------
A node with integer field ``F`` (in 1/8 units, bias included) becomes

    s = +1  if  F >= Z(r)   else  -1

where ``r`` is the next 32-bit word of the lane's random stream and ``Z`` is a random threshold with
``P(Z <= F) ≈ σ(F / 4) = σ(2 · field)``. ``Z`` comes from the inverse logistic CDF, evaluated in a
floating-point-like form that is cheap in logic and accurate in the tails:

* bit 31 of ``r`` picks the half (``fold``); by symmetry the upper half is ``Z = 1 - Z_low``;
* bits 30..16 (15 bits) give the octave ``e`` = number of leading zeros (0..15), so that
  ``u`` lies in ``[2^-(e+2), 2^-(e+1))`` for ``e < 15`` and in ``[0, 2^-16)`` for ``e = 15``;
* bits 15..6 (10 bits) are the mantissa ``m`` of ``u`` inside its octave;
* ``Z_low(e, m)`` is the smallest field ``F <= 0`` whose probability ``σ(F/4)`` exceeds the midpoint of
  the u-cell (e, m); in logic it is ``LO[e] - #{k : m < B[k][e]}`` with at most four comparators.

The relative error of ``P(s=+1)`` against ``σ(2·field)`` is below 5e-4 (absolute error below 1.1e-4) for
every probability down to 2^-16; fields at or beyond ``±48`` (``|field| >= 6``, probability below
1.1e-5) are deterministic. ``pbit_probability`` gives the exact
probability the hardware realises, and the tests check the tables against ``σ`` and against a brute
force construction.

The random streams
------------------
Each lane owns one xoroshiro64 generator (Blackman & Vigna's xoroshiro linear engine on two 32-bit
words, rotations a=26, b=9, c=13, period 2^64 - 1); a draw is one full step followed by reading the word
``s0``, so successive words are not shifted copies of each other. The engine is used without a scrambler: the
``+`` scrambler costs an adder per lane (31 LUTs and 31 carries on the iCE40) and the p-bit already
passes the 26 bits it uses through a nonlinear threshold. State comes from a 64-bit seed through
splitmix64, one independent state per (chain, lane).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

__all__ = [
    "UNIT_BITS", "UNIT", "FixedFormat", "WEIGHT", "BIAS", "COUPLING", "EFFECTIVE_BIAS", "CLAMP_PLUS",
    "CLAMP_MINUS", "field_bits", "node_words", "node_fields", "PBit", "PBIT", "xoroshiro64_step", "lane_seed_states",
    "splitmix64",
    "RNG_WORD_BITS", "RNG_STATE_WORDS", "RNG_RESET_STATE", "SEED_STEPS", "seed_injection",
]

#: Fractional bits of every weight, bias and field.
UNIT_BITS = 3
#: Value of one least significant bit.
UNIT = 1.0 / (1 << UNIT_BITS)


@dataclass(frozen=True)
class FixedFormat:
    """A signed fixed-point format with ``frac_bits`` fractional bits, codes in ``[min_code, max_code]``.

    The range is symmetric so that negation never overflows. Quantisation rounds half away from zero and
    saturates (it never wraps).
    """

    name: str
    bits: int
    frac_bits: int
    min_code: int
    max_code: int

    def __post_init__(self):
        if not -(1 << (self.bits - 1)) <= self.min_code <= self.max_code <= (1 << (self.bits - 1)) - 1:
            raise ValueError(f"{self.name}: code range [{self.min_code}, {self.max_code}] "
                             f"does not fit {self.bits} signed bits")

    @property
    def scale(self) -> float:
        return float(1 << self.frac_bits)

    @property
    def min_value(self) -> float:
        return self.min_code / self.scale

    @property
    def max_value(self) -> float:
        return self.max_code / self.scale

    def quantize(self, values) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(codes, saturated)``: int16 codes and a mask of the entries that were clipped."""
        x = np.asarray(values, dtype=np.float64) * self.scale
        rounded = np.sign(x) * np.floor(np.abs(x) + 0.5)
        saturated = (rounded < self.min_code) | (rounded > self.max_code)
        return np.clip(rounded, self.min_code, self.max_code).astype(np.int16), saturated

    def to_float(self, codes) -> np.ndarray:
        return np.asarray(codes, dtype=np.float64) / self.scale

    def is_exact(self, values) -> np.ndarray:
        """Mask of the values this format holds without rounding or saturation."""
        x = np.asarray(values, dtype=np.float64) * self.scale
        return (x == np.round(x)) & (x >= self.min_code) & (x <= self.max_code)

    def to_unsigned(self, codes) -> np.ndarray:
        """Two's complement bit pattern of ``codes`` in ``bits`` bits, as it sits in a memory word."""
        return np.asarray(codes, dtype=np.int64) & ((1 << self.bits) - 1)

    def from_unsigned(self, raw) -> np.ndarray:
        raw = np.asarray(raw, dtype=np.int64) & ((1 << self.bits) - 1)
        return np.where(raw >= (1 << (self.bits - 1)), raw - (1 << self.bits), raw)


#: Couplings J_ij·β: 7-bit two's complement, 1/8 units, [-7.875, 7.875]. Every multiple of 1/8 in [-4, 4] is exact.
WEIGHT = FixedFormat("weight", bits=7, frac_bits=UNIT_BITS, min_code=-63, max_code=63)
#: Biases h_i·β: the same format as the weights.
BIAS = FixedFormat("bias", bits=7, frac_bits=UNIT_BITS, min_code=-63, max_code=63)
#: Coupling of a node to its conditioning input (the DTM's clamped x_t): the same format as the weights.
COUPLING = FixedFormat("coupling", bits=7, frac_bits=UNIT_BITS, min_code=-63, max_code=63)
#: Effective bias b = h + c·x that the fabric reads on every update: 8 bits, codes ±127 reserved for clamps.
EFFECTIVE_BIAS = FixedFormat("effective bias", bits=8, frac_bits=UNIT_BITS, min_code=-126, max_code=126)
#: Effective-bias code that forces the node to +1 (a clamp).
CLAMP_PLUS = 127
#: Effective-bias code that forces the node to -1.
CLAMP_MINUS = -127


def node_words(h, c, clamp) -> np.ndarray:
    """The 16-bit node word the fabric's LOAD reads: ``p = h + c`` in bits 7..0 and ``q = h - c`` in bits
    15..8 (effective-bias codes), so that the effective bias is simply ``p`` when the conditioning spin
    is +1 and ``q`` when it is -1. A clamped node has ``p = q =`` its clamp code. Inputs are code arrays."""
    h, c, clamp = (np.asarray(a, dtype=np.int64) for a in (h, c, clamp))
    p = np.where(clamp == 1, CLAMP_PLUS, np.where(clamp == -1, CLAMP_MINUS, h + c))
    q = np.where(clamp == 1, CLAMP_PLUS, np.where(clamp == -1, CLAMP_MINUS, h - c))
    return (EFFECTIVE_BIAS.to_unsigned(p) | EFFECTIVE_BIAS.to_unsigned(q) << 8).astype(np.uint16)


def node_fields(words) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of ``node_words``: ``(h, c, clamp)``. Raises ValueError for words no layer produces."""
    words = np.asarray(words, dtype=np.int64)
    p = EFFECTIVE_BIAS.from_unsigned(words)
    q = EFFECTIVE_BIAS.from_unsigned(words >> 8)
    clamp_p = (p == CLAMP_PLUS) | (p == CLAMP_MINUS)
    clamp_q = (q == CLAMP_PLUS) | (q == CLAMP_MINUS)
    if np.any(clamp_p != clamp_q) or np.any(clamp_p & (p != q)):
        raise ValueError("node word has a clamp code on one side only")
    if np.any((p == -128) | (q == -128)):
        raise ValueError("node word holds the unused code -128")
    if np.any(~clamp_p & ((p + q) % 2 != 0)):
        raise ValueError("node word has p + q odd: it is not h + c, h - c")
    h = np.where(clamp_p, 0, (p + q) // 2)
    c = np.where(clamp_p, 0, (p - q) // 2)
    if np.any((h < BIAS.min_code) | (h > BIAS.max_code) | (c < COUPLING.min_code) | (c > COUPLING.max_code)):
        raise ValueError("node word decodes to h or c outside their formats")
    clamp = np.where(p == CLAMP_PLUS, 1, np.where(p == CLAMP_MINUS, -1, 0)).astype(np.int8) * clamp_p
    return h.astype(np.int16), c.astype(np.int16), clamp.astype(np.int8)


def field_bits(degree: int) -> int:
    """Signed width that holds ``Σ_d ±w_d`` over ``degree`` weights exactly (no saturation is ever needed)."""
    if degree < 0:
        raise ValueError(f"degree must be non-negative, not {degree}")
    bound = degree * WEIGHT.max_code
    return max(2, bound.bit_length() + 1)


# --------------------------------------------------------------------------------------------------
# p-bit threshold

def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


@dataclass(frozen=True)
class PBit:
    """The p-bit rule ``s = +1 iff F >= Z(r)``: bit fields of the random word and the threshold tables.

    ``fold_bit``: index of the half-select bit. ``exp_bits``: width of the octave field just below it.
    ``mant_bits``: width of the mantissa field below that. ``boundaries``: comparators per octave.
    """

    fold_bit: int = 31
    exp_bits: int = 15
    mant_bits: int = 10
    boundaries: int = 4

    @property
    def exp_lsb(self) -> int:
        return self.fold_bit - self.exp_bits

    @property
    def mant_lsb(self) -> int:
        return self.exp_lsb - self.mant_bits

    @property
    def octaves(self) -> int:
        """Number of octave indices ``e``: 0..exp_bits, the last one meaning an all-zero field."""
        return self.exp_bits + 1

    def cell_midpoint(self, e: int, mant: int) -> float:
        """Midpoint of the u-interval of cell (e, mant) in the lower half (u in [0, 1/2))."""
        if e == self.exp_bits:
            return 2.0 ** -(self.exp_bits + 2)
        return 2.0 ** -(e + 2) * (1.0 + (mant + 0.5) / (1 << self.mant_bits))

    @cached_property
    def low_threshold(self) -> np.ndarray:
        """``Z_low(e, m)``, shape (octaves, 2**mant_bits): the smallest field ``F <= 0`` whose probability
        ``σ(F/4)`` exceeds the midpoint of cell (e, m). This is the definition; the tables compress it."""
        out = np.empty((self.octaves, 1 << self.mant_bits), dtype=np.int64)
        for e in range(self.octaves):
            for m in range(1 << self.mant_bits):
                mid = self.cell_midpoint(e, m)
                # σ(F/4) > mid  <=>  F > 4·logit(mid); the smallest such integer, clipped to <= 0.
                bound = 4.0 * math.log(mid / (1.0 - mid))
                field = math.floor(bound) + 1
                while field - 1 >= -400 and _sigmoid((field - 1) / 4.0) > mid:
                    field -= 1
                while _sigmoid(field / 4.0) <= mid:
                    field += 1
                out[e, m] = min(field, 0)
        out.setflags(write=False)
        return out

    @property
    def min_threshold(self) -> int:
        """Smallest value ``Z`` takes; the largest is ``1 - min_threshold``. Fields below the smallest value
        always give -1, fields at or above the largest always give +1."""
        return int(self.low_threshold.min())

    @cached_property
    def tables(self) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]:
        """``(LO, B)`` with ``Z_low(e, m) = LO[e] - #{k : m < B[k][e]}``: LO[e] is ``Z_low`` at the top of
        octave e and ``B[k][e]`` (``mant_bits`` wide, non-increasing in k) counts the mantissas whose
        ``Z_low`` is at most ``LO[e] - 1 - k``."""
        z = self.low_threshold
        if np.any(np.diff(z, axis=1) < 0):
            raise AssertionError("Z_low is not monotone in the mantissa")
        lo = z[:, -1]
        spread = int((lo - z[:, 0]).max())
        if spread > self.boundaries:
            raise ValueError(f"an octave spans {spread} thresholds, more than {self.boundaries} comparators")
        bounds = [tuple(int(np.count_nonzero(z[e] <= lo[e] - 1 - k)) for e in range(self.octaves))
                  for k in range(self.boundaries)]
        return tuple(int(x) for x in lo), tuple(bounds)

    def split(self, words) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Split random words into ``(fold, e, mantissa)`` arrays."""
        w = np.asarray(words, dtype=np.uint64)
        fold = ((w >> self.fold_bit) & 1).astype(np.int64)
        expf = ((w >> self.exp_lsb) & ((1 << self.exp_bits) - 1)).astype(np.int64)
        mant = ((w >> self.mant_lsb) & ((1 << self.mant_bits) - 1)).astype(np.int64)
        return fold, self.leading_zeros(expf), mant

    def leading_zeros(self, field) -> np.ndarray:
        """Leading zeros of an ``exp_bits``-wide field (``exp_bits`` for zero)."""
        field = np.asarray(field, dtype=np.int64)
        e = np.full(field.shape, self.exp_bits, dtype=np.int64)
        for bit in range(self.exp_bits):
            e = np.where(field >> bit & 1, self.exp_bits - 1 - bit, e)
        return e

    def threshold(self, words) -> np.ndarray:
        """``Z(r)`` for an array of 32-bit random words (int16 result)."""
        fold, e, mant = self.split(words)
        lo, bounds = self.tables
        lo = np.asarray(lo)[e]
        count = sum((mant < np.asarray(b)[e]).astype(np.int64) for b in bounds)
        z_low = lo - count
        return np.where(fold == 1, 1 - z_low, z_low).astype(np.int16)

    @cached_property
    def threshold_table(self) -> np.ndarray:
        """``Z`` for every (fold, e, mantissa), shape (2, octaves, 2**mant_bits), int16: the emulator's table."""
        mant = np.arange(1 << self.mant_bits, dtype=np.uint64)
        out = np.empty((2, self.octaves, 1 << self.mant_bits), dtype=np.int16)
        for fold in (0, 1):
            for e in range(self.octaves):
                expf = 0 if e == self.exp_bits else 1 << (self.exp_bits - 1 - e)
                words = (np.uint64(fold) << np.uint64(self.fold_bit)) | (np.uint64(expf) << np.uint64(self.exp_lsb)) \
                    | (mant << np.uint64(self.mant_lsb))
                out[fold, e] = self.threshold(words)
        return out

    @cached_property
    def leading_zero_table(self) -> np.ndarray:
        """``e`` for every value of the octave field, uint8 (the emulator's table)."""
        return self.leading_zeros(np.arange(1 << self.exp_bits)).astype(np.uint8)

    def octave_probability(self, e: int) -> float:
        """Probability of octave ``e`` within one half."""
        return 2.0 ** -(e + 1) if e < self.exp_bits else 2.0 ** -self.exp_bits

    def probability(self, fields) -> np.ndarray:
        """Exact ``P(s=+1 | F)`` that this rule realises, for integer fields ``F`` (1/8 units)."""
        fields = np.asarray(fields, dtype=np.int64)
        table = self.threshold_table.astype(np.int64)
        weights = np.array([self.octave_probability(e) for e in range(self.octaves)]) / (2 << self.mant_bits)
        out = np.zeros(fields.shape, dtype=np.float64)
        for fold in (0, 1):
            z = table[fold]  # (octaves, mantissas)
            le = (z[None, :, :] <= fields.reshape(-1, 1, 1))
            out += (le * weights[None, :, None]).sum(axis=(1, 2)).reshape(fields.shape)
        return out

    @property
    def deterministic_above(self) -> int:
        """Fields at or above this value always give +1 (and at or below ``-this``, always -1)."""
        return 1 - self.min_threshold


PBIT = PBit()

# --------------------------------------------------------------------------------------------------
# random streams

#: Bits in one random word.
RNG_WORD_BITS = 32
#: 32-bit words of state per lane.
RNG_STATE_WORDS = 2
_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF


def _rotl32(x, k):
    return ((x << np.uint32(k)) | (x >> np.uint32(32 - k))) & np.uint32(_MASK32)


def xoroshiro64_step(s0, s1):
    """One draw from every generator: returns ``(word, s0', s1')`` for uint32 arrays (or scalars).

    ``t = s0 ^ s1``, ``s0' = rotl(s0, 26) ^ t ^ (t << 9)``, ``s1' = rotl(t, 13)``; then ``word = s0'``.
    """
    s0 = np.asarray(s0, dtype=np.uint32)
    s1 = np.asarray(s1, dtype=np.uint32)
    t = s0 ^ s1
    n0 = (_rotl32(s0, 26) ^ t ^ ((t << np.uint32(9)) & np.uint32(_MASK32))).astype(np.uint32)
    n1 = _rotl32(t, 13).astype(np.uint32)
    return n0.copy(), n0, n1


#: Generator state right after a reset: ``s0 = 1``, ``s1 = 0``.
RNG_RESET_STATE = (1, 0)
#: Draws a seed injection takes.
SEED_STEPS = 64


def _xoroshiro64_matrix() -> np.ndarray:
    """The engine's state transition as a 64×64 matrix over GF(2) (state bits: s0 = 0..31, s1 = 32..63)."""
    columns = []
    for bit in range(64):
        s0 = np.uint32(1 << bit) if bit < 32 else np.uint32(0)
        s1 = np.uint32(1 << (bit - 32)) if bit >= 32 else np.uint32(0)
        _, n0, n1 = xoroshiro64_step(s0, s1)
        value = int(n0) | int(n1) << 32
        columns.append([(value >> k) & 1 for k in range(64)])
    return np.array(columns, dtype=np.uint8).T


def _gf2_solve(matrix: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Solve ``matrix @ x = rhs`` over GF(2) (square, full rank)."""
    a = np.concatenate([matrix.copy() % 2, rhs.reshape(-1, 1) % 2], axis=1).astype(np.uint8)
    n = a.shape[0]
    for col in range(n):
        pivot = col + int(np.argmax(a[col:, col]))
        if not a[pivot, col]:
            raise ValueError("singular system")
        a[[col, pivot]] = a[[pivot, col]]
        rows = np.flatnonzero(a[:, col])
        rows = rows[rows != col]
        a[rows] ^= a[col]
    return a[:, -1].copy()


_SEED_CACHE = {}


def seed_injection(s0: int, s1: int) -> int:
    """The 64 bits that, injected one per draw into bit 0 of ``s1`` starting from ``RNG_RESET_STATE``
    (bit k on draw k: ``s <- step(s); s1 ^= bit``), leave the generator in state ``(s0, s1)``.

    The fabric seeds its lanes this way, so a lane needs no 64-bit load multiplexer. Every state is
    reachable because the engine's transition matrix has a primitive characteristic polynomial (full
    period), which makes the injection point a cyclic vector.
    """
    if "inverse" not in _SEED_CACHE:
        a = _xoroshiro64_matrix()
        b = np.zeros(64, dtype=np.uint8)
        b[32] = 1  # bit 0 of s1
        # After 64 draws: s = A^64 s_reset + sum_k A^(63-k) b u_k.
        krylov = np.zeros((64, 64), dtype=np.uint8)
        v = b.copy()
        for k in range(63, -1, -1):
            krylov[:, k] = v
            v = (a @ v) % 2
        power = np.eye(64, dtype=np.uint8)
        for _ in range(SEED_STEPS):
            power = (a @ power) % 2
        _SEED_CACHE["krylov"], _SEED_CACHE["power"] = krylov, power
        _SEED_CACHE["inverse"] = True
    krylov, power = _SEED_CACHE["krylov"], _SEED_CACHE["power"]
    r0, r1 = RNG_RESET_STATE
    reset = np.array([(r0 >> k) & 1 for k in range(32)] + [(r1 >> k) & 1 for k in range(32)], dtype=np.uint8)
    target = np.array([(s0 >> k) & 1 for k in range(32)] + [(s1 >> k) & 1 for k in range(32)], dtype=np.uint8)
    bits = _gf2_solve(krylov, (target + power @ reset) % 2)
    return sum(int(bit) << k for k, bit in enumerate(bits))


def splitmix64(x: int) -> int:
    """The splitmix64 finaliser of ``x + golden ratio`` (Steele, Lea & Flood), as a Python int."""
    z = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def lane_seed_states(seed: int, chains, lanes: int) -> np.ndarray:
    """Initial generator states, shape ``(len(chains), lanes, 2)`` uint32: ``[..., 0]`` is s0, ``[..., 1]`` s1.

    The state of (chain c, lane l) is ``splitmix64(splitmix64(seed) ^ (c << 20 | l))``; the all-zero state
    (a fixed point of the engine) is replaced by s0 = 1. ``chains`` is an iterable of global chain indices,
    so a board that runs chains one at a time draws the same streams as the emulator that runs them
    side by side.
    """
    if not 0 <= seed < 1 << 64:
        raise ValueError(f"seed must be an unsigned 64-bit integer, not {seed}")
    if not 1 <= lanes < 1 << 20:
        raise ValueError(f"lanes must be in [1, 2^20), not {lanes}")
    chains = list(chains)
    base = splitmix64(seed)
    out = np.empty((len(chains), lanes, 2), dtype=np.uint32)
    for i, chain in enumerate(chains):
        if not 0 <= chain < 1 << 40:
            raise ValueError(f"chain index out of range: {chain}")
        for lane in range(lanes):
            state = splitmix64(base ^ (chain << 20 | lane))
            s0, s1 = state & _MASK32, state >> 32
            if s0 == 0 and s1 == 0:
                s0 = 1
            out[i, lane] = (s0, s1)
    return out
