# medEDM: diffusion-model training toolkit for medical imaging.

"""Import NVlabs/edm network snapshots (`network-snapshot-*.pkl`) into this
project's weight-compatible networks. TRUSTED FILES ONLY.

EDM pickles every object of its `@persistent_class`es as a call
`torch_utils.persistence._reconstruct_persistent_obj(meta)` with
    meta = dict(type='class', version=..., module_src=<source of the defining module>,
                class_name=..., state=<the object's __dict__>)
and its loader executes `module_src` to rebuild the class. The format is thus
designed to run code, which is why generate.py reads it only with the opt-in
`sampling.trust_edm_pickle=true`. This importer does NOT execute `module_src`:
its unpickler maps EDM's reconstruct function to `_reconstruct`, which builds
the medEDM class of the same name (EDMPrecond, VPPrecond, VEPrecond) from the
constructor arguments kept in the state (`_init_kwargs`, EDM's spelling, or
`init_kwargs`) and copies the tensors found in the state's `_parameters`,
`_buffers` and `_modules` (recursively) into it, with a strict key and shape
check. Every other global the pickle names must be one of torch's tensor
rebuilders, plain containers, torch.nn.ModuleDict (its state only, see
EDMModuleDict), numpy scalars/arrays or `dnnlib.util.EasyDict`;
anything else is refused before it is called. Loss and augmentation objects of
the snapshot are not rebuilt (they come back as None).

The same unpickler also accepts this project's own snapshots (their reconstruct
call has four arguments instead of one meta dict) and then behaves exactly like
`torch_utils.persistence.load_snapshot`.
"""

import collections
import os
import pickle
from typing import Any

import numpy as np
import torch

from torch_utils import persistence
from training import networks

#----------------------------------------------------------------------------
# EDM classes that have a weight-compatible medEDM counterpart.

EDM_PRECONDS = {
    'EDMPrecond':   networks.EDMPrecond,
    'VPPrecond':    networks.VPPrecond,
    'VEPrecond':    networks.VEPrecond,
}

#----------------------------------------------------------------------------
# Stand-in for EDM objects that are not rebuilt: a submodule (its tensors are
# read by the enclosing precond), a loss or an augment pipe.

class EDMObject:
    def __init__(self, class_name: str, state: dict):
        self.class_name = class_name
        self.state = state

    def __repr__(self) -> str:
        return f'EDMObject({self.class_name})'

# torch.nn.ModuleDict, the one torch container in EDM's networks (SongUNet's and
# DhariwalUNet's `enc` / `dec`). It is not a persistent class, so the pickle
# names torch's class and restores the module's __dict__ (its `_modules` hold
# the persistent blocks); here that state is only recorded, nothing of torch
# runs.

class EDMModuleDict(EDMObject):
    def __setstate__(self, state: dict) -> None:
        self.class_name, self.state = 'ModuleDict', state

# dnnlib.util.EasyDict (EDM's dataset_kwargs and init_kwargs), read as a dict.

class EasyDict(dict):
    pass

#----------------------------------------------------------------------------
# Plain Python values from EDM's constructor arguments (EasyDict, numpy scalars).

def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value

#----------------------------------------------------------------------------
# Collect the tensors of an EDM module tree into a state_dict with dotted
# keys, as torch's Module.state_dict() would (non-persistent buffers skipped).

def _collect_tensors(state: dict, prefix: str, out: dict) -> None:
    for name, p in (state.get('_parameters') or {}).items():
        if p is not None:
            out[prefix + name] = p.detach() if isinstance(p, torch.Tensor) else p
    skip = set(state.get('_non_persistent_buffers_set') or ())
    for name, b in (state.get('_buffers') or {}).items():
        if b is not None and name not in skip:
            out[prefix + name] = b
    for name, child in (state.get('_modules') or {}).items():
        if child is None:
            continue
        if not isinstance(child, EDMObject):
            raise ValueError(f'submodule {prefix + name} is {type(child).__name__}, not an EDM persistent object')
        _collect_tensors(child.state, f'{prefix}{name}.', out)

#----------------------------------------------------------------------------
# Build the medEDM precond of an EDM meta dict and load its weights.

def _build_precond(class_name: str, state: dict) -> torch.nn.Module:
    args = state.get('_init_args', state.get('init_args')) or ()
    kwargs = state.get('_init_kwargs', state.get('init_kwargs'))
    if args:
        raise ValueError(f'{class_name}: positional constructor arguments are not supported')
    if not isinstance(kwargs, dict):
        raise ValueError(f'{class_name}: the snapshot does not record its constructor arguments (_init_kwargs)')
    kwargs = _plain(kwargs)
    try:
        with torch.random.fork_rng(devices=[]): # Weight init must not disturb the caller's random stream.
            net = EDM_PRECONDS[class_name](**kwargs)
    except TypeError as err:
        raise ValueError(f'{class_name}: cannot build the medEDM network from the snapshot arguments {sorted(kwargs)}: {err}') from None

    # Copy the weights, strictly.
    sd = {}
    _collect_tensors(state, '', sd)
    ours = net.state_dict()
    missing = sorted(set(ours) - set(sd))
    unexpected = sorted(set(sd) - set(ours))
    if missing or unexpected:
        raise ValueError(f'{class_name}: weights do not match the medEDM network: missing {missing[:5]}'
            f'{" ..." if len(missing) > 5 else ""}, unexpected {unexpected[:5]}{" ..." if len(unexpected) > 5 else ""}')
    for key, value in sd.items():
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(ours[key].shape):
            raise ValueError(f'{class_name}: tensor {key} has shape {tuple(getattr(value, "shape", ()))}, '
                f'the medEDM network expects {tuple(ours[key].shape)}')
    net.load_state_dict(sd, strict=True)
    return net.eval().requires_grad_(False)

