# medEDM: stage pipelines (training/stages.py). A two-stage toy pipeline with
# torchrun (2 gloo ranks): a tiny autoencoder, then EDM in its latent space
# with the autoencoder frozen; warm starts (init_from); frozen modules of a
# loss object under AdamW weight decay.

import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import launch

sys.path.insert(0, os.path.join(launch.ROOT, 'tests', 'helpers'))
import stage_toys # pylint: disable=wrong-import-position

from torch_utils import misc # pylint: disable=wrong-import-position
from torch_utils import persistence # pylint: disable=wrong-import-position
from training import networks # pylint: disable=wrong-import-position
from training import stages # pylint: disable=wrong-import-position
from training import training_loop # pylint: disable=wrong-import-position

CONFIGS = os.path.join(launch.ROOT, 'tests', 'configs')
ENTRY = os.path.join('tests', 'helpers', 'stage_entry.py')

#----------------------------------------------------------------------------
# Entry points with the toy classes admitted by the restricted unpickler.

def _run(script, config, args, cwd, nproc=2, timeout=240):
    cmd = launch.torchrun_cmd(ENTRY, nproc) + [script, '-cd', CONFIGS, '-cn', config] + list(args)
    return subprocess.run(cmd, cwd=cwd, env=launch.env(), capture_output=True, text=True, timeout=timeout)

def _run_dir(cwd, desc):
    found = glob.glob(os.path.join(cwd, 'runs', f'*-{desc}'))
    assert len(found) == 1, found
    return found[0]

def _final_state(run_dir):
    return torch.load(sorted(glob.glob(os.path.join(run_dir, 'training-state-*.pt')))[-1], map_location='cpu', weights_only=True)

def _snapshot(run_dir):
    return sorted(glob.glob(os.path.join(run_dir, 'network-snapshot-*.pkl')))[-1]

def _assert_same(a: dict, b: dict, what: str):
    assert a.keys() == b.keys(), what
    for name in a:
        assert torch.equal(a[name], b[name]), f'{what}: {name} differs'

@pytest.fixture(scope='module')
def pipeline(tmp_path_factory):
    """Stage 1 (autoencoder) and stage 2 (latent EDM, frozen autoencoder from a copy ae.pkl), 2 ranks each."""
    folder = tmp_path_factory.mktemp('stages')
    launch.make_data(str(folder))
    launch.check(_run('train.py', 'stage_ae', [], folder))
    ae_dir = _run_dir(folder, 'ae')
    shutil.copy(_snapshot(ae_dir), folder / 'ae.pkl')
    launch.check(_run('train.py', 'stage_latent', ['training.desc=latent'], folder))
    return folder, ae_dir, _run_dir(folder, 'latent')

#----------------------------------------------------------------------------
# Stage 1: a network that is not a denoiser trains in the loop, with ticks,
# EMA, snapshots and its own picture.

def test_autoencoder_stage_trains_and_draws_reconstructions(pipeline):
    folder, ae_dir, _ = pipeline
    losses = [json.loads(line)['Loss/loss']['mean'] for line in open(os.path.join(ae_dir, 'stats.jsonl'))]
    assert len(losses) == 4 and losses[-1] < 0.5 * losses[0], losses
    ema = persistence.load_snapshot(_snapshot(ae_dir))['ema']
    assert isinstance(ema, stage_toys.TinyAutoencoder) and (ema.latent_channels, ema.latent_resolution) == (2, 8)
    # AutoencoderLoss.grid at the last snapshot: the first 4 images and the EMA's reconstructions of them.
    from PIL import Image
    from training import image_io
    x = torch.as_tensor(np.load(folder / 'data.npz')['images'][:4])
    with torch.no_grad():
        image_io.save_image_grid(torch.cat([x, ema(x)]).numpy(), str(folder / 'expected.png'), drange=(-1, 1))
    grid, expected = (np.asarray(Image.open(p), dtype=np.int32) for p in (os.path.join(ae_dir, 'samples-000000.png'), folder / 'expected.png'))
    assert grid.shape == expected.shape == (48, 48) and np.abs(grid - expected).max() <= 1

