# medEDM: diffusion-model training toolkit for medical imaging.

"""Denoiser architectures and preconditioning of "Elucidating the Design Space
of Diffusion-Based Generative Models" (Karras et al., NeurIPS 2022).

`SongUNet` is DDPM++ / NCSN++ (Song et al. 2021), `DhariwalUNet` is ADM
(Dhariwal & Nichol 2021); `VPPrecond`, `VEPrecond` and `EDMPrecond` wrap them
as denoisers D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) (Eq. 7, Table 1).
Constructor arguments and state-dict keys match NVlabs/edm. Medical extensions:
per-pixel sigma, condition images concatenated to the network input
(`cond_channels`) and continuous embedding vectors (`embedding_dim`); the
preconditioners also wrap `DhariwalUNet3D` (training/networks3d.py, volumes
N x C x D x H x W) and `VectorDenoiser` (training/networks_vector.py, vectors
N x K conditioned on image features), chosen by `model_type`.
"""

import inspect
from typing import Any

import numpy as np
import torch
from torch.nn.functional import silu

from torch_utils import persistence
from training.layers import Conv2d, FourierEmbedding, GroupNorm, Linear, PositionalEmbedding, UNetBlock


#----------------------------------------------------------------------------
# Inputs of the mapping network shared by both U-Nets.

def _class_label_input(class_labels: torch.Tensor | None, label_dim: int, n: int, device: torch.device) -> torch.Tensor | None:
    if not label_dim:
        return None
    if class_labels is None: # Unconditional case: all-zero label vector.
        return torch.zeros([n, label_dim], device=device)
    labels = class_labels.to(torch.float32)
    if labels.numel() % label_dim != 0 or labels.numel() // label_dim not in (1, n):
        raise ValueError(f'class_labels: expected shape ({n}, {label_dim}) for label_dim={label_dim}, got {tuple(class_labels.shape)}')
    return labels.reshape(-1, label_dim).expand(n, label_dim)

def _check_embedding(embedding: torch.Tensor | None, embedding_dim: int, n: int) -> None:
    if embedding_dim and embedding is None:
        raise ValueError(f'embedding: a ({n}, {embedding_dim}) tensor is required because embedding_dim={embedding_dim}')
    if not embedding_dim and embedding is not None:
        raise ValueError('embedding: given, but the network was built with embedding_dim=0')
    if embedding is not None and tuple(embedding.shape) != (n, embedding_dim):
        raise ValueError(f'embedding: expected shape ({n}, {embedding_dim}), got {tuple(embedding.shape)}')

