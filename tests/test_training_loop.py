# medEDM: training-loop options in one process (no torchrun): freezing
# schedule, bf16 autocast, joint augmentation, clipping and lr decay.

import glob
import json
import os
import re

import pytest
import torch

import launch
from torch_utils import misc
from training import training_loop

#----------------------------------------------------------------------------

NETWORK = dict(_target_='training.networks.EDMPrecond', model_type='SongUNet', model_channels=8, channel_mult=[1, 2],
    num_blocks=1, attn_resolutions=[], dropout=0.0)

@pytest.fixture(scope='module')
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp('loop')
    return launch.make_data(str(folder), n=32)

def _train(tmp_path, data, **overrides):
    kwargs = dict(run_dir=str(tmp_path), dataset_kwargs=dict(_target_='training.dataset.NpzDataset', path=data),
        network_kwargs=dict(NETWORK), loss_kwargs=dict(_target_='training.loss.EDMLoss'),
        optimizer_kwargs=dict(_target_='torch.optim.Adam', lr=1e-2), batch_size=4, total_kimg=0.032, lr_rampup_kimg=0,
        kimg_per_tick=0.016, snapshot_ticks=None, state_dump_ticks=1, grid_images=0, workers=0, print_summary=False,
        ema_halflife_kimg=0.01, seed=3)
    kwargs.update(overrides)
    training_loop.training_loop(**kwargs)
    state = sorted(glob.glob(os.path.join(str(tmp_path), 'training-state-*.pt')))[-1]
    return torch.load(state, map_location='cpu', weights_only=True)

def _initial_weights(**interface):
    torch.manual_seed(3)
    return misc.construct_class(dict(NETWORK), 'net', img_resolution=16, img_channels=1, label_dim=0, **interface).state_dict()

#----------------------------------------------------------------------------

def test_freeze_whole_run(tmp_path, data):
    state = _train(tmp_path, data, freeze=[dict(params='model.enc.*')])
    init = _initial_weights()
    enc = [k for k in init if k.startswith('model.enc.') and not k.endswith('resample_filter')]
    dec = [k for k in init if k.startswith('model.dec.') and k.endswith('weight')]
    assert enc and all(torch.equal(state['net'][k], init[k]) for k in enc)
    assert any(not torch.equal(state['net'][k], init[k]) for k in dec)

def test_freeze_first_kimg_then_train(tmp_path, data):
    # Frozen for the first 16 images (4 steps), trained for the last 16.
    state = _train(tmp_path, data, freeze=[dict(params='model.map_layer0', start_kimg=0, end_kimg=0.016)])
    init = _initial_weights()
    assert not torch.equal(state['net']['model.map_layer0.weight'], init['model.map_layer0.weight'])
    frozen_all = _train(tmp_path / 'b', data, freeze=[dict(params='model.map_layer0', start_kimg=0, end_kimg=None)])
    assert torch.equal(frozen_all['net']['model.map_layer0.weight'], init['model.map_layer0.weight'])

def test_freeze_bad_pattern(tmp_path, data):
    with pytest.raises(ValueError, match=r"training.freeze\[0\].params='nothing.\*' matches no parameter"):
        _train(tmp_path, data, freeze=[dict(params='nothing.*')])

def test_bf16_autocast(tmp_path, data):
    # Under autocast the network computes in bf16: the run departs from the fp32 run of the same seed (which
    # repeats bit for bit), but stays near it, and the weights stay fp32.
    distance = lambda a, b: sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in b) ** 0.5
    bf16 = _train(tmp_path / 'bf16', data, precision='bf16')['net']
    fp32 = _train(tmp_path / 'fp32', data)['net']
    assert all(torch.isfinite(v).all() for v in bf16.values())
    assert all(v.dtype == torch.float32 for k, v in bf16.items() if v.is_floating_point())
    assert 0 < distance(bf16, fp32) < 0.3 * distance(fp32, _initial_weights())

def test_fp16_needs_cuda(tmp_path, data):
    if torch.cuda.is_available():
        pytest.skip('CUDA present')
    with pytest.raises(ValueError, match='training.precision=fp16 needs CUDA; use bf16 on CPU'):
        _train(tmp_path, data, precision='fp16')

