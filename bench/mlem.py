# medEDM: diffusion-model training toolkit for medical imaging.

"""MLEM throughput: batched sparse MLEM against two baselines, and against
the memory-bandwidth roofline of the same machine.

For every resolution N (2N angles x N bins, column-normalised A, float32),
on a batch of B Poisson sinograms (1e6 counts each), in the same invocation:

  batched  `tomography_utils.mlem.mlem`: the batch as the columns of one
           dense matrix, two fused CSR sparse-dense passes per iteration
           (the C kernels of tomography_utils/mlem_kernels.c).
  torch    the same loop on torch's sparse products (MKL CSR SpMM, then
           element-wise ops): what mlem() runs without a C compiler, and
           the "plain CSR product" of the issue.
  single   `mlem` called on one image at a time (a subset of the batch, to
           keep the run short).
  dense    the PET reference project's approach: a dense A and
           torch.matmul, x <- x * ((y / (x A^T)) A) (A^T 1 = 1), batched.
           Skipped where the dense matrix exceeds --dense-max-gib.

Variants alternate over --repeats rounds; the best round of each is
reported (the machine may be shared; the median is printed too). The
headline numbers are image-iterations per second and their ratios.

Roofline. One MLEM iteration must at least stream both CSR matrices
(4-byte values + 4-byte column indices + row pointers) and touch the dense
operands: read x, write A x, read y and A x, write the ratio, read it,
write and read the update, read and write x; counted as (3 D + 3 P) * 4 B
per image with the element-wise work fused into the products (P rays,
D pixels). Those bytes divided by the time per iteration is the achieved
bandwidth, reported as a fraction of the copy bandwidth of a large torch
tensor measured at the start of the run (read + write bytes / time), the
machine's memory bandwidth; a third line compares it with a copy as large
as the working set, which may stay in the last-level cache (this 2-vCPU
VM's L3 is 260 MiB: such a copy runs about twice as fast). The
kernels store column indices in 16 bits where a matrix part has at most
65536 columns, so they stream fewer bytes than an int32-index CSR: the
second bandwidth line counts those (lower: the same time, fewer bytes).

Examples:

\b
# Defaults: 64x64 and 128x128, batch 64, 2 threads (about 2-3 minutes):
python bench/mlem.py

\b
# One thread, 64x64 only:
python bench/mlem.py --threads 1 --resolutions 64

\b
# Also beside 2 busy processes (fixed threads against the adaptive default):
python bench/mlem.py --resolutions 64 --load 2
"""

import os
import statistics
import subprocess
import sys
import tempfile
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tomography_utils import dose, native, projector # pylint: disable=wrong-import-position
from tomography_utils import mlem as mlem_module # pylint: disable=wrong-import-position
from tomography_utils.mlem import mlem # pylint: disable=wrong-import-position

#----------------------------------------------------------------------------
# Copy bandwidth of a large tensor: (read + write bytes) / best time.

