# medEDM: diffusion-model training toolkit for medical imaging.

"""Brain MRI "subjects" synthesised from the MNI152 template.

The anatomy is real: the ICBM 2009a nonlinear symmetric template (T1 and
GM/WM probability maps, 1 mm, skull-stripped; Fonov et al. 2009/2011,
Collins et al. 1999), read from the data folder of an installed nilearn
wheel with nibabel (nilearn itself is never imported). It is one averaged
brain, so every "subject" is a random smooth deformation of it (small affine
plus a smooth displacement field) with a bias field, a gamma (contrast)
change and Rician noise, all drawn from a `numpy.random.Generator`.

Coordinates are voxel indices of the working grid (the template, block
averaged to `voxel_mm`); axial slices are returned as images with anterior
at the top and the subject's right on the right of the image (neurological
convention). Reused by the MRI, PET and anomaly data families: the one place
for MNI152 data building (template, subject deformation, slices, and the MRI
slice set of `dataset_tool.py mri-slices`, build_mri_slices).
"""

import functools
import importlib.util
import os

import numpy as np
from scipy import ndimage

MNI152_FILES = {
    't1': 'mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz',
    'gm': 'mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz',
    'wm': 'mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz',
}

NILEARN_HINT = 'pip install --no-deps nilearn==0.14.1'

#----------------------------------------------------------------------------
# Path of an MNI152 file inside the installed nilearn package.

def mni152_path(kind: str = 't1') -> str:
    if kind not in MNI152_FILES:
        raise ValueError(f'MNI152 kind must be one of {sorted(MNI152_FILES)}, got {kind!r}')
    spec = importlib.util.find_spec('nilearn')
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f'the MNI152 template ships inside the nilearn wheel, which is not installed; '
            f'run: {NILEARN_HINT}')
    path = os.path.join(list(spec.submodule_search_locations)[0], 'datasets', 'data', MNI152_FILES[kind])
    if not os.path.isfile(path):
        raise FileNotFoundError(f'MNI152 file not found: {path}; reinstall nilearn: {NILEARN_HINT}')
    return path

#----------------------------------------------------------------------------
# Raw uint8 template, cached (the caller always gets a fresh float copy).

@functools.lru_cache(maxsize=None)
def _load_raw(kind: str) -> tuple[np.ndarray, np.ndarray]:
    import nibabel # Imported lazily: only this module needs it.
    img = nibabel.load(mni152_path(kind))
    data = np.asarray(img.dataobj)
    data.setflags(write=False)
    return data, np.asarray(img.affine, dtype=np.float64)

#----------------------------------------------------------------------------
# Voxel-to-MNI-mm affine of the template block-averaged to `voxel_mm`.

def mni152_affine(voxel_mm: int = 1, kind: str = 't1') -> np.ndarray:
    if int(voxel_mm) != voxel_mm or voxel_mm < 1:
        raise ValueError(f'voxel_mm must be a positive integer, got {voxel_mm!r}')
    f = int(voxel_mm)
    shift = np.eye(4)
    shift[:3, 3] = (f - 1) / 2 # Block centre in 1 mm voxels.
    return _load_raw(kind)[1] @ shift @ np.diag([f, f, f, 1]).astype(np.float64)

#----------------------------------------------------------------------------
# Load an MNI152 volume scaled to [0, 1], optionally block-averaged.