def test_augment_pipe_conditions_the_network(tmp_path, data):
    augment = dict(_target_='training.augment.AugmentPipe', p=1, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
    state = _train(tmp_path, data, augment_kwargs=augment)
    # The augment labels reach the network: their mapping layer (9 inputs) has gradients and is trained.
    init = _initial_weights(augment_dim=9)['model.map_augment.weight']
    trained = state['net']['model.map_augment.weight']
    assert trained.shape == init.shape == (8, 9)
    assert (trained - init).abs().amin(dim=0).gt(0).all() # Every one of the 9 inputs moved its weights.

def test_clip_and_cosine_decay_reported(tmp_path, data):
    _train(tmp_path, data, grad_clip=0.01, lr_decay='cosine', lr_min_ratio=0.5)
    lines = [json.loads(l) for l in open(tmp_path / 'stats.jsonl')]
    assert lines[-1]['Loss/learning_rate']['mean'] == pytest.approx(1e-2 * (0.5 + 0.5 * 0.5 * (1 + __import__('math').cos(__import__('math').pi * 28 / 32))))
    assert lines[-1]['Loss/grad_norm']['num'] > 0

def test_grad_clip_bounds_every_update(tmp_path, data):
    # Plain SGD with lr 1 and clipping at c: each of the 8 steps moves the weights by at most c (the
    # gradients here are far larger, so by exactly c), 8 c in all; unclipped they move far more.
    c = 1e-3
    moved = lambda state: sum(float((state['net'][k].double() - v.double()).pow(2).sum()) for k, v in _initial_weights().items()) ** 0.5
    sgd = dict(_target_='torch.optim.SGD', lr=1.0)
    clipped = moved(_train(tmp_path / 'a', data, optimizer_kwargs=sgd, grad_clip=c))
    assert 2 * c < clipped <= 8 * c * (1 + 1e-5)
    assert moved(_train(tmp_path / 'b', data, optimizer_kwargs=dict(sgd, lr=1e-2))) > 10 * clipped

def test_bad_loop_options(tmp_path, data):
    with pytest.raises(ValueError, match="training.lr_decay: expected 'constant', 'cosine' or 'isqrt', got 'linear'"):
        _train(tmp_path, data, lr_decay='linear')
    with pytest.raises(ValueError, match='training.batch_gpu=3 must divide batch_size / processes = 4'):
        _train(tmp_path, data, batch_gpu=3)

@pytest.mark.parametrize('overrides, message', [
    (dict(snapshot_ticks=0), 'training.snapshot_ticks must be an integer >= 1 (or null), got 0'),
    (dict(state_dump_ticks=0), 'training.state_dump_ticks must be an integer >= 1 (or null), got 0'),
    (dict(kimg_per_tick=0), 'training.kimg_per_tick must be > 0, got 0'),
    (dict(total_kimg=-1), 'training.total_kimg must be > 0, got -1'),
    (dict(ema_rampup_ratio=0), 'training.ema_rampup_ratio must be > 0 (or null), got 0'),
    (dict(ema_halflife_kimg=float('nan')), 'training.ema_halflife_kimg must be > 0, got nan'),
    (dict(grad_clip=0), 'training.grad_clip must be > 0 (or null), got 0'),
    (dict(lr_rampup_kimg=-1), 'training.lr_rampup_kimg must be >= 0, got -1'),
    (dict(workers=-1), 'training.workers must be an integer >= 0, got -1'),
    (dict(max_nonfinite_steps=0), 'training.max_nonfinite_steps must be an integer >= 1, got 0'),
    (dict(network_kwargs=dict(NETWORK, augment_dim=9)), 'training.network.augment_dim=9 needs an augment pipe, but training.augment is null '
        '(set training.network.augment_dim=0 or configure training.augment)'),
])
def test_bad_numbers_are_refused_before_training(tmp_path, data, overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        _train(tmp_path, data, **overrides)
    assert not glob.glob(str(tmp_path / 'training-state-*.pt'))

def test_resume_with_another_network_is_refused(tmp_path, data):
    _train(tmp_path / 'a', data)
    state = sorted(glob.glob(str(tmp_path / 'a' / 'training-state-*.pt')))[-1]
    with pytest.raises(ValueError, match=re.escape(f'{state} does not fit the configured training.network (net: Error(s) in loading state_dict')):
        _train(tmp_path / 'b', data, resume_state=state, network_kwargs=dict(NETWORK, model_channels=16))
    with pytest.raises(ValueError, match=re.escape(f'{state} was trained with the optimizer torch.optim.adam.Adam, not the configured '
            f'training.optimizer torch.optim.sgd.SGD')): # torch itself loads Adam's state into SGD without a word.
        _train(tmp_path / 'c', data, resume_state=state, optimizer_kwargs=dict(_target_='torch.optim.SGD', lr=1e-2, momentum=0.9))

def test_gradient_accumulation_runs_all_rounds(tmp_path, data):
    # batch_gpu=1 -> 4 accumulation rounds per step; every image counts in Loss/loss (per pixel).
    _train(tmp_path, data, batch_gpu=1)
    lines = [json.loads(l) for l in open(tmp_path / 'stats.jsonl')]
    assert lines[-1]['Loss/loss']['num'] == 3 * 4 * 16 * 16 # 3 steps of 4 images since tick 0.

def test_conditional_training_from_npz_cond_key(tmp_path, data):
    import numpy as np
    d = np.load(data)
    path = tmp_path / 'cond.npz'
    np.savez(path, images=d['images'], cond=-d['images'])
    state = _train(tmp_path / 'run', str(path), dataset_kwargs=dict(_target_='training.dataset.NpzDataset', path=str(path), cond_key='cond'),
        snapshot_ticks=1, grid_images=2, grid_steps=2)
    assert state['net']['model.enc.16x16_conv.weight'].shape[1] == 2 # Image + condition channel.
    assert (tmp_path / 'run' / 'samples-000000.png').is_file()

def test_slice_without_state_dumps_still_saves_and_resumes(tmp_path, data):
    # state_dump_ticks=None: a time slice must still end with a training state.
    state = _train(tmp_path, data, state_dump_ticks=None, slice_kimg=0.004, total_kimg=0.032)
    assert state['cur_nimg'] == 4
    path = sorted(glob.glob(str(tmp_path / 'training-state-*.pt')))[-1]
    state = _train(tmp_path, data, state_dump_ticks=None, slice_kimg=0.008, total_kimg=0.032, resume_state=path)
    assert state['cur_nimg'] == 12

def test_slices_that_end_mid_tick_keep_the_tick_cadence(tmp_path, data):
    # Ticks of 8 images (2 steps), slices of 8 images starting mid-tick: the resumed runs continue
    # the open tick, so every tick ends where the uninterrupted run's does (plus a line per slice stop).
    ticks = lambda folder: [(l['Progress/tick']['mean'], round(l['Progress/kimg']['mean'] * 1000)) for l in map(json.loads, open(folder / 'stats.jsonl'))]
    full = _train(tmp_path / 'full', data, kimg_per_tick=0.008)
    state, path = None, None
    while state is None or state['cur_nimg'] < 32:
        state = _train(tmp_path / 'sliced', data, kimg_per_tick=0.008, slice_kimg=0.008, resume_state=path)
        path = sorted(glob.glob(str(tmp_path / 'sliced' / 'training-state-*.pt')))[-1]
    assert ticks(tmp_path / 'full') == [(0, 4), (1, 12), (2, 20), (3, 28), (4, 32)]
    assert ticks(tmp_path / 'sliced') == [(0, 4), (1, 8), (1, 12), (2, 16), (2, 20), (3, 24), (3, 28), (4, 32)]
    assert all(torch.equal(full['net'][k], state['net'][k]) for k in full['net'])

def test_resume_with_other_seed_is_refused(tmp_path, data):
    _train(tmp_path, data, slice_kimg=0.016)
    path = sorted(glob.glob(str(tmp_path / 'training-state-*.pt')))[-1]
    with pytest.raises(ValueError, match=r'training.seed=4 differs from the seed=3 of .*; resuming would not continue that run'):
        _train(tmp_path, data, seed=4, resume_state=path)
