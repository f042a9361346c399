/* Exact 1-D k-means, compiled: kmeans.py's fp16 DP (coremltools' kmeans1d) and lut.py's binned DP.
 *
 * Optional: setup.py builds this module where a C compiler is present, and mlqpipe.quant.kmeans falls back to
 * its numpy code without it. Both paths must give bit-identical LUTs and indices, so this file performs every
 * float64 operation of the numpy code in the same order: prefix sums by a sequential loop whose first sum is
 * the first term itself (np.cumsum's, which keeps a leading -0.0), the cluster cost of cost.py operation by
 * operation, each layer's divide and conquer over rows with the same (row range, split range) segments and the
 * leftmost minimum, the backtrack, and kmeans1d's running-mean centroids. It must be compiled without
 * floating-point contraction (setup.py passes -ffp-contract=off: no FMA) and without fast-math.
 *
 * No numpy C API: arguments are buffers (numpy arrays are), checked against the sizes passed. Each call
 * releases the GIL while it computes, so groups can be solved on several threads.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define NKEYS 65536
#define STACK 64 /* pending segments of a depth-first divide and conquer: depth <= log2(65536) + 1 */

/* cost.py's cluster_cost, the same operations in the same order */
static inline double cluster_cost(double cwi, double csi, double cqi, double cwj, double csj, double cqj)
{
    double w = cwi - cwj;
    double s = csi - csj;
    double mu = s / w;
    double r = cqi - cqj;
    double t = mu * mu;
    t *= w;
    r += t;
    mu *= 2;
    mu *= s;
    r -= mu;
    return r;
}

/* index of the leftmost minimum of val[0..width) (strict <, as the numpy path's complex minimum) */
static inline Py_ssize_t leftmost_min(const double *val, Py_ssize_t width)
{
    double best = val[0];
    Py_ssize_t at = 0;
    for (Py_ssize_t q = 1; q < width; q++) {
        if (val[q] < best) {
            best = val[q];
            at = q;
        }
    }
    return at;
}

typedef struct {
    int64_t *counts; /* NKEYS */
    uint8_t *label_of_key; /* NKEYS */
    double *pts, *cw, *cs, *cq, *prev, *cur, *val; /* per distinct value (+1 for the prefix sums) */
    int64_t *keys;
    uint16_t *choice; /* (k - 1) x n split choices of the current group */
    size_t choice_cap;
} Scratch;

static void scratch_free(Scratch *s)
{
    free(s->counts);
    free(s->label_of_key);
    free(s->pts);
    free(s->cw);
    free(s->cs);
    free(s->cq);
    free(s->prev);
    free(s->cur);
    free(s->val);
    free(s->keys);
    free(s->choice);
}

static int scratch_alloc(Scratch *s, Py_ssize_t points)
{
    memset(s, 0, sizeof(*s));
    Py_ssize_t n = points + 1;
    s->counts = malloc(NKEYS * sizeof(int64_t));
    s->label_of_key = malloc(NKEYS);
    s->pts = malloc(n * sizeof(double));
    s->cw = malloc(n * sizeof(double));
    s->cs = malloc(n * sizeof(double));
    s->cq = malloc(n * sizeof(double));
    s->prev = malloc(n * sizeof(double));
    s->cur = malloc(n * sizeof(double));
    s->val = malloc(n * sizeof(double));
    s->keys = malloc(n * sizeof(int64_t));
    if (!(s->counts && s->label_of_key && s->pts && s->cw && s->cs && s->cq && s->prev && s->cur && s->val && s->keys)) {
        scratch_free(s);
        return -1;
    }
    return 0;
}

/* kmeans1d of one fp16 group given as raw uint16 patterns: centroids (sorted, then zeros) into cents[0..kmax),
 * the label of each value into codes[0..m). -1 when out of memory. */
