# medEDM: diffusion-model training toolkit for medical imaging.

"""Batched MLEM and OSEM reconstruction with a sparse system matrix.

MLEM (Shepp & Vardi, IEEE TMI 1(2), 1982; Lange & Carson, JCAT 8(2), 1984)
maximises the Poisson log-likelihood of the counts y given the image x,

    L(x) = sum_i [ y_i log (A x)_i - (A x)_i ]                          (1)

with the multiplicative update

    x <- x / s * A^T ( y / (A x + eps) ),    s = A^T 1                   (2)

which keeps x >= 0, never decreases (1), and conserves counts:
sum_i (A x)_i = sum_i y_i after every iteration (wherever A x > 0).
OSEM (Hudson & Larkin, IEEE TMI 13(4), 1994) applies (2) in turn to subsets
of the projection angles (subset k = angles k, k + S, k + 2S, ...), each with
its own rows A_k and sensitivity s_k = A_k^T 1; one iteration is one pass
over all subsets.

The batch is reconstructed as one matrix: images are the columns of X
[n_pixels, B] and sinograms the columns of Y [n_rays, B], so each projection
is a single sparse-dense product (CSR, int32 indices) for the whole batch.
The factor 1/s is folded into a pre-scaled copy of A^T and the loop writes
into preallocated buffers in place. Two back ends run the same loop:

  CPU     the fused kernels of mlem_kernels.c (tomography_utils/native.py
          builds them on first use): one pass computes y / (A x + eps), one
          computes x * (A^T(...) / s + keep); batched results equal
          one-image-at-a-time results bit for bit. Without a C compiler
          (or with MEDEDM_NATIVE=0) the torch path below runs instead.
  torch   torch.addmm into buffers, then element-wise ops (GPU, and CPU
          fallback); nothing synchronises with the host (no .item(), no
          data-dependent branches), so on a GPU the iterations queue
          without stalls.

Inputs are checked once, before the loop.
"""

from typing import Callable

import torch

from tomography_utils import native
from tomography_utils.projector import SystemMatrix, csr_row_indices, make_csr

#----------------------------------------------------------------------------
# Check a batch of sinograms: shape, finite, non-negative, non-empty.
# Returns them as [B, n_rays] in the matrix's dtype (contiguous).

def check_counts(sinograms: torch.Tensor, system_matrix: SystemMatrix, name: str = 'sinograms') -> torch.Tensor:
    """Validate measured counts and return them as [B, n_rays] in the matrix's dtype; ValueError on bad input."""
    flat = system_matrix.check_sinograms(sinograms, name)
    if flat.device != system_matrix.device:
        raise ValueError(f'{name} are on {flat.device} but the system matrix is on {system_matrix.device}; '
            f'move one of them (SystemMatrix.to(device))')
    if flat.shape[0] == 0:
        raise ValueError(f'{name} is an empty batch (shape {tuple(sinograms.shape)})')
    peaks, minimum = flat.amax(dim=1), flat.min()                           # NaN propagates into both; a sum of
    if not bool(torch.isfinite(peaks).all() & torch.isfinite(minimum)):     # non-negative counts is 0 iff its maximum is.
        raise ValueError(f'{name} contain NaN or infinite values; counts must be finite and non-negative')
    if bool(minimum < 0):
        raise ValueError(f'{name} contain negative values (minimum {minimum.item():g}); counts must be non-negative')
    if bool((peaks == 0).any()):
        i = int(torch.nonzero(peaks == 0)[0, 0])
        raise ValueError(f'{name}[{i}] has zero total counts: an empty acquisition has no MLEM reconstruction '
            f'(every image explains it equally well)')
    return flat.to(system_matrix.dtype).contiguous()

#----------------------------------------------------------------------------
# Check an image-shaped input (initial image or mask); returns [B or 1, n_pixels].

def _check_image_arg(x: torch.Tensor, system_matrix: SystemMatrix, batch: int, name: str, allow_shared: bool) -> torch.Tensor:
    n = system_matrix.resolution
    if allow_shared and isinstance(x, torch.Tensor) and x.shape == (n, n):
        flat = x.reshape(1, n * n)
    else:
        flat = system_matrix.check_images(x, name)
        if flat.shape[0] != batch:
            raise ValueError(f'{name} has batch size {flat.shape[0]} but the sinograms have {batch}')
    if flat.device != system_matrix.device:
        raise ValueError(f'{name} is on {flat.device} but the system matrix is on {system_matrix.device}')
    flat = flat.to(system_matrix.dtype)
    if not bool(torch.isfinite(flat).all()) or bool((flat < 0).any()):
        raise ValueError(f'{name} must be finite and non-negative')
    return flat

