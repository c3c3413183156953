# medEDM: evaluate.py: the sampler options shared with generate.py (one
# validation, same messages), the PET subcommand on a tiny untrained
# conditional network, and every bad input as one line, exit 1, nothing written.

import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import evaluate
import generate
import launch
from torch_utils import persistence
from training import evaluation
from training import networks
from training import sampling

pytestmark = pytest.mark.usefixtures('one_thread')

#----------------------------------------------------------------------------

def _split(path, n=3, r=16, seed=0, **replace):
    rng = np.random.default_rng(seed)
    phantom = rng.uniform(0, 10, (n, 1, r, r)).astype(np.float32)
    arrays = dict(phantoms=phantom, phantom_counts=phantom, full=phantom + rng.uniform(0, 1, phantom.shape).astype(np.float32),
        low=phantom + rng.uniform(0, 4, phantom.shape).astype(np.float32))
    arrays.update(replace)
    np.savez(path, **arrays)
    return str(path)

@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp('evaluate')
    torch.manual_seed(0)
    net = networks.EDMPrecond(img_resolution=16, img_channels=1, cond_channels=1, model_type='SongUNet', model_channels=8,
        channel_mult=[1], num_blocks=1, attn_resolutions=[])
    persistence.save_snapshot(dict(ema=net), folder / 'net.pkl')
    return dict(folder=folder, net=str(folder / 'net.pkl'), test=_split(folder / 'test.npz'), val=_split(folder / 'val.npz', seed=1))

def _run(setup, outdir, *args, data=None, network=None):
    argv = ['pet', '--network', network or setup['net'], '--data', data or setup['test'], '--val-data', setup['val'],
        '--outdir', str(outdir), '--samples', '2', '--steps', '2', *args]
    return CliRunner().invoke(evaluate.main, argv, catch_exceptions=False)