#----------------------------------------------------------------------------
# Stage 2: frozen weights stay bit-identical; the snapshot embeds them.

def test_latent_stage_keeps_the_frozen_autoencoder_bit_identical(pipeline):
    folder, ae_dir, latent_dir = pipeline
    cfg = open(os.path.join(latent_dir, 'config.yaml')).read()
    assert 'torch.optim.AdamW' in cfg and 'weight_decay: 0.5' in cfg
    stage1 = persistence.load_snapshot(folder / 'ae.pkl')['ema']
    data = persistence.load_snapshot(_snapshot(latent_dir))
    assert set(data['frozen']) == {'autoencoder'}
    _assert_same(stage1.state_dict(), data['frozen']['autoencoder'].state_dict(), 'frozen autoencoder')
    ema = data['ema']
    assert (ema.img_channels, ema.img_resolution) == (2, 8) # network_interface: the latent shape.
    state = _final_state(latent_dir)
    assert state['world_size'] == 2 and not any(k.startswith(('enc.', 'dec.')) for k in state['net'])
    torch.manual_seed(0) # The loop's initial weights: seed 0, latent interface.
    init = misc.construct_class(dict(_TINY_LATENT), 'net', img_resolution=8, img_channels=2, label_dim=0).state_dict()
    assert any(not torch.equal(init[k], state['net'][k]) for k in init if k.endswith('weight')) # Stage 2 did train.
    assert os.path.isfile(os.path.join(latent_dir, 'samples-000000.png')) # LatentEDMLoss.grid: decoded samples.

_TINY_LATENT = dict(_target_='training.networks.EDMPrecond', model_type='SongUNet', model_channels=16, channel_mult=[1, 2],
    num_blocks=1, attn_resolutions=[], dropout=0.1)

def test_stage2_snapshot_alone_generates_decoded_samples(pipeline, tmp_path):
    folder, ae_dir, latent_dir = pipeline
    snapshot = tmp_path / 'network-snapshot-latent.pkl'
    shutil.copy(_snapshot(latent_dir), snapshot)
    gone = [folder / 'ae.pkl'] + glob.glob(os.path.join(ae_dir, 'network-snapshot-*.pkl'))
    for path in gone: # No stage-1 file exists while generating.
        os.rename(path, f'{path}.gone')
    try:
        launch.check(_run('generate.py', 'stage_latent', [f'sampling.network_pkl={snapshot}', f'sampling.outdir={tmp_path / "gen"}'], folder, nproc=0))
    finally:
        for path in gone:
            os.rename(f'{path}.gone', path)
    out = np.load(tmp_path / 'gen' / 'images.npz')
    assert out['images'].shape == (4, 1, 16, 16) and list(out['seeds']) == [0, 1, 2, 3] # Images, not 2 x 8 x 8 latents.

    # The same seeds in this process: sample latents with the snapshot's network, decode with its frozen autoencoder.
    import generate
    data = stages.load_snapshot(snapshot)
    kwargs = generate.sampler_kwargs(dict(generate.config_mod.SamplingConfig().__dict__, num_steps=3))
    latents = torch.cat([images for _, images in generate.generate_images(data['ema'], [[0, 1, 2, 3]], torch.device('cpu'), sampler_kwargs=kwargs)])
    assert latents.shape == (4, 2, 8, 8)
    expected = data['frozen']['autoencoder'].decode(latents)
    assert torch.allclose(torch.as_tensor(out['images']), expected, atol=1e-4)

def test_conditional_latent_snapshot_is_refused_by_generate_py(tmp_path):
    # Conditional generation took no decode step: it wrote latents as if they were images. Refused before any output.
    torch.manual_seed(0)
    net = misc.construct_class(dict(_TINY_LATENT), 'net', img_resolution=8, img_channels=2, label_dim=0, cond_channels=1)
    path = tmp_path / 'cond-latent.pkl'
    persistence.save_snapshot(dict(ema=net.eval(), loss_fn=stage_toys.LatentEDMLoss(), augment_pipe=None, dataset_kwargs={},
        frozen=dict(autoencoder=stage_toys.TinyAutoencoder(img_resolution=16, img_channels=1))), path)
    proc = _run('generate.py', 'stage_latent', [f'sampling.network_pkl={path}', f'sampling.outdir={tmp_path / "gen"}'], tmp_path, nproc=0)
    assert proc.returncode == 1 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    assert (f'error: sampling.network_pkl: {path} is a conditional latent model (its loss object decodes samples); generate.py samples '
        "latent models unconditionally only (use its family's evaluate.py command)") in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / 'gen').exists()

