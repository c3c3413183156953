# medEDM: anomaly family: the lesion-free rendering of every synthetic
# lesioned volume (dataset_tool anomaly-data, healthy_path) and the
# evaluation's `oracle` bound |x - healthy|: the builder's other files are
# unchanged by it, the rendering is the subject without its lesion up to
# independent noise, the oracle row on a hand-made case, its absence for
# real data, and the bad-input messages of the healthy file.

import csv
import hashlib
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

import launch
from training.anomaly import data as anomaly_data
from training.anomaly import dataset as anomaly_dataset
from training.anomaly import evaluation as E

#----------------------------------------------------------------------------
# The builder.

COUNTS = dict(IXI_train_fold0=1, IXI_val_fold0=1, IXI_test=1, Brats21_val=1, Brats21_test=2, MSLUB_val=1, MSLUB_test=1)

# sha256 (first 16 hex digits) of the array bytes + dtype + affine of every NIfTI file of
# build_anomaly_data(resolution=16, slices=6, counts=COUNTS) as written by the builder BEFORE the healthy
# rendering was added (commit ca3a6d2): the existing draws must not move.
PINS = {
    'Test/Brats21/mask/Brats21_test_000.nii.gz': '87a45e3f98c477fb',
    'Test/Brats21/mask/Brats21_test_001.nii.gz': '0af72ab5329fc8e6',
    'Test/Brats21/mask/Brats21_val_000.nii.gz': 'ba9a5d123f819e5c',
    'Test/Brats21/seg/Brats21_test_000.nii.gz': '26f10a2f99128729',
    'Test/Brats21/seg/Brats21_test_001.nii.gz': '5c28efd8c7945c90',
    'Test/Brats21/seg/Brats21_val_000.nii.gz': '36d7f423e6e2d0e8',
    'Test/Brats21/t2/Brats21_test_000.nii.gz': '1f9fa33fb182041b',
    'Test/Brats21/t2/Brats21_test_001.nii.gz': '5282bfb303c3ea93',
    'Test/Brats21/t2/Brats21_val_000.nii.gz': '02c78885793387d6',
    'Test/MSLUB/mask/MSLUB_test_000.nii.gz': '25a6665c7755087c',
    'Test/MSLUB/mask/MSLUB_val_000.nii.gz': '54f4396591c383c7',
    'Test/MSLUB/seg/MSLUB_test_000.nii.gz': 'd2c5a7202b2a6f11',
    'Test/MSLUB/seg/MSLUB_val_000.nii.gz': 'fbb35e9f1e26a648',
    'Test/MSLUB/t2/MSLUB_test_000.nii.gz': '4e84973a91c689a5',
    'Test/MSLUB/t2/MSLUB_val_000.nii.gz': 'fac192c75906fd13',
    'Train/ixi/mask/IXI_test_000.nii.gz': 'd90bd9346ea660c6',
    'Train/ixi/mask/IXI_train_000.nii.gz': 'f4b5796c254e12d4',
    'Train/ixi/mask/IXI_val_000.nii.gz': 'c50881071a4f3dea',
    'Train/ixi/t2/IXI_test_000.nii.gz': 'e5be9ef3f8b77ae0',
    'Train/ixi/t2/IXI_train_000.nii.gz': '2bd18a1f4d27d037',
    'Train/ixi/t2/IXI_val_000.nii.gz': 'eefddf795ef1a6e5',
}

@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp('anomaly-oracle') / 'data'
    anomaly_data.build_anomaly_data(str(root), resolution=16, slices=6, counts=COUNTS, log=lambda *_: None)
    return root

def _array(path):
    return np.asarray(nib.load(str(path)).dataobj, dtype=np.float64)

