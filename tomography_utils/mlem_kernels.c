/* medEDM: diffusion-model training toolkit for medical imaging.

   Fused CPU kernels of one MLEM / OSEM sub-iteration (tomography_utils/mlem.py,
   Eq. 2 there) for a batch stored as the columns of row-major matrices
   X [pixels, width] and Y, F [rays, width]:

     forward_ratio:  F[r, :] = Y[r, :] / (sum_k A[r, k] X[k, :] + eps)
     back_update:    X[j, :] = X[j, :] * (sum_r B[j, r] F[r, :] + keep[j])

   A (rays x pixels) and B = diag(1/s) A^T (pixels x rays) are CSR with
   32-bit row pointers and 32- or 16-bit column indices. Each output row is
   one pass over the row's nonzeros that accumulates up to 64 columns in
   registers, so the division and the multiplicative update cost no extra
   pass over memory (the torch path makes four: the product, + eps, the
   division, the update).

   Cache blocking. Where the dense operand (X for the forward pass, F for
   the back-projection) exceeds a core's L2 cache, mlem.py splits the sum
   over its rows into groups (column blocks of A or B), one pass per group
   (the passes of an iteration form one plan, see medEDM_run): `accumulate`
   adds the running sum kept in the output (forward) or in U (back), and
   only the last group (`finish`) divides by it or applies the update; the
   others store the partial sum.

   What bounds the speed. Per nonzero a pass loads one row of the dense
   operand: `width` values, 256 bytes at width 64, from L1 or L2 (mlem.py
   orders rays and pixels so that consecutive rows of a matrix share many
   of them; the figures below were measured with its earlier orders, 8 x 8
   pixel tiles and bin-major rays: its Hilbert-curve orders took two-thread
   iterations from 1.29 to 1.15 ms). Two independent accumulator chains (even and odd nonzeros)
   keep the FMA latency off the critical path. Measured at 64 x 64, B = 64
   (2-core Sapphire Rapids VM, 3.0 GHz, 2 zmm FMAs per cycle): one thread,
   1.0 ms per forward pass and 1.2 ms per back-projection; with every
   gathered row in L1 (column indices taken modulo 64) 0.71 and 0.67 ms,
   about 3.4 cycles per nonzero against the 2 of the FMA ports; with them
   in L2 (modulo 1024) 1.9 ms per iteration. Two threads: 1.2 ms per
   iteration, 0.69 ms with every row in L1, 1.1 ms if each thread worked
   on private copies of x and the ratios (the rest: rows the other core
   wrote in the pass before). So the cache misses of the gathers cost
   about 40 % of the time, and a pixel's 153 rays (39 KB) barely fit L1.
   Tried and slower or no better: blocked layouts that keep a pixel block
   in L1 and sweep the rays across it (a tile of 8 x 8 pixels times a
   group of 8-16 angles: per-segment bookkeeping eats the L1 hits, at best
   -4 % on the back-projection), a single fused pass per ray that
   scatters the ratio into the update at once (1.5 x slower: a load, FMA
   and store per vector), the batch widened to 128 or 256 columns with a
   half or quarter of the rays (the 90-degree symmetry of the geometry;
   same time per vector), splitting the batch columns across threads
   instead of the rows (the narrower rows cost more per nonzero than the
   shared cache lines), other ray orders (bins interleaved in pairs,
   snake: within 2 %), software prefetch (of the rows, or non-temporal
   of the matrix streams: -20 %), reciprocal instead of division (1 %),
   byte-offset column indices (no gain), pairs of rows that share one
   load of their common columns (35 % fewer loads, same time: those loads
   hit L1 anyway), work stealing between the threads (the slower thread's
   rows stay slow on the other core), four accumulator chains, a private
   POSIX-thread pool.

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
#ifdef _OPENMP
#include <omp.h>
#endif

#define MAX_THREADS 256
#define VEC_BYTES 64
#define TILE_VECS 4                     /* Vectors accumulated per row pass. */

typedef float v_f __attribute__((vector_size(VEC_BYTES)));
typedef double v_d __attribute__((vector_size(VEC_BYTES)));