def test_stage2_interrupted_and_resumed_is_bit_identical(pipeline):
    # slice_kimg=0.024 stops inside tick 1 (a tick is 16 images); the second invocation resumes (frozen nets reloaded) and finishes.
    folder, _, latent_dir = pipeline
    outs = [launch.check(_run('train.py', 'stage_latent', ['training.desc=latent_sliced', 'training.slice_kimg=0.024'], folder)).stdout
        for _ in range(2)]
    assert 'Stopping at kimg 0.024' in outs[0] and 'Resuming from' in outs[1] and 'Exiting...' in outs[1]
    a, b = _final_state(latent_dir), _final_state(_run_dir(folder, 'latent_sliced'))
    assert a['cur_nimg'] == b['cur_nimg'] == 32
    for key in ('net', 'ema'):
        _assert_same(a[key], b[key], key)

#----------------------------------------------------------------------------
# A loss object's own frozen module under AdamW weight decay, 2 ranks: the
# zero-filled gradients of the all-reduce made AdamW decay it (1.0 -> 0.995 here).

def test_frozen_module_of_a_loss_stays_put_under_adamw_on_two_ranks(tmp_path):
    launch.make_data(str(tmp_path))
    launch.check(launch.run('train.py', ['training.loss._target_=stage_toys.FrozenFeatureLoss', 'training.desc=frozenloss',
        'training.optimizer._target_=torch.optim.AdamW', '+training.optimizer.weight_decay=0.5', 'training.snapshot_ticks=null'], tmp_path))
    state = _final_state(_run_dir(tmp_path, 'frozenloss'))
    assert state['world_size'] == 2
    assert state['loss_fn']['features.weight'].flatten().tolist() == [1.0] and state['loss_fn']['features.bias'].tolist() == [0.0]
    assert state['loss_fn']['logvar'].item() != 0 # The trainable parameter of the same loss did train.
    optimizer_params = [p for group in state['optimizer']['param_groups'] for p in group['params']]
    net = misc.construct_class(dict(_TINY_NET), 'net', img_resolution=16, img_channels=1, label_dim=0)
    assert len(optimizer_params) == len(list(net.parameters())) + 1 # Network + logvar; not the frozen convolution.

_TINY_NET = dict(_target_='training.networks.EDMPrecond', model_type='SongUNet', model_channels=16, channel_mult=[1, 2],
    num_blocks=1, attn_resolutions=[8], dropout=0.1) # tests/configs/tiny.yaml.

#----------------------------------------------------------------------------
# Warm starts and bad input: one-line ValueErrors naming the key and file.

NETWORK = dict(_target_='training.networks.EDMPrecond', model_type='SongUNet', model_channels=8, channel_mult=[1, 2],
    num_blocks=1, attn_resolutions=[], dropout=0.0)

@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return launch.make_data(str(tmp_path_factory.mktemp('stagedata')), n=16)

def _net(seed, **kwargs):
    torch.manual_seed(seed)
    return misc.construct_class(dict(NETWORK, **kwargs), 'net', img_resolution=16, img_channels=1, label_dim=0)

def _save(tmp_path, net, name='src.pkl'):
    path = tmp_path / name
    persistence.save_snapshot(dict(ema=net.eval().requires_grad_(False), loss_fn=None, augment_pipe=None, dataset_kwargs={}), path)
    return str(path)

