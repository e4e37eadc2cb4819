/* Corner gathers and scatters of the torch backend on the CPU, compiled at run time by
 * deformconv.backends.native (plain C, no PyTorch headers: it builds in about a second).
 *
 * A bag is `corners` (row, weight) pairs whose rows lie at fixed `deltas` from the bag's
 * first row in a table of `depth`-wide rows (the corners of one sample in the padded table
 * of deformconv.backends.plan).  Three loops over bags:
 *
 *   sums:    out[o] = sum over the bags b of o, o * bag <= b < (o + 1) * bag,
 *                     of sum_k weights[b, k] * table[first[b] + deltas[k]]
 *   dots:    dots[b, k] = table[first[b] + deltas[k]] . grad[b / share]
 *   scatter: table_grad[first[b] + deltas[k]] += weights[b, k] * grad[b / share]
 *            for bags with first[b] < skip_from
 *
 * Threads split `sums` by output rows and `dots` + `scatter` by table rows: a thread adds
 * into its own rows only, taking the bags in their order, so every sum is formed in the
 * same order whatever the number of threads, and nothing needs atomics.  Bags whose rows
 * fall outside the table are skipped (the caller never makes any): they sum to 0 and give
 * 0 dot products.
 *
 * A bag's first row and weights come from a plan: `first` and `weights` given, or, for the
 * samples of a convolution, computed here from their offsets, masks and grid (the rules of
 * deformconv.backends.plan.plan_from_grid, operation for operation), by `sample_plan`, or
 * inside the sums themselves (`sample_sums`).  With the plan's fractional positions, the
 * backward pass also turns each sample's dot products into its mask gradient and position
 * gradients (deformconv.backends.plan.position_grads).
 *
 * The loops are written once below for a value type T and an index type I and instantiated
 * for float / double and int32 / int64 by including this file into itself.
 */
#ifndef CORNERS_TEMPLATE
#define CORNERS_TEMPLATE

#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define VECTOR_BYTES 32
/* Functions inlined into their callers, which call them with a constant number of axes in
 * the common cases (2-D and 3-D) so that their loops unroll. */
#if defined(__GNUC__) || defined(__clang__)
#define INLINE static inline __attribute__((always_inline))
#else
#define INLINE static inline
#endif

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

#define MAX_DIMS 3
#define MAX_CORNERS (1 << MAX_DIMS)

/* The samples' grid (deformconv.backends.plan.Grid): geometry[] holds the number of axes d,
 * the dead block's first row, whether the rule is strict, the address of the grid's first
 * rows, then per axis the input sizes, the row strides and the addresses of the bases;
 * reaches[] the clamping bound per axis. */
typedef struct {
    const void *offsets, *masks, *first;
    const void *bases[MAX_DIMS];
    int64_t sizes[MAX_DIMS], strides[MAX_DIMS];
    double reaches[MAX_DIMS];
    int64_t dims, dead, strict;
} grid_t;

static int read_grid(grid_t *grid, const void *offsets, const void *masks,
                     const int64_t *geometry, const double *reaches) {
    const int64_t dims = geometry[0];
    if (dims < 1 || dims > MAX_DIMS) return 0;
    grid->offsets = offsets;
    grid->masks = masks;
    grid->dims = dims;
    grid->dead = geometry[1];
    grid->strict = geometry[2];
    grid->first = (const void *)(uintptr_t)geometry[3];
    for (int64_t a = 0; a < dims; ++a) {
        grid->sizes[a] = geometry[4 + a];
        grid->strides[a] = geometry[4 + dims + a];
        grid->bases[a] = (const void *)(uintptr_t)geometry[4 + 2 * dims + a];
        grid->reaches[a] = reaches[a];
    }
    return 1;
}

typedef struct {
    const void *table, *first, *weights, *grad, *fractions, *masks;
    void *out, *dots, *table_grad, *mask_grad, *position_grad;
    void *plan_first, *plan_weights, *plan_fractions; /* where a plan is written */
    const int64_t *deltas;
    const grid_t *grid;
    int64_t step, bags, corners, depth, rows, bag, share, skip_from;
    int64_t lowest, highest; /* the rows the live bags reach, which the threads split */
} job_t;

