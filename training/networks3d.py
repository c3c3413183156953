# medEDM: diffusion-model training toolkit for medical imaging.

"""3-D U-Net of the ADM family (Dhariwal & Nichol 2021, the `DhariwalUNet`
of EDM) for volumes (N, C, D, H, W), e.g. the latent EDM of the 3-D LDM
inpainting (Durrer et al. 2024). Same structure as the 2-D `DhariwalUNet`:
a mapping network (noise embedding + augment labels [+ continuous embedding
vector], MLP, + class-label embedding), an encoder and decoder of residual
`UNetBlock`s (here with Conv3d) with skip connections and self-attention at
chosen resolutions, GroupNorm + SiLU + zero-initialised output conv.

Volumes need not be cubic: `img_resolution` is an int or [D, H, W]; every
size must be divisible by 2^(len(channel_mult) - 1). A level has
self-attention when the largest of its sizes is in `attn_resolutions`.
`checkpoint=True` recomputes every block in the backward pass
(torch.utils.checkpoint), trading compute for activation memory.
"""

import numpy as np
import torch
import torch.utils.checkpoint
from torch.nn.functional import silu

from training.layers import Conv3d, GroupNorm, Linear, PositionalEmbedding, UNetBlock
from training.networks import _adm_mapping, _check_embedding, _spatial_shape

#----------------------------------------------------------------------------
# ADM U-Net for volumes.

class DhariwalUNet3D(torch.nn.Module):
    spatial_dims = 3

    def __init__(self,
        img_resolution,                     # Volume size at input/output: int (cubic) or [D, H, W].
        in_channels,                        # Number of channels at input (image + condition).
        out_channels,                       # Number of channels at output.
        label_dim           = 0,            # Number of class labels, 0 = unconditional.
        augment_dim         = 0,            # Augmentation label dimensionality, 0 = no augmentation.

        model_channels      = 64,           # Base multiplier for the number of channels.
        channel_mult        = [1,2,2,4],    # Per-resolution multipliers for the number of channels.
        channel_mult_emb    = 4,            # Multiplier for the dimensionality of the embedding vector.
        num_blocks          = 2,            # Number of residual blocks per resolution.
        attn_resolutions    = [8],          # Levels with self-attention (largest size of the level).
        channels_per_head   = 64,           # Attention channels per head.
        dropout             = 0.10,         # Dropout probability of intermediate activations.
        label_dropout       = 0,            # Dropout probability of class labels for classifier-free guidance.
        embedding_dim       = 0,            # Width of a continuous embedding vector, 0 = none.
        checkpoint          = False,        # Recompute blocks in the backward pass (activation checkpointing)?
    ):
        super().__init__()
        size = _spatial_shape(img_resolution, 3)
        factor = 1 << (len(channel_mult) - 1)
        if any(s % factor for s in size):
            raise ValueError(f'img_resolution: {size} must be divisible by 2^(len(channel_mult) - 1) = {factor} '
                f'for channel_mult={list(channel_mult)}')
        self.img_shape = size
        self.label_dim = label_dim
        self.label_dropout = label_dropout
        self.embedding_dim = embedding_dim
        self.checkpoint = bool(checkpoint)
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode='kaiming_uniform', init_weight=np.sqrt(1/3), init_bias=np.sqrt(1/3))
        init_zero = dict(init_mode='kaiming_uniform', init_weight=0, init_bias=0)
        block_kwargs = dict(emb_channels=emb_channels, channels_per_head=channels_per_head, dropout=dropout, init=init, init_zero=init_zero, dims=3)

        # Mapping network: noise (+ augment) embedding [+ embedding vector] -> MLP, then + label embedding.
        self.map_noise = PositionalEmbedding(num_channels=model_channels)
        self.map_augment = Linear(in_features=augment_dim, out_features=model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(in_features=model_channels + embedding_dim, out_features=emb_channels, **init)
        self.map_layer1 = Linear(in_features=emb_channels, out_features=emb_channels, **init)
        self.map_label = Linear(in_features=label_dim, out_features=emb_channels, bias=False, init_mode='kaiming_normal', init_weight=np.sqrt(label_dim)) if label_dim else None

        # Encoder.
        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = [s >> level for s in size]
            name = 'x'.join(str(r) for r in res)
            attn = max(res) in attn_resolutions
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f'{name}_conv'] = Conv3d(in_channels=cin, out_channels=cout, kernel=3, **init)
            else:
                self.enc[f'{name}_down'] = UNetBlock(in_channels=cout, out_channels=cout, down=True, **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f'{name}_block{idx}'] = UNetBlock(in_channels=cin, out_channels=cout, attention=attn, **block_kwargs)
        skips = [block.out_channels for block in self.enc.values()]

        # Decoder.
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = [s >> level for s in size]
            name = 'x'.join(str(r) for r in res)
            attn = max(res) in attn_resolutions
            if level == len(channel_mult) - 1:
                self.dec[f'{name}_in0'] = UNetBlock(in_channels=cout, out_channels=cout, attention=True, **block_kwargs)
                self.dec[f'{name}_in1'] = UNetBlock(in_channels=cout, out_channels=cout, **block_kwargs)
            else:
                self.dec[f'{name}_up'] = UNetBlock(in_channels=cout, out_channels=cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f'{name}_block{idx}'] = UNetBlock(in_channels=cin, out_channels=cout, attention=attn, **block_kwargs)
        self.out_norm = GroupNorm(num_channels=cout)
        self.out_conv = Conv3d(in_channels=cout, out_channels=out_channels, kernel=3, **init_zero)

    def _block(self, block: UNetBlock, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.checkpoint and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, x, emb, use_reentrant=False) # Replays dropout's random stream.
        return block(x, emb)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None,
            augment_labels: torch.Tensor | None = None, embedding: torch.Tensor | None = None) -> torch.Tensor:
        n = x.shape[0]
        _check_embedding(embedding, self.embedding_dim, n)

        # Mapping.
        emb = _adm_mapping(self, noise_labels, class_labels, augment_labels, embedding, n, x.device)
        emb = silu(emb).to(x.dtype)

        # Encoder.
        skips = []
        for block in self.enc.values():
            x = self._block(block, x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)

        # Decoder.
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = self._block(block, x, emb)
        return self.out_conv(silu(self.out_norm(x)))

#----------------------------------------------------------------------------