def _train(tmp_path, data, **overrides):
    kwargs = dict(run_dir=str(tmp_path / 'run'), dataset_kwargs=dict(_target_='training.dataset.NpzDataset', path=data),
        network_kwargs=dict(NETWORK), loss_kwargs=dict(_target_='training.loss.EDMLoss'),
        optimizer_kwargs=dict(_target_='torch.optim.Adam', lr=0.0), batch_size=4, total_kimg=0.004, lr_rampup_kimg=0,
        kimg_per_tick=0.004, snapshot_ticks=None, state_dump_ticks=1, grid_images=0, workers=0, print_summary=False, seed=3)
    kwargs.update(overrides)
    training_loop.training_loop(**kwargs)
    return _final_state(kwargs['run_dir'])

def test_init_from_a_submodule_copies_exactly_those_weights(tmp_path, data):
    # lr = 0: the trained network is its initial one, i.e. the warm start.
    src = _net(7).state_dict()
    state = _train(tmp_path, data, init_from=dict(path=_save(tmp_path, _net(7)), module='model.enc'))
    fresh = _net(3).state_dict() # The loop's own initialisation (seed 3).
    enc = [k for k in fresh if k.startswith('model.enc.')]
    assert enc and len(enc) < len(fresh)
    for name in fresh:
        expected = src[name] if name.startswith('model.enc.') else fresh[name]
        assert torch.equal(state['net'][name], expected), name
        assert torch.equal(state['ema'][name], expected), name
    assert any(not torch.equal(src[k], fresh[k]) for k in enc)

def test_init_from_the_whole_network(tmp_path, data):
    src = _net(7).state_dict()
    state = _train(tmp_path, data, init_from=_save(tmp_path, _net(7)))
    _assert_same(src, state['net'], 'net')

def test_init_from_a_wrong_network_is_a_clear_message(tmp_path, data):
    ae = stage_toys.TinyAutoencoder(img_resolution=16, img_channels=1)
    path = _save(tmp_path, ae, 'ae.pkl')
    with pytest.raises(ValueError) as err:
        _train(tmp_path, data, init_from=path)
    assert str(err.value) == (f"training.init_from: {path} does not fit the network: 'model.map_layer0.weight' is missing from "
        f"the snapshot (set training.init_from.strict=false to copy only what fits)")
    other = _net(1, model_channels=4)
    with pytest.raises(ValueError, match=r"^training.init_from: .*src.pkl does not fit the network submodule 'model.enc': "
            r"'16x16_conv.weight' has shape \[4, 1, 3, 3\] in the snapshot, \[8, 1, 3, 3\] in the network"):
        _train(tmp_path, data, init_from=dict(path=_save(tmp_path, other), module='model.enc'))

def test_init_from_not_strict_copies_what_fits(tmp_path, data):
    # channel_mult [1, 1] instead of [1, 2]: the 16 x 16 level fits, the 8 x 8 level does not.
    other, net, fresh = _net(7, channel_mult=[1, 1]).state_dict(), _net(3), _net(3).state_dict()
    copied = stages.init_from(net, dict(path=_save(tmp_path, _net(7, channel_mult=[1, 1])), strict=False))
    assert 'model.enc.16x16_conv.weight' in copied and 'model.enc.8x8_block0.conv0.weight' not in copied
    for name, value in net.state_dict().items():
        assert torch.equal(value, other[name] if name in copied else fresh[name]), name
    assert all(other[name].shape == fresh[name].shape for name in copied)
    assert any(other[name].shape != fresh[name].shape for name in fresh if name in other)

@pytest.mark.parametrize('spec, message', [
    ('missing.pkl', 'training.init_from: snapshot not found: missing.pkl'),
    (dict(path='SRC', module='model.nothing'), "training.init_from.module='model.nothing' is not a submodule of the network"),
    (dict(path='SRC', source='model.nothing'), f"training.init_from.source='model.nothing' is not a submodule of the network in SRC"),
    (dict(path='SRC', modules='model.enc'), "training.init_from: unknown keys ['modules'] (expected path, module, source, strict)"),
])
def test_init_from_bad_spec(tmp_path, spec, message):
    src = _save(tmp_path, _net(7))
    spec = dict(spec, path=src) if isinstance(spec, dict) and spec.get('path') == 'SRC' else spec
    with pytest.raises(ValueError) as err:
        stages.init_from(_net(3), spec)
    assert str(err.value) == message.replace('SRC', src)

