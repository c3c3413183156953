# medEDM tests: batched MLEM / OSEM (likelihood ascent, batching, counts, convergence, bad input).

import re

import pytest
import torch

from tomography_utils import mlem as mlem_module, projector
from tomography_utils.mlem import mlem, poisson_log_likelihood, subset_operators

#----------------------------------------------------------------------------
# Smooth phantoms: a few Gaussian blobs inside the inscribed disk.

def blobs(n: int, batch: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    c = torch.arange(n, dtype=dtype) + 0.5 - n / 2
    yy, xx = torch.meshgrid(-c, c, indexing='ij')
    out = torch.zeros(batch, n, n, dtype=dtype)
    for b in range(batch):
        for _ in range(3):
            cx, cy = ((torch.rand(2, generator=gen, dtype=dtype) - 0.5) * n * 0.4).tolist()
            w = (0.08 + 0.1 * torch.rand(1, generator=gen, dtype=dtype).item()) * n
            out[b] += (1 + torch.rand(1, generator=gen, dtype=dtype).item()) * torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * w * w))
    return out

def noisy_counts(sm, phantoms, total=1e5, seed=0):
    ybar = sm.forward(phantoms)
    ybar = ybar * (total / ybar.sum(dim=(1, 2), keepdim=True))
    return torch.poisson(ybar, generator=torch.Generator().manual_seed(seed))

# Small problems: one thread (fixture in conftest.py).
pytestmark = pytest.mark.usefixtures('one_thread')

@pytest.fixture(scope='module')
def sm64():
    return projector.get_system_matrix(32, cache_dir=None, dtype='float64')

#----------------------------------------------------------------------------

def test_log_likelihood_never_decreases(sm64, backend):
    y = noisy_counts(sm64, blobs(32, 3))
    values = []
    mlem(y, sm64, n_iter=25, callback=lambda it, x: values.append(poisson_log_likelihood(y, sm64, x)))
    ll = torch.stack(values)                                             # [iterations, B]
    assert ll.shape == (25, 3)
    assert bool(((ll[1:] - ll[:-1]) >= -1e-12 * ll[:-1].abs()).all())
    assert bool((ll[-1] > ll[0]).all())

def test_counts_are_preserved_every_iteration(backend):
    sm = projector.get_system_matrix(32, normalize=False, dtype='float64', cache_dir=None) # Sensitivity is not 1 here.
    y = noisy_counts(sm, blobs(32, 2))
    errors = []
    mlem(y, sm, n_iter=15, callback=lambda it, x: errors.append((sm.forward(x).sum(dim=(1, 2)) / y.sum(dim=(1, 2)) - 1).abs().max().item()))
    assert len(errors) == 15 and max(errors) < 1e-10

# The two back ends of mlem(): the fused C kernels (default on CPU) and the
# torch path (GPU, and CPU without a compiler).
@pytest.fixture(params=['native', 'torch'])
def backend(request, monkeypatch):
    if request.param == 'torch':
        monkeypatch.setattr(mlem_module.native, 'mlem_kernels', lambda: None)
    elif mlem_module.native.mlem_kernels() is None:
        pytest.fail('the fused MLEM kernels could not be built on this machine')
    return request.param

def test_batched_equals_one_image_at_a_time(backend):
    # Native: every column goes through the same operations in the same
    # order whatever the batch size: bit-identical. Torch, float32: MKL runs
    # the batch as a sparse-matrix-times-dense-matrix kernel and a single
    # image as a sparse-matrix-times-vector kernel, which sum a row's terms in
    # a different order; they agree to float32 rounding (about 1e-6 relative
    # after 20 iterations).
    for dtype, rtol in (('float64', 1e-12), ('float32', 2e-5)):
        sm = projector.get_system_matrix(32, dtype=dtype, cache_dir=None)
        y = noisy_counts(sm, blobs(32, 5, dtype=torch.float64)).to(sm.dtype)
        batched = mlem(y, sm, n_iter=20)
        single = torch.cat([mlem(y[i:i + 1], sm, n_iter=20) for i in range(5)])
        if backend == 'native':
            assert torch.equal(batched, single), dtype
        err = ((batched - single).abs() / batched.abs().max()).max().item()
        assert err < rtol, (dtype, err)
    # The same batch twice gives bit-identical results (no hidden randomness).
    assert torch.equal(mlem(y, sm, n_iter=20), batched)

