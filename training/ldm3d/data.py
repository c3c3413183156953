# medEDM: diffusion-model training toolkit for medical imaging.

"""BraTS 2023 inpainting data: the case layout, conditioning folders, the
patient-level split, padding to a multiple of the downsampling, and the
training dataset of both LDM stages.

Layout (one folder per case; several masks per case, XXXX = 0000, 0001, ...):

    <path>/<case>/<case>-t1n.nii.gz                 ground truth T1 (training and evaluation only)
    <path>/<case>/<case>-t1n-voided-XXXX.nii.gz     T1 with mask XXXX set to 0
    <path>/<case>/<case>-mask-XXXX.nii.gz           region to inpaint (> 0)
    <growth_path>/<case>-growth.nii.gz              tumour-growth concentration in [0, 1] (0 for healthy inpainting)
    <tissue_path>/<case>-tissue-XXXX.nii.gz         tissue labels 0 background, 1 CSF, 2 grey, 3 white matter, of the
                                                    voided image XXXX (e.g. an atlas-based segmentation of it), or
    <tissue_path>/<case>-tissue.nii.gz              one map for every mask of the case (used where no per-mask file is)

The tissue map is an input of inference: it must not depend on the ground
truth inside the mask (segment the voided T1, as the challenge requires), so
the builder (synth.py) writes one per mask.

Intensities: every volume of an item is divided by the 99.5th percentile of
the voided image's non-zero voxels (the only image seen at inference) and
mapped x -> 2 x / p - 1 (background -1); no clipping, so the map is undone
exactly. Conditions (4 channels): growth >= 0.2 and the one-hot tissue
classes 1, 2, 3.

Patient-level split: a case goes to `test` when a hash of its name and the
split seed falls in the lowest `test_fraction`, else to `train`; every mask
of a case stays with it, whatever other cases exist."""

import hashlib
import os
import re

import numpy as np
from scipy import ndimage, sparse
from scipy.sparse import linalg as sparse_linalg

from training.dataset import Dataset

GROWTH_THRESHOLD = 0.2                  # Growth map -> binary condition (Biller et al.).
TISSUE_CLASSES = (1, 2, 3)              # CSF, grey matter, white matter.
COND_CHANNELS = 1 + len(TISSUE_CLASSES)

#----------------------------------------------------------------------------
# Case discovery and file names.

def t1n_file(root: str, case: str) -> str:
    return os.path.join(root, case, f'{case}-t1n.nii.gz')

def voided_file(root: str, case: str, k: int) -> str:
    return os.path.join(root, case, f'{case}-t1n-voided-{k:04d}.nii.gz')

def mask_file(root: str, case: str, k: int) -> str:
    return os.path.join(root, case, f'{case}-mask-{k:04d}.nii.gz')

def inference_name(case: str, k: int) -> str:
    """The challenge's output name, with the mask index (several masks per case)."""
    return f'{case}-t1n-inference-{k:04d}.nii.gz'

def growth_file(growth_path: str, case: str) -> str:
    return os.path.join(growth_path, f'{case}-growth.nii.gz')

def tissue_file(tissue_path: str, case: str, k: int | None = None) -> str:
    """The tissue map of mask k (<case>-tissue-XXXX.nii.gz), or the case's one map when k is None."""
    return os.path.join(tissue_path, f'{case}-tissue.nii.gz' if k is None else f'{case}-tissue-{k:04d}.nii.gz')

def find_tissue_file(tissue_path: str, case: str, k: int) -> str:
    """The per-mask tissue map when it exists, else the per-case one (which may be missing: load_case says so).
    A case with per-mask maps must have one for every mask: its per-case map (if any) is likely a segmentation
    of the full T1, which would carry the ground truth into the holes."""
    path = tissue_file(tissue_path, case, k)
    if os.path.isfile(path):
        return path
    pattern = re.compile(re.escape(case) + r'-tissue-\d{4}\.nii\.gz$')
    others = sorted(n for n in (os.listdir(tissue_path) if os.path.isdir(tissue_path) else []) if pattern.match(n))
    if others:
        raise ValueError(f'conditioning file missing for case {case}: {path} (the case has per-mask tissue maps, e.g. {others[0]}; '
            f'every mask needs its own, computed from its voided image)')
    return tissue_file(tissue_path, case)

_MASK_RE = re.compile(r'^(?P<case>.+)-mask-(?P<k>\d{4})\.nii\.gz$')

