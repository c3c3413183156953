# medEDM: anomaly family end to end: dataset_tool anomaly-data -> torchrun
# training of the patched DDPM and the cDDPM (2 processes) -> evaluate.py
# anomaly with both baselines; and the bad-input messages of the evaluation
# and the loaders (one line, non-zero exit, nothing written).

import csv
import glob
import json
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

import launch
from training.anomaly import data as anomaly_data
from training.anomaly import dataset as anomaly_dataset
from training.anomaly import loss as anomaly_loss

COUNTS = 'IXI_train_fold0=3,IXI_val_fold0=1,IXI_test=1,Brats21_val=2,Brats21_test=2,MSLUB_val=1,MSLUB_test=2'

#----------------------------------------------------------------------------

@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('anomaly') / 'data'
    proc = subprocess.run([sys.executable, os.path.join(launch.ROOT, 'dataset_tool.py'), 'anomaly-data', '--dest', str(root),
        '--resolution', '16', '--slices', '8', '--counts', COUNTS], env=launch.env(), capture_output=True, text=True, timeout=120)
    launch.check(proc)
    return root

def test_builder_layout_masks_and_affines(data_root):
    rows = anomaly_dataset.split_rows(str(data_root / 'splits' / 'Brats21_test.csv'))
    assert [r['kind'] for r in rows] == ['tumour_hyper', 'tumour_hypo']
    case = anomaly_dataset.load_case(rows[0])
    assert case['image'].shape == (16, 16, 8) and case['seg'].any() and not (case['seg'] & ~case['brain']).any()
    assert case['image'].min() == 0 and case['image'].max() == 1 and (case['image'][~case['brain']] == 0).all()
    img = nib.load(rows[0]['img_path'])
    assert np.allclose(img.affine, nib.load(rows[0]['seg_path']).affine)
    assert anomaly_dataset.split_rows(str(data_root / 'splits' / 'IXI_train_fold0.csv'))[0]['seg_path'] is None
    ds = anomaly_dataset.AnomalySliceDataset(str(data_root / 'splits' / 'IXI_train_fold0.csv'))
    assert ds.resolution == 16 and ds.num_channels == 1 and ds[0]['image'].min() >= -1 and ds[0]['image'].max() <= 1

def _train(data_root, config, workdir, extra=()):
    args = ['-cd', os.path.join(launch.ROOT, 'configs'), '-cn', config, f'training.dataset.path={data_root / "splits" / "IXI_train_fold0.csv"}',
        'training.outdir=runs', 'training.total_kimg=0.064', 'training.kimg_per_tick=0.032', 'training.snapshot_ticks=2', 'training.state_dump_ticks=2',
        'training.batch_size=8', 'training.grid_images=2', 'training.print_summary=false', *extra]
    if config != 'anomaly_pretrain': # The pretraining network is the encoder and a decoder only.
        args.append('training.network.model_channels=8')
    launch.check(subprocess.run(launch.torchrun_cmd('train.py', 2) + args, cwd=workdir, env=launch.env(), capture_output=True, text=True, timeout=240))
    return sorted(glob.glob(str(workdir / 'runs' / '*' / 'network-snapshot-*.pkl')))[-1]

def _evaluate(args, cwd):
    return subprocess.run([sys.executable, os.path.join(launch.ROOT, 'evaluate.py'), 'anomaly', *args], cwd=cwd, env=launch.env(),
        capture_output=True, text=True, timeout=240)

@pytest.fixture(scope='module')
def snapshots(data_root, tmp_path_factory):
    work = tmp_path_factory.mktemp('train')
    (work / 'p').mkdir(), (work / 'c').mkdir()
    pddpm = _train(data_root, 'anomaly_pddpm', work / 'p', ['training.loss.patch_size=8'])
    cddpm = _train(data_root, 'anomaly_cddpm', work / 'c', ['training.network.encoder_channels=4', 'training.network.encoder_blocks=[1,1]'])
    return dict(pddpm=pddpm, cddpm=cddpm)

