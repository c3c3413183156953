# medEDM tests: full-dose / low-dose simulation (counts, thinning, determinism, units, bad input).

import re

import pytest
import torch

from tomography_utils import dose, projector

#----------------------------------------------------------------------------

# Small problems: one thread (fixture in conftest.py).
pytestmark = pytest.mark.usefixtures('one_thread')

@pytest.fixture(scope='module')
def sm():
    return projector.get_system_matrix(24, cache_dir=None)

def phantoms(batch: int = 4, n: int = 24, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    c = torch.arange(n) + 0.5 - n / 2
    yy, xx = torch.meshgrid(-c, c, indexing='ij')
    disk = ((xx ** 2 + yy ** 2) < (0.4 * n) ** 2).float()
    return disk * (0.5 + torch.rand(batch, n, n, generator=gen))     # Different total activity per image.

#----------------------------------------------------------------------------

def test_expected_counts_sum_to_total(sm):
    ybar = dose.expected_counts(phantoms(), sm, total_counts=1e6)
    assert ybar.shape == (4, 48, 24) and ybar.dtype == torch.float32
    assert torch.allclose(ybar.double().sum(dim=(1, 2)), torch.full((4,), 1e6, dtype=torch.float64), rtol=1e-6)
    per_image = torch.tensor([1e3, 1e4, 1e5, 1e6])
    ybar = dose.expected_counts(phantoms(), sm, total_counts=per_image)
    assert torch.allclose(ybar.double().sum(dim=(1, 2)), per_image.double(), rtol=1e-6)
    # The phantom in counts per pixel projects onto the expected counts (A^T 1 = 1: pixel sums equal count sums).
    phi = dose.phantom_counts(phantoms(), sm, total_counts=per_image)
    assert torch.allclose(sm.forward(phi), ybar, rtol=1e-4, atol=1e-3)

def test_poisson_counts_total_in_expectation(sm):
    total = 1e5
    counts = dose.poisson_counts(dose.expected_counts(phantoms(64), sm, total), torch.Generator().manual_seed(0))
    assert bool((counts == counts.round()).all()) and bool((counts >= 0).all())
    sums = counts.double().sum(dim=(1, 2))                               # Each ~ Poisson(total): sd = sqrt(total).
    assert (sums.mean() - total).abs() < 5 * (total / 64) ** 0.5
    assert (sums.std() / total ** 0.5 - 1).abs() < 0.3

def test_binomial_thinning(sm):
    gen = torch.Generator().manual_seed(1)
    full = dose.poisson_counts(dose.expected_counts(phantoms(8), sm, 1e6), gen)
    low = dose.thin_counts(full, 0.25, gen)
    assert bool((low <= full).all()) and bool((low >= 0).all()) and bool((low == low.round()).all())
    n = full.double().sum()
    frac = low.double().sum() / n                                       # Binomial(n, 0.25) / n: sd = sqrt(0.25 * 0.75 / n).
    assert (frac - 0.25).abs() < 5 * (0.25 * 0.75 / n) ** 0.5
    assert torch.equal(dose.thin_counts(full, 1.0, gen), full)
    assert torch.equal(dose.thin_counts(full.long(), 0.5, torch.Generator().manual_seed(2)),
        dose.thin_counts(full, 0.5, torch.Generator().manual_seed(2)))

def test_simulation_is_deterministic_with_a_seeded_generator(sm):
    run = lambda seed: dose.simulate_dose(phantoms(3), sm, total_counts=1e5, n_iter=5, generator=torch.Generator().manual_seed(seed))
    a, b, c = run(7), run(7), run(8)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[2], c[2]) and not torch.equal(a[3], c[3])

def test_simulate_dose_units(sm):
    ph = phantoms(4)
    full_recon, low_recon, full, low = dose.simulate_dose(ph, sm, total_counts=1e6, dose_fraction=0.25, n_iter=30,
        generator=torch.Generator().manual_seed(0))
    assert full_recon.shape == low_recon.shape == (4, 24, 24) and full.shape == low.shape == (4, 48, 24)
    # Counts per pixel: a recon sums to its acquisition's counts; the low-dose
    # recon is rescaled by 1 / fraction to full-dose units.
    assert torch.allclose(full_recon.double().sum(dim=(1, 2)), full.double().sum(dim=(1, 2)), rtol=1e-4)
    assert torch.allclose(low_recon.double().sum(dim=(1, 2)), low.double().sum(dim=(1, 2)) / 0.25, rtol=1e-4)
    truth = dose.phantom_counts(ph, sm, total_counts=1e6)
    err = lambda x: ((x - truth).norm(dim=(1, 2)) / truth.norm(dim=(1, 2)))
    assert bool((err(full_recon) < err(low_recon)).all())             # Less dose, more noise.
    assert bool((err(low_recon) < 0.5).all())

#----------------------------------------------------------------------------
# Bad input: exact messages.

def test_bad_input(sm):
    ph = phantoms(2)
    ph[1] = 0
    with pytest.raises(ValueError, match=re.escape('phantoms[1] has no activity seen by the scanner (its sinogram is all zero); '
            'it cannot be scaled to 1000000.0 counts')):
        dose.expected_counts(ph, sm, total_counts=1e6)
    with pytest.raises(ValueError, match=re.escape('phantoms must be finite and non-negative (activity concentrations)')):
        dose.expected_counts(-phantoms(2), sm)
    with pytest.raises(ValueError, match=re.escape('phantoms shape (2, 24, 23) does not match the system matrix: expected [B, 24, 24] or [B, 1, 24, 24]')):
        dose.simulate_dose(torch.ones(2, 24, 23), sm)
    with pytest.raises(ValueError, match=re.escape('total_counts must be a positive number or one positive number per image, got 0')):
        dose.expected_counts(phantoms(2), sm, total_counts=0)
    with pytest.raises(ValueError, match=re.escape('dose_fraction must be in (0, 1], got 1.5')):
        dose.thin_counts(torch.ones(3), 1.5)
    with pytest.raises(ValueError, match=re.escape('counts must be non-negative integers')):
        dose.thin_counts(torch.tensor([1.5]), 0.5)
    # An acquisition can be empty at very low counts: said before MLEM, naming the phantom (offset by index_offset) and the dose.
    with pytest.raises(ValueError, match=re.escape('phantoms[5]: its simulated low-dose acquisition has zero counts (total_counts=2.0, '
            'dose_fraction=0.01); an empty acquisition has no MLEM reconstruction, raise total_counts')):
        dose.simulate_dose(phantoms(1), sm, total_counts=2, dose_fraction=0.01, n_iter=1, generator=torch.Generator().manual_seed(0), index_offset=5)
    with pytest.raises(ValueError, match=re.escape('phantoms[0]: its simulated full-dose acquisition has zero counts (total_counts=0.001')):
        dose.simulate_dose(phantoms(1), sm, total_counts=1e-3, n_iter=1, generator=torch.Generator().manual_seed(0))

#----------------------------------------------------------------------------
