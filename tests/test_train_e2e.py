# medEDM: end-to-end training with torchrun (gloo, CPU): determinism, exact
# resume, kill-and-recover, two-node rendezvous, clear errors on bad input.

import glob
import os
import re
import signal
import socket
import subprocess
import time

import psutil
import pytest
import torch

import launch

#----------------------------------------------------------------------------

@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp('e2e')
    launch.make_data(str(folder))
    return folder

def _final_state(run_dir):
    states = sorted(glob.glob(os.path.join(run_dir, 'training-state-*.pt')))
    assert states, f'no training state in {run_dir}'
    return torch.load(states[-1], map_location='cpu', weights_only=True)

def _assert_same_weights(a, b):
    assert a['cur_nimg'] == b['cur_nimg']
    for key in ('net', 'ema'):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f'{key}.{name} differs'

def _run_dir(cwd, desc):
    found = glob.glob(os.path.join(cwd, 'runs', f'*-{desc}'))
    assert len(found) == 1, found
    return found[0]

#----------------------------------------------------------------------------

def test_one_process_run_writes_the_run_directory(data_dir):
    launch.check(launch.run('train.py', ['training.desc=p1', 'resume=none'], data_dir, nproc=0))
    run_dir = _run_dir(data_dir, 'p1')
    names = set(os.listdir(run_dir))
    assert {'config.yaml', 'log.txt', 'stats.jsonl', 'network-snapshot-000000.pkl', 'training-state-000000.pt', 'samples-000000.png'} <= names
    lines = open(os.path.join(run_dir, 'stats.jsonl')).read().splitlines()
    assert len(lines) == 4 # Ticks at 8, 40, 72, 96 images.
    assert 'tick 3' in open(os.path.join(run_dir, 'log.txt')).read()
    assert _final_state(run_dir)['cur_nimg'] == 96

def test_two_process_runs_are_identical(data_dir):
    for desc in ('p2a', 'p2b'):
        launch.check(launch.run('train.py', [f'training.desc={desc}'], data_dir, nproc=2))
    a, b = _final_state(_run_dir(data_dir, 'p2a')), _final_state(_run_dir(data_dir, 'p2b'))
    assert not glob.glob(os.path.join(data_dir, 'outputs')) and not glob.glob(os.path.join(data_dir, '**', '.hydra'), recursive=True)
    assert a['world_size'] == 2
    _assert_same_weights(a, b)

def test_interrupted_and_resumed_run_is_bit_identical(data_dir):
    # slice_kimg stops after 32 images with a state dump; running again resumes (resume=auto).
    launch.check(launch.run('train.py', ['training.desc=full'], data_dir, nproc=2))
    outs = [launch.check(launch.run('train.py', ['training.desc=sliced', 'training.slice_kimg=0.032'], data_dir, nproc=2)).stdout for _ in range(3)]
    assert 'Stopping at kimg 0.032' in outs[0] and 'Resuming from' in outs[1] and 'Exiting...' in outs[2]
    _assert_same_weights(_final_state(_run_dir(data_dir, 'full')), _final_state(_run_dir(data_dir, 'sliced')))
    # Ticks end on the same images as without slices (the slice stops at 32 and 64 images, inside
    # ticks, add their own lines); no step is repeated after resuming.
    import json
    ticks = lambda desc: [(l['Progress/tick']['mean'], round(l['Progress/kimg']['mean'] * 1000))
        for l in map(json.loads, open(os.path.join(_run_dir(data_dir, desc), 'stats.jsonl')))]
    assert ticks('full') == [(0, 8), (1, 40), (2, 72), (3, 96)]
    assert ticks('sliced') == [(0, 8), (1, 32), (1, 40), (2, 64), (2, 72), (3, 96)]

def test_trainable_loss_starts_alike_on_every_rank(data_dir):
    # A loss object with parameters, dropout 0.1 and the module summary (a forward pass on rank 0
    # only): every rank starts from the same loss weights (checked at each snapshot), and the
    # summary does not change the run.
    loss = 'training.loss._target_=learned_loss.LearnedWeightLoss'
    launch.check(launch.run('train.py', [loss, 'training.print_summary=true', 'training.desc=loss_summary'], data_dir, nproc=2))
    launch.check(launch.run('train.py', [loss, 'training.desc=loss_plain'], data_dir, nproc=2))
    a, b = _final_state(_run_dir(data_dir, 'loss_summary')), _final_state(_run_dir(data_dir, 'loss_plain'))
    _assert_same_weights(a, b)
    assert a['loss_fn'].keys() == {'logvar.weight', 'logvar.bias'} and all(torch.equal(a['loss_fn'][k], b['loss_fn'][k]) for k in a['loss_fn'])

