/* Corner gathers and scatters of the torch backend on the CPU, compiled at run time by
 * deformconv.backends.native (plain C, no PyTorch headers: it builds in about a second).
 *
 * A bag is `corners` (row, weight) pairs whose rows lie at fixed `deltas` from the bag's
 * first row in a table of `depth`-wide rows (the corners of one sample in the padded table
 * of deformconv.backends.plan).  Three loops over bags:
 *
 *   sums:    out[b / bag] += sum_k weights[b, k] * table[first[b] + deltas[k]]
 *   dots:    dots[b, k]    = table[first[b] + deltas[k]] . grad[b / share]
 *   scatter: table_grad[first[b] + deltas[k]] += weights[b, k] * grad[b / share]
 *            for bags with first[b] < skip_from
 *
 * Threads split `sums` by output rows and `dots` + `scatter` by table rows: a thread adds
 * into its own rows only, taking the bags in their order, so every sum is formed in the
 * same order whatever the number of threads, and nothing needs atomics.  Bags whose rows
 * fall outside the table are skipped (the caller never makes any).
 */
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define LANES 8

typedef void (*part_fn)(const void *job, int64_t part, int64_t parts);

/* fn(job, p, n) for every part p of n: on up to `parts` threads of the OpenMP runtime that
 * PyTorch's own threads come from (the process has loaded it already, and its threads are
 * awake right after PyTorch's last parallel operation); without OpenMP, on this thread. */
static void in_parallel(part_fn fn, const void *job, int64_t parts) {
#ifdef _OPENMP
    if (parts > 1) {
#pragma omp parallel num_threads((int)parts)
        fn(job, omp_get_thread_num(), omp_get_num_threads());
        return;
    }
#endif
    (void)parts;
    fn(job, 0, 1);
}

typedef struct {
    const void *table, *weights, *grad, *first;
    void *out, *dots, *table_grad;
    const int64_t *deltas;
    int64_t step, bags, corners, depth, rows, bag, share, skip_from;
} job_t;

