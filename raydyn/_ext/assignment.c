/* Batched minimum-cost assignment of many small dense square problems.
 *
 * raydyn's pairwise Wasserstein matrices solve millions of n x n assignment problems
 * (n ~ 10). scipy.optimize.linear_sum_assignment solves one per call, and at n = 10 the
 * call (argument parsing, array allocation) costs more than the solve. This module solves a
 * whole (B, n, n) batch in one call, with the GIL released.
 *
 * Algorithm: the O(n^3) shortest-augmenting-path Hungarian method with row and column
 * potentials (Kuhn-Munkres in the Jonker-Volgenant form): rows are added one at a time and
 * each is connected by a Dijkstra-like search over reduced costs a[i][j] - u[i] - v[j] >= 0.
 * Written for raydyn; tested against scipy's linear_sum_assignment
 * (tests/analysis/test_koopman.py).
 *
 * wasserstein_pair_sums fuses the rest of the Wasserstein kernel for pairs of spectra: the ground
 * cost, numpy's row-minimum shortcut and the solve, without (B, n, n) cost arrays; its results are
 * bit for bit those of the numpy path (tests/analysis/test_koopman_fused.py). Build with
 * -ffp-contract=off (setup.py): a fused multiply-add would round the costs differently.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdlib.h>
#include <stddef.h>
#include <string.h>

/* Working arrays (1-based, size n + 1) shared by every problem of a batch. */
typedef struct {
    double *u, *v, *minv;
    Py_ssize_t *p, *way;
    char *used;
} work_t;

static void work_free(work_t *w) {
    free(w->u); free(w->v); free(w->minv); free(w->p); free(w->way); free(w->used);
}

static int work_alloc(work_t *w, Py_ssize_t n) {
    w->u = malloc(sizeof(double) * (n + 1));
    w->v = malloc(sizeof(double) * (n + 1));
    w->minv = malloc(sizeof(double) * (n + 1));
    w->p = malloc(sizeof(Py_ssize_t) * (n + 1));
    w->way = malloc(sizeof(Py_ssize_t) * (n + 1));
    w->used = malloc(n + 1);
    if (!w->u || !w->v || !w->minv || !w->p || !w->way || !w->used) {
        work_free(w);
        return -1;
    }
    return 0;
}

/* Minimum assignment cost of one n x n problem a[(i-1)*n + (j-1)]; NaN when no finite assignment. */
static double solve_one(const double *a, Py_ssize_t n, work_t *w) {
    double *u = w->u, *v = w->v, *minv = w->minv;
    Py_ssize_t *p = w->p, *way = w->way;
    char *used = w->used;
    for (Py_ssize_t j = 0; j <= n; ++j) { u[j] = 0.0; v[j] = 0.0; p[j] = 0; way[j] = 0; }
    for (Py_ssize_t i = 1; i <= n; ++i) {
        p[0] = i;
        Py_ssize_t j0 = 0;
        for (Py_ssize_t j = 0; j <= n; ++j) { minv[j] = INFINITY; used[j] = 0; }
        do {
            used[j0] = 1;
            Py_ssize_t i0 = p[j0], j1 = 0;
            double delta = INFINITY;
            const double *row = a + (i0 - 1) * n;
            for (Py_ssize_t j = 1; j <= n; ++j) {
                if (used[j]) continue;
                double cur = row[j - 1] - u[i0] - v[j];
                if (cur < minv[j]) { minv[j] = cur; way[j] = j0; }
                if (minv[j] < delta) { delta = minv[j]; j1 = j; }
            }
            if (j1 == 0) return NAN; /* only non-finite costs left: no finite assignment */
            for (Py_ssize_t j = 0; j <= n; ++j) {
                if (used[j]) { u[p[j]] += delta; v[j] -= delta; }
                else minv[j] -= delta;
            }
            j0 = j1;
        } while (p[j0] != 0);
        do { Py_ssize_t j1 = way[j0]; p[j0] = p[j1]; j0 = j1; } while (j0);
    }
    double s = 0.0;
    for (Py_ssize_t j = 1; j <= n; ++j) {
        if (p[j] == 0) return NAN;
        s += a[(p[j] - 1) * n + (j - 1)];
    }
    return s;
}

