# medEDM: benchmark of the 3-D LDM inpainting stage 2 against a pixel-space 3-D EDM.

"""Stage-2 training throughput (images/s) and peak memory of the latent EDM
(DhariwalUNet3D on the autoencoder's latents, with the frozen autoencoder
encoding every batch) with and without bf16 autocast and activation
checkpointing, as ratios to fp32 without checkpointing; inference seconds
per case (harmonic fill + masked Heun sampling + decode); and the same for a
pixel-space 3-D EDM of the same depth (the same U-Net on the full volume,
conditioned on voided image, mask and the 4 condition channels). The
autoencoder and the U-Net are the demo's (`training.network` of
configs/ldm3d_ae.yaml and configs/ldm3d_latent.yaml: the conditional decoder
included; --channels overrides model_channels). Every configuration runs
in its own process, so that its peak memory is its own (CUDA: max allocated;
CPU: the process's peak resident set growth). Random weights: speed and
memory do not depend on training.

    python bench/ldm3d.py                          # CPU-sized: 32 x 40 x 32 volumes
    python bench/ldm3d.py --size 96,112,96 --batch 4 --channels 64   # a GPU
"""

import json
import os
import resource
import subprocess
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from training import networks # pylint: disable=wrong-import-position
from training import sampling # pylint: disable=wrong-import-position
from training.ldm3d import autoencoder as ldm_ae # pylint: disable=wrong-import-position
from training.ldm3d import data as ldm_data # pylint: disable=wrong-import-position
from training.ldm3d import latent as ldm_latent # pylint: disable=wrong-import-position
from training.loss import EDMLoss # pylint: disable=wrong-import-position

#----------------------------------------------------------------------------