#define LOAD(V, dst, src)  V dst; memcpy(&dst, (src), sizeof(V))
#define STORE(dst, src)    memcpy((dst), &(src), sizeof(src))

typedef struct {                        /* One pass (r0 = 0, r1 = rows), or one thread's share of it. */
    int is_double, back;                /* Element type; 0 = forward_ratio, 1 = back_update. */
    int accumulate, finish;             /* Add the stored partial sum; apply the ratio / update (last group). */
    int col16, pad;                     /* Column indices uint16 (at most 65536 columns) instead of int32. */
    int64_t r0, r1, width;              /* Rows r0 .. r1 - 1; columns 0 .. width - 1. */
    const int32_t *crow;
    const void *col;
    const void *val, *in, *aux;         /* in: X (forward) or F (back); aux: Y (forward) or keep (back, may be NULL). */
    void *out, *part;                   /* out: F (forward) or X (back, in place); part: U, the back pass's partial sums. */
    double eps;
} job_t;

/*---------------------------------------------------------------------------
  acc[0:NV] = sum_k val[k] in[col[k], b : b + NV * LANES] over one row,
  as two chains (even / odd k) added at the end; V is a vector of LANES
  values of type T, or T itself (LANES = 1). The empty asm statements keep
  each row's address in a register, so that the loads folded into the FMAs
  address base + displacement: with an indexed address (which GCC picks
  otherwise) Intel cores split each such FMA into two micro-ops (2 % at
  64 x 64, one thread). */

