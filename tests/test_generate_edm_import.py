# medEDM: importing NVlabs/edm network snapshots (training/edm_import.py) and
# sampling from them with generate.py (sampling.trust_edm_pickle=true).
#
# NVlabs code cannot be used here, so the test writes pickles in EDM's layout
# from this project's networks: every module (and the persistent loss) is
# reduced, as EDM's @persistent_class.__reduce__ does, to
#     torch_utils.persistence._reconstruct_persistent_obj(meta)
#     meta = dict(type='class', version=6, module_src=<module source text>,
#                 class_name=<class name>, state=<the object's __dict__ with
#                 _init_args / _init_kwargs, _modules, _parameters, _buffers, ...>)
# with `module_src` shared (pickle memo) per module, and dataset_kwargs a
# dnnlib.util.EasyDict. The module source carries a payload that would create
# a file if it were ever executed.

import inspect
import io
import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch

import launch
from torch_utils import persistence
from training import edm_import
from training import loss as loss_mod
from training import networks

#----------------------------------------------------------------------------
# Emulation of EDM's persistent pickling.

@pytest.fixture(scope='module')
def easydict():
    dnnlib, util = types.ModuleType('dnnlib'), types.ModuleType('dnnlib.util')
    class EasyDict(dict):
        pass
    EasyDict.__module__, EasyDict.__qualname__ = 'dnnlib.util', 'EasyDict'
    util.EasyDict, dnnlib.util = EasyDict, util
    saved = {k: sys.modules.get(k) for k in ('dnnlib', 'dnnlib.util')}
    sys.modules.update({'dnnlib': dnnlib, 'dnnlib.util': util})
    yield EasyDict
    for k, v in saved.items():
        if v is None: sys.modules.pop(k, None)
        else: sys.modules[k] = v

class EDMLayoutPickler(pickle.Pickler):
    def __init__(self, f, easydict, marker, init_key='_init_kwargs', class_names={}):
        super().__init__(f, protocol=pickle.HIGHEST_PROTOCOL)
        self.easydict, self.init_key, self.class_names = easydict, init_key, class_names
        self.sources = {} # One string per module, as EDM's class attribute _orig_module_src.
        self.payload = f'open({str(marker)!r}, "w").write("module_src was executed")\n'

    def reducer_override(self, obj):
        # As in EDM, only the project's classes are persistent: torch's own modules (the UNets'
        # ModuleDicts) are pickled by torch's default reduction, naming torch's class.
        if type(obj).__module__.startswith('torch.') or not (isinstance(obj, torch.nn.Module) or persistence.is_persistent(obj)):
            return NotImplemented
        module = type(obj).__module__
        if module not in self.sources:
            self.sources[module] = self.payload + inspect.getsource(sys.modules[module])
        state = dict(obj.__dict__)
        init_kwargs = state.pop('init_kwargs', {})
        state['_init_args' if self.init_key.startswith('_') else 'init_args'] = ()
        state[self.init_key] = self.easydict(init_kwargs)
        class_name = self.class_names.get(type(obj).__name__, type(obj).__name__)
        meta = dict(type='class', version=6, module_src=self.sources[module], class_name=class_name, state=state)
        return (persistence._reconstruct_persistent_obj, (meta,))

def write_edm_pickle(path, net, easydict, marker, **kwargs):
    data = dict(ema=net, loss_fn=loss_mod.EDMLoss(), augment_pipe=None,
        dataset_kwargs=easydict(class_name='training.dataset.ImageFolderDataset', path='datasets/cifar10-32x32.zip', use_labels=False, xflip=False, cache=True))
    with open(path, 'wb') as f:
        EDMLayoutPickler(f, easydict, marker, **kwargs).dump(data)

SMALL = dict(img_resolution=16, model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0.0)

def _nets():
    torch.manual_seed(3)
    return {
        'edm-songunet': networks.EDMPrecond(img_channels=1, model_type='SongUNet', **SMALL),
        'vp-ncsnpp-labels': networks.VPPrecond(img_channels=2, label_dim=3, model_type='SongUNet', embedding_type='fourier',
            channel_mult_noise=2, encoder_type='residual', resample_filter=[1, 3, 3, 1], **SMALL),
        've-adm': networks.VEPrecond(img_channels=1, model_type='DhariwalUNet', **SMALL),
    }

#----------------------------------------------------------------------------