def _label_dropout(labels: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    # Drop whole label vectors for classifier-free guidance (training only).
    if training and p:
        keep = torch.rand([labels.shape[0], 1], device=labels.device) >= p
        labels = labels * keep.to(labels.dtype)
    return labels

def _adm_mapping(model, noise_labels, class_labels, augment_labels, embedding, n: int, device: torch.device) -> torch.Tensor:
    # The mapping network of the ADM-style models (DhariwalUNet, DhariwalUNet3D, VectorDenoiser), before its
    # last SiLU: noise (+ augment) embedding, the continuous embedding concatenated, two layers, + class labels.
    emb = model.map_noise(noise_labels)
    if model.map_augment is not None and augment_labels is not None:
        emb = emb + model.map_augment(augment_labels)
    emb = emb.expand(n, -1)
    embedding_mlp = getattr(model, 'embedding_mlp', False) # cDDPM: the embedding has its own MLP, concatenated after the noise MLP.
    if embedding is not None and not embedding_mlp:
        emb = torch.cat([emb, embedding.to(emb.dtype)], dim=1)
    emb = silu(model.map_layer0(emb))
    emb = model.map_layer1(emb)
    if model.map_label is not None:
        labels = _label_dropout(_class_label_input(class_labels, model.label_dim, n, device), model.label_dropout, model.training)
        emb = emb + model.map_label(labels)
    if embedding_mlp:
        emb = torch.cat([emb, model.map_embedding1(silu(model.map_embedding0(embedding.to(emb.dtype))))], dim=1)
    return emb

#----------------------------------------------------------------------------
# Constructor arguments: a ValueError naming the argument, at construction
# (also when a snapshot is loaded), not a failure at the first forward pass.

_POSITIVE_INTS = ('img_resolution', 'img_channels', 'in_channels', 'out_channels', 'model_channels', 'channel_mult_emb', 'channel_mult_noise')
_NONNEGATIVE_INTS = ('label_dim', 'augment_dim', 'cond_channels', 'embedding_dim', 'num_blocks')

def _check_args(**args) -> None:
    def is_int(v):
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)
    for name, value in args.items():
        if name in _POSITIVE_INTS and not (is_int(value) and value >= 1):
            raise ValueError(f'{name} must be an integer >= 1, got {value!r}')
        if name in _NONNEGATIVE_INTS and not (is_int(value) and value >= 0):
            raise ValueError(f'{name} must be an integer >= 0, got {value!r}')
        if name == 'channel_mult' and not (isinstance(value, (list, tuple)) and value and all(is_int(m) and m >= 1 for m in value)):
            raise ValueError(f'channel_mult must be a non-empty list of integers >= 1, got {value!r}')
        if name == 'attn_resolutions' and not (isinstance(value, (list, tuple)) and all(is_int(r) and r >= 1 for r in value)):
            raise ValueError(f'attn_resolutions must be a list of resolutions (integers >= 1), got {value!r}')
        if name in ('dropout', 'label_dropout') and not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1):
            raise ValueError(f'{name} must be a probability in [0, 1), got {value!r}')
    if 'img_resolution' in args and 'channel_mult' in args and args['img_resolution'] % (1 << (len(args['channel_mult']) - 1)):
        raise ValueError(f'img_resolution={args["img_resolution"]} must be divisible by 2^{len(args["channel_mult"]) - 1} = '
            f'{1 << (len(args["channel_mult"]) - 1)}: channel_mult={list(args["channel_mult"])} halves it {len(args["channel_mult"]) - 1} times')

def _group_norm_advice(model_cls, kwargs: dict, err: ValueError) -> ValueError:
    """The GroupNorm error of `model_cls(**kwargs)` restated for model_channels, with values that work."""
    mc = kwargs.get('model_channels', inspect.signature(model_cls).parameters['model_channels'].default)
    def works(c):
        try:
            with torch.device('meta'):
                model_cls(**dict(kwargs, model_channels=c))
            return True
        except ValueError:
            return False
    step = 8
    lower = next((c for c in range(mc - mc % step, 0, -step) if c != mc and works(c)), None)
    higher = next((c for c in range(mc - mc % step + step, 4 * mc + 64, step) if works(c)), None)
    ok = ' or '.join(str(c) for c in (lower, higher) if c is not None)
    return ValueError(f'model_channels={mc}: {err} (with channel_mult={list(kwargs.get("channel_mult", []))}); '
        f'model_channels={ok} would work (multiples of 32 always do)')

#----------------------------------------------------------------------------
# DDPM++ and NCSN++ U-Net (Song et al. 2021), EDM config A-F (Table 7).

