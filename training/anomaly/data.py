# medEDM: diffusion-model training toolkit for medical imaging.

"""Synthetic IXI-, BraTS- and MSLUB-like brain MRI volumes for anomaly
detection, built from the MNI152 template (training/mri_phantoms.py), in the
reference's layout (Behrendt et al.; research notes section 1.5):

    <root>/Train/ixi/{t2,mask}/IXI_<i>.nii.gz                healthy subjects
    <root>/Test/Brats21/{t2,mask,seg}/Brats21_<i>.nii.gz     large tumour-like lesions
    <root>/Test/MSLUB/{t2,mask,seg}/MSLUB_<i>.nii.gz         small MS-like lesions
    <root>/Test/{Brats21,MSLUB}/healthy/<name>.nii.gz        the same subjects without their lesions (synthetic ground truth)
    <root>/splits/{IXI_train_fold0,IXI_val_fold0,IXI_test,Brats21_val,Brats21_test,MSLUB_val,MSLUB_test}.csv

Volumes are float32 arrays (H, W, S): S axial slices of H x W pixels (row =
anterior at the top, column = the subject's right on the right), with the
voxel-to-MNI-mm affine. The folder is named t2 after the reference; the
intensities are the template's T1 contrast (the only template we have), with
each subject's deformation, bias field, gamma and Rician noise, skull-stripped
(0 outside the brain mask). Lesion kinds, fixed before any model was tuned:

    tumour_hyper   lobulated blob of radius 15-28 mm, hyperintense (1.0-1.2 x the 99th brain percentile), mass effect
    tumour_hypo    the same shapes, hypointense (0.2-0.45 x the median brain intensity), mass effect
    ms_hyper       4-9 ellipsoids of radii 4-9 mm in white matter, hyperintense (1.05-1.25 x the 99th percentile)

The Brats21 sets alternate tumour_hyper and tumour_hypo; MSLUB holds ms_hyper.
Subject i of a set depends only on (seed, set, i).

Every lesioned volume also has its lesion-free rendering, healthy/<name>
(CSV column healthy_path, the last one, in the Brats21 and MSLUB splits
only): the same subject (deformation, bias field, gamma, brain mask of the
subject) without the lesion and without the tumours' mass effect, with
Rician noise from an independent generator (seed, set, i, HEALTHY_STREAM),
so the volumes, masks and lesion masks are bit for bit those of a build
without it. It is what `evaluate.py anomaly` scores as `oracle`
(|x - healthy|): the score of the exact lesion-free subject, the target of a
healthy reconstruction, which needs this synthetic ground truth (real data
have no such column). It is a reference point, not a bound: the pipeline is
not monotone in reconstruction error (README).

Healthy inter-subject variation (`variation`, the same for every split:
train, validation and test). The template is ONE averaged brain, so with
only small deformations the voxel-wise mean of the training volumes is an
almost perfect healthy reconstruction of every test subject, far better
than on real registered IXI / BraTS data, where sulci, ventricles and
contrast differ from subject to subject after affine registration.
'realistic' (the default) therefore adds, in VariedSubject: a second, finer
scale of non-linear deformation, ventricle enlargement (atrophy), a
per-subject grey/white-matter contrast and a stronger gamma and bias field;
'small' is the earlier, weaker variation (training/mri_phantoms.py defaults
only). The lesion kinds and their parameters are the same for both."""

import csv
import io
import os

import numpy as np
from scipy import ndimage

from torch_utils import persistence
from training import mri_phantoms

LESION_KINDS = ('tumour_hyper', 'tumour_hypo', 'ms_hyper')

# Sets of the reference's splits: (folder, file prefix, CSV names with counts keys, lesion kinds).
SETS = {
    'ixi':      dict(folder='Train/ixi', prefix='IXI', kinds=None),
    'brats':    dict(folder='Test/Brats21', prefix='Brats21', kinds=('tumour_hyper', 'tumour_hypo')),
    'mslub':    dict(folder='Test/MSLUB', prefix='MSLUB', kinds=('ms_hyper',)),
}
SPLIT_COLUMNS = ('img_path', 'mask_path', 'seg_path', 'kind')
LESION_SPLIT_COLUMNS = SPLIT_COLUMNS + ('healthy_path',) # Lesioned sets: plus the lesion-free rendering.
HEALTHY_STREAM = 12345                      # Last seed word of the healthy rendering's noise generator.

