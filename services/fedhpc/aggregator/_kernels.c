/*
 * fedhpc.aggregator._kernels: the aggregator's inner loop in one pass over memory.
 *
 * The streaming core reads a chunk of one update into a small buffer, then adds it to the
 * accumulator with its weight and (for the update's L2 norm and the NaN/Inf check) sums its
 * squares. With torch ops those are two passes over the chunk (add_, dot); here they are
 * one, with the GIL released. Built as an optional extension: without a C compiler the
 * package installs without it and the core keeps the torch path (same results to rounding).
 *
 *   accumulate(acc, x, weight, first, x_dtype) -> float
 *
 *   acc     writable C-contiguous buffer of float32 ('f') or float64 ('d') elements
 *   x       C-contiguous bytes: as many elements as acc, of x_dtype "F32" or "BF16"
 *   weight  the update's weight w
 *   first   True: acc = w * x (the first update sets the accumulator, no zeroing pass);
 *           False: acc += w * x
 *   returns sum(x * x), added up in double: NaN or Inf when x holds a NaN or an Inf, and
 *           Inf too when finite squares overflow (float32 lanes for a float32 accumulator):
 *           the caller tells the two apart
 *
 * Rounding matches the torch path: the product and sum are computed in the accumulator's
 * precision, x widened first, w rounded to it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* Squares are summed in float32 lanes over blocks this long, each block's lanes then added in
 * double: the error stays that of a short float sum whatever the chunk's length. */
#define BLOCK 4096

/* Explicit vectors (GCC/Clang vector extensions), so the accumulators live in registers: written
 * as arrays, the compiler may keep the lanes on the stack and every element waits on a
 * store-to-load round trip. */
/* One build runs on every x86-64 node: an AVX2/FMA clone of each kernel is picked at load time
 * where the CPU has it. Besides the wider vectors this matters because numpy and torch leave
 * the upper halves of the AVX registers dirty, and legacy-SSE code then runs at half speed or
 * worse (measured: 2 MB chunks at ~10 GB/s with SSE encoding, ~30 GB/s with VEX). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define KERNEL_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define KERNEL_CLONES
#endif

typedef float f32x8 __attribute__((vector_size(32)));
typedef double f64x4 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));

static inline float bf16_to_f32(uint16_t bits) {
    uint32_t widened = (uint32_t)bits << 16;
    float value;
    memcpy(&value, &widened, sizeof value);
    return value;
}

static inline f32x8 load8_f32(const void *x, size_t i) {
    f32x8 v;
    memcpy(&v, (const float *)x + i, sizeof v);
    return v;
}

static inline f32x8 load8_bf16(const void *x, size_t i) {
    u16x8 half;
    memcpy(&half, (const uint16_t *)x + i, sizeof half);
    u32x8 wide = __builtin_convertvector(half, u32x8) << 16;
    f32x8 v;
    memcpy(&v, &wide, sizeof v);
    return v;
}

static inline float load1(const void *x, size_t i, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)x)[i]) : ((const float *)x)[i];
}

/* acc (float32) = w * x or acc += w * x; returns sum(x * x). The branches on `first` and `bf16`
 * are loop-invariant (hoisted by the compiler). */
KERNEL_CLONES static double acc_f32(float *restrict acc, const void *restrict x, size_t n, float w, int first,
                             int bf16) {
    double total = 0.0;
    for (size_t start = 0; start < n; start += BLOCK) {
        size_t end = start + BLOCK < n ? start + BLOCK : n;
        f32x8 s0 = {0}, s1 = {0};
        size_t i = start;
        for (; i + 16 <= end; i += 16) {
            f32x8 v0 = bf16 ? load8_bf16(x, i) : load8_f32(x, i);
            f32x8 v1 = bf16 ? load8_bf16(x, i + 8) : load8_f32(x, i + 8);
            f32x8 a0 = w * v0, a1 = w * v1;
            if (!first) {
                f32x8 old0, old1;
                memcpy(&old0, acc + i, sizeof old0);
                memcpy(&old1, acc + i + 8, sizeof old1);
                a0 += old0;
                a1 += old1;
            }
            memcpy(acc + i, &a0, sizeof a0);
            memcpy(acc + i + 8, &a1, sizeof a1);
            s0 += v0 * v0;
            s1 += v1 * v1;
        }
        float tail = 0.0f;
        for (; i < end; i++) {
            float v = load1(x, i, bf16);
            acc[i] = first ? w * v : acc[i] + w * v;
            tail += v * v;
        }
        f32x8 s = s0 + s1;
        total += (double)tail;
        for (int j = 0; j < 8; j++)
            total += (double)s[j];
    }
    return total;
}

