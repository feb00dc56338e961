"""The fabric's memory map: what the host can write and read, and where.

The UART protocol (``opentsu.protocol``) carries region reads and writes; the gateware decodes the same
regions. Offsets count words of the region's width; all multi-byte words travel little endian.

=========  =====================================================  ==============================
region     offset                                                 word
=========  =====================================================  ==============================
REGS       ``Reg`` index                                          32 bits
WEIGHTS    ``row(layer, τ) << lane_bits | lane``                  ``7·degree`` bits: weight d in
                                                                  bits [7d, 7d+7)
PARAMS     ``(row(layer, τ) << 1 | k) << bank_bits | bank``       16 bits: lane 2·bank in 7..0, lane
           (bank = lane/2)                                        2·bank+1 in 15..8; k = 0: the
                                                                  node's ``h + c``, k = 1: its
                                                                  ``h - c`` (``formats.node_words``)
SEEDS      ``k`` (0..63)                                          16 bits: bit ℓ is lane ℓ's
                                                                  seed-injection bit k (lanes <= 16)
SEQUENCE   ``2·op + half`` (half 0 = bits 15..0 of the op word)   16 bits
CLAMPS     ``row(layer, τ) << bank_bits | bank`` (bank = lane/2)  16 bits: the bias RANDOMIZE uses
                                                                  for lanes 2·bank (7..0) and
                                                                  2·bank+1 (15..8): 0, or the clamp
                                                                  code ±127 of a clamped node
MOMENTS    ``(kind << tau_bits | τ) << lane_bits | lane``          16 bits, read only: over the
                                                                  samples ACCUMULATE counted
                                                                  (``Reg.MOMENT_SAMPLES``), kind 0
                                                                  counts s = +1 of the node at
                                                                  (τ, lane), kind k >= 1 counts
                                                                  s_i = s_j with its neighbour
                                                                  along ``moment_offsets()[k-1]``
=========  =====================================================  ==============================

with ``row(layer, τ) = layer << tau_bits | τ`` (bit fields, so the gateware decodes them without adders).
Writes other than REGS are refused while a sequence runs.
"""

from __future__ import annotations

import enum

from .formats import SEED_STEPS, WEIGHT

__all__ = ["Region", "Reg", "Control", "Status", "Flags", "lane_bits", "bank_bits", "tau_bits", "row",
           "program_writes", "seed_writes", "sequence_writes", "unpack_capture", "REGION_SHIFT", "OFFSET_BITS",
           "address", "split_address", "region_word_bits", "region_words", "params_pairs", "moments_from_words",
           "moment_kinds", "WRITABLE", "READABLE", "SEQUENCE_DEPTH", "MOMENT_LIMIT"]

#: Region number sits above this bit of a bus address.
REGION_SHIFT = 24
OFFSET_BITS = REGION_SHIFT
#: Ops the sequence memory holds.
SEQUENCE_DEPTH = 64
#: ACCUMULATE counts at most this many samples per run, so no 16-bit moment counter can wrap.
MOMENT_LIMIT = (1 << 16) - 1


class Region(enum.IntEnum):
    REGS = 0
    WEIGHTS = 1
    PARAMS = 2
    SEEDS = 3
    SEQUENCE = 4
    MOMENTS = 5
    CLAMPS = 6


class Reg(enum.IntEnum):
    """Registers of the REGS region (32-bit)."""

    CONTROL = 0     # write: Control bits
    STATUS = 1      # read: Status bits
    OP_INDEX = 2    # read: index of the op running (or last run)
    SWEEPS = 3      # read: sweeps issued since start (24 bits, wraps)
    FLAGS = 4       # read/write: run flags (Flags)
    MOMENT_SAMPLES = 5  # read: samples ACCUMULATE has counted since START (stops at MOMENT_LIMIT)


class Control(enum.IntFlag):
    START = 1 << 0   # run the sequence from op 0
    STOP = 1 << 1    # stop at the next sweep (or pass) boundary


class Status(enum.IntFlag):
    RUNNING = 1 << 0
    WRITE_REFUSED = 1 << 1   # sticky: a memory write arrived while running and was dropped
    BAD_SEQUENCE = 1 << 2    # sticky: the sequence held an unknown opcode or a LOAD beyond the layers