def test_anomaly_end_to_end(data_root, snapshots, tmp_path):
    out = tmp_path / 'eval'
    launch.check(_evaluate(['--data-root', str(data_root), '--network', f'pddpm={snapshots["pddpm"]}', '--network', f'cddpm={snapshots["cddpm"]}',
        '--outdir', str(out), '--panels', '1', '--select-t', 'pddpm=300;500'], tmp_path))
    result = json.loads((out / 'metrics.json').read_text())
    assert result['methods'] == ['intensity', 'mean_healthy', 'oracle', 'pddpm', 'cddpm'] # Synthetic data: the oracle reference too.
    assert result['baselines'] == ['intensity', 'mean_healthy', 'oracle'] and 'not a method or a bound' in result['oracle']
    for s in ('Brats21', 'MSLUB'): # The test step of pddpm chosen on each set's validation split; cddpm keeps its own.
        sel = result['selection'][s]['pddpm']
        assert [t['test_t'] for t in sel['tried']] == [[300], [500]] and set(result['selection'][s]) == {'pddpm'}
        best = max(sel['tried'], key=lambda t: t['val_dice'])
        assert sel['chosen'] == pytest.approx(best['sigmas']) and best['sigmas'] == pytest.approx(anomaly_loss.reference_sigma(best['test_t']))
    assert result['sigmas']['pddpm'] == pytest.approx([1.012390]) and result['sigmas']['cddpm'] == pytest.approx([0.424995, 1.012390, 2.435436], abs=1e-5)
    pooled = result['results']['pooled']
    for m in result['methods']:
        assert set(pooled[m]) == {'dice', 'auprc', 'auroc', 'best_dice'} and pooled[m]['auroc']['n'] == 4
    assert set(result['results']) == {'pooled', 'kind:tumour_hyper', 'kind:tumour_hypo', 'kind:ms_hyper', 'set:Brats21', 'set:MSLUB'}
    assert set(pooled['paired']) == {f'{n}-{b}' for n in ('pddpm', 'cddpm') for b in ('intensity', 'mean_healthy', 'oracle')}
    rows = list(csv.DictReader(open(out / 'metrics.csv')))
    assert len(rows) == 5 * 4 # 5 methods x 4 test volumes.
    src = nib.load(str(data_root / 'Test' / 'MSLUB' / 't2' / 'MSLUB_test_001.nii.gz'))
    amap = nib.load(str(out / 'maps' / 'cddpm' / 'MSLUB_test_001.nii.gz'))
    assert np.allclose(amap.affine, src.affine) and amap.get_data_dtype() == np.float32 and amap.shape == src.shape
    assert (out / 'reconstructions' / 'pddpm' / 'Brats21_test_000.nii.gz').is_file()
    for name in ('roc-Brats21.png', 'pr-MSLUB.png', 'panels/Brats21_test_000.png'):
        assert (out / name).is_file()

def test_encoder_pretraining_stage_then_cddpm_init_from(data_root, tmp_path):
    enc = ['training.network.encoder_channels=4', 'training.network.encoder_blocks=[1,1]']
    (tmp_path / 'pre').mkdir(), (tmp_path / 'c').mkdir()
    pre = _train(data_root, 'anomaly_pretrain', tmp_path / 'pre', enc)
    assert (tmp_path / 'pre' / 'runs').is_dir() and glob.glob(str(tmp_path / 'pre' / 'runs' / '*' / 'samples-*.png'))
    spec = f'training.init_from={{path: {pre}, module: encoder, source: encoder}}'
    args = ['-cd', os.path.join(launch.ROOT, 'configs'), '-cn', 'anomaly_cddpm', f'training.dataset.path={data_root / "splits" / "IXI_train_fold0.csv"}',
        'training.outdir=runs', 'training.total_kimg=0.016', 'training.kimg_per_tick=0.016', 'training.batch_size=8', 'training.network.model_channels=8',
        'training.grid_images=2', 'training.print_summary=false', spec, *enc]
    proc = launch.check(subprocess.run(launch.torchrun_cmd('train.py', 2) + args, cwd=tmp_path / 'c', env=launch.env(), capture_output=True, text=True, timeout=240))
    from training.anomaly.networks import ResNetEncoder
    expected = len(ResNetEncoder(in_channels=1, channels=4, blocks=[1, 1]).state_dict()) # Every encoder tensor, nothing else.
    assert f'Initialized {expected} tensors from "{pre}"' in proc.stdout, proc.stdout[-2000:]

