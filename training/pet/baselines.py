# medEDM: diffusion-model training toolkit for medical imaging.

"""Classical baselines of PET dose enhancement, each with one parameter tuned
on the validation split on a fine grid, separately for every metric,
reference and region (the most favourable choice for the baseline):

  gauss      Gaussian post-filter of the low-dose MLEM, width sigma (pixels).
  mlem_early MLEM of the low-dose counts stopped early, iteration count.
  map_em     MAP-EM with a quadratic prior (tomography_utils/mapem.py), strength beta
             (in the units of the low-dose counts per pixel of a column-normalised A).

Every candidate is computed for the validation and the test split alike,
in full-dose counts per pixel (reconstructions of the low-dose counts are
divided by the dose fraction, as `low` in the npz)."""

import numpy as np
import torch
from scipy import ndimage

from tomography_utils import mapem
from tomography_utils.mlem import mlem

GAUSS_SIGMAS = tuple(round(0.05 * i, 2) for i in range(61))          # 0, 0.05, ..., 3 px.
MAP_BETAS    = tuple(float(10 ** (0.1 * e)) for e in range(-75, -4))  # 3e-8 ... 0.3, 10 per decade (the demo's optimum: 3e-5).

#----------------------------------------------------------------------------
# Candidates: {parameter: images [N, 1, R, R]} of one split.

def gaussian(images: np.ndarray, sigma: float) -> np.ndarray:
    return images if sigma == 0 else ndimage.gaussian_filter(images, sigma=(0, 0, sigma, sigma))

def gauss_candidates(split: dict, sigmas=GAUSS_SIGMAS) -> dict:
    return {s: gaussian(split['low'], s) for s in sigmas}

def mlem_early_candidates(split: dict, system_matrix, n_iter: int) -> dict:
    """MLEM of the low-dose counts after 1..n_iter iterations (one run, read by a callback)."""
    out = {}
    y = torch.as_tensor(split['low_counts'], dtype=system_matrix.dtype)
    mlem(y, system_matrix, n_iter=n_iter, callback=lambda it, x: out.__setitem__(it, x[:, None].double().numpy() / split['dose_fraction']))
    return out

def map_em_candidates(split: dict, system_matrix, n_iter: int, betas=MAP_BETAS, batch: int = 512) -> dict:
    """MAP-EM images for every beta of the grid (images x betas in batches of `batch`)."""
    y = torch.as_tensor(split['low_counts'], dtype=system_matrix.dtype)
    n = len(y)
    pairs = [(b, i) for b in range(len(betas)) for i in range(n)]
    images = np.empty((len(betas), n, 1, *split['low'].shape[-2:]))
    for start in range(0, len(pairs), batch):
        chunk = pairs[start:start + batch]
        idx = torch.as_tensor([i for _, i in chunk])
        beta = torch.as_tensor([betas[b] for b, _ in chunk], dtype=torch.float64)
        x = mapem.map_em(y[idx], system_matrix, beta, n_iter=n_iter).double().numpy() / split['dose_fraction']
        for (b, i), img in zip(chunk, x):
            images[b, i, 0] = img
    return {beta: images[b] for b, beta in enumerate(betas)}

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
