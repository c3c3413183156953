# medEDM: reliability round two (issue 12). Config `_target_` slots that
# cannot run commands, snapshots and training states that are refused before
# they cost memory or train wrongly, one-line messages instead of tracebacks,
# no empty run directories from config errors.

import errno
import glob
import io
import os
import pickle
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import launch
from torch_utils import misc
from torch_utils import persistence
from training import networks
from training import training_state
from training.dataset import NpzDataset

#----------------------------------------------------------------------------

@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp('reliab')
    launch.make_data(str(folder))
    return folder

def _no_traceback(stderr):
    assert 'Traceback' not in stderr, stderr[-3000:]

def _runs(cwd):
    return sorted(glob.glob(os.path.join(cwd, 'runs', '*')))

#----------------------------------------------------------------------------
# Config `_target_` slots admit only classes of their kind; nothing is called.

@pytest.mark.parametrize('args, message', [
    (['training.dataset._target_=os.system', '+training.dataset.command="touch PWNED"'],
        "training.dataset._target_: refusing 'os.system': not a class; training.dataset takes a dataset class"),
    (['training.dataset._target_=subprocess.run', '+training.dataset.args=[touch,PWNED]'],
        "training.dataset._target_: refusing 'subprocess.run': not a class; training.dataset takes a dataset class"),
    (['training.loss._target_=subprocess.Popen', '+training.loss.args=[touch,PWNED]'],
        "training.loss._target_: refusing 'subprocess.Popen': training.loss takes a loss class of this project"),
    (['training.dataset._target_=training.loss.EDMLoss'],
        "training.dataset._target_: refusing 'training.loss.EDMLoss': training.dataset takes a dataset class (a torch.utils.data.Dataset"),
])
def test_config_target_cannot_run_commands(data_dir, args, message):
    before = _runs(data_dir)
    proc = launch.run('train.py', ['training.desc=target', 'resume=none'] + args, data_dir, nproc=0, timeout=120)
    assert proc.returncode == 1
    assert message in proc.stderr, proc.stderr[-3000:]
    assert not os.path.exists(data_dir / 'PWNED')
    assert _runs(data_dir) == before # Refused before a run directory exists.
    _no_traceback(proc.stderr)