def test_builder_files_unchanged_and_healthy_column(tiny):
    written = sorted(os.path.relpath(os.path.join(d, f), tiny) for d, _, fs in os.walk(tiny) for f in fs if f.endswith('.nii.gz'))
    healthy = [p for p in written if '/healthy/' in p]
    assert sorted(set(written) - set(healthy)) == sorted(PINS)
    assert healthy == ['Test/Brats21/healthy/Brats21_test_000.nii.gz', 'Test/Brats21/healthy/Brats21_test_001.nii.gz',
        'Test/Brats21/healthy/Brats21_val_000.nii.gz', 'Test/MSLUB/healthy/MSLUB_test_000.nii.gz', 'Test/MSLUB/healthy/MSLUB_val_000.nii.gz']
    for rel, digest in PINS.items():
        img = nib.load(str(tiny / rel))
        a = np.asarray(img.dataobj)
        assert hashlib.sha256(a.tobytes() + str(a.dtype).encode() + np.asarray(img.affine).tobytes()).hexdigest()[:16] == digest, rel
    # The split CSVs: the existing columns in their order, healthy_path last, for the lesioned sets only.
    header = lambda name: next(csv.reader(open(tiny / 'splits' / f'{name}.csv')))
    assert header('IXI_train_fold0') == ['img_path', 'mask_path', 'seg_path', 'kind']
    for name in ('Brats21_test', 'Brats21_val', 'MSLUB_test', 'MSLUB_val'):
        assert header(name) == ['img_path', 'mask_path', 'seg_path', 'kind', 'healthy_path']
    rows = anomaly_dataset.split_rows(str(tiny / 'splits' / 'Brats21_test.csv'))
    assert [os.path.relpath(r['healthy_path'], tiny) for r in rows] == healthy[:2]
    assert anomaly_dataset.split_rows(str(tiny / 'splits' / 'IXI_train_fold0.csv'))[0]['healthy_path'] is None
    for rel in healthy: # Same grid and header as its volume.
        a, b = nib.load(str(tiny / rel)), nib.load(str(tiny / rel.replace('/healthy/', '/t2/')))
        assert a.shape == b.shape and np.array_equal(a.affine, b.affine) and a.header.get_data_dtype() == b.header.get_data_dtype()

def test_healthy_rendering_is_the_ms_subject_without_its_lesion(tiny):
    """MS lesions have no mass effect: outside the lesion mask the volume and its healthy rendering are two
    Rician noise realisations of the same subject (same brain support, difference at sqrt(2) x the subject's
    noise std, not equal); inside, the healthy rendering has the surrounding tissue, not the lesion."""
    base = 'Test/MSLUB/{}/MSLUB_test_000.nii.gz'
    x, h, brain, seg = (_array(tiny / base.format(f)) for f in ('t2', 'healthy', 'mask', 'seg'))
    brain, seg = brain > 0, seg > 0
    assert np.array_equal(h > 0, brain) and np.array_equal(x > 0, brain)
    # The subject's noise std: the first draws of its generator (set index of MSLUB_test in the sorted splits).
    geometry = anomaly_data.Geometry(16, 6)
    rng = np.random.default_rng([0, sorted(COUNTS).index('MSLUB_test'), 0])
    sigma = anomaly_data.VariedSubject(rng, geometry.template.shape, voxel_mm=geometry.voxel_mm, ventricle_vox=geometry.ventricle_vox).noise_std
    out = brain & ~seg & (h > 10 * sigma) # Bright enough for Rician ~ Gaussian.
    d = (x - h)[out]
    assert out.sum() > 200 and not np.array_equal(x[out], h[out])
    assert d.std() == pytest.approx(np.sqrt(2) * sigma, rel=0.15) and abs(d.mean()) < 4 * sigma / np.sqrt(len(d)) * np.sqrt(2)
    # Inside the lesion: the volume is far above its healthy rendering; the rendering is ordinary tissue there.
    assert seg.any() and (x - h)[seg].mean() > 5 * d.std()
    assert h[seg].mean() < np.percentile(x[brain], 99)
    # A tumour case: its rendering has no mass effect, so its brain support is the unwarped subject's, not the volume's.
    tb = _array(tiny / 'Test/Brats21/mask/Brats21_test_000.nii.gz') > 0
    th = _array(tiny / 'Test/Brats21/healthy/Brats21_test_000.nii.gz') > 0
    subject = geometry.subject(np.random.default_rng([0, sorted(COUNTS).index('Brats21_test'), 0]))
    assert np.array_equal(th, subject['brain']) and not np.array_equal(th, tb)

#----------------------------------------------------------------------------
# The evaluation: a hand-made data root. Volumes 16 x 16 x 8, whole-volume brain; the lesion is a slab of 4 rows
# (a 5^3 median keeps it exactly), +1 over a random background in [0.2, 0.4]; healthy = the volume without it.

