# medEDM: diffusion-model training toolkit for medical imaging.

"""Sparse 2-D parallel-beam system matrix with an on-disk cache.

Geometry (pixel units; the same geometry as the PET reference project, whose
domain [-1, 1]^2 is this one scaled by 2/N):

    image       N x N pixels of size 1 covering the square [-N/2, N/2]^2.
                Pixel (row i, column j) has its centre at
                x = j + 1/2 - N/2, y = N/2 - i - 1/2 (row 0 at the top, y up),
                and is column i * N + j of the matrix (row-major y, x).
    angles      theta_k = k * pi / n_angles, k = 0 .. n_angles - 1 (default 2N).
    bins        s_b = (b - (n_bins - 1) / 2) * bin_width, b = 0 .. n_bins - 1
                (default N bins of width 1: the detector spans the image width).
    rays        ray (k, b) is the line {p : p . (cos theta_k, sin theta_k) = s_b}
                with direction (-sin theta_k, cos theta_k); it is matrix row
                k * n_bins + b, so a sinogram is [n_angles, n_bins].

The matrix entry a_ij is the exact length of ray i inside pixel j (Siddon's
method, "Fast calculation of the exact radiological path for a
three-dimensional CT array", Med. Phys. 12(2), 1985): the ray is cut at its
crossings with all grid lines, and each piece between two consecutive
crossings lies inside one pixel, found from the piece's midpoint. With
`normalize=True` (the reference's choice) every column is divided by its sum,
so that A^T 1 = 1 and a_ij is the probability that a decay in pixel j is
detected on ray i.

A is stored as torch sparse CSR with 32-bit indices, and A^T as a second CSR
(the implicit transpose of a CSR tensor is an order of magnitude slower in
sparse-dense products). Matrices are cached as uncompressed .npz files of the
raw CSR arrays plus the JSON geometry key, one file per geometry.
"""

import hashlib
import json
import os
import warnings
import zipfile
import zlib

import numpy as np
import torch

from torch_utils import persistence

FORMAT_VERSION = 1                      # Bump when the matrix or the file layout changes.
DEFAULT_CACHE_DIR = 'projector_matrices'
_SEGMENT_TOL = 1e-9                     # Ray pieces shorter than this (pixel units) are rounding artefacts at grid corners.
_CHUNK_ENTRIES = 1 << 22                # Crossing times held in memory at once while building.

#----------------------------------------------------------------------------
# Geometry dict of a system matrix, validated; the cache key.

def make_geometry(
    resolution: int,                    # Image size N (N x N pixels).
    n_angles:   int | None = None,      # Number of projection angles over [0, pi); None = 2N.
    n_bins:     int | None = None,      # Number of detector bins; None = N.
    bin_width:  float = 1.0,            # Detector bin width in pixels.
    normalize:  bool = True,            # Divide every column by its sum (A^T 1 = 1).
    dtype:      str | torch.dtype = 'float32', # Value type of the stored matrix.
) -> dict:
    """Return the full geometry dict (the cache key) after checking every value."""
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or resolution < 2:
        raise ValueError(f'resolution must be an integer >= 2, got {resolution!r}')
    resolution = int(resolution)
    n_angles = 2 * resolution if n_angles is None else n_angles
    n_bins = resolution if n_bins is None else n_bins
    for name, value in (('n_angles', n_angles), ('n_bins', n_bins)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f'{name} must be a positive integer, got {value!r}')
    try:
        bin_width = float(bin_width)
    except (TypeError, ValueError):
        raise ValueError(f'bin_width must be a positive number, got {bin_width!r}') from None
    if not (np.isfinite(bin_width) and bin_width > 0):
        raise ValueError(f'bin_width must be a positive number, got {bin_width!r}')
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix('torch.')
    if dtype not in ('float32', 'float64'):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    return dict(resolution=resolution, n_angles=int(n_angles), n_bins=int(n_bins), bin_width=bin_width,
        normalize=bool(normalize), dtype=dtype, version=FORMAT_VERSION)

