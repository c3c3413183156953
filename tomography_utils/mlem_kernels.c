/* medEDM: diffusion-model training toolkit for medical imaging.

   Fused CPU kernels of one MLEM / OSEM sub-iteration (tomography_utils/mlem.py,
   Eq. 2 there) for a batch stored as the columns of row-major matrices
   X [pixels, width] and Y, F [rays, width]:

     forward_ratio:  F[r, :] = Y[r, :] / (sum_k A[r, k] X[k, :] + eps)
     back_update:    X[j, :] = X[j, :] * (sum_r B[j, r] F[r, :] + keep[j])

   A (rays x pixels) and B = diag(1/s) A^T (pixels x rays) are CSR with
   32-bit indices. Each output row is one pass over the row's nonzeros that
   accumulates up to 64 columns in registers, so the division and the
   multiplicative update cost no extra pass over memory (the torch path makes
   four: the product, + eps, the division, the update).

   Cache blocking. Where the dense operand (X for the forward pass, F for
   the back-projection) exceeds a core's L2 cache, mlem.py splits the sum
   over its rows into groups (column blocks of A or B) and calls a kernel
   once per group: `accumulate` adds the running sum kept in the output
   (forward) or in U (back), and only the last group (`finish`) divides by
   it or applies the update; the others store the partial sum.

   What bounds the speed. Per nonzero a pass loads one row of the dense
   operand: `width` values, 256 bytes at width 64, from L1 or L2 (mlem.py
   orders rays and pixels so that consecutive rows of a matrix share many
   of them). Two independent accumulator chains (even and odd nonzeros)
   keep the FMA latency off the critical path. Measured at 64 x 64, B = 64,
   one thread (2-core Sapphire Rapids VM): 1.0 ms per forward pass, of
   which 0.75 ms remain when every gathered row is in L1 (about 4 cycles
   per nonzero: the loads and the index arithmetic); two threads take
   0.55 ms each pass alone but 1.35 ms per iteration, since each pass reads
   rows that the other core wrote in the pass before. Tried and slower or
   no better: blocked layouts that keep a pixel block in L1 and sweep the
   rays across it (per-segment bookkeeping costs more than the L2 traffic
   saved), software prefetch, four accumulator chains, splitting the batch
   columns across threads instead of the rows (the narrower rows cost more
   per nonzero than the shared cache lines), a private POSIX-thread pool.

   Rows are accumulated in 64-byte vectors (GCC vector extensions: 16 floats
   or 8 doubles), TILE_VECS vectors per pass, then 2, then single vectors,
   then scalars for the columns that do not fill a vector (so a single image
   costs a sparse matrix-vector product, not a padded batch). Every column
   is computed with the same operations in the same order whatever the
   batch size, so batched results equal one-image-at-a-time results bit for
   bit. Rows are split into `threads` contiguous ranges of about equal
   nonzero count, one OpenMP thread each: the runtime is the one torch has
   loaded (see native.py), so the kernels share torch's thread pool.

   Built and loaded by tomography_utils/native.py (cc -O3 -march=native
   -fopenmp -shared, cached per source and CPU); no Python or torch headers. */

#include <stdint.h>
#include <string.h>

#define MAX_THREADS 256
#define VEC_BYTES 64
#define TILE_VECS 4                     /* Vectors accumulated per row pass. */

typedef float v_f __attribute__((vector_size(VEC_BYTES)));
typedef double v_d __attribute__((vector_size(VEC_BYTES)));

#define LOAD(V, dst, src)  V dst; memcpy(&dst, (src), sizeof(V))
#define STORE(dst, src)    memcpy((dst), &(src), sizeof(src))

typedef struct {                        /* One thread's share of one call. */
    int is_double, back;                /* Element type; 0 = forward_ratio, 1 = back_update. */
    int accumulate, finish;             /* Add the stored partial sum; apply the ratio / update (last group). */
    int64_t r0, r1, width;              /* Rows r0 .. r1 - 1; columns 0 .. width - 1. */
    const int32_t *crow, *col;
    const void *val, *in, *aux;         /* in: X (forward) or F (back); aux: Y (forward) or keep (back, may be NULL). */
    void *out, *part;                   /* out: F (forward) or X (back, in place); part: U, the back pass's partial sums. */
    double eps;
} job_t;

/*---------------------------------------------------------------------------
  acc[0:NV] = sum_k val[k] in[col[k], b : b + NV * LANES] over one row,
  as two chains (even / odd k) added at the end; V is a vector of LANES
  values of type T, or T itself (LANES = 1). */

#define ROW_PASS(T, V, NV, LANES)                                               \
    V acc[NV], odd[NV];                                                         \
    for (int v = 0; v < NV; v++) acc[v] = odd[v] = (V){0};                      \
    int32_t k = k0;                                                             \
    for (; k + 1 < k1; k += 2) {                                                \
        const T *m0 = in + (int64_t)col[k] * w + b;                             \
        const T *m1 = in + (int64_t)col[k + 1] * w + b;                         \
        const T a0 = val[k], a1 = val[k + 1];                                   \
        for (int v = 0; v < NV; v++) {                                          \
            LOAD(V, x0, m0 + v * LANES); acc[v] += a0 * x0;                     \
            LOAD(V, x1, m1 + v * LANES); odd[v] += a1 * x1;                     \
        }                                                                       \
    }                                                                           \
    if (k < k1) {                                                               \
        const T *m0 = in + (int64_t)col[k] * w + b;                             \
        const T a0 = val[k];                                                    \
        for (int v = 0; v < NV; v++) { LOAD(V, x0, m0 + v * LANES); acc[v] += a0 * x0; } \
    }                                                                           \
    for (int v = 0; v < NV; v++) acc[v] += odd[v];

