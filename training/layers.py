# medEDM: diffusion-model training toolkit for medical imaging.

"""Building blocks of the denoiser networks of "Elucidating the Design Space
of Diffusion-Based Generative Models" (Karras et al., NeurIPS 2022).

Layers are written from the paper (Appendix F.2, Table 7) and the DDPM++ /
NCSN++ (Song et al. 2021) and ADM (Dhariwal & Nichol 2021) descriptions.
Parameter and buffer names follow NVlabs/edm so that state dicts are
interchangeable; no batch statistics are used anywhere, so the output for one
sample never depends on the other samples of the batch.
"""

from typing import Sequence

import numpy as np
import torch
from torch.nn.functional import silu

#----------------------------------------------------------------------------
# Random weight initialization scaled by fan-in / fan-out (Glorot & Bengio
# 2010; He et al. 2015), as used by DDPM++ (xavier) and ADM (kaiming).

def weight_init(shape: Sequence[int], mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    shape = list(shape)
    if mode == 'xavier_uniform':  return np.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == 'xavier_normal':   return np.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == 'kaiming_uniform': return np.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == 'kaiming_normal':  return np.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f'weight_init: unknown mode={mode!r}; expected xavier_uniform, xavier_normal, kaiming_uniform or kaiming_normal')

#----------------------------------------------------------------------------
# Fully-connected layer.