/* solve_one for n <= SMALL_N with stack arrays and lists of the free and the used columns, so the
 * scans skip used columns without testing them. Every floating-point value goes through exactly the
 * operations of solve_one in the same order (each u[i], v[j], minv[j] sees the same sequence of
 * updates; the minimum search visits free columns in increasing j, so ties go to the same column),
 * hence the same assignment and the same sum, bit for bit (tests/analysis/test_koopman.py). */
#define SMALL_N 64
static double solve_small(const double *a, int n) {
    double u[SMALL_N + 1], v[SMALL_N + 1], minv[SMALL_N + 1];
    int p[SMALL_N + 1], way[SMALL_N + 1], fl[SMALL_N], ul[SMALL_N + 1];
    for (int j = 0; j <= n; ++j) { u[j] = 0.0; v[j] = 0.0; p[j] = 0; way[j] = 0; }
    for (int i = 1; i <= n; ++i) {
        p[0] = i;
        int j0 = 0, nf = n, nu = 1;
        ul[0] = 0;
        for (int j = 1; j <= n; ++j) { minv[j] = INFINITY; fl[j - 1] = j; }
        do {
            int i0 = p[j0], k1 = -1;
            double delta = INFINITY, ui0 = u[i0];
            const double *row = a + (ptrdiff_t)(i0 - 1) * n - 1; /* row[j], j = 1..n */
            for (int k = 0; k < nf; ++k) {
                int j = fl[k];
                double cur = row[j] - ui0 - v[j];
                double m = minv[j];
                if (cur < m) { m = cur; way[j] = j0; }
                minv[j] = m;
                if (m < delta) { delta = m; k1 = k; }
            }
            if (k1 < 0) return NAN; /* only non-finite costs left: no finite assignment */
            for (int k = 0; k < nu; ++k) { int j = ul[k]; u[p[j]] += delta; v[j] -= delta; }
            for (int k = 0; k < nf; ++k) minv[fl[k]] -= delta;
            int j1 = fl[k1];
            for (int k = k1 + 1; k < nf; ++k) fl[k - 1] = fl[k];
            --nf;
            ul[nu++] = j1;
            j0 = j1;
        } while (p[j0] != 0);
        do { int j1 = way[j0]; p[j0] = p[j1]; j0 = j1; } while (j0);
    }
    double s = 0.0;
    for (int j = 1; j <= n; ++j) {
        if (p[j] == 0) return NAN;
        s += a[(ptrdiff_t)(p[j] - 1) * n + (j - 1)];
    }
    return s;
}

static double solve(const double *a, Py_ssize_t n, work_t *w) {
    return n <= SMALL_N ? solve_small(a, (int)n) : solve_one(a, n, w);
}

static int solve_sums(const double *cost, Py_ssize_t batch, Py_ssize_t n, double *out) {
    work_t w;
    if (work_alloc(&w, n) < 0) return -1;
    for (Py_ssize_t b = 0; b < batch; ++b) out[b] = solve(cost + b * n * n, n, &w);
    work_free(&w);
    return 0;
}

/* The Wasserstein kernel for pairs of equal-size spectra, fused: for pair k, the n x n ground cost
 * between spectrum ia[k] of A and spectrum ib[k] of B (complex, interleaved re/im), computed with
 * exactly the floating-point operations of raydyn.analysis.koopman.distances._cost (differences,
 * imaginary difference wrapped modulo period[k] when finite, squares summed, square root unless
 * squared), then each row's minimum (numpy's argmin: first minimum, NaN first) into rowmin[k, :];
 * when two rows' minima share a column the pair is "hard": hard[k] = 1 and sums[k] = the optimal
 * assignment's cost (solve_one). Easy pairs' sums are left for the caller (rowmin.sum(axis=1)). */
