# medEDM: diffusion-model training toolkit for medical imaging.

"""Demo classification data: axial MNI152 brain slices of random subjects
(training/mri_phantoms.py) with one of four findings, written as PNG class
folders (`<dest>/train/<class>/*.png`, `<dest>/test/<class>/*.png`):

    healthy     no finding
    hyper       a small hyper-intense lesion (soft-edged ellipse, + contrast)
    hypo        a small hypo-intense lesion (- contrast)
    mass        mass effect: tissue pushed radially away from a centre
                (no intensity change; the hardest class)

Lesion size, contrast and displacement are drawn from ranges whose low ends
are near the noise and bias of the subjects, so the classes are separable but
not trivially (the DCG's accuracy on the demo is in the README)."""

import os

import numpy as np
from PIL import Image
from scipy import ndimage

from torch_utils import persistence
from training import mri_phantoms

CLASSES = ('healthy', 'hyper', 'hypo', 'mass')
GROUP_PATTERN = r'^([a-z]+-s\d+)-'   # The subject of a demo file name (training.dataset.group_pattern): train-s0003-00010.png -> train-s0003.

#----------------------------------------------------------------------------
# Findings on one slice in [0, 1] (brain = pixels above `brain_level`).

def _centre(rng: np.random.Generator, brain: np.ndarray, margin: int) -> tuple[int, int]:
    inner = ndimage.binary_erosion(brain, iterations=max(margin, 1))
    pts = np.argwhere(inner if inner.any() else brain)
    cy, cx = pts[rng.integers(len(pts))]
    return int(cy), int(cx)

def add_lesion(rng: np.random.Generator, s: np.ndarray, brain: np.ndarray, sign: float, radius_px: tuple, contrast: tuple) -> np.ndarray:
    """A soft ellipse of contrast sign * c (c uniform in `contrast`) inside the brain."""
    cy, cx = _centre(rng, brain, int(np.ceil(radius_px[1])))
    ry, rx = rng.uniform(*radius_px, size=2)
    angle = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[:s.shape[0], :s.shape[1]]
    dy, dx = yy - cy, xx - cx
    u = (dx * np.cos(angle) + dy * np.sin(angle)) / rx
    v = (-dx * np.sin(angle) + dy * np.cos(angle)) / ry
    blob = ndimage.gaussian_filter((u ** 2 + v ** 2 <= 1).astype(np.float32), 0.6) * brain
    return np.clip(s + sign * rng.uniform(*contrast) * blob, 0, 1)

def add_mass_effect(rng: np.random.Generator, s: np.ndarray, brain: np.ndarray, shift_px: tuple, width_px: tuple) -> np.ndarray:
    """Radial push away from a centre: displacement d(r) = A r/w exp(1/2 - r^2 / (2 w^2)) (peak A at r = w)."""
    cy, cx = _centre(rng, brain, int(np.ceil(width_px[0])))
    A, w = rng.uniform(*shift_px), rng.uniform(*width_px)
    yy, xx = np.mgrid[:s.shape[0], :s.shape[1]].astype(np.float64)
    dy, dx = yy - cy, xx - cx
    r = np.sqrt(dy ** 2 + dx ** 2) + 1e-6
    d = A * (r / w) * np.exp(0.5 - r ** 2 / (2 * w ** 2))
    src = np.stack([yy - d * dy / r, xx - d * dx / r]) # Pull from nearer the centre: tissue moves outwards.
    return ndimage.map_coordinates(s, src, order=1, mode='nearest').astype(np.float32)

#----------------------------------------------------------------------------

def build_lesion_slices(
    resolution      = 32,           # Image size (pixels per side).
    per_class       = 100,          # Images per class.
    seed            = 0,            # Random seed (subjects and findings).
    z_mm            = (0.0, 40.0),  # MNI z range of the slices (mm).
    slices_per_subject = 8,         # Axial slices per random subject.
    radius_px       = (1.8, 3.6),   # Lesion semi-axes at 32 px (scaled with the resolution).
    contrast        = (0.20, 0.55), # Lesion contrast (intensities in [0, 1]).
    shift_px        = (1.5, 3.0),   # Mass effect: peak displacement at 32 px.
    width_px        = (2.5, 4.5),   # Mass effect: radius of the peak displacement at 32 px.
    brain_level     = 0.15,         # Brain mask threshold on [0, 1] intensities.
) -> dict:
    """-> dict(images uint8 (N, R, R), labels int64 (N,), classes); class k at every 4th item, order shuffled."""
    if per_class < 1:
        raise ValueError(f'--per-class must be >= 1, got {per_class}')
    n = per_class * len(CLASSES)
    subjects = int(np.ceil(n / slices_per_subject))
    data = mri_phantoms.build_mri_slices(resolution=resolution, subjects=subjects, slices_per_subject=slices_per_subject,
        z_mm=z_mm, seed=seed)
    slices = (data['images'][:n, 0] + 1) / 2 # [-1, 1] -> [0, 1].
    rng = np.random.default_rng([seed, 7919])
    labels = rng.permutation(np.arange(n) % len(CLASSES))
    f = resolution / 32
    out = np.empty_like(slices)
    for i, (s, k) in enumerate(zip(slices, labels)):
        brain = s > brain_level
        if k == 1 or k == 2:
            s = add_lesion(rng, s, brain, +1.0 if k == 1 else -1.0, (radius_px[0] * f, radius_px[1] * f), contrast)
        elif k == 3:
            s = add_mass_effect(rng, s, brain, (shift_px[0] * f, shift_px[1] * f), (width_px[0] * f, width_px[1] * f))
        out[i] = s
    images = np.clip(np.rint(out * 255), 0, 255).astype(np.uint8)
    return dict(images=images, labels=labels.astype(np.int64), subject=data['subject'][:n], slice=data['slice'][:n])

def write_class_folders(dest: str, split: str, data: dict) -> list[str]:
    """PNG files <dest>/<split>/<class>/<split>-s<subject>-<i>.png (atomic writes; the subject in the name
    for a split of whole subjects: GROUP_PATTERN); returns their paths."""
    paths = []
    for i, (image, k, subject) in enumerate(zip(data['images'], data['labels'], data['subject'])):
        folder = os.path.join(dest, split, CLASSES[k])
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f'{split}-s{int(subject):04d}-{i:05d}.png')
        persistence.atomic_write(path, lambda f, im=image: Image.fromarray(im, mode='L').save(f, format='PNG'))
        paths.append(path)
    return paths

def build_demo_dataset(dest: str, resolution: int = 32, train_per_class: int = 300, test_per_class: int = 100, seed: int = 0) -> dict:
    """Train and test class folders with disjoint random subjects (seeds `seed` and `seed + 1000`)."""
    counts = {}
    for split, per_class, s in (('train', train_per_class, seed), ('test', test_per_class, seed + 1000)):
        counts[split] = len(write_class_folders(dest, split, build_lesion_slices(resolution=resolution, per_class=per_class, seed=s)))
    return counts

#----------------------------------------------------------------------------
