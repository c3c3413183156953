# medEDM: tests of dataset_tool.py and training/mri_phantoms.py.

import importlib.util

import numpy as np
import pytest
from click.testing import CliRunner

import dataset_tool
from training import mri_phantoms
from training.dataset import NpzDataset

#----------------------------------------------------------------------------
# Build a tiny MRI slice set through the CLI.

def build(tmp_path, name, *args):
    dest = str(tmp_path / name)
    result = CliRunner().invoke(dataset_tool.main, ['mri-slices', '--dest', dest, '--resolution', '32',
        '--subjects', '2', '--slices-per-subject', '4', *args])
    assert result.exit_code == 0, result.output
    assert 'Wrote' in result.output and '8 images 1x32x32' in result.output
    with np.load(dest, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}, dest

#----------------------------------------------------------------------------

def test_mri_slices_shape_range_determinism(tmp_path):
    a, dest = build(tmp_path, 'a.npz', '--seed', '1')
    b, _ = build(tmp_path, 'b.npz', '--seed', '1')
    c, _ = build(tmp_path, 'c.npz', '--seed', '2')
    x = a['images']
    assert x.shape == (8, 1, 32, 32) and x.dtype == np.float32
    assert x.min() >= -1 and x.max() <= 1 and x.max() == 1
    assert a['subject'].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert a['slice'].shape == (8,) and a['z_mm'].shape == (8,)
    assert (np.diff(a['slice'][:4]) > 0).all() # Increasing z within a subject.
    assert x.tobytes() == b['images'].tobytes()
    assert not np.array_equal(x, c['images'])
    fraction = (x > -0.9).mean(axis=(1, 2, 3))
    assert ((fraction > 0.2) & (fraction < 0.9)).all(), fraction
    ds = NpzDataset(dest) # Usable as a dataset directly.
    assert len(ds) == 8 and ds.resolution == 32 and ds.num_channels == 1

def test_mri_slices_are_brain_like(tmp_path):
    plain, _ = build(tmp_path, 'plain.npz', '--no-augment')
    aug, _ = build(tmp_path, 'aug.npz')
    assert np.array_equal(plain['slice'], aug['slice']) # Slice positions depend on the seed only.
    t1, affine = mri_phantoms.load_mni152('t1', 2)
    gm, _ = mri_phantoms.load_mni152('gm', 2)
    wm, _ = mri_phantoms.load_mni152('wm', 2)
    bbox = mri_phantoms.brain_bbox(t1)
    z_vox = (plain['z_mm'] - affine[2, 3]) / affine[2, 2]
    gm_s = mri_phantoms.axial_slices(gm, z_vox, 32, bbox)
    wm_s = mri_phantoms.axial_slices(wm, z_vox, 32, bbox)
    img = plain['images'][:, 0]
    assert img[gm_s > 0.6].mean() < img[wm_s > 0.6].mean() - 0.2 # T1 contrast: GM darker than WM.
    for p, q in zip(plain['images'], aug['images']): # Deformed subjects stay close to the anatomy.
        r = np.corrcoef(p.ravel(), q.ravel())[0, 1]
        assert 0.7 < r < 0.995, r

def test_template_contrast_and_volume():
    t1, affine = mri_phantoms.load_mni152('t1', 2)
    gm, _ = mri_phantoms.load_mni152('gm', 2)
    wm, _ = mri_phantoms.load_mni152('wm', 2)
    assert t1.shape == (98, 116, 94) and t1.dtype == np.float32 and 0 <= t1.min() and t1.max() <= 1
    assert np.allclose(affine[:3, :3], 2 * np.eye(3)) and np.allclose(affine[:3, 3], [-97.5, -133.5, -71.5])
    assert t1[gm > 0.5].mean() < t1[wm > 0.5].mean()
    rng = np.random.default_rng(0)
    vol = mri_phantoms.random_subject_volume(rng, t1, voxel_mm=2)
    assert vol.shape == t1.shape and vol.dtype == np.float32
    assert 0.8 < np.corrcoef(vol.ravel(), t1.ravel())[0, 1] < 0.999
    slices = mri_phantoms.axial_slices(vol, range(40, 48, 2), 16)
    assert slices.shape == (4, 16, 16)
    norm = mri_phantoms.normalize_slices(slices)
    assert norm.min() >= -1 and norm.max() == 1

def test_errors(tmp_path, monkeypatch):
    result = CliRunner().invoke(dataset_tool.main, ['mri-slices', '--dest', str(tmp_path / 'x.zip')])
    assert result.exit_code != 0 and '.npz' in result.output
    result = CliRunner().invoke(dataset_tool.main, ['mri-slices', '--dest', str(tmp_path / 'x.npz'), '--z-mm', '0,5',
        '--slices-per-subject', '10', '--subjects', '1'])
    assert result.exit_code != 0 and 'slices-per-subject' in result.output
    result = CliRunner().invoke(dataset_tool.main, ['mri-slices', '--dest', str(tmp_path / 'x.npz'), '--z-mm', '-100,50'])
    assert result.exit_code != 0 and 'outside the template' in result.output
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match='pip install --no-deps nilearn==0.14.1'):
        mri_phantoms.mni152_path('t1')

#----------------------------------------------------------------------------
