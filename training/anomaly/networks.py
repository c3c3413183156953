# medEDM: diffusion-model training toolkit for medical imaging.

"""Networks of the anomaly family.

`ResNetEncoder`: a ResNet-style encoder (He et al. 2016) of a clean slice,
basic residual blocks with GroupNorm (BatchNorm does not suit small DDP
batches), depth set by `blocks` per stage ([2, 2, 2, 2] = ResNet-18 layout;
the reference uses a ResNet-50 from SparK).

`EncoderConditionedPrecond` (cDDPM): the encoder and an EDM-preconditioned
DhariwalUNet in ONE module, so that the jointly trained encoder is EMA'd,
DDP'd, snapshotted and init_from'd with the denoiser. Its `cond` argument is
the clean input slice (the condition of cDDPM); the encoder's pooled
features pass a linear head to the embedding e, which the U-Net maps with its
own MLP and concatenates with the noise embedding after the noise MLP
(DhariwalUNet embedding_mlp=True), as the reference does (time embedding
and label embedding of half the width each, concatenated).

`MaskedPretrainNet`: the same encoder with a light convolutional decoder,
for the masked-image pretraining stage (loss.MaskedPretrainLoss); its
`encoder.*` weights load into the cDDPM with
training.init_from={path: <snapshot>, module: encoder, source: encoder}."""

import torch
from torch.nn.functional import silu

from torch_utils import persistence
from training import networks
from training.layers import Conv2d, GroupNorm, Linear

#----------------------------------------------------------------------------

class _BasicBlock(torch.nn.Module):
    def __init__(self, cin: int, cout: int, down: bool):
        super().__init__()
        init = dict(init_mode='kaiming_uniform', init_weight=1, init_bias=0)
        self.norm0 = GroupNorm(num_channels=cin)
        self.conv0 = Conv2d(cin, cout, kernel=3, down=down, **init)
        self.norm1 = GroupNorm(num_channels=cout)
        self.conv1 = Conv2d(cout, cout, kernel=3, init_mode='kaiming_uniform', init_weight=1e-5, init_bias=0)
        self.skip = Conv2d(cin, cout, kernel=1, down=down, **init) if (down or cin != cout) else None

    def forward(self, x):
        h = self.conv0(silu(self.norm0(x)))
        h = self.conv1(silu(self.norm1(h)))
        return h + (x if self.skip is None else self.skip(x))