SHAPE = (16, 16, 8)

def _handmade(root, healthy_column=True):
    rng = np.random.default_rng(0)
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    save = lambda rel, a: (os.makedirs(os.path.dirname(root / rel), exist_ok=True), nib.save(nib.Nifti1Image(a.astype(np.float32), affine), str(root / rel)))
    ones = np.ones(SHAPE, np.float32)
    train = []
    for i in range(3):
        save(f'Train/t2/h{i}.nii.gz', rng.uniform(0.2, 0.4, SHAPE)), save(f'Train/mask/h{i}.nii.gz', ones)
        train.append(dict(img_path=f'Train/t2/h{i}.nii.gz', mask_path=f'Train/mask/h{i}.nii.gz'))
    _write_csv(root / 'splits' / 'IXI_train_fold0.csv', train)
    for split in ('val', 'test'):
        rows = []
        for i in range(2):
            name = f'L_{split}_{i}.nii.gz'
            background = rng.uniform(0.2, 0.4, SHAPE)
            seg = np.zeros(SHAPE, bool)
            seg[5 + i:9 + i] = True
            save(f'Test/L/t2/{name}', np.where(seg, background + 1.0, background)), save(f'Test/L/mask/{name}', ones)
            save(f'Test/L/seg/{name}', seg), save(f'Test/L/healthy/{name}', background)
            rows.append(dict(img_path=f'Test/L/t2/{name}', mask_path=f'Test/L/mask/{name}', seg_path=f'Test/L/seg/{name}', kind='slab',
                **({'healthy_path': f'Test/L/healthy/{name}'} if healthy_column else {})))
        _write_csv(root / 'splits' / f'L_{split}.csv', rows)
    return root

def _write_csv(path, rows):
    os.makedirs(path.parent, exist_ok=True)
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

def _evaluate(root, out, cwd):
    return subprocess.run([sys.executable, os.path.join(launch.ROOT, 'evaluate.py'), 'anomaly', '--data-root', str(root), '--sets', 'L',
        '--outdir', str(out), '--panels', '1'], cwd=cwd, env=launch.env(), capture_output=True, text=True, timeout=240)

def test_oracle_row_is_one_on_an_exact_healthy_rendering(tmp_path):
    root = _handmade(tmp_path / 'data')
    out = tmp_path / 'eval'
    proc = launch.check(_evaluate(root, out, tmp_path))
    assert 'oracle' in proc.stdout and 'the lesion-free subject: synthetic ground truth' in proc.stdout
    result = json.loads((out / 'metrics.json').read_text())
    assert result['methods'] == ['intensity', 'mean_healthy', 'oracle'] and result['baselines'] == result['methods']
    assert 'not a method or a bound' in result['oracle'] and 'synthetic ground truth' in result['oracle']
    pooled = result['results']['pooled']
    for key in ('dice', 'auprc', 'auroc', 'best_dice'):
        assert pooled['oracle'][key]['mean'] == pytest.approx(1.0) and pooled['oracle'][key]['n'] == 2
    assert 0 < result['thresholds']['L']['oracle'] < 1
    rows = [r for r in csv.DictReader(open(out / 'metrics.csv')) if r['method'] == 'oracle']
    assert [r['case'] for r in rows] == ['L_test_0', 'L_test_1'] and all(float(r['auprc']) == pytest.approx(1.0) for r in rows)
    amap = nib.load(str(out / 'maps' / 'oracle' / 'L_test_0.nii.gz'))
    assert amap.shape == SHAPE and np.allclose(amap.affine, np.diag([2.0, 2.0, 3.0, 1.0]))
    assert (out / 'panels' / 'L_test_0.png').is_file()

