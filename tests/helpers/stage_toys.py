# medEDM test helpers: a two-stage toy pipeline (training/stages.py).
# Stage 1: a tiny convolutional autoencoder, trained by AutoencoderLoss (not a
# denoiser: no sigma; its snapshot picture is originals | reconstructions).
# Stage 2: EDM in the autoencoder's latent space (LatentEDMLoss encodes the
# images with the frozen encoder and decodes samples for generate.py).
# FrozenFeatureLoss: a loss object that holds a frozen module of its own.

import torch

from torch_utils import persistence
from training import sampling
from training.dataset import NpzDataset
from training.loss import EDMLoss

# Snapshots may name only persistent classes of the project's packages; this test module joins them.
if __name__ not in persistence.PROJECT_PACKAGES:
    persistence.PROJECT_PACKAGES = persistence.PROJECT_PACKAGES + (__name__,)

#----------------------------------------------------------------------------

@persistence.persistent_class
class TinyAutoencoder(torch.nn.Module):
    def __init__(self,
        img_resolution,             # Image resolution (even).
        img_channels,               # Image channels.
        label_dim       = 0,        # Unused (the loop passes the dataset's interface).
        latent_channels = 2,        # Channels of the latent, at half the resolution.
        width           = 8,        # Hidden channels.
    ):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.latent_channels, self.latent_resolution = latent_channels, img_resolution // 2
        self.enc = torch.nn.Sequential(torch.nn.Conv2d(img_channels, width, 3, padding=1), torch.nn.SiLU(),
            torch.nn.Conv2d(width, latent_channels, 4, stride=2, padding=1))
        self.dec = torch.nn.Sequential(torch.nn.ConvTranspose2d(latent_channels, width, 4, stride=2, padding=1), torch.nn.SiLU(),
            torch.nn.Conv2d(width, img_channels, 3, padding=1))

    def encode(self, x):
        return self.enc(x)

    def decode(self, z):
        return self.dec(z)

    def forward(self, x):
        return self.decode(self.encode(x))

@persistence.persistent_class
class AutoencoderLoss:
    def __init__(self):
        pass

    def __call__(self, net, batch, augment_pipe=None):
        x = batch['image']
        return (net(x) - x) ** 2

    def grid(self, net, batch, frozen):
        x = batch['image']
        return torch.cat([x, net(x)]) # Originals, then their reconstructions.

#----------------------------------------------------------------------------

@persistence.persistent_class
class LatentEDMLoss(EDMLoss):
    def __init__(self,
        encoder     = 'autoencoder', # Name of the frozen autoencoder in training.frozen.
        P_mean      = -1.2,         # Mean of ln(sigma) during training.
        P_std       = 1.2,          # Standard deviation of ln(sigma) during training.
        sigma_data  = 0.5,          # Expected standard deviation of the latents.
    ):
        super().__init__(P_mean=P_mean, P_std=P_std, sigma_data=sigma_data)
        self.encoder = encoder

    def _autoencoder(self, frozen):
        if not frozen or self.encoder not in frozen:
            raise ValueError(f'training.loss.encoder={self.encoder!r} is not a network of training.frozen ({sorted(frozen or {})})')
        return frozen[self.encoder]

    def network_interface(self, interface_kwargs, frozen):
        ae = self._autoencoder(frozen)
        return dict(interface_kwargs, img_resolution=ae.latent_resolution, img_channels=ae.latent_channels)

    def __call__(self, net, batch, augment_pipe=None, frozen=None):
        with torch.no_grad():
            latents = self._autoencoder(frozen).encode(batch['image'])
        return super().__call__(net, dict(batch, image=latents), augment_pipe)

    def decode(self, x, frozen):
        return self._autoencoder(frozen).decode(x)

    def grid(self, net, batch, frozen):
        n = batch['image'].shape[0]
        latents = torch.randn([n, *sampling.sample_shape(net)], device=batch['image'].device)
        return self.decode(sampling.edm_sampler(net, latents, num_steps=2).float(), frozen) # The sampler works in float64.

#----------------------------------------------------------------------------

@persistence.persistent_class
class FrozenFeatureLoss(EDMLoss, torch.nn.Module):
    """EDMLoss through a frozen 1x1 convolution of weight 1 (the identity), weighted
    by a trainable log-variance u: loss / e^u + u."""
    def __init__(self, **kwargs):
        torch.nn.Module.__init__(self)
        EDMLoss.__init__(self, **kwargs)
        self.features = torch.nn.Conv2d(1, 1, 1)
        with torch.no_grad():
            self.features.weight.fill_(1.0)
            self.features.bias.zero_()
        self.features.requires_grad_(False)
        self.logvar = torch.nn.Parameter(torch.zeros([]))

    def __call__(self, net, batch, augment_pipe=None):
        loss = self.features(super().__call__(net, batch, augment_pipe))
        return loss / self.logvar.exp() + self.logvar

#----------------------------------------------------------------------------

class FrozenSeeingDataset(NpzDataset):
    """NpzDataset whose device transform takes the frozen networks: it records what it got."""
    seen = []

    def device_transform(self, batch, frozen):
        FrozenSeeingDataset.seen.append(frozen)
        return batch

#----------------------------------------------------------------------------
