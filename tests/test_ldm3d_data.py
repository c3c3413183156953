# medEDM: 3-D LDM inpainting data (training/ldm3d/data.py, synth.py): the
# BraTS layout built from MNI152, the patient-level split, the padding round
# trip, conditions, and the checks of bad cases.

import os
import shutil

import nibabel as nib
import numpy as np
import pytest

from training.ldm3d import data as ldm_data
from training.ldm3d import synth

@pytest.fixture(scope='module')
def built(tmp_path_factory):
    dest = str(tmp_path_factory.mktemp('brats'))
    names = synth.build_cases(dest, 5, masks_per_case=2, voxel_mm=8, seed=0)
    return dest, names

def _paths(dest):
    return os.path.join(dest, 'cases'), os.path.join(dest, 'growth'), os.path.join(dest, 'tissue')

#----------------------------------------------------------------------------

def test_builder_writes_the_challenge_layout(built):
    dest, names = built
    cases, growth, tissue = _paths(dest)
    assert names == [f'BraTS-GLI-{i:05d}-000' for i in range(5)]
    for case in names:
        t1n, timg = ldm_data.read_volume(ldm_data.t1n_file(cases, case), 't1n')
        for k in range(2):
            voided, vimg = ldm_data.read_volume(ldm_data.voided_file(cases, case, k), 'voided')
            mask = ldm_data.read_volume(ldm_data.mask_file(cases, case, k), 'mask')[0] > 0
            assert mask.sum() >= 8 and np.all(t1n[mask] > 0) # A healthy region, inside the brain.
            assert np.array_equal(voided[~mask], t1n[~mask]) and np.all(voided[mask] == 0)
            assert np.array_equal(vimg.affine, timg.affine)
            tis = ldm_data.read_volume(ldm_data.tissue_file(tissue, case, k), 'tissue')[0]
            assert set(np.unique(tis)) == {0, 1, 2, 3} and np.all(t1n[(tis > 0) & ~mask] > 0)
        assert not os.path.exists(ldm_data.tissue_file(tissue, case)) # No map of the full subject.
        g = ldm_data.read_volume(ldm_data.growth_file(growth, case), 'growth')[0]
        assert 0 <= g.min() and g.max() <= 1 and (g >= 0.2).any()
    # Subjects differ (per-case deformation and noise), the grid is the cropped template's.
    a, b = (ldm_data.read_volume(ldm_data.t1n_file(cases, c), 't1n')[0] for c in names[:2])
    assert a.shape == b.shape and not np.allclose(a, b)
    assert np.allclose(np.abs(np.diag(timg.affine)[:3]), 8)

def test_patient_level_split_is_stable_and_keeps_masks_together():
    cases = [f'BraTS-GLI-{i:05d}-000' for i in range(400)]
    items = [(c, k) for c in cases for k in range(3)]
    test = ldm_data.split_items(items, 'test')
    train = ldm_data.split_items(items, 'train')
    assert len(test) + len(train) == len(items)
    assert not {c for c, _ in test} & {c for c, _ in train} # No patient on both sides.
    assert 0.15 < len(test) / len(items) < 0.25 # About 20 %.
    # A case's side does not depend on which other cases exist.
    assert ldm_data.split_items(items[:30], 'test') == [it for it in test if it in items[:30]]
    assert ldm_data.split_of('BraTS-GLI-00007-000', seed=1) in ('train', 'test')

def test_padding_round_trip_is_exact():
    rng = np.random.default_rng(0)
    x = rng.standard_normal([2, 27, 33, 19]).astype(np.float32)
    shape = ldm_data.padded_shape(x.shape[1:], 8)
    assert shape == [32, 40, 24]
    padded, crop = ldm_data.pad_to(x, shape)
    assert padded.shape == (2, 32, 40, 24) and padded[:, :2].sum() == 0 # 27 -> 32: 2 before, 3 after.
    assert np.array_equal(ldm_data.unpad(padded, crop), x)
    assert ldm_data.check_multiple([32, 40, 24], 8, False, 'v.nii.gz') == [32, 40, 24]
    with pytest.raises(ValueError, match=r'v\.nii\.gz: size \[27, 33, 19\] is not a multiple of the downsampling factor 8'):
        ldm_data.check_multiple([27, 33, 19], 8, False, 'v.nii.gz')
    s = 3.7
    assert np.allclose(ldm_data.denormalize(ldm_data.normalize(x, s), s), x, atol=1e-6)

