# medEDM: diffusion-model training toolkit for medical imaging.

"""Small helpers shared by training and sampling: the infinite data sampler,
per-step seeding, DDP helpers, a module summary, integer-list parsing,
construction of classes from `_target_` configs and time formatting."""

import contextlib
import importlib
import inspect
import re
from typing import Any, Iterator

import numpy as np
import torch

from torch_utils import distributed as dist
from torch_utils import persistence

#----------------------------------------------------------------------------
# Sampler for torch.utils.data.DataLoader that loops over the dataset
# indefinitely, shuffling items as it goes (EDM's windowed ongoing reshuffle).
# Every rank runs the same random stream and takes every num_replicas-th item,
# so the global position is the number of images drawn so far: `start_idx` =
# cur_nimg resumes the stream exactly where an interrupted run left it.

class InfiniteSampler(torch.utils.data.Sampler):
    def __init__(self,
        dataset,                # Anything with len().
        rank        = 0,        # Rank of this process.
        num_replicas = 1,       # Number of processes (world size).
        shuffle     = True,     # Shuffle the order of items?
        seed        = 0,        # Seed of the shuffle.
        window_size = 0.5,      # Fraction of the dataset over which items are swapped.
        start_idx   = 0,        # Global item index to start at (= cur_nimg when resuming).
    ):
        if len(dataset) <= 0:
            raise ValueError('InfiniteSampler: the dataset is empty')
        if not (0 <= rank < num_replicas):
            raise ValueError(f'InfiniteSampler: rank {rank} not in [0, {num_replicas})')
        if not (0 <= window_size <= 1):
            raise ValueError(f'InfiniteSampler: window_size must be in [0, 1], got {window_size}')
        super().__init__()
        self.size = len(dataset)
        self.rank = rank
        self.num_replicas = num_replicas
        self.shuffle = shuffle
        self.seed = seed
        self.window_size = window_size
        self.start_idx = int(start_idx)

    def __iter__(self) -> Iterator[int]:
        order = list(range(self.size))
        rnd = None
        window = 0
        if self.shuffle:
            rnd = np.random.RandomState(self.seed)
            perm = np.arange(self.size)
            rnd.shuffle(perm)
            order = perm.tolist()
            window = int(np.rint(self.size * self.window_size))
        swaps = window >= 2
        chunk = 65536
        idx = 0

        # Fast-forward: replay the swaps of the first start_idx items.
        while swaps and idx < self.start_idx:
            n = min(chunk, self.start_idx - idx)
            offsets = rnd.randint(window, size=n).tolist()
            size = self.size
            for k in range(n):
                i = (idx + k) % size
                j = (i - offsets[k]) % size
                order[i], order[j] = order[j], order[i]
            idx += n
        idx = self.start_idx

        # Yield this rank's items, drawing swap offsets in chunks (the same
        # stream as one randint call per item).
        offsets, pos = [], 0
        while True:
            i = idx % self.size
            if idx % self.num_replicas == self.rank:
                yield order[i]
            if swaps:
                if pos == len(offsets):
                    offsets, pos = rnd.randint(window, size=1024).tolist(), 0
                j = (i - offsets[pos]) % self.size
                pos += 1
                order[i], order[j] = order[j], order[i]
            idx += 1

#----------------------------------------------------------------------------
# Per-step seeding (EDM2 style): the random streams of a step depend only on
# (seed, rank, cur_nimg, ...), so a resumed run draws the same numbers.

def step_seed(*keys: int) -> int:
    """A 63-bit seed mixed from integer keys (stable across processes and runs)."""
    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFFFFFFFFFF for k in keys]).generate_state(2, np.uint64)[0] >> np.uint64(1))

def set_random_seed(*keys: int) -> None:
    """Seed torch (CPU and CUDA) and numpy from integer keys."""
    seed = step_seed(*keys)
    torch.manual_seed(seed)
    np.random.seed(seed % (1 << 32))

#----------------------------------------------------------------------------
# DDP helpers.