static int cluster_group(Scratch *s, const uint16_t *raw, Py_ssize_t m, const int64_t *key_of_raw,
                          const double *value_of_key, Py_ssize_t kmax, double *cents, uint8_t *codes)
{
    int64_t *counts = s->counts;
    double *pts = s->pts, *cw = s->cw, *cs = s->cs, *cq = s->cq, *val = s->val;
    double *prev = s->prev, *cur = s->cur;
    memset(counts, 0, NKEYS * sizeof(int64_t));
    for (Py_ssize_t t = 0; t < m; t++)
        counts[key_of_raw[raw[t]]]++;
    for (Py_ssize_t c = 0; c < kmax; c++)
        cents[c] = 0.0;
    Py_ssize_t n = 0;
    cw[0] = cs[0] = cq[0] = 0.0;
    for (Py_ssize_t key = 0; key < NKEYS; key++) {
        if (!counts[key])
            continue;
        double x = value_of_key[key], w = (double)counts[key], wx = w * x;
        pts[n] = x;
        s->keys[n] = key;
        if (n == 0) {
            cw[1] = w;
            cs[1] = wx;
            cq[1] = wx * x;
        } else {
            cw[n + 1] = cw[n] + w;
            cs[n + 1] = cs[n] + wx;
            cq[n + 1] = cq[n] + wx * x;
        }
        n++;
    }
    if (n == 0) {
        memset(codes, 0, m);
        return 0;
    }
    Py_ssize_t k = n < kmax ? n : kmax;
    size_t need = (size_t)(k > 1 ? k - 1 : 1) * n; /* sized by the distinct values: 6-bit k-means of 12,000 values 1.5 MB */
    if (need > s->choice_cap) {
        uint16_t *grown = realloc(s->choice, need * sizeof(uint16_t));
        if (!grown)
            return -1;
        s->choice = grown;
        s->choice_cap = need;
    }
    for (Py_ssize_t i = 0; i < n; i++) /* layer 0: the cost of 0..i (the numpy path subtracts 0.0 literals) */
        prev[i] = cluster_cost(cw[i + 1], cs[i + 1], cq[i + 1], 0.0, 0.0, 0.0);
    Py_ssize_t stack[STACK][4];
    for (Py_ssize_t layer = 1; layer < k; layer++) {
        uint16_t *choice = s->choice + (layer - 1) * n;
        stack[0][0] = layer == k - 1 ? n - 1 : layer; /* the last layer: the last point only */
        stack[0][1] = n - 1;
        stack[0][2] = layer;
        stack[0][3] = n - 1;
        int top = 1;
        while (top > 0) {
            top--;
            Py_ssize_t rlo = stack[top][0], rhi = stack[top][1], olo = stack[top][2], ohi = stack[top][3];
            Py_ssize_t i = (rlo + rhi) >> 1;
            Py_ssize_t width = (ohi < i ? ohi : i) + 1 - olo;
            double cwi = cw[i + 1], csi = cs[i + 1], cqi = cq[i + 1];
            const double *cwj = cw + olo, *csj = cs + olo, *cqj = cq + olo, *pj = prev + olo - 1;
            for (Py_ssize_t q = 0; q < width; q++) /* the candidates' values first, then their leftmost minimum */
                val[q] = cluster_cost(cwi, csi, cqi, cwj[q], csj[q], cqj[q]) + pj[q];
            Py_ssize_t at = leftmost_min(val, width);
            Py_ssize_t bestj = olo + at;
            cur[i] = val[at];
            choice[i] = (uint16_t)bestj;
            if (i + 1 <= rhi) {
                stack[top][0] = i + 1;
                stack[top][1] = rhi;
                stack[top][2] = bestj;
                stack[top][3] = ohi;
                top++;
            }
            if (rlo <= i - 1) {
                stack[top][0] = rlo;
                stack[top][1] = i - 1;
                stack[top][2] = olo;
                stack[top][3] = bestj;
                top++;
            }
        }
        double *swap = prev;
        prev = cur;
        cur = swap;
    }
    /* the cluster starts, from the last point back; then kmeans1d's running means c += (x - c) * w_i / W */
    Py_ssize_t starts[257];
    starts[0] = 0;
    starts[k] = n;
    Py_ssize_t end = n - 1;
    for (Py_ssize_t layer = k - 1; layer > 0; layer--) {
        starts[layer] = s->choice[(layer - 1) * n + end];
        end = starts[layer] - 1;
    }
    uint8_t *label_of_key = s->label_of_key;
    for (Py_ssize_t c = 0; c < k; c++) {
        Py_ssize_t first = starts[c];
        double mean = 0.0;
        for (Py_ssize_t i = first; i < starts[c + 1]; i++) {
            mean += (pts[i] - mean) * (cw[i + 1] - cw[i]) / (cw[i + 1] - cw[first]);
            label_of_key[s->keys[i]] = (uint8_t)c;
        }
        cents[c] = mean;
    }
    for (Py_ssize_t t = 0; t < m; t++)
        codes[t] = label_of_key[key_of_raw[raw[t]]];
    return 0;
}