#----------------------------------------------------------------------------
# Bad input: one line naming the file, exit 1, nothing written.

def _copy(data_root, tmp_path):
    root = tmp_path / 'copy'
    shutil.copytree(data_root, root)
    return root

def _bad(args, tmp_path, message):
    proc = _evaluate([*args, '--outdir', str(tmp_path / 'out')], tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / 'out').exists()

def test_bad_mask_shape_and_affine(data_root, tmp_path):
    root = _copy(data_root, tmp_path)
    mask = root / 'Test' / 'MSLUB' / 'mask' / 'MSLUB_test_000.nii.gz'
    img = nib.load(str(mask))
    data, affine = np.asarray(img.dataobj).copy(), img.affine.copy() # Read before the file is replaced.
    nib.save(nib.Nifti1Image(np.ones((16, 16, 7), np.float32), affine), str(mask))
    _bad(['--data-root', str(root)], tmp_path, f'{mask} has shape [16, 16, 7], its volume')
    moved = affine.copy()
    moved[0, 3] += 5
    nib.save(nib.Nifti1Image(data, moved), str(mask))
    _bad(['--data-root', str(root)], tmp_path, f'{mask} has a different affine from its volume')

def test_bad_empty_mask_nan_and_missing_file(data_root, tmp_path):
    root = _copy(data_root, tmp_path)
    mask = root / 'Test' / 'Brats21' / 'mask' / 'Brats21_val_001.nii.gz'
    img = nib.load(str(mask))
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.float32), img.affine), str(mask))
    _bad(['--data-root', str(root)], tmp_path, f'brain mask {mask} is empty')
    vol = root / 'Test' / 'Brats21' / 't2' / 'Brats21_val_001.nii.gz'
    data = np.asarray(nib.load(str(vol)).dataobj).copy()
    data[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), str(vol))
    _bad(['--data-root', str(root)], tmp_path, f'NIfTI file {vol}: the volume contains NaN or Inf')
    os.remove(root / 'Test' / 'MSLUB' / 'seg' / 'MSLUB_test_001.nii.gz')
    _bad(['--data-root', str(root), '--sets', 'MSLUB'], tmp_path, 'line 3: seg_path names a missing file')

def test_bad_volume_size_for_the_network(data_root, snapshots, tmp_path):
    root = tmp_path / 'big'
    anomaly_data.build_anomaly_data(str(root), resolution=24, slices=8, counts=dict((kv.split('=')[0], 1) for kv in COUNTS.split(',')), log=lambda *_: None)
    _bad(['--data-root', str(root), '--network', f'pddpm={snapshots["pddpm"]}'], tmp_path,
        'takes slices of shape [16, 16], the test volumes have 24 x 24 slices')
    _bad(['--data-root', str(data_root), '--network', f'pddpm={snapshots["pddpm"]}', '--steps', '2'], tmp_path,
        '--steps 2: --network pddpm is a patched DDPM; its boxes are reconstructed with one call (--steps 1)')
    _bad(['--data-root', str(data_root), '--network', f'pddpm={snapshots["pddpm"]}', '--select-t', 'cddpm=500'], tmp_path,
        "--select-t 'cddpm=500': expected NAME=CANDIDATES for one of the --network names (pddpm), once each")
    _bad(['--data-root', str(data_root), '--network', f'pddpm={snapshots["pddpm"]}', '--select-t', 'pddpm=0;x'], tmp_path,
        "--select-t 'pddpm=0;x': expected candidates of reference steps in 1..1000")

def test_few_solver_steps_from_sigma_test(data_root, snapshots, tmp_path):
    out = tmp_path / 'eval'
    launch.check(_evaluate(['--data-root', str(data_root), '--network', f'cddpm={snapshots["cddpm"]}', '--outdir', str(out), '--panels', '0',
        '--no-maps', '--steps', '3', '--sets', 'MSLUB'], tmp_path))
    result = json.loads((out / 'metrics.json').read_text())
    assert result['steps'] == 3 and result['results']['pooled']['cddpm']['auroc']['n'] == 2

#----------------------------------------------------------------------------
