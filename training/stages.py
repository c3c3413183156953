# medEDM: diffusion-model training toolkit for medical imaging.

"""Stage pipelines: a later stage builds on the snapshots of earlier ones.

A family may train in several stages (DiffMIC: DCG classifier -> label
diffusion; LDM: autoencoder -> latent EDM). Every stage trains in the one
training loop; a later stage names earlier snapshots in its config:

    training.frozen:    {autoencoder: runs/00003-ae/network-snapshot-000200.pkl}
    training.init_from: runs/00004-pre/network-snapshot-000100.pkl
    training.init_from: {path: ..., module: model.enc, source: model.enc, strict: true}

Frozen networks (the `ema` of each named snapshot) are loaded through the
restricted unpickler, in eval mode and without gradients, and kept out of the
optimizer, DDP, EMA and every all-reduce. The loop hands them, as a dict
{name: module}, to the loss object (`loss_fn(net, batch, augment_pipe,
frozen=...)`) and to the dataset's `device_transform` where that takes a
`frozen` argument, and embeds them in the stage's snapshot (key `frozen`),
so one file serves generate.py and evaluate.py.

Frozen networks are never constructor arguments of a loss object (persistent
classes take plain arguments only): the loss receives them at call time. A
loss object's own parameters with requires_grad=False are frozen as well:
outside the optimizer and the gradient all-reduce.

Optional methods of a loss object that the engine calls:
    network_interface(interface_kwargs, frozen) -> dict   the network's img_resolution / img_channels / ...
                                                          (e.g. the latent shape of the frozen encoder)
    grid(net, batch, frozen) -> images or None            the snapshot's picture instead of the sampler's
                                                          (reconstructions of an autoencoder; None = none)
    decode(x, frozen) -> images                           generated samples -> images (latent models)
"""

import hashlib
import inspect
import os
import re

import torch

from torch_utils import persistence

#----------------------------------------------------------------------------
# Frozen networks of earlier stages.

_NAME_RE = re.compile(r'[A-Za-z_][A-Za-z0-9_]*')

def load_frozen(frozen: dict | None, key: str = 'training.frozen') -> dict[str, torch.nn.Module]:
    """Load {name: snapshot path} -> {name: the snapshot's `ema`, eval mode, no gradients, on the CPU}."""
    if frozen is None:
        return {}
    if not isinstance(frozen, dict):
        raise ValueError(f'{key}: expected a mapping {{name: network-snapshot-*.pkl}}, got {frozen!r}')
    nets = {}
    for name, path in frozen.items():
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise ValueError(f'{key}: {name!r} is not a valid name (letters, digits, underscores)')
        if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
            raise ValueError(f'{key}.{name}: snapshot not found: {path}')
        data = persistence.load_snapshot(path)
        net = data['ema']
        if not isinstance(net, torch.nn.Module):
            raise ValueError(f'{key}.{name}: "ema" of {path} is not a network')
        nets[name] = freeze(net)
    return nets

def freeze(net: torch.nn.Module) -> torch.nn.Module:
    """Eval mode, no gradients (in place)."""
    return net.eval().requires_grad_(False)

def takes_frozen(fn) -> bool:
    """Does the callable (a loss object, a device transform) name a `frozen` argument?"""
    if isinstance(fn, torch.nn.Module) and type(fn).__call__ is torch.nn.Module.__call__:
        fn = fn.forward # A module loss that defines forward().
    try:
        return 'frozen' in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False

def fingerprint(frozen: dict[str, torch.nn.Module]) -> dict[str, str]:
    """{name: SHA-256 of the network's state_dict (names, dtypes, shapes, bytes)}: kept in
    the training state, so a resume notices that a frozen snapshot file was replaced."""
    digests = {}
    for name, net in frozen.items():
        h = hashlib.sha256()
        for key, tensor in net.state_dict().items():
            t = tensor.detach().cpu().contiguous()
            h.update(f'{key}:{t.dtype}:{list(t.shape)};'.encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b'')
        digests[name] = h.hexdigest()
    return digests

def check_fingerprint(state: dict, frozen: dict[str, torch.nn.Module], path: str, key: str = 'training.frozen') -> None:
    """ValueError unless the frozen networks are those the training state was trained with
    (states without a record, from older versions, pass)."""
    saved = state.get('frozen_sha256')
    if saved is None:
        return
    now = fingerprint(frozen)
    if sorted(saved) != sorted(now):
        raise ValueError(f'{key}: {path} was trained with the frozen networks {sorted(saved)}, not {sorted(now)}; '
            f'resume with the configuration of that run, or resume=none')
    for name in sorted(now):
        if saved[name] != now[name]:
            raise ValueError(f'{key}.{name}: the snapshot now holds other weights than the ones {path} was trained with '
                f'(the file was replaced?); resuming would not continue that run (restore the file, or resume=none)')

def frozen_param_ids(frozen: dict[str, torch.nn.Module]) -> set[int]:
    return {id(p) for net in frozen.values() for p in net.parameters()}

#----------------------------------------------------------------------------
# Warm start: copy the weights of a snapshot's `ema` (or of one submodule)
# into the new network, strict by default.

