# medEDM: diffusion-model training toolkit for medical imaging.

"""Loaders of the anomaly family: split CSVs -> checked volumes, and the
healthy axial-slice training set.

A split CSV (the reference's splits/*.csv layout) has the columns img_path,
mask_path and optionally seg_path (lesion mask; empty = healthy), kind
(lesion kind, for per-kind results) and healthy_path (the same subject
rendered without its lesion: synthetic data only, dataset_tool.py
anomaly-data; scored as the evaluation's `oracle`); paths are absolute or
relative to the data root, the folder above splits/. Volumes are NIfTI arrays (H, W, S):
S axial slices of H x W (the reference: 96 x 96 x 50, skull-stripped,
registered, x2 downsampled).

Intensities as the reference's RescaleIntensity((0, 1), percentiles=(1, 99),
masking_method=mask): the 1st and 99th percentiles of the brain voxels map
to 0 and 1, clipped to [0, 1], and 0 outside the brain mask; the network
sees 2 v - 1 (in [-1, 1], as the reference's model input)."""

import csv
import os

import numpy as np
import torch

from training import dataset as dataset_mod

#----------------------------------------------------------------------------
# Split CSVs.

def split_rows(csv_path: str, root: str | None = None) -> list[dict]:
    """Rows {img_path, mask_path, seg_path, healthy_path, kind, case} with absolute paths (None: empty or no
    such column; only img_path and mask_path are required); ValueError naming the CSV."""
    if not os.path.isfile(csv_path):
        raise ValueError(f'split CSV not found: {csv_path}')
    root = root if root is not None else os.path.dirname(os.path.dirname(os.path.abspath(csv_path)))
    with open(csv_path, newline='', encoding='utf-8') as f:
        reader = csv.DictReader(f)
        missing = [c for c in ('img_path', 'mask_path') if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f'split CSV {csv_path}: missing column(s) {missing} (expected img_path, mask_path[, seg_path, kind])')
        rows = []
        for line, row in enumerate(reader, start=2):
            out = {}
            for key in ('img_path', 'mask_path', 'seg_path', 'healthy_path'):
                value = (row.get(key) or '').strip()
                if not value:
                    if key in ('img_path', 'mask_path'):
                        raise ValueError(f'split CSV {csv_path}, line {line}: empty {key}')
                    out[key] = None
                    continue
                path = value if os.path.isabs(value) else os.path.join(root, value)
                if not os.path.isfile(path):
                    raise ValueError(f'split CSV {csv_path}, line {line}: {key} names a missing file: {path}')
                out[key] = path
            out['kind'] = (row.get('kind') or ('healthy' if out['seg_path'] is None else 'lesion')).strip()
            out['case'] = os.path.basename(out['img_path']).split('.nii')[0]
            rows.append(out)
    if not rows:
        raise ValueError(f'split CSV {csv_path} lists no volumes')
    return rows

#----------------------------------------------------------------------------
# One volume with its masks, checked and normalised.

def _read(path: str) -> tuple[np.ndarray, np.ndarray]:
    data, affine = dataset_mod.read_nifti(path) # ValueError naming the file (unreadable, NaN / Inf).
    if data.shape[0] != 1:
        raise ValueError(f'NIfTI file {path}: expected one 3-D volume, got {data.shape[0]} channels')
    return data[0], affine

def rescale(image: np.ndarray, brain: np.ndarray, percentiles=(1, 99), like: np.ndarray | None = None) -> np.ndarray:
    """[0, 1] from the brain's percentiles (of `like` if given: another image on the intensity scale of
    that one), clipped; 0 outside the brain."""
    lo, hi = np.percentile((image if like is None else like)[brain], percentiles)
    v = np.clip((image - lo) / max(hi - lo, 1e-8), 0, 1)
    return np.where(brain, v, 0).astype(np.float32)

