# medEDM: diffusion-model training toolkit for medical imaging.

"""Full-dose and low-dose PET acquisitions simulated from phantoms.

For a batch of activity phantoms phi [B, N, N] (any non-negative scale):

    ybar  = A phi * total_counts / sum(A phi)      expected counts, per image     (1)
    y_full ~ Poisson(ybar)                         full-dose acquisition           (2)
    y_low  ~ Binomial(y_full, f)                   low dose = thinning of (2)       (3)

(3) keeps each detected event with probability f, as if the scan were f times
as long: y_low ~ Poisson(f ybar), and y_low <= y_full on every ray. This is the
PET reference project's simulation (1e6 counts, f = 0.25: 5 min out of 20).

Units. An MLEM reconstruction with a column-normalised A is in counts per
pixel of its own acquisition (its pixels sum to the acquisition's counts).
The low-dose reconstruction is returned multiplied by 1/f, i.e. in full-dose
counts per pixel, so full-dose and low-dose images are on the same scale and
both estimate `phantom_counts(...)`, the phantom in those units. This
differs from the reference, which normalised each reconstruction by its own
maximum (x / (max x / 2) - 1): that loses the absolute scale and ties the
scale of the condition to its noisiest pixel; apply any per-image intensity
normalisation downstream, explicitly.

Other pitfalls of the reference that this module avoids: the total counts
are per image (as in the reference) but explicit here, as a number or one
value per image; an all-zero phantom is refused instead of giving NaN; the
random streams come from a caller-supplied torch.Generator (on the matrix's
device), so a simulation is reproducible; nothing assumes 64 x 64.
"""

import torch

from tomography_utils.mlem import mlem
from tomography_utils.projector import SystemMatrix

#----------------------------------------------------------------------------
# Per-image factor that turns A phi into expected counts, eq. (1).

