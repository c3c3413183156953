# medEDM: diffusion-model training toolkit for medical imaging.

"""Synthetic BraTS-inpainting cases from the MNI152 template
(`dataset_tool.py brats-inpaint`), in the layout of training/ldm3d/data.py.

Per case: one random subject (training/mri_phantoms.RandomSubject: affine +
smooth warp, bias, gamma, Rician noise) samples the T1 and the grey / white
matter maps with the same deformation; CSF = brain - GM - WM (the template is
skull-stripped); tissue labels are the argmax of CSF / GM / WM inside the
brain. Masks are random ellipsoids of healthy tissue, fully inside the brain;
the growth map is a smooth random blob in [0, 1] away from the masks (as in
healthy inpainting, it does not change the tissue). The grid is the template
block-averaged to `voxel_mm`, cropped to the brain's bounding box plus a
margin; the affine is the template's, moved to the crop.

Tissue segmentation per mask (`tissue/<case>-tissue-XXXX.nii.gz`), as an
atlas-based segmentation of the VOIDED T1 would give it (the reference,
valentin-biller/ldm, segments the voided T1 with gbm_bench's atlas
registration): outside the mask the subject's own labels (visible tissue can
be segmented); inside the mask the atlas labels (the MNI152 GM/WM maps)
brought to the subject with the affine part of the subject's deformation
only (`atlas_labels`), never the subject's labels there. Why the affine part:
inside the hole a registration of the voided T1 has no image to drive its
non-linear part; the global affine is fixed by the whole visible brain (the
masks are a few % of it), while the smooth warp inside the hole is what the
hole hides. It is idealised, not pessimistic: the affine is the subject's
exact one and the labels outside are the noise-free truth; what it never
uses is the subject inside the hole. No per-case tissue file is
written: a map of the full subject would carry the true anatomy inside every
mask into the condition."""

import os

import numpy as np
from scipy import ndimage

from torch_utils import persistence
from training import mri_phantoms
from training.ldm3d import data as ldm_data

#----------------------------------------------------------------------------

def brain_box(t1: np.ndarray, margin: int = 1, threshold: float = 0.05) -> tuple[slice, ...]:
    idx = np.nonzero(t1 > threshold)
    return tuple(slice(max(int(i.min()) - margin, 0), min(int(i.max()) + 1 + margin, n)) for i, n in zip(idx, t1.shape))

def random_ellipsoid(rng: np.random.Generator, brain: np.ndarray, radius_range, tries: int = 200) -> np.ndarray:
    """A boolean ellipsoid fully inside `brain` (eroded by one voxel)."""
    inner = ndimage.binary_erosion(brain, iterations=1)
    centres = np.argwhere(inner)
    grid = np.indices(brain.shape, dtype=np.float32)
    for _ in range(tries):
        c = centres[rng.integers(len(centres))]
        r = rng.uniform(*radius_range, size=3)
        m = (((grid - c[:, None, None, None]) / r[:, None, None, None]) ** 2).sum(0) <= 1
        if m.sum() >= 8 and not (m & ~inner).any():
            return m
    raise RuntimeError('random_ellipsoid: no ellipsoid fits inside the brain; lower the mask radius')

def growth_blob(rng: np.random.Generator, brain: np.ndarray, avoid: np.ndarray, sigma: float) -> np.ndarray:
    """Smooth concentration in [0, 1], peak 1 at a brain voxel outside `avoid`."""
    far = brain & ~ndimage.binary_dilation(avoid, iterations=2)
    candidates = np.argwhere(far if far.any() else brain)
    c = candidates[rng.integers(len(candidates))]
    grid = np.indices(brain.shape, dtype=np.float32)
    d2 = ((grid - c[:, None, None, None]) ** 2).sum(0)
    return (np.exp(-d2 / (2 * sigma ** 2)) * brain).astype(np.float32)

#----------------------------------------------------------------------------
# Tissue labels (0 background, 1 CSF, 2 GM, 3 WM) and the per-mask map an
# atlas-based segmentation of the voided T1 gives.

def tissue_labels(t1: np.ndarray, gm: np.ndarray, wm: np.ndarray, threshold: float = 0.05) -> np.ndarray:
    """argmax of CSF = 1 - GM - WM, GM, WM inside the brain (t1 > threshold), 0 outside (uint8)."""
    csf = np.clip(1 - gm - wm, 0, 1)
    return np.where(t1 > threshold, 1 + np.argmax(np.stack([csf, gm, wm]), axis=0), 0).astype(np.uint8)