def test_frozen_errors(tmp_path, data):
    with pytest.raises(ValueError) as err:
        stages.load_frozen(dict(autoencoder='nowhere/ae.pkl'))
    assert str(err.value) == 'training.frozen.autoencoder: snapshot not found: nowhere/ae.pkl'
    path = _save(tmp_path, stage_toys.TinyAutoencoder(img_resolution=16, img_channels=1), 'ae.pkl')
    with pytest.raises(ValueError) as err:
        _train(tmp_path, data, frozen=dict(autoencoder=path)) # EDMLoss takes no frozen networks.
    assert str(err.value) == ("training.frozen: the loss object EDMLoss takes no frozen= argument, so it cannot use the "
        "networks ['autoencoder'] (remove training.frozen or use a loss that takes them)")

def test_loss_and_device_transform_receive_the_frozen_networks(tmp_path, data):
    # One process: a dataset whose device_transform takes `frozen`, and LatentEDMLoss, which sets the latent interface.
    torch.manual_seed(0)
    ae = stage_toys.TinyAutoencoder(img_resolution=16, img_channels=1, latent_channels=3)
    path = _save(tmp_path, ae, 'ae.pkl')
    stage_toys.FrozenSeeingDataset.seen.clear()
    state = _train(tmp_path, data, frozen=dict(autoencoder=path), loss_kwargs=dict(_target_='stage_toys.LatentEDMLoss'),
        dataset_kwargs=dict(_target_='stage_toys.FrozenSeeingDataset', path=data), optimizer_kwargs=dict(_target_='torch.optim.Adam', lr=1e-3),
        snapshot_ticks=1)
    seen = stage_toys.FrozenSeeingDataset.seen
    assert len(seen) == 1 and set(seen[0]) == {'autoencoder'} # One step of 4 images.
    got = seen[0]['autoencoder']
    assert isinstance(got, stage_toys.TinyAutoencoder) and not got.training and not any(p.requires_grad for p in got.parameters())
    _assert_same(ae.state_dict(), got.state_dict(), 'autoencoder')
    assert state['net']['model.enc.8x8_conv.weight'].shape[1] == 3 # The network works on 3 x 8 x 8 latents.
    snapshot = persistence.load_snapshot(_snapshot(tmp_path / 'run'))
    _assert_same(ae.state_dict(), snapshot['frozen']['autoencoder'].state_dict(), 'embedded autoencoder')

def test_resume_refuses_a_replaced_frozen_snapshot(tmp_path, data):
    # The state records the frozen weights; the same file resumes, a file replaced by other weights is refused.
    torch.manual_seed(0)
    path = _save(tmp_path, stage_toys.TinyAutoencoder(img_resolution=16, img_channels=1), 'ae.pkl')
    kwargs = dict(frozen=dict(autoencoder=path), loss_kwargs=dict(_target_='stage_toys.LatentEDMLoss'), total_kimg=0.012)
    state = _train(tmp_path, data, slice_kimg=0.004, **kwargs)
    assert state['cur_nimg'] == 4 and len(state['frozen_sha256']['autoencoder']) == 64
    resume = sorted(glob.glob(str(tmp_path / 'run' / 'training-state-*.pt')))[-1]
    assert _train(tmp_path, data, slice_kimg=0.004, resume_state=resume, **kwargs)['cur_nimg'] == 8 # Unchanged file: resumes.
    resume = sorted(glob.glob(str(tmp_path / 'run' / 'training-state-*.pt')))[-1]
    torch.manual_seed(1)
    _save(tmp_path, stage_toys.TinyAutoencoder(img_resolution=16, img_channels=1), 'ae.pkl') # Other weights, same path.
    with pytest.raises(ValueError) as err:
        _train(tmp_path, data, resume_state=resume, **kwargs)
    assert str(err.value) == (f'training.frozen.autoencoder: the snapshot now holds other weights than the ones {resume} was '
        f'trained with (the file was replaced?); resuming would not continue that run (restore the file, or resume=none)')