/* Whether all of a bag's rows lie in the table. */
static inline int inside(const job_t *job, int64_t first) {
    return first >= 0 && first + job->deltas[job->corners - 1] < job->rows;
}

#define CAT(a, b) a##_##b
#define NAME(name, suffix) CAT(name, suffix)

#define T float
#define I int32_t
#define SUFFIX f32_i32
#include __FILE__
#define T float
#define I int64_t
#define SUFFIX f32_i64
#include __FILE__
#define T double
#define I int32_t
#define SUFFIX f64_i32
#include __FILE__
#define T double
#define I int64_t
#define SUFFIX f64_i64
#include __FILE__

#else /* the loops, for T, I and SUFFIX */

/* Sample m's first row, unmasked corner weights `unmasked`, masked ones `w` (both 2**d)
 * and fractional positions `f` (d), as plan_from_grid computes them. */
INLINE int64_t NAME(plan_one, SUFFIX)(const grid_t *grid, int64_t dims, int64_t m, T *unmasked,
                                     T *w, T *f) {
    const T *offsets = (const T *)grid->offsets + m * dims;
    int64_t first = ((const I *)grid->first)[m];
    int near = 1;
    for (int64_t a = 0; a < dims; ++a) {
        const T reach = (T)grid->reaches[a];
        T shift = offsets[a];
        if (shift != shift) shift = reach; /* NaN */
        shift = shift < -reach ? -reach : (shift > reach ? reach : shift);
        const T whole = sizeof(T) == sizeof(float) ? (T)floorf((float)shift) : (T)floor(shift);
        const T frac = shift - whole;
        const int64_t step = (int64_t)whole;
        const int64_t low = (int64_t)((const I *)grid->bases[a])[m] + step;
        int in = low >= -1 && low < grid->sizes[a];
        if (grid->strict) in = in && (low >= 0 || frac > 0);
        near = near && in;
        first += step * grid->strides[a];
        f[a] = frac;
    }
    /* Corner weights, the first axis slowest: products of (1 - f, f) in axis order. */
    int64_t count = 2;
    unmasked[0] = 1 - f[0];
    unmasked[1] = f[0];
    for (int64_t a = 1; a < dims; ++a, count *= 2)
        for (int64_t k = count - 1; k >= 0; --k) {
            const T corner = unmasked[k];
            unmasked[2 * k] = corner * (1 - f[a]);
            unmasked[2 * k + 1] = corner * f[a];
        }
    const T mask = grid->masks ? ((const T *)grid->masks)[m] : 1;
    for (int64_t k = 0; k < count; ++k) w[k] = grid->masks ? unmasked[k] * mask : unmasked[k];
    return near ? first : grid->dead;
}

/* plan_one for d = 2 in straight-line code (about twice as fast), operation for operation. */
INLINE int64_t NAME(plan2_one, SUFFIX)(const grid_t *grid, int64_t m, T *w, T *f) {
    const T *offsets = (const T *)grid->offsets + 2 * m;
    const T reach_y = (T)grid->reaches[0], reach_x = (T)grid->reaches[1];
    T sy = offsets[0], sx = offsets[1];
    sy = sy != sy ? reach_y : sy; /* NaN */
    sx = sx != sx ? reach_x : sx;
    sy = sy < -reach_y ? -reach_y : (sy > reach_y ? reach_y : sy);
    sx = sx < -reach_x ? -reach_x : (sx > reach_x ? reach_x : sx);
    const T wy = sizeof(T) == sizeof(float) ? (T)floorf((float)sy) : (T)floor(sy);
    const T wx = sizeof(T) == sizeof(float) ? (T)floorf((float)sx) : (T)floor(sx);
    const T fy = sy - wy, fx = sx - wx;
    const int64_t ky = (int64_t)wy, kx = (int64_t)wx;
    const int64_t ly = ((const I *)grid->bases[0])[m] + ky;
    const int64_t lx = ((const I *)grid->bases[1])[m] + kx;
    int near = ly >= -1 && ly < grid->sizes[0] && lx >= -1 && lx < grid->sizes[1];
    if (grid->strict) near = near && (ly >= 0 || fy > 0) && (lx >= 0 || fx > 0);
    const T gy = 1 - fy, gx = 1 - fx;
    w[0] = gy * gx;
    w[1] = gy * fx;
    w[2] = fy * gx;
    w[3] = fy * fx;
    if (grid->masks) {
        const T mask = ((const T *)grid->masks)[m];
        for (int k = 0; k < 4; ++k) w[k] *= mask;
    }
    f[0] = fy;
    f[1] = fx;
    const int64_t first = ((const I *)grid->first)[m];
    return near ? first + ky * grid->strides[0] + kx * grid->strides[1] : grid->dead;
}