def test_dataset_items_hold_normalised_volumes_masks_and_conditions(built):
    dest, names = built
    ds = ldm_data.BratsInpaintDataset(*_paths(dest), split='all', multiple=8)
    assert len(ds) == 10 and ds.items[:2] == [(names[0], 0), (names[0], 1)]
    item = ds[1]
    case = ldm_data.load_case(*_paths(dest)[:1], names[0], 1, *_paths(dest)[1:])
    _, crop = ldm_data.pad_to(case['voided'][None], ds.image_shape[1:])
    assert item['image'].shape == (1, *ds.image_shape[1:]) and all(s % 8 == 0 for s in ds.image_shape[1:])
    assert item['cond'].shape == (4, *ds.image_shape[1:])
    assert np.array_equal(ldm_data.unpad(item['mask'][0], crop) > 0, case['mask'])
    voided = ldm_data.denormalize(ldm_data.unpad(item['voided'][0], crop), case['scale'])
    assert np.allclose(voided, case['voided'], atol=1e-5 * case['scale'])
    assert np.array_equal(item['image'][0][item['mask'][0] == 0], item['voided'][0][item['mask'][0] == 0])
    assert np.array_equal(ldm_data.unpad(item['cond'][0], crop), case['growth'] >= 0.2)
    tissue = ldm_data.unpad(item['cond'][1:], crop)
    assert np.array_equal(tissue.sum(0) > 0, case['tissue'] > 0) and tissue.sum(0).max() == 1
    # The harmonic fill (the decoder's condition): the voided image outside the mask, Laplace's solution inside.
    harmonic = ldm_data.harmonic_fill(case['voided'], case['mask'])
    assert np.array_equal(harmonic[~case['mask']], case['voided'][~case['mask']]) and (harmonic[case['mask']] > 0).all()
    assert np.allclose(ldm_data.unpad(item['harmonic'][0], crop), ldm_data.normalize(harmonic, case['scale']), atol=1e-6)
    assert np.array_equal(item['harmonic'][0][item['mask'][0] == 0], item['voided'][0][item['mask'][0] == 0])
    train = ldm_data.BratsInpaintDataset(*_paths(dest), split='train')
    assert {c for c, _ in train.items}.isdisjoint(c for c, _ in ldm_data.BratsInpaintDataset(*_paths(dest), split='test').items)

#----------------------------------------------------------------------------
# The tissue map is a segmentation of the voided image: inside the mask it
# does not depend on the subject's true anatomy there.

_RandomSubject = synth.mri_phantoms.RandomSubject

class _BumpedSubject(_RandomSubject):
    """A RandomSubject whose deformation is moved by 3 voxels inside `BUMP` (crop coordinates) only."""
    BUMP = None
    def template_coords(self, points):
        q = super().template_coords(points)
        if self.BUMP is not None and points.shape[1:] == self.BUMP.shape:
            q = q + 3.0 * np.stack([np.zeros_like(self.BUMP), np.zeros_like(self.BUMP), self.BUMP])
        return q

def test_tissue_map_inside_the_mask_ignores_the_true_anatomy_there(built, tmp_path, monkeypatch):
    dest, names = built
    cases, _, tissue = _paths(dest)
    mask = ldm_data.read_volume(ldm_data.mask_file(cases, names[0], 0), 'mask')[0] > 0
    monkeypatch.setattr(_BumpedSubject, 'BUMP', mask.astype(np.float32))
    monkeypatch.setattr(synth.mri_phantoms, 'RandomSubject', _BumpedSubject)
    other = str(tmp_path / 'bumped')
    synth.build_cases(other, 1, masks_per_case=2, voxel_mm=8, seed=0)
    a = ldm_data.load_case(cases, names[0], 0, *_paths(dest)[1:])
    b = ldm_data.load_case(*_paths(other)[:1], names[0], 0, *_paths(other)[1:])
    # Two subjects that differ only inside mask 0: the same voided image and mask, different truths (and labels) inside.
    assert np.array_equal(a['mask'], b['mask']) and np.array_equal(a['voided'], b['voided'])
    assert np.array_equal(a['t1n'][~mask], b['t1n'][~mask]) and not np.allclose(a['t1n'][mask], b['t1n'][mask])
    t1, gm, wm = (synth.mri_phantoms.load_mni152(n, 8)[0] for n in ('t1', 'gm', 'wm'))
    points = np.indices(t1.shape, dtype=np.float32)[(slice(None), *synth.brain_box(t1))]
    labels = [synth.tissue_labels(*(s.sample(v, points) for v in (t1, gm, wm))) for s in (
        _RandomSubject(np.random.default_rng([0, 0]), t1.shape, voxel_mm=8),
        _BumpedSubject(np.random.default_rng([0, 0]), t1.shape, voxel_mm=8))]
    assert np.array_equal(labels[0][~mask], labels[1][~mask]) and not np.array_equal(labels[0][mask], labels[1][mask])
    # ... get the same tissue map: their own labels outside, the atlas's inside.
    assert np.array_equal(a['tissue'], b['tissue'])
    assert np.array_equal(a['tissue'][~mask], labels[0][~mask])
    # voided_tissue never reads the subject's labels inside the mask.
    rng = np.random.default_rng(1)
    atlas = rng.integers(0, 4, mask.shape).astype(np.uint8)
    subject = rng.integers(0, 4, mask.shape).astype(np.uint8)
    scrambled = np.where(mask, rng.integers(0, 4, mask.shape), subject).astype(np.uint8)
    out = synth.voided_tissue(subject, mask, atlas)
    assert np.array_equal(out, synth.voided_tissue(scrambled, mask, atlas))
    assert np.array_equal(out[mask], atlas[mask]) and np.array_equal(out[~mask], subject[~mask])

