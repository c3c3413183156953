# medEDM tests: sparse parallel-beam projector (physics, adjointness, cache, bad input).

import os
import re
import shutil

import numpy as np
import pytest
import torch

from tomography_utils import projector

#----------------------------------------------------------------------------
# Analytic length of the line {p : p . (cos t, sin t) = s} inside the square
# [-N/2, N/2]^2, by clipping its parameter to both slabs (independent of the
# grid-crossing code under test).

def square_chord(theta: np.ndarray, s: np.ndarray, n: int) -> np.ndarray:
    half = n / 2
    out = np.zeros(np.broadcast(theta, s).shape)
    for idx in np.ndindex(out.shape):
        t, ss = np.broadcast_to(theta, out.shape)[idx], np.broadcast_to(s, out.shape)[idx]
        lo, hi = -np.inf, np.inf
        for p0, d in ((ss * np.cos(t), -np.sin(t)), (ss * np.sin(t), np.cos(t))):
            if abs(d) < 1e-12: # Parallel to this slab: inside or not at all.
                if abs(p0) >= half:
                    lo, hi = 0, 0
                continue
            a, b = (-half - p0) / d, (half - p0) / d
            lo, hi = max(lo, min(a, b)), min(hi, max(a, b))
        out[idx] = max(hi - lo, 0)
    return out

# Ray parameters of every matrix row: (theta, s), row = k * n_bins + b.
def ray_params(g: dict) -> tuple[np.ndarray, np.ndarray]:
    theta = np.arange(g['n_angles']) * np.pi / g['n_angles']
    s = (np.arange(g['n_bins']) - (g['n_bins'] - 1) / 2) * g['bin_width']
    return np.repeat(theta, g['n_bins']), np.tile(s, g['n_angles'])

# Elementwise |a - b| <= atol + rtol |b| (torch.testing is slow to import).
def assert_close(a: torch.Tensor, b: torch.Tensor, rtol: float = 0, atol: float = 0) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    err = ((a - b).abs() - rtol * b.abs()).max().item()
    assert err <= atol, err

def raw(n, **kwargs):
    return projector.get_system_matrix(n, normalize=False, dtype='float64', cache_dir=None, **kwargs)

#----------------------------------------------------------------------------

def test_default_geometry_matches_reference():
    sm = projector.get_system_matrix(16, cache_dir=None)
    assert sm.shape == (2 * 16 * 16, 16 * 16) and (sm.n_angles, sm.n_bins) == (32, 16)
    assert sm.A.crow_indices().dtype == torch.int32 and sm.AT.col_indices().dtype == torch.int32
    assert sm.A.values().dtype == torch.float32 and sm.source == 'built'
    assert projector.get_system_matrix(64, cache_dir=None).nnz == 626848 # Independent count for the reference geometry.

def test_row_sums_equal_chord_in_square():
    for n, kwargs in ((16, {}), (15, dict(n_angles=13, n_bins=29, bin_width=0.7)), (12, dict(n_angles=8, n_bins=20))):
        sm = raw(n, **kwargs)
        theta, s = ray_params(sm.geometry)
        row_sums = torch.zeros(sm.shape[0], dtype=torch.float64).index_add_(0, projector.csr_row_indices(sm.A), sm.A.values())
        np.testing.assert_allclose(row_sums.numpy(), square_chord(theta, s, n), rtol=0, atol=1e-8)
        assert bool((sm.A.values() > 0).all())