static int check_size(const Py_buffer *b, Py_ssize_t items, Py_ssize_t itemsize, const char *name)
{
    if (b->len != items * itemsize) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes, expected %zd", name, b->len, items * itemsize);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(cluster_fp16_doc,
             "cluster_fp16(raw, groups, m, key_of_raw, value_of_key, kmax, cents, codes)\n\n"
             "kmeans1d of each of `groups` rows of m raw fp16 patterns (uint16): float64 centroids into cents "
             "(groups x kmax), uint8 labels into codes (groups x m). key_of_raw (int64) and value_of_key (float64) "
             "are kmeans.py's 65,536-entry key tables.");

static PyObject *cluster_fp16(PyObject *self, PyObject *args)
{
    Py_buffer raw, key_of_raw, value_of_key, cents, codes;
    Py_ssize_t groups, m, kmax;
    if (!PyArg_ParseTuple(args, "y*nny*y*nw*w*", &raw, &groups, &m, &key_of_raw, &value_of_key, &kmax, &cents, &codes))
        return NULL;
    PyObject *result = NULL;
    if (groups < 0 || m < 0 || kmax < 1 || kmax > 256) {
        PyErr_SetString(PyExc_ValueError, "groups, m >= 0 and 1 <= kmax <= 256");
        goto done;
    }
    if (check_size(&raw, groups * m, 2, "raw") || check_size(&key_of_raw, NKEYS, 8, "key_of_raw")
        || check_size(&value_of_key, NKEYS, 8, "value_of_key") || check_size(&cents, groups * kmax, 8, "cents")
        || check_size(&codes, groups * m, 1, "codes"))
        goto done;
    const int64_t *keys = key_of_raw.buf;
    for (Py_ssize_t key = 0; key < NKEYS; key++) {
        if (keys[key] < 0 || keys[key] >= NKEYS) {
            PyErr_SetString(PyExc_ValueError, "key_of_raw: keys must lie in 0..65535");
            goto done;
        }
    }
    Scratch s;
    Py_ssize_t points = m < NKEYS ? m : NKEYS;
    if (scratch_alloc(&s, points)) {
        PyErr_NoMemory();
        goto done;
    }
    int status = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t g = 0; g < groups && !status; g++)
        status = cluster_group(&s, (const uint16_t *)raw.buf + g * m, m, keys, value_of_key.buf, kmax,
                               (double *)cents.buf + g * kmax, (uint8_t *)codes.buf + g * m);
    Py_END_ALLOW_THREADS
    scratch_free(&s);
    if (status)
        PyErr_NoMemory();
    else
        result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&raw);
    PyBuffer_Release(&key_of_raw);
    PyBuffer_Release(&value_of_key);
    PyBuffer_Release(&cents);
    PyBuffer_Release(&codes);
    return result;
}

/* lut._optimal_1d: the exact k-means centroids of m sorted weighted points, its operations in its order:
 * cost(a, b) = d2 - d1 * d1 / d0 of [a, b), prev[a] + cost, the earliest split on ties, each layer's divide and
 * conquer over ends 1..m bounded by the solved ends around each segment, the last layer at the end m only */
