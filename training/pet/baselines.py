# medEDM: diffusion-model training toolkit for medical imaging.

"""Classical baselines of PET dose enhancement, each with one parameter tuned
on the validation split on a fine grid, separately for every metric,
reference and region (the most favourable choice for the baseline):

  gauss      Gaussian post-filter of the low-dose MLEM, width sigma (pixels).
  mlem_early MLEM of the low-dose counts stopped early, iteration count.
  map_em     MAP-EM with a quadratic prior (tomography_utils/mapem.py), strength beta
             (in the units of the low-dose counts per pixel of a column-normalised A).

Candidates are scored on the validation split; on the test split only the
chosen parameters are computed. Both in full-dose counts per pixel
(reconstructions of the low-dose counts are divided by the dose fraction, as
`low` in the npz)."""

from typing import Callable

import numpy as np
import torch
from scipy import ndimage

from tomography_utils import mapem
from tomography_utils.mlem import mlem

GAUSS_SIGMAS = tuple(round(0.05 * i, 2) for i in range(61))          # 0, 0.05, ..., 3 px.
MAP_BETAS    = tuple(float(10 ** (0.1 * e)) for e in range(-75, -4))  # 3e-8 ... 0.3, 10 per decade (the demo's optimum: 3e-5).

#----------------------------------------------------------------------------
# Candidates of one split, one parameter at a time: consume(parameter, images
# [N, 1, R, R]) in grid order. The caller keeps what it needs (the scores of the
# validation candidates, the test images of the chosen parameters), so memory
# holds the candidates of one batch, not the whole grid (71 MAP-EM strengths of
# 200 images at 128 x 128 are 1.9 GB in float64).

Consume = Callable[[object, np.ndarray], None]

def gaussian(images: np.ndarray, sigma: float) -> np.ndarray:
    return images if sigma == 0 else ndimage.gaussian_filter(images, sigma=(0, 0, sigma, sigma))

def gauss_candidates(split: dict, consume: Consume, sigmas=GAUSS_SIGMAS) -> None:
    for s in sigmas:
        consume(s, gaussian(split['low'], s))

def mlem_early_candidates(split: dict, system_matrix, consume: Consume, iterations) -> None:
    """MLEM of the low-dose counts stopped after each of `iterations` (one run up to the last, read by a callback)."""
    keep = sorted(set(int(i) for i in iterations))
    y = torch.as_tensor(split['low_counts'], dtype=system_matrix.dtype)
    def callback(it, x):
        if it in keep:
            consume(it, x[:, None].double().numpy() / split['dose_fraction'])
    mlem(y, system_matrix, n_iter=keep[-1], callback=callback)

def map_em_candidates(split: dict, system_matrix, n_iter: int, consume: Consume, betas=MAP_BETAS, batch: int = 512) -> None:
    """MAP-EM images for every beta of `betas` (images x betas in batches of `batch`; a beta is handed on once all its images are done)."""
    y = torch.as_tensor(split['low_counts'], dtype=system_matrix.dtype)
    n = len(y)
    pairs = [(b, i) for b in range(len(betas)) for i in range(n)]
    pending = {}
    for start in range(0, len(pairs), batch):
        chunk = pairs[start:start + batch]
        idx = torch.as_tensor([i for _, i in chunk])
        beta = torch.as_tensor([betas[b] for b, _ in chunk], dtype=torch.float64)
        x = mapem.map_em(y[idx], system_matrix, beta, n_iter=n_iter).double().numpy() / split['dose_fraction']
        for (b, i), img in zip(chunk, x):
            if b not in pending:
                pending[b] = np.empty((n, 1, *split['low'].shape[-2:]))
            pending[b][i, 0] = img
        for b in sorted(pending):
            if b < chunk[-1][0] or chunk[-1] == (b, n - 1):                 # Every image of this beta is done.
                consume(betas[b], pending.pop(b))

#----------------------------------------------------------------------------
# An oracle bound, not a method: the conditional mean of the full-dose MLEM
# given the low-dose counts AND the phantom. Binomial thinning (dose.py, eq. 3)
# makes y_full - y_low ~ Poisson((1 - f) ybar) independent of y_low, so
#   E[MLEM(y_full) | y_low, phantom] ~ mean_k MLEM(y_low + r_k),  r_k ~ Poisson((1 - f) ybar),
# with ybar = A phantom_counts (column-normalised A). No estimator of the
# full-dose MLEM from the low-dose data alone has a lower expected MSE (it
# knows less), so this is a ceiling in MSE against the full-dose MLEM (roughly
# in PSNR; not in SSIM); knowing the phantom, it may lie above what any method
# can reach (with K draws its MSE is about 1 + 1/K times the exact mean's).

def oracle_full_dose_mean(split: dict, system_matrix, draws: int = 32, seed: int = 0, batch: int = 512) -> np.ndarray:
    """The oracle conditional mean [N, 1, R, R] of the full-dose MLEM, in counts per pixel (n_iter of the split)."""
    if not (isinstance(draws, int) and draws >= 1):
        raise ValueError(f'draws must be a positive integer, got {draws!r}')
    low = torch.as_tensor(split['low_counts'], dtype=system_matrix.dtype)
    n = len(low)
    ybar = system_matrix.forward(torch.as_tensor(split['phantom_counts'][:, 0])).double()
    rest = (1 - split['dose_fraction']) * ybar
    gen = torch.Generator().manual_seed(seed)
    total = torch.zeros(n, *split['low'].shape[-2:], dtype=torch.float64)
    per_call = max(1, batch // n)                                           # Draws per MLEM call (whole draws of every image).
    for start in range(0, draws, per_call):
        k = min(per_call, draws - start)
        y = low.repeat(k, 1, 1) + torch.poisson(rest.repeat(k, 1, 1), generator=gen).to(low.dtype)
        total += mlem(y, system_matrix, n_iter=split['n_iter']).double().reshape(k, n, *total.shape[1:]).sum(0)
    return (total / draws)[:, None].numpy()

#----------------------------------------------------------------------------
# Tuning: the parameter with the best mean validation score, per key.

def tune(val_scores: dict, higher_is_better: bool) -> tuple[object, bool]:
    """val_scores: {parameter: mean score}, parameters in grid order. Returns (best parameter,
    whether it lies at an end of the grid: then the grid may be too narrow)."""
    pick = max if higher_is_better else min
    best = pick(val_scores, key=val_scores.get)
    grid = list(val_scores)
    return best, best in (grid[0], grid[-1]) and len(grid) > 2

#----------------------------------------------------------------------------
