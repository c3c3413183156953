# medEDM: diffusion-model training toolkit for medical imaging.

"""DiffMIC inference cost: where the time of one image goes, and the
throughput of the whole evaluation against the DCG prior alone.

Per image (S label samples, a solver with N steps), in the same run:

  prior     the DCG forward pass (global CNN, saliency, top-k patches, local
            branch, gated attention): once per image.
  encoder   the denoiser's image encoder (DiffMIC's f(x)): once per network
            evaluation and sample, i.e. S x NFE times per image (measured
            with a forward hook inside the sampling).
  label     the rest of the label sampling (the MLP over the K-vector, the
            preconditioning, the solver).

Printed: milliseconds per image of each part, their shares of the total, and
images/s of DCG alone vs the whole DiffMIC evaluation (best of --repeats
rounds; the machine may be shared). Without --network the networks are the
demo's architecture with random weights (the cost does not depend on the
weights).

Examples:
    python bench/diffmic.py
    python bench/diffmic.py --network demo-runs/00001-diffmic-edm/network-snapshot-000030.pkl --samples 8 --steps 6
"""

import os
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from training import sampling                        # noqa: E402
from training.diffmic import inference               # noqa: E402
from training.diffmic.dcg import DCGNet              # noqa: E402
from training.networks import EDMPrecond             # noqa: E402

#----------------------------------------------------------------------------

def demo_networks(resolution: int, classes: int) -> tuple:
    torch.manual_seed(0)
    dcg = DCGNet(resolution, 1, classes).eval().requires_grad_(False)
    net = EDMPrecond(resolution, classes, model_type='VectorDenoiser', cond_channels=1, embedding_dim=3 * classes, cond_type='image',
        cond_product=True, model_channels=64, num_blocks=3, encoder_channels=16, encoder_levels=3, sigma_data=0.25).eval().requires_grad_(False)
    return net, dcg

@click.command()
@click.option('--network', help='A DiffMIC label-diffusion snapshot (default: the demo architecture, random weights)', type=str, default=None)
@click.option('--images', help='Images per round', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--samples', help='Label samples per image (S)', type=click.IntRange(min=1), default=8, show_default=True)
@click.option('--steps', help='Solver steps', type=click.IntRange(min=1), default=6, show_default=True)
@click.option('--solver', help='Solver', type=str, default='heun', show_default=True)
@click.option('--batch', help='Images per batch', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--repeats', help='Rounds (best reported)', type=click.IntRange(min=1), default=3, show_default=True)
@click.option('--cache/--no-cache', help='Image features once per image (inference.cached_encoder) or once per sample and step', default=True, show_default=True)
def main(network, images, samples, steps, solver, batch, repeats, cache):
    torch.set_grad_enabled(False)
    if network is not None:
        from training.diffmic.evaluation import guided_map_of, load_model
        net, dcg, snapshot = load_model(network, torch.device('cpu'))
        guided_map = guided_map_of(snapshot)
    else:
        net, dcg = demo_networks(32, 4)
        guided_map = 0
    x = torch.randn([images, dcg.img_channels, dcg.img_resolution, dcg.img_resolution]).clamp(-1, 1)
    sampler = sampling.check_sampler_options(dict(solver=solver, num_steps=steps))
    enc_time = [0.0]
    def pre(_m, _i):
        enc_time.append(time.perf_counter())
    def post(_m, _i, _o):
        enc_time[0] += time.perf_counter() - enc_time.pop()
    net.model.map_cond.register_forward_pre_hook(pre) # Also times the one call per image of the cached encoder.
    net.model.map_cond.register_forward_hook(post)

    best = None
    for _ in range(repeats):
        enc_time[:] = [0.0]
        timings = {}
        t0 = time.perf_counter()
        for s in range(0, images, batch):
            inference.predict_batch(net, dcg, x[s:s + batch], list(range(s, min(s + batch, images))), samples, 0, sampler, timings, cache, guided_map=guided_map)
        total = time.perf_counter() - t0
        t1 = time.perf_counter()
        for s in range(0, images, batch):
            inference.predict_batch(None, dcg, x[s:s + batch], list(range(s, min(s + batch, images))), samples, 0, sampler)
        dcg_only = time.perf_counter() - t1
        r = dict(total=total, prior=timings['prior'], encoder=enc_time[0], label=timings['sampling'] - enc_time[0], dcg_only=dcg_only)
        best = r if best is None or r['total'] < best['total'] else best

    nfe = 2 * steps - 1 if solver == 'heun' else steps
    print(f'DiffMIC inference, {images} images, S={samples}, {solver} {steps} steps ({nfe} NFE), batch {batch}, {torch.get_num_threads()} threads, '
        f'image features {"once per image" if cache else "per sample and step"}')
    for key in ('prior', 'encoder', 'label'):
        print(f'  {key:8s} {best[key] / images * 1e3:8.3f} ms/image  {best[key] / best["total"]:6.1%} of the total')
    print(f'  total    {best["total"] / images * 1e3:8.3f} ms/image')
    print(f'DCG alone: {images / best["dcg_only"]:8.1f} images/s;  DiffMIC: {images / best["total"]:8.1f} images/s '
        f'({best["dcg_only"] / best["total"]:.3f} x the DCG\'s throughput)')

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------