static int pair_sums(const double *A, const double *B, Py_ssize_t n, const Py_ssize_t *ia,
                     const Py_ssize_t *ib, Py_ssize_t npairs, const double *period, int squared,
                     double *rowmin, double *sums, unsigned char *hard) {
    work_t w;
    if (n < 1) return -1;
    double *c = malloc(sizeof(double) * n * n);
    char *taken = malloc((size_t)n);
    if (!c || !taken || work_alloc(&w, n) < 0) { free(c); free(taken); return -1; }
    for (Py_ssize_t k = 0; k < npairs; ++k) {
        const double *x = A + ia[k] * 2 * n, *y = B + ib[k] * 2 * n;
        double per = period ? period[k] : INFINITY;
        if (isfinite(per)) {
            for (Py_ssize_t i = 0; i < n; ++i) {
                double xr = x[2 * i], xi = x[2 * i + 1];
                double *ci = c + i * n;
                for (Py_ssize_t j = 0; j < n; ++j) {
                    double dr = xr - y[2 * j], di = xi - y[2 * j + 1];
                    di = di - per * rint(di / per);
                    dr = dr * dr;
                    di = di * di;
                    dr = dr + di;
                    ci[j] = dr;
                }
            }
        } else {
            for (Py_ssize_t i = 0; i < n; ++i) {
                double xr = x[2 * i], xi = x[2 * i + 1];
                double *ci = c + i * n;
                for (Py_ssize_t j = 0; j < n; ++j) {
                    double dr = xr - y[2 * j], di = xi - y[2 * j + 1];
                    dr = dr * dr;
                    di = di * di;
                    dr = dr + di;
                    ci[j] = dr;
                }
            }
        }
        if (!squared)
            for (Py_ssize_t q = 0; q < n * n; ++q) c[q] = sqrt(c[q]);
        int easy = 1;
        memset(taken, 0, (size_t)n);
        double *rm = rowmin + k * n;
        for (Py_ssize_t i = 0; i < n; ++i) {
            const double *ci = c + i * n;
            double mp = ci[0];
            Py_ssize_t arg = 0;
            if (!isnan(mp)) {
                for (Py_ssize_t j = 1; j < n; ++j) {
                    if (!(ci[j] >= mp)) {
                        mp = ci[j];
                        arg = j;
                        if (isnan(mp)) break;
                    }
                }
            }
            rm[i] = mp;
            if (taken[arg]) easy = 0;
            taken[arg] = 1;
        }
        hard[k] = !easy;
        if (!easy) sums[k] = solve(c, n, &w);
    }
    free(c);
    free(taken);
    work_free(&w);
    return 0;
}