#----------------------------------------------------------------------------
# Geometry: the template, its brain mask and white matter on the working grid,
# and the affine of the output volume.

class Geometry:
    def __init__(self, resolution: int, slices: int, z_mm=(-40.0, 64.0), voxel_mm: int = 2):
        self.template, self.mni_affine = mri_phantoms.load_mni152('t1', voxel_mm)
        self.voxel_mm = voxel_mm
        self.bbox = mri_phantoms.brain_bbox(self.template)
        self.filtered = mri_phantoms.antialias(self.template, self.bbox[2], resolution)
        wm, _ = mri_phantoms.load_mni152('wm', voxel_mm)
        self.wm = mri_phantoms.antialias(wm, self.bbox[2], resolution)
        gm, _ = mri_phantoms.load_mni152('gm', voxel_mm)
        self.gm = mri_phantoms.antialias(gm, self.bbox[2], resolution)
        self.ventricle_vox = np.linalg.solve(self.mni_affine, np.array([*VENTRICLE_CENTRE_MM, 1.0]))[:3]
        self.brain = (self.template > 0.1).astype(np.float32)
        self.resolution, self.slices = resolution, slices
        z = (np.asarray(z_mm, dtype=np.float64) - self.mni_affine[2, 3]) / self.mni_affine[2, 2] # Working-grid z.
        self.z_vox = np.linspace(z[0], z[1], slices)
        self.step = self.bbox[2] / resolution                        # Working voxels per pixel.
        dz = self.z_vox[1] - self.z_vox[0] if slices > 1 else 1.0
        x0, y0, _ = self.bbox
        grid = np.array([[0, self.step, 0, x0 + 0.5 * self.step - 0.5],       # (row, col, k) -> working voxel.
                         [-self.step, 0, 0, y0 + (resolution - 0.5) * self.step - 0.5],
                         [0, 0, dz, self.z_vox[0]], [0, 0, 0, 1]])
        self.affine = self.mni_affine @ grid
        self.spacing_mm = np.array([self.step * voxel_mm, self.step * voxel_mm, dz * voxel_mm]) # (row, col, slice).

    def subject(self, rng: np.random.Generator, augment: bool = True, variation: str = 'realistic', healthy_rng: np.random.Generator | None = None) -> dict:
        """A healthy subject: image, brain mask and white-matter map, (H, W, S); with healthy_rng also
        'healthy', the same image with Rician noise from healthy_rng (rng's draws are unchanged)."""
        if variation not in VARIATIONS:
            raise ValueError(f"variation must be one of {', '.join(VARIATIONS)}, got {variation!r}")
        points = mri_phantoms.slice_points(self.z_vox, self.resolution, self.bbox)
        if not augment:
            subj = mri_phantoms.RandomSubject(rng, self.template.shape, voxel_mm=self.voxel_mm, rotate_deg=0, scale_std=0, aniso_std=0,
                translate_mm=0, warp_mm=0, bias_std=0, gamma_std=0, noise_range=(0, 0))
            values = subj.sample(self.filtered, points)
        elif variation == 'small':
            subj = mri_phantoms.RandomSubject(rng, self.template.shape, voxel_mm=self.voxel_mm)
            values = subj.sample(self.filtered, points)
        else:
            subj = VariedSubject(rng, self.template.shape, voxel_mm=self.voxel_mm, ventricle_vox=self.ventricle_vox)
            values = subj.tissue_values(self.filtered, self.gm, self.wm, points)
        image = subj.intensity(values, points, rng)
        brain = subj.sample(self.brain, points) > 0.5
        wm = subj.sample(self.wm, points)
        to_hws = lambda a: np.ascontiguousarray(np.transpose(a, (1, 2, 0)))
        out = dict(image=to_hws(image * brain), brain=to_hws(brain), wm=to_hws(wm))
        if healthy_rng is not None:
            out['healthy'] = to_hws(subj.intensity(values, points, healthy_rng) * brain)
        return out