#----------------------------------------------------------------------------
# Loop order and cache blocking (CPU). Each product reads one row of its
# dense operand per nonzero (B values), so the speed depends on how often
# that row is still in L1 / L2 from a recent nonzero. Inside the loop:
#
#   pixels  are numbered along a Hilbert curve (Hilbert 1891; the square of
#           side 2^k that covers the image, outside pixels skipped): every
#           step goes to a 4-neighbour and every run of 4^m pixels fills a
#           2^m x 2^m square, so pixels near each other in the image are
#           near each other in X at every scale, and consecutive rows of the
#           back-projection share most of their rays;
#   rays    are numbered along a Hilbert curve over (bin, angle index in the
#           subset): every step changes the bin or the angle by one. Two
#           rays at neighbouring angles and the same bin cross the same
#           pixels for about 1 / delta_theta pixels around their crossing,
#           two parallel rays at neighbouring bins share the pixels that
#           straddle both; so consecutive rows of A reuse most of the
#           previous row's X rows from L1. The angle-major order of the
#           stored matrix reuses few: angle-minor (bin-major) order took the
#           forward pass from 1.28 to 1.03 ms and the back-projection from
#           1.43 to 1.27 ms at 64 x 64, B = 64, one thread (2-core Sapphire
#           Rapids VM). The Hilbert order also keeps neighbouring bins
#           together. Bins are the curve's x: with half as many bins as
#           angles (the default geometry) they fill the first half of its
#           square, which the curve covers without a jump.
#
# Both Hilbert orders together, against 8 x 8 pixel tiles (row-major inside a
# tile) and bin-major rays: 1.29 -> 1.15 ms per iteration at 64 x 64 and
# 11.4 -> 10.1 ms at 128 x 128 (B = 64, 2 threads; each order about half).
#
# Where the dense operand outgrows a core's L2 cache the product is split
# into groups of its rows, each group's block small enough to stay there
# (BLOCK_BYTES), and the groups' products are summed: A x = sum_g A[:, g] x[g]
# over groups of consecutive (Hilbert-ordered) pixels, and
# A^T f = sum_h A^T[:, h] f[h] over groups of consecutive (Hilbert-ordered) rays.
# At 128 x 128 with B = 64 forward groups halved the CPU time of an
# iteration of the torch path (193 -> 94 ms, one thread). On GPUs there is
# one group.

MIN_GROUP_PIXELS = 8                    # Fewest pixels per cache-blocking group.
BLOCK_BYTES = 1 << 20                   # Target size of one group's block of X or f on CPU.
MAX_CACHED = 4                          # Operator sets (subsets x groups) kept per system matrix.