class SongUNet(torch.nn.Module):
    def __init__(self,
        img_resolution,                     # Image resolution at input/output.
        in_channels,                        # Number of color channels at input.
        out_channels,                       # Number of color channels at output.
        label_dim           = 0,            # Number of class labels, 0 = unconditional.
        augment_dim         = 0,            # Augmentation label dimensionality, 0 = no augmentation.

        model_channels      = 128,          # Base multiplier for the number of channels.
        channel_mult        = [1,2,2,2],    # Per-resolution multipliers for the number of channels.
        channel_mult_emb    = 4,            # Multiplier for the dimensionality of the embedding vector.
        num_blocks          = 4,            # Number of residual blocks per resolution.
        attn_resolutions    = [16],         # List of resolutions with self-attention.
        dropout             = 0.10,         # Dropout probability of intermediate activations.
        label_dropout       = 0,            # Dropout probability of class labels for classifier-free guidance.

        embedding_type      = 'positional', # Timestep embedding type: 'positional' for DDPM++, 'fourier' for NCSN++.
        channel_mult_noise  = 1,            # Timestep embedding size: 1 for DDPM++, 2 for NCSN++.
        encoder_type        = 'standard',   # Encoder architecture: 'standard' for DDPM++, 'residual' for NCSN++.
        decoder_type        = 'standard',   # Decoder architecture: 'standard' for both DDPM++ and NCSN++.
        resample_filter     = [1,1],        # Resampling filter: [1,1] for DDPM++, [1,3,3,1] for NCSN++.
        embedding_dim       = 0,            # medEDM: width of a continuous embedding vector, 0 = none.
    ):
        _check_args(img_resolution=img_resolution, in_channels=in_channels, out_channels=out_channels, label_dim=label_dim, augment_dim=augment_dim,
            model_channels=model_channels, channel_mult=channel_mult, channel_mult_emb=channel_mult_emb, num_blocks=num_blocks,
            attn_resolutions=attn_resolutions, dropout=dropout, label_dropout=label_dropout, channel_mult_noise=channel_mult_noise, embedding_dim=embedding_dim)
        if embedding_type not in ('positional', 'fourier'):
            raise ValueError(f"embedding_type: expected 'positional' or 'fourier', got {embedding_type!r}")
        if encoder_type not in ('standard', 'skip', 'residual'):
            raise ValueError(f"encoder_type: expected 'standard', 'skip' or 'residual', got {encoder_type!r}")
        if decoder_type not in ('standard', 'skip'):
            raise ValueError(f"decoder_type: expected 'standard' or 'skip', got {decoder_type!r}")
        super().__init__()
        self.label_dim = label_dim
        self.label_dropout = label_dropout
        self.embedding_dim = embedding_dim
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode='xavier_uniform')
        init_zero = dict(init_mode='xavier_uniform', init_weight=1e-5)
        init_attn = dict(init_mode='xavier_uniform', init_weight=np.sqrt(0.2))
        block_kwargs = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=np.sqrt(0.5), eps=1e-6,
            resample_filter=resample_filter, resample_proj=True, adaptive_scale=False, init=init, init_zero=init_zero, init_attn=init_attn)

        # Mapping network: noise (+ label + augment) embedding [+ embedding vector] -> MLP.
        self.map_noise = PositionalEmbedding(num_channels=noise_channels, endpoint=True) if embedding_type == 'positional' else FourierEmbedding(num_channels=noise_channels)
        self.map_label = Linear(in_features=label_dim, out_features=noise_channels, **init) if label_dim else None
        self.map_augment = Linear(in_features=augment_dim, out_features=noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(in_features=noise_channels + embedding_dim, out_features=emb_channels, **init)
        self.map_layer1 = Linear(in_features=emb_channels, out_features=emb_channels, **init)

        # Encoder.
        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f'{res}x{res}_conv'] = Conv2d(in_channels=cin, out_channels=cout, kernel=3, **init)
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(in_channels=cout, out_channels=cout, down=True, **block_kwargs)
                if encoder_type == 'skip': # Progressive growing input (StyleGAN2-style), added after the down block.
                    self.enc[f'{res}x{res}_aux_down'] = Conv2d(in_channels=caux, out_channels=caux, kernel=0, down=True, resample_filter=resample_filter)
                    self.enc[f'{res}x{res}_aux_skip'] = Conv2d(in_channels=caux, out_channels=cout, kernel=1, **init)
                if encoder_type == 'residual': # NCSN++ input pyramid.
                    self.enc[f'{res}x{res}_aux_residual'] = Conv2d(in_channels=caux, out_channels=cout, kernel=3, down=True, resample_filter=resample_filter, fused_resample=True, **init)
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(in_channels=cin, out_channels=cout, attention=(res in attn_resolutions), **block_kwargs)
        skips = [block.out_channels for name, block in self.enc.items() if 'aux' not in name]

        # Decoder.
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f'{res}x{res}_in0'] = UNetBlock(in_channels=cout, out_channels=cout, attention=True, **block_kwargs)
                self.dec[f'{res}x{res}_in1'] = UNetBlock(in_channels=cout, out_channels=cout, **block_kwargs)
            else:
                self.dec[f'{res}x{res}_up'] = UNetBlock(in_channels=cout, out_channels=cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = (idx == num_blocks and res in attn_resolutions)
                self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(in_channels=cin, out_channels=cout, attention=attn, **block_kwargs)
            if decoder_type == 'skip' or level == 0: # Output head(s); 'skip' sums heads of every resolution.
                if decoder_type == 'skip' and level < len(channel_mult) - 1:
                    self.dec[f'{res}x{res}_aux_up'] = Conv2d(in_channels=out_channels, out_channels=out_channels, kernel=0, up=True, resample_filter=resample_filter)
                self.dec[f'{res}x{res}_aux_norm'] = GroupNorm(num_channels=cout, eps=1e-6)
                self.dec[f'{res}x{res}_aux_conv'] = Conv2d(in_channels=cout, out_channels=out_channels, kernel=3, **init_zero)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None,
            augment_labels: torch.Tensor | None = None, embedding: torch.Tensor | None = None) -> torch.Tensor:
        n = x.shape[0]
        _check_embedding(embedding, self.embedding_dim, n)

        # Mapping.
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape) # [sin, cos] order of DDPM++.
        if self.map_label is not None:
            labels = _label_dropout(_class_label_input(class_labels, self.label_dim, n, x.device), self.label_dropout, self.training)
            emb = emb + self.map_label(labels * np.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = emb.expand(n, -1)
        if embedding is not None:
            emb = torch.cat([emb, embedding.to(emb.dtype)], dim=1)
        emb = silu(self.map_layer0(emb))
        emb = silu(self.map_layer1(emb))

        # Encoder.
        skips = []
        aux = x
        for name, block in self.enc.items():
            if 'aux_down' in name:
                aux = block(aux)
            elif 'aux_skip' in name:
                x = skips[-1] = x + block(aux)
            elif 'aux_residual' in name:
                x = skips[-1] = aux = (x + block(aux)) / np.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)

        # Decoder.
        aux = None
        tmp = None
        for name, block in self.dec.items():
            if 'aux_up' in name:
                aux = block(aux)
            elif 'aux_norm' in name:
                tmp = block(x)
            elif 'aux_conv' in name:
                tmp = block(silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return aux

#----------------------------------------------------------------------------
# ADM U-Net (Dhariwal & Nichol 2021), EDM config for ImageNet-64.

class DhariwalUNet(torch.nn.Module):
    def __init__(self,
        img_resolution,                     # Image resolution at input/output.
        in_channels,                        # Number of color channels at input.
        out_channels,                       # Number of color channels at output.
        label_dim           = 0,            # Number of class labels, 0 = unconditional.
        augment_dim         = 0,            # Augmentation label dimensionality, 0 = no augmentation.

        model_channels      = 192,          # Base multiplier for the number of channels.
        channel_mult        = [1,2,3,4],    # Per-resolution multipliers for the number of channels.
        channel_mult_emb    = 4,            # Multiplier for the dimensionality of the embedding vector.
        num_blocks          = 3,            # Number of residual blocks per resolution.
        attn_resolutions    = [32,16,8],    # List of resolutions with self-attention.
        dropout             = 0.10,         # Dropout probability of intermediate activations.
        label_dropout       = 0,            # Dropout probability of class labels for classifier-free guidance.
        embedding_dim       = 0,            # medEDM: width of a continuous embedding vector, 0 = none.
        embedding_mlp       = False,        # medEDM: the embedding gets its own MLP and is concatenated after the noise MLP (cDDPM), each half of emb_channels.
    ):
        _check_args(img_resolution=img_resolution, in_channels=in_channels, out_channels=out_channels, label_dim=label_dim, augment_dim=augment_dim,
            model_channels=model_channels, channel_mult=channel_mult, channel_mult_emb=channel_mult_emb, num_blocks=num_blocks,
            attn_resolutions=attn_resolutions, dropout=dropout, label_dropout=label_dropout, embedding_dim=embedding_dim)
        super().__init__()
        self.label_dim = label_dim
        self.label_dropout = label_dropout
        self.embedding_dim = embedding_dim
        self.embedding_mlp = bool(embedding_mlp and embedding_dim)
        emb_channels = model_channels * channel_mult_emb
        noise_emb = emb_channels // 2 if self.embedding_mlp else emb_channels # Width of the noise MLP's output.
        init = dict(init_mode='kaiming_uniform', init_weight=np.sqrt(1/3), init_bias=np.sqrt(1/3))
        init_zero = dict(init_mode='kaiming_uniform', init_weight=0, init_bias=0)
        block_kwargs = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init, init_zero=init_zero)

        # Mapping network: noise (+ augment) embedding [+ embedding vector] -> MLP, then + label embedding.
        self.map_noise = PositionalEmbedding(num_channels=model_channels)
        self.map_augment = Linear(in_features=augment_dim, out_features=model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(in_features=model_channels + (0 if self.embedding_mlp else embedding_dim), out_features=noise_emb, **init)
        self.map_layer1 = Linear(in_features=noise_emb, out_features=noise_emb, **init)
        self.map_label = Linear(in_features=label_dim, out_features=noise_emb, bias=False, init_mode='kaiming_normal', init_weight=np.sqrt(label_dim)) if label_dim else None
        if self.embedding_mlp: # cDDPM: Linear-SiLU-Linear of the embedding, concatenated with the noise embedding before the SiLU.
            self.map_embedding0 = Linear(in_features=embedding_dim, out_features=emb_channels - noise_emb, **init)
            self.map_embedding1 = Linear(in_features=emb_channels - noise_emb, out_features=emb_channels - noise_emb, **init)

        # Encoder.
        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f'{res}x{res}_conv'] = Conv2d(in_channels=cin, out_channels=cout, kernel=3, **init)
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(in_channels=cout, out_channels=cout, down=True, **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(in_channels=cin, out_channels=cout, attention=(res in attn_resolutions), **block_kwargs)
        skips = [block.out_channels for block in self.enc.values()]

        # Decoder.
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f'{res}x{res}_in0'] = UNetBlock(in_channels=cout, out_channels=cout, attention=True, **block_kwargs)
                self.dec[f'{res}x{res}_in1'] = UNetBlock(in_channels=cout, out_channels=cout, **block_kwargs)
            else:
                self.dec[f'{res}x{res}_up'] = UNetBlock(in_channels=cout, out_channels=cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(in_channels=cin, out_channels=cout, attention=(res in attn_resolutions), **block_kwargs)
        self.out_norm = GroupNorm(num_channels=cout)
        self.out_conv = Conv2d(in_channels=cout, out_channels=out_channels, kernel=3, **init_zero)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None,
            augment_labels: torch.Tensor | None = None, embedding: torch.Tensor | None = None) -> torch.Tensor:
        n = x.shape[0]
        _check_embedding(embedding, self.embedding_dim, n)

        # Mapping.
        emb = _adm_mapping(self, noise_labels, class_labels, augment_labels, embedding, n, x.device)
        emb = silu(emb)

        # Encoder.
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)

        # Decoder.
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(silu(self.out_norm(x)))