#----------------------------------------------------------------------------
# Realistic healthy inter-subject variation (variation='realistic').

VARIATIONS = ('realistic', 'small')
VENTRICLE_CENTRE_MM = (0.0, -20.0, 12.0)    # Centroid of the template's lateral ventricles (MNI mm; CSF voxels, |x| < 30).

class VariedSubject(mri_phantoms.RandomSubject):
    """RandomSubject plus: a finer second scale of smooth displacement,
    ventricle enlargement (tissue pushed away from the ventricles' centre,
    a Gaussian envelope of the ventricles' extent) and a per-subject
    grey/white-matter contrast. Effect sizes are chosen from what affinely
    registered adults differ by (residual displacements of 3-6 mm at 1-3 cm
    scales, ventricle volume varying two- to threefold with age, scanner
    contrast and gamma differences between the IXI sites), not tuned on
    any result. The base class draws first, so the same rng gives the same
    base subject."""
    def __init__(self,
        rng,                                # numpy.random.Generator.
        shape,                              # Working grid shape (X, Y, Z).
        ventricle_vox,                      # Ventricle centre (working-grid voxel coordinates).
        voxel_mm            = 2.0,          # Working grid voxel size.
        warp_mm             = 4.0,          # Std of the coarse displacement (base class; its default 2.5).
        warp_smooth_mm      = 20.0,         # Its smoothness.
        fine_warp_mm        = 2.5,          # Std of the fine displacement.
        fine_warp_smooth_mm = 8.0,          # Its smoothness.
        ventricle_max       = 0.35,         # Enlargement k ~ U(0, max): the centre samples (1 - k) closer.
        ventricle_sigma_mm  = (20.0, 30.0, 14.0), # Envelope of the enlargement (x, y, z).
        contrast_std        = 0.10,         # Std of the relative grey- and white-matter intensity change.
        gamma_std           = 0.20,         # Std of log gamma (base class; its default 0.12).
        bias_std            = 0.15,         # Std of the log bias field (base class; its default 0.12).
        **kwargs,                           # Other RandomSubject options.
    ):
        super().__init__(rng, shape, voxel_mm=voxel_mm, warp_mm=warp_mm, warp_smooth_mm=warp_smooth_mm, gamma_std=gamma_std, bias_std=bias_std, **kwargs)
        shape_mm = self.shape * self.voxel_mm
        self.fine_spacing = fine_warp_smooth_mm / 2
        self.fine_warp = mri_phantoms._smooth_noise(rng, 3, shape_mm, self.fine_spacing, fine_warp_smooth_mm) * np.float32(fine_warp_mm / self.voxel_mm)
        self.ventricle_k = float(rng.uniform(0, ventricle_max))
        self.ventricle_vox = np.asarray(ventricle_vox, dtype=np.float64)
        self.ventricle_sigma = np.asarray(ventricle_sigma_mm, dtype=np.float64) / self.voxel_mm
        self.contrast = 1 + rng.standard_normal(2) * contrast_std # (grey, white) matter gains.

    def template_coords(self, points: np.ndarray) -> np.ndarray:
        p = points.reshape(3, -1)
        q = super().template_coords(points).reshape(3, -1)
        q = q + np.stack([self._coarse(w, p, self.fine_spacing) for w in self.fine_warp])
        rel = q - self.ventricle_vox[:, None]
        envelope = np.exp(-0.5 * ((rel / self.ventricle_sigma[:, None]) ** 2).sum(0))
        q = self.ventricle_vox[:, None] + rel * (1 - self.ventricle_k * envelope)
        return q.reshape(points.shape)

    def tissue_values(self, t1: np.ndarray, gm: np.ndarray, wm: np.ndarray, points: np.ndarray) -> np.ndarray:
        """T1 at subject points with the subject's grey/white-matter gains (partial volumes weighted by the tissue maps)."""
        g, w = self.sample(gm, points), self.sample(wm, points)
        gain = 1 + (self.contrast[0] - 1) * g + (self.contrast[1] - 1) * w
        return self.sample(t1, points) * gain