def test_disk_sinogram_equals_chord_length():
    # Disk of radius R (pixel area fractions, 8x8 sub-samples); its line
    # integral at offset s is 2 sqrt(R^2 - s^2) at every angle. A single ray
    # also sees the pixelisation of the disk edge (about 0.3 pixel of length),
    # so single rays are checked to 1% up to 0.6 R, and the mean over all
    # angles (which averages the edge pixelisation out) to 1% up to 1.5 pixels
    # from the rim and to 0.1% up to 4 pixels from it.
    n, radius, sub = 64, 28.0, 8
    c = (torch.arange(n * sub, dtype=torch.float64) + 0.5) / sub - n / 2 # Sub-pixel centres.
    yy, xx = torch.meshgrid(-c, c, indexing='ij')
    disk = ((xx ** 2 + yy ** 2) < radius ** 2).double().reshape(n, sub, n, sub).mean(dim=(1, 3))
    sm = raw(n)
    sino = sm.forward(disk[None])[0].numpy()
    s = ray_params(sm.geometry)[1].reshape(sino.shape)[0]
    chord = 2 * np.sqrt(np.maximum(radius ** 2 - s ** 2, 0))
    single = np.abs(sino - chord)[:, np.abs(s) <= 0.6 * radius] / chord[np.abs(s) <= 0.6 * radius]
    assert single.max() < 0.01, single.max()
    mean_rel = np.abs(sino.mean(axis=0) - chord) / np.maximum(chord, 1e-12)
    assert mean_rel[np.abs(s) < radius - 1.5].max() < 0.01
    assert mean_rel[np.abs(s) < radius - 4].max() < 0.001
    assert np.abs(sino[:, np.abs(s) > radius + 1]).max() == 0

def test_adjoint_and_transpose():
    sm = raw(16, n_angles=24, n_bins=21, bin_width=0.9)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, 16, 16, generator=gen, dtype=torch.float64)
    y = torch.rand(3, 24, 21, generator=gen, dtype=torch.float64)
    lhs = (sm.forward(x) * y).sum()
    rhs = (x * sm.back(y)).sum()
    assert abs(lhs - rhs) <= 1e-12 * abs(lhs)
    assert torch.equal(sm.AT.to_dense(), sm.A.to_dense().T)
    assert sm.forward(x[:, None]).shape == (3, 24, 21) and sm.back(y[:, None]).shape == (3, 16, 16)

def test_normalized_columns_sum_to_one():
    sm = projector.get_system_matrix(16, cache_dir=None, dtype='float64')
    assert_close(sm.sensitivity, torch.ones(256, dtype=torch.float64), rtol=0, atol=1e-12)
    r = raw(16)
    assert_close(sm.A.to_dense() * r.sensitivity, r.A.to_dense(), rtol=1e-12, atol=0)