#----------------------------------------------------------------------------
# Inner architectures a preconditioner can wrap. An inner model may declare
# `spatial_dims` (2 images, 3 volumes, 0 vectors; default 2) and whether the
# condition is concatenated to its input channels (`concat_cond`, default
# True) or handed to it as `cond` (it then takes `cond_channels`).

def model_types() -> dict:
    from training import networks3d, networks_vector # Imported here: both build on this module.
    return {'SongUNet': SongUNet, 'DhariwalUNet': DhariwalUNet, 'DhariwalUNet3D': networks3d.DhariwalUNet3D,
        'VectorDenoiser': networks_vector.VectorDenoiser}

# Floor of the per-sample sigma that feeds c_noise when sigma is per pixel, so that
# ln(0) never reaches the network (where sigma = 0, c_out = 0 and D(x) = x anyway).
_SIGMA_FLOOR = 1e-20

def _sigma_like(sigma: Any, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    # Returns sigma broadcastable to x (any ndim) with batch dim N, and whether it varies within a sample.
    n = x.shape[0]
    sigma = torch.as_tensor(sigma).to(device=x.device, dtype=torch.float32)
    if sigma.ndim <= 1 and sigma.numel() in (1, n):
        return sigma.reshape(-1, *[1] * (x.ndim - 1)).expand(n, *[1] * (x.ndim - 1)), False
    if sigma.ndim == x.ndim and sigma.shape[0] in (1, n) and all(s in (1, t) for s, t in zip(sigma.shape[1:], x.shape[1:])):
        sigma = sigma.expand(n, *sigma.shape[1:])
        return sigma, sigma[0].numel() > 1
    raise ValueError(f'sigma: expected a scalar, shape ({n},), {(n, *[1] * (x.ndim - 1))} or a per-element map broadcastable to x '
        f'{tuple(x.shape)}, got shape {tuple(sigma.shape)}')

def _spatial_shape(img_resolution: Any, spatial_dims: int) -> list[int]:
    # [H, W], [D, H, W] or [] from an int (square / cubic) or a list of sizes.
    if spatial_dims == 0:
        return []
    sizes = [img_resolution] * spatial_dims if isinstance(img_resolution, (int, np.integer)) else img_resolution
    if not isinstance(sizes, (list, tuple)) or len(sizes) != spatial_dims or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1 for v in sizes):
        raise ValueError(f'img_resolution: expected a positive int or {spatial_dims} positive ints, got {img_resolution!r}')
    return [int(v) for v in sizes]

