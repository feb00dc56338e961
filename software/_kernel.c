/* Inner loop of the bit-exact emulator (opentsu.emulator): block-Gibbs sweeps over a block of chains.
 *
 * Layouts (all C-contiguous, chains innermost so every per-node operation is a vector over chains):
 *   spins   int8   [nodes][chains]      values -1 / +1
 *   bias    int16  [nodes][chains]      effective bias codes, clamps as +-FORCE (see emulator.py)
 *   s0, s1  uint32 [lanes][chains]      xoroshiro64 state of each lane's stream
 *   order   int32  [cycles][lanes]      node updated by each lane on each sweep cycle, -1 idle
 *   nbr     int32  [nodes][degree]      neighbour table (no -1: missing neighbours carry weight 0)
 *   weights int16  [nodes][degree]      weight codes
 *   keys    int32  [2 * KEY_SPAN]       p-bit key thresholds indexed by field + KEY_SPAN
 *
 * The p-bit (opentsu.formats.PBit) is evaluated in its equivalent key form: for a random word r,
 * key = (15 - e) * 1024 + mantissa grows with u inside the lower half, and
 *   fold = 0:  s = +1  iff  key <  keys[F]
 *   fold = 1:  s = +1  iff  key >= keys[-F]
 * emulator.py builds `keys` from PBIT's threshold table and checks the equivalence exhaustively.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define KEY_SPAN 8192
#define BLOCK 64

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MULTIVERSION __attribute__((noinline))
#endif

static inline uint32_t rotl32(uint32_t x, int k) { return (x << k) | (x >> (32 - k)); }

/* p-bit decision for one chain: +1 (returns 1) or -1 (returns 0) given the field and the random word. */
static inline int32_t pbit(int32_t f, uint32_t word, const int32_t *restrict keys)
{
    const uint32_t octave_field = (word >> 16) & 0x7FFFu;
    const int32_t top = 31 - __builtin_clz(2u * octave_field + 1u); /* = 15 - e */
    const int32_t key = top * 1024 + (int32_t)((word >> 6) & 0x3FFu);
    const int32_t fold = (int32_t)(word >> 31);
    f = fold ? -f : f;
    f = f < -KEY_SPAN ? -KEY_SPAN : f;
    f = f > KEY_SPAN - 1 ? KEY_SPAN - 1 : f;
    return (key < keys[f + KEY_SPAN]) ^ fold;
}

/* One xoroshiro64 draw: the state advances, then the word is the new s0. */
#define XOROSHIRO_STEP(a, b, k, word)                                                                 \
    do {                                                                                              \
        const uint32_t x_ = (a)[k], y_ = (b)[k], t_ = x_ ^ y_;                                       \
        (word) = rotl32(x_, 26) ^ t_ ^ (t_ << 9);                                                    \
        (a)[k] = (word);                                                                              \
        (b)[k] = rotl32(t_, 13);                                                                      \
    } while (0)

/* The per-(cycle, lane) vector loops over chains. They are separate functions so that `restrict` on their
 * parameters tells the vectoriser the rows do not overlap. */
MULTIVERSION
static void advance(uint32_t *restrict a, uint32_t *restrict b, int width)
{
    for (int k = 0; k < width; k++) {
        uint32_t word;
        XOROSHIRO_STEP(a, b, k, word);
        (void)word;
    }
}

MULTIVERSION
static void update_randomize(uint32_t *restrict a, uint32_t *restrict b, const int16_t *restrict own,
                             int8_t *restrict out, const int32_t *restrict keys, int width)
{
    for (int k = 0; k < width; k++) {
        uint32_t word;
        XOROSHIRO_STEP(a, b, k, word);
        const int32_t v = own[k];
        out[k] = (int8_t)(2 * pbit((v >= 4096) | (v <= -4096) ? v : 0, word, keys) - 1);
    }
}

MULTIVERSION
static void update_degree8(uint32_t *restrict a, uint32_t *restrict b, const int16_t *restrict own,
                           int8_t *restrict out, const int8_t *restrict o0, const int8_t *restrict o1,
                           const int8_t *restrict o2, const int8_t *restrict o3, const int8_t *restrict o4,
                           const int8_t *restrict o5, const int8_t *restrict o6, const int8_t *restrict o7,
                           const int16_t *restrict w, const int32_t *restrict keys, int width)
{
    /* |field| <= 8 * 63 + 4096 fits int16: narrow arithmetic doubles the vector width. */
    const int16_t w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3], w4 = w[4], w5 = w[5], w6 = w[6], w7 = w[7];
    int16_t field[BLOCK];
    for (int k = 0; k < width; k++)
        field[k] = (int16_t)(own[k] + (int16_t)(w0 * o0[k]) + (int16_t)(w1 * o1[k]) + (int16_t)(w2 * o2[k]) +
                             (int16_t)(w3 * o3[k]) + (int16_t)(w4 * o4[k]) + (int16_t)(w5 * o5[k]) +
                             (int16_t)(w6 * o6[k]) + (int16_t)(w7 * o7[k]));
    for (int k = 0; k < width; k++) {
        uint32_t word;
        XOROSHIRO_STEP(a, b, k, word);
        out[k] = (int8_t)(2 * pbit(field[k], word, keys) - 1);
    }
}

MULTIVERSION
static void accumulate(int32_t *restrict field, const int8_t *restrict other, int32_t w, int width)
{
    for (int k = 0; k < width; k++)
        field[k] += w * other[k];
}

