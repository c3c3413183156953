# medEDM: diffusion-model training toolkit for medical imaging.

"""Denoiser of vectors (N, K), conditioned on features of an image, for
diffusion in label space (DiffMIC, Yang et al. 2023: the residual between a
one-hot label and a classifier's prior is the sample; CARD, Han et al. 2022).

The condition `cond` is either a feature vector (N, F) (`cond_type='vector'`,
F = cond_channels), or an image (N, C, H, W) (`cond_type='image'`,
C = cond_channels) that a small CNN inside encodes (conv + GroupNorm + SiLU
stages with stride-2 downsampling, then global average pooling). The
features and the noise embedding (+ class labels, augment labels, a
continuous embedding vector) modulate a residual MLP over the K entries:
each block is h + W2 silu(norm(W1 silu(h)) (1 + scale) + shift), with
(scale, shift) from the embedding, as the 2-D U-Net blocks are modulated.
With `cond_product`, the condition's features also multiply the vector
branch at its input (DiffMIC's f(x) * g(y) product).
No batch statistics anywhere: a sample never depends on the others.
"""

import numpy as np
import torch
from torch.nn.functional import silu

from training.layers import Conv2d, GroupNorm, Linear, PositionalEmbedding
from training.networks import _adm_mapping, _check_embedding

#----------------------------------------------------------------------------
# Small CNN: image (N, C, H, W) -> feature vector (N, out_features).

class ImageEncoder(torch.nn.Module):
    def __init__(self,
        in_channels,                    # Channels of the condition image.
        out_features,                   # Width of the feature vector.
        channels        = 32,           # Channels of the first stage (doubled per stage).
        num_levels      = 3,            # Stages; each after the first halves H and W.
    ):
        super().__init__()
        init = dict(init_mode='kaiming_uniform', init_weight=np.sqrt(1/3), init_bias=np.sqrt(1/3))
        layers = []
        cin = in_channels
        for level in range(num_levels):
            cout = channels << level
            layers += [Conv2d(in_channels=cin, out_channels=cout, kernel=3, down=(level > 0), **init), GroupNorm(num_channels=cout)]
            cin = cout
        self.layers = torch.nn.ModuleList(layers)
        self.out = Linear(in_features=cin, out_features=out_features, **init)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image
        for conv, norm in zip(self.layers[0::2], self.layers[1::2]):
            x = silu(norm(conv(x)))
        return self.out(x.mean(dim=(2, 3)))

#----------------------------------------------------------------------------
# Residual MLP block modulated by the embedding (scale and shift).

class VectorBlock(torch.nn.Module):
    def __init__(self, channels, emb_channels, dropout=0, init=dict(), init_zero=dict(init_weight=0)):
        super().__init__()
        self.dropout = dropout
        self.fc0 = Linear(in_features=channels, out_features=channels, **init)
        self.affine = Linear(in_features=emb_channels, out_features=channels * 2, **init)
        self.norm = GroupNorm(num_channels=channels)
        self.fc1 = Linear(in_features=channels, out_features=channels, **init_zero)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = self.fc0(silu(h))
        scale, shift = self.affine(emb).to(x.dtype).chunk(2, dim=1)
        x = silu(torch.addcmul(shift, self.norm(x[:, :, None])[:, :, 0], scale + 1))
        x = self.fc1(torch.nn.functional.dropout(x, p=self.dropout, training=self.training))
        return h + x

#----------------------------------------------------------------------------
# Vector denoiser F(x, c_noise, cond) for a preconditioner (model_type='VectorDenoiser').

