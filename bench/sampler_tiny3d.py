# medEDM: diffusion-model training toolkit for medical imaging.

"""A tiny 3-D volume network for `bench/sampler_peers.py --network`: EDMPrecond
with DhariwalUNet3D (8^3 voxels, 1 channel, model_channels 8) trained on soft
random 3-D blobs in [-1, 1] (a fixed number of Adam steps at batch 16, about
3 minutes on one busy core), saved as a network snapshot whose dataset is the
blobs' npz. Not a model of anything: it gives the sampler bench a trained
volume denoiser without a volume data set.

Example:

\b
python bench/sampler_tiny3d.py --outdir /tmp/tiny3d
python bench/sampler_peers.py --network /tmp/tiny3d/tiny3d.pkl --batch 8 --settings network
"""

import io
import os
import sys

import click
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from torch_utils import persistence # pylint: disable=wrong-import-position
from training import loss as loss_mod # pylint: disable=wrong-import-position
from training import networks # pylint: disable=wrong-import-position

def blobs3d(n: int, res: int, rng: np.random.Generator) -> np.ndarray:
    zz, yy, xx = np.mgrid[:res, :res, :res] / res
    c = rng.uniform(0.3, 0.7, (3, n, 1, 1, 1))
    r = rng.uniform(0.15, 0.3, (n, 1, 1, 1))
    soft = 1 / (1 + np.exp(-(r ** 2 - (xx - c[0]) ** 2 - (yy - c[1]) ** 2 - (zz - c[2]) ** 2) * 100))
    return (soft * 2 - 1).astype(np.float32)[:, None]

@click.command()
@click.option('--outdir', help='Folder for tiny3d.pkl and blobs3d.npz', metavar='DIR', required=True)
@click.option('--train-steps', help='Adam steps at batch 16', metavar='INT', type=int, default=300, show_default=True)
def main(outdir, train_steps):
    """Train and save the tiny 3-D network; see the module docstring."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    res = 8
    vol = blobs3d(2048, res, rng)
    os.makedirs(outdir, exist_ok=True)
    npz = os.path.join(os.path.abspath(outdir), 'blobs3d.npz')
    buf = io.BytesIO()
    np.savez(buf, images=vol)
    persistence.atomic_write_bytes(npz, buf.getvalue())
    net = networks.EDMPrecond(img_resolution=[res, res, res], img_channels=1, model_type='DhariwalUNet3D', model_channels=8,
        channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], channels_per_head=8, dropout=0)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    loss_fn = loss_mod.EDMLoss()
    data = torch.as_tensor(vol)
    for _ in range(train_steps):
        idx = torch.as_tensor(rng.integers(len(data), size=16))
        loss = loss_fn(net, {'image': data[idx]}).sum() / 16
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    net.eval().requires_grad_(False)
    persistence.save_snapshot(dict(ema=net, loss_fn=loss_fn, augment_pipe=None,
        dataset_kwargs={'_target_': 'training.dataset.NpzDataset', 'path': npz}), os.path.join(outdir, 'tiny3d.pkl'))
    print(os.path.join(outdir, 'tiny3d.pkl'))

if __name__ == '__main__':
    main()