#----------------------------------------------------------------------------
# Preconditioning shared by all formulations: D(x) = c_skip x + c_out F(c_in x, c_noise).
# x is an image batch (N, C, H, W), a volume batch (N, C, D, H, W) or vectors (N, K)
# (K = img_channels); `img_shape` is the shape of one sample.

class _Precond(torch.nn.Module):
    def __init__(self, img_resolution, img_channels, label_dim, use_fp16, model_type, cond_channels, embedding_dim, model_kwargs):
        super().__init__()
        types = model_types()
        if model_type not in types:
            raise ValueError(f"model_type: expected one of {', '.join(repr(k) for k in types)}, got {model_type!r}")
        if cond_channels < 0 or embedding_dim < 0:
            raise ValueError(f'cond_channels and embedding_dim must be >= 0, got cond_channels={cond_channels}, embedding_dim={embedding_dim}')
        model_class = types[model_type]
        _check_args(img_channels=img_channels, label_dim=label_dim, cond_channels=cond_channels, embedding_dim=embedding_dim) # img_resolution: _spatial_shape.
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.cond_channels = cond_channels
        self.embedding_dim = embedding_dim
        self.concat_cond = getattr(model_class, 'concat_cond', True)
        self.img_shape = [int(img_channels), *_spatial_shape(img_resolution, getattr(model_class, 'spatial_dims', 2))]
        io = dict(in_channels=img_channels + cond_channels) if self.concat_cond else dict(in_channels=img_channels, cond_channels=cond_channels)
        kwargs = dict(img_resolution=img_resolution, out_channels=img_channels, label_dim=label_dim, embedding_dim=embedding_dim, **io, **model_kwargs)
        try:
            self.model = model_class(**kwargs)
        except ValueError as err:
            if not str(err).startswith('GroupNorm:') or 'model_channels' not in inspect.signature(model_class).parameters:
                raise
            raise _group_norm_advice(model_class, kwargs, err) from None

    cond_offset = False # Denoise the residual to the condition (EDMPrecond's option); the other preconditionings do not offer it.

    def _check_cond_offset(self) -> None:
        if self.cond_offset and not (self.concat_cond and self.cond_channels >= self.img_channels):
            raise ValueError(f'cond_offset: needs a condition image with at least img_channels={self.img_channels} channels '
                f'concatenated to the input, got cond_channels={self.cond_channels}' + ('' if self.concat_cond else ' on a model that does not concatenate it'))

    def scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def noise_label(self, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def coefficients(self, sigma: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c_skip, c_out, c_in, c_noise) of Table 1, elementwise in sigma."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        return (*self.scalings(sigma), self.noise_label(sigma))

    def round_sigma(self, sigma: Any) -> torch.Tensor:
        return torch.as_tensor(sigma)

    def forward(self, x: torch.Tensor, sigma: Any, class_labels: torch.Tensor | None = None, cond: torch.Tensor | None = None,
            embedding: torch.Tensor | None = None, augment_labels: torch.Tensor | None = None, force_fp32: bool = False, **model_kwargs) -> torch.Tensor:
        x = x.to(torch.float32)
        n = x.shape[0]
        if tuple(x.shape[1:]) != tuple(self.img_shape):
            raise ValueError(f'x: expected shape (N, {", ".join(str(v) for v in self.img_shape)}), got {tuple(x.shape)}')
        sigma, per_pixel = _sigma_like(sigma, x)
        class_labels = _class_label_input(class_labels, self.label_dim, n, x.device)
        dtype = torch.float16 if (self.use_fp16 and not force_fp32 and x.device.type == 'cuda') else torch.float32

        # Coefficients: c_skip, c_out, c_in per element of sigma; c_noise per sample (max over pixels).
        c_skip, c_out, c_in = self.scalings(sigma)
        sigma_sample = sigma.reshape(n, -1).amax(dim=1)
        c_noise = self.noise_label(sigma_sample.clamp(min=_SIGMA_FLOOR) if per_pixel else sigma_sample)

        # Network input: [c_in x, cond]; the condition is neither noised nor scaled. Models that
        # do not concatenate it (vector denoisers) receive it as `cond`. With cond_offset the
        # preconditioning acts on the residual to the condition's first img_channels channels:
        # D(x) = o + c_skip (x - o) + c_out F(c_in (x - o), ...), o = cond[:, :img_channels],
        # i.e. EDM on y - o with sigma_data its std (an exact shift of the ODE: x - o is the
        # residual's noisy point at the same sigma); D = x where sigma = 0 (exactly where c_skip(0)
        # evaluates to 1, as for sigma_data 0.1 and 0.5; to ~1e-7 for some other sigma_data).
        offset = None
        x_in = c_in * x
        if self.cond_channels:
            if cond is None:
                raise ValueError(f'cond: a condition of shape ({n}, {self.cond_channels}, ...) is required because cond_channels={self.cond_channels}')
            if self.concat_cond and tuple(cond.shape) != (n, self.cond_channels, *x.shape[2:]):
                raise ValueError(f'cond: expected shape {(n, self.cond_channels, *x.shape[2:])} for x of shape {tuple(x.shape)}, got {tuple(cond.shape)}')
            if not self.concat_cond and (cond.ndim < 2 or tuple(cond.shape[:2]) != (n, self.cond_channels)):
                raise ValueError(f'cond: expected shape ({n}, {self.cond_channels}, ...) (features or an image), got {tuple(cond.shape)}')
            if self.cond_offset:                                            # After the shape checks: their messages, not a broadcast error.
                offset = cond[:, :self.img_channels].to(torch.float32)
                x_in = c_in * (x - offset)
            if self.concat_cond:
                x_in = torch.cat([x_in, cond.to(torch.float32)], dim=1)
            else:
                model_kwargs = dict(model_kwargs, cond=cond.to(dtype))
        elif cond is not None:
            raise ValueError('cond: given, but the network was built with cond_channels=0')

        F_x = self.model(x_in.to(dtype), c_noise, class_labels=class_labels, augment_labels=augment_labels, embedding=embedding, **model_kwargs)
        if F_x.dtype != dtype:
            raise RuntimeError(f'inner model returned {F_x.dtype}, expected {dtype}')
        D_x = c_skip * x + c_out * F_x.to(torch.float32)
        if offset is not None:                                              # o + c_skip (x - o), written so that sigma = 0 gives x exactly.
            D_x = D_x + (1 - c_skip) * offset
        return D_x

#----------------------------------------------------------------------------
# Preconditioning of the variance preserving (VP) formulation (Song et al. 2021), Table 1.

@persistence.persistent_class
class VPPrecond(_Precond):
    """VP preconditioning: c_skip = 1, c_out = -sigma, c_in = 1/sqrt(sigma^2+1),
    c_noise = (M-1) sigma^-1(sigma), with sigma(t) = sqrt(exp(beta_d t^2/2 + beta_min t) - 1)."""
    def __init__(self,
        img_resolution,                 # Image resolution.
        img_channels,                   # Number of color channels.
        label_dim       = 0,            # Number of class labels, 0 = unconditional.
        use_fp16        = False,        # Execute the underlying model at FP16 precision (CUDA only)?
        beta_d          = 19.9,         # Extent of the noise level schedule.
        beta_min        = 0.1,          # Initial slope of the noise level schedule.
        M               = 1000,         # Original number of timesteps in the DDPM formulation.
        epsilon_t       = 1e-5,         # Minimum t-value used during training.
        model_type      = 'SongUNet',   # Class name of the underlying model.
        cond_channels   = 0,            # medEDM: channels of the condition image, 0 = none.
        embedding_dim   = 0,            # medEDM: width of the embedding vector, 0 = none.
        **model_kwargs,                 # Keyword arguments for the underlying model.
    ):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, cond_channels, embedding_dim, model_kwargs)
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.M = M
        self.epsilon_t = epsilon_t
        with torch.device('cpu'): # Numbers, also when the network is built on the meta device (persistence).
            self.sigma_min = float(self.sigma(epsilon_t))
            self.sigma_max = float(self.sigma(1))
        self.sigma_data = 0.5

    def scalings(self, sigma):
        return torch.ones_like(sigma), -sigma, 1 / (sigma ** 2 + 1).sqrt()

    def noise_label(self, sigma):
        return (self.M - 1) * self.sigma_inv(sigma)

    def sigma(self, t: Any) -> torch.Tensor:
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * (t ** 2) + self.beta_min * t).exp() - 1).sqrt() # exp() - 1, not expm1: the rounding EDM's VP networks were trained with.

    def sigma_inv(self, sigma: Any) -> torch.Tensor:
        sigma = torch.as_tensor(sigma)
        return ((self.beta_min ** 2 + 2 * self.beta_d * (1 + sigma ** 2).log()).sqrt() - self.beta_min) / self.beta_d # Not log1p (as above).

