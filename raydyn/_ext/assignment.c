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
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdlib.h>

static int solve_sums(const double *cost, Py_ssize_t batch, Py_ssize_t n, double *out) {
    /* 1-based working arrays of size n + 1, shared by every problem of the batch */
    double *u = malloc(sizeof(double) * (n + 1));
    double *v = malloc(sizeof(double) * (n + 1));
    double *minv = malloc(sizeof(double) * (n + 1));
    Py_ssize_t *p = malloc(sizeof(Py_ssize_t) * (n + 1));
    Py_ssize_t *way = malloc(sizeof(Py_ssize_t) * (n + 1));
    char *used = malloc(n + 1);
    if (!u || !v || !minv || !p || !way || !used) {
        free(u); free(v); free(minv); free(p); free(way); free(used);
        return -1;
    }
    for (Py_ssize_t b = 0; b < batch; ++b) {
        const double *a = cost + b * n * n; /* a[(i-1)*n + (j-1)] */
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
                if (j1 == 0) { /* only non-finite costs left: no finite assignment */
                    j0 = -1;
                    break;
                }
                for (Py_ssize_t j = 0; j <= n; ++j) {
                    if (used[j]) { u[p[j]] += delta; v[j] -= delta; }
                    else minv[j] -= delta;
                }
                j0 = j1;
            } while (p[j0] != 0);
            if (j0 < 0) break;
            do { Py_ssize_t j1 = way[j0]; p[j0] = p[j1]; j0 = j1; } while (j0);
        }
        double s = 0.0;
        int ok = 1;
        for (Py_ssize_t j = 1; j <= n; ++j) {
            if (p[j] == 0) { ok = 0; break; }
            s += a[(p[j] - 1) * n + (j - 1)];
        }
        out[b] = ok ? s : NAN;
    }
    free(u); free(v); free(minv); free(p); free(way); free(used);
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

static PyMethodDef methods[] = {
    {"assignment_sums", assignment_sums, METH_VARARGS,
     "assignment_sums(cost, out, n): out[b] = minimum over permutations s of sum_i cost[b, i, s(i)] "
     "for a C-contiguous float64 (B, n, n) cost and a float64 (B,) out (NaN where no finite assignment)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_assignment", NULL, -1, methods};

PyMODINIT_FUNC PyInit__assignment(void) { return PyModule_Create(&module); }
