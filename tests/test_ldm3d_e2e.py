# medEDM: the 3-D LDM inpainting pipeline end to end at tiny size: build
# cases (8 mm), train the autoencoder and then the latent EDM with torchrun
# (2 gloo ranks each), inpaint with evaluate.py inpaint; the output equals the
# voided input outside the mask, keeps a non-RAS input's geometry; bad inputs
# give one-line messages, exit 1 and write nothing.

import glob
import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import launch

from torch_utils import persistence # pylint: disable=wrong-import-position
from training.ldm3d import data as ldm_data # pylint: disable=wrong-import-position
from training.ldm3d import synth # pylint: disable=wrong-import-position

CONFIGS = os.path.join(launch.ROOT, 'configs')
TINY_AE = ['training.network.channels=[4,8,8]', 'training.network.latent_channels=2', 'training.batch_size=4',
    'training.total_kimg=0.016', 'training.kimg_per_tick=0.008', 'training.snapshot_ticks=2', 'training.state_dump_ticks=null',
    'training.grid_images=2', 'training.timeout_sec=120']
TINY_LATENT = ['training.network.model_channels=8', 'training.network.channels_per_head=8', 'training.network.attn_resolutions=[]',
    'training.batch_size=4', 'training.total_kimg=0.016', 'training.kimg_per_tick=0.008', 'training.snapshot_ticks=2',
    'training.state_dump_ticks=null', 'training.grid_images=2', 'training.loss.grid_steps=2', 'training.timeout_sec=120']

def _data_args(dest):
    return [f'training.dataset.path={dest}/cases', f'training.dataset.growth_path={dest}/growth', f'training.dataset.tissue_path={dest}/tissue',
        'training.dataset.split=all', 'training.outdir=runs']

def _train(config, args, cwd):
    import subprocess
    cmd = launch.torchrun_cmd('train.py', 2) + ['-cd', CONFIGS, '-cn', config] + list(args)
    return launch.check(subprocess.run(cmd, cwd=cwd, env=launch.env(), capture_output=True, text=True, timeout=240))

def _snapshot(run_dir):
    return sorted(glob.glob(os.path.join(run_dir, 'network-snapshot-*.pkl')))[-1]

@pytest.fixture(scope='module')
def pipeline(tmp_path_factory):
    folder = tmp_path_factory.mktemp('ldm3d')
    dest = str(folder / 'data')
    synth.build_cases(dest, 4, masks_per_case=1, voxel_mm=8, seed=0)
    _train('ldm3d_ae', _data_args(dest) + TINY_AE, folder)
    ae_dir = glob.glob(str(folder / 'runs' / '*-ldm3d-ae'))[0]
    shutil.copy(_snapshot(ae_dir), folder / 'ae.pkl')
    _train('ldm3d_latent', _data_args(dest) + TINY_LATENT + [f'training.frozen.autoencoder={folder / "ae.pkl"}'], folder)
    latent_dir = glob.glob(str(folder / 'runs' / '*-ldm3d-latent'))[0]
    return folder, dest, ae_dir, latent_dir

