# medEDM: diffusion-model training toolkit for medical imaging.

"""MAP-EM with a quadratic smoothing prior (De Pierro 1995), batched: the
penalised-likelihood baseline of PET reconstruction.

Objective, maximised over x >= 0 (Poisson log-likelihood minus a penalty):

    Phi(x) = sum_i [y_i log (A x)_i - (A x)_i] - beta R(x)                    (1)
    R(x)   = 1/2 sum_{j < k neighbours} w_jk (x_j - x_k)^2                    (2)

over the 8-neighbourhood (w = 1 for edge neighbours, 1/sqrt(2) for diagonal
ones; no neighbours outside the image). One iteration maximises a
separable surrogate of (1) that touches it at the current image x^n, so
Phi never decreases (De Pierro, IEEE TMI 14(1), 1995):

  * the EM surrogate of the likelihood, s_j (x_EM_j log x_j - x_j) with
    s = A^T 1 and x_EM = x^n A^T(y / A x^n) / s (the MLEM update);
  * (x_j - x_k)^2 <= 1/2 (2 x_j - x_j^n - x_k^n)^2 + 1/2 (2 x_k - x_j^n - x_k^n)^2.

Setting the derivative of pixel j's surrogate to zero gives the positive
root of a x^2 + b x - c = 0 with

    a = 2 beta W_j,   b = s_j - beta sum_k w_jk (x_j^n + x_k^n),   c = s_j x_EM_j,   W_j = sum_k w_jk,

written x = 2c / (b + sqrt(b^2 + 4ac)) (no cancellation; with beta = 0 it
is c / s_j, the MLEM update, exactly; where c = 0 and b <= 0, max(0, -b/a)). Pixels that no ray sees stay 0, as
in mlem(). beta is one value or one per image, so a whole grid of prior
strengths runs as one batch (tuning on a validation split).
"""

from typing import Callable

import torch

from tomography_utils.mlem import _check_image_arg, check_counts, poisson_log_likelihood
from tomography_utils.projector import SystemMatrix

DIAGONAL = 2 ** -0.5 # Weight of a diagonal neighbour in (2).

#----------------------------------------------------------------------------
# The 8 neighbours of every pixel: sum_k w_jk x_k for a batch [B, N, N], and
# W_j = sum_k w_jk (pixels at the border have fewer neighbours).

def _offsets() -> list[tuple[int, int, float]]:
    return [(dy, dx, 1.0 if dy == 0 or dx == 0 else DIAGONAL) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]

def neighbour_sum(x: torch.Tensor) -> torch.Tensor:
    """sum_k w_jk x_k over the 8-neighbourhood of each pixel of x [B, N, N] (zero outside the image)."""
    n = x.shape[-1]
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    return sum(w * padded[..., 1 + dy:1 + dy + n, 1 + dx:1 + dx + n] for dy, dx, w in _offsets())

def neighbour_weights(n: int, dtype: torch.dtype, device) -> torch.Tensor:
    """W_j = sum_k w_jk [N, N]."""
    return neighbour_sum(torch.ones(1, n, n, dtype=dtype, device=device))[0]

def quadratic_penalty(images: torch.Tensor) -> torch.Tensor:
    """R(x) of (2) for every image of a batch [B, N, N] or [B, 1, N, N], in float64."""
    x = images.reshape(images.shape[0], *images.shape[-2:]).double()
    n = x.shape[-1]
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    diffs = [w * (x - padded[..., 1 + dy:1 + dy + n, 1 + dx:1 + dx + n]) ** 2 for dy, dx, w in _offsets()]
    inside = [w * torch.nn.functional.pad(torch.ones_like(x[:1]), (1, 1, 1, 1))[..., 1 + dy:1 + dy + n, 1 + dx:1 + dx + n]
        for dy, dx, w in _offsets()]
    total = sum(d * (m > 0) for d, m in zip(diffs, inside))                 # Neighbours inside the image only.
    return total.sum(dim=(1, 2)) / 4                                        # Each pair twice (j, k and k, j); 1/2 of (2).

def map_objective(sinograms: torch.Tensor, system_matrix: SystemMatrix, images: torch.Tensor, beta: float | torch.Tensor) -> torch.Tensor:
    """Phi(x) of (1) for every image, in float64 (without the constant -log y!)."""
    beta = torch.as_tensor(beta, dtype=torch.float64).reshape(-1)
    return poisson_log_likelihood(sinograms, system_matrix, images) - beta * quadratic_penalty(images)

#----------------------------------------------------------------------------
# Batched MAP-EM.

def _check_beta(beta: float | torch.Tensor, batch: int) -> torch.Tensor:
    b = torch.as_tensor(beta, dtype=torch.float64).reshape(-1)
    if b.numel() not in (1, batch) or not bool(torch.isfinite(b).all()) or bool((b < 0).any()):
        raise ValueError(f'beta must be a non-negative number or one non-negative number per image ({batch}), got {beta!r}')
    return b.expand(batch)

def map_em(
    sinograms:      torch.Tensor,               # Counts [B, n_angles, n_bins] or [B, 1, n_angles, n_bins].
    system_matrix:  SystemMatrix,               # The projector (its device and dtype are used).
    beta:           float | torch.Tensor,       # Prior strength, eq. (1): one value or one per image; 0 = MLEM.
    n_iter:         int = 50,                   # Iterations.
    x0:             torch.Tensor | None = None, # Initial images [B, N, N] / [B, 1, N, N]; None = all ones (as mlem()).
    eps:            float = 1e-12,              # Added to A x before dividing.
    callback:       Callable[[int, torch.Tensor], None] | None = None, # callback(it, x) after iteration it = 1..n_iter.
) -> torch.Tensor:
    """Reconstruct a batch of sinograms with De Pierro's MAP-EM for the
    quadratic prior (2) and return the images [B, N, N] ([B, 1, N, N] for
    4-D input), in the units of mlem(). Bad input raises ValueError."""
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 0:
        raise ValueError(f'n_iter must be a non-negative integer, got {n_iter!r}')
    if not eps >= 0:
        raise ValueError(f'eps must be non-negative, got {eps!r}')
    sm, n = system_matrix, system_matrix.resolution
    y = check_counts(sinograms, sm).reshape(-1, sm.n_angles, sm.n_bins)
    batch = y.shape[0]
    beta = _check_beta(beta, batch).to(device=sm.device, dtype=sm.dtype).reshape(batch, 1, 1)
    s = sm.sensitivity.reshape(n, n)
    seen = s > 0
    x = torch.ones(batch, n, n, dtype=sm.dtype, device=sm.device) if x0 is None else \
        _check_image_arg(x0, sm, batch, 'x0', allow_shared=False).reshape(batch, n, n).clone()
    x = x * seen
    weights = neighbour_weights(n, sm.dtype, sm.device)                     # W_j
    a = 2 * beta * weights                                                  # [B, N, N]
    for it in range(1, n_iter + 1):
        c = x * sm.back(y / (sm.forward(x) + eps))                          # s_j x_EM_j
        b = s - beta * (weights * x + neighbour_sum(x))
        den = b + torch.sqrt(b * b + 4 * a * c)
        root = torch.where(den > 0, 2 * c / den, (-b / a).clamp(min=0))     # den = 0: c = 0 and b <= 0 (rays of j all
        x = torch.where(seen, root, torch.zeros_like(c))                    # empty): the surrogate peaks at -b / a >= 0.
        if callback is not None:
            callback(it, x.clone())
    return x[:, None] if sinograms.ndim == 4 else x

#----------------------------------------------------------------------------