def atlas_labels(subject: mri_phantoms.RandomSubject, atlas: tuple, points: np.ndarray) -> np.ndarray:
    """Labels of the atlas (t1, gm, wm) at subject `points` through the subject's affine part only (no warp)."""
    p = points.reshape(3, -1)
    q = subject.matrix @ (p - subject.centre[:, None]) + (subject.centre + subject.translate)[:, None]
    t1, gm, wm = (ndimage.map_coordinates(v, q, order=1, mode='constant', cval=0).reshape(points.shape[1:]) for v in atlas)
    return tissue_labels(t1, gm, wm)

def voided_tissue(subject_tissue: np.ndarray, mask: np.ndarray, atlas_tissue: np.ndarray) -> np.ndarray:
    """The segmentation of the voided image: the subject's labels outside `mask`, the atlas's inside."""
    return np.where(mask, atlas_tissue, subject_tissue).astype(np.uint8)

#----------------------------------------------------------------------------

def _write(path: str, data: np.ndarray, affine: np.ndarray, dtype) -> None:
    import gzip
    import nibabel as nib
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine)
    img.header.set_data_dtype(dtype)
    img.header.set_xyzt_units('mm')
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    persistence.atomic_write_bytes(path, gzip.compress(img.to_bytes(), mtime=0))

def build_cases(dest: str, cases: int, masks_per_case: int = 2, voxel_mm: int = 6, radius_mm=(12.0, 24.0), seed: int = 0,
        first_case: int = 0, agreement: list | None = None) -> list[str]:
    """Write `cases` cases under dest/cases, dest/growth, dest/tissue (one tissue map per mask); return the case names.
    `agreement` (a list) receives, per mask, the fraction of its voxels where the atlas label equals the true one."""
    t1, affine = mri_phantoms.load_mni152('t1', voxel_mm)
    gm, _ = mri_phantoms.load_mni152('gm', voxel_mm)
    wm, _ = mri_phantoms.load_mni152('wm', voxel_mm)
    box = brain_box(t1)
    shift = np.eye(4)
    shift[:3, 3] = [s.start for s in box]
    crop_affine = affine @ shift
    for sub in ('cases', 'growth', 'tissue'):
        os.makedirs(os.path.join(dest, sub), exist_ok=True)
    names = []
    for i in range(cases):
        rng = np.random.default_rng([seed, first_case + i])
        subject = mri_phantoms.RandomSubject(rng, t1.shape, voxel_mm=voxel_mm)
        points = np.indices(t1.shape, dtype=np.float32)[(slice(None), *box)]
        t1_s = subject.intensity(subject.sample(t1, points), points, rng)
        gm_s, wm_s, t1_clean = (subject.sample(v, points) for v in (gm, wm, t1))
        brain = t1_clean > 0.05
        t1_s = np.where(ndimage.binary_dilation(brain, iterations=1), t1_s, 0).astype(np.float32) # Skull-stripped, zero background.
        tissue = tissue_labels(t1_clean, gm_s, wm_s)                                        # The subject's true labels.
        atlas = atlas_labels(subject, (t1, gm, wm), points)                                 # The affinely registered atlas.
        case = f'BraTS-GLI-{first_case + i:05d}-000'
        folder = os.path.join(dest, 'cases', case)
        os.makedirs(folder, exist_ok=True)
        masks = [random_ellipsoid(rng, brain, np.asarray(radius_mm) / voxel_mm) for _ in range(masks_per_case)]
        growth = growth_blob(rng, brain, np.any(masks, axis=0), sigma=12.0 / voxel_mm)
        _write(ldm_data.t1n_file(os.path.join(dest, 'cases'), case), t1_s, crop_affine, np.float32)
        for k, m in enumerate(masks):
            _write(ldm_data.mask_file(os.path.join(dest, 'cases'), case, k), m, crop_affine, np.uint8)
            _write(ldm_data.voided_file(os.path.join(dest, 'cases'), case, k), np.where(m, 0, t1_s), crop_affine, np.float32)
            _write(ldm_data.tissue_file(os.path.join(dest, 'tissue'), case, k), voided_tissue(tissue, m, atlas), crop_affine, np.uint8)
            if agreement is not None:
                agreement.append(float((atlas[m] == tissue[m]).mean()))
        _write(ldm_data.growth_file(os.path.join(dest, 'growth'), case), growth, crop_affine, np.float32)
        names.append(case)
    return names

#----------------------------------------------------------------------------
