# medEDM: one run per run directory. A second process on a live run directory
# is refused (naming the holder) and never harms the first; resume=auto skips
# a live run and reuses an empty one; a killed holder never blocks a restart;
# stale temporary files of a live writer are kept.

import glob
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

import launch
from training import training_state

#----------------------------------------------------------------------------
# Helpers.

def _holder(run_dir):
    """A separate live process holding the lock of `run_dir` (until killed)."""
    code = ('import sys; from training import training_state as t; t.lock_run_dir(sys.argv[1]); '
            'print("locked", flush=True); sys.stdin.read()')
    proc = subprocess.Popen([sys.executable, '-c', code, str(run_dir)], cwd=launch.ROOT, env=launch.env(),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == 'locked'
    return proc

def _stop(proc):
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)

def _make_run(outdir, name, tcfg, state=False):
    path = os.path.join(outdir, name)
    os.makedirs(path)
    with open(os.path.join(path, 'config.yaml'), 'w') as f:
        yaml.safe_dump(dict(resume='auto', training=tcfg), f)
    if state:
        training_state.save_state(training_state.state_path(path, 8), dict(cur_nimg=8, cur_tick=1, net={}, ema={}, optimizer={}))
    return path

#----------------------------------------------------------------------------
# The lock itself (in-process, with a holder process).

def test_second_locker_is_refused_naming_the_holder(tmp_path):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(training_state.RunDirBusy, match=rf'the run directory {tmp_path} is in use by another run \(host \S+, pid {proc.pid}, since '):
            training_state.lock_run_dir(str(tmp_path))
    finally:
        _stop(proc)
    training_state.lock_run_dir(str(tmp_path)) # The kernel dropped the dead holder's lock.
    assert training_state.holds_lock(str(tmp_path))
    training_state.unlock_run_dir(str(tmp_path))

def test_auto_resume_skips_a_live_run_and_reuses_an_empty_one(tmp_path):
    tcfg = dict(outdir=str(tmp_path), seed=0)
    live = _make_run(str(tmp_path), '00000-x', tcfg, state=True)
    proc = _holder(live)
    try:
        assert training_state.find_auto_resume(str(tmp_path), 'x', tcfg) is None # Live: not ours.
        # An older interrupted run of the same config that died before its first state: reused.
        empty = _make_run(str(tmp_path), '00001-x', tcfg)
        open(os.path.join(empty, 'log.txt'), 'w').write('killed at start\n')
        assert training_state.find_auto_resume(str(tmp_path), 'x', tcfg) == (empty, None)
        assert training_state.holds_lock(empty)
        training_state.unlock_run_dir(empty)
        # Output but no state (a snapshot): not empty, start afresh.
        open(os.path.join(empty, 'network-snapshot-000000.pkl'), 'wb').write(b'x')
        assert training_state.find_auto_resume(str(tmp_path), 'x', tcfg) is None
        assert not training_state.holds_lock(empty)
    finally:
        _stop(proc)
    shutil.rmtree(empty)
    found = training_state.find_auto_resume(str(tmp_path), 'x', tcfg) # Holder gone: resumable again.
    assert found == (live, training_state.state_path(live, 8))
    training_state.unlock_run_dir(live)

def test_stale_tmp_of_a_live_writer_is_kept(tmp_path):
    proc = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']) # Another live writer's pid.
    try:
        live = tmp_path / f'training-state-000008.pt.tmp{proc.pid}0123456789'
        dead = tmp_path / 'training-state-000016.pt.tmp999999990123456789' # No such pid.
        live.write_bytes(b'in progress')
        dead.write_bytes(b'left by a crash')
        training_state.remove_stale_tmp(str(tmp_path))
        assert live.exists() and not dead.exists()
    finally:
        _stop(proc)
        training_state.unlock_run_dir(str(tmp_path))

def test_stale_tmp_cleanup_needs_the_lock(tmp_path):
    (tmp_path / 'training-state-000016.pt.tmp999999990123456789').write_bytes(b'x')
    proc = _holder(tmp_path)
    try:
        with pytest.raises(training_state.RunDirBusy):
            training_state.remove_stale_tmp(str(tmp_path))
        assert (tmp_path / 'training-state-000016.pt.tmp999999990123456789').exists()
    finally:
        _stop(proc)

#----------------------------------------------------------------------------
# End to end: a live run and ten second attempts on its directory; a killed
# holder and resume=auto.

# 24 steps of 8 images, a state every 2 steps; the first run parks at step 20 while `hold` exists.
ARGS = ['training.total_kimg=0.192', 'training.kimg_per_tick=0.016', 'training.snapshot_ticks=null', 'training.grid_images=0',
        'training.loss._target_=hold_loss.HoldLoss', '+training.loss.block_after=20', '+training.loss.delay=0.05']

@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp('lock')
    launch.make_data(str(folder))
    return folder