@pytest.mark.parametrize('key, target, message', [
    ('training.network', 'torch.optim.Adam', 'training.network takes a network class (a torch.nn.Module'),
    ('training.optimizer', 'training.networks.EDMPrecond', 'training.optimizer takes an optimizer class (a torch.optim.Optimizer'),
    ('training.optimizer', 'subprocess.Popen', 'training.optimizer takes an optimizer class'),
    ('training.augment', 'os.system', "refusing 'os.system': not a class; training.augment takes an augment pipe class"),
    ('training.augment', 'torch.optim.SGD', 'training.augment takes an augment pipe class of this project'),
    ('training.loss', 'builtins.eval', "refusing 'builtins.eval': not a class; training.loss takes a loss class"),
    ('training.loss', 'training.dataset.NpzDataset', 'training.loss takes a loss class of this project'),
    ('sampling.cond_dataset', 'subprocess.Popen', 'sampling.cond_dataset takes a dataset class'),
])
def test_every_slot_admits_only_its_kind(key, target, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        misc.construct_class({'_target_': target, 'args': ['touch', 'PWNED']}, key)

def test_slots_admit_their_classes():
    assert misc.check_target({'_target_': 'training.dataset.NpzDataset'}, 'training.dataset') is NpzDataset
    assert misc.check_target({'_target_': 'training.networks.EDMPrecond'}, 'training.network') is networks.EDMPrecond
    assert misc.check_target({'_target_': 'training.loss.EDMLoss'}, 'training.loss').__name__ == 'EDMLoss'
    assert misc.check_target({'_target_': 'training.augment.AugmentPipe'}, 'training.augment').__name__ == 'AugmentPipe'
    assert misc.check_target({'_target_': 'torch.optim.SGD'}, 'training.optimizer') is torch.optim.SGD

def test_generate_cond_dataset_cannot_run_commands(tmp_path, monkeypatch):
    import generate
    monkeypatch.chdir(tmp_path)
    scfg = dict(cond_dataset={'_target_': 'os.system', 'command': 'touch PWNED'}, cond_indices=None)
    with pytest.raises(ValueError, match=re.escape("sampling.cond_dataset._target_: refusing 'os.system': not a class; "
            'sampling.cond_dataset takes a dataset class')):
        generate.load_conditions(None, scfg, {})
    assert not (tmp_path / 'PWNED').exists()

#----------------------------------------------------------------------------
# Snapshots: sizes compared on the meta device before allocation, strict weights,
# constructor values checked.

class _Forged:
    """Pickles as a persistent object with the given constructor kwargs and state."""
    def __init__(self, module, qualname, kwargs, state):
        self.args = (module, qualname, kwargs, state)
    def __reduce__(self):
        return (persistence._reconstruct_persistent_obj, self.args)

TINY_NET = dict(img_resolution=8, img_channels=1, model_type='SongUNet', model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[])

def _state(net, drop=None, extra=None):
    sd = {k: v for k, v in net.state_dict().items() if k != drop}
    if extra:
        sd[extra] = torch.zeros(3)
    buf = io.BytesIO()
    torch.save(sd, buf)
    return dict(state_dict=buf.getvalue(), training=[m.training for m in net.modules()], no_grad=[])

def _snapshot(path, kwargs, state):
    path.write_bytes(pickle.dumps(dict(ema=_Forged('training.networks', 'EDMPrecond', kwargs, state))))
    return path

def test_huge_network_in_a_tiny_snapshot_is_refused_before_allocation(tmp_path):
    # 57 GiB of float32 weights asked for by a few kB: refused without allocating (in a child with a 3 GiB address-space cap).
    small = networks.EDMPrecond(**TINY_NET)
    path = _snapshot(tmp_path / 'huge.pkl', dict(TINY_NET, model_channels=2048, channel_mult=[1, 2, 2, 2], num_blocks=4), _state(small))
    assert path.stat().st_size < 100_000
    code = ('import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30)); '
            'from torch_utils import persistence\n'
            'try: persistence.load_snapshot(sys.argv[1])\n'
            'except ValueError as err: print(err)')
    start = time.time()
    proc = subprocess.run([sys.executable, '-c', code, str(path)], env=launch.env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(rf'cannot load network snapshot {re.escape(str(path))}: training.networks.EDMPrecond: (the weights do not match '
        r'the network its arguments describe: \d+ missing|the network its arguments describe has more modules than the \d+)', proc.stdout), proc.stdout
    assert time.time() - start < 60

def test_stride0_weights_cannot_pass_the_meta_check(tmp_path):
    # The shapes of a huge network backed by one float each (zeros(1).expand(shape)): a few kB that
    # would pass the shape comparison and then make the loader build the real network. Refused first.
    kwargs = dict(TINY_NET, model_channels=512)
    with torch.device('meta'):
        meta = networks.EDMPrecond(**kwargs)
    sd = {k: torch.zeros(1, dtype=v.dtype).expand(v.shape) for k, v in meta.state_dict().items()}
    buf = io.BytesIO()
    torch.save(sd, buf)
    state = dict(state_dict=buf.getvalue(), training=[m.training for m in meta.modules()], no_grad=[])
    path = _snapshot(tmp_path / 'expanded.pkl', kwargs, state)
    assert path.stat().st_size < 100_000
    claimed = sum(v.numel() * v.element_size() for v in sd.values())
    with pytest.raises(ValueError, match=re.escape(f'cannot load network snapshot {path}: training.networks.EDMPrecond: the weights '
            f'claim {claimed} bytes, but the snapshot stores only {4 * len(sd)} (tensors that repeat or share storage are refused')):
        persistence.load_snapshot(path)

def test_tied_weights_still_load(tmp_path):
    # The same tensor under two names (a tied weight) is not an inflated snapshot.
    net = networks.EDMPrecond(**TINY_NET)
    sd = net.state_dict()
    buf = io.BytesIO()
    torch.save(sd, buf)
    state = dict(state_dict=buf.getvalue(), training=[m.training for m in net.modules()], no_grad=[])
    persistence._check_stored('tied', dict(a=sd['model.enc.8x8_conv.weight'], b=sd['model.enc.8x8_conv.weight']))
    with pytest.raises(ValueError, match='the weights claim'):
        w = torch.zeros(4)
        persistence._check_stored('overlap', dict(a=w[:3], b=w[1:])) # Overlapping views: 24 bytes claimed, 16 stored.
    assert torch.equal(persistence.load_snapshot(_snapshot(tmp_path / 'ok.pkl', TINY_NET, state))['ema'].state_dict()['model.enc.8x8_conv.weight'],
        sd['model.enc.8x8_conv.weight'])

def test_network_with_more_modules_than_the_snapshot_is_refused_before_building(tmp_path):
    # num_blocks=100000 would take hours to build even on the meta device; the snapshot carries flags for a tiny net.
    small = networks.EDMPrecond(**TINY_NET)
    path = _snapshot(tmp_path / 'deep.pkl', dict(TINY_NET, num_blocks=100000), _state(small))
    start = time.time()
    with pytest.raises(ValueError, match=re.escape(f'cannot load network snapshot {path}: training.networks.EDMPrecond: the network its '
            f'arguments describe has more modules than the {len(list(small.modules()))} the snapshot carries flags for')):
        persistence.load_snapshot(path)
    assert time.time() - start < 10

def test_snapshot_with_wrong_shapes_is_refused(tmp_path):
    small = networks.EDMPrecond(**TINY_NET)
    path = _snapshot(tmp_path / 'wide.pkl', dict(TINY_NET, model_channels=16), _state(networks.EDMPrecond(**dict(TINY_NET, model_channels=16, num_blocks=1))))
    persistence.load_snapshot(path) # Consistent: loads.
    sd16 = networks.EDMPrecond(**dict(TINY_NET, model_channels=16)).state_dict()
    state = _state(small)
    path = _snapshot(tmp_path / 'shapes.pkl', dict(TINY_NET, model_channels=16), state)
    with pytest.raises(ValueError, match=r'weight \S+ has shape \[\d+(, \d+)*\] in the snapshot, but the network its arguments describe needs'):
        persistence.load_snapshot(path)
    assert sd16.keys() == small.state_dict().keys()

@pytest.mark.parametrize('state, message', [
    (None, 'training.networks.EDMPrecond: the snapshot carries no weights for this network (refusing to use random weights)'),
    ('missing', 'the weights do not match the network its arguments describe: 1 missing (e.g. model.enc.8x8_conv.weight)'),
    ('extra', 'the weights do not match the network its arguments describe: 1 unexpected (e.g. model.extra)'),
])
def test_snapshot_with_missing_or_extra_weights_is_refused(tmp_path, state, message):
    net = networks.EDMPrecond(**TINY_NET)
    state = None if state is None else _state(net, drop='model.enc.8x8_conv.weight') if state == 'missing' else _state(net, extra='model.extra')
    path = _snapshot(tmp_path / 'w.pkl', TINY_NET, state)
    with pytest.raises(ValueError, match=re.escape(f'cannot load network snapshot {path}: ') + '.*' + re.escape(message)):
        persistence.load_snapshot(path)

@pytest.mark.parametrize('change, message', [
    (dict(img_resolution=-16), 'img_resolution: expected a positive int or 2 positive ints, got -16'),
    (dict(img_channels=0), 'img_channels must be an integer >= 1, got 0'),
    (dict(model_channels=-8), 'model_channels must be an integer >= 1, got -8'),
    (dict(channel_mult=[]), 'channel_mult must be a non-empty list of integers >= 1, got []'),
    (dict(num_blocks=-1), 'num_blocks must be an integer >= 0, got -1'),
    (dict(dropout=2.0), 'dropout must be a probability in [0, 1), got 2.0'),
    (dict(img_resolution=12, channel_mult=[1, 2, 2, 2]), 'img_resolution=12 must be divisible by 2^3 = 8'),
])
def test_invalid_constructor_values_are_refused_at_load(tmp_path, change, message):
    net = networks.EDMPrecond(**TINY_NET)
    path = _snapshot(tmp_path / 'bad.pkl', dict(TINY_NET, **change), _state(net))
    with pytest.raises(ValueError, match=re.escape(f'cannot load network snapshot {path}: {message}')):
        persistence.load_snapshot(path)
    with pytest.raises(ValueError, match=re.escape(message)):
        networks.EDMPrecond(**dict(TINY_NET, **change))

def test_group_norm_channels_checked_at_construction():
    kwargs = dict(img_resolution=16, img_channels=1, model_type='SongUNet', model_channels=48, channel_mult=[1, 2, 2], attn_resolutions=[8], num_blocks=1)
    with pytest.raises(ValueError, match=re.escape('model_channels=48: GroupNorm: a layer with 144 channels does not split into 32 groups '
            '(with channel_mult=[1, 2, 2]); model_channels=40 or 64 would work (multiples of 32 always do)')):
        networks.EDMPrecond(**kwargs)
    for mc in (40, 64): # The advice holds: these build and run.
        net = networks.EDMPrecond(**dict(kwargs, model_channels=mc))
        assert net(torch.zeros(1, 1, 16, 16), torch.ones(1)).shape == (1, 1, 16, 16)

#----------------------------------------------------------------------------
# Training states: counters and weights checked at resume.

def _train_state(tmp_path, **change):
    state = dict(cur_nimg=64, cur_tick=2, tick_start_nimg=64, batch_size=8, seed=0, total_elapsed_time=1.0,
        net={'w': torch.ones(3)}, ema={'w': torch.ones(3)}, optimizer={'state': {}, 'param_groups': []})
    state.update(change)
    path = str(tmp_path / 'training-state-000000.pt')
    training_state.save_state(path, state)
    return path

@pytest.mark.parametrize('change, message', [
    (dict(cur_nimg=-5000, tick_start_nimg=0), 'cur_nimg=-5000 is not an integer in [0, 9007199254740992]'),
    (dict(cur_nimg=2 ** 62), f'cur_nimg={2 ** 62} is not an integer in [0, 9007199254740992]'),
    (dict(cur_nimg=60, tick_start_nimg=56), 'cur_nimg=60 is not a multiple of its batch_size=8'),
    (dict(cur_tick=-1), 'cur_tick=-1 is not an integer in [0, '),
    (dict(tick_start_nimg=128), 'tick_start_nimg=128 is not an integer in [0, 64]'),
    (dict(total_elapsed_time=float('nan')), 'total_elapsed_time=nan is not a finite number >= 0'),
    (dict(ema={'w': torch.tensor([1.0, float('nan'), 1.0])}), 'ema.w has NaN or Inf values'),
])
def test_damaged_state_values_are_refused(tmp_path, change, message):
    path = _train_state(tmp_path, **change)
    with pytest.raises(ValueError, match=re.escape(f'cannot resume from {path}: {message}')):
        training_state.check_state_values(training_state.load_state(path), path)

def test_nan_state_refused_at_resume_without_a_run_dir(data_dir, tmp_path):
    path = _train_state(tmp_path, net={'model.w': torch.tensor([float('nan')])})
    before = _runs(data_dir)
    proc = launch.run('train.py', ['training.desc=nanstate', f'resume={path}'], data_dir, nproc=0, timeout=120)
    assert proc.returncode == 1
    assert f'error: cannot resume from {path}: net.model.w has NaN or Inf values' in proc.stderr, proc.stderr[-3000:]
    assert _runs(data_dir) == before
    _no_traceback(proc.stderr)

#----------------------------------------------------------------------------
# Data files.

def test_npz_loading_errors_name_the_file(tmp_path):
    good = tmp_path / 'good.npz'
    np.savez(good, images=np.zeros((4, 1, 8, 8), np.float32))
    raw = good.read_bytes()
    (tmp_path / 'trunc.npz').write_bytes(raw[:len(raw) // 2])
    corrupt = bytearray(raw)
    corrupt[len(raw) // 3] ^= 0xFF
    (tmp_path / 'crc.npz').write_bytes(bytes(corrupt))
    np.savez(tmp_path / 'empty.npz', images=np.zeros((0, 1, 8, 8), np.float32))
    (tmp_path / 'text.npz').write_text('these are not images\n')
    cases = [('trunc.npz', 'cannot read dataset file {}: damaged .npz archive (BadZipFile: File is not a zip file)'),
             ('crc.npz', "cannot read dataset file {}: damaged .npz archive (BadZipFile: Bad CRC-32 for file 'images.npy')"),
             ('empty.npz', "training.dataset.path: array 'images' in {} holds 0 images"),
             ('text.npz', 'training.dataset.path: {} is not an .npz archive (not a zip file of .npy arrays)')]
    for name, message in cases:
        with pytest.raises(ValueError, match=re.escape(message.format(tmp_path / name))):
            NpzDataset(path=str(tmp_path / name))
    assert len(NpzDataset(path=str(good))) == 4

@pytest.mark.parametrize('case', ['directory', 'read-only'])
def test_dataset_tool_dest_checked_before_building(tmp_path, monkeypatch, case):
    from click.testing import CliRunner
    import dataset_tool
    built = []
    monkeypatch.setattr(dataset_tool, 'build_mri_slices', lambda **kw: built.append(kw) or dict(images=np.zeros((1, 1, 8, 8), np.float32)))
    dest = tmp_path / 'out.npz'
    if case == 'directory':
        dest.mkdir()
        message = f"'{dest}' is an existing directory; give a file name ending in .npz"
    else:
        def read_only(*args, **kwargs):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        monkeypatch.setattr(dataset_tool.tempfile, 'mkstemp', read_only)
        message = f'Error: cannot write --dest {dest}: Read-only file system ({tmp_path}); nothing was written'
    result = CliRunner().invoke(dataset_tool.main, ['mri-slices', '--dest', str(dest)])
    assert result.exit_code != 0
    assert message in result.output, result.output
    assert not built and not isinstance(result.exception, OSError)
    assert (dest.is_dir() and not os.listdir(dest)) if case == 'directory' else not dest.exists()

#----------------------------------------------------------------------------
# Disk full during a save: the old file is intact, a one-line message.

def test_disk_full_during_a_save_damages_nothing(tmp_path):
    path = tmp_path / 'training-state-000008.pt'
    path.write_bytes(b'previous state')
    def full(f):
        f.write(b'half')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(OSError, match=re.escape(f'No space left on device while writing {path}; nothing was damaged')) as info:
        persistence.atomic_write(path, full)
    assert info.value.errno == errno.ENOSPC
    assert path.read_bytes() == b'previous state' and os.listdir(tmp_path) == [path.name]
    code = ('import errno, sys; from torch_utils import distributed, persistence\n'
            'def save(): persistence.atomic_write(sys.argv[1], lambda f: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))\n'
            'distributed.run_and_exit(save)')
    proc = subprocess.run([sys.executable, '-c', code, str(path)], env=launch.env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f'error: No space left on device while writing {path}; nothing was damaged (the previous '
        f'version of the file, if any, is intact and the partial file was removed): free some space and run again']
    assert path.read_bytes() == b'previous state'

#----------------------------------------------------------------------------
# Seeds: the range is sized before the list is built.

def test_huge_seed_range_refused_before_building():
    start = time.time()
    with pytest.raises(ValueError, match=re.escape("sampling.seeds: the range '0-4294967295' has 4294967296 integers, more than the limit of 10000000")):
        misc.parse_int_list('0-4294967295', 'sampling.seeds')
    with pytest.raises(ValueError, match=re.escape("sampling.seeds: the range '10-14' has 5 integers, more than the limit of 10")):
        misc.parse_int_list(['0-5', '10-14'], 'sampling.seeds', max_count=10) # The limit counts the whole list.
    with pytest.raises(ValueError, match=re.escape("sampling.seeds: '3' would make more than 3 integers in all")):
        misc.parse_int_list('0,1,2,3', 'sampling.seeds', max_count=3)
    assert misc.parse_int_list('0-3,7', 'x', max_count=5) == [0, 1, 2, 3, 7]
    assert time.time() - start < 1

#----------------------------------------------------------------------------
# Config errors: before a run directory exists, one line.

def test_train_without_experiment_config(data_dir):
    proc = subprocess.run(launch.torchrun_cmd('train.py', 0), cwd=data_dir, env=launch.env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert re.fullmatch(r'error: give an experiment config with -cn=<name>, e\.g\. -cn=edm_mri \(configs in \S+/configs: (\w+, )*edm_mri, edm_pet(, \w+)*\)',
        proc.stderr.strip()), proc.stderr[-3000:]

@pytest.mark.parametrize('args, message', [
    (['training.precision=fp16'], 'training.precision=fp16 needs CUDA; use bf16 on CPU'),
    (['training.lr_decay=linear'], "training.lr_decay: expected 'constant', 'cosine' or 'isqrt', got 'linear'"),
    (['training.dataset.path=missing.npz'], 'missing.npz'), # Found inside the loop: the new run directory is removed again.
    (['training.network.model_channels=48'], 'model_channels=48: GroupNorm: a layer with 144 channels does not split into 32 groups'),
])
def test_config_errors_leave_no_run_directory(data_dir, args, message):
    before = _runs(data_dir)
    proc = launch.run('train.py', ['training.desc=clutter', 'resume=none'] + args, data_dir, nproc=0, timeout=120)
    assert proc.returncode == 1
    assert message in proc.stderr, proc.stderr[-3000:]
    assert _runs(data_dir) == before
    _no_traceback(proc.stderr)

#----------------------------------------------------------------------------
# Under torchrun: one line per rank, within seconds, no traceback of ours.

def test_config_error_under_torchrun_one_line_per_rank(data_dir):
    start = time.time()
    proc = launch.run('train.py', ['training.desc=tr', 'training.dataset._target_=os.system', '+training.dataset.command="touch PWNED"'],
        data_dir, nproc=2, timeout=120)
    assert proc.returncode == 1
    lines = [l for l in proc.stderr.splitlines() if 'error:' in l and 'refusing' in l and 'traceback' not in l]
    assert sorted(l[:9] for l in lines) == ['[rank 0] ', '[rank 1] '], proc.stderr[-3000:]
    assert not re.search(r'File ".*(train|generate)\.py", line|File ".*/(training|torch_utils)/', proc.stderr), proc.stderr[-3000:]
    assert not os.path.exists(data_dir / 'PWNED')
    assert time.time() - start < 60

def test_hung_rank_gives_one_line_naming_timeout_sec(data_dir):
    # Rank 1 stops responding at its first step; rank 0 hits training.timeout_sec=3 in the gradient all-reduce.
    start = time.time()
    proc = launch.run('train.py', ['training.desc=hang', 'training.loss._target_=hang_loss.HangOnRankLoss', 'training.timeout_sec=3'],
        data_dir, nproc=2, timeout=180)
    assert proc.returncode != 0
    assert ('[rank 0] error: a collective operation timed out after training.timeout_sec=3 s: another process stopped responding '
        '(hung, killed or much slower); if a step legitimately takes longer, raise training.timeout_sec') in proc.stderr, proc.stderr[-3000:]
    assert not re.search(r'File ".*(train|generate)\.py", line|File ".*/(training|torch_utils)/', proc.stderr), proc.stderr[-3000:]
    assert time.time() - start < 120

#----------------------------------------------------------------------------