def find_items(root: str, key: str = 'path', need_t1n: bool = True) -> list[tuple[str, int]]:
    """[(case, mask index)] of every mask in the layout, sorted; ValueError naming the folder or file."""
    if not isinstance(root, str) or not os.path.isdir(root):
        raise ValueError(f'{key}: {root!r} is not a folder of BraTS inpainting cases')
    items = []
    for case in sorted(os.listdir(root)):
        folder = os.path.join(root, case)
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            m = _MASK_RE.match(name)
            if m and m.group('case') == case:
                k = int(m.group('k'))
                if not os.path.isfile(voided_file(root, case, k)):
                    raise ValueError(f'{key}: {mask_file(root, case, k)} has no voided image {voided_file(root, case, k)}')
                items.append((case, k))
        if need_t1n and any(c == case for c, _ in items) and not os.path.isfile(t1n_file(root, case)):
            raise ValueError(f'{key}: ground truth {t1n_file(root, case)} is missing')
    if not items:
        raise ValueError(f'{key}: no <case>/<case>-mask-XXXX.nii.gz files in {root}')
    return items

def split_of(case: str, test_fraction: float = 0.2, seed: int = 0) -> str:
    """'train' or 'test' for one case (patient level, independent of the other cases)."""
    h = int.from_bytes(hashlib.sha256(f'{seed}:{case}'.encode()).digest()[:8], 'big') / 2.0 ** 64
    return 'test' if h < test_fraction else 'train'

def split_items(items, split: str, test_fraction: float = 0.2, seed: int = 0, key: str = 'split') -> list[tuple[str, int]]:
    if split not in ('train', 'test', 'all'):
        raise ValueError(f"{key}: expected 'train', 'test' or 'all', got {split!r}")
    return [it for it in items if split == 'all' or split_of(it[0], test_fraction, seed) == split]

#----------------------------------------------------------------------------
# NIfTI reading with checks that name the file.

def read_volume(path: str, what: str) -> tuple[np.ndarray, object]:
    """(data float32 (i, j, k), nibabel image) of a 3-D NIfTI file."""
    import nibabel as nib
    if not os.path.isfile(path):
        raise ValueError(f'{what}: file not found: {path}')
    try:
        img = nib.load(path)
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as err: # pylint: disable=broad-except # nibabel raises many kinds.
        raise ValueError(f'{what}: cannot read NIfTI file {path}: {err}') from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f'{what}: {path} must be a 3-D volume, got shape {data.shape}')
    if not np.isfinite(data).all():
        raise ValueError(f'{what}: {path} contains NaN or Inf')
    return data, img

def check_geometry(ref_path: str, ref_img, ref_data: np.ndarray, path: str, img, data: np.ndarray) -> None:
    """Same shape and affine as the voided image, or a ValueError naming both files."""
    if data.shape != ref_data.shape:
        raise ValueError(f'{path} has shape {list(data.shape)}, but {ref_path} has {list(ref_data.shape)}')
    if not np.allclose(np.asarray(img.affine), np.asarray(ref_img.affine), atol=1e-4):
        raise ValueError(f'{path} has a different affine (voxel-to-world matrix) than {ref_path}')

def check_mask(mask: np.ndarray, voided: np.ndarray, path: str) -> None:
    if not mask.any():
        raise ValueError(f'{path}: the mask is empty (nothing to inpaint)')
    known_brain = (voided != 0) & ~mask
    if not known_brain.any():
        raise ValueError(f'{path}: the mask covers the whole brain (no known tissue left to condition on)')

def intensity_scale(voided: np.ndarray, mask: np.ndarray) -> float:
    """99.5th percentile of the voided image's known non-zero voxels."""
    brain = voided[(voided != 0) & ~mask]
    return float(np.percentile(brain, 99.5)) if brain.size else 1.0

def normalize(x: np.ndarray, scale: float) -> np.ndarray:
    return (x / np.float32(scale) * 2 - 1).astype(np.float32)

def denormalize(y: np.ndarray, scale: float) -> np.ndarray:
    return ((y + 1) / 2 * np.float32(scale)).astype(np.float32)

def conditions(growth: np.ndarray, tissue: np.ndarray) -> np.ndarray:
    """(4, i, j, k): growth >= 0.2, one-hot tissue classes 1, 2, 3."""
    channels = [(growth >= GROWTH_THRESHOLD)] + [np.rint(tissue) == c for c in TISSUE_CLASSES]
    return np.stack(channels).astype(np.float32)

#----------------------------------------------------------------------------
# The harmonic fill of the mask from its border (Laplace's equation,
# 6-neighbour, Dirichlet values = the voided image): parameter-free, a
# deterministic function of what inference sees. It is the `diffusion_fill`
# baseline, and, with `ae_cond`, an input of the autoencoder's decoder.

