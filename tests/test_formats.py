import math

import numpy as np
import pytest

from opentsu.emulator import key_thresholds
from opentsu import _kernel
from opentsu.formats import (BIAS, PBIT, WEIGHT, EFFECTIVE_BIAS, field_bits, lane_seed_states, splitmix64,
                             xoroshiro64_step)


def test_every_eighth_in_range_is_exact():
    values = np.arange(-32, 33) / 8
    assert WEIGHT.is_exact(values).all() and BIAS.is_exact(values).all()
    codes, saturated = WEIGHT.quantize(values)
    assert not saturated.any()
    assert np.array_equal(WEIGHT.to_float(codes), values)


def test_quantisation_saturates_and_never_wraps():
    codes, saturated = WEIGHT.quantize([100.0, -100.0, 7.95, -7.94, 7.875, 0.0624, 0.0626, -0.0625])
    assert codes.tolist() == [63, -63, 63, -63, 63, 0, 1, -1]
    assert saturated.tolist() == [True, True, True, True, False, False, False, False]


def test_formats_are_symmetric_and_fit_their_bits():
    for fmt in (WEIGHT, BIAS, EFFECTIVE_BIAS):
        assert fmt.min_code == -fmt.max_code
        raw = fmt.to_unsigned(np.arange(fmt.min_code, fmt.max_code + 1))
        assert raw.max() < 1 << fmt.bits
        assert np.array_equal(fmt.from_unsigned(raw), np.arange(fmt.min_code, fmt.max_code + 1))
    # The effective bias h + c·x of two weight-format values never reaches the clamp codes.
    assert 2 * WEIGHT.max_code < 127 <= (1 << (EFFECTIVE_BIAS.bits - 1)) - 1


def test_field_width_holds_the_extreme_sum():
    for degree in (1, 4, 8, 12):
        bits = field_bits(degree)
        assert degree * WEIGHT.max_code <= (1 << (bits - 1)) - 1


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def test_pbit_definition_is_the_midpoint_rule():
    # Independent statement: Z_low(e, m) is the smallest F <= 0 with sigma(F/4) above the cell midpoint.
    table = PBIT.threshold_table[0]
    fields = np.arange(-80, 1)
    probs = sigmoid(fields / 4)
    for e in range(PBIT.octaves):
        mants = np.arange(1 << PBIT.mant_bits)
        if e < PBIT.exp_bits:
            mids = 2.0 ** -(e + 2) * (1 + (mants + 0.5) / 1024)
        else:
            mids = np.full(len(mants), 2.0 ** -17)
        expected = fields[np.argmax(probs[None, :] > mids[:, None], axis=1)]
        assert np.array_equal(table[e], expected), e


def test_pbit_upper_half_mirrors_lower_half():
    assert np.array_equal(PBIT.threshold_table[1], 1 - PBIT.threshold_table[0])


def test_pbit_hardware_form_uses_four_comparators():
    lo, bounds = PBIT.tables
    assert len(bounds) == 4 and all(0 <= b <= 1023 for row in bounds for b in row)
    words = np.random.default_rng(0).integers(0, 1 << 32, size=200_000, dtype=np.uint64)
    fold, e, mant = PBIT.split(words)
    direct = PBIT.threshold_table[fold, e, mant]
    assert np.array_equal(PBIT.threshold(words), direct)


def test_pbit_probability_follows_sigmoid():
    fields = np.arange(-60, 61)
    realised = PBIT.probability(fields)
    target = sigmoid(fields / 4)
    tail = np.minimum(target, 1 - target)
    assert np.abs(realised - target).max() < 1.1e-4
    rel = np.abs(realised - target)[tail >= 2.0 ** -16] / tail[tail >= 2.0 ** -16]
    assert rel.max() < 5e-4
    assert np.allclose(realised + realised[::-1], 1.0, atol=0, rtol=0)
    assert realised[fields == 0] == 0.5
    assert np.all(realised[fields >= 48] == 1.0) and np.all(realised[fields <= -48] == 0.0)


def test_pbit_probability_matches_frequency_of_random_words():
    # The exact probability the tables claim, against the empirical rate of F >= Z(r) over random words.
    words = np.random.default_rng(1).integers(0, 1 << 32, size=400_000, dtype=np.uint64)
    z = PBIT.threshold(words)
    for field in (-30, -9, -1, 0, 2, 11):
        rate = np.mean(field >= z)
        p = PBIT.probability([field])[0]
        assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / len(words)) + 1e-9


def test_kernel_key_form_equals_threshold():
    keys = key_thresholds()
    span = _kernel.KEY_SPAN
    rng = np.random.default_rng(2)
    words = rng.integers(0, 1 << 32, size=100_000, dtype=np.uint64)
    fields = rng.integers(-70, 71, size=len(words))
    fold, e, mant = PBIT.split(words)
    key = (15 - e) * 1024 + mant
    f = np.clip(np.where(fold == 1, -fields, fields), -span, span - 1)
    below = key < keys[f + span]
    kernel_plus = below ^ (fold == 1)
    assert np.array_equal(kernel_plus, fields >= PBIT.threshold(words))


def reference_xoroshiro64(s0, s1, count):
    """Blackman & Vigna's xoroshiro64 linear engine (step, then output s0), written from the paper with
    Python ints."""
    out = []
    mask = 0xFFFFFFFF
    rotl = lambda x, k: ((x << k) | (x >> (32 - k))) & mask
    for _ in range(count):
        s1 ^= s0
        s0 = rotl(s0, 26) ^ s1 ^ ((s1 << 9) & mask)
        s1 = rotl(s1, 13)
        out.append(s0)
    return out


def test_rng_is_xoroshiro64():
    s0, s1 = np.uint32(0x12345678), np.uint32(0x9ABCDEF0)
    words = []
    for _ in range(1000):
        w, s0, s1 = xoroshiro64_step(s0, s1)
        words.append(int(w))
    assert words == reference_xoroshiro64(0x12345678, 0x9ABCDEF0, 1000)


def test_splitmix64_known_value():
    # First output of splitmix64 seeded with 0 (Steele, Lea & Flood; Vigna's reference implementation).
    assert splitmix64(0) == 0xE220A8397B1DCDAF


def test_seeds_are_distinct_and_reproducible():
    a = lane_seed_states(7, range(64), 8)
    assert np.array_equal(a, lane_seed_states(7, range(64), 8))
    assert np.array_equal(a[10:20], lane_seed_states(7, range(10, 20), 8))
    flat = a.reshape(-1, 2).astype(np.uint64)
    packed = flat[:, 0] | (flat[:, 1] << np.uint64(32))
    assert len(np.unique(packed)) == len(packed)
    assert not np.array_equal(a, lane_seed_states(8, range(64), 8))
    with pytest.raises(ValueError):
        lane_seed_states(-1, range(1), 1)


def test_random_words_have_no_lag_correlation():
    states = lane_seed_states(3, range(1), 4)[0]
    s0, s1 = states[:, 0].copy(), states[:, 1].copy()
    draws = np.empty((100_000, 4), dtype=np.uint64)
    for k in range(len(draws)):
        draws[k], s0, s1 = xoroshiro64_step(s0, s1)
    u = (draws >> np.uint64(6)).astype(np.float64) / 2.0 ** 26 - 0.5
    limit = 4 / math.sqrt(len(u))
    for lag in range(1, 9):
        for lane in range(4):
            assert abs(np.corrcoef(u[:-lag, lane], u[lag:, lane])[0, 1]) < limit
    c = np.corrcoef(u.T)
    assert np.abs(c[np.triu_indices(4, 1)]).max() < limit