/* A sample's mask gradient (sum_k unmasked[k] dots[k]) and position gradients (per axis the
 * differences of the corners across it times the other axes' weights, times the mask). */
INLINE void NAME(position_terms, SUFFIX)(int64_t dims, const T *f, const T *dots, T mask,
                                        int masked, T *mask_grad, T *position_grad) {
    const int64_t corners = (int64_t)1 << dims;
    T total = 0;
    for (int64_t k = 0; k < corners; ++k) {
        T weight = 1;
        for (int64_t a = 0; a < dims; ++a)
            weight *= (k >> (dims - 1 - a)) & 1 ? f[a] : 1 - f[a];
        total += weight * dots[k];
    }
    *mask_grad = total;
    for (int64_t a = 0; a < dims; ++a) {
        const int64_t bit = (int64_t)1 << (dims - 1 - a);
        T sum = 0;
        for (int64_t low = 0; low < corners; ++low) {
            if (low & bit) continue;
            T weight = 1;
            for (int64_t b = 0; b < dims; ++b)
                if (b != a) weight *= (low >> (dims - 1 - b)) & 1 ? f[b] : 1 - f[b];
            sum += weight * (dots[low | bit] - dots[low]);
        }
        position_grad[a] = masked ? sum * mask : sum;
    }
}

/* Vectors of VECTOR_BYTES / sizeof(T) values, loaded from any address (GCC and Clang vector
 * extensions: the compiler maps them onto the machine's vector registers). */
typedef T NAME(vector, SUFFIX) __attribute__((vector_size(VECTOR_BYTES), aligned(sizeof(T))));
#define VEC NAME(vector, SUFFIX)
#define WIDTH ((int64_t)(VECTOR_BYTES / sizeof(T)))

/* The sum of a vector's entries, pairwise (a short chain of dependent adds), in a fixed
 * order. */
INLINE T NAME(total, SUFFIX)(VEC v) {
    T lanes[WIDTH];
    memcpy(lanes, &v, sizeof v);
    for (int64_t half = WIDTH / 2; half > 0; half /= 2)
        for (int64_t l = 0; l < half; ++l) lanes[l] += lanes[l + half];
    return lanes[0];
}

/* a . b: per vector lane, then the lanes and the tail (the same order every time). */
INLINE T NAME(dot, SUFFIX)(const T *a, const T *b, int64_t n) {
    VEC lanes = {0};
    int64_t c = 0;
    for (; c + WIDTH <= n; c += WIDTH) lanes += *(const VEC *)(a + c) * *(const VEC *)(b + c);
    T sum = NAME(total, SUFFIX)(lanes);
    for (; c < n; ++c) sum += a[c] * b[c];
    return sum;
}

/* The dot products of four rows (a quad of a sample's corners) with g, each formed as dot()
 * forms it. */
INLINE void NAME(dot4, SUFFIX)(const T *r0, const T *r1, const T *r2, const T *r3, const T *g,
                               int64_t n, T *out) {
    VEC l0 = {0}, l1 = {0}, l2 = {0}, l3 = {0};
    int64_t c = 0;
    for (; c + WIDTH <= n; c += WIDTH) {
        const VEC v = *(const VEC *)(g + c);
        l0 += *(const VEC *)(r0 + c) * v;
        l1 += *(const VEC *)(r1 + c) * v;
        l2 += *(const VEC *)(r2 + c) * v;
        l3 += *(const VEC *)(r3 + c) * v;
    }
    T s0 = NAME(total, SUFFIX)(l0), s1 = NAME(total, SUFFIX)(l1);
    T s2 = NAME(total, SUFFIX)(l2), s3 = NAME(total, SUFFIX)(l3);
    for (; c < n; ++c) {
        s0 += r0[c] * g[c];
        s1 += r1[c] * g[c];
        s2 += r2[c] * g[c];
        s3 += r3[c] * g[c];
    }
    out[0] = s0;
    out[1] = s1;
    out[2] = s2;
    out[3] = s3;
}

