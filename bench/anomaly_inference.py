# medEDM: diffusion-model training toolkit for medical imaging.

"""Test-time throughput of the anomaly-detection DDPMs: batched grid
inference against the reference's loop, same network, same outputs.

  batched    training/anomaly/inference.reconstruct_volumes: every box of the
             grid (pDDPM) or every sigma of the ensemble (cDDPM), for every
             slice of --group volumes at once, in forward passes of --batch
             samples, stitched.
  reference  one volume at a time, one box (or one sigma) per forward pass of
             the volume's slices (the reference's way; pDDPM issue #3).

The batched path is the evaluation's (evaluate.py anomaly): it skips the
slices (cDDPM) and boxes (pDDPM) that hold no voxel of the eroded brain mask,
since the anomaly map is zeroed there before the median filter. What is
asserted equal is therefore the final anomaly maps (max |difference| <= 1e-5;
a convolution's float rounding may depend on the batch size), plus the
reconstructions inside the eroded brain. Variants
alternate over --repeats rounds; the best round of each is reported (the
machine may be shared). The network is a snapshot (--network) or, without
one, a freshly initialised network of the demo's architecture (the speed
does not depend on the weights).

Examples:
    python bench/anomaly_inference.py --data-root datasets/anomaly-32
    python bench/anomaly_inference.py --data-root datasets/anomaly-32 --network demo-runs/00001-anomaly-cddpm/network-snapshot-000010.pkl
"""

import os
import sys
import time

import click
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from training import evaluation # pylint: disable=wrong-import-position
from training import networks # pylint: disable=wrong-import-position
from training.anomaly import dataset as anomaly_dataset # pylint: disable=wrong-import-position
from training.anomaly import inference # pylint: disable=wrong-import-position
from training.anomaly import loss as anomaly_loss # pylint: disable=wrong-import-position
from training.anomaly import metrics as M # pylint: disable=wrong-import-position
from training.anomaly import networks as anomaly_networks # pylint: disable=wrong-import-position

#----------------------------------------------------------------------------

def demo_network(kind: str, res: int):
    torch.manual_seed(0)
    kwargs = dict(img_resolution=res, img_channels=1, model_channels=32, channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[], dropout=0, sigma_data=0.66)
    if kind == 'patched':
        return networks.EDMPrecond(model_type='DhariwalUNet', **kwargs).eval()
    return anomaly_networks.EncoderConditionedPrecond(encoder_channels=16, encoder_blocks=[1, 1, 1], **kwargs).eval()

def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out

@click.command()
@click.option('--data-root', help='Data root with splits/*.csv', metavar='DIR', type=str, required=True)
@click.option('--split', help='Split CSV name in splits/', metavar='NAME', type=str, default='Brats21_test', show_default=True)
@click.option('--network', 'network_pkl', help='Snapshot; default: fresh demo networks of both kinds', metavar='PKL', type=str, default=None)
@click.option('--volumes', help='Volumes to reconstruct', metavar='INT', type=click.IntRange(min=1), default=8, show_default=True)
@click.option('--group', help='Volumes per batched call', metavar='INT', type=click.IntRange(min=1), default=8, show_default=True)
@click.option('--batch', help='Samples per forward pass (batched)', metavar='INT', type=click.IntRange(min=1), default=320, show_default=True)
@click.option('--repeats', help='Rounds (best reported)', metavar='INT', type=click.IntRange(min=1), default=3, show_default=True)
@click.option('--threads', help='torch threads (0 = default)', metavar='INT', type=click.IntRange(min=0), default=0, show_default=True)
def main(data_root, split, network_pkl, volumes, group, batch, repeats, threads):
    if threads:
        torch.set_num_threads(threads)
    device = evaluation.default_device()
    cases = anomaly_dataset.load_split(os.path.join(data_root, 'splits', f'{split}.csv'), volumes)
    vols = [anomaly_dataset.to_slices(c['image']).to(device) for c in cases]
    active = [anomaly_dataset.to_slices(M.erode_mask(c['brain'])).to(device) > 0 for c in cases]
    amap = lambda c, r: M.anomaly_map(np.abs(c['image'] - anomaly_dataset.from_slices(r.clamp(-1, 1))).astype(np.float32), c['brain'])
    h, w = vols[0].shape[-2:]
    if network_pkl:
        net, snapshot = evaluation.load_network(network_pkl, False, device)
        methods = [inference.method_of(snapshot['loss_fn'])]
        nets = [net]
    else:
        methods = [dict(kind='patched', sigmas=[anomaly_loss.reference_sigma(500)], noise='simplex', patch_size=h // 2, stride=h // 2),
            dict(kind='full', sigmas=anomaly_loss.reference_sigma([250, 500, 750]), noise='simplex')]
        nets = [demo_network(m['kind'], h).to(device) for m in methods]
    print(f'{len(vols)} volumes of {len(vols[0])} slices {h} x {w} ({split}), device {device}, torch threads {torch.get_num_threads()}')
    for net, method in zip(nets, methods):
        name = 'pDDPM (grid of %d boxes)' % len(inference.grid_boxes(h, w, method['patch_size'], method['stride'])) if method['kind'] == 'patched' \
            else f'cDDPM ({len(method["sigmas"])} sigmas)'
        best = dict(batched=float('inf'), reference=float('inf'))
        for _ in range(repeats):
            t, ref = timed(lambda: [inference.reconstruct_volume_reference(net, v, method, seed=0, index=i) for i, v in enumerate(vols)])
            best['reference'] = min(best['reference'], t)
            t, out = timed(lambda: sum([inference.reconstruct_volumes(net, vols[g:g + group], method, seed=0, batch=batch, first_index=g,
                active=active[g:g + group]) for g in range(0, len(vols), group)], []))
            best['batched'] = min(best['batched'], t)
            diff = max(float(((a - b) * m).abs().max()) for a, b, m in zip(out, ref, active))
            assert diff <= 1e-5, f'batched and reference reconstructions differ by {diff} inside the eroded brain'
            map_diff = max(float(np.abs(amap(c, a) - amap(c, b)).max()) for c, a, b in zip(cases, out, ref))
            assert map_diff <= 1e-5, f'batched and reference anomaly maps differ by {map_diff}'
        rate = {k: len(vols) / v for k, v in best.items()}
        jobs = sum(int(a.reshape(len(a), -1).any(1).sum()) for a in active) if method['kind'] == 'full' else \
            sum(int(((inference.box_masks(torch.as_tensor([b[:2] for b in inference.grid_boxes(h, w, method['patch_size'], method['stride'])]),
            method['patch_size'], h, w)[:, None] > 0) & a[None].cpu()).reshape(-1, len(a), h * w).any(2).sum()) for a in active)
        total = sum(len(v) for v in vols) * (len(inference.grid_boxes(h, w, method['patch_size'], method['stride'])) if method['kind'] == 'patched' else 1)
        print(f'{name}: batched {rate["batched"]:.2f} volumes/s, reference {rate["reference"]:.2f} volumes/s, '
            f'speed-up {rate["batched"] / rate["reference"]:.2f}x ({jobs} of {total} slice{"-box" if method["kind"] == "patched" else ""} jobs in the eroded brain; '
            f'same maps: max |diff| {map_diff:.1e})')

if __name__ == '__main__':
    main() # pylint: disable=no-value-for-parameter

#----------------------------------------------------------------------------