class Linear(torch.nn.Module):
    def __init__(self,
        in_features:    int,                        # Number of input features.
        out_features:   int,                        # Number of output features.
        bias:           bool    = True,             # Learn an additive bias?
        init_mode:      str     = 'kaiming_normal', # Weight initialization, see weight_init().
        init_weight:    float   = 1,                # Multiplier of the initial weights.
        init_bias:      float   = 0,                # Multiplier of the initial bias.
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = torch.nn.Parameter(weight_init([out_features, in_features], **fans) * init_weight)
        self.bias = torch.nn.Parameter(weight_init([out_features], **fans) * init_bias) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x @ self.weight.to(x.dtype).t()
        if self.bias is not None:
            x = x + self.bias.to(x.dtype)
        return x

#----------------------------------------------------------------------------
# 2D convolution with optional FIR up/down-sampling by 2 (kernel=0: resampling only).

class Conv2d(torch.nn.Module):
    def __init__(self,
        in_channels:        int,                        # Number of input channels.
        out_channels:       int,                        # Number of output channels.
        kernel:             int,                        # Kernel size, 0 = no convolution.
        bias:               bool    = True,             # Learn an additive bias?
        up:                 bool    = False,            # Upsample by 2 before the convolution?
        down:               bool    = False,            # Downsample by 2 after the convolution?
        resample_filter:    list    = [1,1],            # 1D taps of the separable resampling filter.
        fused_resample:     bool    = False,            # Resample and convolve in one strided op?
        init_mode:          str     = 'kaiming_normal', # Weight initialization, see weight_init().
        init_weight:        float   = 1,                # Multiplier of the initial weights.
        init_bias:          float   = 0,                # Multiplier of the initial bias.
    ):
        if up and down:
            raise ValueError('Conv2d: up and down cannot both be set')
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        self.weight = None
        self.bias = None
        if kernel:
            fans = dict(mode=init_mode, fan_in=in_channels*kernel*kernel, fan_out=out_channels*kernel*kernel)
            self.weight = torch.nn.Parameter(weight_init([out_channels, in_channels, kernel, kernel], **fans) * init_weight)
            if bias:
                self.bias = torch.nn.Parameter(weight_init([out_channels], **fans) * init_bias)
        taps = torch.as_tensor(resample_filter, dtype=torch.float32)
        f2d = torch.outer(taps, taps)[None, None] / taps.sum().square() # Separable 2D filter with unit DC gain.
        self.register_buffer('resample_filter', f2d if (up or down) else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        conv = torch.nn.functional.conv2d
        conv_t = torch.nn.functional.conv_transpose2d

        # Fused paths: the padding is shared between the filter and the kernel.
        if self.fused_resample and self.up and w is not None:
            x = conv_t(x, (f * 4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2, padding=max(f_pad - w_pad, 0))
            x = conv(x, w, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and self.down and w is not None:
            x = conv(x, w, padding=w_pad + f_pad)
            x = conv(x, f.tile([self.out_channels, 1, 1, 1]), groups=self.out_channels, stride=2)

        # Separate paths: resample (depthwise FIR), then convolve.
        else:
            if self.up:
                x = conv_t(x, (f * 4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2, padding=f_pad)
            if self.down:
                x = conv(x, f.tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2, padding=f_pad)
            if w is not None:
                x = conv(x, w, padding=w_pad)
        if b is not None:
            x = x + b.reshape(1, -1, 1, 1)
        return x

#----------------------------------------------------------------------------
# 3D convolution with the conventions of Conv2d (volumes N, C, D, H, W): the
# same fan-in / fan-out init over k^3 taps, and FIR up/down-sampling by 2 with
# the outer product of the taps along the three axes (unit DC gain).

class Conv3d(torch.nn.Module):
    def __init__(self,
        in_channels:        int,                        # Number of input channels.
        out_channels:       int,                        # Number of output channels.
        kernel:             int,                        # Kernel size, 0 = no convolution.
        bias:               bool    = True,             # Learn an additive bias?
        up:                 bool    = False,            # Upsample by 2 before the convolution?
        down:               bool    = False,            # Downsample by 2 after the convolution?
        resample_filter:    list    = [1,1],            # 1D taps of the separable resampling filter.
        init_mode:          str     = 'kaiming_normal', # Weight initialization, see weight_init().
        init_weight:        float   = 1,                # Multiplier of the initial weights.
        init_bias:          float   = 0,                # Multiplier of the initial bias.
    ):
        if up and down:
            raise ValueError('Conv3d: up and down cannot both be set')
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.weight = None
        self.bias = None
        if kernel:
            fans = dict(mode=init_mode, fan_in=in_channels*kernel**3, fan_out=out_channels*kernel**3)
            self.weight = torch.nn.Parameter(weight_init([out_channels, in_channels, kernel, kernel, kernel], **fans) * init_weight)
            if bias:
                self.bias = torch.nn.Parameter(weight_init([out_channels], **fans) * init_bias)
        taps = torch.as_tensor(resample_filter, dtype=torch.float32)
        f3d = torch.einsum('i,j,k->ijk', taps, taps, taps)[None, None] / taps.sum() ** 3 # Separable 3D filter, unit DC gain.
        self.register_buffer('resample_filter', f3d if (up or down) else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        if self.up: # Depthwise transposed FIR (gain 8 = 2^3 keeps the DC level).
            x = torch.nn.functional.conv_transpose3d(x, (f * 8).tile([self.in_channels, 1, 1, 1, 1]), groups=self.in_channels, stride=2, padding=f_pad)
        if self.down:
            x = torch.nn.functional.conv3d(x, f.tile([self.in_channels, 1, 1, 1, 1]), groups=self.in_channels, stride=2, padding=f_pad)
        if w is not None:
            x = torch.nn.functional.conv3d(x, w, padding=w_pad)
        if b is not None:
            x = x + b.reshape(1, -1, 1, 1, 1)
        return x

#----------------------------------------------------------------------------
# Group normalization (Wu & He 2018); statistics are per sample, never per batch.

class GroupNorm(torch.nn.Module):
    def __init__(self,
        num_channels:           int,            # Number of channels.
        num_groups:             int     = 32,   # Maximum number of groups.
        min_channels_per_group: int     = 4,    # Fewer groups if channels would be fewer than this.
        eps:                    float   = 1e-5, # Added to the variance.
    ):
        super().__init__()
        self.num_groups = max(min(num_groups, num_channels // min_channels_per_group), 1)
        if num_channels % self.num_groups != 0: # group_norm would fail at the first forward pass.
            raise ValueError(f'GroupNorm: a layer with {num_channels} channels does not split into {self.num_groups} groups')
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(num_channels))
        self.bias = torch.nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.group_norm(x, num_groups=self.num_groups,
            weight=self.weight.to(x.dtype), bias=self.bias.to(x.dtype), eps=self.eps)

#----------------------------------------------------------------------------
# Attention weights softmax(q^T k / sqrt(c)) in float32 for any input dtype; q, k: [n, c, l].
# k is scaled in its own dtype and then cast, as in EDM (in fp16 the order
# changes the rounding, and EDM's fp16 networks were trained with this one).

def attention_weights(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    logits = torch.einsum('ncq,nck->nqk', q.to(torch.float32), (k / np.sqrt(k.shape[1])).to(torch.float32))
    return torch.softmax(logits, dim=2).to(q.dtype)

#----------------------------------------------------------------------------
# Residual U-Net block with embedding modulation and self-attention (EDM App. F.2);
# dims=3 builds it from Conv3d for volumes (attention over all D*H*W voxels).

class UNetBlock(torch.nn.Module):
    def __init__(self,
        in_channels:        int,                            # Number of input channels.
        out_channels:       int,                            # Number of output channels.
        emb_channels:       int,                            # Width of the noise/label embedding.
        up:                 bool    = False,                # Upsample by 2?
        down:               bool    = False,                # Downsample by 2?
        attention:          bool    = False,                # Append a self-attention layer?
        num_heads:          int     = None,                 # Attention heads, None = out_channels // channels_per_head.
        channels_per_head:  int     = 64,                   # Channels per head when num_heads is None.
        dropout:            float   = 0,                    # Dropout probability before conv1.
        skip_scale:         float   = 1,                    # Scale of each residual sum.
        eps:                float   = 1e-5,                 # GroupNorm epsilon.
        resample_filter:    list    = [1,1],                # Resampling filter taps.
        resample_proj:      bool    = False,                # 1x1 projection in the resampling skip path?
        adaptive_scale:     bool    = True,                 # Embedding gives scale and shift (ADM) or only shift (DDPM++)?
        init:               dict    = dict(),               # Init kwargs of ordinary layers.
        init_zero:          dict    = dict(init_weight=0),  # Init kwargs of layers that end a residual branch.
        init_attn:          dict    = None,                 # Init kwargs of the qkv layer, None = init.
        dims:               int     = 2,                    # Spatial dimensions: 2 (Conv2d, images) or 3 (Conv3d, volumes).
    ):
        if dims not in (2, 3):
            raise ValueError(f'UNetBlock: dims must be 2 or 3, got {dims!r}')
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        self.dims = dims
        conv = Conv2d if dims == 2 else Conv3d
        self.num_heads = 0 if not attention else num_heads if num_heads is not None else out_channels // channels_per_head
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale

        # Main branch.
        self.norm0 = GroupNorm(num_channels=in_channels, eps=eps)
        self.conv0 = conv(in_channels=in_channels, out_channels=out_channels, kernel=3, up=up, down=down, resample_filter=resample_filter, **init)
        self.affine = Linear(in_features=emb_channels, out_features=out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(num_channels=out_channels, eps=eps)
        self.conv1 = conv(in_channels=out_channels, out_channels=out_channels, kernel=3, **init_zero)

        # Skip branch: a 1x1 projection if the width changes (or resample_proj), else pure resampling.
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if (resample_proj or out_channels != in_channels) else 0
            self.skip = conv(in_channels=in_channels, out_channels=out_channels, kernel=kernel, up=up, down=down, resample_filter=resample_filter, **init)

        # Self-attention.
        if self.num_heads:
            self.norm2 = GroupNorm(num_channels=out_channels, eps=eps)
            self.qkv = conv(in_channels=out_channels, out_channels=out_channels * 3, kernel=1, **(init_attn if init_attn is not None else init))
            self.proj = conv(in_channels=out_channels, out_channels=out_channels, kernel=1, **init_zero)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        orig = x
        x = self.conv0(silu(self.norm0(x)))

        # Modulate by the embedding: (1 + scale) * norm(x) + shift, or norm(x + shift).
        params = self.affine(emb).reshape(*emb.shape[:1], -1, *[1] * self.dims).to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(chunks=2, dim=1)
            x = silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = silu(self.norm1(x + params))

        x = self.conv1(torch.nn.functional.dropout(x, p=self.dropout, training=self.training))
        x = (x + (self.skip(orig) if self.skip is not None else orig)) * self.skip_scale

        # Multi-head self-attention; qkv channels are laid out as [head, channel, (q,k,v)].
        if self.num_heads:
            n, c = x.shape[0], x.shape[1]
            q, k, v = self.qkv(self.norm2(x)).reshape(n * self.num_heads, c // self.num_heads, 3, -1).unbind(2)
            w = attention_weights(q, k)
            a = torch.einsum('nqk,nck->ncq', w, v)
            x = (self.proj(a.reshape(*x.shape)) + x) * self.skip_scale
        return x

#----------------------------------------------------------------------------
# Sinusoidal timestep embedding (Vaswani et al. 2017), used by DDPM++ and ADM.

class PositionalEmbedding(torch.nn.Module):
    def __init__(self,
        num_channels:   int,             # Output width (even).
        max_positions:  int     = 10000, # Lowest frequency is 1 / max_positions.
        endpoint:       bool    = False, # Include the lowest frequency exactly?
    ):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [cos(x f), sin(x f)] with f_i = (1 / max_positions) ** (i / (C/2 - endpoint)).
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)

#----------------------------------------------------------------------------
# Random Fourier feature embedding (Tancik et al. 2020), used by NCSN++.

class FourierEmbedding(torch.nn.Module):
    def __init__(self,
        num_channels:   int,            # Output width (even).
        scale:          float   = 16,   # Standard deviation of the random frequencies.
    ):
        super().__init__()
        self.register_buffer('freqs', torch.randn(num_channels // 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.outer(x, (2 * np.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)

#----------------------------------------------------------------------------
