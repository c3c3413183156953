# medEDM: diffusion-model training toolkit for medical imaging.

"""DiffMIC's denoiser in label space: the engine's EDM preconditioner around
its `VectorDenoiser` (residual MLP over the K-vector, the image features
multiplied into the label branch: DiffMIC's f(x) * g(y)), with the family's
own image encoder f(x) in place of the engine's small average-pooled CNN.

    f(x) = W [mean_hw(F), topt_hw(F)],  F = ConvTrunk(x) (the DCG's trunk design)

topt_hw is the mean of the top-t fraction of each feature channel over the
positions (the DCG's top-t% aggregation, Shen et al. 2021): a lesion a few
pixels wide is a small share of the positions, and global average pooling
alone dilutes it (DiffMIC's ResNet encoder pools globally on 224 px images,
where a lesion covers more positions). The encoder is the network's
`model.map_cond`, so it is trained, EMA'd, snapshotted and cached at
inference (training/diffmic/inference.cached_encoder) like the engine's."""

import numpy as np
import torch

from torch_utils import persistence
from training.diffmic.dcg import ConvTrunk
from training.layers import Linear
from training.networks import EDMPrecond

#----------------------------------------------------------------------------
# Image (N, C, H, W) -> features (N, out_features): conv trunk, mean and top-t pooling.

class PooledEncoder(torch.nn.Module):
    def __init__(self, in_channels, out_features, channels=32, num_levels=3, percent_t=0.2):
        super().__init__()
        if not 0 < percent_t <= 1:
            raise ValueError(f'training.network.encoder_percent_t must be in (0, 1], got {percent_t}')
        self.percent_t = percent_t
        self.trunk = ConvTrunk(in_channels, channels, num_levels)
        init = dict(init_mode='kaiming_uniform', init_weight=np.sqrt(1/3), init_bias=np.sqrt(1/3))
        self.out = Linear(in_features=2 * self.trunk.out_channels, out_features=out_features, **init)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        f = self.trunk(image).flatten(2) # (N, C', h w)
        t = max(int(round(f.shape[2] * self.percent_t)), 1)
        return self.out(torch.cat([f.mean(dim=2), f.topk(t, dim=2).values.mean(dim=2)], dim=1))

#----------------------------------------------------------------------------

@persistence.persistent_class
class LabelDenoiser(EDMPrecond):
    def __init__(self,
        img_resolution,                 # Image resolution (of the condition image).
        img_channels,                   # K, the number of classes (the vector length).
        label_dim           = 0,        # No class condition (the class is the sample).
        cond_channels       = 1,        # Channels of the condition image.
        embedding_dim       = 0,        # Width of the prior embedding (3K: y_fusion, y_global, y_local).
        sigma_data          = 0.25,     # Expected standard deviation of the residuals.
        encoder_channels    = 32,       # Encoder: channels of the first stage (doubled per stage).
        encoder_levels      = 3,        # Encoder: stages.
        encoder_percent_t   = 0.2,      # Encoder: top-t fraction of the positions pooled beside the mean.
        **model_kwargs,                 # VectorDenoiser: model_channels, num_blocks, dropout, ...
    ):
        if not cond_channels:
            raise ValueError('LabelDenoiser: needs the image as condition (cond_channels > 0)')
        super().__init__(img_resolution, img_channels, label_dim=label_dim, sigma_data=sigma_data, model_type='VectorDenoiser',
            cond_channels=cond_channels, embedding_dim=embedding_dim, cond_type='image', cond_product=True,
            encoder_channels=1, encoder_levels=1, **model_kwargs) # The engine's encoder (smallest) is replaced below.
        emb_channels = self.model.map_layer1.out_features
        self.model.map_cond = PooledEncoder(cond_channels, emb_channels, encoder_channels, encoder_levels, encoder_percent_t)

#----------------------------------------------------------------------------