def copy_bandwidth(mib: float = 512, repeats: int = 7) -> float:
    src = torch.ones(int(mib * 2**20) // 4)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() * 4 / min(times[1:])

#----------------------------------------------------------------------------
# Test data: smooth random blobs scaled to 1e6 counts, Poisson noise.

def make_sinograms(sm: projector.SystemMatrix, batch: int, seed: int = 0) -> torch.Tensor:
    n = sm.resolution
    gen = torch.Generator().manual_seed(seed)
    c = torch.arange(n) + 0.5 - n / 2
    yy, xx = torch.meshgrid(-c, c, indexing='ij')
    centres = (torch.rand(batch, 3, 2, generator=gen) - 0.5) * 0.5 * n
    widths = (0.08 + 0.1 * torch.rand(batch, 3, 1, 1, generator=gen)) * n
    d2 = (xx - centres[..., 0, None, None]) ** 2 + (yy - centres[..., 1, None, None]) ** 2
    phantoms = torch.exp(-d2 / (2 * widths ** 2)).sum(dim=1)
    return dose.poisson_counts(dose.expected_counts(phantoms, sm, 1e6), gen)

#----------------------------------------------------------------------------
# The reference's dense MLEM: x [B, D], A [P, D] dense, A^T 1 = 1.

def dense_mlem(y: torch.Tensor, a_dense: torch.Tensor, n_iter: int) -> torch.Tensor:
    y = y.reshape(y.shape[0], -1)
    x = torch.ones(y.shape[0], a_dense.shape[1])
    for _ in range(n_iter):
        ratio = y / torch.matmul(x, a_dense.T)
        x = x * torch.matmul(ratio, a_dense)
    return x

#----------------------------------------------------------------------------
# mlem() on torch's sparse products (the fallback back end).

def torch_mlem(y: torch.Tensor, sm: projector.SystemMatrix, n_iter: int) -> torch.Tensor:
    kernels = native.mlem_kernels
    native.mlem_kernels = lambda: None
    try:
        return mlem(y, sm, n_iter=n_iter)
    finally:
        native.mlem_kernels = kernels

#----------------------------------------------------------------------------
# Time fn() once; returns seconds.

def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0

#----------------------------------------------------------------------------
# Measure one resolution (variants alternate, best round kept) and print its report.

def bench_resolution(n: int, batch: int, iters: int, single_images: int, repeats: int, dense_max_gib: float,
        cache_dir: str, copy_bw: float) -> None:
    sm = projector.get_system_matrix(n, cache_dir=cache_dir)
    (p, d), nnz = sm.shape, sm.nnz
    y = make_sinograms(sm, batch)
    dense_gib = p * d * 4 / 2**30
    a_dense = sm.A.to_dense() if dense_gib <= dense_max_gib else None
    dense_iters = max(1, iters // (4 if n <= 64 else 25))               # Dense iterations are slow: fewer of them.
    mlem(y, sm, n_iter=2); mlem(y[:1], sm, n_iter=2); torch_mlem(y, sm, 2) # Warm-up (operators cached on sm).
    if a_dense is not None:
        dense_mlem(y, a_dense, 1)
    rates = {'batched': [], 'torch': [], 'single': [], 'dense': []}     # Image-iterations per second, per round.
    for _ in range(repeats):
        rates['batched'].append(batch * iters / timed(lambda: mlem(y, sm, n_iter=iters)))
        rates['torch'].append(batch * iters / timed(lambda: torch_mlem(y, sm, iters)))
        rates['single'].append(single_images * iters / timed(lambda: [mlem(y[i:i + 1], sm, n_iter=iters) for i in range(single_images)]))
        if a_dense is not None:
            rates['dense'].append(batch * dense_iters / timed(lambda: dense_mlem(y, a_dense, dense_iters)))
    best = {k: max(v) for k, v in rates.items() if v}
    median = {k: statistics.median(v) for k, v in rates.items() if v}

    matrix_bytes = 2 * nnz * 8 + (p + 1 + d + 1) * 4                   # A and A^T: values, int32 columns, row pointers.
    _, parts, back, _ = mlem_module.subset_operators(sm, 1, mlem_module.n_groups(sm, batch))[0]
    actual_matrix_bytes = sum(m.values().numel() * (4 + (2 if cols16 is not None else 4)) + (m.shape[0] + 1) * 4
        for m, _, _, cols16 in parts + back)                             # What the kernels stream (16-bit columns where they fit).
    dense_bytes = (3 * d + 3 * p) * 4 * batch
    achieved = (matrix_bytes + dense_bytes) * best['batched'] / batch
    actual = (actual_matrix_bytes + dense_bytes) * best['batched'] / batch
    print(f'\n{n}x{n}: A {p} x {d}, nnz {nnz} ({nnz / p:.1f}/row), batch {batch}, {iters} iterations '
        f'(single: {single_images} images; dense: {dense_iters} iterations'
        + (f', A dense {dense_gib:.2f} GiB)' if a_dense is not None else f', skipped: A dense {dense_gib:.2f} GiB > --dense-max-gib)'))
    for k in best:
        print(f'  {k:8s} {best[k]:12.0f} image-iter/s  (median {median[k]:.0f})')
    print(f'  batched / torch   {best["batched"] / best["torch"]:7.1f}x')
    print(f'  batched / single  {best["batched"] / best["single"]:7.1f}x')
    if 'dense' in best:
        print(f'  batched / dense   {best["batched"] / best["dense"]:7.1f}x   (goal at 64x64: >= 30x)')
    print(f'  bandwidth         {achieved / 1e9:7.2f} GB/s = {achieved / copy_bw:.0%} of copy bandwidth, counting an int32-index CSR '
        f'({(matrix_bytes + dense_bytes) / 2**20:.1f} MiB per batch iteration; goal >= 60%)')
    print(f'                    {actual / 1e9:7.2f} GB/s = {actual / copy_bw:.0%} counting the bytes the kernels stream '
        f'({(actual_matrix_bytes + dense_bytes) / 2**20:.1f} MiB: 16-bit column indices where a part has <= 65536 columns)')
    working_set = (matrix_bytes + dense_bytes) / 2**20
    cached_bw = copy_bandwidth(working_set / 2, repeats=50)              # Source + destination = the working set.
    print(f'                    {achieved / cached_bw:.0%} of the {cached_bw / 1e9:.1f} GB/s of a copy as large as the working set '
        f'({working_set:.1f} MiB; it may fit in the caches, which the large copy above does not)')
    print(f'  compute           {4 * nnz * best["batched"] / 1e9:7.1f} GFLOP/s in the two sparse products')

#----------------------------------------------------------------------------
# Busy cores: the fused kernels with a fixed thread count against mlem()'s
# default (1 thread while that runs faster), with `load` competing
# processes that spin (started after the warm-up, killed at the end).

def bench_load(n: int, batch: int, iters: int, repeats: int, load: int, cache_dir: str) -> None:
    sm = projector.get_system_matrix(n, cache_dir=cache_dir)
    y = make_sinograms(sm, batch)
    reference = mlem(y, sm, n_iter=iters, adapt_threads=False)
    busy = [subprocess.Popen([sys.executable, '-c', 'while True: pass']) for _ in range(load)]
    try:
        rates = {'fixed': [], 'one': [], 'adaptive': []}                 # Image-iterations per second, per round.
        for _ in range(repeats):
            rates['fixed'].append(batch * iters / timed(lambda: mlem(y, sm, n_iter=iters, adapt_threads=False)))
            rates['adaptive'].append(batch * iters / timed(lambda: mlem(y, sm, n_iter=iters)))
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                rates['one'].append(batch * iters / timed(lambda: mlem(y, sm, n_iter=iters, adapt_threads=False)))
            finally:
                torch.set_num_threads(threads)
        assert torch.equal(mlem(y, sm, n_iter=iters), reference)           # The thread count changes the time only.
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
    median = {k: statistics.median(v) for k, v in rates.items()}
    print(f'\n{n}x{n}, batch {batch}, {iters} iterations, {load} competing busy processes on {os.cpu_count()} cores '
        f'(median of {repeats} rounds):')
    print(f'  fixed {torch.get_num_threads()} threads   {median["fixed"]:10.0f} image-iter/s')
    print(f'  fixed 1 thread    {median["one"]:10.0f} image-iter/s')
    print(f'  adaptive          {median["adaptive"]:10.0f} image-iter/s  (mlem() default)')
    print(f'  adaptive / fixed  {median["adaptive"] / median["fixed"]:7.2f}x   (goal under load: > 1; results identical, asserted)')

#----------------------------------------------------------------------------

@click.command()
@click.option('--resolutions',   help='Image sizes, comma-separated', default='64,128', show_default=True)
@click.option('--batch',         help='Images per batch', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--iters',         help='MLEM iterations per timed run', type=click.IntRange(min=1), default=20, show_default=True)
@click.option('--single-images', help='Images reconstructed one at a time per round', type=click.IntRange(min=1), default=8, show_default=True)
@click.option('--repeats',       help='Rounds (variants alternate; best round reported)', type=click.IntRange(min=1), default=3, show_default=True)
@click.option('--threads',       help='torch threads (default: all CPU cores)', type=click.IntRange(min=1), default=None)
@click.option('--dense-max-gib', help='Skip the dense baseline above this matrix size', type=float, default=2.5, show_default=True)
@click.option('--load',          help='Also time the kernels beside this many busy processes (0: skip)', type=click.IntRange(min=0), default=0, show_default=True)
def main(resolutions: str, batch: int, iters: int, single_images: int, repeats: int, threads: int | None, dense_max_gib: float, load: int) -> None:
    """Batched sparse MLEM against one-at-a-time and dense MLEM, and against the copy-bandwidth roofline."""
    try:
        sizes = [int(r) for r in resolutions.split(',')]
    except ValueError:
        raise click.BadParameter(f'expected comma-separated integers, got {resolutions!r}', param_hint='--resolutions') from None
    torch.set_num_threads(threads or os.cpu_count())
    copy_bw = copy_bandwidth()
    kernels = native.mlem_kernels()
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads; copy bandwidth {copy_bw / 1e9:.2f} GB/s (512 MiB tensor copy); '
        f'fused kernels: {kernels.path if kernels else "NOT AVAILABLE (batched = torch path)"}')
    with tempfile.TemporaryDirectory(prefix='medEDM-bench-mlem-') as cache_dir:
        for n in sizes:
            bench_resolution(n, batch, iters, min(single_images, batch), repeats, dense_max_gib, cache_dir, copy_bw)
            if load:
                bench_load(n, batch, iters, repeats, load, cache_dir)

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main() # pylint: disable=no-value-for-parameter

#----------------------------------------------------------------------------
