# medEDM: diffusion-model training toolkit for medical imaging.

"""Tool for building medEDM datasets.

Example:
    python dataset_tool.py mri-slices --dest datasets/mni-slices-32.npz --resolution 32 --subjects 40
"""

import os
import re
import tempfile
import time

import click
import numpy as np

from torch_utils import persistence
from training import mri_phantoms

#----------------------------------------------------------------------------
# Parse a float range 'a,b' (used for --z-mm).

def parse_float_range(s: str | tuple) -> tuple[float, float]:
    if isinstance(s, (tuple, list)):
        return float(s[0]), float(s[1])
    m = re.fullmatch(r'\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*', s)
    if not m:
        raise click.BadParameter(f'expected "low,high", got {s!r}')
    lo, hi = float(m.group(1)), float(m.group(2))
    if not lo < hi:
        raise click.BadParameter(f'low must be below high, got {s!r}')
    return lo, hi

#----------------------------------------------------------------------------
# The MRI slices themselves: training/mri_phantoms.py (with the template
# loading and subject deformation that every MNI152-based family uses).

build_mri_slices = mri_phantoms.build_mri_slices

#----------------------------------------------------------------------------
# Command group.

@click.group()
def main():
    """Build medEDM datasets.

    \b
    python dataset_tool.py mri-slices --dest datasets/mni-slices-32.npz --resolution 32 --subjects 40
    """

#----------------------------------------------------------------------------
# The output file: checked before the (long) build, so a bad --dest fails at
# once with one line and nothing written; written atomically.

def _check_dest(dest: str) -> None:
    if not dest.endswith('.npz'):
        raise click.BadParameter(f'--dest must end with .npz, got {dest!r}', param_hint='--dest')
    if os.path.isdir(dest):
        raise click.BadParameter(f'{dest!r} is an existing directory; give a file name ending in .npz', param_hint='--dest')
    folder = os.path.dirname(os.path.abspath(dest))
    try: # Root passes os.access on read-only mounts: try a real (empty, removed) file.
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix='.dataset_tool-probe-')
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise click.ClickException(f'cannot write --dest {dest}: {err.strerror or err} ({folder}); nothing was written') from None

def _write_dest(dest: str, data: dict) -> None:
    try:
        persistence.atomic_write(dest, lambda f: np.savez(f, **data))
    except OSError as err:
        raise click.ClickException(f'cannot write --dest {dest}: {err.strerror or err}; nothing was written') from None

#----------------------------------------------------------------------------
# Command: MNI152-based brain MRI slices.