#define ROW_PASS(T, V, NV, LANES)                                               \
    V acc[NV], odd[NV];                                                         \
    for (int v = 0; v < NV; v++) acc[v] = odd[v] = (V){0};                      \
    int32_t k = k0;                                                             \
    for (; k + 1 < k1; k += 2) {                                                \
        const T *m0 = in + (int64_t)col[k] * w + b;                             \
        const T *m1 = in + (int64_t)col[k + 1] * w + b;                         \
        __asm__("" : "+r"(m0)); __asm__("" : "+r"(m1));                         \
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

#define DEFINE_KERNELS(T, V, I, SUFFIX)                                         \
static void forward_##SUFFIX(const job_t *j)                                    \
{                                                                               \
    enum { LANES = VEC_BYTES / sizeof(T) };                                     \
    const int32_t *crow = j->crow;                                              \
    const I *col = j->col;                                                      \
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
    const int32_t *crow = j->crow;                                              \
    const I *col = j->col;                                                      \
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

/* Column indices: uint16 where a matrix part has at most 65536 columns
   (6 instead of 8 bytes per nonzero, 3 % at 64 x 64), else int32. */
DEFINE_KERNELS(float, v_f, int32_t, f32_i32)
DEFINE_KERNELS(float, v_f, uint16_t, f32_u16)
DEFINE_KERNELS(double, v_d, int32_t, f64_i32)
DEFINE_KERNELS(double, v_d, uint16_t, f64_u16)

static void (*const KERNELS[2][2][2])(const job_t *) = {   /* [back][is_double][col16] */
    {{forward_f32_i32, forward_f32_u16}, {forward_f64_i32, forward_f64_u16}},
    {{back_f32_i32, back_f32_u16}, {back_f64_i32, back_f64_u16}},
};

static void run_job(const job_t *j)
{
    KERNELS[j->back != 0][j->is_double != 0][j->col16 != 0](j);
}

/*---------------------------------------------------------------------------
  A plan: the passes of one MLEM / OSEM iteration (every subset's forward
  and back-projection groups, in order), run in one OpenMP parallel region
  with a barrier after each pass, so an iteration costs one call and one
  fork / join instead of one per pass (1.38 -> 1.29 ms per iteration at
  64 x 64, B = 64, 2 threads). Each pass's rows are split into `threads`
  contiguous ranges of about equal nonzero count (binary search in crow).
  (Handing the back-projection ranges out in reverse thread order, so that
  more of the ratio rows a thread reads were written by its own core, gave
  2 % in a stand-alone loop and nothing here.) */

static void rows_of(job_t *j, int part, int parts)
{
    const int64_t n_rows = j->r1, nnz = j->crow[n_rows];
    int64_t bound[2];
    for (int e = 0; e < 2; e++) {       /* First row that starts at or after the target nonzero. */
        const int p = part + e;
        if (p == parts) { bound[e] = n_rows; continue; }
        const int64_t target = nnz * p / parts;
        int64_t a = 0, z = n_rows;
        while (a < z) { const int64_t mid = (a + z) / 2; if (j->crow[mid] < target) a = mid + 1; else z = mid; }
        bound[e] = p == 0 ? 0 : a;
    }
    j->r0 = bound[0];
    j->r1 = bound[1];
}

/*---------------------------------------------------------------------------
  Entry point (ctypes): run the `n_steps` passes in order, `repeats` times
  (MLEM iterations without a callback run in one call). Every job_t gives
  r0 = 0 and r1 = its number of rows; arrays contiguous and row-major,
  `width` columns wide. */

void medEDM_run(const job_t *steps, int n_steps, int repeats, int threads)
{
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads < 1) threads = 1;
    #pragma omp parallel num_threads(threads)
    {
#ifdef _OPENMP
        const int t = omp_get_thread_num(), n = omp_get_num_threads();
#else
        const int t = 0, n = 1;
#endif
        for (int rep = 0; rep < repeats; rep++) {
            for (int s = 0; s < n_steps; s++) {
                job_t j = steps[s];
                rows_of(&j, t, n);
                run_job(&j);
                #pragma omp barrier
            }
        }
    }
}

/*---------------------------------------------------------------------------
  Permuted transpose, between the [B, ...] layout of callers and the
  loop's [..., B] layout in its ray or pixel order:

    out[dst[i] * os_i + j * os_j] = in[i * is_i + j * is_j]

  for i < n_i with dst[i] >= 0 and j < n_j, in blocks of BI x BJ, blocks of
  i split over the threads. At 64 x 64, B = 64, 2 threads: 0.15 ms for the
  sinograms (2 MB; torch's transposing copy and row gather: 0.55 ms) and
  0.10 ms for the images (torch: 0.29 ms; 16 x 16 blocks: 0.5 ms, since
  the 16 output rows of a block, 16 KB apart, share one L1 set). With the
  Hilbert pixel order of mlem.py the images take 0.22 ms: a block's 16
  pixels land in 4 image rows, 4 pixels each. */

#define BI 16                           /* Rows i per block. */
#define BJ_ROWS 16                      /* Columns j per block where out's rows are contiguous in j ... */
#define BJ_COLS 8                       /* ... and where they are os_j apart (a power of two: cache-set conflicts). */

#define TRANSPOSE_BLOCK(T, BJ)                                                  \
    for (int64_t j0 = 0; j0 < n_j; j0 += BJ) {                                  \
        const int64_t j1 = j0 + BJ < n_j ? j0 + BJ : n_j;                       \
        for (int64_t i = i0; i < i1; i++) {                                     \
            if (dst[i] < 0) continue;                                           \
            const T *src = (const T *)in + i * is_i;                            \
            T *o = (T *)out + dst[i] * os_i;                                    \
            for (int64_t j = j0; j < j1; j++) o[j * os_j] = src[j * is_j];      \
        }                                                                       \
    }

void medEDM_permute_transpose(int is_double, const void *in, void *out, const int64_t *dst, int64_t n_i, int64_t n_j,
    int64_t is_i, int64_t is_j, int64_t os_i, int64_t os_j, int threads)
{
    if (threads < 1) threads = 1;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i0 = 0; i0 < n_i; i0 += BI) {
        const int64_t i1 = i0 + BI < n_i ? i0 + BI : n_i;
        if (os_j == 1) { if (is_double) { TRANSPOSE_BLOCK(double, BJ_ROWS) } else { TRANSPOSE_BLOCK(float, BJ_ROWS) } }
        else           { if (is_double) { TRANSPOSE_BLOCK(double, BJ_COLS) } else { TRANSPOSE_BLOCK(float, BJ_COLS) } }
    }
}
