# medEDM: diffusion-model training toolkit for medical imaging.

"""Stage 2 of the 3-D LDM: EDM (Karras et al. 2022) in the scaled latent
space of the frozen stage-1 autoencoder (`training.frozen.autoencoder`),
with the engine's DhariwalUNet3D.

Condition of the denoiser (channel-concatenated, never noised), at the
latent resolution: the latent of the voided image (latent_channels), the
mask max-pooled by the factor f (a latent voxel is "unknown" when any of its
f^3 voxels is), and the 4 condition channels of the dataset (growth >= 0.2,
tissue one-hot 1/2/3) average-pooled by f. The loss is taken inside the
latent mask (DiffusionLoss mask_key), where the sampler generates.

Inference (`inpaint_case`): per seed, masked sampling (sampling.inpaint:
known-region replacement by the noised latent of the voided image at every
step), decode, and paste into the voided volume, so that every voxel outside
the mask is the input's own value."""

import numpy as np
import torch

from torch_utils import persistence
from training import sampling
from training.loss import EDMLoss
from training.ldm3d import autoencoder as ldm_ae

#----------------------------------------------------------------------------

def latent_conditions(ae, voided: torch.Tensor, mask: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(voided latent, latent mask (0/1), network condition) at the latent resolution."""
    f = ae.factor
    zv = ae.encode_latent(voided.float())
    lmask = (torch.nn.functional.max_pool3d(mask.float(), f) > 0).float()
    c = torch.nn.functional.avg_pool3d(cond.float(), f)
    return zv, lmask, torch.cat([zv, lmask, c], dim=1)

@persistence.persistent_class
class LatentInpaintLoss(EDMLoss):
    def __init__(self,
        encoder     = 'autoencoder',    # Name of the frozen autoencoder in training.frozen.
        cond_key    = 'cond',           # Batch key of the condition volumes (growth, tissue one-hot).
        masked      = True,             # Loss inside the latent mask only (False = the whole latent).
        P_mean      = -1.2,             # Mean of ln(sigma) during training.
        P_std       = 1.2,              # Standard deviation of ln(sigma) during training.
        sigma_data  = 1.0,              # Standard deviation of the scaled latents.
        grid_steps  = 8,                # Sampler steps of the snapshot picture.
        **parts,                        # Other parts of DiffusionLoss (distance, noise).
    ):
        super().__init__(P_mean=P_mean, P_std=P_std, sigma_data=sigma_data, mask_key='latent_mask' if masked else None, **parts)
        self.encoder, self.cond_key, self.masked, self.grid_steps = encoder, cond_key, bool(masked), int(grid_steps)

    def _autoencoder(self, frozen):
        if not frozen or self.encoder not in frozen:
            raise ValueError(f'training.loss.encoder={self.encoder!r} is not a network of training.frozen ({sorted(frozen or {})})')
        return frozen[self.encoder]

    def network_interface(self, interface_kwargs, frozen):
        ae = self._autoencoder(frozen)
        shape = ae.latent_shape()
        return dict(interface_kwargs, img_resolution=shape[1:], img_channels=shape[0], cond_channels=shape[0] + 1 + 4)

    def latent_batch(self, batch: dict, frozen) -> dict:
        ae = self._autoencoder(frozen)
        for key in ('image', 'voided', 'mask', self.cond_key):
            if not isinstance(batch.get(key), torch.Tensor):
                raise ValueError(f'training.loss: the batch has no tensor {key!r} (use training.ldm3d.data.BratsInpaintDataset)')
        with torch.no_grad():
            z = ae.encode_latent(batch['image'].float())
            _, lmask, cond = latent_conditions(ae, batch['voided'], batch['mask'], batch[self.cond_key])
        return dict(image=z, cond=cond, latent_mask=lmask)

    def __call__(self, net, batch, augment_pipe=None, frozen=None):
        return super().__call__(net, self.latent_batch(batch, frozen), augment_pipe)

    def decode(self, x, frozen):
        ae = self._autoencoder(frozen)
        if ae.cond_channels:
            raise ValueError('the autoencoder\'s decoder is conditioned on the known region (cond_decoder): '
                'inpaint with `evaluate.py inpaint`, not generate.py')
        return ae.decode_latent(x)

    def grid(self, net, batch, frozen):
        """Voided inputs | inpainted (one seed, grid_steps Heun steps) | ground truth."""
        ae = self._autoencoder(frozen)
        seeds = list(range(batch['image'].shape[0]))
        out = inpaint_batch(net, ae, batch['voided'], batch['mask'], batch[self.cond_key], seeds, dict(num_steps=self.grid_steps),
            harmonic=batch.get('harmonic'))
        return torch.cat([batch['voided'], out.to(batch['image'].device), batch['image']])

#----------------------------------------------------------------------------
# Inference.

@torch.no_grad()
def inpaint_batch(net, ae, voided: torch.Tensor, mask: torch.Tensor, cond: torch.Tensor, seeds, sampler_kwargs: dict,
        harmonic: torch.Tensor | None = None) -> torch.Tensor:
    """Normalised voided (N, 1, ...), mask, cond [, harmonic fill: needed by a conditional decoder] -> inpainted
    (N, 1, ...), one seed per volume, float32; equal to `voided` wherever mask == 0."""
    device = next(net.parameters()).device
    voided, mask, cond = voided.to(device).float(), mask.to(device).float(), cond.to(device).float()
    zv, lmask, c = latent_conditions(ae, voided, mask, cond)
    dcond = None
    if ae.cond_channels:
        if harmonic is None:
            raise ValueError('inpaint_batch: the conditional decoder needs the harmonic fill (data.network_inputs)')
        dcond = ldm_ae.decoder_condition(ae, voided, mask, harmonic.to(device), cond)
    rnd = sampling.StackedRandomGenerator(device, seeds)
    latents = rnd.randn([len(seeds), *zv.shape[1:]], device=device)
    z = sampling.inpaint(net, latents, known=zv, mask=lmask, cond=c, randn_like=rnd.randn_like, **sampler_kwargs)
    x = torch.cat([ae.decode_latent(z[i:i + 1].float(), None if dcond is None else dcond[i:i + 1]) # Per volume: independent of the batch.
        for i in range(len(seeds))])
    return torch.where(mask > 0, x, voided)

def inpaint_case(net, ae, inputs: dict, seeds, sampler_kwargs: dict, batch: int = 4) -> np.ndarray:
    """Samples (S, *padded) in the normalised space of one case's network_inputs(), one per seed."""
    out = []
    for i in range(0, len(seeds), batch):
        s = list(seeds[i:i + batch])
        rep = lambda a: torch.as_tensor(a)[None].expand(len(s), *a.shape) # pylint: disable=unnecessary-lambda-assignment
        out.append(inpaint_batch(net, ae, rep(inputs['voided']), rep(inputs['mask']), rep(inputs['cond']), s, sampler_kwargs,
            harmonic=rep(inputs['harmonic']))[:, 0].cpu().numpy())
    return np.concatenate(out)

@torch.no_grad()
def reconstruct_case(ae, inputs: dict) -> np.ndarray:
    """The autoencoder's own reconstruction of the ground truth `image` (posterior mean, the decoder's condition from the
    voided inputs), normalised space, padded: what a perfect latent model would decode to (the stage-1 bound)."""
    device = next(ae.parameters()).device
    t = lambda key: torch.as_tensor(inputs[key])[None].to(device).float() # pylint: disable=unnecessary-lambda-assignment
    dcond = ldm_ae.decoder_condition(ae, t('voided'), t('mask'), t('harmonic'), t('cond'))
    return ae.decode_latent(ae.encode_latent(t('image')), dcond)[0, 0].cpu().numpy()

@torch.no_grad()
def decode_voided_case(ae, inputs: dict) -> np.ndarray:
    """The decoder alone, no diffusion: the voided image's own latent decoded with the decoder's condition
    (normalised, padded). Beside the model it shows what stage 2 adds."""
    device = next(ae.parameters()).device
    t = lambda key: torch.as_tensor(inputs[key])[None].to(device).float() # pylint: disable=unnecessary-lambda-assignment
    dcond = ldm_ae.decoder_condition(ae, t('voided'), t('mask'), t('harmonic'), t('cond'))
    return ae.decode_latent(ae.encode_latent(t('voided')), dcond)[0, 0].cpu().numpy()

def paste(voided: np.ndarray, mask: np.ndarray, fill: np.ndarray) -> np.ndarray:
    """The output volume: `fill` inside the mask, the voided input's exact values outside (float32)."""
    return np.where(mask, fill.astype(np.float32), voided.astype(np.float32)).astype(np.float32)

#----------------------------------------------------------------------------