def parse_init_from(spec, key: str = 'training.init_from') -> dict | None:
    """`path` or {path, module, source, strict} -> the dict form, None = off."""
    if spec is None:
        return None
    if isinstance(spec, (str, os.PathLike)):
        spec = dict(path=os.fspath(spec))
    if not isinstance(spec, dict):
        raise ValueError(f'{key}: expected a snapshot path or {{path, module, source, strict}}, got {spec!r}')
    unknown = sorted(set(spec) - {'path', 'module', 'source', 'strict'})
    if unknown:
        raise ValueError(f'{key}: unknown keys {unknown} (expected path, module, source, strict)')
    if not isinstance(spec.get('path'), str) or not spec['path']:
        raise ValueError(f'{key}.path: expected a network-snapshot-*.pkl path')
    module = spec.get('module') or ''
    source = spec.get('source')
    strict = spec.get('strict', True)
    if not isinstance(strict, bool): # bool('false') would be True.
        raise ValueError(f'{key}.strict: expected true or false, got {strict!r}')
    return dict(path=spec['path'], module=module, source=module if source is None else source, strict=strict)

def _submodule(net: torch.nn.Module, name: str, what: str, key: str, path: str) -> torch.nn.Module:
    if not name:
        return net
    try:
        return net.get_submodule(name)
    except AttributeError:
        raise ValueError(f'{key}.{what}={name!r} is not a submodule of the network{" in " + path if what == "source" else ""}') from None

def init_from(net: torch.nn.Module, spec, key: str = 'training.init_from') -> list[str]:
    """Copy the snapshot's weights into `net` (or its submodule); return the copied names.

    strict: the parameter and buffer names and shapes must match exactly; the
    first mismatch is a one-line ValueError naming the key, the file and the name.
    strict=false: copy the names present in both with equal shapes, skip the rest."""
    spec = parse_init_from(spec, key)
    if spec is None:
        return []
    path = spec['path']
    dst_module = _submodule(net, spec['module'], 'module', key, path)
    if not os.path.isfile(path):
        raise ValueError(f'{key}: snapshot not found: {path}')
    source_net = persistence.load_snapshot(path)['ema']
    if not isinstance(source_net, torch.nn.Module):
        raise ValueError(f'{key}: "ema" of {path} is not a network')
    src = _submodule(source_net, spec['source'], 'source', key, path).state_dict()
    dst = dst_module.state_dict()
    where = f'the network{" submodule " + repr(spec["module"]) if spec["module"] else ""}'
    copied = [name for name in dst if name in src and src[name].shape == dst[name].shape]
    if spec['strict']:
        problem = None
        for name in dst:
            if name not in src:
                problem = f'{name!r} is missing from the snapshot'
            elif src[name].shape != dst[name].shape:
                problem = f'{name!r} has shape {list(src[name].shape)} in the snapshot, {list(dst[name].shape)} in the network'
            if problem:
                break
        if problem is None:
            extra = [name for name in src if name not in dst]
            problem = f'{extra[0]!r} of the snapshot is not in the network' if extra else None
        if problem is not None:
            raise ValueError(f'{key}: {path} does not fit {where}: {problem} (set {key}.strict=false to copy only what fits)')
    with torch.no_grad():
        for name in copied:
            dst[name].copy_(src[name]) # state_dict() tensors share storage with the module's.
    return copied

#----------------------------------------------------------------------------
# The one snapshot loader of the entry points (generate.py, evaluate.py).

def load_snapshot(path: str | os.PathLike, device: torch.device | str | None = None) -> dict:
    """Load a network snapshot for inference: a dict with `ema` (eval mode, no
    gradients), `frozen` ({name: network}, eval mode, no gradients; {} for a
    one-stage snapshot), `loss_fn`, `augment_pipe`, `dataset_kwargs` and any
    other keys of the file. Networks move to `device` when given.

    Raises ValueError naming the file if it is damaged or names anything but
    this project's classes."""
    data = persistence.load_snapshot(path)
    frozen = data.get('frozen') or {}
    if not isinstance(frozen, dict) or not all(isinstance(name, str) and _NAME_RE.fullmatch(name) for name in frozen):
        raise ValueError(f'network snapshot {path}: "frozen" is not a mapping {{name: network}} (a damaged snapshot)')
    nets = [('ema', data['ema'])] + [(f'frozen.{name}', net) for name, net in frozen.items()]
    for name, net in nets:
        if not isinstance(net, torch.nn.Module):
            raise ValueError(f'network snapshot {path}: "{name}" is not a network')
    data['ema'] = freeze(data['ema'])
    data['frozen'] = {name: freeze(net) for name, net in (data.get('frozen') or {}).items()}
    if device is not None:
        data['ema'] = data['ema'].to(device)
        data['frozen'] = {name: net.to(device) for name, net in data['frozen'].items()}
    return data

@torch.no_grad()
def decode(snapshot: dict, x: torch.Tensor, per_sample: bool = True) -> torch.Tensor:
    """Generated samples -> images: the loss object's `decode(x, frozen)` where it
    has one, else x. Per sample by default, so that the image of a seed does not
    depend on the batch it was decoded in."""
    fn = getattr(snapshot.get('loss_fn'), 'decode', None)
    if fn is None:
        return x
    frozen = snapshot.get('frozen') or {}
    x = x.to(torch.float32) # Samplers work in float64; the networks in float32.
    if not per_sample:
        return fn(x, frozen)
    return torch.cat([fn(x[i:i + 1], frozen) for i in range(x.shape[0])]) if x.shape[0] else fn(x, frozen)

#----------------------------------------------------------------------------