def _batch(n, size, device):
    g = torch.Generator().manual_seed(0)
    image = torch.rand([n, 1, *size], generator=g) * 2 - 1
    mask = torch.zeros([n, 1, *size])
    d, h, w = size
    mask[:, :, d // 4:d // 2, h // 4:h // 2, w // 4:w // 2] = 1
    cond = (torch.rand([n, 4, *size], generator=g) > 0.5).float()
    voided = torch.where(mask > 0, -torch.ones_like(image), image)
    return {k: v.to(device) for k, v in dict(image=image, voided=voided, mask=mask, cond=cond).items()}

def demo_networks() -> tuple[dict, dict]:
    """training.network of the demo's two stages (configs/ldm3d_ae.yaml, configs/ldm3d_latent.yaml), without _target_."""
    from omegaconf import OmegaConf
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')
    nets = [OmegaConf.to_container(OmegaConf.load(os.path.join(root, f'ldm3d_{n}.yaml')).training.network) for n in ('ae', 'latent')]
    return tuple({k: v for k, v in n.items() if k != '_target_'} for n in nets)

def _setup(space, size, channels, checkpoint, device):
    torch.manual_seed(0)
    ae_kwargs, unet = demo_networks()
    unet = dict(unet, checkpoint=checkpoint, **({} if channels is None else dict(model_channels=channels)))
    if space == 'latent':
        ae = ldm_ae.KLAutoencoder3D(size, 1, **ae_kwargs).to(device).eval().requires_grad_(False)
        loss = ldm_latent.LatentInpaintLoss()
        interface = loss.network_interface(dict(img_resolution=size, img_channels=1, label_dim=0), dict(autoencoder=ae))
        net = networks.EDMPrecond(**interface, **unet).to(device)
        return net, lambda b: loss(net, b, frozen=dict(autoencoder=ae)), ae
    net = networks.EDMPrecond(img_resolution=size, img_channels=1, label_dim=0, cond_channels=1 + 1 + 4, **unet).to(device)
    loss = EDMLoss(sigma_data=1.0, mask_key='mask')
    return net, lambda b: loss(net, dict(image=b['image'], cond=torch.cat([b['voided'], b['mask'], b['cond']], 1), mask=b['mask'])), None

def worker(space, size, channels, batch, bf16, checkpoint, steps, sample_steps):
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    net, loss_fn, ae = _setup(space, size, channels, checkpoint, device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    b = _batch(batch, size, device)
    if device.type == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(steps + 1): # The first step warms up.
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(b).float().sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == 'cuda':
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if device.type == 'cuda' else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024
    result = dict(images_per_s=batch / (sum(times) / len(times)), peak_mib=peak / 2 ** 20)
    if not bf16 and not checkpoint: # Inference: one case, masked sampling (Heun, sample_steps), decode, paste.
        net.eval()
        one = {k: v[:1] for k, v in b.items()}
        t0 = time.perf_counter()
        with torch.no_grad():
            if space == 'latent': # The decoder's harmonic fill is solved per case, as evaluate.py does.
                harmonic = ldm_data.harmonic_fill(one['voided'][0, 0].cpu().numpy(), one['mask'][0, 0].cpu().numpy() > 0)
                ldm_latent.inpaint_batch(net, ae, one['voided'], one['mask'], one['cond'], [0], dict(num_steps=sample_steps),
                    harmonic=torch.as_tensor(harmonic)[None, None].to(device))
            else:
                rnd = sampling.StackedRandomGenerator(device, [0])
                sampling.inpaint(net, rnd.randn([1, 1, *size], device=device), known=one['voided'], mask=one['mask'],
                    cond=torch.cat([one['voided'], one['mask'], one['cond']], 1), randn_like=rnd.randn_like, num_steps=sample_steps)
        if device.type == 'cuda':
            torch.cuda.synchronize()
        result['inference_s_per_case'] = time.perf_counter() - t0
    print(json.dumps(result))

#----------------------------------------------------------------------------

@click.command()
@click.option('--size', help='Volume size D,H,W (multiple of 8)', default='32,40,32', show_default=True)
@click.option('--channels', help='U-Net model_channels [default: the demo\'s]', type=int, default=None)
@click.option('--batch', help='Training batch', type=int, default=2, show_default=True)
@click.option('--steps', help='Timed training steps', type=int, default=3, show_default=True)
@click.option('--sample-steps', help='Sampler steps of the inference timing', type=int, default=18, show_default=True)
@click.option('--worker', 'worker_spec', help='(internal) one configuration as JSON', default=None, hidden=True)
def main(size, channels, batch, steps, sample_steps, worker_spec):
    """Stage-2 LDM vs pixel-space 3-D EDM: throughput, memory, inference time."""
    size = [int(s) for s in size.split(',')]
    if len(size) != 3 or any(s % 8 for s in size):
        raise click.BadParameter(f'--size: expected D,H,W, each a multiple of 8, got {size}')
    if worker_spec is not None:
        spec = json.loads(worker_spec)
        worker(spec['space'], size, channels, batch, spec['bf16'], spec['checkpoint'], steps, sample_steps)
        return
    results = {}
    for space in ('latent', 'pixel'):
        for bf16 in (False, True):
            for checkpoint in (False, True):
                spec = json.dumps(dict(space=space, bf16=bf16, checkpoint=checkpoint))
                cmd = [sys.executable, os.path.abspath(__file__), '--size', ','.join(map(str, size)),
                    *([] if channels is None else ['--channels', str(channels)]), '--batch', str(batch), '--steps', str(steps), '--sample-steps', str(sample_steps), '--worker', spec]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
                results[(space, bf16, checkpoint)] = json.loads(out)
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    ae_kwargs, unet = demo_networks()
    print(f'Device {device}; volume {size}, batch {batch}; autoencoder {ae_kwargs}; U-Net model_channels '
        f'{unet["model_channels"] if channels is None else channels}, channel_mult {unet["channel_mult"]}, attn_resolutions '
        f'{unet["attn_resolutions"]}; {steps} timed steps')
    print(f'{"space":7s} {"bf16":5s} {"ckpt":5s} {"img/s":>8s} {"ratio":>6s} {"peak MiB":>9s} {"ratio":>6s}')
    for (space, bf16, ckpt), r in results.items():
        base = results[(space, False, False)]
        print(f'{space:7s} {str(bf16):5s} {str(ckpt):5s} {r["images_per_s"]:8.2f} {r["images_per_s"] / base["images_per_s"]:6.2f} '
            f'{r["peak_mib"]:9.1f} {r["peak_mib"] / max(base["peak_mib"], 1e-9):6.2f}')
    lat, pix = results[('latent', False, False)], results[('pixel', False, False)]
    print(f'Inference ({sample_steps} Heun steps, one case): latent {lat["inference_s_per_case"]:.3f} s, pixel {pix["inference_s_per_case"]:.3f} s '
        f'(pixel / latent {pix["inference_s_per_case"] / lat["inference_s_per_case"]:.1f}x)')
    print(f'Training: latent / pixel images/s {lat["images_per_s"] / pix["images_per_s"]:.1f}x, '
        f'pixel / latent peak memory {pix["peak_mib"] / max(lat["peak_mib"], 1e-9):.1f}x')

if __name__ == '__main__':
    main() # pylint: disable=no-value-for-parameter

#----------------------------------------------------------------------------
