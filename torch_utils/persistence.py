# medEDM: diffusion-model training toolkit for medical imaging.

"""Network snapshots that are safe to load, and atomic file writes.

NVlabs/edm pickles the source code of every module into its snapshots and
executes it on load, so a snapshot from an untrusted source can run anything.
Here a snapshot is still a pickle of a dict (EDM's layout: `ema`, `loss_fn`,
`augment_pipe`, `dataset_kwargs`), but every object in it is stored as
(module, class name, constructor kwargs, state) and rebuilt with the code of
this project. Loading goes through `RestrictedUnpickler`, which admits only
classes of this project's packages, plain containers and torch's tensor
rebuilders; anything else (`os.system`, `builtins.eval`, ...) is refused before
it is called.
"""

import copy
import errno
import importlib
import inspect
import io
import os
import pickle
from typing import Any, Callable

import torch

#----------------------------------------------------------------------------
# Packages whose classes a snapshot may name.

PROJECT_PACKAGES = ('training', 'torch_utils', 'tomography_utils')

def _is_project_module(module: str) -> bool:
    return module.split('.')[0] in PROJECT_PACKAGES

#----------------------------------------------------------------------------
# Atomic writes: temporary file in the same folder, fsync, os.replace.

def atomic_write(path: str | os.PathLike, write_fn: Callable[[io.BufferedWriter], None]) -> None:
    """Write a file so that readers see either the old or the complete new file."""
    path = os.fspath(path)
    tmp = f'{path}.tmp{os.getpid()}{int.from_bytes(os.urandom(4), "little"):010d}' # Random digits: hosts sharing a folder may share pids.
    try:
        with open(tmp, 'wb') as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT): # Disk full: the old file is untouched, the partial one is removed below.
            raise OSError(err.errno, f'{os.strerror(err.errno)} while writing {path}; nothing was damaged (the previous '
                f'version of the file, if any, is intact and the partial file was removed): free some space and run again') from None
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    try: # Make the rename itself durable.
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try: os.fsync(fd)
        finally: os.close(fd)
    except OSError:
        pass

def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))

def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))

#----------------------------------------------------------------------------
# Decorator: record constructor kwargs so an object can be rebuilt from
# (class, kwargs, state) instead of from pickled code.

_PLAIN_TYPES = (type(None), bool, int, float, str)

def _check_plain(value: Any, where: str) -> None:
    if isinstance(value, _PLAIN_TYPES):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f'{where}[{i}]')
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f'{where}: dict keys must be strings, got {k!r}')
            _check_plain(v, f'{where}.{k}')
        return
    raise ValueError(f'{where}: constructor arguments of persistent classes must be plain '
        f'numbers, strings, lists or dicts, got {type(value).__name__}')

def persistent_class(cls: type) -> type:
    """Class decorator: instances pickle as (class, init kwargs, state) and are
    rebuilt by `RestrictedUnpickler` with the current code of this project.

    For `torch.nn.Module`s the state is the `state_dict()` plus the train/eval
    mode and the requires_grad flags; for other objects it is nothing (they must
    be fully defined by their constructor arguments).
    """
    if not _is_project_module(cls.__module__):
        raise ValueError(f'persistent_class: {cls.__module__}.{cls.__qualname__} is not in a project package {PROJECT_PACKAGES}')
    signature = inspect.signature(cls.__init__)
    orig_init = cls.__init__

    def __init__(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        init_kwargs = dict(bound.arguments)
        init_kwargs.pop('self')
        for name, param in signature.parameters.items(): # Flatten **kwargs into the dict.
            if param.kind == inspect.Parameter.VAR_KEYWORD and name in init_kwargs:
                init_kwargs.update(init_kwargs.pop(name))
            elif param.kind == inspect.Parameter.VAR_POSITIONAL and name in init_kwargs:
                raise ValueError(f'{cls.__qualname__}: persistent classes take keyword arguments only')
        _check_plain(init_kwargs, f'{cls.__qualname__}')
        orig_init(self, *args, **kwargs)
        self.init_kwargs = copy.deepcopy(init_kwargs)

    def __reduce__(self):
        state = None
        if isinstance(self, torch.nn.Module):
            buf = io.BytesIO()
            torch.save({k: v.detach().cpu() for k, v in self.state_dict().items()}, buf)
            state = dict(
                state_dict = buf.getvalue(),
                training   = [m.training for m in self.modules()],
                no_grad    = [name for name, p in self.named_parameters() if not p.requires_grad],
            )
        return (_reconstruct_persistent_obj, (cls.__module__, cls.__qualname__, self.init_kwargs, state))

    cls.__init__ = __init__
    cls.__reduce__ = __reduce__
    cls._is_persistent = True
    return cls

def is_persistent(obj: Any) -> bool:
    return getattr(type(obj), '_is_persistent', False)

def _resolve_project_class(module: str, qualname: str) -> type:
    if not _is_project_module(module):
        raise pickle.UnpicklingError(f'refusing to load {module}.{qualname}: not a class of this project')
    obj = importlib.import_module(module)
    for part in qualname.split('.'):
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and getattr(obj, '_is_persistent', False)):
        raise pickle.UnpicklingError(f'refusing to load {module}.{qualname}: not a persistent class')
    return obj

