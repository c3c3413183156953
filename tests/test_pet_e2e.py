# medEDM: PET family: dataset, on-device simulation, and a short end-to-end
# run (dataset_tool pet-data -> torchrun training -> evaluate.py pet).

import glob
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import launch
from training.pet import dataset as pet_dataset

#----------------------------------------------------------------------------

@pytest.fixture(scope='module')
def pet_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp('pet')
    for name, seed, subjects in (('train', 0, 2), ('val', 1, 1), ('test', 2, 1)):
        proc = subprocess.run([sys.executable, os.path.join(launch.ROOT, 'dataset_tool.py'), 'pet-data', '--dest', str(folder / f'{name}.npz'),
            '--resolution', '16', '--subjects', str(subjects), '--slices-per-subject', '4', '--seed', str(seed), '--n-iter', '10',
            '--cache-dir', str(folder / 'proj')], cwd=folder, env=launch.env(), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
    return folder

def test_normalisation_round_trip_and_scale_from_condition(pet_dir):
    ds = pet_dataset.PETDataset(str(pet_dir / 'train.npz'))
    assert ds.cond_channels == 1 and ds.num_channels == 1 and ds.resolution == 16 and len(ds) == 8
    raw = np.load(pet_dir / 'train.npz')
    item = ds[3]
    scale = torch.as_tensor([item['scale']])
    assert scale[0] == pytest.approx(float(np.quantile(raw['low'][3], 0.995)) / 2, rel=1e-5)
    back = pet_dataset.pet_denormalize(torch.as_tensor(item['image'])[None], scale)[0].numpy()
    assert np.allclose(back, raw['full'][3], rtol=1e-5, atol=1e-3)
    assert item['cond'].min() == pytest.approx(-1, abs=1e-3) # (Almost) zero activity -> -1.
    assert ds[-5]['idx'] == 3 and np.array_equal(ds[-5]['image'], item['image']) # Negative indices as in Python.

def test_simulation_on_device_is_seeded(pet_dir):
    ds = pet_dataset.PETDataset(str(pet_dir / 'train.npz'), simulate=True, n_iter=5, cache_dir=str(pet_dir / 'proj'))
    batch = torch.utils.data.default_collate([ds[i] for i in range(4)])
    assert set(batch) == {'phantom', 'idx', 'image', 'cond', 'scale'}                      # The stored pairs (generate.py's conditions) ...
    torch.manual_seed(5)
    a = ds.device_transform(batch)
    torch.manual_seed(5)
    b = ds.device_transform(batch)
    torch.manual_seed(6)
    c = ds.device_transform(batch)
    assert torch.equal(a['image'], b['image']) and torch.equal(a['cond'], b['cond'])
    assert not torch.equal(a['cond'], c['cond'])
    assert not torch.equal(a['cond'], batch['cond']) and not torch.equal(a['image'], batch['image'])  # ... replaced by the redrawn ones.
    assert a['image'].shape == (4, 1, 16, 16) and a['cond'].shape == (4, 1, 16, 16)

def test_missing_arrays_message(pet_dir, tmp_path):
    np.savez(tmp_path / 'p.npz', phantoms=np.ones((2, 1, 16, 16), np.float32))
    with pytest.raises(ValueError, match=r"lacks arrays \['full', 'low'\] .*training.dataset.simulate=true"):
        pet_dataset.PETDataset(str(tmp_path / 'p.npz'))

def test_pet_end_to_end(pet_dir):
    args = ['-cd', os.path.join(launch.ROOT, 'configs'), '-cn', 'edm_pet', f'training.dataset.path={pet_dir / "train.npz"}',
        'training.outdir=runs', 'training.total_kimg=0.064', 'training.kimg_per_tick=0.032', 'training.batch_size=8',
        'training.network.model_channels=8', 'training.grid_images=2', 'training.grid_steps=2', 'training.print_summary=false',
        'training.dataset.simulate=true', 'training.dataset.n_iter=5', f'training.dataset.cache_dir={pet_dir / "proj"}']
    launch.check(subprocess.run(launch.torchrun_cmd('train.py', 2) + args, cwd=pet_dir, env=launch.env(), capture_output=True, text=True, timeout=240))
    snapshot = sorted(glob.glob(str(pet_dir / 'runs' / '*-pet64-cond-edm' / 'network-snapshot-*.pkl')))[-1]
    args[args.index('edm_pet')] = 'pet_supervised'                        # The supervised U-Net: same loop, network, data.
    launch.check(subprocess.run(launch.torchrun_cmd('train.py', 2) + args, cwd=pet_dir, env=launch.env(), capture_output=True, text=True, timeout=240))
    supervised = sorted(glob.glob(str(pet_dir / 'runs' / '*-pet64-supervised-unet' / 'network-snapshot-*.pkl')))[-1]
    proc = subprocess.run([sys.executable, os.path.join(launch.ROOT, 'evaluate.py'), 'pet', '--network', snapshot, '--data', str(pet_dir / 'test.npz'),
        '--val-data', str(pet_dir / 'val.npz'), '--outdir', str(pet_dir / 'eval'), '--samples', '2', '--steps', '2', '--supervised', supervised,
        '--cache-dir', str(pet_dir / 'proj')], cwd=pet_dir, env=launch.env(), capture_output=True, text=True, timeout=240)
    launch.check(proc)
    result = json.loads((pet_dir / 'eval' / 'metrics.json').read_text())
    methods = ('low_dose_mlem', 'low_dose_mlem_gauss', 'low_dose_mlem_early', 'low_dose_map_em', 'edm_posterior_mean', 'supervised_unet')
    for method in methods:
        for ref in ('full_dose_mlem', 'phantom'):
            assert set(result['metrics'][f'{method}_vs_{ref}']) == set(result['metrics_brain'][f'{method}_vs_{ref}']) == {'psnr', 'ssim', 'nrmse'}
    assert result['images'] == 4 and result['samples'] == 2
    assert set(result['baselines']['low_dose_mlem_early']['chosen'].values()) <= set(range(1, 11))   # --n-iter 10.
    best = result['paired']['brain']['edm_minus_best_baseline_vs_phantom']['psnr']
    assert best['n'] == 4 and best['baseline'] in methods[1:4] and best['se'] > 0
    assert set(result['paired']['image']['edm_minus_supervised_unet_vs_full_dose_mlem']) == {'psnr', 'ssim', 'nrmse'}
    assert 0 <= result['calibration']['vs_full_dose_mlem/image']['coverage_1sigma'] <= result['calibration']['vs_full_dose_mlem/image']['coverage_2sigma'] <= 1
    detail = result['lesions_and_sharpness']
    assert set(detail) == {*methods, 'edm_posterior_sample'} and all(v['high_frequency_ratio'] > 0 for v in detail.values())
    assert all({'hot_contrast_recovery', 'cold_contrast_recovery'} <= set(v) for v in detail.values())
    oracle, mlem = result['metrics']['oracle_bound_vs_full_dose_mlem'], result['metrics']['low_dose_mlem_vs_full_dose_mlem']
    assert oracle['psnr']['mean'] > mlem['psnr']['mean'] and 'oracle_note' in result            # The ceiling row, not a baseline:
    assert all(d[m]['baseline'] in methods[1:4] for reg in result['paired'].values() for k, d in reg.items() if 'best_baseline' in k for m in d)
    assert (pet_dir / 'eval' / 'panel.png').is_file()
    assert len((pet_dir / 'eval' / 'metrics.csv').read_text().splitlines()) == 1 + 4 * (len(methods) + 1) * 2 * 2   # + the oracle row.

def test_evaluate_refuses_unconditional_network(pet_dir, tmp_path):
    from torch_utils import persistence
    from training import networks
    net = networks.EDMPrecond(img_resolution=16, img_channels=1, model_type='SongUNet', model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[])
    persistence.save_snapshot(dict(ema=net), tmp_path / 'u.pkl')
    proc = subprocess.run([sys.executable, os.path.join(launch.ROOT, 'evaluate.py'), 'pet', '--network', str(tmp_path / 'u.pkl'), '--data', str(pet_dir / 'test.npz'),
        '--val-data', str(pet_dir / 'val.npz'), '--outdir', str(tmp_path / 'e')], env=launch.env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert 'expected a conditional network with 1 condition channel (PET), got cond_channels=0' in proc.stderr

#----------------------------------------------------------------------------
# The demo's claim, at the demo's size (about 13 minutes on 2 CPU cores):
# after `make demo-pet`'s training the EDM posterior mean beats the low-dose
# MLEM on PSNR on held-out phantoms.

@pytest.mark.slow
def test_demo_pet_posterior_mean_beats_low_dose_mlem(tmp_path):
    splits = dict(train=('40', '16', '0'), val=('2', '8', '1000'), test=('4', '4', '2000'))
    for name, (subjects, slices, seed) in splits.items():
        launch.check(subprocess.run([sys.executable, os.path.join(launch.ROOT, 'dataset_tool.py'), 'pet-data', '--dest', str(tmp_path / f'{name}.npz'),
            '--resolution', '64', '--subjects', subjects, '--slices-per-subject', slices, '--seed', seed], cwd=tmp_path, env=launch.env(),
            capture_output=True, text=True, timeout=600))
    args = ['-cd', os.path.join(launch.ROOT, 'configs'), '-cn', 'edm_pet', f'training.dataset.path={tmp_path / "train.npz"}', 'training.outdir=runs']
    launch.check(subprocess.run(launch.torchrun_cmd('train.py', 2) + args, cwd=tmp_path, env=launch.env(), capture_output=True, text=True, timeout=3000))
    snapshot = sorted(glob.glob(str(tmp_path / 'runs' / '*-pet64-cond-edm' / 'network-snapshot-*.pkl')))[-1]
    launch.check(subprocess.run([sys.executable, os.path.join(launch.ROOT, 'evaluate.py'), 'pet', '--network', snapshot, '--data', str(tmp_path / 'test.npz'),
        '--val-data', str(tmp_path / 'val.npz'), '--outdir', str(tmp_path / 'eval'), '--samples', '8'], cwd=tmp_path, env=launch.env(),
        capture_output=True, text=True, timeout=1200))
    m = json.loads((tmp_path / 'eval' / 'metrics.json').read_text())['metrics']
    assert m['edm_posterior_mean_vs_full_dose_mlem']['psnr']['mean'] > m['low_dose_mlem_vs_full_dose_mlem']['psnr']['mean']
    assert m['edm_posterior_mean_vs_phantom']['psnr']['mean'] > m['low_dose_mlem_vs_phantom']['psnr']['mean']

#----------------------------------------------------------------------------
# A user's own phantoms (npz or NIfTI) and the 128x128 MNI phantoms.

def test_user_phantoms_npz_and_nifti(tmp_path):
    import nibabel as nib
    from training.pet import phantoms as pet_phantoms
    vol = np.zeros((24, 24, 5), dtype=np.float32)
    vol[6:18, 6:18, 1:4] = 2.0
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / 'v.nii.gz')
    out = pet_phantoms.load_user_phantoms(str(tmp_path / 'v.nii.gz'), 16)
    assert out['phantoms'].shape == (3, 1, 16, 16) # Three slices hold activity; resampled 24 -> 16.
    np.savez(tmp_path / 'p.npz', phantoms=vol.transpose(2, 0, 1)[1:4])
    assert pet_phantoms.load_user_phantoms(str(tmp_path / 'p.npz'), 24)['phantoms'].shape == (3, 1, 24, 24)
    np.savez(tmp_path / 'neg.npz', phantoms=-np.ones((2, 8, 8), np.float32))
    with pytest.raises(ValueError, match='must hold finite, non-negative activity'):
        pet_phantoms.load_user_phantoms(str(tmp_path / 'neg.npz'), 8)
    proc = subprocess.run([sys.executable, os.path.join(launch.ROOT, 'dataset_tool.py'), 'pet-data', '--dest', str(tmp_path / 'u.npz'),
        '--resolution', '16', '--phantoms', str(tmp_path / 'v.nii.gz'), '--n-iter', '3', '--cache-dir', str(tmp_path / 'proj')],
        env=launch.env(), capture_output=True, text=True, timeout=120)
    launch.check(proc)
    data = np.load(tmp_path / 'u.npz')
    assert data['full'].shape == data['low'].shape == data['phantoms'].shape == (3, 1, 16, 16)
    # Too few counts for an acquisition: a one-line error naming the phantom, no traceback, nothing written.
    proc = subprocess.run([sys.executable, os.path.join(launch.ROOT, 'dataset_tool.py'), 'pet-data', '--dest', str(tmp_path / 'few.npz'),
        '--resolution', '16', '--phantoms', str(tmp_path / 'v.nii.gz'), '--n-iter', '1', '--total-counts', '1', '--dose-fraction', '1e-3', '--cache-dir', str(tmp_path / 'proj')],
        env=launch.env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and 'Traceback' not in proc.stderr and not (tmp_path / 'few.npz').exists()
    assert re.search(r'Error: phantoms\[[0-2]\]: its simulated (full|low)-dose acquisition has zero counts \(total_counts=1.0, '
        r'dose_fraction=0.001\); an empty acquisition has no MLEM reconstruction, raise total_counts', proc.stderr), proc.stderr

def test_user_nifti_phantoms_are_oriented_and_antialiased(tmp_path):
    # An anterior marker (high y) on the midline appears at the top centre, as in the MNI phantoms,
    # whatever the voxel order the affine describes; shrinking 2-pixel stripes gives their mean.
    import nibabel as nib
    from training.pet import phantoms as pet_phantoms
    vol = np.zeros((16, 16, 3), dtype=np.float32)
    vol[8, 14, 1] = 1.0                                                  # x = 8 (midline), y = 14 (anterior).
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / 'ras.nii.gz')
    las = np.diag([-1.0, 1, 1, 1]); las[0, 3] = 15                       # The same volume stored left-to-right.
    nib.save(nib.Nifti1Image(vol[::-1].copy(), las), tmp_path / 'las.nii.gz')
    ras, flipped = (pet_phantoms.load_user_phantoms(str(tmp_path / f'{n}.nii.gz'), 16)['phantoms'] for n in ('ras', 'las'))
    assert ras.shape == (1, 1, 16, 16) and np.argwhere(ras[0, 0] == 1).tolist() == [[1, 8]] and np.array_equal(ras, flipped)
    stripes = np.zeros((64, 64, 1), dtype=np.float32)
    stripes[:, 0::4] = stripes[:, 1::4] = 1.0                            # 2-pixel stripes along y, period 4.
    nib.save(nib.Nifti1Image(stripes, np.eye(4)), tmp_path / 'stripes.nii.gz')
    small = pet_phantoms.load_user_phantoms(str(tmp_path / 'stripes.nii.gz'), 8)['phantoms'][0, 0]
    assert np.abs(small[2:-2, 2:-2] - 0.5).max() < 0.05                  # Aliasing would give 0 to 1.

def test_mni_phantoms_128():
    from training.pet import phantoms as pet_phantoms
    out = pet_phantoms.build_pet_phantoms(resolution=128, subjects=1, slices_per_subject=2)
    p = out['phantoms']
    assert p.shape == (2, 1, 128, 128) and p.min() >= 0
    # Activity only inside the circle every projection angle sees (radius 64 px).
    yy, xx = np.mgrid[:128, :128] - 63.5
    assert p[:, 0][:, xx ** 2 + yy ** 2 > 64 ** 2].max() == 0

def test_dataset_refuses_unreadable_files(pet_dir, tmp_path):
    (tmp_path / 'text.npz').write_text('not an archive')
    with pytest.raises(ValueError, match=re.escape(f'training.dataset.path: {tmp_path / "text.npz"} is not an .npz archive (or it is truncated)')):
        pet_dataset.PETDataset(str(tmp_path / 'text.npz'))
    good = (pet_dir / 'train.npz').read_bytes()
    (tmp_path / 'short.npz').write_bytes(good[:len(good) // 2])
    with pytest.raises(ValueError, match='is not an .npz archive'):
        pet_dataset.PETDataset(str(tmp_path / 'short.npz'))
    import zipfile
    with zipfile.ZipFile(pet_dir / 'train.npz') as z:
        offset = z.getinfo('phantoms.npy').header_offset + 30 + len('phantoms.npy') + 200
    bad = bytearray(good)
    bad[offset] ^= 0xFF
    (tmp_path / 'crc.npz').write_bytes(bytes(bad))
    with pytest.raises(ValueError, match=re.escape(f"cannot read dataset file {tmp_path / 'crc.npz'}: damaged archive (BadZipFile: Bad CRC-32 for file 'phantoms.npy')")):
        pet_dataset.PETDataset(str(tmp_path / 'crc.npz'))

#----------------------------------------------------------------------------
# Lesion contrast recovery and sharpness: known answers.

def test_lesion_contrast_and_sharpness_known_answers():
    from training.pet import evaluation as pet_evaluation
    from training.pet import phantoms as pet_phantoms
    data = pet_phantoms.build_pet_phantoms(resolution=32, subjects=2, slices_per_subject=4, seed=3)
    labels = data['lesions']
    assert labels.shape == data['phantoms'].shape and set(np.unique(labels)) <= {0, 1, 2} and (labels == 1).any() and (labels == 2).any()
    phantom = data['phantoms'].astype(np.float64)
    assert phantom[labels == 1].mean() > 3 * phantom[labels == 2].mean()   # Hot lesions (1.5 x GM) hot, cold ones (0.5 x WM) cold.
    split = dict(lesions=labels, phantom_counts=phantom, full=phantom + 0.1 * np.random.default_rng(0).standard_normal(phantom.shape))
    cr = pet_evaluation.lesion_contrast(phantom, split)
    for kind in ('hot', 'cold'):
        finite = cr[kind][np.isfinite(cr[kind])]
        assert len(finite) > 0 and np.allclose(finite, 1.0)                # The phantom keeps its own contrast.
    flat = np.where(labels > 0, 0.0, phantom)
    for i in range(len(flat)):                                              # Lesions filled with their ring's mean: CR 0.
        for label in (1, 2):
            lesion = labels[i, 0] == label
            ring = pet_evaluation.ndimage.binary_dilation(lesion, iterations=2) & (labels[i, 0] == 0) & (phantom[i, 0] > 0)
            if lesion.sum() >= 4 and ring.sum() >= 4:
                flat[i, 0][lesion] = phantom[i, 0][ring].mean()
    for kind in ('hot', 'cold'):
        finite = pet_evaluation.lesion_contrast(flat, split)[kind]
        assert np.allclose(finite[np.isfinite(finite)], 0.0, atol=1e-12)
    assert np.allclose(pet_evaluation.high_frequency_ratio(split['full'], split), 1.0)
    assert (pet_evaluation.high_frequency_ratio(phantom, split) < 1).all()  # Noise-free: less high-frequency energy.