def load_mni152(kind: str = 't1', voxel_mm: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Return `(volume, affine)`: float32 values in [0, 1] on an isotropic grid
    of `voxel_mm` mm (integer block averaging of the 1 mm template; trailing
    voxels that do not fill a block are dropped) and the voxel-to-MNI-mm affine."""
    affine = mni152_affine(voxel_mm, kind)
    f = int(voxel_mm)
    vol = _load_raw(kind)[0].astype(np.float32) * np.float32(1 / 255)
    if f > 1:
        s = [n // f for n in vol.shape]
        vol = vol[:s[0] * f, :s[1] * f, :s[2] * f].reshape(s[0], f, s[1], f, s[2], f).mean(axis=(1, 3, 5), dtype=np.float32)
    return np.ascontiguousarray(vol), affine

#----------------------------------------------------------------------------
# Square in-plane (x-y) bounding box of the brain, in voxel coordinates.

def brain_bbox(volume: np.ndarray, threshold: float = 0.05, margin: float = 0.06) -> tuple[float, float, float]:
    """Return `(x0, y0, side)`: the lower corner (voxel-edge coordinates, i.e.
    voxel i spans [i, i+1]) and side of a square covering every voxel above
    `threshold` in any axial slice, enlarged by `margin` on each side."""
    mask = volume > threshold
    if not mask.any():
        raise ValueError(f'brain_bbox: no voxel above threshold {threshold}')
    xs = np.nonzero(mask.any(axis=(1, 2)))[0]
    ys = np.nonzero(mask.any(axis=(0, 2)))[0]
    cx = (xs[0] + xs[-1] + 1) / 2
    cy = (ys[0] + ys[-1] + 1) / 2
    side = max(xs[-1] + 1 - xs[0], ys[-1] + 1 - ys[0]) * (1 + 2 * margin)
    return float(cx - side / 2), float(cy - side / 2), float(side)

#----------------------------------------------------------------------------
# Voxel coordinates (3, n, R, R) of the pixel centres of axial slices.

def slice_points(z: np.ndarray, resolution: int, bbox: tuple[float, float, float]) -> np.ndarray:
    x0, y0, side = bbox
    centres = (np.arange(resolution, dtype=np.float64) + 0.5) * (side / resolution)
    xs = x0 + centres - 0.5                 # Column -> x (subject's right on the right).
    ys = y0 + centres[::-1] - 0.5           # Row -> y (anterior at the top).
    z = np.asarray(z, dtype=np.float64).reshape(-1)
    pts = np.empty([3, len(z), resolution, resolution], dtype=np.float64)
    pts[0] = xs[None, None, :]
    pts[1] = ys[None, :, None]
    pts[2] = z[:, None, None]
    return pts

#----------------------------------------------------------------------------
# In-plane Gaussian prefilter against aliasing when slices are downsampled.

def antialias(volume: np.ndarray, side: float, resolution: int) -> np.ndarray:
    step = side / resolution # Voxels per output pixel.
    sigma = max(0.0, (step - 1) / 2)
    if sigma == 0:
        return volume
    return ndimage.gaussian_filter(volume, sigma=(sigma, sigma, 0), mode='constant').astype(np.float32)

#----------------------------------------------------------------------------
# Axial slices of a volume, cropped to the square brain box and resampled.

def axial_slices(volume: np.ndarray, z_range, resolution: int, bbox: tuple[float, float, float] | None = None, order: int = 1) -> np.ndarray:
    """Return float32 `(len(z_range), resolution, resolution)` axial slices at
    the (possibly fractional) z voxel indices in `z_range`, e.g. `range(30, 60, 2)`.
    The in-plane field of view is `bbox` (default: `brain_bbox(volume)`), the
    same for every slice; order 0 is for label maps (no antialiasing)."""
    if bbox is None:
        bbox = brain_bbox(volume)
    if order > 0:
        volume = antialias(volume, bbox[2], resolution)
    pts = slice_points(np.asarray(list(z_range), dtype=np.float64), resolution, bbox)
    return ndimage.map_coordinates(volume, pts, order=order, mode='constant', cval=0).astype(np.float32)

#----------------------------------------------------------------------------
# Normalise brain slices to [-1, 1]: 0 -> -1, 99.5th brain percentile -> 1.

def normalize_slices(slices: np.ndarray, percentile: float = 99.5, brain_threshold: float = 0.05) -> np.ndarray:
    out = np.empty(slices.shape, dtype=np.float32)
    for i, s in enumerate(slices):
        brain = s[s > brain_threshold * max(float(s.max()), 1e-12)]
        hi = float(np.percentile(brain, percentile)) if brain.size else 0.0
        out[i] = np.clip(s * (2 / hi) - 1, -1, 1) if hi > 0 else -1
    return out

#----------------------------------------------------------------------------
# Smooth random field on a coarse grid (Gaussian-filtered noise, unit std).

def _smooth_noise(rng: np.random.Generator, count: int, shape_mm: np.ndarray, spacing_mm: float, smooth_mm: float) -> np.ndarray:
    grid = tuple(int(np.ceil(s / spacing_mm)) + 2 for s in shape_mm)
    noise = rng.standard_normal((count,) + grid)
    field = np.stack([ndimage.gaussian_filter(n, smooth_mm / spacing_mm, mode='reflect') for n in noise])
    return (field / max(float(field.std()), 1e-12)).astype(np.float32)

#----------------------------------------------------------------------------
# One random subject: geometry (affine + displacement field) and intensity
# model, drawn from `rng` in a fixed order at construction.

class RandomSubject:
    def __init__(self,
        rng,                                # numpy.random.Generator.
        shape,                              # Working grid shape (X, Y, Z).
        voxel_mm            = 2.0,          # Working grid voxel size.
        rotate_deg          = 3.0,          # Std of the rotation about each axis.
        scale_std           = 0.04,         # Std of log isotropic scale.
        aniso_std           = 0.02,         # Std of log per-axis scale.
        translate_mm        = 2.0,          # Std of the translation.
        warp_mm             = 2.5,          # Std of the smooth displacement.
        warp_smooth_mm      = 16.0,         # Smoothness of the displacement.
        bias_std            = 0.12,         # Std of the log bias field.
        bias_smooth_mm      = 48.0,         # Smoothness of the bias field.
        gamma_std           = 0.12,         # Std of log gamma.
        noise_range         = (0.005, 0.025), # Rician noise std, uniform in this range (1 = template max).
    ):
        self.shape = np.asarray(shape, dtype=np.int64)
        self.voxel_mm = float(voxel_mm)
        shape_mm = self.shape * self.voxel_mm

        # Affine part (template coordinates as a function of subject coordinates).
        ax, ay, az = np.deg2rad(rng.standard_normal(3) * rotate_deg)
        rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
        ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
        rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
        scales = np.exp(rng.standard_normal() * scale_std + rng.standard_normal(3) * aniso_std)
        self.matrix = rz @ ry @ rx @ np.diag(scales)
        self.translate = rng.standard_normal(3) * translate_mm / self.voxel_mm
        self.centre = (self.shape - 1) / 2

        # Smooth displacement and bias fields on coarse grids.
        self.warp_spacing = warp_smooth_mm / 2
        self.warp = _smooth_noise(rng, 3, shape_mm, self.warp_spacing, warp_smooth_mm) * np.float32(warp_mm / self.voxel_mm)
        self.bias_spacing = bias_smooth_mm / 2
        self.bias = _smooth_noise(rng, 1, shape_mm, self.bias_spacing, bias_smooth_mm)[0] * np.float32(bias_std)

        # Intensity model.
        self.gamma = float(np.exp(rng.standard_normal() * gamma_std))
        self.noise_std = float(rng.uniform(*noise_range))

    # Coarse-grid field value at voxel points (3, ...).
    def _coarse(self, field: np.ndarray, points: np.ndarray, spacing: float) -> np.ndarray:
        return ndimage.map_coordinates(field, points * (self.voxel_mm / spacing), order=1, mode='nearest')

    # Template coordinates (3, ...) for subject coordinates (3, ...).
    def template_coords(self, points: np.ndarray) -> np.ndarray:
        p = points.reshape(3, -1)
        q = self.matrix @ (p - self.centre[:, None]) + (self.centre + self.translate)[:, None]
        q += np.stack([self._coarse(w, p, self.warp_spacing) for w in self.warp])
        return q.reshape(points.shape)

    # Deformed copy of a template-space volume sampled at subject points.
    def sample(self, volume: np.ndarray, points: np.ndarray, order: int = 1) -> np.ndarray:
        q = self.template_coords(points)
        return ndimage.map_coordinates(volume, q, order=order, mode='constant', cval=0).astype(np.float32)

    # Gamma, bias field and Rician noise applied to T1 values at subject points.
    def intensity(self, values: np.ndarray, points: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        v = np.clip(values, 0, None) ** self.gamma
        v = v * np.exp(self._coarse(self.bias, points.reshape(3, -1), self.bias_spacing)).reshape(v.shape)
        n = rng.standard_normal((2,) + v.shape) * self.noise_std
        return np.sqrt((v + n[0]) ** 2 + n[1] ** 2).astype(np.float32)

#----------------------------------------------------------------------------
# Full deformed T1 volume of a random subject.

def random_subject_volume(rng: np.random.Generator, template: np.ndarray | None = None, voxel_mm: int = 2, **subject_kwargs) -> np.ndarray:
    """Return a float32 volume of the template's shape: a random smooth
    deformation of the MNI152 T1 (loaded at `voxel_mm` when `template` is
    None) with bias field, gamma and Rician noise. `subject_kwargs` go to
    `RandomSubject` (strength of each effect)."""
    if template is None:
        template, _ = load_mni152('t1', voxel_mm)
    subject = RandomSubject(rng, template.shape, voxel_mm=voxel_mm, **subject_kwargs)
    points = np.indices(template.shape, dtype=np.float32)
    values = subject.sample(template, points)
    return subject.intensity(values, points, rng)

#----------------------------------------------------------------------------
# Axial slices of a random subject, sampled directly at the output pixels
# (fast: no full volume is warped). `template` must be prefiltered with
# `antialias(template, bbox[2], resolution)` by the caller.

def random_subject_slices(rng: np.random.Generator, template: np.ndarray, z: np.ndarray, resolution: int, bbox: tuple[float, float, float], voxel_mm: float = 2.0, **subject_kwargs) -> np.ndarray:
    subject = RandomSubject(rng, template.shape, voxel_mm=voxel_mm, **subject_kwargs)
    points = slice_points(z, resolution, bbox)
    values = subject.sample(template, points)
    return subject.intensity(values, points, rng)

#----------------------------------------------------------------------------
# Stratified random positions: one uniform draw in each of `count` equal
# parts of [lo, hi) (the axial slices of a subject).

def stratified_positions(rng: np.random.Generator, lo: float, hi: float, count: int) -> np.ndarray:
    width = (hi - lo) / count
    return lo + (np.arange(count) + rng.uniform(size=count)) * width

#----------------------------------------------------------------------------
# Build 2-D axial brain MRI slices of random subjects (the dataset itself,
# dataset_tool.py mri-slices; the anomaly family's healthy slices).

def build_mri_slices(
    resolution          = 32,           # Output image size (pixels per side).
    subjects            = 40,           # Number of random subjects.
    slices_per_subject  = 16,           # Axial slices per subject.
    z_mm                = (-20.0, 50.0),# MNI z range (mm) the slices are drawn from.
    voxel_mm            = 2,            # Working grid of the template (mm).
    seed                = 0,            # Random seed; subject i depends only on (seed, i).
    augment             = True,         # False: undeformed template, no bias/noise.
) -> dict:
    template, affine = load_mni152('t1', voxel_mm)
    bbox = brain_bbox(template)
    filtered = antialias(template, bbox[2], resolution)
    subject_kwargs = {} if augment else dict(rotate_deg=0, scale_std=0, aniso_std=0, translate_mm=0, warp_mm=0,
        bias_std=0, gamma_std=0, noise_range=(0, 0))

    # Stratified slice positions on the 1 mm template grid.
    raw_affine = mni152_affine(1)
    k_lo, k_hi = [(z - raw_affine[2, 3]) / raw_affine[2, 2] for z in z_mm]
    z_lim = affine[2, 3] + affine[2, 2] * np.array([0, template.shape[2] - 1]) # Centres of the first and last planes.
    if not (z_lim[0] <= z_mm[0] and z_mm[1] <= z_lim[1]):
        raise ValueError(f'--z-mm {z_mm[0]:g},{z_mm[1]:g} lies outside the template ({z_lim[0]:g}..{z_lim[1]:g} mm)')
    if (k_hi - k_lo) / slices_per_subject < 1:
        raise ValueError(f'--slices-per-subject {slices_per_subject} does not fit into --z-mm {z_mm[0]},{z_mm[1]} (at most one slice per mm)')

    images, subject_ids, slice_ids, z_list = [], [], [], []
    for s in range(subjects):
        rng = np.random.default_rng([seed, s])
        k = np.floor(stratified_positions(rng, k_lo, k_hi, slices_per_subject)).astype(np.int64)
        z = raw_affine[2, 3] + raw_affine[2, 2] * k                 # MNI mm.
        z_vox = (z - affine[2, 3]) / affine[2, 2]                   # Working grid.
        slices = random_subject_slices(rng, filtered, z_vox, resolution, bbox, voxel_mm=voxel_mm, **subject_kwargs)
        images.append(normalize_slices(slices))
        subject_ids.append(np.full(slices_per_subject, s, dtype=np.int64))
        slice_ids.append(k)
        z_list.append(z.astype(np.float32))
    return dict(
        images  = np.concatenate(images)[:, None],
        subject = np.concatenate(subject_ids),
        slice   = np.concatenate(slice_ids),
        z_mm    = np.concatenate(z_list),
    )

#----------------------------------------------------------------------------