#----------------------------------------------------------------------------
# Lesions. Coordinates in mm of the output grid (anisotropic voxels).

def _smooth_field(rng, shape, spacing_mm, smooth_mm: float) -> np.ndarray:
    f = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=smooth_mm / spacing_mm, mode='reflect')
    return (f / max(float(f.std()), 1e-12)).astype(np.float32)

def _mm_grid(shape, spacing_mm) -> np.ndarray:
    return np.stack(np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing_mm)], indexing='ij'))

def _pick_centre(rng, allowed: np.ndarray, what: str) -> np.ndarray:
    idx = np.argwhere(allowed)
    if len(idx) == 0:
        raise ValueError(f'no room for a {what} lesion in this subject (brain too small for the lesion size)')
    return idx[rng.integers(len(idx))].astype(np.float64)

def add_tumour(subject: dict, rng: np.random.Generator, spacing_mm: np.ndarray, hyper: bool) -> dict:
    image, brain = subject['image'], subject['brain']
    shape = image.shape
    r0 = rng.uniform(15, 28)
    depth = ndimage.distance_transform_edt(brain, sampling=spacing_mm)
    centre = _pick_centre(rng, depth > 0.5 * r0, 'tumour') * spacing_mm
    mm = _mm_grid(shape, spacing_mm)
    rel = mm - centre[:, None, None, None]
    dist = np.sqrt((rel ** 2).sum(0))
    # Mass effect: tissue pushed outward (sample closer to the centre near the tumour).
    k = rng.uniform(0.2, 0.4)
    shrink = 1 - k * np.exp(-dist ** 2 / (2 * (1.5 * r0) ** 2))
    src = (centre[:, None, None, None] + rel * shrink) / spacing_mm[:, None, None, None]
    image = ndimage.map_coordinates(image, src, order=1, mode='nearest').astype(np.float32)
    brain = ndimage.map_coordinates(brain.astype(np.float32), src, order=1, mode='nearest') > 0.5
    # Lobulated shape, soft edge, textured intensity.
    d = dist / r0 + 0.25 * _smooth_field(rng, shape, spacing_mm, 0.4 * r0)
    seg = (d < 1) & brain
    values = image[brain]
    ref = np.percentile(values, 99) * rng.uniform(1.0, 1.2) if hyper else np.percentile(values, 50) * rng.uniform(0.2, 0.45)
    lesion = ref * (1 + 0.08 * _smooth_field(rng, shape, spacing_mm, 4.0))
    alpha = np.clip((1 - d) / 0.15, 0, 1) * brain
    image = (image * (1 - alpha) + lesion * alpha).astype(np.float32) * brain
    return dict(subject, image=image, brain=brain, seg=seg)