/* out = w0 r0 + w1 r1 + w2 r2 + w3 r3: a 2-D sample in one pass over its output row. */
static inline void NAME(sum4, SUFFIX)(T *restrict out, const T *restrict r0,
                                      const T *restrict r1, const T *restrict r2,
                                      const T *restrict r3, const T *w, int64_t n) {
    const T w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];
    for (int64_t c = 0; c < n; ++c) out[c] = w0 * r0[c] + w1 * r1[c] + w2 * r2[c] + w3 * r3[c];
}

/* out += w0 r0 + w1 r1 + w2 r2 + w3 r3: the second quad of a 3-D sample's corners. */
static inline void NAME(add4, SUFFIX)(T *restrict out, const T *restrict r0,
                                      const T *restrict r1, const T *restrict r2,
                                      const T *restrict r3, const T *w, int64_t n) {
    const T w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];
    for (int64_t c = 0; c < n; ++c)
        out[c] += w0 * r0[c] + w1 * r1[c] + w2 * r2[c] + w3 * r3[c];
}

/* out = the weighted sum of a sample's rows, by quads of corners (2-D: one, 3-D: two). */
INLINE void NAME(sum_quads, SUFFIX)(T *out, const T *row, const int64_t *deltas, const T *w,
                                    int64_t corners, int64_t n) {
    NAME(sum4, SUFFIX)(out, row + deltas[0] * n, row + deltas[1] * n, row + deltas[2] * n,
                       row + deltas[3] * n, w, n);
    for (int64_t q = 4; q < corners; q += 4)
        NAME(add4, SUFFIX)(out, row + deltas[q] * n, row + deltas[q + 1] * n,
                           row + deltas[q + 2] * n, row + deltas[q + 3] * n, w + q, n);
}

/* out += w g */
static inline void NAME(axpy, SUFFIX)(T *restrict out, const T *restrict g, T w, int64_t n) {
    for (int64_t c = 0; c < n; ++c) out[c] += w * g[c];
}

/* out = the weighted sum of a bag's rows: by quads of corners where it has them (2-D, 3-D),
 * else corner by corner. */
INLINE void NAME(bag_sum, SUFFIX)(T *out, const T *row, const int64_t *deltas, const T *w,
                                  int64_t corners, int64_t n) {
    if (corners % 4 == 0) {
        NAME(sum_quads, SUFFIX)(out, row, deltas, w, corners, n);
        return;
    }
    for (int64_t c = 0; c < n; ++c) out[c] = 0;
    for (int64_t k = 0; k < corners; ++k) NAME(axpy, SUFFIX)(out, row + deltas[k] * n, w[k], n);
}

/* ok += w[k] g for a quad of a sample's rows, in one pass over g. */
static inline void NAME(axpy4, SUFFIX)(T *restrict o0, T *restrict o1, T *restrict o2,
                                       T *restrict o3, const T *restrict g, const T *w,
                                       int64_t n) {
    const T w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];
    for (int64_t c = 0; c < n; ++c) {
        const T v = g[c];
        o0[c] += w0 * v;
        o1[c] += w1 * v;
        o2[c] += w2 * v;
        o3[c] += w3 * v;
    }
}

/* Writes bag b's plan where the job asks for it (unrolled where `dims` and `corners` are
 * constants); returns `first`. */
INLINE int64_t NAME(write_plan, SUFFIX)(const job_t *job, int64_t b, int64_t first, const T *w,
                                        const T *f, int64_t dims, int64_t corners) {
    if (job->plan_first) {
        ((I *)job->plan_first)[b] = (I)first;
        for (int64_t k = 0; k < corners; ++k) ((T *)job->plan_weights)[b * corners + k] = w[k];
        for (int64_t a = 0; a < dims; ++a) ((T *)job->plan_fractions)[b * dims + a] = f[a];
    }
    return first;
}