#----------------------------------------------------------------------------
# Exact ray-pixel intersection lengths as COO triplets (float64, numpy).
# Vectorised over rays; the only Python loop is over chunks of angles.

def siddon_coo(geometry: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (rows, cols, lengths) of all non-zero ray-pixel intersections."""
    n = geometry['resolution']
    n_angles, n_bins = geometry['n_angles'], geometry['n_bins']
    half = n / 2
    theta = np.arange(n_angles, dtype=np.float64) * (np.pi / n_angles)
    s = (np.arange(n_bins, dtype=np.float64) - (n_bins - 1) / 2) * geometry['bin_width']
    grid = np.arange(n + 1, dtype=np.float64) - half             # Grid lines x = g and y = g.
    angles_per_chunk = max(1, _CHUNK_ENTRIES // (n_bins * (2 * n + 2)))
    rows, cols, vals = [], [], []
    for k0 in range(0, n_angles, angles_per_chunk):
        cos = np.cos(theta[k0:k0 + angles_per_chunk])[:, None, None]
        sin = np.sin(theta[k0:k0 + angles_per_chunk])[:, None, None]
        sb = s[None, :, None]
        # Point on the ray at parameter t: p(t) = s (cos, sin) + t (-sin, cos).
        with np.errstate(divide='ignore', invalid='ignore'):
            tx = (sb * cos - grid) / sin                       # x(t) = s cos - t sin = g.
            ty = (grid - sb * sin) / cos                       # y(t) = s sin + t cos = g.
            t = np.sort(np.concatenate(np.broadcast_arrays(tx, ty), axis=2), axis=2)
            length = np.diff(t, axis=2)                        # Pieces between consecutive crossings.
            mid = (t[..., 1:] + t[..., :-1]) / 2
            xm = sb * cos - mid * sin
            ym = sb * sin + mid * cos
            keep = (length > _SEGMENT_TOL) & (np.abs(xm) < half) & (np.abs(ym) < half) # Non-finite pieces (rays parallel to grid lines) fail these tests.
        ka, kb, _ = np.nonzero(keep)
        j = np.clip(np.floor(xm[keep] + half), 0, n - 1).astype(np.int64)
        i = np.clip(np.floor(half - ym[keep]), 0, n - 1).astype(np.int64)
        rows.append((ka + k0) * n_bins + kb)
        cols.append(i * n + j)
        vals.append(length[keep])
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)

#----------------------------------------------------------------------------
# CSR helpers.

# Build a CSR tensor without torch's beta-state and invariant-check warnings.
def make_csr(crow: torch.Tensor, col: torch.Tensor, vals: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', UserWarning)
        return torch.sparse_csr_tensor(crow, col, vals, size=shape, check_invariants=False)

# Row index of every stored value of a CSR tensor.
def csr_row_indices(m: torch.Tensor) -> torch.Tensor:
    crow = m.crow_indices()
    return torch.repeat_interleave(torch.arange(m.shape[0], device=crow.device), (crow[1:] - crow[:-1]).long())

#----------------------------------------------------------------------------
# Build the CSR arrays (numpy, int32 indices) of A and A^T for a geometry.
# The triplets come out ray by ray, so a stable sort (runs) orders A, and a
# stable sort by column (radix sort on 16-bit keys) then orders A^T.

def build_arrays(geometry: dict) -> dict[str, np.ndarray]:
    n = geometry['resolution']
    n_rays, n_pixels = geometry['n_angles'] * geometry['n_bins'], n * n
    rows, cols, vals = siddon_coo(geometry)
    if vals.size >= 2**31:
        raise ValueError(f'system matrix has {vals.size} non-zeros; 32-bit indices allow at most 2^31 - 1')
    key = rows * n_pixels + cols
    order = np.argsort(key, kind='stable')
    key, vals = key[order], vals[order]
    if key.size > 1 and np.any(key[1:] == key[:-1]): # Cannot happen for a convex pixel; merged for safety.
        key, inverse = np.unique(key, return_inverse=True)
        vals = np.bincount(inverse, weights=vals, minlength=key.size)
    rows, cols = key // n_pixels, key % n_pixels
    if geometry['normalize']: # Columns divided by their sums: the sensitivity image becomes 1.
        colsum = np.bincount(cols, weights=vals, minlength=n_pixels)
        vals = vals / np.where(colsum > 0, colsum, 1)[cols]
    vals = vals.astype(geometry['dtype'])
    order = np.argsort(cols.astype(np.uint16) if n_pixels <= 2**16 else cols, kind='stable')
    crow = lambda r, size: np.concatenate([[0], np.cumsum(np.bincount(r, minlength=size))]).astype(np.int32)
    return dict(A_crow=crow(rows, n_rays), A_col=cols.astype(np.int32), A_val=vals,
        AT_crow=crow(cols, n_pixels), AT_col=rows[order].astype(np.int32), AT_val=vals[order])

#----------------------------------------------------------------------------
# Check loaded arrays against the geometry (shapes, types, index ranges).

def _check_arrays(arrays: dict[str, np.ndarray], geometry: dict) -> None:
    n_rays, n_pixels = geometry['n_angles'] * geometry['n_bins'], geometry['resolution'] ** 2
    for prefix, n_rows, n_cols in (('A', n_rays, n_pixels), ('AT', n_pixels, n_rays)):
        crow, col, val = arrays[f'{prefix}_crow'], arrays[f'{prefix}_col'], arrays[f'{prefix}_val']
        if crow.dtype != np.int32 or col.dtype != np.int32 or val.dtype != np.dtype(geometry['dtype']):
            raise ValueError(f'{prefix}: unexpected array types')
        if crow.shape != (n_rows + 1,) or col.ndim != 1 or val.shape != col.shape or crow[0] != 0 or crow[-1] != col.size:
            raise ValueError(f'{prefix}: inconsistent CSR shapes')
        if np.any(np.diff(crow) < 0) or (col.size and (col.min() < 0 or col.max() >= n_cols)) or not np.all(np.isfinite(val)):
            raise ValueError(f'{prefix}: invalid CSR contents')
    if arrays['A_col'].size != arrays['AT_col'].size:
        raise ValueError('A and AT have different numbers of non-zeros')

#----------------------------------------------------------------------------
# Cache file name: readable geometry plus a hash of the exact key.

def cache_path(cache_dir: str | os.PathLike, geometry: dict) -> str:
    key = json.dumps(geometry, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    g = geometry
    name = (f"projector_{g['resolution']}x{g['resolution']}_a{g['n_angles']}_b{g['n_bins']}_w{g['bin_width']:g}"
        f"_{'colnorm' if g['normalize'] else 'raw'}_{g['dtype']}_v{g['version']}_{digest}.npz")
    return os.path.join(os.fspath(cache_dir), name)

# Read a cache file; raises on any damage or key mismatch.
def _load_arrays(path: str, geometry: dict) -> dict[str, np.ndarray]:
    z = np.load(path, allow_pickle=False)
    if not isinstance(z, np.lib.npyio.NpzFile):                         # A valid .npy file under the name.
        raise ValueError(f'not an npz archive (np.load gave {type(z).__name__})')
    with z:
        stored = json.loads(str(z['key'][()]))
        if stored != geometry:
            raise ValueError(f'stored geometry {stored} does not match the requested {geometry}')
        arrays = {name: z[name] for name in ('A_crow', 'A_col', 'A_val', 'AT_crow', 'AT_col', 'AT_val')}
    _check_arrays(arrays, geometry)
    return arrays

# Write a cache file atomically.
def _save_arrays(path: str, geometry: dict, arrays: dict[str, np.ndarray]) -> None:
    key = np.array(json.dumps(geometry, sort_keys=True))
    persistence.atomic_write(path, lambda f: np.savez(f, key=key, **arrays))

#----------------------------------------------------------------------------
# The system matrix: A and A^T as CSR tensors, plus its geometry.

class SystemMatrix:
    """Parallel-beam system matrix A [n_angles * n_bins, N * N] and its transpose.

    Attributes: `A`, `AT` (torch sparse CSR, int32 indices), `shape`,
    `geometry` (dict), `resolution`, `n_angles`, `n_bins`, `dtype`, `device`,
    `sensitivity` (A^T 1 as an [N * N] tensor), `source` ('built', 'loaded'
    or 'moved') and `path` (cache file or None).
    """

    def __init__(self, geometry: dict, arrays: dict[str, np.ndarray], source: str, path: str | None = None,
            device: torch.device | str | None = None):
        self.geometry = dict(geometry)
        self.source = source
        self.path = path
        n = geometry['resolution']
        self.shape = (geometry['n_angles'] * geometry['n_bins'], n * n)
        t = {k: torch.from_numpy(v).to(device) for k, v in arrays.items()}
        self.A = make_csr(t['A_crow'], t['A_col'], t['A_val'], self.shape)
        self.AT = make_csr(t['AT_crow'], t['AT_col'], t['AT_val'], self.shape[::-1])
        self._derived = {} # Cached by mlem: sensitivity-scaled back-projectors, OSEM subsets.

    resolution = property(lambda self: self.geometry['resolution'])
    n_angles = property(lambda self: self.geometry['n_angles'])
    n_bins = property(lambda self: self.geometry['n_bins'])
    dtype = property(lambda self: self.A.values().dtype)
    device = property(lambda self: self.A.device)
    nnz = property(lambda self: self.A.values().numel())

    @property
    def sensitivity(self) -> torch.Tensor:
        """A^T 1: the sum of every column of A, one value per pixel."""
        if 'sensitivity' not in self._derived:
            self._derived['sensitivity'] = torch.zeros(self.shape[1], dtype=self.dtype, device=self.device).index_add_(
                0, self.A.col_indices().long(), self.A.values())
        return self._derived['sensitivity']

    def to(self, device: torch.device | str) -> 'SystemMatrix':
        """Return a copy of this matrix on another device (the matrix itself if already there)."""
        if torch.device(device) == self.device:
            return self
        arrays = {'A_crow': self.A.crow_indices(), 'A_col': self.A.col_indices(), 'A_val': self.A.values(),
            'AT_crow': self.AT.crow_indices(), 'AT_col': self.AT.col_indices(), 'AT_val': self.AT.values()}
        out = SystemMatrix.__new__(SystemMatrix)
        out.geometry, out.source, out.path, out.shape, out._derived = dict(self.geometry), 'moved', self.path, self.shape, {}
        out.A = make_csr(*(arrays[k].to(device) for k in ('A_crow', 'A_col', 'A_val')), self.shape)
        out.AT = make_csr(*(arrays[k].to(device) for k in ('AT_crow', 'AT_col', 'AT_val')), self.shape[::-1])
        return out

    def check_images(self, x: torch.Tensor, name: str = 'images') -> torch.Tensor:
        """Return images [B, N, N] or [B, 1, N, N] as [B, N * N]; ValueError on a wrong shape."""
        n = self.resolution
        if not isinstance(x, torch.Tensor) or not (x.ndim == 3 or (x.ndim == 4 and x.shape[1] == 1)) or x.shape[-2:] != (n, n):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f'{name} shape {shape} does not match the system matrix: expected [B, {n}, {n}] or [B, 1, {n}, {n}]')
        return x.reshape(x.shape[0], n * n)

    def check_sinograms(self, y: torch.Tensor, name: str = 'sinograms') -> torch.Tensor:
        """Return sinograms [B, n_angles, n_bins] or [B, 1, n_angles, n_bins] as [B, P]; ValueError on a wrong shape."""
        na, nb = self.n_angles, self.n_bins
        if not isinstance(y, torch.Tensor) or not (y.ndim == 3 or (y.ndim == 4 and y.shape[1] == 1)) or y.shape[-2:] != (na, nb):
            shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f'{name} shape {shape} does not match the system matrix geometry: expected [B, {na}, {nb}] '
                f'or [B, 1, {na}, {nb}] (n_angles={na}, n_bins={nb}, resolution {self.resolution}x{self.resolution})')
        return y.reshape(y.shape[0], na * nb)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Project images [B, N, N] or [B, 1, N, N] to sinograms [B, n_angles, n_bins] (y = A x)."""
        flat = self.check_images(x).to(device=self.device, dtype=self.dtype)
        y = torch.sparse.mm(self.A, flat.T.contiguous())
        return y.T.reshape(flat.shape[0], self.n_angles, self.n_bins)

    def back(self, y: torch.Tensor) -> torch.Tensor:
        """Back-project sinograms [B, n_angles, n_bins] or [B, 1, ...] to images [B, N, N] (x = A^T y)."""
        flat = self.check_sinograms(y).to(device=self.device, dtype=self.dtype)
        x = torch.sparse.mm(self.AT, flat.T.contiguous())
        return x.T.reshape(flat.shape[0], self.resolution, self.resolution)

    def __repr__(self) -> str:
        return f'SystemMatrix({self.geometry}, nnz={self.nnz}, device={self.device}, source={self.source!r})'

#----------------------------------------------------------------------------
# Get a system matrix: load it from the cache, or build it (and cache it).

def get_system_matrix(
    resolution: int,                                    # Image size N (N x N pixels).
    n_angles:   int | None = None,                      # Projection angles over [0, pi); None = 2N (the reference).
    n_bins:     int | None = None,                      # Detector bins; None = N (the reference).
    bin_width:  float = 1.0,                            # Detector bin width in pixels.
    normalize:  bool = True,                            # Column-normalise (the reference's A, A^T 1 = 1).
    dtype:      str | torch.dtype = 'float32',          # Value type of the stored matrix.
    cache_dir:  str | os.PathLike | None = DEFAULT_CACHE_DIR, # Cache folder; None = build in memory, no file.
    device:     torch.device | str | None = None,       # Where A and A^T live (None = CPU).
) -> SystemMatrix:
    """Return the system matrix of a geometry, loaded from `cache_dir` when a
    valid file exists, else built (and written there atomically). `.source`
    tells which happened. A cache file that is damaged or whose stored key
    differs from the geometry is rebuilt, with a warning naming the file; a
    cache folder that cannot be written gives a warning and an uncached
    matrix (`.path` None)."""
    geometry = make_geometry(resolution, n_angles, n_bins, bin_width, normalize, dtype)
    if cache_dir is None:
        return SystemMatrix(geometry, build_arrays(geometry), 'built', None, device)
    path = cache_path(cache_dir, geometry)
    if os.path.exists(path):
        try:
            return SystemMatrix(geometry, _load_arrays(path, geometry), 'loaded', path, device)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            warnings.warn(f'projector cache file {path} is damaged or does not match its geometry ({e}); rebuilding it',
                RuntimeWarning, stacklevel=2)
    arrays = build_arrays(geometry)
    try:
        os.makedirs(cache_dir, exist_ok=True)
        _save_arrays(path, geometry, arrays)
    except OSError as e: # A read-only or full disk costs a rebuild next time, not this run.
        warnings.warn(f'could not write projector cache file {path} ({e}); the matrix is not cached', RuntimeWarning, stacklevel=2)
        path = None
    return SystemMatrix(geometry, arrays, 'built', path, device)

#----------------------------------------------------------------------------