static PyObject *assignment_sums(PyObject *self, PyObject *args) {
    PyObject *cost_obj, *out_obj;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "OOn", &cost_obj, &out_obj, &n)) return NULL;
    Py_buffer cost, out;
    if (PyObject_GetBuffer(cost_obj, &cost, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return NULL;
    if (PyObject_GetBuffer(out_obj, &out, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&cost);
        return NULL;
    }
    PyObject *result = NULL;
    if (!cost.format || !out.format || cost.format[0] != 'd' || cost.format[1] != 0 || out.format[0] != 'd'
        || out.format[1] != 0 || cost.itemsize != 8 || out.itemsize != 8) {
        PyErr_SetString(PyExc_TypeError, "cost and out must be C-contiguous float64 buffers");
    } else if (n < 1) {
        PyErr_SetString(PyExc_ValueError, "n must be >= 1");
    } else {
        Py_ssize_t cells = cost.len / 8, batch = out.len / 8;
        if (cells != batch * n * n) {
            PyErr_SetString(PyExc_ValueError, "cost must hold len(out) * n * n values");
        } else {
            int rc;
            Py_BEGIN_ALLOW_THREADS
            rc = solve_sums((const double *)cost.buf, batch, n, (double *)out.buf);
            Py_END_ALLOW_THREADS
            if (rc < 0) PyErr_NoMemory();
            else { Py_INCREF(Py_None); result = Py_None; }
        }
    }
    PyBuffer_Release(&cost);
    PyBuffer_Release(&out);
    return result;
}

static int get_buffer(PyObject *obj, Py_buffer *view, char fmt, Py_ssize_t itemsize, int writable) {
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) < 0) return -1;
    const char *f = view->format ? view->format : "B";
    if (f[0] == '@' || f[0] == '=' || f[0] == '<') ++f;
    char want = fmt;
    int ok = view->itemsize == itemsize && f[1] == 0
             && (f[0] == want || (want == 'n' && (f[0] == 'l' || f[0] == 'q') && itemsize == sizeof(Py_ssize_t))
                 || (want == 'B' && f[0] == '?'));
    if (!ok) {
        PyErr_Format(PyExc_TypeError, "expected a C-contiguous buffer of %c items (size %zd), got format %s size %zd",
                     fmt, itemsize, view->format ? view->format : "B", view->itemsize);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static PyObject *wasserstein_pair_sums(PyObject *self, PyObject *args) {
    PyObject *a_obj, *b_obj, *ia_obj, *ib_obj, *per_obj, *rm_obj, *s_obj, *h_obj;
    Py_ssize_t n;
    int squared;
    if (!PyArg_ParseTuple(args, "OOnOOOpOOO", &a_obj, &b_obj, &n, &ia_obj, &ib_obj, &per_obj, &squared, &rm_obj,
                          &s_obj, &h_obj))
        return NULL;
    if (n < 1) { PyErr_SetString(PyExc_ValueError, "n must be >= 1"); return NULL; }
    Py_buffer bufs[8];
    int got = 0, has_per = per_obj != Py_None;
    PyObject *result = NULL;
    PyObject *objs[8] = {a_obj, b_obj, ia_obj, ib_obj, rm_obj, s_obj, h_obj, per_obj};
    const char fmts[8] = {'d', 'd', 'n', 'n', 'd', 'd', 'B', 'd'};
    const Py_ssize_t sizes[8] = {8, 8, sizeof(Py_ssize_t), sizeof(Py_ssize_t), 8, 8, 1, 8};
    const int writable[8] = {0, 0, 0, 0, 1, 1, 1, 0};
    for (; got < 7 + has_per; ++got) {
        if (get_buffer(objs[got], &bufs[got], fmts[got], sizes[got], writable[got]) < 0) goto done;
    }
    Py_ssize_t na = bufs[0].len / (16 * n), nb = bufs[1].len / (16 * n), npairs = bufs[2].len / (Py_ssize_t)sizeof(Py_ssize_t);
    if (bufs[0].len != na * 16 * n || bufs[1].len != nb * 16 * n) {
        PyErr_SetString(PyExc_ValueError, "a and b must hold whole spectra of n complex values");
        goto done;
    }
    if (bufs[3].len != bufs[2].len || bufs[4].len != npairs * n * 8 || bufs[5].len != npairs * 8
        || bufs[6].len != npairs || (has_per && bufs[7].len != npairs * 8)) {
        PyErr_SetString(PyExc_ValueError, "ia, ib, period, sums, hard must hold P values and rowmin P * n");
        goto done;
    }
    const Py_ssize_t *ia = bufs[2].buf, *ib = bufs[3].buf;
    for (Py_ssize_t k = 0; k < npairs; ++k) {
        if (ia[k] < 0 || ia[k] >= na || ib[k] < 0 || ib[k] >= nb) {
            PyErr_SetString(PyExc_IndexError, "spectrum index out of range");
            goto done;
        }
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = pair_sums(bufs[0].buf, bufs[1].buf, n, ia, ib, npairs, has_per ? bufs[7].buf : NULL, squared,
                   bufs[4].buf, bufs[5].buf, bufs[6].buf);
    Py_END_ALLOW_THREADS
    if (rc < 0) PyErr_NoMemory();
    else { Py_INCREF(Py_None); result = Py_None; }
done:
    for (int q = 0; q < got; ++q) PyBuffer_Release(&bufs[q]);
    return result;
}

static PyMethodDef methods[] = {
    {"assignment_sums", assignment_sums, METH_VARARGS,
     "assignment_sums(cost, out, n): out[b] = minimum over permutations s of sum_i cost[b, i, s(i)] "
     "for a C-contiguous float64 (B, n, n) cost and a float64 (B,) out (NaN where no finite assignment)."},
    {"wasserstein_pair_sums", wasserstein_pair_sums, METH_VARARGS,
     "wasserstein_pair_sums(a, b, n, ia, ib, period, squared, rowmin, sums, hard): for pairs k of spectra "
     "(a[ia[k]], b[ib[k]]) of n complex values each (a: (Na, n), b: (Nb, n) complex128), the |x - y| (or "
     "squared) ground cost, imaginary differences modulo period[k] where finite (period: None or (P,) "
     "float64); rowmin (P, n) float64 <- each row's minimum; hard (P,) uint8 <- 1 where two rows' minima "
     "share a column, and then sums[k] <- the minimum assignment cost (NaN where none is finite)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_assignment", NULL, -1, methods};

PyMODINIT_FUNC PyInit__assignment(void) { return PyModule_Create(&module); }