#----------------------------------------------------------------------------
# Preconditioning of the variance exploding (VE) formulation (Song et al. 2021), Table 1.

@persistence.persistent_class
class VEPrecond(_Precond):
    """VE preconditioning: c_skip = 1, c_out = sigma, c_in = 1, c_noise = ln(sigma/2)."""
    def __init__(self,
        img_resolution,                 # Image resolution.
        img_channels,                   # Number of color channels.
        label_dim       = 0,            # Number of class labels, 0 = unconditional.
        use_fp16        = False,        # Execute the underlying model at FP16 precision (CUDA only)?
        sigma_min       = 0.02,         # Minimum supported noise level.
        sigma_max       = 100,          # Maximum supported noise level.
        model_type      = 'SongUNet',   # Class name of the underlying model.
        cond_channels   = 0,            # medEDM: channels of the condition image, 0 = none.
        embedding_dim   = 0,            # medEDM: width of the embedding vector, 0 = none.
        **model_kwargs,                 # Keyword arguments for the underlying model.
    ):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, cond_channels, embedding_dim, model_kwargs)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = 0.5

    def scalings(self, sigma):
        return torch.ones_like(sigma), sigma, torch.ones_like(sigma)

    def noise_label(self, sigma):
        return (0.5 * sigma).log()