@main.command('mri-slices')
@click.option('--dest',                 help='Output .npz file', metavar='PATH',                            type=str, required=True)
@click.option('--resolution',           help='Image size in pixels', metavar='INT',                         type=click.IntRange(min=8), default=64, show_default=True)
@click.option('--subjects',             help='Number of random subjects', metavar='INT',                    type=click.IntRange(min=1), default=40, show_default=True)
@click.option('--slices-per-subject',   help='Axial slices per subject', metavar='INT',                     type=click.IntRange(min=1), default=16, show_default=True)
@click.option('--z-mm',                 help='MNI z range of the slices (mm)', metavar='LOW,HIGH',          type=parse_float_range, default='-20,50', show_default=True)
@click.option('--voxel-mm',             help='Working grid of the template (mm)', metavar='INT',            type=click.IntRange(min=1, max=4), default=2, show_default=True)
@click.option('--seed',                 help='Random seed', metavar='INT',                                  type=click.IntRange(min=0), default=0, show_default=True)
@click.option('--augment/--no-augment', help='Random deformation, bias field, gamma and noise',             default=True, show_default=True)
def mri_slices(dest, resolution, subjects, slices_per_subject, z_mm, voxel_mm, seed, augment):
    """2-D axial T1 brain MRI slices of random subjects made from the MNI152 template.

    Saves `images` float32 Nx1xRxR in [-1,1] (background -1), `subject`,
    `slice` (z index on the 1 mm MNI grid) and `z_mm`. Needs nilearn's data
    files (pip install --no-deps nilearn==0.14.1) and nibabel.
    """
    _check_dest(dest)
    t0 = time.time()
    try:
        data = build_mri_slices(resolution=resolution, subjects=subjects, slices_per_subject=slices_per_subject,
            z_mm=z_mm, voxel_mm=voxel_mm, seed=seed, augment=augment)
    except (FileNotFoundError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    _write_dest(dest, data)
    n, c, h, w = data['images'].shape
    print(f'Wrote {dest}: {n} images {c}x{h}x{w} ({subjects} subjects x {slices_per_subject} slices, '
        f'z {z_mm[0]:g}..{z_mm[1]:g} mm, seed {seed}) in {time.time() - t0:.1f} s')

#----------------------------------------------------------------------------
# Command: PET phantoms and simulated full-/low-dose reconstructions.

@main.command('pet-data')
@click.option('--dest',                 help='Output .npz file', metavar='PATH',                            type=str, required=True)
@click.option('--resolution',           help='Image size in pixels', metavar='INT',                         type=click.IntRange(min=8), default=64, show_default=True)
@click.option('--subjects',             help='Number of random subjects', metavar='INT',                    type=click.IntRange(min=1), default=20, show_default=True)
@click.option('--slices-per-subject',   help='Axial slices per subject', metavar='INT',                     type=click.IntRange(min=1), default=16, show_default=True)
@click.option('--seed',                 help='Random seed (use different seeds for train/val/test)', metavar='INT', type=click.IntRange(min=0), default=0, show_default=True)
@click.option('--total-counts',         help='Expected full-dose counts per image', metavar='FLOAT',        type=click.FloatRange(min=1), default=1e6, show_default=True)
@click.option('--dose-fraction',        help='Low dose / full dose', metavar='FLOAT',                       type=click.FloatRange(min=0, max=1, min_open=True), default=0.25, show_default=True)
@click.option('--n-iter',               help='MLEM iterations', metavar='INT',                              type=click.IntRange(min=1), default=50, show_default=True)
@click.option('--phantoms',             help="Your own phantoms (.npz with 'phantoms', or a NIfTI volume) instead of MNI152 ones", metavar='PATH', type=str, default=None)
@click.option('--phantoms-only',        help='Skip the simulation (for training with simulate=true)',       is_flag=True)
@click.option('--cache-dir',            help='Projector cache folder', metavar='PATH',                      type=str, default='projector_matrices', show_default=True)
def pet_data(dest, resolution, subjects, slices_per_subject, seed, total_counts, dose_fraction, n_iter, phantoms, phantoms_only, cache_dir):
    """Brain PET activity phantoms (MNI152 GM/WM, 4:1:0, lesions) with full-dose
    and low-dose MLEM reconstructions.

    Saves `phantoms` [N,1,R,R] and, unless --phantoms-only, `full` and `low`
    (MLEM of Poisson counts and of their binomial thinning, both in full-dose
    counts per pixel), `low_counts` (the low-dose sinograms [N, 2R, R], for the
    reconstruction baselines of evaluate.py pet), `phantom_counts` (the phantom in
    those units: what both reconstructions estimate), the simulation settings,
    `subject` and `slice`.
    """
    import torch
    from tomography_utils.dose import phantom_counts, simulate_dose
    from tomography_utils.projector import get_system_matrix
    from training.pet import phantoms as pet_phantoms
    _check_dest(dest)
    t0 = time.time()
    try:
        if phantoms is not None:
            data = pet_phantoms.load_user_phantoms(phantoms, resolution)
        else:
            data = pet_phantoms.build_pet_phantoms(resolution=resolution, subjects=subjects, slices_per_subject=slices_per_subject, seed=seed)
    except (FileNotFoundError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    if not phantoms_only:
        A = get_system_matrix(resolution, cache_dir=cache_dir)
        gen = torch.Generator().manual_seed(seed)
        full, low, low_counts = [], [], []
        try:
            data['phantom_counts'] = phantom_counts(torch.from_numpy(data['phantoms']), A, total_counts)[:, None].numpy()
            for k, batch in enumerate(torch.from_numpy(data['phantoms']).split(256)):
                f, l, _, lc = simulate_dose(batch[:, 0], A, total_counts=total_counts, dose_fraction=dose_fraction, n_iter=n_iter,
                    generator=gen, index_offset=256 * k)
                full.append(f[:, None].numpy())
                low.append(l[:, None].numpy())
                low_counts.append(lc.numpy().astype(np.float32))
        except ValueError as err:                                       # An all-zero phantom, an empty acquisition.
            raise click.ClickException(str(err)) from None
        data.update(full=np.concatenate(full), low=np.concatenate(low), low_counts=np.concatenate(low_counts),
            total_counts=np.float64(total_counts), dose_fraction=np.float64(dose_fraction), n_iter=np.int64(n_iter))
    _write_dest(dest, data)
    print(f'Wrote {dest}: {len(data["phantoms"])} phantoms {resolution}x{resolution}'
        f'{"" if phantoms_only else f" with full/low-dose MLEM ({total_counts:g} counts, fraction {dose_fraction:g}, {n_iter} iterations)"} in {time.time() - t0:.1f} s')

#----------------------------------------------------------------------------
# Command: BraTS-inpainting cases (training/ldm3d/synth.py).

@main.command('brats-inpaint')
@click.option('--dest',                 help='Output folder (cases/, growth/, tissue/)', metavar='DIR',    type=str, required=True)
@click.option('--cases',                help='Number of cases (patients)', metavar='INT',                   type=click.IntRange(min=1), default=40, show_default=True)
@click.option('--masks-per-case',       help='Healthy-region masks per case', metavar='INT',                type=click.IntRange(min=1), default=2, show_default=True)
@click.option('--voxel-mm',             help='Grid of the template (mm)', metavar='INT',                    type=click.IntRange(min=1, max=8), default=6, show_default=True)
@click.option('--seed',                 help='Random seed', metavar='INT',                                  type=click.IntRange(min=0), default=0, show_default=True)
def brats_inpaint(dest, cases, masks_per_case, voxel_mm, seed):
    """BraTS 2023 inpainting cases from the MNI152 T1 and tissue maps."""
    from training.ldm3d import synth
    t0 = time.time()
    agreement = []
    names = synth.build_cases(dest, cases, masks_per_case=masks_per_case, voxel_mm=voxel_mm, seed=seed, agreement=agreement)
    print(f'Wrote {len(names)} cases x {masks_per_case} masks to {dest} ({voxel_mm} mm) in {time.time() - t0:.1f} s')
    print(f'Tissue maps of the voided images: inside the masks the atlas label equals the true label at '
        f'{100 * sum(agreement) / len(agreement):.1f} % of the voxels (mean over masks; min {100 * min(agreement):.1f} %)')

#----------------------------------------------------------------------------
# Command: DiffMIC demo classification data (training/diffmic/phantoms.py).

@main.command('diffmic-data')
@click.option('--dest',                 help='Output class-folder root', metavar='DIR',                      type=str, required=True)
@click.option('--resolution',           help='Image size in pixels', metavar='INT',                         type=click.IntRange(min=16), default=32, show_default=True)
@click.option('--train-per-class',      help='Training images per class (train/ + validation)', metavar='INT', type=click.IntRange(min=2), default=300, show_default=True)
@click.option('--test-per-class',       help='Test images per class', metavar='INT',                        type=click.IntRange(min=1), default=100, show_default=True)
@click.option('--seed',                 help='Random seed (test subjects use seed + 1000)', metavar='INT',  type=click.IntRange(min=0), default=0, show_default=True)
def diffmic_data(dest, resolution, train_per_class, test_per_class, seed):
    """MNI152 brain slices with lesion classes (healthy / hyper / hypo / mass) as PNG class folders.

    Writes <dest>/train/<class>/*.png and <dest>/test/<class>/*.png (disjoint random subjects).
    """
    from training.diffmic import phantoms as diffmic_phantoms
    if os.path.isdir(os.path.join(dest, 'train')) or os.path.isdir(os.path.join(dest, 'test')):
        raise click.ClickException(f'--dest: {dest} already holds train/ or test/; remove it or choose another folder')
    t0 = time.time()
    try:
        counts = diffmic_phantoms.build_demo_dataset(dest, resolution=resolution, train_per_class=train_per_class,
            test_per_class=test_per_class, seed=seed)
    except (FileNotFoundError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    print(f'Wrote {dest}: {counts["train"]} train and {counts["test"]} test images {resolution}x{resolution} in '
        f'{len(diffmic_phantoms.CLASSES)} classes ({", ".join(diffmic_phantoms.CLASSES)}) in {time.time() - t0:.1f} s')

#----------------------------------------------------------------------------

#----------------------------------------------------------------------------
# Command: brain MRI anomaly-detection volumes (training/anomaly/data.py).

@main.command('anomaly-data')
@click.option('--dest',                 help='Output data root (Train/, Test/, splits/)', metavar='DIR',     type=str, required=True)
@click.option('--resolution',           help='In-plane size H = W (reference: 96)', metavar='INT',          type=click.IntRange(min=8), default=32, show_default=True)
@click.option('--slices',               help='Axial slices per volume (reference: 50)', metavar='INT',      type=click.IntRange(min=2), default=20, show_default=True)
@click.option('--z-mm',                 help='MNI z range of the slices (mm)', metavar='LOW,HIGH',          type=parse_float_range, default='-40,64', show_default=True)
@click.option('--counts',               help='Volumes per split, e.g. IXI_train_fold0=40,Brats21_test=12', metavar='LIST', type=str, default='', show_default=False)
@click.option('--seed',                 help='Random seed', metavar='INT',                                  type=click.IntRange(min=0), default=0, show_default=True)
@click.option('--variation',            help='Healthy inter-subject variation', type=click.Choice(['realistic', 'small']), default='realistic', show_default=True)
def anomaly_data(dest, resolution, slices, z_mm, counts, seed, variation):
    """Healthy IXI-like and lesioned BraTS-/MSLUB-like NIfTI volumes with brain
    and lesion masks and the reference's split CSVs, from the MNI152 template
    (lesion kinds: tumour_hyper, tumour_hypo, ms_hyper; see training/anomaly/data.py);
    every lesioned volume also has its lesion-free rendering (healthy/, CSV column
    healthy_path: the ground truth of evaluate.py anomaly's oracle reference)."""
    from training.anomaly import data as anomaly_data_mod
    parsed = {}
    for item in filter(None, (s.strip() for s in counts.split(','))):
        name, _, value = item.partition('=')
        if name not in ('IXI_train_fold0', 'IXI_val_fold0', 'IXI_test', 'Brats21_val', 'Brats21_test', 'MSLUB_val', 'MSLUB_test') or not value.isdigit():
            raise click.BadParameter(f'expected SPLIT=COUNT with a split of the reference, got {item!r}', param_hint='--counts')
        parsed[name] = int(value)
    t0 = time.time()
    try:
        written = anomaly_data_mod.build_anomaly_data(dest, resolution=resolution, slices=slices, z_mm=z_mm, counts=parsed, seed=seed, variation=variation)
    except (FileNotFoundError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    print(f'Wrote {dest}: {sum(written.values())} volumes {resolution}x{resolution}x{slices} in {time.time() - t0:.1f} s')

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------
