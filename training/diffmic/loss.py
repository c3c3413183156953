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
At test time: y0 = y_fusion + denoised residual (training/diffmic/inference.py).

DiffMIC-v2's dual-granularity guided map (`guided_map` = np > 0): the label
is a K x np x np map whose guide at position (i, j) is

    G_ij = (1 - lambda_ij) y_global + lambda_ij y_local,  lambda_ij = |i - j| / (np - 1)

(y_global on the diagonal, y_local in the corners (np-1, 0) and (0, np-1)),
denoised by 1x1 convolutions with the guide concatenated to the noisy map,
the class scores the mean over the map. 1x1 convolutions make the positions
np^2 vector problems that differ only in their guide; only v2's BatchNorm,
over batch and positions, couples them in training, and that coupling is not
reproduced. Here each training sample takes the guide of one uniformly drawn
position as its prior (an unbiased draw of the positions of the map; the
guide enters as the prior of the residual and as the first part of the
embedding [G_ij, y_global, y_local], not as input channels), and at test
sample j of an image takes position j mod np^2 (inference.py); the focal
weight keeps y_fusion."""

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

def guided_lambdas(guided_map: int, device: torch.device | None = None) -> torch.Tensor:
    """lambda_ij = |i - j| / (np - 1) of the np x np guided map, row-major (np^2,)."""
    i = torch.arange(guided_map, device=device)
    return ((i[:, None] - i[None, :]).abs().to(torch.float32) / (guided_map - 1)).reshape(-1)

def guided_priors(embedding: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """The guide (1 - lambda) y_global + lambda y_local of each row; embedding (N, 3K) = [y_fusion, y_global, y_local], lam (N,)."""
    k = embedding.shape[1] // 3
    lam = lam[:, None].to(embedding.dtype)
    return (1 - lam) * embedding[:, k:2 * k] + lam * embedding[:, 2 * k:]

def with_prior(p: dict, prior: torch.Tensor) -> dict:
    """Priors with `prior` in place of y_fusion as the sample's prior and the first part of its embedding."""
    k = prior.shape[1]
    return dict(p, prior=prior, embedding=torch.cat([prior, p['embedding'][:, k:]], dim=1))

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
        guided_map  = 0,        # DiffMIC-v2's guided map of np x np guides between y_global and y_local (v2: np = 6); 0 = the prior is y_fusion.
    ):
        super().__init__(P_mean=P_mean, P_std=P_std, sigma_data=sigma_data, target_key='residual')
        if focal_alpha < 0 or focal_gamma < 0:
            raise ValueError(f'training.loss.focal_alpha/focal_gamma must be >= 0, got {focal_alpha}, {focal_gamma}')
        if isinstance(guided_map, bool) or not isinstance(guided_map, int) or guided_map < 0 or guided_map == 1:
            raise ValueError(f'training.loss.guided_map: expected 0 (off) or an integer np >= 2, got {guided_map!r}')
        self.dcg, self.focal_alpha, self.focal_gamma = dcg, float(focal_alpha), float(focal_gamma)
        self.guided_map = guided_map

    def network_interface(self, interface_kwargs: dict, frozen: dict) -> dict:
        """Vectors of K = the number of classes; the image is the condition; the priors the embedding."""
        k = int(interface_kwargs['label_dim'])
        check_classes(frozen_dcg(frozen, self.dcg), k, f'training.frozen.{self.dcg}')
        return dict(img_resolution=interface_kwargs['img_resolution'], img_channels=k, label_dim=0,
            cond_channels=interface_kwargs['img_channels'], embedding_dim=3 * k)

    def prepare(self, batch: dict, frozen: dict) -> dict:
        """Add prior, embedding, fusion (y_fusion, for the focal weight) and residual (the target) to the batch."""
        p = priors(frozen_dcg(frozen, self.dcg), batch['image'])
        fusion = p['prior']
        if self.guided_map:
            lam = guided_lambdas(self.guided_map, fusion.device)
            p = with_prior(p, guided_priors(p['embedding'], lam[torch.randint(len(lam), [len(fusion)], device=fusion.device)]))
        return dict(batch, **p, fusion=fusion, residual=batch['onehot'] - p['prior'])

    def condition(self, net, batch: dict) -> dict:
        return dict(cond=batch['image'], embedding=batch['embedding'])

    def sample_weight(self, batch: dict, D: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        if self.focal_alpha == 0:
            return None
        p_true = (batch['fusion'] * batch['onehot']).sum(dim=1)
        return 1 + self.focal_alpha * (1 - p_true).clamp(min=0) ** self.focal_gamma

    def __call__(self, net, batch: dict, augment_pipe=None, frozen=None) -> torch.Tensor:
        if augment_pipe is not None:
            raise ValueError('training.augment: the label diffusion stage augments in the dataset (training.dataset.augment); set training.augment to null')
        return super().__call__(net, self.prepare(batch, frozen))

    def grid(self, net, batch, frozen):
        return None # Label vectors: no snapshot picture.

#----------------------------------------------------------------------------