# Position of cell (row i, column j), i, j >= 0, on the Hilbert curve through
# the smallest square of side 2^levels that holds them (x = j runs first):
# per level, from the top, the quadrant's index along the curve
# (0 .. 3 = (3 rx) xor ry) times the quadrant's size, then the coordinates
# inside the quadrant, turned into the frame in which the curve enters it
# (reflected and transposed for the lower quadrants).
def hilbert_index(i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    x, y, d = j.long(), i.long(), torch.zeros(torch.broadcast_shapes(i.shape, j.shape), dtype=torch.long, device=i.device)
    levels = max(int(x.max()), int(y.max()), 1).bit_length()
    for level in reversed(range(levels)):
        s = 1 << level
        rx, ry = (x >> level) & 1, (y >> level) & 1
        d = d + s * s * ((3 * rx) ^ ry)
        x, y = x & (s - 1), y & (s - 1)
        flip = (ry == 0) & (rx == 1)
        x, y = torch.where(flip, s - 1 - x, x), torch.where(flip, s - 1 - y, y)
        x, y = torch.where(ry == 0, y, x), torch.where(ry == 0, x, y)
    return d

# Pixel order of the loop: order[new] = old pixel index, rank[old] = new index.
def pixel_order(resolution: int, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    i = torch.arange(resolution, device=device)[:, None]
    j = torch.arange(resolution, device=device)[None, :]
    key = hilbert_index(i, j)
    order = torch.argsort(key.reshape(-1))
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=device)
    return order, rank

# Rays of subset k of S (angles k, k + S, ...) in the loop's order: rays[new] =
# stored ray index (angle * n_bins + bin), along the Hilbert curve over
# (bin, angle index in the subset).
def subset_rays(system_matrix: SystemMatrix, k: int, n_subsets: int) -> torch.Tensor:
    dev = system_matrix.device
    angles = torch.arange(k, system_matrix.n_angles, n_subsets, device=dev)
    bins = torch.arange(system_matrix.n_bins, device=dev)
    key = hilbert_index(torch.arange(len(angles), device=dev)[None, :], bins[:, None])
    rays = (angles[None, :] * system_matrix.n_bins + bins[:, None]).reshape(-1)
    return rays[torch.argsort(key.reshape(-1))]

# Numbers of forward (pixel) and back-projection (ray) groups for a batch
# size and subset count (shape-dependent only).
def n_groups(system_matrix: SystemMatrix, batch: int, n_subsets: int = 1) -> tuple[int, int]:
    if system_matrix.device.type != 'cpu':
        return 1, 1
    row_bytes = batch * system_matrix.A.values().element_size()
    n_rays, n_pixels = system_matrix.shape
    count = lambda rows, most: max(1, min(-(-rows * row_bytes // BLOCK_BYTES), most))
    return count(n_pixels, n_pixels // MIN_GROUP_PIXELS), count(n_rays // n_subsets, system_matrix.n_bins)

# The loop's layout for S subsets, cached on the system matrix: the pixel
# order (order[new] = stored pixel, rank its inverse), the subsets' rays
# concatenated (rays[row] = stored ray: the rows of the loop's sinograms)
# and its inverse (slot[stored ray] = row).
def loop_layout(system_matrix: SystemMatrix, n_subsets: int) -> tuple[torch.Tensor, ...]:
    key = ('layout', n_subsets)
    if key not in system_matrix._derived:
        dev = system_matrix.device
        order, rank = pixel_order(system_matrix.resolution, dev)
        rays = torch.cat([subset_rays(system_matrix, k, n_subsets) for k in range(n_subsets)])
        slot = torch.empty_like(rays)
        slot[rays] = torch.arange(rays.numel(), device=dev)
        system_matrix._derived[key] = (order, rank, rays, slot)
    return system_matrix._derived[key]

#----------------------------------------------------------------------------
# Per-subset operators, cached on the system matrix, in the loop's pixel and
# ray orders (loop_layout): the subset's rays (subset_rays), the forward parts
# [(A_k[:, g], first pixel, last pixel + 1, uint16 columns or None)], the
# back-projection parts [(diag(1/s_k) A_k^T[:, h], first ray, last ray + 1,
# uint16 columns or None)] (see _column_parts), and the pixels that
# this subset does not see but others do (their update factor is 1). Every
# row's nonzeros are sorted by column (the order of the sums).

def subset_operators(system_matrix: SystemMatrix, n_subsets: int, groups: tuple[int, int] = (1, 1)) -> list[tuple]:
    key = ('subsets', n_subsets, tuple(groups))
    if key in system_matrix._derived:
        return system_matrix._derived[key]
    sm, dev = system_matrix, system_matrix.device
    n_rays, n_pixels = sm.shape
    order, rank, _, _ = loop_layout(sm, n_subsets)
    a_rows, a_cols, a_vals = csr_row_indices(sm.A), rank[sm.A.col_indices().long()], sm.A.values()
    seen = sm.sensitivity[order] > 0
    bounds = [round(g * n_pixels / groups[0]) for g in range(groups[0] + 1)]
    ops = []
    for k in range(n_subsets):
        rays = subset_rays(sm, k, n_subsets)
        n_local = rays.numel()
        local = torch.full((n_rays,), -1, dtype=torch.long, device=dev)
        local[rays] = torch.arange(n_local, device=dev)
        sel = local[a_rows] >= 0
        r, c, v = local[a_rows[sel]], a_cols[sel], a_vals[sel]
        s = torch.zeros(n_pixels, dtype=sm.dtype, device=dev).index_add_(0, c, v)     # s_k = A_k^T 1.
        inv_s = torch.where(s > 0, 1 / torch.where(s > 0, s, 1), 0)                     # Pixels no ray sees: set to 0.
        ray_bounds = [round(h * n_local / groups[1]) for h in range(groups[1] + 1)]
        parts, back = _column_parts(r, c, v, n_local, bounds), _column_parts(c, r, v * inv_s[c], n_pixels, ray_bounds)
        keep = ((s == 0) & seen).to(sm.dtype)[:, None]
        ops.append((rays, parts, back, keep if bool(keep.any()) else None))
    cached = [k for k in sm._derived if k[0] == 'subsets']
    for k in cached[:len(cached) - MAX_CACHED + 1]:                    # Bounded memory: drop the oldest.
        del sm._derived[k]
    sm._derived[key] = ops
    return ops

# A matrix given as COO triplets cut into column blocks:
# [(CSR of columns lo .. hi - 1, lo, hi, its column indices as uint16 for the
# C kernels or None)], rows' entries sorted by column.
def _column_parts(rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, n_rows: int, bounds: list[int]) -> list[tuple]:
    o = torch.argsort(rows * (bounds[-1] + 1) + cols)
    rows, cols, vals = rows[o], cols[o], vals[o]
    parts = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        m = (cols >= lo) & (cols < hi)
        crow = torch.zeros(n_rows + 1, dtype=torch.int32, device=vals.device)
        crow[1:] = torch.cumsum(torch.bincount(rows[m], minlength=n_rows), 0)
        csr = make_csr(crow, (cols[m] - lo).to(torch.int32), vals[m].contiguous(), (n_rows, hi - lo))
        parts.append((csr, lo, hi, native.narrow_columns(csr)))
    return parts

#----------------------------------------------------------------------------
# One iteration (all subsets) on torch's products, in place on x: the GPU
# path, and the CPU path without the fused kernels.

def _torch_iteration(ops: list[tuple], ys: list[torch.Tensor], fwd: list[torch.Tensor], x: torch.Tensor, upd: torch.Tensor, eps: float) -> None:
    for (_, parts, back, keep), yk, f in zip(ops, ys, fwd):
        for g, (part, lo, hi, _) in enumerate(parts):                       # A x = sum_g A[:, g] x[g]
            torch.addmm(f, part, x[lo:hi], beta=0 if g == 0 else 1, out=f)  # (addmm into f: mm(out=) would allocate, zero and copy a temporary)
        f.add_(eps)
        torch.div(yk, f, out=f)                                             # y / (A x + eps)
        for h, (part, lo, hi, _) in enumerate(back):                        # A^T(...) / s = sum_h (A^T / s)[:, h] f[h]
            torch.addmm(upd, part, f[lo:hi], beta=0 if h == 0 else 1, out=upd)
        if keep is not None:
            upd.add_(keep)                                                  # Pixels this subset does not see: factor 1.
        x.mul_(upd)

#----------------------------------------------------------------------------
# Batched MLEM / OSEM.

def mlem(
    sinograms:      torch.Tensor,               # Counts [B, n_angles, n_bins] or [B, 1, n_angles, n_bins].
    system_matrix:  SystemMatrix,               # The projector (its device and dtype are used).
    n_iter:         int = 50,                   # Iterations (full passes over all subsets); the reference uses 50.
    n_subsets:      int = 1,                    # 1 = MLEM; S > 1 = OSEM with S interleaved angle subsets.
    x0:             torch.Tensor | None = None, # Initial images [B, N, N] / [B, 1, N, N]; None = all ones (the reference).
    mask:           torch.Tensor | None = None, # [N, N] or [B, N, N]; pixels where it is 0 stay 0.
    eps:            float = 1e-12,              # Added to A x before dividing, eq. (2).
    callback:       Callable[[int, torch.Tensor], None] | None = None, # callback(it, x) after iteration it = 1..n_iter.
    adapt_threads:  bool = True,                # Fused CPU kernels: drop to 1 thread while that runs faster (busy cores).
) -> torch.Tensor:
    """Reconstruct a batch of sinograms with MLEM (or OSEM) and return the
    images [B, N, N] ([B, 1, N, N] for 4-D input), in the units of the counts
    per unit of A (counts per pixel for a column-normalised A).

    Pixels that no ray sees, pixels outside `mask` and pixels that are 0 in
    `x0` stay 0 (the update is multiplicative). `callback(it, images)`
    receives a new [B, N, N] tensor after every iteration (made only when a
    callback is given; it copies, so it costs a little). Bad input (wrong
    shapes, NaN, negative or all-zero counts) raises ValueError before any
    work is done.
    """
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 0:
        raise ValueError(f'n_iter must be a non-negative integer, got {n_iter!r}')
    if isinstance(n_subsets, bool) or not isinstance(n_subsets, int) or not 1 <= n_subsets <= system_matrix.n_angles:
        raise ValueError(f'n_subsets must be an integer in [1, n_angles={system_matrix.n_angles}], got {n_subsets!r}')
    if not eps >= 0:
        raise ValueError(f'eps must be non-negative, got {eps!r}')
    y = check_counts(sinograms, system_matrix)                              # [B, P]
    batch, n = y.shape[0], system_matrix.resolution
    sm, dev, dtype = system_matrix, system_matrix.device, system_matrix.dtype
    if x0 is not None:
        x0 = _check_image_arg(x0, sm, batch, 'x0', allow_shared=False)
    if mask is not None:
        mask = _check_image_arg(mask.to(dtype) if isinstance(mask, torch.Tensor) else mask, sm, batch, 'mask', allow_shared=True)
    kernels = native.mlem_kernels() if dev.type == 'cpu' and dtype in (torch.float32, torch.float64) else None
    ops = subset_operators(sm, n_subsets, n_groups(sm, batch, n_subsets))
    order, rank, rays, slot = loop_layout(sm, n_subsets)
    threads = torch.get_num_threads()

    # Loop state in the loop's pixel order, [n_pixels, B], updated in place.
    x = torch.ones(sm.shape[1], batch, dtype=dtype, device=dev) if x0 is None else x0[:, order].T.contiguous()
    if mask is not None:
        x.mul_((mask[:, order] != 0).T)
    if kernels is not None:                                                 # Sinograms in the loop's ray order, [P, B]
        y_loop = torch.empty(rays.numel(), batch, dtype=dtype)              # (torch's transposing copies are slower).
        kernels.columns_to_rows(y, slot, y_loop, threads)
    else:
        y_loop = y.T.index_select(0, rays)
    ys = list(y_loop.split([r.numel() for r, *_ in ops]))                   # One block of rows per subset.
    fwd = [torch.empty_like(yk) for yk in ys]                               # A x, then the ratio, in place.
    upd = torch.empty_like(x)                                               # The multiplicative update, or partial sums of it.
    def images() -> torch.Tensor:
        if kernels is None:
            return x.T[:, rank].reshape(batch, n, n)
        out = torch.empty(batch, n * n, dtype=dtype)
        kernels.rows_to_columns(x, order, out, threads)
        return out.reshape(batch, n, n)
    if kernels is not None:                                                 # One iteration's passes, one call per iteration:
        jobs = []                                                           # f = y / (A x + eps); x *= A^T f / s + keep
        for (_, parts, back, keep), yk, f in zip(ops, ys, fwd):
            jobs += [kernels.forward_job(part, x[lo:hi], yk, f, eps, accumulate=g > 0, finish=g == len(parts) - 1, cols16=cols16)
                for g, (part, lo, hi, cols16) in enumerate(parts)]
            jobs += [kernels.back_job(part, f[lo:hi], keep, x, upd, accumulate=h > 0, finish=h == len(back) - 1, cols16=cols16)
                for h, (part, lo, hi, cols16) in enumerate(back)]
        plan = kernels.plan(jobs)
    if kernels is not None:                                                 # Chunks of iterations, one call each, on
        after = None if callback is None else lambda it: callback(it, images()) # `threads` or 1 thread, whichever runs faster.
        kernels.run_iterations(plan, threads, n_iter, after, adaptive=adapt_threads)
    else:
        for it in range(1, n_iter + 1):
            _torch_iteration(ops, ys, fwd, x, upd, eps)
            if callback is not None:
                callback(it, images())
    out = images()
    return out[:, None] if sinograms.ndim == 4 else out

#----------------------------------------------------------------------------
# Poisson log-likelihood (1) of images given counts, without the constant
# -log(y!) term; one value per image, in float64.

def poisson_log_likelihood(sinograms: torch.Tensor, system_matrix: SystemMatrix, images: torch.Tensor) -> torch.Tensor:
    """Return sum_i [y_i log (A x)_i - (A x)_i] for every image of the batch."""
    y = system_matrix.check_sinograms(sinograms).double()
    ax = system_matrix.forward(images).reshape(y.shape).double()
    return (torch.xlogy(y, ax) - ax).sum(dim=1)

#----------------------------------------------------------------------------
