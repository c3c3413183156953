# medEDM tests: the fused MLEM CPU kernels (tomography_utils/native.py, mlem_kernels.c):
# agreement with the torch path, batch and thread invariance, the build cache, the fallback.

import os
import re

import pytest
import torch

from tomography_utils import mlem as mlem_module, native, projector
from tomography_utils.mlem import mlem

pytestmark = pytest.mark.usefixtures('one_thread')

def phantoms(n: int, batch: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    c = torch.arange(n, dtype=torch.float64) + 0.5 - n / 2
    r2 = c[None, :] ** 2 + c[:, None] ** 2
    disk = (r2 < (0.4 * n) ** 2).to(torch.float64)
    return disk * (1 + torch.rand(batch, n, n, generator=gen, dtype=torch.float64))

def counts(sm, batch: int, seed: int = 0) -> torch.Tensor:
    ybar = sm.forward(phantoms(sm.resolution, batch, seed).to(sm.dtype))
    return torch.poisson(ybar * (2e4 / ybar.sum(dim=(1, 2), keepdim=True)), generator=torch.Generator().manual_seed(seed))

@pytest.fixture(scope='module')
def kernels():
    k = native.mlem_kernels()
    if k is None:
        pytest.fail('the fused MLEM kernels could not be built on this machine')
    return k

def csr32(dense: torch.Tensor) -> torch.Tensor:
    m = dense.to_sparse_csr()
    return projector.make_csr(m.crow_indices().int(), m.col_indices().int(), m.values(), tuple(dense.shape))

def torch_path(monkeypatch, fn):
    with monkeypatch.context() as m:
        m.setattr(native, 'mlem_kernels', lambda: None)
        return fn()

#----------------------------------------------------------------------------

@pytest.mark.parametrize('dtype,rtol', [('float64', 1e-12), ('float32', 1e-5)])
def test_native_equals_torch_path(kernels, monkeypatch, dtype, rtol):
    # MLEM, OSEM (whose subsets leave corner pixels unseen: the keep term),
    # a mask and an initial image, batch 37 (two whole vectors and scalar columns).
    sm = projector.get_system_matrix(24, dtype=dtype, cache_dir=None)
    y = counts(sm, 37)
    mask = torch.ones(24, 24, dtype=torch.bool)
    mask[:3] = False
    x0 = 0.5 + phantoms(24, 37, seed=1).to(sm.dtype)
    for kwargs in ({}, {'n_subsets': 6}, {'mask': mask, 'x0': x0}):
        fused = mlem(y, sm, n_iter=7, **kwargs)
        reference = torch_path(monkeypatch, lambda: mlem(y, sm, n_iter=7, **kwargs))
        err = ((fused - reference).abs().max() / reference.abs().max()).item()
        assert err < rtol, (kwargs.keys(), err)

def test_results_do_not_depend_on_batch_or_threads(kernels):
    sm = projector.get_system_matrix(24, cache_dir=None)
    y = counts(sm, 70)                                                        # Every path: 4, 2 and 1 vectors, scalars.
    reference = mlem(y, sm, n_iter=6, n_subsets=3)
    for batch in (1, 5, 16, 17, 33, 48):
        assert torch.equal(mlem(y[:batch], sm, n_iter=6, n_subsets=3), reference[:batch]), batch
    for threads in (2, 3):
        torch.set_num_threads(threads)
        try:
            assert torch.equal(mlem(y, sm, n_iter=6, n_subsets=3), reference), threads
        finally:
            torch.set_num_threads(1)

def test_int32_and_uint16_column_indices_give_the_same_reconstruction(kernels, monkeypatch):
    # mlem() hands the kernels 16-bit column indices wherever a matrix part has
    # at most 65536 columns; the int32 path (larger parts) must give the same bits.
    y = counts(projector.get_system_matrix(24, cache_dir=None), 21)
    narrow = mlem(y, projector.get_system_matrix(24, cache_dir=None), n_iter=5, n_subsets=2)
    monkeypatch.setattr(native, 'narrow_columns', lambda m: None)
    sm = projector.get_system_matrix(24, cache_dir=None)                   # A fresh matrix: no cached operators.
    assert all(cols16 is None for _, parts, back, _ in mlem_module.subset_operators(sm, 2) for *_, cols16 in parts + back)
    assert torch.equal(mlem(y, sm, n_iter=5, n_subsets=2), narrow)

def test_kernels_compute_the_fused_products(kernels):
    # One forward and one back call against dense arithmetic, float64.
    sm = projector.get_system_matrix(12, dtype='float64', cache_dir=None)
    a, at = sm.A, sm.AT
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(sm.shape[1], 19, generator=gen, dtype=torch.float64)
    y = torch.rand(sm.shape[0], 19, generator=gen, dtype=torch.float64)
    f = torch.empty_like(y)
    kernels.forward_ratio(a, x, y, f, 0.25, 2)
    assert torch.allclose(f, y / (a.to_dense() @ x + 0.25), rtol=1e-13, atol=0)
    f16 = torch.empty_like(f)                                                # 16-bit column indices: the same sums.
    kernels.forward_ratio(a, x, y, f16, 0.25, 2, cols16=native.narrow_columns(a))
    assert torch.equal(f16, f)
    keep = torch.rand(sm.shape[1], 1, generator=gen, dtype=torch.float64)
    x_new = x.clone()
    kernels.back_update(at, f, keep, x_new, None, 2)
    assert torch.allclose(x_new, x * (at.to_dense() @ f + keep), rtol=1e-13, atol=0)
    x16 = x.clone()
    kernels.back_update(at, f, keep, x16, None, 2, cols16=native.narrow_columns(at))
    assert torch.equal(x16, x_new)
    assert native.narrow_columns(csr32(torch.ones(2, 2**16 + 1, dtype=torch.float64))) is None
    # In two groups of columns: partial sums, then the rest and the update.
    x_two, u = x.clone(), torch.empty_like(x)
    lo, hi = sm.shape[0] // 3, sm.shape[0]
    dense = at.to_dense()
    kernels.back_update(csr32(dense[:, :lo]), f[:lo], keep, x_two, u, 1, finish=False)
    assert torch.allclose(u, dense[:, :lo] @ f[:lo], rtol=1e-13, atol=0) and torch.equal(x_two, x)
    kernels.back_update(csr32(dense[:, lo:hi]), f[lo:hi], keep, x_two, u, 1, accumulate=True)
    assert torch.allclose(x_two, x_new, rtol=1e-13, atol=0)
    f_two = torch.empty_like(f)
    kernels.forward_ratio(csr32(a.to_dense()[:, :50]), x[:50], y, f_two, 0.25, 1, finish=False)
    kernels.forward_ratio(csr32(a.to_dense()[:, 50:]), x[50:], y, f_two, 0.25, 1, accumulate=True)
    assert torch.allclose(f_two, f, rtol=1e-13, atol=0)
    with pytest.raises(ValueError, match=re.escape('the fused MLEM kernels need a CSR matrix with int32 indices (projector.make_csr)')):
        kernels.forward_ratio(a.to_dense().to_sparse_csr(), x, y, f, 0.25, 1)
    with pytest.raises(ValueError, match=re.escape('the fused MLEM kernels need contiguous CPU tensors of the matrix dtype torch.float64')):
        kernels.forward_ratio(a, x.float(), y, f, 0.25, 1)
    with pytest.raises(ValueError, match=re.escape("cols16 must be the matrix's column indices as a contiguous uint16 tensor (narrow_columns)")):
        kernels.forward_ratio(a, x, y, f, 0.25, 1, cols16=a.col_indices())

@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_permuted_transposes(kernels, dtype):
    # Shapes that are not multiples of the blocks; dst = -1 skips a source row / column.
    gen = torch.Generator().manual_seed(0)
    src = torch.rand(37, 150, generator=gen, dtype=dtype)                    # [J, I]
    dst = torch.randperm(160, generator=gen)[:150]
    dst[[3, 77]] = -1
    out = torch.full((160, 37), -7.0, dtype=dtype)
    kernels.columns_to_rows(src, dst, out, 3)
    expected = torch.full((160, 37), -7.0, dtype=dtype)
    keep = dst >= 0
    expected[dst[keep]] = src.T[keep]
    assert torch.equal(out, expected)
    out = torch.full((37, 160), -7.0, dtype=dtype)
    kernels.rows_to_columns(src.T.contiguous(), dst, out, 2)
    assert torch.equal(out, expected.T)
    with pytest.raises(ValueError, match=re.escape('the permuted transpose got src (37, 150), dst (150,) and out (100, 37), which do not fit')):
        kernels.columns_to_rows(src, dst, torch.empty(100, 37, dtype=dtype), 1)   # dst points past out's rows.
    with pytest.raises(ValueError, match=re.escape('the permuted transpose got src (37, 150), dst (150,) and out (160, 36), which do not fit')):
        kernels.columns_to_rows(src, dst, torch.empty(160, 36, dtype=dtype), 1)
    with pytest.raises(ValueError, match=re.escape('the permuted transpose needs contiguous CPU tensors: float32 / float64 src and out of one dtype, int64 dst')):
        kernels.columns_to_rows(src, dst.int(), out, 1)

#----------------------------------------------------------------------------
# The build: cached, keyed by the CPU, refused gracefully.

def test_build_is_cached_and_keyed_by_cpu(kernels, tmp_path, monkeypatch):
    monkeypatch.setenv('MEDEDM_NATIVE_CACHE', str(tmp_path))
    path = native.build()
    stamp = os.stat(path).st_mtime_ns
    assert native.build() == path and os.stat(path).st_mtime_ns == stamp       # Loaded, not rebuilt.
    assert os.listdir(tmp_path) == [os.path.basename(path)]                  # No temporary left behind.
    monkeypatch.setattr(native, '_cpu_identity', lambda: 'another CPU')
    other = native.build()
    assert other != path and sorted(os.listdir(tmp_path)) == sorted(map(os.path.basename, (path, other)))

def test_without_a_compiler_mlem_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv('MEDEDM_NATIVE_CACHE', str(tmp_path))
    monkeypatch.setenv('CC', 'no-such-compiler-medEDM')
    monkeypatch.setattr(native, '_loaded', {})
    with pytest.warns(RuntimeWarning, match=re.escape("could not build the fused MLEM kernels (C compiler 'no-such-compiler-medEDM' not found (set $CC)); MLEM on CPU uses torch sparse products instead")):
        assert native.mlem_kernels() is None
    sm = projector.get_system_matrix(12, dtype='float64', cache_dir=None)
    y = counts(sm, 2)
    assert mlem(y, sm, n_iter=3).shape == (2, 12, 12)                           # The torch path; no second warning.
    assert os.listdir(tmp_path) == []

def test_without_openmp_the_kernels_run_serially(kernels, monkeypatch, tmp_path):
    # A compiler that refuses -fopenmp: a serial build, one warning, the same results.
    cc = tmp_path / 'cc-without-openmp'
    cc.write_text('#!/bin/sh\ncase " $* " in *" -fopenmp "*) echo "unsupported option -fopenmp" >&2; exit 1;; esac\nexec cc "$@"\n')
    cc.chmod(0o755)
    monkeypatch.setenv('MEDEDM_NATIVE_CACHE', str(tmp_path / 'cache'))
    monkeypatch.setenv('CC', str(cc))
    monkeypatch.setattr(native, '_loaded', {})
    with pytest.warns(RuntimeWarning, match=re.escape(f'{cc} could not compile the fused MLEM kernels with -fopenmp: they run on one thread')):
        serial = native.mlem_kernels()
    assert serial is not None and serial.path != kernels.path
    sm = projector.get_system_matrix(12, dtype='float64', cache_dir=None)
    y = counts(sm, 3)
    monkeypatch.setattr(native, '_loaded', {'lib': kernels})
    reference = mlem(y, sm, n_iter=4)
    monkeypatch.setattr(native, '_loaded', {'lib': serial})
    assert torch.equal(mlem(y, sm, n_iter=4), reference)

def test_disabled_by_environment(monkeypatch, recwarn):
    monkeypatch.setenv('MEDEDM_NATIVE', '0')
    monkeypatch.setattr(native, '_loaded', {})
    assert native.mlem_kernels() is None and len(recwarn) == 0

#----------------------------------------------------------------------------
# The adaptive thread count of run_iterations(): with a fake clock, it runs on
# whichever thread count is faster, re-measures the other every PROBE_EVERY
# chunks, runs every iteration exactly once and calls back after each in order.

def simulated_runs(monkeypatch, cost: dict[int, float], n_iter: int, after=None, adaptive: bool = True) -> list[tuple[int, int]]:
    clock, runs = [0.0], []
    def run(plan, threads, repeats=1):
        runs.append((threads, repeats))
        clock[0] += cost[threads] * repeats
    fake = object.__new__(native.MlemKernels)
    monkeypatch.setattr(fake, 'run', run, raising=False)
    monkeypatch.setattr(native.time, 'perf_counter', lambda: clock[0])
    fake.run_iterations(None, 2, n_iter, after, adaptive=adaptive)
    return runs

@pytest.mark.parametrize('fast', [1, 2])
def test_run_iterations_runs_on_the_faster_thread_count(monkeypatch, fast):
    slow = 3 - fast
    runs = simulated_runs(monkeypatch, {fast: 1.0, slow: 3.5}, n_iter=100)
    assert sum(k for _, k in runs) == 100
    assert runs[:2] == [(2, 1), (1, 1)]                                     # Both measured first, one iteration each.
    on_slow = [k for t, k in runs[2:] if t == slow]
    assert on_slow and set(on_slow) == {1}                                  # The slower one: single probe iterations only ...
    gaps = ''.join('s' if t == slow else 'f' for t, _ in runs).split('s')
    assert len(gaps) > 3 and all(len(g) == native.PROBE_EVERY for g in gaps[1:-1])  # ... after every PROBE_EVERY chunks on the faster.
    assert max(k for t, k in runs if t == fast) == native.CHUNK

def test_run_iterations_follows_a_change_of_load(monkeypatch):
    cost, calls = {2: 1.0, 1: 2.0}, []
    def run(plan, threads, repeats=1):
        calls.append(threads)
        clock[0] += cost[threads] * repeats
        if len(calls) == 12:                                                # Other processes start: 2 threads get slow.
            cost[2] = 6.0
    clock = [0.0]
    fake = object.__new__(native.MlemKernels)
    monkeypatch.setattr(fake, 'run', run, raising=False)
    monkeypatch.setattr(native.time, 'perf_counter', lambda: clock[0])
    fake.run_iterations(None, 2, 400, None)
    assert calls[:11] == [2, 1] + [2] * 8 + [1]                             # 2 threads while faster (1 re-measured) ...
    tail = calls[14:]
    assert tail.count(1) == len(tail) - len(tail) // (native.PROBE_EVERY + 1)  # ... then 1, 2 re-measured now and then.

def test_run_iterations_callback_and_fixed(monkeypatch):
    seen = []
    runs = simulated_runs(monkeypatch, {1: 1.0, 2: 3.0}, n_iter=7, after=seen.append)
    assert seen == list(range(1, 8)) and all(k == 1 for _, k in runs)
    assert simulated_runs(monkeypatch, {1: 1.0, 2: 3.0}, n_iter=7, adaptive=False) == [(2, 7)]
    seen.clear()
    assert simulated_runs(monkeypatch, {1: 1.0, 2: 3.0}, n_iter=3, after=seen.append, adaptive=False) == [(2, 1)] * 3
    assert seen == [1, 2, 3]
