# medEDM: diffusion-model training toolkit for medical imaging.

"""Stage 1 of the 3-D LDM: a KL-regularised convolutional autoencoder for
volumes (the AutoencoderKL of Rombach et al. 2022, Sec. 3.1 and App. G, in
3-D; no discriminator), trained in the one training loop by its own loss
object: L1 reconstruction + beta * KL(q(z|x) || N(0, I)) [+ w * (1 - SSIM)]
(with a conditional decoder, the reconstruction terms inside the mask only).

The latent scale factor (Rombach et al., Sec. 4.3.2: rescale the latents to
unit variance) is measured while training: the loss keeps running moments of
the posterior means, averaged over ranks, in buffers of the network; the
training loop's EMA copies buffers, so the snapshot's network carries them,
and stage 2 works on z' = (mu - shift) * scale_factor.

Optional conditional decoder (`cond_decoder`; the asymmetric
autoencoder of Zhu et al. 2023, "Designing a Better Asymmetric VQGAN for
StableDiffusion", whose decoder sees the known region of an inpainting
task): the decoder also receives, at full resolution, what inference knows
(`decoder_condition`: the voided image, the mask, the harmonic fill of the
mask from its border, the dataset's condition channels), average-pooled to
every decoder level and added through a 3x3 convolution before that level's
blocks, and the decoder's output is a correction to the harmonic fill
(x = harmonic + dec(z, c); its last convolution starts at zero, so an
untrained decoder returns the harmonic fill). The encoder is unchanged (the
latent of a volume does not depend on the mask); the latent then only has to
carry what the known region does not tell, inside the mask."""

import numpy as np
import torch
from torch.nn.functional import silu

from torch_utils import persistence
from training.ldm3d import data as ldm_data

#----------------------------------------------------------------------------
# Building blocks.

def _norm(channels: int) -> torch.nn.GroupNorm:
    groups = max(g for g in (8, 4, 2, 1) if channels % g == 0)
    return torch.nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6)