def load_case(row: dict) -> dict:
    """image (H, W, S) in [0, 1], brain and seg (bool), affine, paths; with a healthy_path also healthy (the
    lesion-free rendering, rescaled with the volume's own percentiles and brain mask, so that |image - healthy|
    is a residual in the image's units, as a reconstruction's); ValueError naming the file."""
    image, affine = _read(row['img_path'])
    arrays = {}
    for key in ('mask_path', 'seg_path', 'healthy_path'):
        if row.get(key) is None:
            continue
        m, m_affine = _read(row[key])
        if m.shape != image.shape:
            raise ValueError(f'{row[key]} has shape {list(m.shape)}, its volume {row["img_path"]} {list(image.shape)}')
        if not np.allclose(m_affine, affine, atol=1e-4):
            what = 'the healthy rendering' if key == 'healthy_path' else 'the masks'
            raise ValueError(f'{row[key]} has a different affine from its volume {row["img_path"]} ({what} must be on the same grid)')
        arrays[key] = m if key == 'healthy_path' else m > 0
    brain = arrays['mask_path']
    if not brain.any():
        raise ValueError(f'brain mask {row["mask_path"]} is empty')
    seg = arrays.get('seg_path', np.zeros(image.shape, dtype=bool))
    out = dict(image=rescale(image, brain), brain=brain, seg=seg, affine=affine, kind=row.get('kind', 'healthy'),
        case=row.get('case', os.path.basename(row['img_path'])), img_path=row['img_path'])
    if 'healthy_path' in arrays:
        out.update(healthy=rescale(arrays['healthy_path'], brain, like=image), healthy_path=row['healthy_path'])
    return out

def load_split(csv_path: str, max_volumes: int | None = None) -> list[dict]:
    rows = split_rows(csv_path)
    return [load_case(r) for r in rows[:max_volumes]]

def to_slices(image: np.ndarray) -> torch.Tensor:
    """(H, W, S) in [0, 1] -> (S, 1, H, W) network input in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(np.transpose(image, (2, 0, 1))))[:, None] * 2 - 1

def from_slices(x: torch.Tensor) -> np.ndarray:
    """(S, 1, H, W) in [-1, 1] -> (H, W, S) in [0, 1]."""
    return np.ascontiguousarray(np.transpose(((x[:, 0].double().cpu().numpy() + 1) / 2), (1, 2, 0)))

#----------------------------------------------------------------------------
# Healthy axial slices for training (the reference draws one random slice
# per volume per item; here every slice with brain is an item, and the
# loop's infinite sampler shuffles them).

class AnomalySliceDataset(dataset_mod.Dataset):
    def __init__(self,
        path,                       # Split CSV of healthy volumes (e.g. <root>/splits/IXI_train_fold0.csv).
        min_brain       = 0.05,     # Skip slices with a smaller brain fraction of their pixels.
        max_size        = None,     # Keep only the first max_size slices, None = all.
        max_volumes     = None,     # Read only the first max_volumes volumes, None = all.
    ):
        cases = load_split(os.fspath(path), max_volumes)
        shape = cases[0]['image'].shape
        slices = []
        for c in cases:
            if c['image'].shape != shape:
                raise ValueError(f'{c["img_path"]} has shape {list(c["image"].shape)}, the first volume of {path} {list(shape)}')
            if shape[0] != shape[1]:
                raise ValueError(f'{c["img_path"]}: axial slices must be square (H = W), got {shape[0]} x {shape[1]}')
            keep = c['brain'].mean(axis=(0, 1)) >= min_brain
            slices.append(to_slices(c['image'])[torch.from_numpy(keep)])
        self._images = torch.cat(slices).numpy()
        if len(self._images) == 0:
            raise ValueError(f'training.dataset: no slice of {path} has a brain fraction >= min_brain={min_brain}')
        super().__init__(name=os.path.splitext(os.path.basename(os.fspath(path)))[0], raw_shape=list(self._images.shape),
            max_size=max_size) # Already in [-1, 1]: no further normalisation.

    def _load_raw_image(self, raw_idx):
        return self._images[raw_idx]

#----------------------------------------------------------------------------