def test_rotation_by_90_degrees_shifts_angles():
    # torch.rot90 turns the image by +90 degrees (x right, y up), so the
    # sinogram moves by n/2 ... n angles; the first half wraps with s -> -s.
    sm, n = raw(16), 16
    x = torch.rand(1, n, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a, b = sm.forward(x)[0], sm.forward(torch.rot90(x, 1, dims=(1, 2)))[0]
    assert_close(b[n:], a[:n], rtol=0, atol=1e-10)
    assert_close(b[:n], a[n:].flip(1), rtol=0, atol=1e-10)

#----------------------------------------------------------------------------
# Cache: build once, then load; a new geometry is a new entry; damaged or
# mismatching files are rebuilt with a warning naming the file.

def test_cache_build_load_and_new_geometry(tmp_path):
    first = projector.get_system_matrix(16, cache_dir=tmp_path)
    second = projector.get_system_matrix(16, cache_dir=tmp_path)
    assert (first.source, second.source) == ('built', 'loaded') and first.path == second.path
    for name in ('crow_indices', 'col_indices', 'values'):
        assert torch.equal(getattr(first.A, name)(), getattr(second.A, name)())
        assert torch.equal(getattr(first.AT, name)(), getattr(second.AT, name)())
    other = [projector.get_system_matrix(16, cache_dir=tmp_path, **kw) for kw in
        (dict(n_angles=20), dict(n_bins=20), dict(bin_width=0.5), dict(normalize=False), dict(dtype='float64'))]
    assert all(sm.source == 'built' for sm in other)
    assert len({sm.path for sm in other} | {first.path}) == 6 and len(os.listdir(tmp_path)) == 6
    assert all(projector.get_system_matrix(16, cache_dir=tmp_path, **kw).source == 'loaded' for kw in (dict(n_angles=20), dict(normalize=False)))

@pytest.mark.parametrize('damage', ['truncate', 'garbage', 'flip_byte', 'wrong_key', 'npy'])
def test_cache_damaged_file_is_rebuilt(tmp_path, damage):
    good = projector.get_system_matrix(16, cache_dir=tmp_path)
    data = open(good.path, 'rb').read()
    if damage == 'truncate':
        open(good.path, 'wb').write(data[:len(data) // 2])
    elif damage == 'garbage':
        open(good.path, 'wb').write(b'not a zip file')
    elif damage == 'flip_byte': # Inside the stored values: caught by the zip member's CRC.
        i = len(data) // 2
        open(good.path, 'wb').write(data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:])
    elif damage == 'npy': # A valid array file, not an archive.
        with open(good.path, 'wb') as f:
            np.save(f, np.arange(3))
    else: # A valid file of another geometry under this geometry's name.
        shutil.copy(projector.get_system_matrix(16, n_angles=20, cache_dir=tmp_path).path, good.path)
    with pytest.warns(RuntimeWarning, match=re.escape(f'projector cache file {good.path} is damaged or does not match its geometry')):
        again = projector.get_system_matrix(16, cache_dir=tmp_path)
    assert again.source == 'built' and torch.equal(again.A.values(), good.A.values())
    assert projector.get_system_matrix(16, cache_dir=tmp_path).source == 'loaded'

def test_unwritable_cache_dir_warns_and_still_returns_the_matrix(tmp_path):
    blocker = tmp_path / 'file'
    blocker.write_text('not a folder')
    with pytest.warns(RuntimeWarning, match=re.escape(f'could not write projector cache file {blocker}')):
        sm = projector.get_system_matrix(8, cache_dir=blocker / 'sub')
    assert sm.source == 'built' and sm.path is None and sm.nnz > 0

def test_cache_leaves_no_temporary_files(tmp_path):
    projector.get_system_matrix(12, cache_dir=tmp_path / 'sub' / 'dir')
    assert [f.endswith('.npz') for f in os.listdir(tmp_path / 'sub' / 'dir')] == [True]

#----------------------------------------------------------------------------
# Bad input: clear messages.

def test_bad_geometry_messages():
    with pytest.raises(ValueError, match=re.escape('resolution must be an integer >= 2, got 1')):
        projector.get_system_matrix(1, cache_dir=None)
    with pytest.raises(ValueError, match=re.escape('n_angles must be a positive integer, got 0')):
        projector.get_system_matrix(8, n_angles=0, cache_dir=None)
    with pytest.raises(ValueError, match=re.escape('bin_width must be a positive number, got -1.0')):
        projector.get_system_matrix(8, bin_width=-1, cache_dir=None)
    with pytest.raises(ValueError, match=re.escape("dtype must be 'float32' or 'float64', got 'float16'")):
        projector.get_system_matrix(8, dtype='float16', cache_dir=None)

def test_wrong_shaped_images_and_sinograms():
    sm = projector.get_system_matrix(16, cache_dir=None)
    with pytest.raises(ValueError, match=re.escape('images shape (2, 16, 17) does not match the system matrix: '
            'expected [B, 16, 16] or [B, 1, 16, 16]')):
        sm.forward(torch.zeros(2, 16, 17))
    with pytest.raises(ValueError, match=re.escape('images shape (16, 16) does not match')):
        sm.forward(torch.zeros(16, 16))
    with pytest.raises(ValueError, match=re.escape('sinograms shape (2, 32, 15) does not match the system matrix geometry: '
            'expected [B, 32, 16] or [B, 1, 32, 16] (n_angles=32, n_bins=16, resolution 16x16)')):
        sm.back(torch.zeros(2, 32, 15))

#----------------------------------------------------------------------------