#define FORWARD_TILE(T, V, NV, LANES)                                           \
    for (; b + NV * LANES <= w; b += NV * LANES) {                              \
        ROW_PASS(T, V, NV, LANES)                                               \
        for (int v = 0; v < NV; v++) {                                          \
            T *o = out + r * w + b + v * LANES;                                 \
            if (j->accumulate) { LOAD(V, p, o); acc[v] = p + acc[v]; }          \
            if (j->finish) { LOAD(V, yv, y + r * w + b + v * LANES); acc[v] = yv / (acc[v] + eps); } \
            STORE(o, acc[v]);                                                   \
        }                                                                       \
    }

#define BACK_TILE(T, V, NV, LANES)                                              \
    for (; b + NV * LANES <= w; b += NV * LANES) {                              \
        ROW_PASS(T, V, NV, LANES)                                               \
        for (int v = 0; v < NV; v++) {                                          \
            T *u = part + r * w + b + v * LANES;                                \
            if (j->accumulate) { LOAD(V, p, u); acc[v] = p + acc[v]; }          \
            if (j->finish) {                                                    \
                LOAD(V, xv, out + r * w + b + v * LANES);                       \
                xv *= acc[v] + add;                                             \
                STORE(out + r * w + b + v * LANES, xv);                         \
            } else STORE(u, acc[v]);                                            \
        }                                                                       \
    }

#define DEFINE_KERNELS(T, V, SUFFIX)                                            \
static void forward_##SUFFIX(const job_t *j)                                    \
{                                                                               \
    enum { LANES = VEC_BYTES / sizeof(T) };                                     \
    const int32_t *crow = j->crow, *col = j->col;                               \
    const T *val = j->val, *in = j->in, *y = j->aux, eps = (T)j->eps;           \
    T *out = j->out;                                                            \
    const int64_t w = j->width;                                                 \
    for (int64_t r = j->r0; r < j->r1; r++) {                                   \
        const int32_t k0 = crow[r], k1 = crow[r + 1];                           \
        int64_t b = 0;                                                          \
        FORWARD_TILE(T, V, TILE_VECS, LANES)                                    \
        FORWARD_TILE(T, V, 2, LANES)                                            \
        FORWARD_TILE(T, V, 1, LANES)                                            \
        FORWARD_TILE(T, T, 1, 1)                                                \
    }                                                                           \
}                                                                               \
                                                                                \
static void back_##SUFFIX(const job_t *j)                                       \
{                                                                               \
    enum { LANES = VEC_BYTES / sizeof(T) };                                     \
    const int32_t *crow = j->crow, *col = j->col;                               \
    const T *val = j->val, *in = j->in, *keep = j->aux;                         \
    T *out = j->out, *part = j->part;                                           \
    const int64_t w = j->width;                                                 \
    for (int64_t r = j->r0; r < j->r1; r++) {                                   \
        const int32_t k0 = crow[r], k1 = crow[r + 1];                           \
        const T add = keep ? keep[r] : (T)0;                                    \
        int64_t b = 0;                                                          \
        BACK_TILE(T, V, TILE_VECS, LANES)                                       \
        BACK_TILE(T, V, 2, LANES)                                               \
        BACK_TILE(T, V, 1, LANES)                                               \
        BACK_TILE(T, T, 1, 1)                                                   \
    }                                                                           \
}

DEFINE_KERNELS(float, v_f, f32)
DEFINE_KERNELS(double, v_d, f64)

static void run_job(const job_t *j)
{
    if (j->back) { if (j->is_double) back_f64(j); else back_f32(j); }
    else         { if (j->is_double) forward_f64(j); else forward_f32(j); }
}

/*---------------------------------------------------------------------------
  Rows split into `threads` contiguous ranges of about equal nonzero count
  (binary search in crow), one per thread. */

static void fan_out(job_t base, int64_t n_rows, int threads)
{
    job_t jobs[MAX_THREADS];
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > n_rows) threads = (int)n_rows;
    if (threads < 1) threads = 1;
    const int64_t nnz = base.crow[n_rows];
    int64_t lo = 0;
    for (int t = 0; t < threads; t++) {
        int64_t hi = n_rows;
        if (t < threads - 1) {          /* First row that starts at or after the target nonzero. */
            const int64_t target = nnz * (t + 1) / threads;
            int64_t a = lo, z = n_rows;
            while (a < z) { const int64_t mid = (a + z) / 2; if (base.crow[mid] < target) a = mid + 1; else z = mid; }
            hi = a;
        }
        jobs[t] = base;
        jobs[t].r0 = lo;
        jobs[t].r1 = hi;
        lo = hi;
    }
    #pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int t = 0; t < threads; t++) run_job(&jobs[t]);
}

/*---------------------------------------------------------------------------
  Entry points (ctypes). All arrays contiguous and row-major, `width`
  columns wide. */

void medEDM_forward_ratio(int is_double, int64_t n_rows, const int32_t *crow, const int32_t *col, const void *val,
    const void *x, const void *y, void *f, int64_t width, double eps, int accumulate, int finish, int threads)
{
    const job_t base = {is_double, 0, accumulate, finish, 0, 0, width, crow, col, val, x, y, f, NULL, eps};
    fan_out(base, n_rows, threads);
}

void medEDM_back_update(int is_double, int64_t n_rows, const int32_t *crow, const int32_t *col, const void *val,
    const void *f, const void *keep, void *x, void *u, int64_t width, int accumulate, int finish, int threads)
{
    const job_t base = {is_double, 1, accumulate, finish, 0, 0, width, crow, col, val, f, keep, x, u, 0.0};
    fan_out(base, n_rows, threads);
}