def test_init_from_through_train_py_is_one_line(pipeline):
    folder, ae_dir, _ = pipeline
    proc = _run('train.py', 'stage_latent', ['training.desc=bad_init', f'training.init_from={_snapshot(ae_dir)}', 'resume=none'], folder, nproc=0)
    assert proc.returncode == 1
    assert (f"error: training.init_from: {_snapshot(ae_dir)} does not fit the network: 'model.map_layer0.weight' is missing "
        f"from the snapshot") in proc.stderr, proc.stderr[-3000:]
    assert 'Traceback' not in proc.stderr

#----------------------------------------------------------------------------
# Snapshots with frozen networks; the one loader of the entry points.

def test_snapshot_embeds_frozen_networks(tmp_path):
    torch.manual_seed(0)
    ae = stage_toys.TinyAutoencoder(img_resolution=16, img_channels=1)
    net = _net(0)
    path = tmp_path / 'network-snapshot-000000.pkl'
    persistence.save_snapshot(dict(ema=net, loss_fn=stage_toys.LatentEDMLoss(), augment_pipe=None, dataset_kwargs={},
        frozen=dict(autoencoder=ae)), path)
    data = stages.load_snapshot(path)
    for module in (data['ema'], data['frozen']['autoencoder']):
        assert not module.training and not any(p.requires_grad for p in module.parameters())
    _assert_same(ae.state_dict(), data['frozen']['autoencoder'].state_dict(), 'autoencoder')
    z = torch.randn([3, 2, 8, 8], dtype=torch.float64)
    with torch.no_grad(): # Per sample: the image of a seed does not depend on its batch.
        assert torch.equal(stages.decode(data, z), torch.cat([ae.decode(z[i:i + 1].float()) for i in range(3)]))
        assert torch.allclose(stages.decode(data, z, per_sample=False), ae.decode(z.float()))
    assert stages.load_snapshot(_save(tmp_path, _net(0), 'plain.pkl'))['frozen'] == {}
    with pytest.raises(ValueError, match=r'snapshot key "frozen.autoencoder": Conv2d is not a @persistent_class'):
        persistence.save_snapshot(dict(ema=net, frozen=dict(autoencoder=torch.nn.Conv2d(1, 1, 1))), tmp_path / 'bad.pkl')

@pytest.mark.parametrize('frozen, what', [
    ('list', '"frozen" is not a mapping {name: network} (a damaged snapshot)'),
    ('int_key', '"frozen" is not a mapping {name: network} (a damaged snapshot)'),
    ('text', '"frozen" is not a mapping {name: network} (a damaged snapshot)'),
    ('number', '"frozen.autoencoder" is not a network'),
])
def test_damaged_frozen_key_is_a_clear_message(tmp_path, frozen, what):
    # A "frozen" entry that is not {name: network} was a TypeError traceback in every entry point.
    net = _net(0)
    frozen = dict(list=[net], int_key={3: net}, text='abc', number=dict(autoencoder=5))[frozen]
    path = tmp_path / 'damaged.pkl'
    path.write_bytes(__import__('pickle').dumps(dict(ema=net, frozen=frozen)))
    with pytest.raises(ValueError) as err:
        stages.load_snapshot(path)
    assert str(err.value) == f'network snapshot {path}: {what}'
    assert stages.load_snapshot(_save(tmp_path, net, 'fine.pkl'))['frozen'] == {}

def test_loss_with_a_frozen_module_round_trips(tmp_path):
    loss = stage_toys.FrozenFeatureLoss()
    path = tmp_path / 'snap.pkl'
    persistence.save_snapshot(dict(ema=_net(0), loss_fn=loss), path)
    loaded = persistence.load_snapshot(path)['loss_fn']
    assert not loaded.features.weight.requires_grad and loaded.logvar.requires_grad
    assert stages.takes_frozen(stage_toys.LatentEDMLoss()) and not stages.takes_frozen(loss)

#----------------------------------------------------------------------------

def test_init_from_strict_must_be_a_boolean():
    with pytest.raises(ValueError, match=r"^training\.init_from\.strict: expected true or false, got 'false'$"):
        stages.parse_init_from(dict(path='x.pkl', strict='false'))
    assert stages.parse_init_from(dict(path='x.pkl', strict=False))['strict'] is False