def harmonic_fill(voided: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """float32 volume: the harmonic function inside `mask` with the voided image's values on its border, voided outside."""
    idx = -np.ones(mask.shape, dtype=np.int64)
    pts = np.argwhere(mask)
    idx[tuple(pts.T)] = np.arange(len(pts))
    rows, cols, vals = [], [], []
    rhs = np.zeros(len(pts))
    degree = np.zeros(len(pts))
    for axis in range(3):
        for step in (-1, 1):
            q = pts.copy()
            q[:, axis] += step
            inside = (q[:, axis] >= 0) & (q[:, axis] < mask.shape[axis])
            p_in, q_in = np.nonzero(inside)[0], q[inside]
            degree[p_in] += 1
            nb = idx[tuple(q_in.T)]
            unknown = nb >= 0
            rows.append(p_in[unknown])
            cols.append(nb[unknown])
            vals.append(-np.ones(unknown.sum()))
            rhs[p_in[~unknown]] += voided[tuple(q_in[~unknown].T)]
    known = np.zeros(len(pts), dtype=bool)                                  # Voxels next to a known one: every part of
    for axis in range(3):                                                   # the mask needs one, else the system is singular.
        for step in (-1, 1):
            q = pts.copy()
            q[:, axis] += step
            inside = (q[:, axis] >= 0) & (q[:, axis] < mask.shape[axis])
            known[np.nonzero(inside)[0][idx[tuple(q[inside].T)] < 0]] = True
    parts, n_parts = ndimage.label(mask)                                    # 6-connected, as the Laplacian.
    touching = np.unique(parts[tuple(pts[known].T)])
    if len(touching) < n_parts:
        raise ValueError(f'the mask has {n_parts - len(touching)} connected part(s) with no known voxel next to them '
            f'(e.g. it covers the whole volume): the diffusion fill is undefined there')
    A = sparse.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(len(pts), len(pts)))
    A = A + sparse.diags(degree)
    out = np.asarray(voided, dtype=np.float32).copy()
    out[tuple(pts.T)] = sparse_linalg.spsolve(A.tocsc(), rhs)
    return out

#----------------------------------------------------------------------------
# Padding to a multiple of the downsampling factor, undone on output.

