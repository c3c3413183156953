# medEDM test helpers: run train.py / generate.py with python or torchrun in a subprocess.

import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
TINY = ['-cd', os.path.join(ROOT, 'tests', 'configs'), '-cn', 'tiny']

def env() -> dict:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS='1', TORCH_DISABLE_SHARE_RDZV_TCP_STORE='1', HYDRA_FULL_ERROR='0',
        PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, 'tests', 'helpers')]))
    return e

def torchrun_cmd(script: str, nproc: int, extra_torchrun=()) -> list[str]:
    if nproc == 0: # Plain python, no torchrun.
        return [sys.executable, os.path.join(ROOT, script)]
    return [os.path.join(BIN, 'torchrun'), '--standalone', f'--nproc_per_node={nproc}', *extra_torchrun, os.path.join(ROOT, script)]

def run(script: str, args, cwd, nproc: int = 2, timeout: float = 240, extra_torchrun=()) -> subprocess.CompletedProcess:
    cmd = torchrun_cmd(script, nproc, extra_torchrun) + TINY + list(args)
    return subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)

def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f'exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-4000:]}'
    return proc

def make_data(folder, n: int = 64, resolution: int = 16, seed: int = 0) -> str:
    """Smooth random blobs in [-1, 1]: learnable and cheap."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:resolution, :resolution] / resolution
    images = []
    for _ in range(n):
        cx, cy, r = rng.uniform(0.3, 0.7, 2).tolist() + [rng.uniform(0.15, 0.3)]
        images.append(np.where((xx - cx) ** 2 + (yy - cy) ** 2 < r ** 2, 1.0, -1.0))
    path = os.path.join(folder, 'data.npz')
    np.savez(path, images=np.asarray(images, dtype=np.float32)[:, None])
    return path

def run_config(script: str, config: str, args, cwd, nproc: int = 2, timeout: float = 240) -> subprocess.CompletedProcess:
    """Like run(), with the test config tests/configs/<config>.yaml instead of tiny."""
    cmd = torchrun_cmd(script, nproc) + ['-cd', os.path.join(ROOT, 'tests', 'configs'), '-cn', config] + list(args)
    return subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)

def make_volume_data(folder, n: int = 16, size: int = 8, seed: int = 0) -> str:
    """Balls in [-1, 1] volumes (N, 1, size, size, size) in volumes.npz."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.mgrid[:size, :size, :size] / size
    volumes = []
    for _ in range(n):
        cz, cy, cx, r = rng.uniform(0.3, 0.7, 3).tolist() + [rng.uniform(0.2, 0.35)]
        volumes.append(np.where((xx - cx) ** 2 + (yy - cy) ** 2 + (zz - cz) ** 2 < r ** 2, 1.0, -1.0))
    path = os.path.join(folder, 'volumes.npz')
    np.savez(path, images=np.asarray(volumes, dtype=np.float32)[:, None])
    return path