#define DEFINE_KERNELS(T, I, SUFFIX)                                                        \
    static inline T dot_##SUFFIX(const T *restrict a, const T *restrict b, int64_t n) {     \
        T lanes[LANES] = {0};                                                               \
        int64_t c = 0;                                                                      \
        for (; c + LANES <= n; c += LANES)                                                  \
            for (int l = 0; l < LANES; ++l) lanes[l] += a[c + l] * b[c + l];                \
        T tail = 0;                                                                         \
        for (; c < n; ++c) tail += a[c] * b[c];                                             \
        for (int width = LANES / 2; width > 0; width /= 2)                                  \
            for (int l = 0; l < width; ++l) lanes[l] += lanes[l + width];                   \
        return lanes[0] + tail;                                                             \
    }                                                                                       \
                                                                                            \
    static int inside_##SUFFIX(const job_t *job, int64_t first) {                                 \
        return first >= 0 && first + job->deltas[job->corners - 1] < job->rows;             \
    }                                                                                       \
                                                                                            \
    static void sums_part_##SUFFIX(const void *arg, int64_t part, int64_t parts) {          \
        const job_t *job = (const job_t *)arg;                                              \
        const T *table = (const T *)job->table, *weights = (const T *)job->weights;         \
        const I *first = (const I *)job->first;                                             \
        const int64_t depth = job->depth, corners = job->corners, outs = job->bags / job->bag; \
        for (int64_t o = outs * part / parts; o < outs * (part + 1) / parts; ++o) {         \
            T *restrict out = (T *)job->out + o * depth;                                    \
            if (job->bag == 1 && corners == 4) { /* 2-D: one pass over the output row */    \
                const int64_t lowest = first[o * job->step];                                \
                const T *w = weights + o * 4;                                               \
                if (!inside_##SUFFIX(job, lowest)) {                                        \
                    for (int64_t c = 0; c < depth; ++c) out[c] = 0;                         \
                    continue;                                                               \
                }                                                                           \
                const T *restrict r0 = table + (lowest + job->deltas[0]) * depth;           \
                const T *restrict r1 = table + (lowest + job->deltas[1]) * depth;           \
                const T *restrict r2 = table + (lowest + job->deltas[2]) * depth;           \
                const T *restrict r3 = table + (lowest + job->deltas[3]) * depth;           \
                for (int64_t c = 0; c < depth; ++c)                                         \
                    out[c] = w[0] * r0[c] + w[1] * r1[c] + w[2] * r2[c] + w[3] * r3[c];     \
                continue;                                                                   \
            }                                                                               \
            for (int64_t c = 0; c < depth; ++c) out[c] = 0;                                 \
            for (int64_t b = o * job->bag; b < (o + 1) * job->bag; ++b) {                   \
                const int64_t lowest = first[b * job->step];                                \
                if (!inside_##SUFFIX(job, lowest)) continue;                                \
                for (int64_t k = 0; k < corners; ++k) {                                     \
                    const T w = weights[b * corners + k];                                   \
                    const T *restrict row = table + (lowest + job->deltas[k]) * depth;      \
                    for (int64_t c = 0; c < depth; ++c) out[c] += w * row[c];               \
                }                                                                           \
            }                                                                               \
        }                                                                                   \
    }                                                                                       \
                                                                                            \
    static void scatter_part_##SUFFIX(const void *arg, int64_t part, int64_t parts) {       \
        const job_t *job = (const job_t *)arg;                                              \
        const T *table = (const T *)job->table, *weights = (const T *)job->weights;         \
        const T *grad = (const T *)job->grad;                                               \
        const I *first = (const I *)job->first;                                             \
        T *dots = (T *)job->dots, *table_grad = (T *)job->table_grad;                       \
        const int64_t depth = job->depth, corners = job->corners;                           \
        const int64_t low = job->rows * part / parts, high = job->rows * (part + 1) / parts; \
        for (int64_t b = 0; b < job->bags; ++b) {                                           \
            const int64_t row = first[b * job->step];                                       \
            if (!inside_##SUFFIX(job, row)) {                                          \
                if (dots && part == 0)                                                      \
                    for (int64_t k = 0; k < corners; ++k) dots[b * corners + k] = 0;        \
                continue;                                                                   \
            }                                                                               \
            if (row + job->deltas[corners - 1] < low || row >= high) continue;              \
            const T *restrict g = grad + (b / job->share) * depth;                          \
            if (dots && row >= low)                                                         \
                for (int64_t k = 0; k < corners; ++k)                                       \
                    dots[b * corners + k] =                                                 \
                        dot_##SUFFIX(table + (row + job->deltas[k]) * depth, g, depth);     \
            if (!table_grad || row >= job->skip_from) continue;                             \
            for (int64_t k = 0; k < corners; ++k) {                                         \
                const int64_t target = row + job->deltas[k];                                \
                if (target < low || target >= high) continue;                               \
                const T w = weights[b * corners + k];                                       \
                T *restrict out = table_grad + target * depth;                              \
                for (int64_t c = 0; c < depth; ++c) out[c] += w * g[c];                     \
            }                                                                               \
        }                                                                                   \
    }                                                                                       \
                                                                                            \
    void corner_sums_##SUFFIX(const T *table, const I *first, int64_t step, const T *weights, \
                              const int64_t *deltas, int64_t bags, int64_t corners,         \
                              int64_t depth, int64_t rows, int64_t bag, T *out,             \
                              int64_t parts) {                                              \
        job_t job = {table, weights, 0, first, out, 0, 0, deltas,                           \
                     step, bags, corners, depth, rows, bag, 1, 0};                                \
        in_parallel(sums_part_##SUFFIX, &job, parts);                                       \
    }                                                                                       \
                                                                                            \
    void corner_grads_##SUFFIX(const T *table, const I *first, int64_t step, const T *weights, \
                               const int64_t *deltas, int64_t bags, int64_t corners,        \
                               int64_t depth, int64_t rows, const T *grad, int64_t share,   \
                               int64_t skip_from, T *dots, T *table_grad, int64_t parts) {  \
        job_t job = {table, weights, grad, first, 0, dots, table_grad, deltas,              \
                     step, bags, corners, depth, rows, 1, share, skip_from};                      \
        in_parallel(scatter_part_##SUFFIX, &job, parts);                                    \
    }

DEFINE_KERNELS(float, int32_t, f32_i32)
DEFINE_KERNELS(float, int64_t, f32_i64)
DEFINE_KERNELS(double, int32_t, f64_i32)
DEFINE_KERNELS(double, int64_t, f64_i64)