/* The plan of bag b: read, or computed from the grid (and written where asked). */
INLINE int64_t NAME(bag_plan, SUFFIX)(const job_t *job, int64_t b, const T **w, T *space) {
    if (!job->grid) {
        *w = (const T *)job->weights + b * job->corners;
        return ((const I *)job->first)[b * job->step];
    }
    const grid_t *grid = job->grid;
    T unmasked[MAX_CORNERS], f[MAX_DIMS] = {0};
    *w = space;
    if (grid->dims == 2)
        return NAME(write_plan, SUFFIX)(job, b, NAME(plan2_one, SUFFIX)(grid, b, space, f),
                                        space, f, 2, 4);
    const int64_t first = grid->dims == 3
                              ? NAME(plan_one, SUFFIX)(grid, 3, b, unmasked, space, f)
                              : NAME(plan_one, SUFFIX)(grid, grid->dims, b, unmasked, space, f);
    return NAME(write_plan, SUFFIX)(job, b, first, space, f, grid->dims, job->corners);
}

static void NAME(sums_part, SUFFIX)(const void *arg, int64_t part, int64_t parts) {
    const job_t *job = (const job_t *)arg;
    const T *table = (const T *)job->table;
    const int64_t *deltas = job->deltas;
    const int64_t depth = job->depth, corners = job->corners, outs = job->bags / job->bag;
    T space[MAX_CORNERS];
    for (int64_t o = outs * part / parts; o < outs * (part + 1) / parts; ++o) {
        T *out = (T *)job->out + o * depth;
        if (job->bag == 1) {
            const T *w;
            const int64_t lowest = NAME(bag_plan, SUFFIX)(job, o, &w, space);
            if (inside(job, lowest)) {
                NAME(bag_sum, SUFFIX)(out, table + lowest * depth, deltas, w, corners, depth);
            } else {
                for (int64_t c = 0; c < depth; ++c) out[c] = 0;
            }
            continue;
        }
        for (int64_t c = 0; c < depth; ++c) out[c] = 0;
        for (int64_t b = o * job->bag; b < (o + 1) * job->bag; ++b) {
            const T *w;
            const int64_t row = NAME(bag_plan, SUFFIX)(job, b, &w, space);
            if (!inside(job, row)) continue;
            for (int64_t k = 0; k < corners; ++k)
                NAME(axpy, SUFFIX)(out, table + (row + deltas[k]) * depth, w[k], depth);
        }
    }
}

static void NAME(plan_part, SUFFIX)(const void *arg, int64_t part, int64_t parts) {
    const job_t *job = (const job_t *)arg;
    T space[MAX_CORNERS];
    const T *w;
    for (int64_t b = job->bags * part / parts; b < job->bags * (part + 1) / parts; ++b)
        NAME(bag_plan, SUFFIX)(job, b, &w, space);
}