/* acc (float64) = w * x or acc += w * x, in double; returns sum(x * x) in double. */
KERNEL_CLONES static double acc_f64(double *restrict acc, const void *restrict x, size_t n, double w,
                             int first, int bf16) {
    f64x4 s0 = {0}, s1 = {0};
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        f32x8 h = bf16 ? load8_bf16(x, i) : load8_f32(x, i);
        f32x4 h0 = __builtin_shufflevector(h, h, 0, 1, 2, 3);
        f32x4 h1 = __builtin_shufflevector(h, h, 4, 5, 6, 7);
        f64x4 v0 = __builtin_convertvector(h0, f64x4), v1 = __builtin_convertvector(h1, f64x4);
        f64x4 a0 = w * v0, a1 = w * v1;
        if (!first) {
            f64x4 old0, old1;
            memcpy(&old0, acc + i, sizeof old0);
            memcpy(&old1, acc + i + 4, sizeof old1);
            a0 += old0;
            a1 += old1;
        }
        memcpy(acc + i, &a0, sizeof a0);
        memcpy(acc + i + 4, &a1, sizeof a1);
        s0 += v0 * v0;
        s1 += v1 * v1;
    }
    double total = 0.0;
    for (; i < n; i++) {
        double v = (double)load1(x, i, bf16);
        acc[i] = first ? w * v : acc[i] + w * v;
        total += v * v;
    }
    f64x4 s = s0 + s1;
    for (int j = 0; j < 4; j++)
        total += s[j];
    return total;
}

static double run_kernel(void *acc, int acc_f64_elements, const void *x, int x_bf16, size_t n,
                         double w, int first) {
    if (acc_f64_elements)
        return acc_f64(acc, x, n, w, first, x_bf16);
    return acc_f32(acc, x, n, (float)w, first, x_bf16);
}

static PyObject *accumulate(PyObject *self, PyObject *args) {
    PyObject *acc_object, *x_object;
    Py_buffer acc, x;
    double weight;
    int first;
    const char *x_dtype;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOdps:accumulate", &acc_object, &x_object, &weight, &first, &x_dtype))
        return NULL;
    /* The format tells float32 from float64 accumulators. */
    if (PyObject_GetBuffer(acc_object, &acc, PyBUF_WRITABLE | PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    if (PyObject_GetBuffer(x_object, &x, PyBUF_C_CONTIGUOUS) < 0) {
        PyBuffer_Release(&acc);
        return NULL;
    }
    PyObject *result = NULL;
    int x_bf16 = strcmp(x_dtype, "BF16") == 0;
    if (!x_bf16 && strcmp(x_dtype, "F32") != 0) {
        PyErr_Format(PyExc_ValueError, "x_dtype must be 'F32' or 'BF16', got %R",
                     PyTuple_GET_ITEM(args, 4));
        goto done;
    }
    const char *format = acc.format ? acc.format : "B";
    int acc_f64;
    if (strcmp(format, "f") == 0 || strcmp(format, "<f") == 0 || strcmp(format, "=f") == 0) {
        acc_f64 = 0;
    } else if (strcmp(format, "d") == 0 || strcmp(format, "<d") == 0 || strcmp(format, "=d") == 0) {
        acc_f64 = 1;
    } else {
        PyErr_Format(PyExc_ValueError, "acc must hold float32 or float64 elements, its format is '%s'",
                     format);
        goto done;
    }
    Py_ssize_t n = acc.len / (acc_f64 ? 8 : 4);
    Py_ssize_t x_size = x_bf16 ? 2 : 4;
    if (x.len != n * x_size) {
        PyErr_Format(PyExc_ValueError, "x holds %zd bytes, %zd elements of %s need %zd", x.len, n,
                     x_dtype, n * x_size);
        goto done;
    }
    double total;
    Py_BEGIN_ALLOW_THREADS
    total = run_kernel(acc.buf, acc_f64, x.buf, x_bf16, (size_t)n, weight, first);
    Py_END_ALLOW_THREADS
    result = PyFloat_FromDouble(total);
done:
    PyBuffer_Release(&acc);
    PyBuffer_Release(&x);
    return result;
}

static PyMethodDef methods[] = {
    {"accumulate", accumulate, METH_VARARGS,
     "accumulate(acc, x, weight, first, x_dtype) -> float\n\n"
     "acc = weight * x (first) or acc += weight * x, in acc's precision (float32 or float64);\n"
     "x is bytes of x_dtype 'F32' or 'BF16'. Returns sum(x * x), NaN/Inf if x holds one."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_kernels", "The aggregator's fused accumulate-and-square-sum kernel.", -1,
    methods,
};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
