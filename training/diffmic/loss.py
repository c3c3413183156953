# medEDM: diffusion-model training toolkit for medical imaging.

"""Label-space EDM of DiffMIC: the loss object of the diffusion stage.

The frozen DCG (training.frozen.dcg) gives the priors y_fusion, y_global,
y_local of each (augmented) training image. The sample is the residual
r = onehot - y_fusion (the target, batch key 'residual'); it is noised with
EDM's log-normal sigma and denoised by a vector denoiser that sees the noisy
residual, the image (`cond`, encoded inside the network and multiplied into
the label branch, DiffMIC's f(x) product) and the three priors (`embedding`,
3K values). DiffMIC-v2's focal weight 1 + alpha (1 - p_true)^gamma, with
p_true = y_fusion[true class], weighs each sample (`sample_weight`).
At test time: y0 = y_fusion + denoised residual (training/diffmic/inference.py)."""

import torch

from torch_utils import persistence
from training.loss import EDMLoss

#----------------------------------------------------------------------------

def frozen_dcg(frozen: dict | None, name: str) -> torch.nn.Module:
    if not frozen or name not in frozen:
        raise ValueError(f'training.loss.dcg={name!r}: no such network in training.frozen ({sorted(frozen or {})}); '
            f'set training.frozen.{name}=<DCG network-snapshot-*.pkl>')
    return frozen[name]

def check_classes(dcg: torch.nn.Module, num_classes: int, where: str) -> None:
    k = getattr(dcg, 'label_dim', None)
    if k != num_classes:
        raise ValueError(f'{where}: the DCG snapshot classifies {k} classes, but the data have {num_classes}')

@torch.no_grad()
def priors(dcg: torch.nn.Module, images: torch.Tensor) -> dict:
    """The DCG's y_fusion (N, K) and embedding = [y_fusion, y_global, y_local] (N, 3K)."""
    out = dcg(images)
    return dict(prior=out['prob_fusion'], embedding=torch.cat([out['prob_fusion'], out['prob_global'], out['prob_local']], dim=1))

#----------------------------------------------------------------------------

@persistence.persistent_class
class LabelEDMLoss(EDMLoss):
    def __init__(self,
        dcg         = 'dcg',    # Name of the frozen DCG in training.frozen.
        focal_alpha = 10.0,     # Focal weight 1 + alpha (1 - p_true)^gamma (DiffMIC-v2: 10) ...
        focal_gamma = 1.0,      # ... and its exponent (DiffMIC-v2: 1); alpha = 0: no weighting.
        P_mean      = -1.2,     # Mean of ln(sigma) during training.
        P_std       = 1.2,      # Standard deviation of ln(sigma) during training.
        sigma_data  = 0.25,     # Expected standard deviation of the residuals.
    ):
        super().__init__(P_mean=P_mean, P_std=P_std, sigma_data=sigma_data, target_key='residual')
        if focal_alpha < 0 or focal_gamma < 0:
            raise ValueError(f'training.loss.focal_alpha/focal_gamma must be >= 0, got {focal_alpha}, {focal_gamma}')
        self.dcg, self.focal_alpha, self.focal_gamma = dcg, float(focal_alpha), float(focal_gamma)

    def network_interface(self, interface_kwargs: dict, frozen: dict) -> dict:
        """Vectors of K = the number of classes; the image is the condition; the priors the embedding."""
        k = int(interface_kwargs['label_dim'])
        check_classes(frozen_dcg(frozen, self.dcg), k, f'training.frozen.{self.dcg}')
        return dict(img_resolution=interface_kwargs['img_resolution'], img_channels=k, label_dim=0,
            cond_channels=interface_kwargs['img_channels'], embedding_dim=3 * k)

    def prepare(self, batch: dict, frozen: dict) -> dict:
        """Add prior, embedding and residual (the target) to the batch."""
        p = priors(frozen_dcg(frozen, self.dcg), batch['image'])
        return dict(batch, **p, residual=batch['onehot'] - p['prior'])

    def condition(self, net, batch: dict) -> dict:
        return dict(cond=batch['image'], embedding=batch['embedding'])

    def sample_weight(self, batch: dict, D: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        if self.focal_alpha == 0:
            return None
        p_true = (batch['prior'] * batch['onehot']).sum(dim=1)
        return 1 + self.focal_alpha * (1 - p_true).clamp(min=0) ** self.focal_gamma

    def __call__(self, net, batch: dict, augment_pipe=None, frozen=None) -> torch.Tensor:
        if augment_pipe is not None:
            raise ValueError('training.augment: the label diffusion stage augments in the dataset (training.dataset.augment); set training.augment to null')
        return super().__call__(net, self.prepare(batch, frozen))

    def grid(self, net, batch, frozen):
        return None # Label vectors: no snapshot picture.

#----------------------------------------------------------------------------