def add_ms(subject: dict, rng: np.random.Generator, spacing_mm: np.ndarray) -> dict:
    image, brain = subject['image'].copy(), subject['brain']
    shape = image.shape
    mm = _mm_grid(shape, spacing_mm)
    seg = np.zeros(shape, dtype=bool)
    hi = np.percentile(image[brain], 99)
    allowed = (subject['wm'] > 0.7) & brain
    for _ in range(rng.integers(4, 10)):
        centre = _pick_centre(rng, allowed, 'ms_hyper') * spacing_mm
        radii = rng.uniform(4, 9, size=3)
        d = np.sqrt((((mm - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0))
        blob = (d < 1) & brain
        alpha = np.clip((1 - d) / 0.3, 0, 1) * brain
        value = hi * rng.uniform(1.05, 1.25)
        image = image * (1 - alpha) + value * alpha
        seg |= blob
    return dict(subject, image=image.astype(np.float32), seg=seg)

def make_case(geometry: Geometry, rng: np.random.Generator, kind: str | None, augment: bool = True, variation: str = 'realistic',
    healthy_rng: np.random.Generator | None = None) -> dict:
    """One volume: image, brain mask, lesion mask (all-zero when healthy); with healthy_rng also 'healthy',
    the subject before its lesion and mass effect (Geometry.subject; the lesions keep it unchanged)."""
    subject = geometry.subject(rng, augment, variation, healthy_rng)
    if kind is None:
        subject['seg'] = np.zeros(subject['image'].shape, dtype=bool)
    elif kind in ('tumour_hyper', 'tumour_hypo'):
        subject = add_tumour(subject, rng, geometry.spacing_mm, hyper=(kind == 'tumour_hyper'))
    elif kind == 'ms_hyper':
        subject = add_ms(subject, rng, geometry.spacing_mm)
    else:
        raise ValueError(f'unknown lesion kind {kind!r} (expected one of {", ".join(LESION_KINDS)})')
    return subject

#----------------------------------------------------------------------------
# Writing: NIfTI files (atomic), then the split CSVs.

def save_nifti(path: str, data: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib
    img = nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine)
    img.header.set_xyzt_units('mm')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    persistence.atomic_write_bytes(path, img.to_bytes()) if not path.endswith('.gz') else \
        persistence.atomic_write_bytes(path, _gzip(img.to_bytes()))

def _gzip(data: bytes) -> bytes:
    import gzip
    return gzip.compress(data, mtime=0)

def write_split(path: str, rows: list[dict], columns=SPLIT_COLUMNS) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator='\n')
    writer.writeheader()
    writer.writerows(rows)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    persistence.atomic_write_bytes(path, buf.getvalue().encode('utf-8'))

def build_anomaly_data(
    dest,                           # Data root (the reference's layout, see module docstring).
    resolution      = 32,           # In-plane size H = W (reference: 96).
    slices          = 20,           # Axial slices S (reference: 50).
    z_mm            = (-40.0, 64.0),# MNI z range of the slices.
    counts          = None,         # {split name: volumes}; defaults below.
    seed            = 0,            # Random seed.
    augment         = True,         # Per-subject deformation, bias, gamma, noise.
    variation       = 'realistic',  # Healthy inter-subject variation: 'realistic' or 'small' (module docstring).
    log             = print,        # Progress output.
) -> dict:
    """Build every split; return {split: number of volumes}."""
    counts = {**dict(IXI_train_fold0=40, IXI_val_fold0=4, IXI_test=4, Brats21_val=6, Brats21_test=12, MSLUB_val=4, MSLUB_test=10), **(counts or {})}
    geometry = Geometry(resolution, slices, z_mm)
    set_of = lambda split: 'ixi' if split.startswith('IXI') else 'brats' if split.startswith('Brats') else 'mslub'
    written = {}
    for set_idx, split in enumerate(sorted(counts)):
        spec = SETS[set_of(split)]
        rows = []
        for i in range(int(counts[split])):
            rng = np.random.default_rng([seed, set_idx, i])
            kind = None if spec['kinds'] is None else spec['kinds'][i % len(spec['kinds'])]
            healthy_rng = None if kind is None else np.random.default_rng([seed, set_idx, i, HEALTHY_STREAM])
            case = make_case(geometry, rng, kind, augment, variation, healthy_rng)
            name = f'{spec["prefix"]}_{split.split("_")[1]}_{i:03d}.nii.gz'
            row = dict(img_path=f'{spec["folder"]}/t2/{name}', mask_path=f'{spec["folder"]}/mask/{name}',
                seg_path='' if kind is None else f'{spec["folder"]}/seg/{name}', kind=kind or 'healthy')
            save_nifti(os.path.join(dest, row['img_path']), case['image'], geometry.affine)
            save_nifti(os.path.join(dest, row['mask_path']), case['brain'], geometry.affine)
            if kind is not None:
                save_nifti(os.path.join(dest, row['seg_path']), case['seg'], geometry.affine)
                row['healthy_path'] = f'{spec["folder"]}/healthy/{name}'
                save_nifti(os.path.join(dest, row['healthy_path']), case['healthy'], geometry.affine)
            rows.append(row)
        write_split(os.path.join(dest, 'splits', f'{split}.csv'), rows, SPLIT_COLUMNS if spec['kinds'] is None else LESION_SPLIT_COLUMNS)
        written[split] = len(rows)
        log(f'{split}: {len(rows)} volumes {resolution}x{resolution}x{slices}')
    return written

#----------------------------------------------------------------------------