def _count_scale(phantoms: torch.Tensor, system_matrix: SystemMatrix, total_counts: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = system_matrix.check_images(phantoms, 'phantoms')
    if flat.device != system_matrix.device:
        raise ValueError(f'phantoms are on {flat.device} but the system matrix is on {system_matrix.device}')
    if not bool(torch.isfinite(flat).all()) or bool((flat < 0).any()):
        raise ValueError('phantoms must be finite and non-negative (activity concentrations)')
    total = torch.as_tensor(total_counts, dtype=torch.float64, device=flat.device).reshape(-1)
    if total.numel() not in (1, flat.shape[0]) or not bool(torch.isfinite(total).all()) or bool((total <= 0).any()):
        raise ValueError(f'total_counts must be a positive number or one positive number per image, got {total_counts!r}')
    ybar = system_matrix.forward(phantoms).double()
    sums = ybar.sum(dim=(1, 2))
    if bool((sums == 0).any()):
        i = int(torch.nonzero(sums == 0)[0, 0])
        raise ValueError(f'phantoms[{i}] has no activity seen by the scanner (its sinogram is all zero); '
            f'it cannot be scaled to {total_counts!r} counts')
    return ybar, total / sums

#----------------------------------------------------------------------------
# Expected counts (noise-free sinograms) of phantoms, eq. (1).

def expected_counts(
    phantoms:       torch.Tensor,               # Activity [B, N, N] or [B, 1, N, N], non-negative.
    system_matrix:  SystemMatrix,               # The projector.
    total_counts:   float | torch.Tensor = 1e6, # Expected total counts per image (the reference: 1e6).
) -> torch.Tensor:
    """Return ybar [B, n_angles, n_bins] with sum(ybar[b]) == total_counts, in the matrix's dtype."""
    ybar, scale = _count_scale(phantoms, system_matrix, total_counts)
    return (ybar * scale[:, None, None]).to(system_matrix.dtype)

# The phantom in the units of a full-dose reconstruction (counts per pixel),
# the image that full- and (rescaled) low-dose reconstructions estimate.
def phantom_counts(phantoms: torch.Tensor, system_matrix: SystemMatrix, total_counts: float | torch.Tensor = 1e6) -> torch.Tensor:
    """Return phi * total_counts / sum(A phi), shaped [B, N, N], in the matrix's dtype."""
    _, scale = _count_scale(phantoms, system_matrix, total_counts)
    flat = system_matrix.check_images(phantoms, 'phantoms')
    n = system_matrix.resolution
    return (flat.double() * scale[:, None]).reshape(-1, n, n).to(system_matrix.dtype)

#----------------------------------------------------------------------------
# Poisson counts, eq. (2), and binomial thinning, eq. (3).

def poisson_counts(expected: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw Poisson counts with the given means (same shape, same dtype)."""
    if not bool(torch.isfinite(expected).all()) or bool((expected < 0).any()):
        raise ValueError('expected counts must be finite and non-negative')
    return torch.poisson(expected, generator=generator)

def thin_counts(counts: torch.Tensor, dose_fraction: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Keep every event of `counts` independently with probability `dose_fraction`."""
    if not 0 < dose_fraction <= 1:
        raise ValueError(f'dose_fraction must be in (0, 1], got {dose_fraction!r}')
    if not counts.is_floating_point():
        counts = counts.to(torch.get_default_dtype())
    if not bool(torch.isfinite(counts).all()) or bool((counts < 0).any()) or bool((counts != counts.round()).any()):
        raise ValueError('counts must be non-negative integers')
    prob = torch.full_like(counts, dose_fraction)
    return torch.binomial(counts, prob, generator=generator)

#----------------------------------------------------------------------------
# Full-dose and low-dose acquisitions and their MLEM reconstructions.

def simulate_dose(
    phantoms:       torch.Tensor,               # Activity [B, N, N] or [B, 1, N, N], non-negative.
    system_matrix:  SystemMatrix,               # The projector (column-normalised for counts-per-pixel units).
    total_counts:   float | torch.Tensor = 1e6, # Expected full-dose counts per image (the reference: 1e6).
    dose_fraction:  float = 0.25,               # Low dose / full dose (the reference: 0.25).
    n_iter:         int = 50,                   # MLEM iterations for both reconstructions (the reference: 50).
    n_subsets:      int = 1,                    # OSEM subsets (1 = MLEM, as the reference).
    mask:           torch.Tensor | None = None, # Optional reconstruction support, see mlem().
    generator:      torch.Generator | None = None, # Random stream on the matrix's device; seed it for reproducibility.
    index_offset:   int = 0,                    # Index of phantoms[0] in error messages (a caller's batch of a larger set).
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Simulate and reconstruct a full-dose and a low-dose acquisition of
    every phantom. Returns (full_recon [B, N, N], low_recon [B, N, N],
    full_counts [B, n_angles, n_bins], low_counts [B, n_angles, n_bins]).

    full_recon is in counts per pixel of the full-dose acquisition; low_recon
    is the low-dose reconstruction divided by `dose_fraction`, i.e. in the
    same full-dose units (both estimate `phantom_counts(phantoms, ...)`).
    Both batches are reconstructed in one MLEM call (2B columns)."""
    ybar = expected_counts(phantoms, system_matrix, total_counts)
    full = poisson_counts(ybar, generator)
    low = thin_counts(full, dose_fraction, generator)
    for name, counts in (('full-dose', full), ('low-dose', low)):               # MLEM would refuse them: say which and why.
        empty = counts.reshape(counts.shape[0], -1).amax(dim=1) == 0
        if bool(empty.any()):
            i = int(torch.nonzero(empty)[0, 0])
            raise ValueError(f'phantoms[{index_offset + i}]: its simulated {name} acquisition has zero counts (total_counts='
                f'{float(total_counts) if torch.as_tensor(total_counts).numel() == 1 else "per image"}, dose_fraction={dose_fraction}); '
                f'an empty acquisition has no MLEM reconstruction, raise total_counts')
    recon = mlem(torch.cat([full, low]), system_matrix, n_iter=n_iter, n_subsets=n_subsets,
        mask=mask if mask is None or mask.ndim == 2 else torch.cat([mask, mask]))
    batch = full.shape[0]
    return recon[:batch], recon[batch:] / dose_fraction, full, low

#----------------------------------------------------------------------------