def _reconstruct_persistent_obj(module: str, qualname: str, init_kwargs: dict, state: dict | None) -> Any:
    """Rebuild a persistent object. A module is first built on the meta device (no
    memory) and its parameter and buffer shapes compared with the tensors the snapshot
    carries, so a small file cannot make the loader allocate a huge network; then it
    is built for real and loaded strictly: missing, extra or mis-shaped weights are refused."""
    cls = _resolve_project_class(module, qualname)
    name = f'{module}.{qualname}'
    if not isinstance(init_kwargs, dict) or not all(isinstance(k, str) for k in init_kwargs):
        raise ValueError(f'{name}: constructor arguments must be a dict of keyword arguments')
    _check_plain(init_kwargs, name)
    is_module = issubclass(cls, torch.nn.Module)
    if not is_module:
        if state is not None:
            raise ValueError(f'{name}: carries weights, but it is not a module')
        with torch.random.fork_rng(devices=[]):
            return cls(**init_kwargs)
    if not isinstance(state, dict) or not isinstance(state.get('state_dict'), bytes):
        raise ValueError(f'{name}: the snapshot carries no weights for this network (refusing to use random weights)')
    sd = torch.load(io.BytesIO(state['state_dict']), map_location='cpu', weights_only=True)
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise ValueError(f'{name}: the weights are not a state_dict of tensors')
    _check_stored(name, sd)
    training, no_grad = state.get('training'), state.get('no_grad')
    if not isinstance(training, list):
        raise ValueError(f'{name}: damaged train/eval flags')
    with torch.random.fork_rng(devices=[]), torch.device('meta'), _module_limit(name, len(training)):
        meta = cls(**init_kwargs)
    expected = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    num_modules = len(list(meta.modules()))
    del meta
    _compare_weights(name, expected, {k: tuple(v.shape) for k, v in sd.items()})
    if not (len(training) == num_modules and all(isinstance(t, bool) for t in training)):
        raise ValueError(f'{name}: the train/eval flags do not match the network ({num_modules} modules)')
    if not (isinstance(no_grad, list) and all(isinstance(n, str) for n in no_grad)):
        raise ValueError(f'{name}: damaged requires_grad flags')
    with torch.random.fork_rng(devices=[]): # Weight init must not disturb the caller's random stream.
        obj = cls(**init_kwargs)
    obj.load_state_dict(sd, strict=True)
    for m, flag in zip(obj.modules(), training):
        m.training = flag
    no_grad = set(no_grad)
    for pname, p in obj.named_parameters():
        p.requires_grad_(pname not in no_grad)
    return obj

def _check_stored(name: str, sd: dict) -> None:
    # The shapes compared on the meta device must be backed by bytes the file carries:
    # a stride-0 view (zeros(1).expand(...)) or many tensors on one storage would let a
    # tiny file pass the shape check and then make the loader allocate the real network.
    # The same view under two names (tied weights) is one tensor.
    views = {(v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.stride(), v.dtype): v for v in sd.values()} # Tied weights count once.
    claimed = sum(v.numel() * v.element_size() for v in views.values())
    storages = {v.untyped_storage().data_ptr(): v.untyped_storage().nbytes() for v in sd.values() if v.numel()}
    stored = sum(storages.values())
    if claimed > stored:
        raise ValueError(f'{name}: the weights claim {claimed} bytes, but the snapshot stores only {stored} '
            f'(tensors that repeat or share storage are refused before allocating the network)')

class _module_limit:
    """Abort building a network (on the meta device) once it registers more submodules than
    the snapshot's train/eval flags describe: the file's size bounds the construction's cost."""
    def __init__(self, name: str, num_modules: int):
        self.name, self.limit, self.count = name, num_modules, 1 # The root module has a flag too.
    def _hook(self, _module, _name, submodule):
        if submodule is not None:
            self.count += 1
            if self.count > 2 * self.limit + 16: # Re-assigned attributes register twice.
                raise ValueError(f'{self.name}: the network its arguments describe has more modules than the '
                    f'{self.limit} the snapshot carries flags for (refused before building it)')
    def __enter__(self):
        self.handle = torch.nn.modules.module.register_module_module_registration_hook(self._hook)
        return self
    def __exit__(self, *exc):
        self.handle.remove()

