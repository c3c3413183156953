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
is a single sparse-dense product (torch CSR, int32 indices) for the whole
batch. The factor 1/s is folded into a pre-scaled copy of A^T, the loop
writes into preallocated buffers in place, and nothing in it synchronises
with the host (no .item(), no data-dependent branches), so on a GPU the
iterations queue without stalls. Inputs are checked once, before the loop.
"""

from typing import Callable

import torch

from tomography_utils.projector import SystemMatrix, csr_from_coo, csr_row_indices, make_csr

#----------------------------------------------------------------------------
# Check a batch of sinograms: shape, finite, non-negative, non-empty.
# Returns them as Y [n_rays, B] in the matrix's dtype.

def check_counts(sinograms: torch.Tensor, system_matrix: SystemMatrix, name: str = 'sinograms') -> torch.Tensor:
    """Validate measured counts and return them as Y [n_rays, B]; ValueError on bad input."""
    flat = system_matrix.check_sinograms(sinograms, name)
    if flat.device != system_matrix.device:
        raise ValueError(f'{name} are on {flat.device} but the system matrix is on {system_matrix.device}; '
            f'move one of them (SystemMatrix.to(device))')
    if flat.shape[0] == 0:
        raise ValueError(f'{name} is an empty batch (shape {tuple(sinograms.shape)})')
    if flat.is_floating_point() and not bool(torch.isfinite(flat).all()):
        raise ValueError(f'{name} contain NaN or infinite values; counts must be finite and non-negative')
    if bool((flat < 0).any()):
        raise ValueError(f'{name} contain negative values (minimum {flat.min().item():g}); counts must be non-negative')
    totals = flat.sum(dim=1, dtype=torch.float64)
    if bool((totals == 0).any()):
        i = int(torch.nonzero(totals == 0)[0, 0])
        raise ValueError(f'{name}[{i}] has zero total counts: an empty acquisition has no MLEM reconstruction '
            f'(every image explains it equally well)')
    return flat.to(system_matrix.dtype).T.contiguous()

#----------------------------------------------------------------------------
# Check an image-shaped input (initial image or mask); returns [n_pixels, B] or [n_pixels, 1].

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
    return flat.T.contiguous()

#----------------------------------------------------------------------------
# Per-subset operators, cached on the system matrix: the row index of the
# subset's rays (None for all rays), A_k, the back-projector diag(1/s_k) A_k^T,
# and the pixels that subset does not see but others do (kept unchanged).

def subset_operators(system_matrix: SystemMatrix, n_subsets: int) -> list[tuple]:
    key = ('subsets', n_subsets)
    if key in system_matrix._derived:
        return system_matrix._derived[key]
    sm, dev = system_matrix, system_matrix.device
    seen = sm.sensitivity > 0
    ops = []
    for k in range(n_subsets):
        if n_subsets == 1:
            rows, a, at = None, sm.A, sm.AT
        else: # Rows of angles k, k + S, ...: contiguous blocks of n_bins rows each.
            angles = torch.arange(k, sm.n_angles, n_subsets, device=dev)
            rows = (angles[:, None] * sm.n_bins + torch.arange(sm.n_bins, device=dev)).reshape(-1)
            crow = sm.A.crow_indices().long()
            start, count = crow[rows], crow[rows + 1] - crow[rows]
            new_crow = torch.zeros(rows.numel() + 1, dtype=torch.long, device=dev)
            new_crow[1:] = torch.cumsum(count, 0)
            pos = torch.repeat_interleave(start - new_crow[:-1], count) + torch.arange(int(new_crow[-1]), device=dev)
            a = make_csr(new_crow.to(torch.int32), sm.A.col_indices()[pos], sm.A.values()[pos], (rows.numel(), sm.shape[1]))
            at = csr_from_coo(a.col_indices(), csr_row_indices(a), a.values(), (sm.shape[1], rows.numel()))
        s = torch.zeros(sm.shape[1], dtype=sm.dtype, device=dev).index_add_(0, a.col_indices().long(), a.values())
        inv_s = torch.where(s > 0, 1 / torch.where(s > 0, s, 1), 0)     # Pixels no ray sees: set to 0.
        back = make_csr(at.crow_indices(), at.col_indices(), at.values() * inv_s[csr_row_indices(at)], at.shape)
        keep = ((s == 0) & seen).to(sm.dtype)[:, None]
        ops.append((rows, a, back, keep if bool(keep.any()) else None))
    system_matrix._derived[key] = ops
    return ops

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
) -> torch.Tensor:
    """Reconstruct a batch of sinograms with MLEM (or OSEM) and return the
    images [B, N, N] ([B, 1, N, N] for 4-D input), in the units of the counts
    per unit of A (counts per pixel for a column-normalised A).

    Pixels that no ray sees, pixels outside `mask` and pixels that are 0 in
    `x0` stay 0 (the update is multiplicative). `callback` receives a
    read-only view of the current images [B, N, N]; clone it to keep it.
    Bad input (wrong shapes, NaN, negative or all-zero counts) raises
    ValueError before any work is done.
    """
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 0:
        raise ValueError(f'n_iter must be a non-negative integer, got {n_iter!r}')
    if isinstance(n_subsets, bool) or not isinstance(n_subsets, int) or not 1 <= n_subsets <= system_matrix.n_angles:
        raise ValueError(f'n_subsets must be an integer in [1, n_angles={system_matrix.n_angles}], got {n_subsets!r}')
    if not eps >= 0:
        raise ValueError(f'eps must be non-negative, got {eps!r}')
    y = check_counts(sinograms, system_matrix)                              # [P, B]
    batch, n = y.shape[1], system_matrix.resolution
    if x0 is None:
        x = torch.ones(system_matrix.shape[1], batch, dtype=system_matrix.dtype, device=system_matrix.device)
    else:
        x = _check_image_arg(x0, system_matrix, batch, 'x0', allow_shared=False)
    if mask is not None:
        x.mul_(_check_image_arg(mask.to(system_matrix.dtype) if isinstance(mask, torch.Tensor) else mask,
            system_matrix, batch, 'mask', allow_shared=True) != 0)

    ops = subset_operators(system_matrix, n_subsets)
    ys = [y if rows is None else y.index_select(0, rows) for rows, *_ in ops]
    fwd = [torch.empty_like(yk) for yk in ys]                               # A_k x, then the ratio, in place.
    upd = torch.empty_like(x)                                               # The multiplicative update.
    view = x.T.view(batch, n, n)
    for it in range(1, n_iter + 1):
        for (rows, a, back, keep), yk, f in zip(ops, ys, fwd):
            torch.mm(a, x, out=f)                                           # A x
            f.add_(eps)
            torch.div(yk, f, out=f)                                         # y / (A x + eps)
            torch.mm(back, f, out=upd)                                      # A^T(...) / s
            if keep is not None:
                upd.add_(keep)                                              # Pixels this subset does not see: factor 1.
            x.mul_(upd)
        if callback is not None:
            callback(it, view)
    out = x.T.reshape(batch, n, n).contiguous()
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