def test_noise_free_data_converge_to_phantom(sm64):
    phantom = blobs(32, 2, seed=3)
    y = sm64.forward(phantom)
    errors, checkpoints = [], (1, 3, 10, 30, 100, 200)
    mlem(y, sm64, n_iter=200, callback=lambda it, x: errors.append(((x - phantom).norm() / phantom.norm()).item()) if it in checkpoints else None)
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[0] > 0.1 and errors[-1] < 0.01, errors

def test_osem_subsets(backend):
    sm = projector.get_system_matrix(32, dtype='float64', cache_dir=None)
    ops = subset_operators(sm, 4)
    assert subset_operators(sm, 4) is ops                                # Cached row slices.
    rows = torch.cat([r for r, *_ in ops]).sort().values
    assert torch.equal(rows, torch.arange(sm.shape[0]))                  # The subsets partition the rays.
    phantom = blobs(32, 2, seed=3)
    y = sm.forward(phantom)
    err = lambda x: ((x - phantom).norm() / phantom.norm()).item()
    assert err(mlem(y, sm, n_iter=10, n_subsets=4)) < err(mlem(y, sm, n_iter=10))
    assert torch.equal(mlem(y, sm, n_iter=3, n_subsets=1), mlem(y, sm, n_iter=3))
    # Corner pixels are not seen by every subset; OSEM must not zero them.
    flat = torch.ones(1, 32, 32, dtype=torch.float64)
    assert mlem(sm.forward(flat), sm, n_iter=5, n_subsets=8).min() > 0.5

def test_cache_blocking_does_not_change_results(monkeypatch, backend):
    # Several forward and back-projection groups (forced by a tiny block
    # size) and a resolution that is not a power of two (the Hilbert curve
    # skips pixels outside the image) give the same images as one group.
    sm = projector.get_system_matrix(20, dtype='float64', cache_dir=None)
    y = noisy_counts(sm, blobs(20, 3))
    block_bytes = mlem_module.BLOCK_BYTES
    for n_subsets in (1, 5):
        reference = mlem(y, sm, n_iter=8, n_subsets=n_subsets)
        monkeypatch.setattr(mlem_module, 'BLOCK_BYTES', 1000)
        assert min(mlem_module.n_groups(sm, 3, n_subsets)) > 1
        blocked = mlem(y, sm, n_iter=8, n_subsets=n_subsets)
        monkeypatch.setattr(mlem_module, 'BLOCK_BYTES', block_bytes)
        assert ((blocked - reference).abs().max() / reference.max()).item() < 1e-12
    order, rank = mlem_module.pixel_order(20)
    assert torch.equal(order.sort().values, torch.arange(400)) and torch.equal(order[rank], torch.arange(400))

@pytest.mark.parametrize('n', [8, 32])
def test_pixel_order_is_a_hilbert_curve(n):
    # Only a Hilbert curve has both: every step goes to a 4-neighbour, and every aligned run of
    # 4^m pixels fills a 2^m x 2^m square; it starts at the first pixel and ends at the last column.
    order, _ = mlem_module.pixel_order(n)
    i, j = order // n, order % n
    assert torch.equal((i.diff().abs() + j.diff().abs()), torch.ones(n * n - 1, dtype=torch.long))
    for m in range(1, n.bit_length() - 1):
        run = 4 ** m
        for part_i, part_j in zip(i.split(run), j.split(run)):
            assert part_i.max() - part_i.min() == part_j.max() - part_j.min() == 2 ** m - 1
            assert part_i.min() % 2 ** m == 0 and part_j.min() % 2 ** m == 0
    assert (int(order[0]), int(j[-1])) == (0, n - 1)

