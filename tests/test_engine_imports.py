# medEDM: the engine (training/*.py, torch_utils/, tomography_utils/) never
# imports a family package (training/<family>/): checked on the source (every
# import statement) and in a fresh process that imports every engine module.

import ast
import glob
import os
import subprocess
import sys

import launch

FAMILIES = sorted(os.path.basename(os.path.dirname(p)) for p in glob.glob(os.path.join(launch.ROOT, 'training', '*', '__init__.py')))

def _engine_files() -> list[str]:
    files = glob.glob(os.path.join(launch.ROOT, 'training', '*.py'))
    for package in ('torch_utils', 'tomography_utils'):
        files += glob.glob(os.path.join(launch.ROOT, package, '**', '*.py'), recursive=True)
    return sorted(files)

def family_imports(source: str, families=None) -> list[tuple[int, str]]:
    """(line, module) of every import of a family package in `source`."""
    families = FAMILIES if families is None else families
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f'{node.module}.{a.name}' for a in node.names]
        else:
            continue
        found += [(node.lineno, n) for n in names if n.split('.')[:1] == ['training'] and n.split('.')[1:2] and n.split('.')[1] in families]
    return found

def test_scanner_finds_family_imports():
    src = 'import training.pet.dataset\nfrom training import pet\nfrom training.pet import phantoms\nfrom training import sampling\nimport training\n'
    assert family_imports(src, ['pet']) == [(1, 'training.pet.dataset'), (2, 'training.pet'), (3, 'training.pet'), (3, 'training.pet.phantoms')]

def test_engine_source_imports_no_family():
    assert 'pet' in FAMILIES
    files = _engine_files()
    assert len(files) > 20
    bad = [f'{os.path.relpath(f, launch.ROOT)}:{line} imports {name}' for f in files
        for line, name in family_imports(open(f, encoding='utf-8').read())]
    assert bad == [], 'the engine must not import a family package: ' + '; '.join(bad)

def test_engine_modules_load_no_family():
    modules = [os.path.relpath(f, launch.ROOT)[:-3].replace(os.sep, '.') for f in _engine_files()]
    modules = [m[:-len('.__init__')] if m.endswith('.__init__') else m for m in modules]
    code = ('import importlib, sys\n'
        f'for m in {modules!r}: importlib.import_module(m)\n'
        f'print(sorted(m for m in sys.modules if m.split(".")[:1] == ["training"] and m.split(".")[1:2] and m.split(".")[1] in {FAMILIES!r}))')
    proc = subprocess.run([sys.executable, '-c', code], cwd=launch.ROOT, env=launch.env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == '[]'

#----------------------------------------------------------------------------
# Snapshots admit the classes of family packages as they do the engine's.

def test_snapshot_admits_family_classes(tmp_path, monkeypatch):
    import types
    import torch
    from torch_utils import persistence
    module = types.ModuleType('training.pet.snapshot_test_module')
    class FamilyNet(torch.nn.Module):
        def __init__(self, width=3):
            super().__init__()
            self.lin = torch.nn.Linear(width, 1)
    FamilyNet.__module__ = module.__name__
    FamilyNet.__qualname__ = 'FamilyNet'
    module.FamilyNet = persistence.persistent_class(FamilyNet)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    net = module.FamilyNet(width=4)
    persistence.save_snapshot(dict(ema=net), tmp_path / 's.pkl')
    back = persistence.load_snapshot(tmp_path / 's.pkl')['ema']
    assert type(back) is module.FamilyNet and back.init_kwargs == dict(width=4)
    assert torch.equal(back.lin.weight, net.lin.weight)

#----------------------------------------------------------------------------
# The public samplers that bench/sampler_peers.py compares against are bench-only
# dependencies: no toolkit module (engine, families, entry points) imports them.

PEER_PACKAGES = ('diffusers', 'k_diffusion')

def peer_imports(source: str) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(node.lineno, n) for n in names if n.split('.')[0] in PEER_PACKAGES]
    return found

def test_toolkit_imports_no_peer_sampler():
    assert peer_imports('import diffusers\nfrom k_diffusion import sampling\nimport training\n') == [(1, 'diffusers'), (2, 'k_diffusion')]
    files = glob.glob(os.path.join(launch.ROOT, '*.py'))
    for package in ('training', 'torch_utils', 'tomography_utils'):
        files += glob.glob(os.path.join(launch.ROOT, package, '**', '*.py'), recursive=True)
    assert len(files) > 30 and any(f.endswith('generate.py') for f in files)
    bad = [f'{os.path.relpath(f, launch.ROOT)}:{line} imports {name}' for f in sorted(files)
        for line, name in peer_imports(open(f, encoding='utf-8').read())]
    assert bad == [], 'peers are bench-only (bench/requirements-peers.txt): ' + '; '.join(bad)
    requirements = open(os.path.join(launch.ROOT, 'requirements.txt'), encoding='utf-8').read().lower()
    assert 'diffusers' not in requirements and 'k-diffusion' not in requirements and 'k_diffusion' not in requirements
