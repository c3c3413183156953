# medEDM: diffusion-model training toolkit for medical imaging.

"""2-D brain PET activity phantoms from real anatomy: the MNI152 grey- and
white-matter probability maps (ICBM 2009a, shipped in the nilearn wheel),
deformed per subject like the MRI slices, with FDG-like activity
GM:WM:CSF = 4:1:0 (BrainWeb's FDG values), per-subject tissue-ratio
perturbation, and hot (1.5 x GM) and cold (0.5 x WM) lesions.

The field of view leaves a margin around the head so that it lies inside the
circle that every parallel-beam projection angle covers."""

import numpy as np
from scipy import ndimage

from training import mri_phantoms

#----------------------------------------------------------------------------
# Random elliptical lesions inside the brain, applied to one activity slice.

def _add_lesions(rng: np.random.Generator, activity: np.ndarray, brain: np.ndarray, gm_level: float, wm_level: float,
        max_lesions: int, radius_px: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    # Returns the activity and a lesion label map (0 none, 1 hot, 2 cold: where a lesion's
    # smoothed ellipse is above 1/2, the later lesion where two overlap).
    out = activity.copy()
    labels = np.zeros(activity.shape, dtype=np.uint8)
    candidates = np.argwhere(brain)
    if len(candidates) == 0:
        return out, labels
    n = int(rng.integers(0, max_lesions + 1))
    yy, xx = np.mgrid[:activity.shape[0], :activity.shape[1]]
    for _ in range(n):
        cy, cx = candidates[rng.integers(len(candidates))]
        ry, rx = rng.uniform(*radius_px, size=2)
        angle = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u = (dx * np.cos(angle) + dy * np.sin(angle)) / rx
        v = (-dx * np.sin(angle) + dy * np.cos(angle)) / ry
        inside = ndimage.gaussian_filter((u ** 2 + v ** 2 <= 1).astype(np.float32), 0.7) * brain
        hot = rng.uniform() < 0.5
        level = 1.5 * gm_level if hot else 0.5 * wm_level # Hot or cold.
        out = out * (1 - inside) + level * inside
        labels[inside > 0.5] = 1 if hot else 2
    return out, labels

#----------------------------------------------------------------------------
# Build the phantom set.

def build_pet_phantoms(
    resolution          = 64,           # Image size (pixels per side).
    subjects            = 20,           # Number of random subjects.
    slices_per_subject  = 16,           # Axial slices per subject.
    z_mm                = (-20.0, 50.0),# MNI z range of the slices (mm).
    seed                = 0,            # Random seed; subject i depends only on (seed, i).
    gm_wm_ratio         = 4.0,          # Mean GM:WM activity ratio (FDG).
    ratio_std           = 0.15,         # Std of the log tissue ratio per subject.
    max_lesions         = 2,            # Up to this many lesions per slice.
    fov_margin          = 0.25,         # Margin around the head (fraction of its size, each side).
    deform              = True,         # Random smooth deformation per subject.
) -> dict:
    """Return dict(phantoms float32 [N,1,R,R] activity (WM = 1 on average), lesions uint8 [N,1,R,R]
    (0 none, 1 hot, 2 cold), subject, slice, z_mm)."""
    if resolution < 8:
        raise ValueError(f'resolution must be >= 8, got {resolution}')
    voxel_mm = 2
    gm, affine = mri_phantoms.load_mni152('gm', voxel_mm)
    wm, _ = mri_phantoms.load_mni152('wm', voxel_mm)
    bbox = mri_phantoms.brain_bbox(gm + wm, threshold=0.1, margin=fov_margin)
    gm_f = mri_phantoms.antialias(gm, bbox[2], resolution)
    wm_f = mri_phantoms.antialias(wm, bbox[2], resolution)
    z_vox_lo, z_vox_hi = [(z - affine[2, 3]) / affine[2, 2] for z in z_mm]
    subject_kwargs = dict(bias_std=0, gamma_std=0, noise_range=(0, 0))
    if not deform:
        subject_kwargs.update(rotate_deg=0, scale_std=0, aniso_std=0, translate_mm=0, warp_mm=0)
    lesion_radius = (0.03 * resolution, 0.08 * resolution)

    phantoms, lesions, subject_ids, slice_ids, z_list = [], [], [], [], []
    for s in range(subjects):
        rng = np.random.default_rng([seed, s, 7])
        z_vox = mri_phantoms.stratified_positions(rng, z_vox_lo, z_vox_hi, slices_per_subject)
        subject = mri_phantoms.RandomSubject(rng, gm.shape, voxel_mm=voxel_mm, **subject_kwargs)
        points = mri_phantoms.slice_points(z_vox, resolution, bbox)
        gm_s = np.clip(subject.sample(gm_f, points), 0, 1)
        wm_s = np.clip(subject.sample(wm_f, points), 0, 1)
        gm_level = gm_wm_ratio * float(np.exp(rng.standard_normal() * ratio_std))
        wm_level = 1.0
        for i in range(slices_per_subject):
            activity = gm_level * gm_s[i] + wm_level * wm_s[i] # CSF and background: 0.
            brain = (gm_s[i] + wm_s[i]) > 0.5
            phantom, labels = _add_lesions(rng, activity, brain, gm_level, wm_level, max_lesions, lesion_radius)
            phantoms.append(phantom)
            lesions.append(labels)
        subject_ids.append(np.full(slices_per_subject, s, dtype=np.int64))
        slice_ids.append(np.arange(slices_per_subject, dtype=np.int64))
        z_list.append((affine[2, 3] + affine[2, 2] * z_vox).astype(np.float32))
    return dict(
        phantoms = np.asarray(phantoms, dtype=np.float32)[:, None],
        lesions  = np.asarray(lesions, dtype=np.uint8)[:, None],
        subject  = np.concatenate(subject_ids),
        slice    = np.concatenate(slice_ids),
        z_mm     = np.concatenate(z_list),
    )

#----------------------------------------------------------------------------
# A user's own phantoms: an .npz with `phantoms` [N, R, R] or [N, 1, R, R], or a
# NIfTI volume whose axial slices that hold activity become phantoms, turned
# by its affine to the closest RAS orientation and shown as the MNI phantoms
# are (anterior at the top, the subject's right on the right); slices of
# another size are resampled to `resolution` (with mri_phantoms.antialias's
# Gaussian prefilter when shrinking, so thin structures do not alias).

def load_user_phantoms(path: str, resolution: int) -> dict:
    """Return dict(phantoms float32 [N,1,R,R], subject, slice) from an npz or NIfTI file."""
    import os
    if not os.path.isfile(path):
        raise FileNotFoundError(f'--phantoms: file not found: {path}')
    if path.endswith('.npz'):
        with np.load(path, allow_pickle=False) as npz:
            if 'phantoms' not in npz.files:
                raise ValueError(f'--phantoms: {path} has no array "phantoms" (arrays: {sorted(npz.files)})')
            images = npz['phantoms'].astype(np.float32)
        if images.ndim == 4 and images.shape[1] == 1:
            images = images[:, 0]
        if images.ndim != 3 or images.shape[1] != images.shape[2]:
            raise ValueError(f'--phantoms: "phantoms" in {path} must be [N, R, R] or [N, 1, R, R], got {images.shape}')
    elif path.endswith(('.nii', '.nii.gz')):
        import nibabel as nib
        image = nib.load(path)
        if len(image.shape) != 3:
            raise ValueError(f'--phantoms: {path} must be a 3-D volume with square axial slices, got shape {image.shape}')
        volume = np.asarray(nib.as_closest_canonical(image).get_fdata(), dtype=np.float32) # Axes x (right), y (anterior), z.
        if volume.shape[0] != volume.shape[1]:
            raise ValueError(f'--phantoms: {path} must be a 3-D volume with square axial slices, got shape {volume.shape} (RAS order)')
        keep = volume.reshape(-1, volume.shape[2]).max(0) > 0
        images = np.ascontiguousarray(np.moveaxis(volume[:, :, keep], 2, 0).transpose(0, 2, 1)[:, ::-1]) # Rows: y downwards.
    else:
        raise ValueError(f'--phantoms: expected an .npz or a NIfTI (.nii, .nii.gz) file, got {path}')
    if len(images) == 0:
        raise ValueError(f'--phantoms: {path} holds no slice with activity')
    if not (np.isfinite(images).all() and (images >= 0).all()):
        raise ValueError(f'--phantoms: {path} must hold finite, non-negative activity')
    if images.shape[-1] != resolution:                                  # Slices as the volume's last axis, as antialias takes them.
        images = np.moveaxis(mri_phantoms.antialias(np.moveaxis(images, 0, -1), images.shape[-1], resolution), -1, 0)
        images = np.stack([ndimage.zoom(im, resolution / im.shape[-1], order=1) for im in images]).clip(0, None)
    return dict(phantoms=images[:, None].astype(np.float32), subject=np.zeros(len(images), dtype=np.int64),
        slice=np.arange(len(images), dtype=np.int64))

#----------------------------------------------------------------------------
