# medEDM: snapshots load through a restricted unpickler; states and files are written atomically.

import io
import os
import pickle
import pickletools

import pytest
import torch

from torch_utils import persistence
from training import loss as loss_mod
from training import networks
from training import training_state

#----------------------------------------------------------------------------

def _tiny_net(**kwargs):
    return networks.EDMPrecond(img_resolution=8, img_channels=1, model_type='SongUNet', model_channels=8,
        channel_mult=[1], num_blocks=1, attn_resolutions=[], dropout=0.0, **kwargs)

def test_snapshot_round_trip(tmp_path):
    torch.manual_seed(0)
    net = _tiny_net().eval().requires_grad_(False)
    data = dict(ema=net, loss_fn=loss_mod.EDMLoss(P_mean=-1.0), augment_pipe=None, dataset_kwargs=dict(path='x.npz'))
    path = tmp_path / 'network-snapshot-000000.pkl'
    persistence.save_snapshot(data, path)
    rng_before = torch.get_rng_state()
    loaded = persistence.load_snapshot(path)
    assert torch.equal(torch.get_rng_state(), rng_before) # Rebuilding must not consume the caller's random stream.
    assert loaded['dataset_kwargs'] == dict(path='x.npz')
    assert loaded['loss_fn'].P_mean == -1.0 and loaded['augment_pipe'] is None
    ema = loaded['ema']
    assert not ema.training and not any(p.requires_grad for p in ema.parameters())
    for (k, a), (k2, b) in zip(net.state_dict().items(), ema.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(net(x, torch.tensor([0.5, 2.0])), ema(x, torch.tensor([0.5, 2.0])))

def test_snapshot_holds_no_foreign_globals(tmp_path):
    path = tmp_path / 's.pkl'
    persistence.save_snapshot(dict(ema=_tiny_net(), loss_fn=loss_mod.EDMLoss()), path)
    names = [arg for op, arg, _ in pickletools.genops(path.read_bytes()) if op.name in ('SHORT_BINUNICODE', 'BINUNICODE')]
    assert 'torch_utils.persistence' in names and '_reconstruct_persistent_obj' in names
    assert 'os' not in names and 'exec' not in names

class _Evil:
    def __reduce__(self):
        return (os.system, ('touch pwned',))

def test_snapshot_naming_os_system_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / 'evil.pkl'
    path.write_bytes(pickle.dumps(dict(ema=_Evil())))
    with pytest.raises(ValueError) as err:
        persistence.load_snapshot(path)
    assert 'refusing to load global posix.system' in str(err.value) or 'refusing to load global os.system' in str(err.value)
    assert str(path) in str(err.value)
    assert not (tmp_path / 'pwned').exists()

def test_snapshot_naming_foreign_project_like_class_is_refused(tmp_path):
    payload = pickle.dumps(dict(ema=None))
    # A reconstruct call naming a non-project module is refused before import.
    evil = (persistence._reconstruct_persistent_obj, ('subprocess', 'Popen', {'args': 'true'}, None))
    class Wrap:
        def __reduce__(self): return evil
    path = tmp_path / 'e.pkl'
    path.write_bytes(pickle.dumps(dict(ema=Wrap())))
    with pytest.raises(ValueError, match='refusing to load subprocess.Popen: not a class of this project'):
        persistence.load_snapshot(path)
    assert payload

def test_snapshot_damaged(tmp_path):
    path = tmp_path / 's.pkl'
    persistence.save_snapshot(dict(ema=_tiny_net()), path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match='cannot load network snapshot .*s.pkl'):
        persistence.load_snapshot(path)

def test_persistent_class_requires_plain_kwargs():
    with pytest.raises(ValueError, match='must be plain'):
        loss_mod.EDMLoss(P_mean=torch.tensor(1.0))

#----------------------------------------------------------------------------

def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / 'f.bin'
    persistence.atomic_write_bytes(path, b'old')
    def fail(f):
        f.write(b'half')
        raise OSError('disk full')
    with pytest.raises(OSError):
        persistence.atomic_write(path, fail)
    assert path.read_bytes() == b'old'
    assert os.listdir(tmp_path) == ['f.bin']

def test_leftovers_of_killed_writes_are_removed(tmp_path):
    # A write killed before os.replace leaves its temporary file; remove_stale_tmp deletes exactly those.
    names = []
    persistence.atomic_write(tmp_path / 'training-state-000008.pt', lambda f: names.append(os.path.basename(f.name)) or f.write(b'x'))
    (tmp_path / names[0]).write_bytes(b'half') # What a kill -9 between write and rename leaves.
    (tmp_path / 'notes.tmp.txt').write_bytes(b'keep')
    training_state.remove_stale_tmp(str(tmp_path)) # (It takes the run directory's lock first: .lock.)
    assert sorted(os.listdir(tmp_path)) == ['.lock', 'notes.tmp.txt', 'training-state-000008.pt']

def _state(nimg):
    return dict(cur_nimg=nimg, cur_tick=1, net={'w': torch.ones(2)}, ema={'w': torch.ones(2)}, optimizer={'state': {}, 'param_groups': []})

def test_truncated_newest_state_is_skipped_with_warning(tmp_path):
    training_state.save_state(training_state.state_path(tmp_path, 1000), _state(1000))
    training_state.save_state(training_state.state_path(tmp_path, 2000), _state(2000))
    newest = tmp_path / 'training-state-000002.pt'
    newest.write_bytes(newest.read_bytes()[:100])
    with pytest.warns(UserWarning, match='skipping damaged training state .*training-state-000002.pt'):
        found = training_state.find_latest_state(str(tmp_path))
    assert found == str(tmp_path / 'training-state-000001.pt')
    with pytest.raises(ValueError, match='cannot load training state .*training-state-000002.pt'):
        training_state.load_state(str(newest))

def test_state_with_code_is_refused(tmp_path):
    path = tmp_path / 'training-state-000003.pt'
    torch.save(dict(_state(3000), evil=_Evil()), path)
    with pytest.raises(ValueError, match='cannot load training state'):
        training_state.load_state(str(path))
    assert not (tmp_path / 'pwned').exists()

def test_run_dir_numbering(tmp_path):
    a = training_state.new_run_dir(str(tmp_path), 'x')
    b = training_state.new_run_dir(str(tmp_path), 'y')
    assert os.path.basename(a) == '00000-x' and os.path.basename(b) == '00001-y'

def test_snapshot_dataset_config_cannot_name_foreign_code(tmp_path, monkeypatch):
    # generate.py builds the condition dataset from a snapshot's dataset_kwargs: that config is untrusted data.
    monkeypatch.chdir(tmp_path)
    import torch.utils.data
    for config, message in (
        ({'_target_': 'os.system', 'command': 'touch pwned'}, "refusing 'os.system': a snapshot may name only classes of this project"),
        ({'_target_': 'training.loss.EDMLoss'}, "refusing 'training.loss.EDMLoss': not a Dataset class"),
        ({'_target_': 'training.dataset.NpzDataset', 'path': {'x': object()}}, 'must be plain'),
    ):
        with pytest.raises(ValueError, match=message):
            persistence.check_snapshot_config(config, torch.utils.data.Dataset, 'dataset_kwargs of the snapshot')
    assert not (tmp_path / 'pwned').exists()
    import generate
    with pytest.raises(ValueError, match="refusing 'os.system'"):
        generate.load_conditions(None, {'cond_dataset': None}, {'dataset_kwargs': {'_target_': 'os.system', 'command': 'touch pwned'}})
    assert not (tmp_path / 'pwned').exists()

def test_snapshot_naming_missing_project_module(tmp_path):
    class Wrap:
        def __reduce__(self):
            return (persistence._reconstruct_persistent_obj, ('training.nope', 'X', {}, None))
    path = tmp_path / 'm.pkl'
    path.write_bytes(pickle.dumps(dict(ema=Wrap())))
    with pytest.raises(ValueError, match=r"cannot load network snapshot .*m.pkl: damaged or not a medEDM snapshot \(ModuleNotFoundError"):
        persistence.load_snapshot(path)
