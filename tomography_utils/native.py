# medEDM: diffusion-model training toolkit for medical imaging.

"""Build and load the fused MLEM CPU kernels (tomography_utils/mlem_kernels.c).

The C file is compiled on first use with the system C compiler
(`$CC`, default `cc`: -O3 -march=native -fopenmp -shared) into a cache folder
(`$MEDEDM_NATIVE_CACHE`, default ~/.cache/medEDM/native), under a name
keyed by the source, the compiler and the CPU, so that a cache shared
between machines never hands one CPU another's instructions; the file is
written atomically, so concurrent ranks may build at once. It is loaded
with ctypes (no Python or torch headers, about a second to build).

Where no compiler works, or with MEDEDM_NATIVE=0, `mlem_kernels()`
returns None (with one warning naming the reason, unless disabled on
purpose) and mlem.py uses torch's sparse products instead: slower, same
results to rounding.
"""

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import time
import warnings
from typing import Callable

import torch

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'mlem_kernels.c')
# -ffp-contract=fast: a * x + acc is one FMA in the vector and the scalar
# loops alike; -fno-tree-vectorize: the scalar loop (the columns left over
# after the last whole vector) stays scalar, so every column sees the same
# roundings whatever the batch size (the kernels vectorise by hand).
FLAGS = ['-O3', '-march=native', '-std=gnu11', '-ffp-contract=fast', '-fno-tree-vectorize', '-fPIC', '-shared']
# Threads: OpenMP. The library asks for libgomp.so.1, and the dynamic loader
# hands it the one already in the process (torch's wheels load
# torch/lib/libgomp.so.1 on import), so the kernels run on torch's own
# intra-op thread pool: no second pool whose threads would compete with
# torch's spinning ones (with a private POSIX-thread pool, iterations after
# a torch op ran at half speed for milliseconds). With a torch built on
# another OpenMP runtime (e.g. Intel's libiomp5) the system libgomp loads
# beside it: correct results, but two thread pools. Where the compiler has
# no OpenMP the library is built without it and runs on one thread.
OPENMP = ['-fopenmp']

_loaded = {} # Cache of mlem_kernels(): {'lib': MlemKernels or None}.
CHUNK       = 4     # Iterations per call of run_iterations() on the faster thread count (one parallel region each).
PROBE_EVERY = 8     # Chunks between two measurements of the slower thread count.

#----------------------------------------------------------------------------
# What makes a build reusable: source, compiler, flags and CPU.

def _cpu_identity() -> str:
    try:
        with open('/proc/cpuinfo', encoding='utf-8', errors='replace') as f:
            lines = [l for l in f if l.startswith(('model name', 'flags', 'Features', 'CPU part'))]
        return ''.join(sorted(set(lines)))
    except OSError:
        return platform.machine() + platform.processor()

def _compiler_version(cc: str) -> str:
    out = subprocess.run([cc, '--version'], capture_output=True, text=True, timeout=60, check=True)
    return out.stdout

def cache_dir() -> str:
    return os.environ.get('MEDEDM_NATIVE_CACHE') or os.path.join(os.path.expanduser('~'), '.cache', 'medEDM', 'native')

#----------------------------------------------------------------------------
# Compile (if needed) and return the path of the shared library.

def build(cc: str | None = None) -> str:
    """Compile mlem_kernels.c for this CPU unless a matching build is cached; return its path.
    Raises OSError / subprocess.CalledProcessError when the compiler is missing or fails."""
    cc = cc or os.environ.get('CC') or 'cc'
    if shutil.which(cc) is None:
        raise OSError(f'C compiler {cc!r} not found (set $CC)')
    with open(SOURCE, 'rb') as f:
        source = f.read()
    identity = [source, _compiler_version(cc).encode(), _cpu_identity().encode()]
    try:
        return _compile(cc, FLAGS + OPENMP, identity)
    except subprocess.CalledProcessError:
        path = _compile(cc, FLAGS, identity)
        warnings.warn(f'{cc} could not compile the fused MLEM kernels with {" ".join(OPENMP)}: they run on one thread',
            RuntimeWarning, stacklevel=2)
        return path

# Compile with `flags` into the cache unless that build is there; return its path.
def _compile(cc: str, flags: list[str], identity: list[bytes]) -> str:
    key = hashlib.sha256(b'\0'.join(identity + [' '.join(flags).encode()])).hexdigest()[:16]
    folder = cache_dir()
    path = os.path.join(folder, f'mlem_kernels-{key}.so')
    if os.path.exists(path):
        return path
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix='.so.tmp')
    os.close(fd)
    try:
        subprocess.run([cc, *flags, SOURCE, '-o', tmp], capture_output=True, text=True, timeout=300, check=True)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path

#----------------------------------------------------------------------------
# The loaded kernels, with argument types.