def ddp_sync(module: torch.nn.Module, sync: bool):
    """Context: gradient all-reduce on the last accumulation round only."""
    if sync or not isinstance(module, torch.nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return module.no_sync()

@torch.no_grad()
def check_ddp_consistency(module: torch.nn.Module, ignore_regex: str | None = None) -> None:
    """Raise RuntimeError if any parameter or buffer differs from rank 0's or is not finite.
    A collective: every rank must call it."""
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        fullname = type(module).__name__ + '.' + name
        if ignore_regex is not None and re.fullmatch(ignore_regex, fullname):
            continue
        tensor = tensor.detach()
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise RuntimeError(f'non-finite values in {fullname}')
        if dist.get_world_size() > 1:
            other = tensor.clone()
            torch.distributed.broadcast(tensor=other, src=0)
            if not torch.equal(tensor, other):
                raise RuntimeError(f'{fullname} differs between rank 0 and rank {dist.get_rank()}')

#----------------------------------------------------------------------------
# Print a summary of a module's children: parameters, buffers, output shapes.

def print_module_summary(module: torch.nn.Module, inputs: list, kwargs: dict | None = None, max_nesting: int = 2) -> Any:
    rows = []
    hooks = []
    def make_hook(name, depth):
        def hook(mod, _inputs, outputs):
            outs = outputs if isinstance(outputs, (tuple, list)) else [outputs]
            shapes = [str(list(o.shape)) for o in outs if isinstance(o, torch.Tensor)]
            rows.append((name, depth, mod, shapes))
        return hook
    for name, mod in module.named_modules():
        depth = 0 if name == '' else name.count('.') + 1
        if depth <= max_nesting:
            hooks.append(mod.register_forward_hook(make_hook(name or type(module).__name__, depth)))
    with torch.no_grad():
        outputs = module(*inputs, **(kwargs or {}))
    for h in hooks:
        h.remove()
    header = ('Module', 'Parameters', 'Buffers', 'Output shape')
    table = [header, ('---',) * 4]
    for name, depth, mod, shapes in sorted(rows, key=lambda r: list(module.modules()).index(r[2])):
        nparams = sum(p.numel() for p in mod.parameters(recurse=(depth == max_nesting)))
        nbufs = sum(b.numel() for b in mod.buffers(recurse=(depth == max_nesting)))
        if depth == 0:
            nparams = sum(p.numel() for p in mod.parameters())
            nbufs = sum(b.numel() for b in mod.buffers())
        table.append((name, str(nparams) if nparams else '-', str(nbufs) if nbufs else '-', shapes[0] if shapes else '-'))
    widths = [max(len(row[c]) for row in table) for c in range(4)]
    print()
    for row in table:
        print('  '.join(cell + ' ' * (w - len(cell)) for cell, w in zip(row, widths)))
    print()
    return outputs

#----------------------------------------------------------------------------
# Parse '0-63', '0,3,10-19', 5 or [0, 2, 5] into a list of ints (EDM's
# parse_int_list, with errors that say what is wrong).

MAX_INT_LIST = 10_000_000 # Longest list parse_int_list builds (a typo like 0-4294967295 would exhaust memory).

def parse_int_list(value: Any, name: str = 'value', max_count: int = MAX_INT_LIST) -> list[int]:
    """Integers of '0-63', '0,3,10-19', 5 or [0, 2, 5]; ValueError naming `name` if
    malformed or longer than `max_count` (checked before the list is built)."""
    out = []
    _parse_int_list(value, name, out, max_count)
    return out

def _parse_int_list(value: Any, name: str, out: list, max_count: int) -> None:
    def extend(items, what):
        if len(out) + len(items) > max_count:
            raise ValueError(f'{name}: {what} would make more than {max_count} integers in all; give a smaller range')
        out.extend(items)
    if isinstance(value, bool):
        raise ValueError(f'{name}: expected integers or ranges like 0-63, got {value!r}')
    if isinstance(value, int):
        extend([value], repr(value))
        return
    if isinstance(value, (list, tuple)) or (hasattr(value, '__iter__') and not isinstance(value, str)):
        for v in value:
            _parse_int_list(v, name, out, max_count)
        return
    if not isinstance(value, str) or value.strip() == '':
        raise ValueError(f'{name}: expected integers or ranges like 0-63, got {value!r}')
    for part in value.replace(' ', '').split(','):
        m = re.fullmatch(r'(\d+)-(\d+)', part)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if lo > hi:
                raise ValueError(f'{name}: bad range {part!r}: start {lo} is greater than end {hi}')
            if len(out) + (hi - lo + 1) > max_count: # Before range() is expanded.
                raise ValueError(f'{name}: the range {part!r} has {hi - lo + 1} integers, more than the limit of {max_count}; give a smaller range')
            extend(range(lo, hi + 1), repr(part))
        elif re.fullmatch(r'\d+', part):
            extend([int(part)], repr(part))
        else:
            raise ValueError(f'{name}: bad range {part!r}: expected an integer like 5 or a range like 0-63')

#----------------------------------------------------------------------------
# Build an object from a config dict with a `_target_` (the role of EDM's
# dnnlib.util.construct_class_by_name). Errors name the config key.
#
# A `_target_` slot admits only classes of its kind (a Dataset for a dataset,
# ...): the class is looked up (module import + getattr) and checked with
# issubclass before anything is called, so a config cannot run `os.system`,
# `subprocess.run` or `subprocess.Popen`.

def _is_persistent_class(cls: type) -> bool:
    return getattr(cls, '_is_persistent', False) is True

def _is_project_or_torch_class(cls: type) -> bool:
    return str(getattr(cls, '__module__', '')).split('.')[0] in persistence.PROJECT_PACKAGES + ('torch',)

TARGET_KINDS = { # kind -> (description, test of the class)
    'dataset':   ('a dataset class (a torch.utils.data.Dataset, e.g. training.dataset.NpzDataset)', lambda c: issubclass(c, torch.utils.data.Dataset)),
    'network':   ('a network class (a torch.nn.Module, e.g. training.networks.EDMPrecond)', lambda c: issubclass(c, torch.nn.Module)),
    'loss':      ('a loss class of this project (a @persistent_class, e.g. training.loss.EDMLoss)',
                  lambda c: _is_persistent_class(c) and not issubclass(c, torch.utils.data.Dataset)),
    'optimizer': ('an optimizer class (a torch.optim.Optimizer, e.g. torch.optim.Adam)', lambda c: issubclass(c, torch.optim.Optimizer)),
    'augment':   ('an augment pipe class of this project (a @persistent_class, e.g. training.augment.AugmentPipe)',
                  lambda c: _is_persistent_class(c) and not issubclass(c, (torch.utils.data.Dataset, torch.optim.Optimizer))),
    'class':     ('a class of this project or of torch', _is_project_or_torch_class),
}

SLOT_KINDS = { # config key -> kind; other keys: their last part if a kind, else 'class'.
    'training.dataset': 'dataset', 'sampling.cond_dataset': 'dataset', 'training.network': 'network',
    'training.loss': 'loss', 'training.optimizer': 'optimizer', 'training.augment': 'augment',
}

def slot_kind(key: str) -> str:
    kind = SLOT_KINDS.get(key, key.rsplit('.', 1)[-1])
    return kind if kind in TARGET_KINDS else 'class'

def get_obj_by_name(target: str, key: str = '_target_') -> Any:
    if not isinstance(target, str) or target == '':
        raise ValueError(f'{key}: expected a dotted class name, got {target!r}')
    parts = target.split('.')
    for n in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module('.'.join(parts[:n]))
        except ModuleNotFoundError as err:
            if err.name is not None and '.'.join(parts[:n]).startswith(err.name):
                continue
            raise
        try:
            for attr in parts[n:]:
                obj = getattr(obj, attr)
            return obj
        except AttributeError:
            break
    raise ValueError(f'{key}: cannot find {target!r}')

def check_target(config: Any, key: str, kind: str | None = None) -> type:
    """The class that `config['_target_']` names, if it is of the kind of slot `key`
    (see TARGET_KINDS); ValueError naming the key otherwise. Calls nothing."""
    kind = kind or slot_kind(key)
    if not isinstance(config, dict) or '_target_' not in config:
        raise ValueError(f'{key}: expected a mapping with a _target_ key, got {config!r}')
    target = config['_target_']
    cls = get_obj_by_name(target, f'{key}._target_')
    what, test = TARGET_KINDS[kind]
    if not isinstance(cls, type):
        raise ValueError(f'{key}._target_: refusing {target!r}: not a class; {key} takes {what} (nothing was run)')
    if not test(cls):
        raise ValueError(f'{key}._target_: refusing {target!r}: {key} takes {what} (nothing was run)')
    return cls

def construct_class(config: dict, key: str, kind: str | None = None, **extra_kwargs) -> Any:
    """Instantiate `config['_target_']` with the other entries of `config` plus
    `extra_kwargs`, once `check_target` has admitted the class for the slot."""
    cls = check_target(config, key, kind)
    kwargs = {k: v for k, v in config.items() if k != '_target_'}
    kwargs.update(extra_kwargs)
    try:
        sig = inspect.signature(cls)
    except (TypeError, ValueError):
        sig = None
    if sig is not None and not any(p.kind == inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        for k in kwargs:
            if k not in sig.parameters:
                raise ValueError(f'{key}.{k}: not an argument of {config["_target_"]}')
    try:
        return cls(**kwargs)
    except TypeError as err: # A **kwargs pass-through (e.g. a preconditioner's model_kwargs) met an unknown name.
        m = re.search(r"got an unexpected keyword argument '(\w+)'", str(err))
        if m and m.group(1) in kwargs:
            raise ValueError(f'{key}.{m.group(1)}: not an argument of {config["_target_"]}') from None
        raise

#----------------------------------------------------------------------------

def format_time(seconds: float) -> str:
    s = int(np.rint(seconds))
    if s < 60: return f'{s}s'
    if s < 60 * 60: return f'{s // 60}m {s % 60:02d}s'
    if s < 24 * 60 * 60: return f'{s // (60 * 60)}h {(s // 60) % 60:02d}m {s % 60:02d}s'
    return f'{s // (24 * 60 * 60)}d {(s // (60 * 60)) % 24:02d}h {(s // 60) % 60:02d}m'

#----------------------------------------------------------------------------