def test_the_sampler_bench_takes_the_latent_networks_condition(pipeline):
    # bench/sampler_peers.py --network on a latent snapshot: the condition of latents i is item i's through the frozen
    # encoder (the loss object's latent_batch), as in training.
    import sys
    sys.path.insert(0, os.path.join(launch.ROOT, 'bench'))
    import sampler_peers as peers # pylint: disable=import-outside-toplevel
    from training.ldm3d import latent # pylint: disable=import-outside-toplevel
    _, _, _, latent_dir = pipeline
    net, denoise, latents = peers.snapshot_setting(_snapshot(latent_dir), 2, torch.Generator().manual_seed(1))
    data = persistence.load_snapshot(_snapshot(latent_dir))
    dataset = ldm_data.BratsInpaintDataset(**{k: v for k, v in data['dataset_kwargs'].items() if k != '_target_'})
    items = torch.utils.data.default_collate([dataset[0], dataset[1]])
    _, _, cond = latent.latent_conditions(data['frozen']['autoencoder'], items['voided'], items['mask'], items['cond'])
    assert latents.shape == (2, *net.img_shape) and cond.shape[1] == net.cond_channels
    x, sigma = latents * 3, torch.tensor(3.0, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(denoise(x, sigma), net(x.float(), sigma.float(), cond=cond).double(), atol=1e-6)

def _evaluate(args):
    import evaluate
    return CliRunner().invoke(evaluate.main, ['inpaint'] + [str(a) for a in args])

#----------------------------------------------------------------------------

def test_two_stages_train_and_the_snapshot_embeds_the_autoencoder(pipeline):
    folder, dest, ae_dir, latent_dir = pipeline
    ae = persistence.load_snapshot(folder / 'ae.pkl')['ema']
    assert int(ae.latent_n) == 4 and ae.scale_factor != 1.0 # 16 images / batch 4: the scale factor measured at every step.
    assert os.path.isfile(os.path.join(ae_dir, 'samples-000000.png')) and os.path.isfile(os.path.join(latent_dir, 'samples-000000.png'))
    data = persistence.load_snapshot(_snapshot(latent_dir))
    frozen = data['frozen']['autoencoder']
    for (name, a), b in zip(ae.state_dict().items(), frozen.state_dict().values()):
        assert torch.equal(a, b), name
    assert data['ema'].img_shape == [2, *[s // 4 for s in ae.img_resolution]] and data['ema'].cond_channels == 2 + 1 + 4
    assert data['loss_fn'].mask_key == 'latent_mask'
    losses = [json.loads(line)['Loss/loss']['mean'] for line in open(os.path.join(latent_dir, 'stats.jsonl'))]
    assert all(np.isfinite(losses))

def test_inpainting_keeps_the_input_outside_the_mask_and_a_non_ras_geometry(pipeline, tmp_path):
    folder, dest, _, latent_dir = pipeline
    # A copy of the data whose first case has an oblique LPS grid with anisotropic voxels (all its files alike).
    data = str(tmp_path / 'data')
    shutil.copytree(dest, data)
    case = sorted(os.listdir(os.path.join(data, 'cases')))[0]
    affine = np.array([[-1.5, 0.1, 0, 100], [0, -1.0, 0, 120], [0, 0, 2.5, -60], [0, 0, 0, 1]])
    files = glob.glob(os.path.join(data, 'cases', case, '*.nii.gz')) + [ldm_data.growth_file(os.path.join(data, 'growth'), case)] + \
        glob.glob(os.path.join(data, 'tissue', f'{case}-tissue-*.nii.gz'))
    for f in files:
        img = nib.load(f)
        out = nib.Nifti1Image(np.asarray(img.dataobj), affine)
        out.set_sform(affine, code=2)
        nib.save(out, f)
    outdir = tmp_path / 'eval'
    result = _evaluate(['--network', _snapshot(latent_dir), '--data', f'{data}/cases', '--growth', f'{data}/growth', '--tissue', f'{data}/tissue',
        '--split', 'all', '--outdir', outdir, '--samples', 2, '--steps', 2])
    assert result.exit_code == 0, result.output
    summary = json.load(open(outdir / 'metrics.json'))
    assert set(summary) >= {'ldm', 'mean_fill', 'diffusion_fill', 'ae_bound', 'decoder_only', 'paired'} and summary['items'] == 4
    assert set(summary['paired']) == {'ldm-mean_fill', 'ldm-diffusion_fill', 'ae_bound-diffusion_fill', 'ldm-decoder_only'}
    rows = open(outdir / 'metrics.csv').read().splitlines()
    assert rows[0].startswith('case,mask,method,ssim,psnr,mse') and len(rows) == 1 + 4 * 5
    for c, k in ldm_data.find_items(os.path.join(data, 'cases')):
        voided = nib.load(ldm_data.voided_file(os.path.join(data, 'cases'), c, k))
        mask = np.asarray(nib.load(ldm_data.mask_file(os.path.join(data, 'cases'), c, k)).dataobj) > 0
        for method in ('ldm', 'mean_fill', 'diffusion_fill', 'ae_bound', 'decoder_only'):
            out = nib.load(outdir / method / c / f'{c}-t1n-inference-{k:04d}.nii.gz')
            v, o = np.asarray(voided.dataobj, dtype=np.float32), np.asarray(out.dataobj)
            assert o.dtype == np.float32 and o.shape == v.shape
            assert np.array_equal(o[~mask], v[~mask]) # Exactly the input outside the mask.
            assert np.isfinite(o).all() and not np.array_equal(o[mask], v[mask])
            assert np.array_equal(out.affine, voided.affine) and out.header.get_zooms() == voided.header.get_zooms()
            assert nib.aff2axcodes(out.affine) == nib.aff2axcodes(voided.affine)
            if c == case:
                assert nib.aff2axcodes(out.affine) == ('L', 'P', 'S') and int(out.header['sform_code']) == 2
        spread = np.asarray(nib.load(outdir / 'ldm' / c / f'{c}-t1n-inference-std-{k:04d}.nii.gz').dataobj)
        assert np.all(spread[~mask] == 0) and spread[mask].max() > 0 # Two seeds differ inside the mask only.
        assert os.path.isfile(outdir / 'panels' / f'{c}-{k:04d}.png')

#----------------------------------------------------------------------------
# Bad input: one line naming the file, exit 1, nothing written.

def _broken(dest, tmp_path, how):
    data = str(tmp_path / 'bad')
    shutil.copytree(dest, data)
    case = sorted(os.listdir(os.path.join(data, 'cases')))[0]
    mpath = ldm_data.mask_file(os.path.join(data, 'cases'), case, 0)
    img = nib.load(mpath)
    mask = np.asarray(img.dataobj)
    if how == 'shape':
        nib.save(nib.Nifti1Image(mask[:-1], img.affine), mpath)
    elif how == 'affine':
        nib.save(nib.Nifti1Image(mask, img.affine * np.array([[2], [1], [1], [1]])), mpath)
    elif how == 'empty':
        nib.save(nib.Nifti1Image(np.zeros_like(mask), img.affine), mpath)
    elif how == 'whole':
        nib.save(nib.Nifti1Image(np.ones_like(mask), img.affine), mpath)
    elif how == 'growth':
        os.remove(ldm_data.growth_file(os.path.join(data, 'growth'), case))
    return data, case, mpath

@pytest.mark.parametrize('how,message', [
    ('shape', r'{mask} has shape \[.*\], but .*-t1n-voided-0000.nii.gz has'),
    ('affine', r'{mask} has a different affine'),
    ('empty', r'{mask}: the mask is empty'),
    ('whole', r'{mask}: the mask covers the whole brain'),
    ('growth', r'conditioning file missing for case {case}: .*{case}-growth.nii.gz'),
])
def test_bad_inputs_fail_with_a_message_and_write_nothing(pipeline, tmp_path, how, message):
    import re
    _, dest, _, latent_dir = pipeline
    data, case, mpath = _broken(dest, tmp_path, how)
    outdir = tmp_path / 'out'
    result = _evaluate(['--network', _snapshot(latent_dir), '--data', f'{data}/cases', '--growth', f'{data}/growth', '--tissue', f'{data}/tissue',
        '--split', 'all', '--outdir', outdir, '--samples', 1, '--steps', 1])
    assert result.exit_code == 1
    line = result.output.strip()
    assert line.startswith('Error: ') and '\n' not in line and 'Traceback' not in line, result.output
    assert re.search(message.format(mask=re.escape(mpath), case=case), line), line
    assert not outdir.exists()

def test_a_volume_the_downsampling_cannot_take_without_padding(pipeline, tmp_path):
    _, dest, _, latent_dir = pipeline
    outdir = tmp_path / 'out'
    result = _evaluate(['--network', _snapshot(latent_dir), '--data', f'{dest}/cases', '--growth', f'{dest}/growth', '--tissue', f'{dest}/tissue',
        '--split', 'all', '--outdir', outdir, '--no-pad'])
    assert result.exit_code == 1 and 'is not a multiple of the downsampling factor 4' in result.output and '-t1n-voided-0000.nii.gz' in result.output
    assert not outdir.exists()

#----------------------------------------------------------------------------
# The demo-sized run (make demo-ldm's steps, in a temporary folder): minutes.

@pytest.mark.slow
def test_demo_sized_run_beats_both_baselines(tmp_path):
    import subprocess
    dest = str(tmp_path / 'data')
    synth.build_cases(dest, 40, masks_per_case=2, voxel_mm=6, seed=0)
    args = [f'training.dataset.path={dest}/cases', f'training.dataset.growth_path={dest}/growth', f'training.dataset.tissue_path={dest}/tissue',
        'training.outdir=runs']
    for config, extra in (('ldm3d_ae', []), ('ldm3d_latent', [f'training.frozen.autoencoder={tmp_path / "ae.pkl"}'])):
        cmd = launch.torchrun_cmd('train.py', 2) + ['-cd', CONFIGS, '-cn', config] + args + extra
        launch.check(subprocess.run(cmd, cwd=tmp_path, env=launch.env(), capture_output=True, text=True, timeout=1800))
        if config == 'ldm3d_ae':
            shutil.copy(_snapshot(glob.glob(str(tmp_path / 'runs' / '*-ldm3d-ae'))[0]), tmp_path / 'ae.pkl')
    outdir = tmp_path / 'eval'
    result = _evaluate(['--network', _snapshot(glob.glob(str(tmp_path / 'runs' / '*-ldm3d-latent'))[0]), '--data', f'{dest}/cases',
        '--growth', f'{dest}/growth', '--tissue', f'{dest}/tissue', '--split', 'test', '--outdir', outdir, '--samples', 8])
    assert result.exit_code == 0, result.output
    for base in ('mean_fill', 'diffusion_fill', 'decoder_only'): # The goal, each win outside 2 standard errors; and stage 2 earns its place.
        paired = json.load(open(outdir / 'metrics.json'))['paired'][f'ldm-{base}']
        assert paired['ssim']['mean_diff'] > 2 * paired['ssim']['se'] and paired['psnr']['mean_diff'] > 2 * paired['psnr']['se'], base