def test_a_single_tissue_file_per_case_still_works(built, tmp_path):
    dest, case = _copy_case(built, tmp_path)
    cases, growth, tissue = _paths(dest)
    data, img = ldm_data.read_volume(ldm_data.tissue_file(tissue, case, 1), 'tissue')
    one = nib.Nifti1Image(data.astype(np.uint8), img.affine)
    for k in (0, 1):
        os.remove(ldm_data.tissue_file(tissue, case, k))
    with pytest.raises(ValueError, match=f'conditioning file missing for case {case}: .*{case}-tissue.nii.gz '
            f'\\(nor .*{case}-tissue-0000.nii.gz\\)'):
        ldm_data.load_case(cases, case, 0, growth, tissue)
    nib.save(one, ldm_data.tissue_file(tissue, case))
    for k in (0, 1):
        assert np.array_equal(ldm_data.load_case(cases, case, k, growth, tissue)['tissue'], data)

def test_per_mask_tissue_maps_win_and_may_not_be_mixed_with_the_per_case_one(built, tmp_path):
    dest, case = _copy_case(built, tmp_path)
    cases, growth, tissue = _paths(dest)
    own = ldm_data.read_volume(ldm_data.tissue_file(tissue, case, 0), 'tissue')[0]
    data, img = ldm_data.read_volume(ldm_data.tissue_file(tissue, case, 1), 'tissue')
    nib.save(nib.Nifti1Image(np.zeros_like(data, dtype=np.uint8), img.affine), ldm_data.tissue_file(tissue, case))   # A per-case map too:
    assert np.array_equal(ldm_data.load_case(cases, case, 0, growth, tissue)['tissue'], own)                         # the per-mask one wins.
    os.remove(ldm_data.tissue_file(tissue, case, 1))                      # Mask 1 without its own map: no silent fallback.
    with pytest.raises(ValueError) as err:
        ldm_data.load_case(cases, case, 1, growth, tissue)
    assert str(err.value) == (f'conditioning file missing for case {case}: {ldm_data.tissue_file(tissue, case, 1)} (the case has per-mask '
        f'tissue maps, e.g. {case}-tissue-0000.nii.gz; every mask needs its own, computed from its voided image)')

#----------------------------------------------------------------------------
# Bad cases: one ValueError naming the file.

def _copy_case(built, tmp_path):
    dest, names = built
    out = str(tmp_path / 'data')
    shutil.copytree(dest, out)
    return out, names[0]

def _save(path, data, affine):
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine), path)

def test_bad_cases_raise_messages_naming_the_file(built, tmp_path):
    dest, case = _copy_case(built, tmp_path)
    cases, growth, tissue = _paths(dest)
    mpath = ldm_data.mask_file(cases, case, 0)
    img = nib.load(mpath)
    mask = np.asarray(img.dataobj) > 0
    load = lambda: ldm_data.load_case(cases, case, 0, growth, tissue) # pylint: disable=unnecessary-lambda-assignment
    _save(mpath, mask[:-1], img.affine)
    with pytest.raises(ValueError, match=f'{mpath} has shape .* but .*voided-0000.nii.gz has'):
        load()
    shifted = img.affine.copy()
    shifted[0, 3] += 5
    _save(mpath, mask, shifted)
    with pytest.raises(ValueError, match=f'{mpath} has a different affine'):
        load()
    _save(mpath, np.zeros_like(mask), img.affine)
    with pytest.raises(ValueError, match=f'{mpath}: the mask is empty'):
        load()
    _save(mpath, np.ones_like(mask), img.affine)
    with pytest.raises(ValueError, match=f'{mpath}: the mask covers the whole brain'):
        load()
    _save(mpath, mask, img.affine)
    os.remove(ldm_data.growth_file(growth, case))
    with pytest.raises(ValueError, match=f'conditioning file missing for case {case}: .*{case}-growth.nii.gz'):
        load()
    with pytest.raises(ValueError, match='not a folder of BraTS inpainting cases'):
        ldm_data.find_items(str(tmp_path / 'nowhere'))

def test_harmonic_fill_refuses_a_mask_part_with_no_known_neighbour():
    from training.ldm3d.data import harmonic_fill
    v = np.random.default_rng(0).random((6, 6, 6)).astype(np.float32)
    m = np.zeros((6, 6, 6), bool)
    m[2:4, 2:4, 2:4] = True
    assert np.isfinite(harmonic_fill(v, m)).all()
    with pytest.raises(ValueError, match=r'the mask has 1 connected part\(s\) with no known voxel next to them'):
        harmonic_fill(v, np.ones((6, 6, 6), bool))