class Job(ctypes.Structure):
    """One pass over a CSR matrix (job_t in mlem_kernels.c)."""
    _fields_ = [('is_double', ctypes.c_int), ('back', ctypes.c_int), ('accumulate', ctypes.c_int), ('finish', ctypes.c_int),
        ('col16', ctypes.c_int), ('pad', ctypes.c_int), ('r0', ctypes.c_int64), ('r1', ctypes.c_int64), ('width', ctypes.c_int64),
        ('crow', ctypes.c_void_p), ('col', ctypes.c_void_p), ('val', ctypes.c_void_p), ('inp', ctypes.c_void_p),
        ('aux', ctypes.c_void_p), ('out', ctypes.c_void_p), ('part', ctypes.c_void_p), ('eps', ctypes.c_double)]

class MlemKernels:
    """ctypes wrapper of the fused kernels. A pass is a Job that holds raw
    pointers (tensor.data_ptr()): the tensors must outlive every run of it."""

    def __init__(self, path: str):
        lib = ctypes.CDLL(path)
        lib.medEDM_run.argtypes = [ctypes.POINTER(Job), ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.medEDM_run.restype = None
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        lib.medEDM_permute_transpose.argtypes = [ctypes.c_int, p, p, p, i64, i64, i64, i64, i64, i64, ctypes.c_int]
        lib.medEDM_permute_transpose.restype = None
        self.lib, self.path = lib, path

    @staticmethod
    def _check(m: torch.Tensor, cols16: torch.Tensor | None, *dense: torch.Tensor) -> None:
        # The C side reads raw pointers: refuse what it would misread.
        if m.layout != torch.sparse_csr or m.crow_indices().dtype != torch.int32 or m.col_indices().dtype != torch.int32:
            raise ValueError('the fused MLEM kernels need a CSR matrix with int32 indices (projector.make_csr)')
        if cols16 is not None and (cols16.dtype != torch.uint16 or not cols16.is_contiguous() or cols16.shape != m.col_indices().shape):
            raise ValueError('cols16 must be the matrix\'s column indices as a contiguous uint16 tensor (narrow_columns)')
        if any(t is not None and (not t.is_contiguous() or t.dtype != m.dtype or t.device.type != 'cpu') for t in dense):
            raise ValueError(f'the fused MLEM kernels need contiguous CPU tensors of the matrix dtype {m.dtype}')

    @staticmethod
    def _job(m: torch.Tensor, cols16: torch.Tensor | None, back: bool, inp, aux, out, part, width: int, eps: float,
            accumulate: bool, finish: bool) -> Job:
        ptr = lambda t: None if t is None else t.data_ptr()
        cols = m.col_indices() if cols16 is None else cols16
        return Job(int(m.dtype == torch.float64), int(back), int(accumulate), int(finish), int(cols16 is not None), 0, 0, m.shape[0],
            width, m.crow_indices().data_ptr(), cols.data_ptr(), m.values().data_ptr(), ptr(inp), ptr(aux), ptr(out), ptr(part), eps)

    def forward_job(self, a, x, y, f, eps: float, accumulate: bool = False, finish: bool = True, cols16=None) -> Job:
        """The pass f = y / (s + eps), s = a @ x (+ f with `accumulate`); without `finish`, f = s.
        CSR a (cols16: its column indices as uint16, see narrow_columns, or None); contiguous row-major x, y, f of one width."""
        self._check(a, cols16, x, y, f)
        return self._job(a, cols16, False, x, y, f, None, x.shape[1], eps, accumulate, finish)

    def back_job(self, b, f, keep, x, u, accumulate: bool = False, finish: bool = True, cols16=None) -> Job:
        """The pass x *= s + keep in place, s = b @ f (+ u with `accumulate`); without `finish`, u = s.
        CSR b (cols16 as in forward_job); keep [rows, 1] or None; u (partial sums) may be None when `finish` and not `accumulate`."""
        self._check(b, cols16, f, keep, x, u)
        return self._job(b, cols16, True, f, keep, x, u, x.shape[1], 0.0, accumulate, finish)

    def plan(self, jobs: list[Job]) -> ctypes.Array:
        """Passes to run in order by `run` (one call, one parallel region)."""
        return (Job * len(jobs))(*jobs)

    def run(self, plan: ctypes.Array, threads: int, repeats: int = 1) -> None:
        """Run the passes of `plan` in order, `repeats` times, on `threads` threads (a barrier after each)."""
        self.lib.medEDM_run(plan, len(plan), repeats, threads)

    def run_iterations(self, plan: ctypes.Array, threads: int, n_iter: int, after: Callable[[int], None] | None = None,
            adaptive: bool = True) -> None:
        """Run `plan` n_iter times, calling after(it) after iteration it = 1..n_iter if given.

        With `adaptive` and threads > 1, iterations are timed with `threads` and with
        one thread, and run in chunks on whichever was faster, the other re-measured
        now and then (one iteration every PROBE_EVERY chunks). Every pass ends in a
        barrier, so when other processes keep the cores busy a pass waits for the
        thread the scheduler has set aside: with two busy loops on 2 cores, 2 threads
        ran 3.5x slower than 1 (bench/mlem.py --load). Results do not depend on the
        thread count (tests/test_mlem_native.py), so the choice changes only the time."""
        if not adaptive or threads <= 1:
            if after is None:
                self.run(plan, threads, repeats=n_iter)
            else:
                for it in range(1, n_iter + 1):
                    self.run(plan, threads)
                    after(it)
            return
        per_iter = {threads: None, 1: None}                 # Seconds per iteration, as last measured.
        age = {threads: 0, 1: 0}                            # Chunks run since each was measured.
        done = 0
        while done < n_iter:
            stale = [t for t in per_iter if per_iter[t] is None or age[t] >= PROBE_EVERY]
            t = stale[0] if stale else min(per_iter, key=per_iter.get)
            k = min(1 if stale or after is not None else CHUNK, n_iter - done)
            start = time.perf_counter()
            self.run(plan, t, repeats=k)
            per_iter[t] = (time.perf_counter() - start) / k
            for other in age:
                age[other] = 0 if other == t else age[other] + 1
            done += k
            if after is not None:
                after(done)

    def _permute_transpose(self, src: torch.Tensor, dst: torch.Tensor, out: torch.Tensor, rows_to_columns: bool, threads: int) -> None:
        # out[dst[i], j] = src[j, i] (columns to rows) or out[j, dst[i]] = src[i, j] (rows to columns).
        n_j, n_i = src.shape if not rows_to_columns else src.shape[::-1]
        out_j, out_i = out.shape if rows_to_columns else out.shape[::-1]
        if (src.dtype not in (torch.float32, torch.float64) or out.dtype != src.dtype or dst.dtype != torch.int64
                or any(not t.is_contiguous() or t.device.type != 'cpu' for t in (src, dst, out))):
            raise ValueError('the permuted transpose needs contiguous CPU tensors: float32 / float64 src and out of one dtype, int64 dst')
        if dst.shape != (n_i,) or out_j != n_j or (n_i > 0 and int(dst.max()) >= out_i):
            raise ValueError(f'the permuted transpose got src {tuple(src.shape)}, dst {tuple(dst.shape)} and out {tuple(out.shape)}, '
                f'which do not fit')
        strides = (n_j, 1, 1, out_i) if rows_to_columns else (1, n_i, n_j, 1)  # is_i, is_j, os_i, os_j
        self.lib.medEDM_permute_transpose(int(src.dtype == torch.float64), src.data_ptr(), out.data_ptr(), dst.data_ptr(),
            n_i, n_j, *strides, threads)

    def columns_to_rows(self, src: torch.Tensor, dst: torch.Tensor, out: torch.Tensor, threads: int) -> None:
        """out[dst[i], :] = src[:, i] for every column i of src [J, I] with dst[i] >= 0 (dst: int64)."""
        self._permute_transpose(src, dst, out, False, threads)

    def rows_to_columns(self, src: torch.Tensor, dst: torch.Tensor, out: torch.Tensor, threads: int) -> None:
        """out[:, dst[i]] = src[i, :] for every row i of src [I, J] with dst[i] >= 0 (dst: int64)."""
        self._permute_transpose(src, dst, out, True, threads)

    def forward_ratio(self, a, x, y, f, eps: float, threads: int, accumulate: bool = False, finish: bool = True, cols16=None) -> None:
        """Run one forward pass (forward_job) now."""
        self.run(self.plan([self.forward_job(a, x, y, f, eps, accumulate, finish, cols16)]), threads)

    def back_update(self, b, f, keep, x, u, threads: int, accumulate: bool = False, finish: bool = True, cols16=None) -> None:
        """Run one back-projection pass (back_job) now."""
        self.run(self.plan([self.back_job(b, f, keep, x, u, accumulate, finish, cols16)]), threads)

#----------------------------------------------------------------------------
# The kernels read 16-bit column indices where a matrix has at most 65536
# columns (6 instead of 8 bytes per nonzero; same results).

def narrow_columns(m: torch.Tensor) -> torch.Tensor | None:
    """The column indices of CSR `m` as uint16, or None where they do not fit or `m` is not on the CPU."""
    if m.device.type != 'cpu' or m.shape[1] > 2**16:
        return None
    return m.col_indices().to(torch.uint16)

#----------------------------------------------------------------------------

def mlem_kernels() -> MlemKernels | None:
    """Return the fused MLEM kernels, built on first use, or None where they
    are disabled (MEDEDM_NATIVE=0) or cannot be built (one warning)."""
    if 'lib' not in _loaded:
        lib = None
        if os.environ.get('MEDEDM_NATIVE', '1') != '0':
            try:
                lib = MlemKernels(build())
            except (OSError, subprocess.SubprocessError) as e:
                detail = getattr(e, 'stderr', None) or str(e)
                warnings.warn(f'could not build the fused MLEM kernels ({detail.strip()[:500]}); '
                    f'MLEM on CPU uses torch sparse products instead (slower)', RuntimeWarning, stacklevel=2)
        _loaded['lib'] = lib
    return _loaded['lib']

#----------------------------------------------------------------------------
