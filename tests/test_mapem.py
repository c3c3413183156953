# medEDM tests: MAP-EM with a quadratic prior (tomography_utils/mapem.py): with a
# zero-strength prior it is MLEM; its objective never decreases; the penalty by hand.

import math

import pytest
import torch

from tomography_utils import mapem, projector
from tomography_utils.mlem import mlem

pytestmark = pytest.mark.usefixtures('one_thread')

def counts(sm, batch: int, total: float = 2e4, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    n = sm.resolution
    c = torch.arange(n, dtype=torch.float64) + 0.5 - n / 2
    disk = ((c[None, :] ** 2 + c[:, None] ** 2) < (0.4 * n) ** 2).to(torch.float64)
    phantoms = disk * (1 + torch.rand(batch, n, n, generator=gen, dtype=torch.float64))
    ybar = sm.forward(phantoms.to(sm.dtype))
    return torch.poisson(ybar * (total / ybar.sum(dim=(1, 2), keepdim=True)), generator=gen)

@pytest.fixture(scope='module')
def sm16():
    return projector.get_system_matrix(16, dtype='float64', cache_dir=None)

def test_zero_strength_prior_is_mlem(sm16):
    y = counts(sm16, 3)
    ref = mlem(y, sm16, n_iter=12)
    out = mapem.map_em(y, sm16, beta=0.0, n_iter=12)
    assert out.shape == ref.shape and torch.allclose(out, ref, rtol=1e-10, atol=1e-12)
    assert mapem.map_em(y[:, None], sm16, 0.0, n_iter=2).shape == (3, 1, 16, 16)

def test_objective_never_decreases(sm16):
    y = counts(sm16, 4, total=3e3, seed=1)
    beta = torch.tensor([0.0, 1e-3, 1e-2, 1e-1])
    values = []
    mapem.map_em(y, sm16, beta, n_iter=30, callback=lambda it, x: values.append(mapem.map_objective(y, sm16, x, beta)))
    values = torch.stack(values)                                            # [iterations, B]
    steps = values[1:] - values[:-1]
    assert bool((steps >= -1e-9 * values[1:].abs()).all()), steps.min()
    assert bool((steps[:, 1:].sum(0) > 0).all())                            # It does climb.

def test_stronger_prior_is_smoother(sm16):
    y = counts(sm16, 1, total=3e3, seed=2).expand(3, -1, -1).contiguous()
    x = mapem.map_em(y, sm16, torch.tensor([0.0, 1e-2, 1e-1]), n_iter=20)
    r = mapem.quadratic_penalty(x)
    assert r[0] > r[1] > r[2]

def test_quadratic_penalty_by_hand():
    x = torch.zeros(1, 3, 3, dtype=torch.float64)
    x[0, 1, 1] = 2.0                                                        # Centre pixel: 4 edge and 4 diagonal pairs.
    assert math.isclose(mapem.quadratic_penalty(x).item(), 0.5 * (4 * 4 + 4 * 4 * 2 ** -0.5), rel_tol=1e-14)
    x = torch.zeros(1, 3, 3, dtype=torch.float64)
    x[0, 0, 0] = 1.0                                                        # Corner pixel: 2 edge pairs, 1 diagonal.
    assert math.isclose(mapem.quadratic_penalty(x).item(), 0.5 * (2 + 2 ** -0.5), rel_tol=1e-14)
    assert mapem.quadratic_penalty(torch.full((2, 4, 4), 3.0)).tolist() == [0.0, 0.0]

def test_bad_beta(sm16):
    y = counts(sm16, 2)
    for beta in (-1.0, float('nan'), torch.tensor([0.1, 0.2, 0.3])):
        with pytest.raises(ValueError, match='beta must be a non-negative number or one non-negative number per image'):
            mapem.map_em(y, sm16, beta, n_iter=1)