static void NAME(grads_part, SUFFIX)(const void *arg, int64_t part, int64_t parts) {
    const job_t *job = (const job_t *)arg;
    const T *table = (const T *)job->table, *weights = (const T *)job->weights;
    const T *grad = (const T *)job->grad, *fractions = (const T *)job->fractions;
    const T *masks = (const T *)job->masks;
    const I *first = (const I *)job->first;
    const int64_t *deltas = job->deltas;
    T *dots = (T *)job->dots, *table_grad = (T *)job->table_grad;
    T *mask_grad = (T *)job->mask_grad, *position_grad = (T *)job->position_grad;
    const int64_t depth = job->depth, corners = job->corners, last = deltas[corners - 1];
    const int64_t dims = corners == 8 ? 3 : corners == 4 ? 2 : 1;
    const int64_t span = job->highest - job->lowest;
    const int64_t low = part == 0 ? 0 : job->lowest + span * part / parts;
    const int64_t high = part == parts - 1 ? job->rows : job->lowest + span * (part + 1) / parts;
    T *columns = (T *)job->out;
    const int positions = mask_grad || position_grad; /* the mask and position gradients */
    for (int64_t b = 0; b < job->bags; ++b) {
        const int64_t row = first[b * job->step];
        if (!inside(job, row)) {
            if (part == 0) {
                for (int64_t k = 0; dots && k < corners; ++k) dots[b * corners + k] = 0;
                for (int64_t c = 0; columns && c < depth; ++c) columns[b * depth + c] = 0;
                if (mask_grad) mask_grad[b] = 0;
                for (int64_t a = 0; position_grad && a < dims; ++a) position_grad[b * dims + a] = 0;
            }
            continue;
        }
        if (row + last < low || row >= high) continue; /* none of its rows is ours */
        const T *g = grad + (b / job->share) * depth;
        const T *w = weights + b * corners;
        /* A bag's columns, dot products and gradients are its first row's owner's. */
        if (columns && row >= low)
            NAME(bag_sum, SUFFIX)(columns + b * depth, table + row * depth, deltas, w, corners,
                                  depth);
        if ((dots || positions) && row >= low) {
            T sample_dots[MAX_CORNERS];
            const T *first_row = table + row * depth;
            if (corners % 4 == 0)
                for (int64_t q = 0; q < corners; q += 4)
                    NAME(dot4, SUFFIX)(first_row + deltas[q] * depth,
                                       first_row + deltas[q + 1] * depth,
                                       first_row + deltas[q + 2] * depth,
                                       first_row + deltas[q + 3] * depth, g, depth,
                                       sample_dots + q);
            else
                for (int64_t k = 0; k < corners; ++k)
                    sample_dots[k] = NAME(dot, SUFFIX)(first_row + deltas[k] * depth, g, depth);
            for (int64_t k = 0; dots && k < corners; ++k) dots[b * corners + k] = sample_dots[k];
            const T mask = masks ? masks[b] : 1;
            T sample_mask_grad, sample_position_grad[MAX_DIMS];
            if (positions && dims == 2)
                NAME(position_terms, SUFFIX)(2, fractions + b * 2, sample_dots, mask, masks != 0,
                                             &sample_mask_grad, sample_position_grad);
            else if (positions && dims == 3)
                NAME(position_terms, SUFFIX)(3, fractions + b * 3, sample_dots, mask, masks != 0,
                                             &sample_mask_grad, sample_position_grad);
            else if (positions)
                NAME(position_terms, SUFFIX)(dims, fractions + b * dims, sample_dots, mask,
                                             masks != 0, &sample_mask_grad, sample_position_grad);
            if (mask_grad) mask_grad[b] = sample_mask_grad;
            for (int64_t a = 0; position_grad && a < dims; ++a)
                position_grad[b * dims + a] = sample_position_grad[a];
        }
        if (!table_grad || row >= job->skip_from) continue;
        T *target = table_grad + row * depth;
        if (corners % 4 == 0 && row >= low && row + last < high) { /* all rows ours */
            for (int64_t q = 0; q < corners; q += 4)
                NAME(axpy4, SUFFIX)(target + deltas[q] * depth, target + deltas[q + 1] * depth,
                                    target + deltas[q + 2] * depth,
                                    target + deltas[q + 3] * depth, g, w + q, depth);
            continue;
        }
        for (int64_t k = 0; k < corners; ++k)
            if (row + deltas[k] >= low && row + deltas[k] < high)
                NAME(axpy, SUFFIX)(target + deltas[k] * depth, g, w[k], depth);
    }
}

/* The range of rows that the bags below skip_from reach (all rows if none). */
static void NAME(live_rows, SUFFIX)(job_t *job) {
    const I *first = (const I *)job->first;
    const int64_t last = job->deltas[job->corners - 1], step = job->step;
    const int64_t limit = job->skip_from < job->rows - last ? job->skip_from : job->rows - last;
    int64_t lowest = job->rows, highest = 0;
    for (int64_t b = 0; b < job->bags; ++b) {
        const int64_t row = first[b * step];
        if (row < 0 || row >= limit) continue;
        lowest = row < lowest ? row : lowest;
        highest = row > highest ? row : highest;
    }
    job->lowest = lowest <= highest ? lowest : 0;
    job->highest = lowest <= highest ? highest + last + 1 : job->rows;
}