MULTIVERSION
static void update_field(uint32_t *restrict a, uint32_t *restrict b, const int32_t *restrict field,
                         int8_t *restrict out, const int32_t *restrict keys, int width)
{
    for (int k = 0; k < width; k++) {
        uint32_t word;
        XOROSHIRO_STEP(a, b, k, word);
        out[k] = (int8_t)(2 * pbit(field[k], word, keys) - 1);
    }
}

static void run_block(int8_t *spins, const int16_t *bias, uint32_t *s0, uint32_t *s1, const int32_t *order,
                      const int32_t *nbr, const int16_t *weights, const int32_t *keys, Py_ssize_t chains,
                      Py_ssize_t cycles, Py_ssize_t lanes, Py_ssize_t degree, long sweeps, int randomize,
                      Py_ssize_t c0, Py_ssize_t c1)
{
    int32_t field[BLOCK];
    for (Py_ssize_t base = c0; base < c1; base += BLOCK) {
        const int width = (int)((c1 - base) < BLOCK ? (c1 - base) : BLOCK);
        for (long sweep = 0; sweep < sweeps; sweep++) {
            for (Py_ssize_t tau = 0; tau < cycles; tau++) {
                for (Py_ssize_t lane = 0; lane < lanes; lane++) {
                    uint32_t *a = s0 + lane * chains + base;
                    uint32_t *b = s1 + lane * chains + base;
                    const int32_t node = order[tau * lanes + lane];
                    if (node < 0) {
                        advance(a, b, width);
                        continue;
                    }
                    const int16_t *own = bias + (Py_ssize_t)node * chains + base;
                    int8_t *out = spins + (Py_ssize_t)node * chains + base;
                    const int32_t *row = nbr + node * degree;
                    const int16_t *wrow = weights + node * degree;
#define ROW(d) (spins + (Py_ssize_t)row[d] * chains + base)
                    if (randomize) {
                        update_randomize(a, b, own, out, keys, width);
                    } else if (degree == 8) {
                        update_degree8(a, b, own, out, ROW(0), ROW(1), ROW(2), ROW(3), ROW(4), ROW(5), ROW(6),
                                       ROW(7), wrow, keys, width);
                    } else {
                        for (int k = 0; k < width; k++)
                            field[k] = own[k];
                        for (Py_ssize_t d = 0; d < degree; d++)
                            if (wrow[d])
                                accumulate(field, ROW(d), wrow[d], width);
                        update_field(a, b, field, out, keys, width);
                    }
#undef ROW
                }
            }
        }
    }
}

static int get_buffer(PyObject *obj, Py_buffer *view, Py_ssize_t itemsize, int writable, const char *name)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0)) < 0)
        return -1;
    if (view->itemsize != itemsize) {
        PyErr_Format(PyExc_TypeError, "%s: expected %zd-byte items, got %zd", name, itemsize, view->itemsize);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static PyObject *py_sweeps(PyObject *self, PyObject *args)
{
    PyObject *o_spins, *o_bias, *o_s0, *o_s1, *o_order, *o_nbr, *o_weights, *o_keys;
    Py_ssize_t chains, cycles, lanes, degree, c0, c1;
    long sweeps;
    int randomize;
    if (!PyArg_ParseTuple(args, "OOOOOOOOnnnnlpnn", &o_spins, &o_bias, &o_s0, &o_s1, &o_order, &o_nbr, &o_weights,
                          &o_keys, &chains, &cycles, &lanes, &degree, &sweeps, &randomize, &c0, &c1))
        return NULL;
    Py_buffer v[8];
    PyObject *objs[8] = {o_spins, o_bias, o_s0, o_s1, o_order, o_nbr, o_weights, o_keys};
    const Py_ssize_t sizes[8] = {1, 2, 4, 4, 4, 4, 2, 4};
    const int writable[8] = {1, 0, 1, 1, 0, 0, 0, 0};
    const char *names[8] = {"spins", "bias", "s0", "s1", "order", "nbr", "weights", "keys"};
    int got = 0;
    for (; got < 8; got++)
        if (get_buffer(objs[got], &v[got], sizes[got], writable[got], names[got]) < 0)
            goto fail;
    if (c0 < 0 || c1 > chains || c0 > c1 || v[0].len < chains || v[2].len / 4 < lanes * chains ||
        v[4].len / 4 != cycles * lanes || v[7].len / 4 != 2 * KEY_SPAN) {
        PyErr_SetString(PyExc_ValueError, "kernel arguments have inconsistent sizes");
        goto fail;
    }
    Py_BEGIN_ALLOW_THREADS
    run_block(v[0].buf, v[1].buf, v[2].buf, v[3].buf, v[4].buf, v[5].buf, v[6].buf, v[7].buf, chains, cycles, lanes,
              degree, sweeps, randomize, c0, c1);
    Py_END_ALLOW_THREADS
    for (int i = 0; i < 8; i++)
        PyBuffer_Release(&v[i]);
    Py_RETURN_NONE;
fail:
    for (int i = 0; i < got; i++)
        PyBuffer_Release(&v[i]);
    return NULL;
}

static PyMethodDef methods[] = {
    {"sweeps", py_sweeps, METH_VARARGS, "Run block-Gibbs sweeps over chains [c0, c1) in place (releases the GIL)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernel", "OpenTSU emulator inner loop.", -1, methods};

PyMODINIT_FUNC PyInit__kernel(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddIntConstant(m, "KEY_SPAN", KEY_SPAN) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