class ResBlock3D(torch.nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm0, self.conv0 = _norm(cin), torch.nn.Conv3d(cin, cout, 3, padding=1)
        self.norm1, self.conv1 = _norm(cout), torch.nn.Conv3d(cout, cout, 3, padding=1)
        self.skip = torch.nn.Conv3d(cin, cout, 1) if cin != cout else None
        torch.nn.init.zeros_(self.conv1.weight) # Each block starts as the identity.

    def forward(self, x):
        h = self.conv1(silu(self.norm1(self.conv0(silu(self.norm0(x))))))
        return h + (x if self.skip is None else self.skip(x))

#----------------------------------------------------------------------------
# The autoencoder. Downsampling factor f = 2^(len(channels) - 1); the latent
# of a (C, D, H, W) volume is (latent_channels, D/f, H/f, W/f).

@persistence.persistent_class
class KLAutoencoder3D(torch.nn.Module):
    def __init__(self,
        img_resolution,                 # Volume size [D, H, W] (or int), each a multiple of the factor.
        img_channels,                   # Channels of the volume.
        label_dim       = 0,            # Unused (the training loop passes the dataset's interface).
        channels        = [16, 32, 32], # Channels per level; levels after the first halve the size.
        latent_channels = 4,            # Channels of the latent.
        num_blocks      = 1,            # Residual blocks per level.
        logvar_min      = -30.0,        # Clamp of the posterior log-variance.
        cond_decoder    = False,        # Condition the decoder on the known region (decoder_condition)?
        decoder_tissue  = True,         # The conditional decoder sees the tissue one-hot too (False: growth only).
    ):
        super().__init__()
        size = [int(img_resolution)] * 3 if np.isscalar(img_resolution) else [int(s) for s in img_resolution]
        self.factor = 1 << (len(channels) - 1)
        if len(size) != 3 or any(s % self.factor for s in size):
            raise ValueError(f'training.network: the volume size {size} must be a multiple of the autoencoder\'s downsampling '
                f'factor {self.factor} (2^(len(channels) - 1)); pad the data (training.dataset.multiple)')
        self.img_resolution, self.img_channels, self.label_dim = size, int(img_channels), label_dim
        self.latent_channels, self.logvar_min = int(latent_channels), float(logvar_min)
        self.latent_resolution = [s // self.factor for s in size]
        self.decoder_tissue = bool(decoder_tissue)
        cond = ldm_data.COND_CHANNELS if self.decoder_tissue else 1
        self.cond_channels = 3 + cond if cond_decoder else 0 # voided, mask, harmonic fill, conditions (or growth only).

        enc = [torch.nn.Conv3d(img_channels, channels[0], 3, padding=1)]
        for level, ch in enumerate(channels):
            cin = channels[max(level - 1, 0)]
            if level > 0:
                enc.append(torch.nn.Conv3d(cin, cin, 4, stride=2, padding=1))
            for b in range(num_blocks):
                enc.append(ResBlock3D(cin if b == 0 else ch, ch))
        enc += [ResBlock3D(channels[-1], channels[-1]), _norm(channels[-1]), torch.nn.SiLU(),
            torch.nn.Conv3d(channels[-1], 2 * latent_channels, 3, padding=1)]
        self.enc = torch.nn.Sequential(*enc)

        dec = [torch.nn.Conv3d(latent_channels, channels[-1], 3, padding=1), ResBlock3D(channels[-1], channels[-1])]
        self.cond_at = {}               # Index of a decoder module -> (pooling factor, channels): the condition is added before it.
        for level in reversed(range(len(channels))):
            cin = channels[min(level + 1, len(channels) - 1)] if level < len(channels) - 1 else channels[-1]
            self.cond_at[len(dec)] = (1 << level, cin)
            for b in range(num_blocks):
                dec.append(ResBlock3D(cin if b == 0 else channels[level], channels[level]))
            if level > 0:
                dec += [torch.nn.Upsample(scale_factor=2, mode='nearest'), torch.nn.Conv3d(channels[level], channels[level], 3, padding=1)]
        dec += [_norm(channels[0]), torch.nn.SiLU(), torch.nn.Conv3d(channels[0], img_channels, 3, padding=1)]
        self.dec = torch.nn.Sequential(*dec)
        if self.cond_channels: # A correction to the harmonic fill, zero at the start.
            torch.nn.init.zeros_(self.dec[-1].weight)
            torch.nn.init.zeros_(self.dec[-1].bias)
        self.dec_cond = torch.nn.ModuleDict({str(i): torch.nn.Conv3d(self.cond_channels, ch, 3, padding=1)
            for i, (_, ch) in self.cond_at.items()}) if self.cond_channels else None

        # Running moments of the posterior means (scale factor), updated by AutoencoderKLLoss.
        self.register_buffer('latent_m1', torch.zeros([], dtype=torch.float64))
        self.register_buffer('latent_m2', torch.ones([], dtype=torch.float64))
        self.register_buffer('latent_n', torch.zeros([], dtype=torch.int64))

    def latent_shape(self, img_resolution=None) -> list[int]:
        return [self.latent_channels, *self.latent_resolution]

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = self.enc(x).chunk(2, dim=1)
        return mean, logvar.clamp(self.logvar_min, 20.0)

    def decode(self, z: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Latent -> volume; `cond` (N, cond_channels, D, H, W) is the decoder's condition (decoder_condition)."""
        if not self.cond_channels:
            return self.dec(z)
        if cond is None or cond.shape[1] != self.cond_channels:
            raise ValueError(f'KLAutoencoder3D.decode: the decoder needs a condition of {self.cond_channels} channels '
                f'(decoder_condition), got {None if cond is None else list(cond.shape)}')
        h = z
        for i, module in enumerate(self.dec):
            if i in self.cond_at:
                f = self.cond_at[i][0]
                c = torch.nn.functional.avg_pool3d(cond, f) if f > 1 else cond
                h = h + self.dec_cond[str(i)](c.to(h.dtype))
            h = module(h)
        return cond[:, HARMONIC_CHANNEL:HARMONIC_CHANNEL + 1].to(h.dtype) + h

    def forward(self, x: torch.Tensor, sample: bool = True, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(reconstruction, posterior mean, posterior log-variance); z ~ q(z|x) when sample."""
        mean, logvar = self.posterior(x)
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp() if sample else mean
        return self.decode(z, cond), mean, logvar

    # Scaled latents of stage 2. -------------------------------------------

    @property
    def latent_shift(self) -> float:
        return float(self.latent_m1)

    @property
    def scale_factor(self) -> float:
        var = float(self.latent_m2) - float(self.latent_m1) ** 2
        return 1.0 / float(np.sqrt(max(var, 1e-12)))

    def encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        return (self.posterior(x)[0] - self.latent_shift) * self.scale_factor

    def decode_latent(self, z: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return self.decode(z / self.scale_factor + self.latent_shift, cond)

#----------------------------------------------------------------------------
# The decoder's condition: what inference knows, at full resolution.

HARMONIC_CHANNEL = 2                    # Channel of the harmonic fill in decoder_condition.

def decoder_condition(ae: KLAutoencoder3D, voided: torch.Tensor, mask: torch.Tensor, harmonic: torch.Tensor,
        cond: torch.Tensor) -> torch.Tensor | None:
    """[voided, mask, harmonic fill, condition channels] for a conditional decoder (without the tissue one-hot when
    not ae.decoder_tissue: growth only); None for an unconditional one."""
    if not ae.cond_channels:
        return None
    if not ae.decoder_tissue:
        cond = cond[:, :1]
    c = torch.cat([voided.float(), mask.float(), harmonic.float(), cond.float()], dim=1)
    if c.shape[1] != ae.cond_channels:
        raise ValueError(f'the conditional decoder takes {ae.cond_channels} channels, but the decoder condition (voided, mask, '
            f'harmonic fill, {cond.shape[1]} condition channels) has {c.shape[1]}')
    return c

def batch_condition(ae: KLAutoencoder3D, batch: dict) -> torch.Tensor | None:
    """decoder_condition of a BratsInpaintDataset batch."""
    if not ae.cond_channels:
        return None
    for key in ('voided', 'mask', 'harmonic', 'cond'):
        if not isinstance(batch.get(key), torch.Tensor):
            raise ValueError(f'training.network.cond_decoder: the batch has no tensor {key!r} (use training.ldm3d.data.BratsInpaintDataset)')
    return decoder_condition(ae, batch['voided'], batch['mask'], batch['harmonic'], batch['cond'])

#----------------------------------------------------------------------------
# 3-D SSIM map (Wang et al. 2004) with a separable Gaussian window, for the
# optional SSIM term of the loss.

def ssim3d_map(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, win: int = 7, sigma: float = 1.5) -> torch.Tensor:
    g = torch.exp(-0.5 * ((torch.arange(win, device=x.device, dtype=x.dtype) - (win - 1) / 2) / sigma) ** 2)
    g = g / g.sum()
    C = x.shape[1]
    def filt(t):
        for axis in range(3):
            shape = [1, 1, 1, 1, 1]
            shape[2 + axis] = win
            pad = [0, 0, 0, 0, 0, 0]
            pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = win // 2
            t = torch.nn.functional.conv3d(torch.nn.functional.pad(t, pad, mode='replicate'), g.reshape(shape).expand(C, 1, *shape[2:]), groups=C)
        return t
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = filt(x), filt(y)
    sxx, syy, sxy = filt(x * x) - mx ** 2, filt(y * y) - my ** 2, filt(x * y) - mx * my
    return ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))

#----------------------------------------------------------------------------
# Stage-1 loss object: per-element L1 [+ w (1 - SSIM)] + beta * KL / voxels
# (the KL of a sample spread evenly over its voxels, so the loop's sum over
# elements gives L1_sum + beta * KL).

@persistence.persistent_class
class AutoencoderKLLoss:
    def __init__(self,
        beta            = 1e-6,         # Weight of the KL term.
        ssim_weight     = 0.0,          # Weight of the (1 - SSIM) term, 0 = off.
        stats_momentum  = 0.9,          # Momentum of the running latent moments (scale factor).
        cond_dropout    = 0.0,          # Conditional decoder: probability per sample of a zero condition (only the latent).
    ):
        for name, value in (('beta', beta), ('ssim_weight', ssim_weight)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f'training.loss.{name} must be a number >= 0, got {value!r}')
        if not 0 <= stats_momentum < 1:
            raise ValueError(f'training.loss.stats_momentum must be in [0, 1), got {stats_momentum!r}')
        if isinstance(cond_dropout, bool) or not isinstance(cond_dropout, (int, float)) or not 0 <= cond_dropout < 1:
            raise ValueError(f'training.loss.cond_dropout must be in [0, 1), got {cond_dropout!r}')
        self.beta, self.ssim_weight, self.stats_momentum = float(beta), float(ssim_weight), float(stats_momentum)
        self.cond_dropout = float(cond_dropout)

    def __call__(self, net, batch, augment_pipe=None):
        x = batch['image']
        cond = batch_condition(getattr(net, 'module', net), batch)
        if cond is not None and getattr(self, 'cond_dropout', 0.0): # Some samples decode from the latent alone, so that the
            keep = (torch.rand([x.shape[0]], device=x.device) >= self.cond_dropout).to(cond.dtype) # latent must carry the hole.
            cond = cond * keep.reshape(-1, *[1] * (cond.ndim - 1))
        recon, mean, logvar = net(x, cond=cond)
        if cond is not None: # Conditional decoder: the outside is pasted back at inference, so the SSIM windows that
            recon = torch.where(batch['mask'] > 0, recon, x) # straddle the mask border see the input there too.
        loss = (recon - x).abs()
        if self.ssim_weight:
            loss = loss + self.ssim_weight * (1 - ssim3d_map(recon.float(), x.float()))
        if cond is not None: # Conditional decoder: only the inside of the mask is ever used (paste-back); the sign noise
            loss = loss * batch['mask'] # of L1 on the trivially copied outside would swamp its gradient.
        kl = 0.5 * (mean.float() ** 2 + logvar.float().exp() - 1 - logvar.float()).flatten(1).sum(1)
        loss = loss + (self.beta * kl / x[0].numel()).reshape(-1, *[1] * (x.ndim - 1))
        self.update_stats(getattr(net, 'module', net), mean.detach())
        return loss

    @torch.no_grad()
    def update_stats(self, ae: KLAutoencoder3D, mean: torch.Tensor) -> None:
        m = mean.double()
        stats = torch.stack([m.mean(), (m * m).mean()])
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(stats)
            stats /= torch.distributed.get_world_size()
        a = 0.0 if int(ae.latent_n) == 0 else self.stats_momentum
        ae.latent_m1.mul_(a).add_((1 - a) * stats[0])
        ae.latent_m2.mul_(a).add_((1 - a) * stats[1])
        ae.latent_n.add_(1)

    def grid(self, net, batch, frozen):
        x = batch['image']
        recon = net(x, sample=False, cond=batch_condition(net, batch))[0]
        return torch.cat([x, recon.clamp(-1, 1)]) # Originals, then their reconstructions (three mid-slices each).

#----------------------------------------------------------------------------