def test_resume_with_other_world_size(data_dir):
    launch.check(launch.run('train.py', ['training.desc=ws', 'training.slice_kimg=0.048'], data_dir, nproc=2))
    out = launch.check(launch.run('train.py', ['training.desc=ws', 'training.slice_kimg=0.048'], data_dir, nproc=0)).stdout
    assert 'resuming a 2-process run with 1 processes' in out
    assert _final_state(_run_dir(data_dir, 'ws'))['cur_nimg'] == 96

def test_sigkill_under_max_restarts_recovers_bit_identical(data_dir):
    # Uninterrupted reference with enough ticks that the kill lands mid-run.
    args = ['training.total_kimg=0.4', 'training.kimg_per_tick=0.04', 'training.snapshot_ticks=5']
    launch.check(launch.run('train.py', args + ['training.desc=nokill'], data_dir, nproc=2))
    cmd = launch.torchrun_cmd('train.py', 2, ['--max-restarts=1']) + launch.TINY + args + ['training.desc=kill']
    proc = subprocess.Popen(cmd, cwd=data_dir, env=launch.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        state = None
        deadline = time.time() + 180
        while state is None and time.time() < deadline and proc.poll() is None:
            found = glob.glob(os.path.join(data_dir, 'runs', '*-kill', 'training-state-*.pt'))
            state = found[0] if found else None
            time.sleep(0.05)
        assert state is not None, 'no training state appeared'
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if 'train.py' in ' '.join(p.cmdline())]
        victim = [p for p in workers if p.environ().get('RANK') == '1']
        assert victim, 'rank 1 not found'
        victim[0].send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-4000:]
    assert 'Resuming from' in out, out[-4000:]
    kill_dir = _run_dir(data_dir, 'kill')
    final = _final_state(kill_dir)
    assert final['cur_nimg'] == 400
    _assert_same_weights(_final_state(_run_dir(data_dir, 'nokill')), final)

def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]