static int optimal(const double *centres, const double *counts, const double *sums, Py_ssize_t m, Py_ssize_t k,
                   double *out)
{
    size_t n = (size_t)m + 2;
    double *cn = malloc(n * sizeof(double)), *cs = malloc(n * sizeof(double)), *cq = malloc(n * sizeof(double));
    double *prev = malloc(n * sizeof(double)), *cur = malloc(n * sizeof(double)), *val = malloc(n * sizeof(double));
    Py_ssize_t *splits = calloc((size_t)k * n, sizeof(Py_ssize_t)); /* unsolved ends read as 0 */
    int ok = cn && cs && cq && prev && cur && val && splits;
    if (ok) {
        cn[0] = cs[0] = cq[0] = 0.0;
        for (Py_ssize_t i = 0; i < m; i++) {
            double sq = sums[i] * centres[i];
            if (i == 0) {
                cn[1] = counts[0];
                cs[1] = sums[0];
                cq[1] = sq;
            } else {
                cn[i + 1] = cn[i] + counts[i];
                cs[i + 1] = cs[i] + sums[i];
                cq[i + 1] = cq[i] + sq;
            }
        }
        prev[0] = INFINITY; /* one cluster over no points: infeasible */
        for (Py_ssize_t b = 1; b <= m; b++)
            prev[b] = cq[b] - cs[b] * cs[b] / cn[b];
        Py_ssize_t stack[STACK][2];
        for (Py_ssize_t layer = 1; layer < k; layer++) {
            Py_ssize_t *opt = splits + layer * n;
            opt[0] = 0;
            opt[m + 1] = m;
            stack[0][0] = layer == k - 1 ? m : 1; /* the last layer: the end m only (its bounds: 0 and m) */
            stack[0][1] = m;
            int top = 1;
            while (top > 0) {
                top--;
                Py_ssize_t lo = stack[top][0], hi = stack[top][1], b = (lo + hi) >> 1;
                Py_ssize_t first = opt[lo - 1], last = opt[hi + 1] < b - 1 ? opt[hi + 1] : b - 1;
                Py_ssize_t width = last + 1 - first;
                double cnb = cn[b], csb = cs[b], cqb = cq[b];
                for (Py_ssize_t q = 0; q < width; q++) {
                    double d0 = cnb - cn[first + q], d1 = csb - cs[first + q], d2 = cqb - cq[first + q];
                    val[q] = prev[first + q] + (d2 - d1 * d1 / d0);
                }
                Py_ssize_t at = leftmost_min(val, width);
                cur[b] = val[at];
                opt[b] = first + at;
                if (b + 1 <= hi) {
                    stack[top][0] = b + 1;
                    stack[top][1] = hi;
                    top++;
                }
                if (lo <= b - 1) {
                    stack[top][0] = lo;
                    stack[top][1] = b - 1;
                    top++;
                }
            }
            for (Py_ssize_t b = 0; b <= layer; b++) /* fewer points than clusters */
                cur[b] = INFINITY;
            double *swap = prev;
            prev = cur;
            cur = swap;
        }
        Py_ssize_t hi = m;
        Py_ssize_t *edges = malloc((size_t)(k + 1) * sizeof(Py_ssize_t));
        ok = edges != NULL;
        if (ok) {
            edges[0] = 0;
            edges[k] = m;
            for (Py_ssize_t layer = k - 1; layer > 0; layer--)
                hi = edges[layer] = splits[layer * n + hi];
            for (Py_ssize_t c = 0; c < k; c++)
                out[c] = (cs[edges[c + 1]] - cs[edges[c]]) / (cn[edges[c + 1]] - cn[edges[c]]);
            free(edges);
        }
    }
    free(cn);
    free(cs);
    free(cq);
    free(prev);
    free(cur);
    free(val);
    free(splits);
    return ok ? 0 : -1;
}

PyDoc_STRVAR(optimal_1d_doc,
             "optimal_1d(centres, counts, sums, m, k, out)\n\n"
             "lut._optimal_1d: the exact k-means centroids of m sorted weighted points (float64 buffers; "
             "sums = centres * counts) into out (k float64, k <= m).");

static PyObject *optimal_1d(PyObject *self, PyObject *args)
{
    Py_buffer centres, counts, sums, out;
    Py_ssize_t m, k;
    if (!PyArg_ParseTuple(args, "y*y*y*nnw*", &centres, &counts, &sums, &m, &k, &out))
        return NULL;
    PyObject *result = NULL;
    int status = 0;
    if (m < 1 || k < 1 || k > m) {
        PyErr_SetString(PyExc_ValueError, "1 <= k <= m");
        goto done;
    }
    if (check_size(&centres, m, 8, "centres") || check_size(&counts, m, 8, "counts") || check_size(&sums, m, 8, "sums")
        || check_size(&out, k, 8, "out"))
        goto done;
    Py_BEGIN_ALLOW_THREADS
    status = optimal(centres.buf, counts.buf, sums.buf, m, k, out.buf);
    Py_END_ALLOW_THREADS
    if (status) {
        PyErr_NoMemory();
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&centres);
    PyBuffer_Release(&counts);
    PyBuffer_Release(&sums);
    PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"cluster_fp16", cluster_fp16, METH_VARARGS, cluster_fp16_doc},
    {"optimal_1d", optimal_1d, METH_VARARGS, optimal_1d_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_kmeans1d", "Exact 1-D k-means, compiled (see kmeans.py).", -1, methods,
};

PyMODINIT_FUNC PyInit__kmeans1d(void) { return PyModule_Create(&module); }