def test_healthy_rendering_is_rescaled_on_the_volumes_own_scale(tmp_path):
    """The volume sets the [0, 1] scale of both (1st-99th brain percentile): outside the lesion the residual is
    exactly 0 even where the lesion (here 1/2 of the brain, so it moves the volume's 99th percentile) makes the
    healthy rendering's own percentiles different."""
    root = _handmade(tmp_path / 'data')
    rel = 'Test/L/t2/L_test_0.nii.gz'
    image = _array(root / rel)
    seg = _array(root / rel.replace('/t2/', '/seg/')) > 0 # The hand-made slab (rows 5-8) ...
    seg[:4] = True                                          # ... and a bright block of 4 more rows.
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    nib.save(nib.Nifti1Image(np.where(seg & (np.arange(SHAPE[0]) < 4)[:, None, None], image + 3.0, image).astype(np.float32), affine), str(root / rel))
    nib.save(nib.Nifti1Image(seg.astype(np.float32), affine), str(root / rel.replace('/t2/', '/seg/')))
    row = anomaly_dataset.split_rows(str(root / 'splits' / 'L_test.csv'))[0]
    case = anomaly_dataset.load_case(row)
    own = anomaly_dataset.rescale(_array(root / 'Test/L/healthy/L_test_0.nii.gz'), case['brain'])
    assert np.array_equal(case['image'][~seg], case['healthy'][~seg]) and not np.allclose(own[~seg], case['image'][~seg], atol=0.05)
    assert (case['image'][seg] > case['healthy'][seg]).all()

def test_oracle_is_paired_like_a_baseline():
    rows = [dict(method=m, set='L', case=f'c{i}', kind='k', dice=d + 0.1 * i, auprc=d, auroc=d, best_dice=d)
        for i in range(3) for m, d in (('intensity', 0.1), ('mean_healthy', 0.2), ('oracle', 0.9), ('net', 0.3))]
    summary = E.summary_of(rows, ['intensity', 'mean_healthy', 'oracle', 'net'], ['net'], ['intensity', 'mean_healthy', 'oracle'])
    paired = summary['pooled']['paired']
    assert set(paired) == {'net-intensity', 'net-mean_healthy', 'net-oracle'}
    assert paired['net-oracle']['auprc']['mean'] == pytest.approx(-0.6) and paired['net-oracle']['auprc']['n'] == 3

def test_no_healthy_column_no_oracle(tmp_path):
    root = _handmade(tmp_path / 'data', healthy_column=False) # As real data.
    out = tmp_path / 'eval'
    proc = launch.check(_evaluate(root, out, tmp_path))
    result = json.loads((out / 'metrics.json').read_text())
    assert result['methods'] == ['intensity', 'mean_healthy'] and 'oracle' not in result and 'oracle' not in proc.stdout
    assert not (out / 'maps' / 'oracle').exists()

def test_oracle_left_out_when_some_volumes_lack_a_healthy_rendering(tmp_path):
    root = _handmade(tmp_path / 'data')
    rows = list(csv.DictReader(open(root / 'splits' / 'L_val.csv')))
    rows[1]['healthy_path'] = ''
    _write_csv(root / 'splits' / 'L_val.csv', rows)
    proc = launch.check(_evaluate(root, tmp_path / 'eval', tmp_path))
    assert 'oracle: left out, 1 of 4 volumes have no healthy_path' in proc.stdout
    assert json.loads((tmp_path / 'eval' / 'metrics.json').read_text())['methods'] == ['intensity', 'mean_healthy']

def _bad(root, tmp_path, message):
    proc = _evaluate(root, tmp_path / 'out', tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / 'out').exists()

def test_bad_healthy_file(tmp_path):
    root = _handmade(tmp_path / 'data')
    path = root / 'Test' / 'L' / 'healthy' / 'L_test_1.nii.gz'
    img = nib.load(str(path))
    data, affine = np.asarray(img.dataobj).copy(), img.affine.copy()
    nib.save(nib.Nifti1Image(np.ones((16, 16, 7), np.float32), affine), str(path))
    _bad(root, tmp_path, f'{path} has shape [16, 16, 7], its volume {root / "Test" / "L" / "t2" / "L_test_1.nii.gz"} [16, 16, 8]')
    moved = affine.copy()
    moved[1, 3] += 4
    nib.save(nib.Nifti1Image(data, moved), str(path))
    _bad(root, tmp_path, f'{path} has a different affine from its volume')
    data[2, 2, 2] = np.nan
    nib.save(nib.Nifti1Image(data, affine), str(path))
    _bad(root, tmp_path, f'NIfTI file {path}: the volume contains NaN or Inf')
    os.remove(path)
    _bad(root, tmp_path, 'line 3: healthy_path names a missing file')

#----------------------------------------------------------------------------