def padded_shape(shape, multiple: int) -> list[int]:
    return [int(-(-s // multiple) * multiple) for s in shape]

def pad_to(x: np.ndarray, shape, value: float = 0) -> tuple[np.ndarray, tuple]:
    """Zero-pad (..., i, j, k) symmetrically (extra voxel at the end) to `shape`; returns the padded array and the slices that undo it."""
    lead = x.ndim - 3
    before = [(t - s) // 2 for s, t in zip(x.shape[lead:], shape)]
    if any(b < 0 for b in before):
        raise ValueError(f'pad_to: {list(x.shape[lead:])} is larger than {list(shape)}')
    widths = [(0, 0)] * lead + [(b, t - s - b) for b, s, t in zip(before, x.shape[lead:], shape)]
    crop = tuple(slice(b, b + s) for b, s in zip(before, x.shape[lead:]))
    return np.pad(x, widths, constant_values=value), crop

def unpad(x: np.ndarray, crop: tuple) -> np.ndarray:
    return x[(Ellipsis, *crop)]

def check_multiple(shape, multiple: int, pad: bool, path: str) -> list[int]:
    """The network shape: padded to the multiple, or a ValueError when padding is off and it does not divide."""
    if pad:
        return padded_shape(shape, multiple)
    if any(s % multiple for s in shape):
        raise ValueError(f'{path}: size {list(shape)} is not a multiple of the downsampling factor {multiple} '
            f'(the autoencoder times the U-Net); enable padding (pad=true / --pad) or crop the volume')
    return list(shape)

#----------------------------------------------------------------------------
# One inpainting case, read and checked: what inference may see (voided,
# mask, conditions) plus the ground truth when `need_t1n`.

def load_case(root: str, case: str, k: int, growth_path: str, tissue_path: str, need_t1n: bool = True) -> dict:
    vpath, mpath = voided_file(root, case, k), mask_file(root, case, k)
    voided, vimg = read_volume(vpath, 'voided image')
    mask_data, mimg = read_volume(mpath, 'mask')
    check_geometry(vpath, vimg, voided, mpath, mimg, mask_data)
    mask = mask_data > 0
    check_mask(mask, voided, mpath)
    out = dict(case=case, k=k, voided=voided, mask=mask, img=vimg, voided_path=vpath, mask_path=mpath)
    for name, path in (('growth', growth_file(growth_path, case)), ('tissue', find_tissue_file(tissue_path, case, k))):
        if not os.path.isfile(path):
            extra = f' (nor {tissue_file(tissue_path, case, k)})' if name == 'tissue' else ''
            raise ValueError(f'conditioning file missing for case {case}: {path}{extra}')
        data, img = read_volume(path, name)
        check_geometry(vpath, vimg, voided, path, img, data)
        out[name] = data
    if need_t1n:
        tpath = t1n_file(root, case)
        t1n, timg = read_volume(tpath, 'ground truth')
        check_geometry(vpath, vimg, voided, tpath, timg, t1n)
        out['t1n'], out['t1n_path'] = t1n, tpath
    out['scale'] = intensity_scale(voided, mask)
    return out

def network_inputs(case: dict, shape) -> dict:
    """Normalised, padded arrays of one case: voided (1, ...), mask (1, ...), cond (4, ...), harmonic (1, ...: the
    harmonic fill of the voided image) [, image (1, ...)] and the undo slices."""
    s = case['scale']
    voided, crop = pad_to(normalize(case['voided'], s)[None], shape, value=-1)
    try:
        harmonic = case['harmonic'] if 'harmonic' in case else harmonic_fill(case['voided'], case['mask'])
    except ValueError as err:
        raise ValueError(f'{case.get("mask_path", "mask")}: {err}') from None
    out = dict(voided=voided, mask=pad_to(case['mask'][None].astype(np.float32), shape)[0],
        cond=pad_to(conditions(case['growth'], case['tissue']), shape)[0], crop=crop,
        harmonic=pad_to(normalize(harmonic, s)[None], shape, value=-1)[0])
    if 't1n' in case:
        out['image'] = pad_to(normalize(case['t1n'], s)[None], shape, value=-1)[0]
    return out

#----------------------------------------------------------------------------
# Training dataset of both stages: one item per (case, mask) of the split.

class BratsInpaintDataset(Dataset):
    def __init__(self,
        path,                           # Folder of case folders (BraTS inpainting layout).
        growth_path,                    # Folder of <case>-growth.nii.gz.
        tissue_path,                    # Folder of <case>-tissue-XXXX.nii.gz (per mask) or <case>-tissue.nii.gz.
        split           = 'train',      # 'train', 'test' (patient-level split) or 'all'.
        test_fraction   = 0.2,          # Fraction of cases in the test split.
        split_seed      = 0,            # Seed of the split hash.
        multiple        = 8,            # Pad every volume to a multiple of this (autoencoder x U-Net downsampling).
        pad             = True,         # False: a size that is not a multiple is an error.
        max_size        = None,         # Keep only the first max_size items, None = all.
        cache           = True,         # Keep decoded items in memory.
    ):
        key = 'training.dataset'
        items = split_items(find_items(path, f'{key}.path'), split, test_fraction, split_seed, f'{key}.split')
        if not items:
            raise ValueError(f'{key}: no case of {path} is in split {split!r} (test_fraction={test_fraction})')
        if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
            raise ValueError(f'{key}.multiple must be a positive integer, got {multiple!r}')
        self._root, self._growth, self._tissue, self._items = path, growth_path, tissue_path, items
        first = load_case(path, *items[0], growth_path, tissue_path)
        self._native = list(first['voided'].shape)
        self._shape = check_multiple(self._native, multiple, pad, first['voided_path'])
        self._cache = {} if cache else None
        super().__init__(name=os.path.basename(os.path.normpath(path)), raw_shape=[len(items), 1, *self._shape], max_size=max_size)

    def _item(self, idx: int) -> dict:
        if self._cache is not None and idx in self._cache:
            return self._cache[idx]
        case = load_case(self._root, *self._items[idx], self._growth, self._tissue)
        if list(case['voided'].shape) != self._native:
            raise ValueError(f'{case["voided_path"]} has size {list(case["voided"].shape)}, the first case {self._native}')
        arrays = network_inputs(case, self._shape)
        item = {key: arrays[key] for key in ('image', 'voided', 'mask', 'cond', 'harmonic')}
        if self._cache is not None:
            self._cache[idx] = item
        return item

    def _load_raw_image(self, raw_idx):
        return self._item(raw_idx)['image']

    def __getitem__(self, idx: int) -> dict:
        item = super().__getitem__(idx) # image, idx (no intensity map: the item is normalised already).
        extra = self._item(item['idx'])
        return dict(item, **{key: extra[key].copy() for key in ('voided', 'mask', 'cond', 'harmonic')})

    @property
    def items(self) -> list[tuple[str, int]]:
        return list(self._items[:len(self)])

#----------------------------------------------------------------------------