/* out (bags / bag, depth): the corner sums of bags with the plan `first`, `weights`. */
void NAME(corner_sums, SUFFIX)(const T *table, const I *first, int64_t step, const T *weights,
                               const int64_t *deltas, int64_t bags, int64_t corners,
                               int64_t depth, int64_t rows, int64_t bag, T *out,
                               int64_t parts) {
    const job_t job = {.table = table, .first = first, .weights = weights, .out = out,
                       .deltas = deltas, .step = step, .bags = bags, .corners = corners,
                       .depth = depth, .rows = rows, .bag = bag, .share = 1};
    in_parallel(NAME(sums_part, SUFFIX), &job, parts);
}

/* The same for samples planned from their offsets (bags, d), masks (bags,) or NULL, and
 * grid; the plan is also written to plan_first, plan_weights, plan_fractions if not NULL.
 * Returns 0 for a grid it cannot read. */
int NAME(sample_sums, SUFFIX)(const T *table, const T *offsets, const T *masks,
                              const int64_t *geometry, const double *reaches,
                              const int64_t *deltas, int64_t bags, int64_t depth, int64_t rows,
                              int64_t bag, T *out, I *plan_first, T *plan_weights,
                              T *plan_fractions, int64_t parts) {
    grid_t grid;
    if (!read_grid(&grid, offsets, masks, geometry, reaches)) return 0;
    const job_t job = {.table = table, .out = out, .plan_first = plan_first,
                       .plan_weights = plan_weights, .plan_fractions = plan_fractions,
                       .deltas = deltas, .grid = &grid, .step = 1, .bags = bags,
                       .corners = (int64_t)1 << grid.dims, .depth = depth, .rows = rows,
                       .bag = bag, .share = 1};
    in_parallel(NAME(sums_part, SUFFIX), &job, parts);
    return 1;
}

/* The plan alone: first (bags,), masked weights (bags, 2**d), fractions (bags, d). */
int NAME(sample_plan, SUFFIX)(const T *offsets, const T *masks, const int64_t *geometry,
                              const double *reaches, int64_t bags, I *plan_first,
                              T *plan_weights, T *plan_fractions, int64_t parts) {
    grid_t grid;
    if (!read_grid(&grid, offsets, masks, geometry, reaches)) return 0;
    const job_t job = {.plan_first = plan_first, .plan_weights = plan_weights,
                       .plan_fractions = plan_fractions, .grid = &grid, .bags = bags,
                       .corners = (int64_t)1 << grid.dims};
    in_parallel(NAME(plan_part, SUFFIX), &job, parts);
    return 1;
}

/* The backward of bags with gradient rows grad (bags / share, depth): adds the input
 * gradient into table_grad (if not NULL), and writes the dot products dots (bags, corners)
 * (if not NULL) and, from them, with the plan's fractions (bags, d) and masks (or NULL),
 * mask_grad (bags,) and position_grad (bags, d) (each if not NULL), and the bags'
 * sums as corner_sums writes them into columns (bags, depth) (if not NULL). */
void NAME(corner_grads, SUFFIX)(const T *table, const I *first, int64_t step, const T *weights,
                                const int64_t *deltas, int64_t bags, int64_t corners,
                                int64_t depth, int64_t rows, const T *grad, int64_t share,
                                int64_t skip_from, T *dots, T *table_grad, const T *fractions,
                                const T *masks, T *mask_grad, T *position_grad, T *columns,
                                int64_t parts) {
    job_t job = {.table = table, .first = first, .weights = weights, .grad = grad,
                 .out = columns,
                 .fractions = fractions, .masks = masks, .dots = dots,
                 .table_grad = table_grad, .mask_grad = mask_grad,
                 .position_grad = position_grad, .deltas = deltas, .step = step,
                 .bags = bags, .corners = corners, .depth = depth, .rows = rows,
                 .bag = 1, .share = share, .skip_from = skip_from};
    if (parts > 1) NAME(live_rows, SUFFIX)(&job);
    in_parallel(NAME(grads_part, SUFFIX), &job, parts);
}

#undef VEC
#undef WIDTH
#undef T
#undef I
#undef SUFFIX
#endif