def test_ray_order_follows_bins_and_angles(sm64):
    # Each subset's rays once each; one subset: every step moves one bin or one angle (Hilbert curve).
    n_angles, n_bins = sm64.n_angles, sm64.n_bins
    for n_subsets in (1, 4):
        for k in range(n_subsets):
            rays = mlem_module.subset_rays(sm64, k, n_subsets)
            expected = (torch.arange(k, n_angles, n_subsets)[:, None] * n_bins + torch.arange(n_bins)).reshape(-1)
            assert torch.equal(rays.sort().values, expected)
    rays = mlem_module.subset_rays(sm64, 0, 1)
    assert torch.equal((rays // n_bins).diff().abs() + (rays % n_bins).diff().abs(), torch.ones(len(rays) - 1, dtype=torch.long))

def test_mask_initial_image_and_callback(sm64, backend):
    y = noisy_counts(sm64, blobs(32, 2))
    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[4:28, 4:28] = True
    x = mlem(y, sm64, n_iter=5, mask=mask)
    assert bool((x[:, ~mask] == 0).all()) and bool((x[:, mask] > 0).all())
    x0 = torch.full((2, 1, 32, 32), 3.0, dtype=torch.float64)
    its = []
    out = mlem(y[:, None], sm64, n_iter=4, x0=x0, callback=lambda it, x: its.append((it, tuple(x.shape))))
    assert out.shape == (2, 1, 32, 32) and its == [(i, (2, 32, 32)) for i in range(1, 5)]
    assert torch.equal(mlem(y, sm64, n_iter=0, x0=x0)[:, None], x0)

#----------------------------------------------------------------------------
# Bad input: exact messages.

def test_bad_sinograms(sm64):
    y = noisy_counts(sm64, blobs(32, 2))
    bad = y.clone(); bad[1, 3, 4] = -2
    with pytest.raises(ValueError, match=re.escape('sinograms contain negative values (minimum -2); counts must be non-negative')):
        mlem(bad, sm64)
    bad = y.clone(); bad[0, 0, 0] = float('nan')
    with pytest.raises(ValueError, match=re.escape('sinograms contain NaN or infinite values; counts must be finite and non-negative')):
        mlem(bad, sm64)
    bad = y.clone(); bad[1] = 0
    with pytest.raises(ValueError, match=re.escape('sinograms[1] has zero total counts: an empty acquisition has no MLEM '
            'reconstruction (every image explains it equally well)')):
        mlem(bad, sm64)

def test_geometry_mismatch(sm64):
    other = projector.get_system_matrix(16, dtype='float64', cache_dir=None) # 32 angles x 16 bins.
    y = noisy_counts(other, blobs(16, 2))
    with pytest.raises(ValueError, match=re.escape('sinograms shape (2, 32, 16) does not match the system matrix geometry: '
            'expected [B, 64, 32] or [B, 1, 64, 32] (n_angles=64, n_bins=32, resolution 32x32)')):
        mlem(y, sm64)
    with pytest.raises(ValueError, match=re.escape('sinograms shape (64, 32) does not match')):
        mlem(noisy_counts(sm64, blobs(32, 1))[0], sm64)

def test_bad_images_and_options(sm64):
    y = noisy_counts(sm64, blobs(32, 2))
    with pytest.raises(ValueError, match=re.escape('x0 shape (2, 31, 32) does not match the system matrix: expected [B, 32, 32] or [B, 1, 32, 32]')):
        mlem(y, sm64, x0=torch.ones(2, 31, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match=re.escape('x0 has batch size 3 but the sinograms have 2')):
        mlem(y, sm64, x0=torch.ones(3, 32, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match=re.escape('x0 must be finite and non-negative')):
        mlem(y, sm64, x0=-torch.ones(2, 32, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match=re.escape('mask shape (16, 16) does not match the system matrix: expected [B, 32, 32] or [B, 1, 32, 32]')):
        mlem(y, sm64, mask=torch.ones(16, 16))
    with pytest.raises(ValueError, match=re.escape('n_subsets must be an integer in [1, n_angles=64], got 65')):
        mlem(y, sm64, n_subsets=65)
    with pytest.raises(ValueError, match=re.escape('n_iter must be a non-negative integer, got -1')):
        mlem(y, sm64, n_iter=-1)

#----------------------------------------------------------------------------