class Flags(enum.IntFlag):
    TRNG_MIX = 1 << 0        # mix TRNG bits into the lane generators (not reproducible)
    KEEP_RNG = 1 << 1        # START continues the generators instead of seeding them from SEEDS


def lane_bits(lanes: int) -> int:
    """Bits of the lane field at the bottom of WEIGHTS and PARAMS offsets."""
    return max(1, (lanes - 1).bit_length())


def bank_bits(lanes: int) -> int:
    """Bits of the bank field of PARAMS and CLAMPS offsets (two lanes per bank; none for one bank)."""
    return ((lanes + 1) // 2 - 1).bit_length()


def tau_bits(cycles: int) -> int:
    """Bits of the τ field of a row."""
    return max(1, (cycles - 1).bit_length())


def moment_kinds(degree: int) -> int:
    """Counters per node in MOMENTS: one for s = +1, one per edge it owns (half its degree)."""
    return 1 + degree // 2


def region_words(region: Region, lanes: int, cycles: int, degree: int, layers: int) -> int:
    """Words the host may address in ``region`` on a fabric of these parameters (offsets 0 .. words-1,
    with holes where a field is not a power of two)."""
    layer_bits = max(1, (layers - 1).bit_length())
    rows = 1 << (tau_bits(cycles) + layer_bits)
    return {
        Region.REGS: len(Reg),
        Region.WEIGHTS: rows << lane_bits(lanes),
        Region.PARAMS: rows << (1 + bank_bits(lanes)),
        Region.SEEDS: SEED_STEPS,
        Region.SEQUENCE: 2 * SEQUENCE_DEPTH,
        Region.MOMENTS: moment_kinds(degree) << (tau_bits(cycles) + lane_bits(lanes)),
        Region.CLAMPS: rows << bank_bits(lanes),
    }[region]


#: Regions the host may write while no sequence runs (REGS may always be written), and may read.
WRITABLE = frozenset({Region.REGS, Region.WEIGHTS, Region.PARAMS, Region.SEEDS, Region.SEQUENCE, Region.CLAMPS})
READABLE = frozenset({Region.REGS, Region.PARAMS, Region.SEQUENCE, Region.MOMENTS})


def row(layer: int, tau: int, cycles: int) -> int:
    return layer << tau_bits(cycles) | tau


def program_writes(program, layers=None) -> list[tuple[Region, int, int]]:
    """The (region, offset, word) writes that load ``program``'s layers (all, or the indices given)."""
    g = program.geometry
    bits = lane_bits(g.lanes)
    writes = []
    for layer in range(len(program.layers)) if layers is None else layers:
        weights, nodes = program.weight_image(layer), program.node_image(layer)
        clamps = program.clamp_image(layer)
        pairs = params_pairs(nodes)
        for tau in range(g.cycles):
            for lane in range(g.lanes):
                offset = row(layer, tau, g.cycles) << bits | lane
                writes.append((Region.WEIGHTS, offset, int(weights[lane, tau])))
            for k in (0, 1):
                for bank in range(pairs.shape[1]):
                    writes.append((Region.PARAMS, (row(layer, tau, g.cycles) << 1 | k) << bank_bits(g.lanes) | bank,
                                   int(pairs[k, bank, tau])))
            for bank in range(clamps.shape[0]):
                writes.append((Region.CLAMPS, row(layer, tau, g.cycles) << bank_bits(g.lanes) | bank,
                               int(clamps[bank, tau])))
    return writes


def params_pairs(node_image):
    """(2, banks, cycles) PARAMS words from a (lanes, cycles) ``node_image``: k = 0 holds each lane pair's
    ``h + c`` bytes, k = 1 their ``h - c`` bytes (lane 2·bank low, 2·bank+1 high)."""
    import numpy as np
    nodes = np.asarray(node_image, dtype=np.uint32)
    if nodes.shape[0] % 2:
        nodes = np.concatenate([nodes, np.zeros((1, nodes.shape[1]), dtype=nodes.dtype)])
    low, high = nodes[0::2], nodes[1::2]
    plus = (low & 0xFF) | (high & 0xFF) << 8
    minus = (low >> 8) | (high >> 8) << 8
    return np.stack([plus, minus]).astype(np.uint16)


def moments_from_words(words, samples: int, geometry):
    """``emulator.Moments`` of one chain from the MOMENTS region's words (all of them, in offset order)
    and the MOMENT_SAMPLES register."""
    import numpy as np
    from .emulator import Moments
    g = geometry
    kinds = moment_kinds(g.degree)
    lb, tb = lane_bits(g.lanes), tau_bits(g.cycles)
    words = np.asarray(words, dtype=np.int64)
    if words.shape != (kinds << (tb + lb),):
        raise ValueError(f"MOMENTS has {kinds << (tb + lb)} words on this fabric, got {words.shape}")
    grid = words.reshape(kinds, 1 << tb, 1 << lb)[:, :g.cycles, :g.lanes]
    plus = np.zeros(g.n, dtype=np.int64)
    agree = np.zeros((g.n, kinds - 1), dtype=np.int64)
    sched = g.schedule
    active = sched >= 0
    plus[sched[active]] = grid[0][active]
    for k in range(1, kinds):
        agree[sched[active], k - 1] = grid[k][active]
    return Moments([samples], plus[None], agree[None])


def seed_writes(seed: int, chain: int, lanes: int) -> list[tuple[Region, int, int]]:
    """Writes that make the next START seed every lane for global chain ``chain``
    (``formats.lane_seed_states``), as seed-injection bits (``formats.seed_injection``), word k holding
    bit k of every lane."""
    from .formats import SEED_STEPS, lane_seed_states, seed_injection
    states = lane_seed_states(seed, [chain], lanes)[0]
    bits = [seed_injection(int(states[lane, 0]), int(states[lane, 1])) for lane in range(lanes)]
    return [(Region.SEEDS, k, sum(((bits[lane] >> k) & 1) << lane for lane in range(lanes)))
            for k in range(SEED_STEPS)]


def sequence_writes(ops) -> list[tuple[Region, int, int]]:
    """Writes that store a sequence (``opentsu.sequence``) from op 0, END included."""
    from .sequence import encode
    words = encode(ops)
    if len(words) > SEQUENCE_DEPTH:
        from .sequence import SequenceError
        raise SequenceError(f"the sequence has {len(words)} ops with its END; the device holds {SEQUENCE_DEPTH}")
    writes = []
    for k, word in enumerate(words):
        writes.append((Region.SEQUENCE, 2 * k, word & 0xFFFF))
        writes.append((Region.SEQUENCE, 2 * k + 1, word >> 16))
    return writes


def unpack_capture(words, geometry):
    """Fabric spins (n,) int8 from one capture: ``cycles`` words, bit ℓ of word τ = node schedule[τ, ℓ]."""
    import numpy as np
    sched = geometry.schedule
    if len(words) != sched.shape[0]:
        raise ValueError(f"a capture has {sched.shape[0]} words, got {len(words)}")
    out = np.zeros(geometry.n, dtype=np.int8)
    bits = (np.asarray(words, dtype=np.int64)[:, None] >> np.arange(sched.shape[1])[None, :]) & 1
    active = sched >= 0
    out[sched[active]] = np.where(bits[active] == 1, 1, -1)
    return out


def address(region: Region, offset: int) -> int:
    if not 0 <= offset < 1 << OFFSET_BITS:
        raise ValueError(f"offset {offset} does not fit {OFFSET_BITS} bits")
    return int(region) << REGION_SHIFT | offset


def split_address(addr: int) -> tuple[int, int]:
    return addr >> REGION_SHIFT, addr & ((1 << OFFSET_BITS) - 1)


def region_word_bits(region: Region, degree: int) -> int:
    """Width of one word of ``region`` on a fabric of the given degree."""
    return {Region.REGS: 32, Region.WEIGHTS: WEIGHT.bits * degree, Region.PARAMS: 16, Region.SEEDS: 16,
            Region.SEQUENCE: 16, Region.MOMENTS: 16, Region.CLAMPS: 16}[region]
