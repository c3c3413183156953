# medEDM tests: the PET baselines of evaluate.py pet (training/pet/baselines.py):
# tuning, early-stopped MLEM and batched MAP-EM candidates against direct calls.

import numpy as np
import pytest
import torch

from tomography_utils import mapem, projector
from tomography_utils.mlem import mlem
from training.pet import baselines

pytestmark = pytest.mark.usefixtures('one_thread')

@pytest.fixture(scope='module')
def split():
    sm = projector.get_system_matrix(16, cache_dir=None)
    gen = torch.Generator().manual_seed(0)
    phantoms = torch.rand(3, 16, 16, generator=gen) * (torch.arange(16)[:, None] % 5 < 3)
    counts = torch.poisson(sm.forward(phantoms) * 40, generator=gen)
    return sm, dict(low_counts=counts.double().numpy(), dose_fraction=0.25, low=np.zeros((3, 1, 16, 16)))

def test_tune_picks_the_best_and_flags_the_grid_ends():
    assert baselines.tune({0.1: 1.0, 0.2: 3.0, 0.3: 2.0}, True) == (0.2, False)
    assert baselines.tune({0.1: 1.0, 0.2: 3.0, 0.3: 2.0}, False) == (0.1, True)
    assert baselines.tune({1: 1.0, 2: 2.0, 3: 5.0}, True) == (3, True)

def test_early_mlem_candidates_are_mlem_stopped_there(split):
    sm, data = split
    seen = []
    baselines.mlem_early_candidates(data, sm, lambda it, x: seen.append(it), range(1, 7))
    assert seen == list(range(1, 7))                                        # In grid order, one at a time.
    cands = {}
    baselines.mlem_early_candidates(data, sm, cands.__setitem__, [4, 1, 6])
    assert sorted(cands) == [1, 4, 6]
    for it in (1, 4, 6):
        direct = mlem(torch.as_tensor(data['low_counts'], dtype=sm.dtype), sm, n_iter=it)[:, None].double().numpy() / 0.25
        np.testing.assert_array_equal(cands[it], direct)

@pytest.mark.parametrize('batch', [4, 3, 2, 512])
def test_map_em_candidates_batch_betas_and_images_consistently(split, batch):
    sm, data = split
    betas = (0.0, 1e-3, 1e-2)
    seen = []
    a = {}
    baselines.map_em_candidates(data, sm, 5, lambda b, x: (seen.append(b), a.__setitem__(b, x)), betas=betas, batch=batch)
    assert seen == list(betas)                                              # Each beta once, complete, in grid order.
    for beta in betas:
        direct = mapem.map_em(torch.as_tensor(data['low_counts'], dtype=sm.dtype), sm, beta, n_iter=5)[:, None].double().numpy() / 0.25
        np.testing.assert_allclose(a[beta], direct, rtol=1e-5, atol=1e-6)
    assert not np.allclose(a[0.0], a[1e-2])

def test_oracle_bound_is_mlem_of_the_counts_when_nothing_is_missing(split):
    sm, data = split
    full = dict(data, dose_fraction=1.0, n_iter=4, phantom_counts=np.ones((3, 1, 16, 16)))  # f = 1: y_full = y_low, no draw adds counts.
    direct = mlem(torch.as_tensor(data['low_counts'], dtype=sm.dtype), sm, n_iter=4)[:, None].double().numpy()
    np.testing.assert_array_equal(baselines.oracle_full_dose_mean(full, sm, draws=3), direct)

def test_oracle_bound_draws_do_not_depend_on_the_batching(split):
    sm, data = split
    part = dict(data, n_iter=3, phantom_counts=np.full((3, 1, 16, 16), 2.0))
    a = baselines.oracle_full_dose_mean(part, sm, draws=5, seed=1, batch=512)   # All draws in one call.
    b = baselines.oracle_full_dose_mean(part, sm, draws=5, seed=1, batch=6)     # Two draws per call.
    np.testing.assert_allclose(a, b, rtol=1e-6)
    c = baselines.oracle_full_dose_mean(part, sm, draws=5, seed=2)
    assert not np.allclose(a, c)                                                # The draws are random.

def test_oracle_bound_adds_the_missing_counts(split):
    # MLEM with a column-normalised A keeps the counts (sum x = sum y), so the oracle's image sums are
    # the low-dose counts plus the mean remainder, sum (1 - f) A phantom_counts = (1 - f) sum phantom_counts.
    sm, data = split
    pc = np.random.default_rng(3).uniform(0, 4, (3, 1, 16, 16))
    part = dict(data, n_iter=3, phantom_counts=pc)
    draws = 20
    oracle = baselines.oracle_full_dose_mean(part, sm, draws=draws, seed=4)
    expected = data['low_counts'].reshape(3, -1).sum(1) + 0.75 * sm.forward(torch.as_tensor(pc[:, 0])).double().numpy().reshape(3, -1).sum(1)
    sd = np.sqrt(0.75 * pc.reshape(3, -1).sum(1) / draws)                        # Poisson spread of the mean remainder.
    assert (np.abs(oracle.reshape(3, -1).sum(1) - expected) < 4 * sd).all(), (oracle.reshape(3, -1).sum(1), expected, sd)
    np.testing.assert_allclose(sm.forward(torch.as_tensor(pc[:, 0])).double().numpy().reshape(3, -1).sum(1), pc.reshape(3, -1).sum(1), rtol=1e-4)