@pytest.mark.parametrize('init_key', ['_init_kwargs', 'init_kwargs'])
def test_import_gives_the_same_networks(tmp_path, easydict, init_key):
    marker = tmp_path / 'pwned'
    for name, net in _nets().items():
        net.eval().requires_grad_(False)
        path = tmp_path / f'{name}.pkl'
        write_edm_pickle(path, net, easydict, marker, init_key=init_key)
        assert edm_import.looks_like_edm_pickle(path) and b'torch.nn.modules.container\x94\x8c\nModuleDict' in path.read_bytes()
        data = edm_import.load_snapshot(path)
        imported = data['ema']
        assert type(imported) is type(net) and imported.init_kwargs == net.init_kwargs
        assert not imported.training and not any(p.requires_grad for p in imported.parameters())
        sd_a, sd_b = net.state_dict(), imported.state_dict()
        assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
        x = torch.randn([2, net.img_channels, 16, 16])
        labels = torch.eye(3)[[0, 2]] if net.label_dim else None
        assert torch.equal(imported(x, 1.3, class_labels=labels), net(x, 1.3, class_labels=labels))
        assert data['loss_fn'] is None and data['augment_pipe'] is None
        assert data['dataset_kwargs'] == dict(class_name='training.dataset.ImageFolderDataset', path='datasets/cifar10-32x32.zip',
            use_labels=False, xflip=False, cache=True) and type(data['dataset_kwargs']) is dict
    assert not marker.exists() # module_src was never executed.

def test_import_refuses_what_it_cannot_map(tmp_path, easydict):
    marker = tmp_path / 'pwned'
    net = _nets()['edm-songunet']
    # An EDM class without a medEDM counterpart.
    write_edm_pickle(tmp_path / 'iddpm.pkl', net, easydict, marker, class_names={'EDMPrecond': 'iDDPMPrecond'})
    with pytest.raises(ValueError, match="network class 'iDDPMPrecond' has no medEDM counterpart"):
        edm_import.load_snapshot(tmp_path / 'iddpm.pkl')
    # Weights that do not fit the network the arguments describe.
    class Drop(EDMLayoutPickler):
        def reducer_override(self, obj):
            out = super().reducer_override(obj)
            if out is not NotImplemented and out[1][0]['class_name'] == 'EDMPrecond':
                out[1][0]['state']['_init_kwargs']['model_channels'] = 8
            return out
    with open(tmp_path / 'mismatch.pkl', 'wb') as f:
        Drop(f, easydict, marker).dump(dict(ema=net))
    with pytest.raises(ValueError, match=r'tensor model\.\S+ has shape .*, the medEDM network expects'):
        edm_import.load_snapshot(tmp_path / 'mismatch.pkl')
    # Any other global, e.g. a command, is refused before it is called.
    class Evil:
        def __reduce__(self):
            return (os.system, (f'touch {marker}',))
    (tmp_path / 'evil.pkl').write_bytes(pickle.dumps(dict(ema=Evil())))
    with pytest.raises(ValueError, match='refusing to load global (posix|os).system'):
        edm_import.load_snapshot(tmp_path / 'evil.pkl')
    assert not marker.exists()

def test_native_snapshots_load_through_the_importer(tmp_path):
    net = _nets()['edm-songunet']
    persistence.save_snapshot(dict(ema=net, loss_fn=loss_mod.EDMLoss(), augment_pipe=None, dataset_kwargs={}), tmp_path / 'native.pkl')
    assert not edm_import.looks_like_edm_pickle(tmp_path / 'native.pkl')
    data = edm_import.load_snapshot(tmp_path / 'native.pkl')
    assert torch.equal(data['ema'].state_dict()['model.map_layer0.weight'], net.state_dict()['model.map_layer0.weight'])
    assert isinstance(data['loss_fn'], loss_mod.EDMLoss)

#----------------------------------------------------------------------------
# generate.py: the same samples from the EDM pickle as from the native snapshot.

def test_generate_from_edm_snapshot(tmp_path, easydict):
    marker = tmp_path / 'pwned'
    net = _nets()['vp-ncsnpp-labels'].eval().requires_grad_(False)
    persistence.save_snapshot(dict(ema=net, loss_fn=loss_mod.EDMLoss(), augment_pipe=None, dataset_kwargs={}), tmp_path / 'native.pkl')
    write_edm_pickle(tmp_path / 'network-snapshot-200000.pkl', net, easydict, marker)
    args = ['sampling.seeds=0-2', 'sampling.format=npz', 'sampling.solver=dpmpp_3m', 'sampling.num_steps=5', 'sampling.class_idx=1']
    launch.check(launch.run('generate.py', ['sampling.network_pkl=native.pkl', 'sampling.outdir=native', *args], tmp_path, nproc=0))
    launch.check(launch.run('generate.py', ['sampling.network_pkl=network-snapshot-200000.pkl', 'sampling.outdir=edm',
        'sampling.trust_edm_pickle=true', *args], tmp_path, nproc=0))
    native, edm = np.load(tmp_path / 'native' / 'images.npz'), np.load(tmp_path / 'edm' / 'images.npz')
    assert native['images'].shape == (3, 2, 16, 16)
    assert np.array_equal(native['images'], edm['images'])

    # Without the opt-in flag: refused with a pointer to it, nothing written or executed.
    proc = launch.run('generate.py', ['sampling.network_pkl=network-snapshot-200000.pkl', 'sampling.outdir=refused', *args], tmp_path, nproc=0)
    assert proc.returncode == 1
    assert 'is an NVlabs/edm snapshot' in proc.stderr and 'sampling.trust_edm_pickle=true' in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / 'refused').exists()
    assert not marker.exists()

#----------------------------------------------------------------------------