#----------------------------------------------------------------------------
# Improved preconditioning proposed in the paper (EDM), Table 1 and Eq. 7.

@persistence.persistent_class
class EDMPrecond(_Precond):
    """EDM preconditioning: c_skip = sd^2/(sigma^2+sd^2), c_out = sigma sd/sqrt(sigma^2+sd^2),
    c_in = 1/sqrt(sd^2+sigma^2), c_noise = ln(sigma)/4, with sd = sigma_data.

    sigma may be per sample or per pixel; where sigma = 0, D(x) = x exactly."""
    def __init__(self,
        img_resolution,                     # Image resolution.
        img_channels,                       # Number of color channels.
        label_dim       = 0,                # Number of class labels, 0 = unconditional.
        use_fp16        = False,            # Execute the underlying model at FP16 precision (CUDA only)?
        sigma_min       = 0,                # Minimum supported noise level.
        sigma_max       = float('inf'),     # Maximum supported noise level.
        sigma_data      = 0.5,              # Expected standard deviation of the training data.
        model_type      = 'DhariwalUNet',   # Class name of the underlying model.
        cond_channels   = 0,                # medEDM: channels of the condition image, 0 = none.
        embedding_dim   = 0,                # medEDM: width of the embedding vector, 0 = none.
        cond_offset     = False,            # medEDM: denoise the residual to the condition image (sigma_data = the residual's std).
        **model_kwargs,                     # Keyword arguments for the underlying model.
    ):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, cond_channels, embedding_dim, model_kwargs)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data
        if not isinstance(cond_offset, bool):
            raise ValueError(f'cond_offset: expected true or false, got {cond_offset!r}')
        self.cond_offset = cond_offset
        self._check_cond_offset()

    def scalings(self, sigma):
        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
        return c_skip, c_out, c_in

    def noise_label(self, sigma):
        return sigma.log() / 4

#----------------------------------------------------------------------------