def _compare_weights(name: str, expected: dict, found: dict) -> None:
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected]
    if missing or extra:
        parts = ([f'{len(missing)} missing (e.g. {missing[0]})'] if missing else []) + ([f'{len(extra)} unexpected (e.g. {extra[0]})'] if extra else [])
        raise ValueError(f'{name}: the weights do not match the network its arguments describe: {", ".join(parts)}')
    for k, shape in expected.items():
        if found[k] != shape:
            raise ValueError(f'{name}: weight {k} has shape {list(found[k])} in the snapshot, but the network its arguments '
                f'describe needs {list(shape)} (refused before allocating it)')

#----------------------------------------------------------------------------
# A `_target_` config that came from a snapshot (e.g. its dataset_kwargs) is
# untrusted data: it may name only a class of this project deriving from
# `base`, with plain arguments, before anything is imported or called.

def check_snapshot_config(config: dict, base: type, where: str) -> dict:
    target = config.get('_target_') if isinstance(config, dict) else None
    if not isinstance(target, str) or not _is_project_module(target):
        raise ValueError(f'{where}: refusing {target!r}: a snapshot may name only classes of this project')
    _check_plain({k: v for k, v in config.items() if k != '_target_'}, where)
    module, _, name = target.rpartition('.')
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise ValueError(f'{where}: cannot find {target!r}') from None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ValueError(f'{where}: refusing {target!r}: not a {base.__name__} class')
    return config

#----------------------------------------------------------------------------
# Restricted unpickler.

def _load_storage_from_bytes(b: bytes) -> Any:
    # torch.storage._load_from_bytes uses a full (code-executing) torch.load.
    return torch.load(io.BytesIO(b), map_location='cpu', weights_only=True)

_ALLOWED_GLOBALS = {
    ('torch_utils.persistence', '_reconstruct_persistent_obj'): _reconstruct_persistent_obj,
    ('torch._utils', '_rebuild_tensor_v2'): torch._utils._rebuild_tensor_v2,
    ('torch._utils', '_rebuild_parameter'): torch._utils._rebuild_parameter,
    ('torch.storage', '_load_from_bytes'): _load_storage_from_bytes,
    ('collections', 'OrderedDict'): __import__('collections').OrderedDict,
    ('builtins', 'set'): set,
    ('builtins', 'frozenset'): frozenset,
    ('builtins', 'slice'): slice,
    ('builtins', 'complex'): complex,
}

class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that admits only this project's persistent classes, plain
    containers and torch's tensor rebuilders."""
    def find_class(self, module: str, name: str) -> Any:
        fn = _ALLOWED_GLOBALS.get((module, name))
        if fn is None:
            raise pickle.UnpicklingError(f'refusing to load global {module}.{name}: a snapshot may name only '
                f'classes of this project and torch tensor rebuilders (nothing was executed)')
        return fn

def unpickle_snapshot(path: str | os.PathLike, unpickler_cls: type, what: str = 'load network snapshot',
        kind: str = 'medEDM snapshot') -> dict:
    """Unpickle a snapshot dict with `unpickler_cls`; every failure becomes a
    ValueError `cannot <what> <path>: ...` naming the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'network snapshot not found: {path}')
    try:
        with open(path, 'rb') as f:
            data = unpickler_cls(f).load()
    except (pickle.UnpicklingError, ValueError) as err:
        raise ValueError(f'cannot {what} {path}: {err}') from None
    except Exception as err: # Truncated, foreign or hostile data: never a traceback.
        raise ValueError(f'cannot {what} {path}: damaged or not a {kind} ({type(err).__name__}: {err})') from None
    if not isinstance(data, dict) or 'ema' not in data:
        raise ValueError(f'cannot {what} {path}: expected a dict with key "ema"')
    return data

def load_snapshot(path: str | os.PathLike) -> dict:
    """Load a network snapshot (`network-snapshot-*.pkl`) safely.

    Raises ValueError naming the file if it is damaged or names anything but
    this project's classes."""
    return unpickle_snapshot(path, RestrictedUnpickler)

def save_snapshot(data: dict, path: str | os.PathLike) -> None:
    """Pickle a snapshot dict atomically. Module values, and the modules of a
    dict value (the frozen networks of earlier stages, `frozen: {name: net}`),
    must be persistent classes."""
    for key, value in data.items():
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for name, obj in items:
            if isinstance(obj, torch.nn.Module) and not is_persistent(obj):
                raise ValueError(f'snapshot key "{key}{"." + name if name else ""}": {type(obj).__name__} is not a @persistent_class')
    atomic_write(path, lambda f: pickle.dump(data, f, protocol=pickle.HIGHEST_PROTOCOL))

#----------------------------------------------------------------------------