def _error(result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('Error: ') and 'Traceback' not in result.output, result.output
    return lines[0][len('Error: '):]

#----------------------------------------------------------------------------
# One validation: the same bad option gives the same message from
# generate.py (sampling.<key>) and evaluate.py (--<option>).

GEN = dict(network_pkl='net.pkl', seeds='0-3', batch=4, format='npz', samples_per_cond=8, **sampling.SAMPLER_DEFAULTS)

@pytest.mark.parametrize('kw, argv', [
    (dict(solver='rk45'), ['--solver', 'rk45']),
    (dict(discretization='cosine'), ['--discretization', 'cosine']),
    (dict(corrector='unic'), ['--corrector', 'unic']),
    (dict(afs=True), ['--afs']),
    (dict(solver='dpmpp_2m', afs=True, num_steps=1), ['--solver', 'dpmpp_2m', '--afs', '--steps', '1']),
    (dict(warp_k=-1.0, discretization='logsnr_warped'), ['--warp-k', '-1', '--discretization', 'logsnr_warped']),
    (dict(solver='euler', num_steps=0), ['--solver', 'euler', '--steps', '0']),
    (dict(rho=0.0), ['--rho', '0']),
    (dict(S_churn=1.0, solver='dpmpp_3m'), ['--s-churn', '1', '--solver', 'dpmpp_3m']),
    (dict(preset='quick'), ['--preset', 'quick']),
    (dict(preset='fast', solver='dpmpp_2m'), ['--preset', 'fast', '--solver', 'dpmpp_2m']),
])
def test_same_message_as_generate(setup, tmp_path, kw, argv):
    with pytest.raises(ValueError) as err:
        generate._check(dict(GEN, **kw))
    expected = str(err.value)
    for key, option in evaluation.SAMPLER_OPTION_NAMES.items():
        expected = expected.replace(f'sampling.{key}', option)
    assert _error(_run(setup, tmp_path / 'out', *argv)) == expected
    assert not (tmp_path / 'out').exists()

def test_sampler_defaults_are_the_schema_defaults():
    from omegaconf import OmegaConf
    from training import config as config_mod
    scfg = OmegaConf.to_container(OmegaConf.structured(config_mod.SamplingConfig))
    assert {k: scfg[k] for k in sampling.SAMPLER_KEYS} == sampling.SAMPLER_DEFAULTS

#----------------------------------------------------------------------------
# The PET subcommand end to end (untrained network): logsnr_warped, UniC and
# AFS reach the sampler; results written atomically with the settings.

def test_pet_accepts_every_sampler_option(setup, tmp_path, monkeypatch):
    seen = []
    real = sampling.sample
    monkeypatch.setattr(sampling, 'sample', lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    result = _run(setup, tmp_path / 'eval', '--solver', 'dpmpp_2m', '--discretization', 'logsnr_warped', '--corrector', 'unic', '--afs',
        '--steps', '3', '--warp-k', '0.5', '--sigma-c', '0.4', '--batch', '4', '--seed', '10')
    assert result.exit_code == 0, result.output
    expected = dict(sampling.SAMPLER_DEFAULTS, solver='dpmpp_2m', discretization='logsnr_warped', corrector='unic', afs=True,
        num_steps=3, warp_k=0.5, sigma_c=0.4)
    assert len(seen) == 2 and all({k: kw[k] for k in sampling.SAMPLER_KEYS} == expected for kw in seen) # 3 images x 2 samples, batch 4.
    out = json.loads((tmp_path / 'eval' / 'metrics.json').read_text())
    assert out['sampler'] == dict(expected, S_max='inf') and out['images'] == 3 and out['samples'] == 2 and out['seed'] == 10
    assert len((tmp_path / 'eval' / 'metrics.csv').read_text().splitlines()) == 1 + 3 * 3 * 2 * 2   # Images x methods x references x regions (no low_counts: no MLEM baselines).
    assert (tmp_path / 'eval' / 'panel.png').is_file()
    assert sorted(os.listdir(tmp_path / 'eval')) == ['metrics.csv', 'metrics.json', 'panel.png'] # No temporary files left.

def test_pet_posterior_seeds(setup, monkeypatch):
    # Sample j of image i uses seed + i * S + j, whatever the batch size.
    seen = []
    real = sampling.StackedRandomGenerator
    monkeypatch.setattr(sampling, 'StackedRandomGenerator', lambda device, seeds: seen.append(list(seeds)) or real(device, seeds))
    from training.pet import evaluation as pet_evaluation
    net = persistence.load_snapshot(setup['net'])['ema'].eval()
    low = np.load(setup['test'])['low'][:2].astype(np.float64)
    a = pet_evaluation.pet_posterior(net, low, 3, 4, 'cpu', seed=5, num_steps=2)
    b = pet_evaluation.pet_posterior(net, low, 3, 6, 'cpu', seed=5, num_steps=2)
    assert seen == [[5, 6, 7, 8], [9, 10], [5, 6, 7, 8, 9, 10]]
    assert np.allclose(a[0], b[0], atol=1e-5) and np.allclose(a[1], b[1], atol=1e-5)

#----------------------------------------------------------------------------
# Bad inputs: one line, exit 1, nothing written.

def test_bad_pet_inputs(setup, tmp_path):
    folder = setup['folder']
    low_small = _split(tmp_path / 'size.npz', low=np.ones((3, 1, 8, 8), np.float32))
    low_count = _split(tmp_path / 'count.npz', low=np.ones((2, 1, 16, 16), np.float32))
    full = np.ones((3, 1, 16, 16), np.float32)
    full[1, 0, 3, 4] = np.nan
    nan_full = _split(tmp_path / 'nan.npz', full=full)
    (tmp_path / 'text.npz').write_text('this is not an archive\n')
    good = open(setup['test'], 'rb').read()
    (tmp_path / 'truncated.npz').write_bytes(good[:len(good) // 2])
    with zipfile.ZipFile(setup['test']) as z:
        offset = z.getinfo('full.npy').header_offset + 30 + len('full.npy') + 200 # Inside full.npy's data.
    corrupt = bytearray(good)
    corrupt[offset] ^= 0xFF
    (tmp_path / 'crc.npz').write_bytes(bytes(corrupt))
    cases = [
        (dict(data=low_small), f'--data: low (3, 1, 8, 8) does not match full (3, 1, 16, 16) in {low_small} (image count and size must agree)'),
        (dict(data=low_count), f'--data: low (2, 1, 16, 16) does not match full (3, 1, 16, 16) in {low_count} (image count and size must agree)'),
        (dict(data=nan_full), f'--data: full in {nan_full} holds NaN or Inf values (image 1); rebuild it with dataset_tool.py pet-data'),
        (dict(data=str(tmp_path / 'text.npz')), f'--data: {tmp_path / "text.npz"} is not an .npz archive (or it is truncated); build it with dataset_tool.py pet-data'),
        (dict(data=str(tmp_path / 'truncated.npz')), f'--data: {tmp_path / "truncated.npz"} is not an .npz archive (or it is truncated); build it with dataset_tool.py pet-data'),
        (dict(data=str(tmp_path / 'crc.npz')), f"--data: cannot read {tmp_path / 'crc.npz'}: damaged archive (BadZipFile: Bad CRC-32 for file 'full.npy')"),
        (dict(data=str(tmp_path / 'none.npz')), f'--data: file not found: {tmp_path / "none.npz"}'),
    ]
    for kw, message in cases:
        assert _error(_run(setup, tmp_path / 'out', **kw)) == message
        assert not (tmp_path / 'out').exists()
    (tmp_path / 'file').write_text('x')
    assert _error(_run(setup, tmp_path / 'file')) == f'--outdir: {tmp_path / "file"} exists and is not a folder'
    assert (tmp_path / 'file').read_text() == 'x'
    assert _error(_run(setup, tmp_path / 'out', network=str(folder / 'test.npz'))).startswith(f'cannot load network snapshot {folder / "test.npz"}: ')
    assert _error(_run(setup, tmp_path / 'out', '--guidance', '2')).startswith('--guidance=2: classifier-free guidance needs a class-conditional network')
    assert not (tmp_path / 'out').exists()

def test_bad_input_is_one_line_in_a_process(setup, tmp_path):
    (tmp_path / 'text.npz').write_text('not an archive')
    proc = subprocess.run([sys.executable, os.path.join(launch.ROOT, 'evaluate.py'), 'pet', '--network', setup['net'], '--data', str(tmp_path / 'text.npz'),
        '--val-data', setup['val'], '--outdir', str(tmp_path / 'out')], env=launch.env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [f'Error: --data: {tmp_path / "text.npz"} is not an .npz archive '
        '(or it is truncated); build it with dataset_tool.py pet-data'], proc.stderr
    assert not (tmp_path / 'out').exists()

#----------------------------------------------------------------------------

def test_load_network_moves_the_frozen_networks_with_the_network(tmp_path):
    # A latent model decodes with its frozen autoencoder: it must be on the device of the samples.
    kw = dict(img_resolution=8, img_channels=1, model_type='SongUNet', model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[])
    path = tmp_path / 'stage2.pkl'
    persistence.save_snapshot(dict(ema=networks.EDMPrecond(**kw), frozen=dict(ae=networks.EDMPrecond(**kw))), path)
    net, snapshot = evaluation.load_network(str(path), False, torch.device('meta'))
    assert next(net.parameters()).device.type == 'meta'
    assert sorted(snapshot['frozen']) == ['ae'] and next(snapshot['frozen']['ae'].parameters()).device.type == 'meta'
    assert not any(p.requires_grad for p in snapshot['frozen']['ae'].parameters())

def test_pet_partial_noise_start(setup, tmp_path):
    assert _error(_run(setup, tmp_path / 'out', '--sigma-start', '0.001')) == '--sigma-start: expected a noise level in (0.002, inf] (above --sigma-min), got 0.001'
    assert _error(_run(setup, tmp_path / 'out', '--sigma-start', '0.5', '--sigma-min', '0.6')) == \
        '--sigma-start: expected a noise level in (0.6, inf] (above --sigma-min), got 0.5'
    assert _error(_run(setup, tmp_path / 'out', '--sigma-start', '0.5', '--preset', 'fast')) == ('--sigma-start: the analytic first step '
        '(--afs, and --preset fast, which sets it) assumes pure noise; partial-noise starts need --no-afs without --preset')
    assert not (tmp_path / 'out').exists()
    from training.pet import evaluation as pet_evaluation
    net, _ = evaluation.load_network(setup['net'], False, 'cpu')
    low = np.load(setup['test'])['low']
    a = pet_evaluation.pet_posterior(net, low, 2, 4, 'cpu', seed=5, num_steps=3, sigma_start=0.5)
    b = pet_evaluation.pet_posterior(net, low, 2, 4, 'cpu', seed=5, num_steps=3)
    with torch.no_grad():                                             # One step from sigma_start is D(cond + sigma_start n; sigma_start).
        low_t = torch.as_tensor(low, dtype=torch.float32)
        from training.pet.dataset import pet_normalize, pet_scale, pet_denormalize
        scale = pet_scale(low_t)
        cond = pet_normalize(low_t, scale)
        rnd = sampling.StackedRandomGenerator('cpu', [5 + 0 * 2])
        n = rnd.randn([1, 1, 16, 16])
        x = cond[:1].double() + 0.5 * n.double()
        d = net(x.float(), torch.tensor([0.5]), cond=cond[:1]).double()
    c = pet_evaluation.pet_posterior(net, low[:1], 2, 4, 'cpu', seed=5, solver='euler', num_steps=1, sigma_start=0.5)
    np.testing.assert_allclose(c[2][0], pet_denormalize(d, scale[:1].double()).numpy()[0], rtol=1e-5, atol=1e-5)
    assert not np.allclose(a[0], b[0])
    result = _run(setup, tmp_path / 'ok', '--sigma-start', '0.5')
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / 'ok' / 'metrics.json').read_text())['sigma_start'] == 0.5