@pytest.fixture(scope='module')
def reference(data_dir):
    """The run alone (its hold file never exists); batch_gpu larger than the batch: one note."""
    proc = launch.check(launch.run('train.py', ARGS + ['+training.loss.hold=nohold', 'training.desc=alone', 'training.batch_gpu=64'], data_dir, nproc=0))
    assert proc.stdout.count('Note: training.batch_gpu=64 is larger than the batch per process (batch_size 8 / 1 processes = 8); using batch_gpu=8.') == 1
    return _final(_one(data_dir, 'alone'))

def _one(cwd, desc):
    found = glob.glob(os.path.join(cwd, 'runs', f'*-{desc}'))
    assert len(found) == 1, found
    return found[0]

def _final(run_dir):
    states = sorted(glob.glob(os.path.join(run_dir, 'training-state-*.pt')))
    return torch.load(states[-1], map_location='cpu', weights_only=True)

def _assert_same_weights(a, b):
    assert a['cur_nimg'] == b['cur_nimg'] == 192
    for key in ('net', 'ema'):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key

def _start(data_dir, desc, hold, extra=()):
    cmd = launch.torchrun_cmd('train.py', 0) + launch.TINY + ARGS + [f'+training.loss.hold={hold}', f'training.desc={desc}', *extra]
    return subprocess.Popen(cmd, cwd=data_dir, env=launch.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

def _wait_for_state(data_dir, desc, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        found = glob.glob(os.path.join(data_dir, 'runs', f'*-{desc}', 'training-state-*.pt'))
        if found:
            return os.path.dirname(found[0])
        time.sleep(0.05)
    raise AssertionError(f'no training state of {desc} appeared:\n{proc.stdout.read() if proc.poll() is not None else ""}')

def test_second_process_on_a_live_run_dir_never_harms_the_first(data_dir, reference):
    hold = data_dir / 'hold-race'
    hold.write_text('')
    first = _start(data_dir, 'race', hold)
    try:
        run_dir = _wait_for_state(data_dir, 'race', first)
        fake_tmp = os.path.join(run_dir, f'training-state-000999.pt.tmp{first.pid}0000000001') # An in-progress write of the live run.
        open(fake_tmp, 'wb').write(b'in progress')
        for attempt in range(10):
            proc = launch.run('train.py', ARGS + [f'+training.loss.hold={hold}', 'training.desc=race', f'resume={run_dir}'], data_dir, nproc=0, timeout=60)
            assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
            assert f'error: the run directory {run_dir} is in use by another run (host ' in proc.stderr and f'pid {first.pid}' in proc.stderr, proc.stderr[-2000:]
            assert first.poll() is None and os.path.exists(fake_tmp), f'attempt {attempt} harmed the live run'
        # resume=auto with the same config leaves the live run alone: a run directory of its own.
        second = _start(data_dir, 'race', hold)
        second_dir = None
        while second_dir is None and second.poll() is None:
            dirs = [d for d in glob.glob(os.path.join(data_dir, 'runs', '*-race')) if d != run_dir and training_state.list_states(d)]
            second_dir = dirs[0] if dirs else None
            time.sleep(0.05)
        assert second_dir is not None, second.stdout.read()
        hold.unlink()
        out, _ = first.communicate(timeout=180)
        out2, _ = second.communicate(timeout=180)
    finally:
        for proc in (first, locals().get('second')):
            if proc is not None and proc.poll() is None:
                proc.kill()
    assert first.returncode == 0, out[-3000:]
    assert second.returncode == 0 and 'Resume from:    -' in out2, out2[-3000:]
    assert 'in use' not in open(os.path.join(run_dir, 'log.txt')).read() # Nothing of the attempts went into the live run's log.
    _assert_same_weights(reference, _final(run_dir))
    _assert_same_weights(reference, _final(second_dir))
    assert len(glob.glob(os.path.join(data_dir, 'runs', '*-race'))) == 2

def test_killed_holder_never_blocks_resume_auto(data_dir, reference):
    hold = data_dir / 'hold-kill'
    hold.write_text('')
    first = _start(data_dir, 'kill', hold)
    try:
        run_dir = _wait_for_state(data_dir, 'kill', first)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    hold.unlink()
    proc = launch.check(launch.run('train.py', ARGS + [f'+training.loss.hold={hold}', 'training.desc=kill'], data_dir, nproc=0)) # resume=auto.
    assert f'Run directory:  {os.path.relpath(run_dir, data_dir)}' in proc.stdout or f'Run directory:  {run_dir}' in proc.stdout, proc.stdout[-2000:]
    assert 'Resuming from' in proc.stdout
    assert len(glob.glob(os.path.join(data_dir, 'runs', '*-kill'))) == 1
    _assert_same_weights(reference, _final(run_dir))

#----------------------------------------------------------------------------