class VectorDenoiser(torch.nn.Module):
    spatial_dims = 0        # Samples are vectors (N, K), K = img_channels of the preconditioner.
    concat_cond = False     # The condition is encoded, not concatenated.

    def __init__(self,
        img_resolution,                 # Unused (vectors have no resolution); kept for the preconditioner's interface.
        in_channels,                    # K, the length of the vectors.
        out_channels,                   # K as well.
        label_dim       = 0,            # Number of class labels (a class CONDITION), 0 = none.
        augment_dim     = 0,            # Augmentation label dimensionality, 0 = none.
        cond_channels   = 0,            # F (feature vector) or C (image) of the condition, 0 = none.
        cond_type       = 'vector',     # 'vector': cond is (N, F); 'image': cond is (N, C, H, W), encoded by a CNN.
        model_channels  = 128,          # Width of the MLP.
        channel_mult_emb = 2,           # Embedding width as a multiple of model_channels.
        num_blocks      = 3,            # Residual MLP blocks.
        encoder_channels = 32,          # Image condition: channels of the CNN's first stage.
        encoder_levels  = 3,            # Image condition: CNN stages.
        dropout         = 0,            # Dropout probability inside the blocks.
        label_dropout   = 0,            # Dropout probability of class labels for classifier-free guidance.
        embedding_dim   = 0,            # Width of a continuous embedding vector, 0 = none.
        cond_product    = False,        # DiffMIC: also multiply the condition's features into the vector branch (h = W x * G f(cond)).
    ):
        if cond_type not in ('vector', 'image'):
            raise ValueError(f"cond_type: expected 'vector' or 'image', got {cond_type!r}")
        if in_channels != out_channels:
            raise ValueError(f'VectorDenoiser: in_channels ({in_channels}) must equal out_channels ({out_channels})')
        super().__init__()
        self.label_dim = label_dim
        self.label_dropout = label_dropout
        self.embedding_dim = embedding_dim
        self.cond_channels = cond_channels
        self.cond_type = cond_type
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode='kaiming_uniform', init_weight=np.sqrt(1/3), init_bias=np.sqrt(1/3))
        init_zero = dict(init_mode='kaiming_uniform', init_weight=0, init_bias=0)

        # Mapping: noise (+ augment) embedding [+ embedding vector] -> MLP, + label and condition features.
        self.map_noise = PositionalEmbedding(num_channels=model_channels)
        self.map_augment = Linear(in_features=augment_dim, out_features=model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(in_features=model_channels + embedding_dim, out_features=emb_channels, **init)
        self.map_layer1 = Linear(in_features=emb_channels, out_features=emb_channels, **init)
        self.map_label = Linear(in_features=label_dim, out_features=emb_channels, bias=False, init_mode='kaiming_normal', init_weight=np.sqrt(label_dim)) if label_dim else None
        self.map_cond = None
        if cond_channels and cond_type == 'vector':
            self.map_cond = Linear(in_features=cond_channels, out_features=emb_channels, **init)
        elif cond_channels:
            self.map_cond = ImageEncoder(in_channels=cond_channels, out_features=emb_channels, channels=encoder_channels, num_levels=encoder_levels)
        if cond_product and not cond_channels:
            raise ValueError('cond_product: needs a condition (cond_channels > 0)')
        self.map_product = Linear(in_features=emb_channels, out_features=model_channels, **init) if cond_product else None

        # Residual MLP over the vector.
        self.inp = Linear(in_features=in_channels, out_features=model_channels, **init)
        self.blocks = torch.nn.ModuleList([VectorBlock(model_channels, emb_channels, dropout=dropout, init=init, init_zero=init_zero) for _ in range(num_blocks)])
        self.out_norm = GroupNorm(num_channels=model_channels)
        self.out = Linear(in_features=model_channels, out_features=out_channels, **init_zero)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None,
            augment_labels: torch.Tensor | None = None, embedding: torch.Tensor | None = None, cond: torch.Tensor | None = None) -> torch.Tensor:
        n = x.shape[0]
        _check_embedding(embedding, self.embedding_dim, n)
        if self.map_cond is not None:
            want = 2 if self.cond_type == 'vector' else 4
            if cond is None or cond.ndim != want:
                raise ValueError(f'cond: expected {"a feature vector (N, F)" if want == 2 else "an image (N, C, H, W)"} for '
                    f"cond_type='{self.cond_type}', got {None if cond is None else tuple(cond.shape)}")

        # Mapping.
        emb = _adm_mapping(self, noise_labels, class_labels, augment_labels, embedding, n, x.device)
        features = None
        if self.map_cond is not None:
            features = self.map_cond(cond.to(x.dtype))
            emb = emb + features.to(emb.dtype)
        emb = silu(emb)

        # Residual MLP (DiffMIC: the vector branch times the condition's features).
        h = self.inp(x)
        if self.map_product is not None:
            h = h * self.map_product(silu(features)).to(h.dtype)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(silu(self.out_norm(h[:, :, None])[:, :, 0]))

#----------------------------------------------------------------------------