def test_two_node_rendezvous_matches_single_node(data_dir):
    # Two torchrun agents with --nnodes=2 on 127.0.0.1 (c10d rendezvous), one process each.
    launch.check(launch.run('train.py', ['training.desc=single'], data_dir, nproc=2))
    port = _free_port()
    base = [os.path.join(launch.BIN, 'torchrun'), '--nnodes=2', '--nproc_per_node=1', '--rdzv-backend=c10d',
            f'--rdzv-endpoint=127.0.0.1:{port}', '--rdzv-id=medEDM-test', os.path.join(launch.ROOT, 'train.py')]
    cmd = base + launch.TINY + ['training.desc=twonode']
    procs = [subprocess.Popen(cmd, cwd=data_dir, env=launch.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), '\n'.join(o[-3000:] for o in outs)
    _assert_same_weights(_final_state(_run_dir(data_dir, 'single')), _final_state(_run_dir(data_dir, 'twonode')))

#----------------------------------------------------------------------------
# Bad input: clear message, non-zero exit.

@pytest.mark.parametrize('args, message', [
    (['training.batch_sizee=8'], "Key 'batch_sizee' not in 'TrainingConfig'"),
    (['+training.batch_sizee=8'], "Key 'training.batch_sizee' not in 'TrainingConfig'"),
    (['training.batch_size=eight'], "Value 'eight' of type 'str' could not be converted to Integer"),
    (['training.dataset.path=missing.npz'], 'missing.npz'),
    (['training.network.channel_mul=[1]'], "Could not override 'training.network.channel_mul'"),
    (['+training.network.channel_mul=[1]'], 'training.network.channel_mul: not an argument of training.networks.EDMPrecond'),
    (['training.batch_size=7'], 'training.batch_size=7 must be a positive multiple of the number of processes (2)'),
    (['resume=nowhere/training-state-000001.pt'], 'resume=nowhere/training-state-000001.pt: no such file or directory'),
])
def test_bad_config_fails_with_clear_message(data_dir, args, message):
    proc = launch.run('train.py', ['training.desc=bad', 'resume=none'] + [a for a in args if not a.startswith('resume=')] + [a for a in args if a.startswith('resume=')], data_dir, nproc=2, timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr + proc.stdout, proc.stderr[-3000:]
    _assert_no_traceback_from_us(proc.stderr)

def _assert_no_traceback_from_us(stderr):
    # torchrun prints its own failure summary; no traceback may come from the project's code.
    assert not re.search(r'File ".*(train|generate)\.py", line|File ".*/(training|torch_utils)/', stderr), stderr[-3000:]

def test_missing_dataset_message_names_the_key(data_dir):
    proc = launch.run('train.py', ['training.desc=bad', 'training.dataset.path=missing.npz'], data_dir, nproc=0)
    assert proc.returncode == 1
    assert 'dataset.path' in proc.stderr and 'missing.npz' in proc.stderr
    _assert_no_traceback_from_us(proc.stderr)

def test_unreadable_image_file(data_dir, tmp_path):
    from PIL import Image
    import numpy as np
    folder = tmp_path / 'pngs'
    folder.mkdir()
    for i in range(6):
        Image.fromarray((np.random.default_rng(i).random((16, 16)) * 255).astype(np.uint8)).save(folder / f'{i}.png')
    (folder / '3.png').write_bytes(b'not a png at all')
    proc = launch.run('train.py', ['training.desc=png', 'training.dataset._target_=training.dataset.ImageFolderDataset',
        f'training.dataset.path={folder}'], data_dir, nproc=2)
    assert proc.returncode != 0
    assert '3.png' in proc.stderr, proc.stderr[-3000:]

def test_truncated_training_state_is_refused(data_dir, tmp_path):
    launch.check(launch.run('train.py', ['training.desc=trunc', 'training.slice_kimg=0.032'], data_dir, nproc=0))
    state = glob.glob(os.path.join(_run_dir(data_dir, 'trunc'), 'training-state-*.pt'))[0]
    bad = tmp_path / 'training-state-000000.pt'
    bad.write_bytes(open(state, 'rb').read()[:1000])
    proc = launch.run('train.py', ['training.desc=trunc2', f'resume={bad}'], data_dir, nproc=0)
    assert proc.returncode == 1
    assert f'error: cannot load training state {bad}' in proc.stderr
    _assert_no_traceback_from_us(proc.stderr)

def test_nan_loss_on_one_rank_aborts_without_hang(data_dir):
    start = time.time()
    proc = launch.run('train.py', ['training.desc=nan', 'training.loss._target_=nan_loss.NaNOnRankLoss',
        'training.max_nonfinite_steps=3'], data_dir, nproc=2, timeout=120)
    assert proc.returncode != 0
    assert 'aborting: 3 consecutive training steps had non-finite loss or gradients' in proc.stderr
    assert time.time() - start < 100

def test_nan_steps_are_skipped_and_counted(data_dir):
    # One rank NaN for all steps but a high limit: no weight update, steps counted in stats.jsonl.
    launch.check(launch.run('train.py', ['training.desc=nanskip', 'training.loss._target_=nan_loss.NaNOnRankLoss',
        'training.max_nonfinite_steps=100', 'training.snapshot_ticks=null'], data_dir, nproc=2))
    import json
    last = json.loads(open(os.path.join(_run_dir(data_dir, 'nanskip'), 'stats.jsonl')).read().splitlines()[-1])
    assert last['Progress/skipped_steps']['mean'] == 12

#----------------------------------------------------------------------------

#----------------------------------------------------------------------------
# The EDM family end to end on real anatomy: MNI152 slices -> torchrun training
# with the demo config (shortened) -> generate.py -> PNG grid.

def test_mri_demo_config_end_to_end(tmp_path):
    data = tmp_path / 'mni.npz'
    build = launch.subprocess.run([launch.sys.executable, os.path.join(launch.ROOT, 'dataset_tool.py'), 'mri-slices', '--dest', str(data),
        '--resolution', '32', '--subjects', '4', '--slices-per-subject', '4'], cwd=tmp_path, env=launch.env(), capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, build.stderr
    args = ['-cd', os.path.join(launch.ROOT, 'configs'), '-cn', 'edm_mri', f'training.dataset.path={data}', 'training.outdir=runs',
            'training.total_kimg=0.064', 'training.kimg_per_tick=0.032', 'training.snapshot_ticks=1', 'training.grid_images=4', 'training.grid_steps=2']
    proc = launch.subprocess.run(launch.torchrun_cmd('train.py', 2) + args, cwd=tmp_path, env=launch.env(), capture_output=True, text=True, timeout=240)
    launch.check(proc)
    run_dir = glob.glob(str(tmp_path / 'runs' / '*-mni32-ddpmpp-edm'))[0]
    snapshot = sorted(glob.glob(os.path.join(run_dir, 'network-snapshot-*.pkl')))[-1]
    gen = launch.subprocess.run(launch.torchrun_cmd('generate.py', 2) + args[:4] + [f'sampling.network_pkl={snapshot}', 'sampling.seeds=0-3',
        'sampling.num_steps=2', 'sampling.format=npz', f'sampling.outdir={tmp_path / "gen"}'], cwd=tmp_path, env=launch.env(), capture_output=True, text=True, timeout=240)
    launch.check(gen)
    images = launch.np.load(tmp_path / 'gen' / 'images.npz')['images']
    assert images.shape == (4, 1, 32, 32) and launch.np.isfinite(images).all()
    assert os.path.isfile(os.path.join(run_dir, 'samples-000000.png'))
