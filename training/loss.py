# medEDM: diffusion-model training toolkit for medical imaging.

"""Loss functions of "Elucidating the Design Space of Diffusion-Based
Generative Models" (Karras et al. 2022), as loss objects.

A loss object is called as `loss_fn(net, batch, augment_pipe=None)` with the
batch dict of the dataset (`image`, optional `label`, `cond`, `mask`, ...) and
returns the per-element loss; the training loop sums over elements and
averages over samples. It owns how sigma is drawn and where the noise goes:
families subclass `DiffusionLoss` and override `sample_sigma`, `weight` or
`__call__`."""

import torch

from torch_utils import persistence

#----------------------------------------------------------------------------
# Shared mechanics: draw sigma, augment image and conditions jointly, add
# noise, denoise, weight (Eq. 2 and Eq. 8 of the paper).

class DiffusionLoss:
    def sample_sigma(self, shape: list[int], device: torch.device) -> torch.Tensor:
        raise NotImplementedError

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, net, batch: dict, augment_pipe=None) -> torch.Tensor:
        images = batch['image']
        sigma = self.sample_sigma([images.shape[0]] + [1] * (images.ndim - 1), images.device)
        weight = self.weight(sigma)
        augment_labels = None
        if augment_pipe is not None:
            batch, augment_labels = augment_pipe(batch)
        y = batch['image']
        n = torch.randn_like(y) * sigma
        D_yn = net(y + n, sigma, class_labels=batch.get('label'), cond=batch.get('cond'), augment_labels=augment_labels)
        return weight * ((D_yn - y) ** 2)

#----------------------------------------------------------------------------
# Variance preserving (VP) formulation, Song et al. 2021 (Eq. 103 of EDM).

@persistence.persistent_class
class VPLoss(DiffusionLoss):
    def __init__(self,
        beta_d      = 19.9,     # Extent of the noise level schedule.
        beta_min    = 0.1,      # Initial slope of the noise level schedule.
        epsilon_t   = 1e-5,     # Minimum t-value used during training.
    ):
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.epsilon_t = epsilon_t

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * (t ** 2) + self.beta_min * t).exp() - 1).sqrt()

    def sample_sigma(self, shape, device):
        rnd_uniform = torch.rand(shape, device=device)
        return self.sigma(1 + rnd_uniform * (self.epsilon_t - 1))

    def weight(self, sigma):
        return 1 / sigma ** 2

#----------------------------------------------------------------------------
# Variance exploding (VE) formulation, Song et al. 2021 (Eq. 104 of EDM).

@persistence.persistent_class
class VELoss(DiffusionLoss):
    def __init__(self,
        sigma_min   = 0.02,     # Minimum supported noise level.
        sigma_max   = 100,      # Maximum supported noise level.
    ):
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def sample_sigma(self, shape, device):
        rnd_uniform = torch.rand(shape, device=device)
        return self.sigma_min * ((self.sigma_max / self.sigma_min) ** rnd_uniform)

    def weight(self, sigma):
        return 1 / sigma ** 2

#----------------------------------------------------------------------------
# EDM formulation (Section 5): log-normal sigma, lambda(sigma) = 1 / c_out^2.

@persistence.persistent_class
class EDMLoss(DiffusionLoss):
    def __init__(self,
        P_mean      = -1.2,     # Mean of ln(sigma) during training.
        P_std       = 1.2,      # Standard deviation of ln(sigma) during training.
        sigma_data  = 0.5,      # Expected standard deviation of the training data.
    ):
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data

    def sample_sigma(self, shape, device):
        rnd_normal = torch.randn(shape, device=device)
        return (rnd_normal * self.P_std + self.P_mean).exp()

    def weight(self, sigma):
        return (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2

#----------------------------------------------------------------------------