#----------------------------------------------------------------------------
# Replacement of EDM's _reconstruct_persistent_obj: never executes module_src.

def _reconstruct(*args) -> Any:
    if len(args) != 1 or not isinstance(args[0], dict) or 'module_src' not in args[0]:
        return persistence._reconstruct_persistent_obj(*args) # A medEDM snapshot.
    meta = args[0]
    if meta.get('type') != 'class':
        raise pickle.UnpicklingError(f'unsupported EDM persistent object type {meta.get("type")!r}')
    class_name, state = meta.get('class_name'), meta.get('state')
    if not isinstance(state, dict):
        raise pickle.UnpicklingError(f'EDM object {class_name!r} has no state dict')
    if class_name in EDM_PRECONDS:
        return _build_precond(class_name, state)
    return EDMObject(str(class_name), state)

#----------------------------------------------------------------------------
# Globals an EDM snapshot may name: the reconstruct call, EasyDict, ModuleDict
# (recorded, not built), torch's tensor rebuilders, plain containers, numpy
# scalars and arrays (attributes such as np.sqrt(0.5)) and torch dtypes;
# nothing that runs code.

def _numpy_globals() -> dict:
    from numpy._core import multiarray
    out = {('numpy', 'dtype'): np.dtype, ('numpy', 'ndarray'): np.ndarray}
    for mod in ('numpy.core.multiarray', 'numpy._core.multiarray'): # Pickles of numpy 1.x and 2.x.
        out[(mod, 'scalar')] = multiarray.scalar
        out[(mod, '_reconstruct')] = multiarray._reconstruct
    return out

_ALLOWED = {
    ('torch_utils.persistence', '_reconstruct_persistent_obj'): _reconstruct,
    ('torch.nn.modules.container', 'ModuleDict'): EDMModuleDict,
    ('dnnlib.util', 'EasyDict'): EasyDict,
    ('dnnlib', 'EasyDict'): EasyDict,
    ('torch._utils', '_rebuild_tensor_v2'): torch._utils._rebuild_tensor_v2,
    ('torch._utils', '_rebuild_parameter'): torch._utils._rebuild_parameter,
    ('torch.storage', '_load_from_bytes'): persistence._load_storage_from_bytes,
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('builtins', 'set'): set,
    ('builtins', 'frozenset'): frozenset,
    ('builtins', 'slice'): slice,
    ('builtins', 'complex'): complex,
}

_ALLOWED.update(_numpy_globals())

#----------------------------------------------------------------------------
# Unpickler for EDM snapshots: allow-listed globals only.

class EDMUnpickler(pickle.Unpickler):
    """Reads NVlabs/edm (and medEDM) snapshots without executing their code."""
    def find_class(self, module: str, name: str) -> Any:
        fn = _ALLOWED.get((module, name))
        if fn is None and module == 'torch' and isinstance(getattr(torch, name, None), torch.dtype):
            fn = getattr(torch, name)
        if fn is None:
            raise pickle.UnpicklingError(f'refusing to load global {module}.{name} from an EDM snapshot '
                f'(only networks, tensors and plain containers are read; nothing was executed)')
        return fn

#----------------------------------------------------------------------------
# Cheap test (no unpickling) for EDM's layout: the reconstruct call and a
# meta dict with module_src appear near the start of the file.

def looks_like_edm_pickle(path: str | os.PathLike) -> bool:
    try:
        with open(path, 'rb') as f:
            head = f.read(1 << 20)
    except OSError:
        return False
    return b'_reconstruct_persistent_obj' in head and b'module_src' in head

#----------------------------------------------------------------------------
# Load an NVlabs/edm snapshot (or a medEDM one) into medEDM objects.

def load_snapshot(path: str | os.PathLike) -> dict:
    """Read `network-snapshot-*.pkl` of NVlabs/edm: a dict whose `ema` is a
    medEDM EDMPrecond / VPPrecond / VEPrecond with EDM's weights, `dataset_kwargs`
    a plain dict, `loss_fn` and `augment_pipe` None. Trusted files only (see
    the module docstring). Raises ValueError naming the file."""
    path = os.fspath(path)
    data = persistence.unpickle_snapshot(path, EDMUnpickler, what='import EDM snapshot', kind='network snapshot')
    if isinstance(data['ema'], EDMObject):
        raise ValueError(f'cannot import EDM snapshot {path}: its network class {data["ema"].class_name!r} has no medEDM '
            f'counterpart (supported: {", ".join(EDM_PRECONDS)})')
    out = {}
    for key, value in data.items():
        if isinstance(value, EDMObject):
            value = None # Loss / augment pipe: not rebuilt.
        elif isinstance(value, dict):
            value = _plain(value)
        out[key] = value
    return out

#----------------------------------------------------------------------------