class ResNetEncoder(torch.nn.Module):
    def __init__(self,
        in_channels     = 1,            # Image channels.
        channels        = 32,           # Channels of the first stage (doubled per stage).
        blocks          = [2, 2, 2, 2], # Residual blocks per stage; every stage after the first halves the resolution.
    ):
        super().__init__()
        if not blocks or any((not isinstance(b, int)) or b < 1 for b in blocks):
            raise ValueError(f'training.network.encoder_blocks must be a non-empty list of positive ints, got {blocks!r}')
        self.stem = Conv2d(in_channels, channels, kernel=3, init_mode='kaiming_uniform', init_weight=1, init_bias=0)
        layers = []
        cin = channels
        for stage, count in enumerate(blocks):
            cout = channels * 2 ** stage
            for k in range(count):
                layers.append(_BasicBlock(cin, cout, down=(stage > 0 and k == 0)))
                cin = cout
        self.blocks = torch.nn.Sequential(*layers)
        self.out_norm = GroupNorm(num_channels=cin)
        self.out_channels = cin
        self.stride = 2 ** (len(blocks) - 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return silu(self.out_norm(self.blocks(self.stem(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(2, 3)) # Global average pooling.

#----------------------------------------------------------------------------
# cDDPM: encoder + EDMPrecond(DhariwalUNet) in one module.

@persistence.persistent_class
class EncoderConditionedPrecond(torch.nn.Module):
    def __init__(self,
        img_resolution,                 # Image resolution.
        img_channels,                   # Number of color channels.
        label_dim       = 0,            # Number of class labels, 0 = unconditional.
        embedding_dim   = None,         # Width of the encoder embedding, None = the U-Net's emb_channels (reference: 4 x model_channels).
        encoder_channels = 32,          # Channels of the encoder's first stage.
        encoder_blocks  = [2, 2, 2, 2], # Residual blocks per encoder stage (depth).
        **precond_kwargs,               # EDMPrecond and DhariwalUNet options (model_channels, channel_mult, sigma_data, ...).
    ):
        super().__init__()
        precond_kwargs = dict(precond_kwargs)
        precond_kwargs.setdefault('model_type', 'DhariwalUNet')
        if precond_kwargs['model_type'] != 'DhariwalUNet':
            raise ValueError(f"training.network.model_type: the cDDPM network concatenates the embedding inside DhariwalUNet; got {precond_kwargs['model_type']!r}")
        if embedding_dim is None:
            embedding_dim = precond_kwargs.get('model_channels', 192) * precond_kwargs.get('channel_mult_emb', 4)
        self.encoder = ResNetEncoder(in_channels=img_channels, channels=encoder_channels, blocks=list(encoder_blocks))
        self.encoder_head = Linear(self.encoder.out_channels, embedding_dim, init_mode='kaiming_uniform', init_weight=1, init_bias=0)
        self.precond = networks.EDMPrecond(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
            embedding_dim=embedding_dim, embedding_mlp=True, **precond_kwargs)
        for key in ('img_resolution', 'img_channels', 'label_dim', 'img_shape', 'sigma_min', 'sigma_max', 'sigma_data'):
            setattr(self, key, getattr(self.precond, key))
        self.embedding_dim = embedding_dim

    def round_sigma(self, sigma):
        return self.precond.round_sigma(sigma)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Embedding (N, embedding_dim) of clean slices (N, C, H, W)."""
        return self.encoder_head(self.encoder(image.to(torch.float32)))

    def forward(self, x, sigma, class_labels=None, cond=None, embedding=None, augment_labels=None, **kwargs):
        """D(x; sigma | encoder(cond)); or with a precomputed `embedding` (test time: one encoder pass for every sigma)."""
        if embedding is None:
            if cond is None:
                raise ValueError('cond: the cDDPM network needs the clean input slice as cond (the encoder\'s input)')
            if tuple(cond.shape) != tuple(x.shape):
                raise ValueError(f'cond: expected the clean slice of shape {tuple(x.shape)}, got {tuple(cond.shape)}')
            embedding = self.encode(cond)
        return self.precond(x, sigma, class_labels=class_labels, embedding=embedding, augment_labels=augment_labels, **kwargs)

#----------------------------------------------------------------------------
# Encoder pretraining: masked image -> encoder features -> light decoder.

@persistence.persistent_class
class MaskedPretrainNet(torch.nn.Module):
    def __init__(self,
        img_resolution,                 # Image resolution.
        img_channels,                   # Number of color channels.
        label_dim       = 0,            # Unused (interface of the training loop).
        encoder_channels = 32,          # As EncoderConditionedPrecond (the weights must fit).
        encoder_blocks  = [2, 2, 2, 2], # As EncoderConditionedPrecond.
    ):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.img_shape = [img_channels, img_resolution, img_resolution]
        self.encoder = ResNetEncoder(in_channels=img_channels, channels=encoder_channels, blocks=list(encoder_blocks))
        init = dict(init_mode='kaiming_uniform', init_weight=1, init_bias=0)
        layers, c = [], self.encoder.out_channels
        for _ in range(len(encoder_blocks) - 1):
            layers += [Conv2d(c, max(c // 2, 8), kernel=3, up=True, **init), GroupNorm(num_channels=max(c // 2, 8)), torch.nn.SiLU()]
            c = max(c // 2, 8)
        layers.append(Conv2d(c, img_channels, kernel=3, **init))
        self.decoder = torch.nn.Sequential(*layers)

    def forward(self, x, *args, **kwargs):
        return self.decoder(self.encoder.features(x.to(torch.float32)))

#----------------------------------------------------------------------------
