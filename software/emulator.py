"""The bit-exact emulator: the executable specification of the fabric.

It runs a program exactly as the gateware does: the same per-lane xoroshiro64 streams (every lane draws
one word on every sweep cycle, idle or not), the same schedule, the same integer fields and the same
p-bit threshold (``opentsu.formats``). Chains run side by side; chain ``k`` of an emulator built with
``first_chain=f`` uses the random streams of global chain ``f + k``, which is what a board running the
chains one after another uses too.

Fabric operations (the gateware has the same ones):

``load_layer(l)``
    Select layer ``l`` and compute every node's effective bias ``b = h + c·x`` from its conditioning
    input ``x``, which is the node's current spin; clamped nodes get the clamp code instead.
``randomize()``
    One sweep in which every field is zero: each free node becomes ±1 with probability exactly 1/2,
    clamped nodes take their clamp value. It draws like a sweep.
``sweep(k)``
    ``k`` block-Gibbs sweeps.

``run(ops)`` executes a sequence; its ACCUMULATE ops count samples into ``moments`` (see ``Moments``), as
the fabric's on-chip accumulators do.

The inner loop is ``_kernel.c`` (chains innermost, vectorised); chains are split into blocks with their
own arrays, one thread each, so no two threads write the same cache line.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np

from . import _kernel
from .compiler import Program
from .devicemap import MOMENT_LIMIT
from .formats import CLAMP_MINUS, CLAMP_PLUS, PBIT, lane_seed_states
from .sequence import Op, Opcode, SequenceError, sampling_sequence

__all__ = ["Emulator", "Moments", "sample", "chain_counts", "key_thresholds"]

#: Internal bias of a clamped node: beyond any field, so the comparison alone forces the spin.
FORCE = 4096
#: Fewest chains worth a thread of their own.
_MIN_BLOCK = 16


class Moments:
    """Moment counts of a set of chains over the samples an ACCUMULATE counted, indexed by fabric node.

    ``samples`` (chains,): samples counted (at most ``devicemap.MOMENT_LIMIT``); ``plus`` (chains, n): how
    many had s_i = +1; ``agree`` (chains, n, degree // 2): how many had s_i = s_j for j the node's partner
    ``geometry.moment_partners[i, k]``. Means and correlations follow: ⟨s_i⟩ = 2·plus/samples - 1 and
    ⟨s_i s_j⟩ = 2·agree/samples - 1.
    """

    def __init__(self, samples, plus, agree):
        self.samples = np.asarray(samples, dtype=np.int64)
        self.plus = np.asarray(plus, dtype=np.int64)
        self.agree = np.asarray(agree, dtype=np.int64)

    @classmethod
    def zeros(cls, chains: int, n: int, owned: int) -> "Moments":
        return cls(np.zeros(chains), np.zeros((chains, n)), np.zeros((chains, n, owned)))

    def count(self, spins: np.ndarray, partners: np.ndarray):
        """Add one sample per chain, (chains, n) of ±1, to the chains still below the limit."""
        live = self.samples < MOMENT_LIMIT
        self.samples += live
        self.plus += live[:, None] * (spins > 0)
        self.agree += live[:, None, None] * (spins[:, :, None] == spins[:, partners])

    @property
    def means(self) -> np.ndarray:
        return 2.0 * self.plus / np.maximum(self.samples, 1)[:, None] - 1.0

    @property
    def correlations(self) -> np.ndarray:
        return 2.0 * self.agree / np.maximum(self.samples, 1)[:, None, None] - 1.0

    def total(self) -> "Moments":
        """The counts of all chains added together (one chain's worth of arrays)."""
        return Moments(self.samples.sum(keepdims=True), self.plus.sum(axis=0, keepdims=True),
                       self.agree.sum(axis=0, keepdims=True))

    @staticmethod
    def concatenate(parts) -> "Moments":
        return Moments(np.concatenate([p.samples for p in parts]), np.concatenate([p.plus for p in parts]),
                       np.concatenate([p.agree for p in parts]))

    def for_model(self, program) -> dict:
        """All chains together, in the model's terms: ``samples``, ``mean`` (n_model,), ``edges`` (E, 2) of
        model node pairs (each fabric edge between two model nodes, once) and their ``correlation`` (E,)."""
        total = self.total()
        fabric_of = np.asarray(program.node_map)
        model_of = np.full(program.geometry.n, -1, dtype=np.int64)
        model_of[fabric_of] = np.arange(len(fabric_of))
        partners = program.geometry.moment_partners
        edges, corr = [], []
        for i, fi in enumerate(fabric_of):
            for k, fj in enumerate(partners[fi]):
                if model_of[fj] >= 0:
                    edges.append((i, model_of[fj]))
                    corr.append(total.correlations[0, fi, k])
        return {"samples": int(total.samples[0]), "mean": total.means[0, fabric_of],
                "edges": np.array(edges, dtype=np.int64).reshape(-1, 2), "correlation": np.array(corr)}

    def __eq__(self, other):
        return (isinstance(other, Moments) and np.array_equal(self.samples, other.samples)
                and np.array_equal(self.plus, other.plus) and np.array_equal(self.agree, other.agree))


@lru_cache(maxsize=None)
def key_thresholds() -> np.ndarray:
    """The p-bit in the kernel's key form: ``keys[F + KEY_SPAN]`` for fields F in [-KEY_SPAN, KEY_SPAN).

    With ``key = (15 - e)·1024 + mantissa`` (increasing in u inside the lower half), ``Z_low(e, m) <= F``
    holds exactly for ``key < keys[F]``; so ``s = +1`` iff ``key < keys[F]`` when fold = 0 and iff
    ``key >= keys[-F]`` when fold = 1 (because ``Z = 1 - Z_low`` there). Built from PBIT's own table and
    checked to be a threshold in key order, so the kernel and PBIT cannot disagree.
    """
    if (PBIT.fold_bit, PBIT.exp_lsb, PBIT.exp_bits, PBIT.mant_lsb, PBIT.mant_bits) != (31, 16, 15, 6, 10):
        raise AssertionError("_kernel.c hard-codes the p-bit fields; they disagree with opentsu.formats.PBIT")
    span = _kernel.KEY_SPAN
    z_low = PBIT.threshold_table[0].astype(np.int64)  # (octaves, mantissas), fold = 0
    octave = np.arange(PBIT.octaves)[:, None]
    key = (PBIT.exp_bits - octave) * (1 << PBIT.mant_bits) + np.arange(1 << PBIT.mant_bits)[None, :]
    order = np.argsort(key, axis=None)
    z_by_key = z_low.reshape(-1)[order]
    if np.any(np.diff(z_by_key) < 0):
        raise AssertionError("Z_low is not monotone in the kernel's key order")
    fields = np.arange(-span, span)
    keys = np.searchsorted(z_by_key, fields, side="right").astype(np.int32)
    keys.setflags(write=False)
    return keys


class _Block:
    """The state of a contiguous range of chains, laid out for the kernel (chains innermost)."""

    def __init__(self, n, lanes, states):
        width = states.shape[0]
        self.width = width
        self.spins = np.ones((n, width), dtype=np.int8)
        self.bias = np.zeros((n, width), dtype=np.int16)
        self.s0 = np.ascontiguousarray(states[:, :, 0].T)
        self.s1 = np.ascontiguousarray(states[:, :, 1].T)


class Emulator:
    """Run ``chains`` chains of ``program`` side by side, bit-exact with the fabric."""

    def __init__(self, program: Program, chains: int = 1, seed: int = 0, first_chain: int = 0,
                 threads: int | None = None):
        if chains < 1:
            raise ValueError(f"chains must be positive, not {chains}")
        self.program = program
        g = program.geometry
        self.chains = chains
        self.seed = seed
        self.first_chain = first_chain
        threads = threads or min(os.cpu_count() or 1, 8)
        count = max(1, min(threads, chains // _MIN_BLOCK))
        bounds = np.linspace(0, chains, count + 1).astype(int)
        states = lane_seed_states(seed, range(first_chain, first_chain + chains), g.lanes)
        self._blocks = [_Block(g.n, g.lanes, states[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
        self._bounds = bounds
        self._order = np.ascontiguousarray(g.schedule, dtype=np.int32)
        self._nbr = np.ascontiguousarray(np.where(g.neighbours >= 0, g.neighbours, 0), dtype=np.int32)
        self._keys = key_thresholds()
        self._weights = None
        self._pool = ThreadPoolExecutor(len(self._blocks)) if len(self._blocks) > 1 else None
        self.layer = None
        self.moments = None

    def close(self):
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def __del__(self):
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False)

    # -- state access
    def _gather(self, name) -> np.ndarray:
        return np.concatenate([getattr(b, name) for b in self._blocks], axis=1)

    @property
    def fabric_spins(self) -> np.ndarray:
        """(chains, fabric nodes) int8 copy of the whole fabric state."""
        return self._gather("spins").T.copy()

    @property
    def spins(self) -> np.ndarray:
        """(chains, model nodes) int8 copy of the model's spins."""
        return self._gather("spins")[self.program.node_map].T.copy()

    def set_spins(self, spins: np.ndarray):
        """Set the model's spins, (chains, model nodes) of ±1; fabric padding is left alone."""
        spins = np.asarray(spins)
        if spins.shape != (self.chains, self.program.n_model) or not np.all(np.abs(spins) == 1):
            raise ValueError(f"spins must be ±1 of shape {(self.chains, self.program.n_model)}")
        for block, a, b in zip(self._blocks, self._bounds[:-1], self._bounds[1:]):
            block.spins[self.program.node_map] = spins[a:b].T.astype(np.int8)

    @property
    def rng_state(self) -> np.ndarray:
        """(chains, lanes, 2) uint32 generator states."""
        return np.stack([self._gather("s0").T, self._gather("s1").T], axis=-1)

    @property
    def effective_bias(self) -> np.ndarray:
        """(chains, fabric nodes) effective bias codes as the fabric stores them (clamps as ±127)."""
        b = self._gather("bias").T
        return np.where(b == FORCE, CLAMP_PLUS, np.where(b == -FORCE, CLAMP_MINUS, b)).astype(np.int16)

    # -- fabric operations
    def load_layer(self, index: int = 0):
        layers = self.program.layers
        if not 0 <= index < len(layers):
            raise ValueError(f"layer {index} does not exist (the program has {len(layers)})")
        lay = self.program.layers[index]
        self.layer = index
        self._weights = np.ascontiguousarray(lay.weights, dtype=np.int16)
        clamp = lay.clamp[:, None]
        for block in self._blocks:
            bias = lay.bias[:, None].astype(np.int16) + lay.coupling[:, None].astype(np.int16) * block.spins
            bias = np.where(clamp == 1, FORCE, np.where(clamp == -1, -FORCE, bias))
            block.bias = np.ascontiguousarray(bias, dtype=np.int16)

    def _run(self, sweeps: int, randomize: bool):
        if self._weights is None:
            self.load_layer(0)
        if sweeps <= 0:
            return
        cycles, lanes = self._order.shape
        degree = self._nbr.shape[1]

        def run(block):
            _kernel.sweeps(block.spins, block.bias, block.s0, block.s1, self._order, self._nbr, self._weights,
                           self._keys, block.width, cycles, lanes, degree, sweeps, randomize, 0, block.width)

        if self._pool is None:
            run(self._blocks[0])
        else:
            for future in [self._pool.submit(run, b) for b in self._blocks]:
                future.result()

    def randomize(self):
        self._run(1, True)

    def sweep(self, count: int = 1):
        if count < 0:
            raise ValueError(f"sweep count must be non-negative, not {count}")
        self._run(count, False)

    def sample(self, per_chain: int, burn_in: int = 0, thin: int = 1) -> np.ndarray:
        """(chains, per_chain, model nodes): the state after ``burn_in`` sweeps, then every ``thin`` sweeps."""
        if per_chain < 0 or burn_in < 0 or thin < 1:
            raise ValueError("need per_chain >= 0, burn_in >= 0 and thin >= 1")
        self.sweep(burn_in)
        ops = [Op(Opcode.THIN, thin), Op(Opcode.CAPTURE, per_chain)] if per_chain else []
        return self.run(ops)

    def run(self, ops: list[Op], full: bool = False) -> np.ndarray:
        """Execute a sequence (``opentsu.sequence``) as the fabric's sequencer does.

        Returns the captured samples, (chains, captures, model nodes) int8, or fabric nodes with ``full``.
        Like a START, it clears ``moments`` before the sequence counts into them.
        """
        width = self.program.geometry.n if full else self.program.n_model
        total = sum(op.arg for op in ops if op.code is Opcode.CAPTURE)
        out = np.empty((self.chains, total, width), dtype=np.int8)
        thin, taken = 1, 0
        g = self.program.geometry
        if any(op.code is Opcode.ACCUMULATE for op in ops) and not hasattr(g, "moment_partners"):
            raise SequenceError("ACCUMULATE needs a grid fabric: general graphs have no on-chip moments")
        self.moments = Moments.zeros(self.chains, g.n, len(g.moment_offsets)) if hasattr(g, "moment_offsets") else None
        for op in ops:
            if op.code is Opcode.LOAD:
                if op.arg >= len(self.program.layers):
                    raise SequenceError(f"LOAD {op.arg}: the program has {len(self.program.layers)} layers")
                self.load_layer(op.arg)
            elif op.code is Opcode.RANDOMIZE:
                self.randomize()
            elif op.code is Opcode.SWEEP:
                self.sweep(op.arg)
            elif op.code is Opcode.THIN:
                thin = op.arg
            elif op.code is Opcode.CAPTURE:
                for k in range(op.arg):
                    if k:
                        self.sweep(thin)
                    out[:, taken] = self.fabric_spins if full else self.spins
                    taken += 1
            elif op.code is Opcode.ACCUMULATE:
                for k in range(op.arg):
                    if k:
                        self.sweep(thin)
                    self.moments.count(self.fabric_spins, g.moment_partners)
            elif op.code is Opcode.END:
                break
        return out[:, :taken]


def chain_counts(n: int, chains: int) -> list[int]:
    """Samples per chain when ``n`` samples are spread over ``chains`` chains (the first ones take the rest)."""
    base, extra = divmod(n, chains)
    return [base + (c < extra) for c in range(chains)]


def sample(program: Program, n: int, chains: int = 1, burn_in: int = 100, thin: int = 1, seed: int = 0,
           layer: int = 0) -> np.ndarray:
    """Contract §2 sampling on the emulator: (n, model nodes) int8, chain-major.

    Each chain runs ``sequence.sampling_sequence``: load, randomize, ``burn_in`` sweeps, then a sample
    every ``thin`` sweeps. (A board runs each chain with its own count; extra samples here are dropped.)
    """
    if chains < 1 or n < 0:
        raise ValueError("need chains >= 1 and n >= 0")
    counts = chain_counts(n, chains)
    emu = Emulator(program, chains=chains, seed=seed)
    try:
        per = emu.run(sampling_sequence(max(counts), burn_in, thin, layer))
    finally:
        emu.close()
    return np.concatenate([per[c, :counts[c]] for c in range(chains)], axis=0)
