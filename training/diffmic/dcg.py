# medEDM: diffusion-model training toolkit for medical imaging.

"""Dual-granularity conditional guidance (DCG) classifier of DiffMIC (after
GMIC, Shen et al. 2021), small enough for CPUs, and its training loss.

    global branch   CNN -> feature map -> 1x1 conv = class-activation maps (CAM)
                    y_global = softmax(top-t% mean of each class map)
                    saliency = max over classes of sigmoid(CAM), upsampled to the image
    ROI             top-k patches (patch_size^2) cropped at the saliency peaks, each peak's
                    neighbourhood suppressed before the next pick (non-maximum suppression)
    local branch    CNN + global average pooling per patch -> h_k
                    gated attention pooling (Ilse et al. 2018):
                    a = softmax_k(w^T (tanh(V h_k) * sigmoid(U h_k))), z = sum_k a_k h_k
                    y_local = softmax(W z)
    mix             y_fusion = (y_global + y_local) / 2

`DCGNet` is the network of its own stage (no sigma); `DCGLoss` trains it in
the one training loop with cross-entropy on y_fusion plus cross-entropy on
each branch (weight `branch_weight`), and draws no snapshot picture."""

import numpy as np
import torch
from torch.nn.functional import silu

from torch_utils import persistence
from training.layers import Conv2d, GroupNorm, Linear

#----------------------------------------------------------------------------
# Conv + GroupNorm + SiLU stages, stride 2 after the first.

class ConvTrunk(torch.nn.Module):
    def __init__(self, in_channels, channels, num_levels):
        super().__init__()
        init = dict(init_mode='kaiming_uniform', init_weight=np.sqrt(1/3), init_bias=np.sqrt(1/3))
        layers, cin = [], in_channels
        for level in range(num_levels):
            cout = channels << level
            layers += [Conv2d(in_channels=cin, out_channels=cout, kernel=3, down=(level > 0), **init), GroupNorm(num_channels=cout, num_groups=min(8, cout))]
            layers += [Conv2d(in_channels=cout, out_channels=cout, kernel=3, **init), GroupNorm(num_channels=cout, num_groups=min(8, cout))]
            cin = cout
        self.layers = torch.nn.ModuleList(layers)
        self.out_channels = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, norm in zip(self.layers[0::2], self.layers[1::2]):
            x = silu(norm(conv(x)))
        return x

#----------------------------------------------------------------------------
# Top-k patches at the saliency peaks with non-maximum suppression.

def top_k_patches(images: torch.Tensor, saliency: torch.Tensor, k: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """images (N, C, H, W), saliency (N, H, W) -> patches (N, k, C, size, size), corners (N, k, 2) (row, col)."""
    n, c, h, w = images.shape
    s = saliency.detach().clone()
    corners = []
    for _ in range(k):
        flat = s.reshape(n, -1).argmax(dim=1)
        cy, cx = flat // w, flat % w
        top = (cy - size // 2).clamp(0, h - size)
        left = (cx - size // 2).clamp(0, w - size)
        corners.append(torch.stack([top, left], dim=1))
        rows = torch.arange(h, device=s.device)[None, :, None]
        cols = torch.arange(w, device=s.device)[None, None, :]
        inside = (rows >= top[:, None, None]) & (rows < top[:, None, None] + size) & (cols >= left[:, None, None]) & (cols < left[:, None, None] + size)
        s = s.masked_fill(inside, -float('inf'))
    corners = torch.stack(corners, dim=1) # (N, k, 2)
    offs = torch.arange(size, device=images.device)
    rows = (corners[:, :, 0, None] + offs)[:, :, :, None].expand(n, k, size, size)
    cols = (corners[:, :, 1, None] + offs)[:, :, None, :].expand(n, k, size, size)
    flat_idx = (rows * w + cols).reshape(n, 1, k * size * size).expand(n, c, -1)
    patches = images.reshape(n, c, h * w).gather(2, flat_idx).reshape(n, c, k, size, size).permute(0, 2, 1, 3, 4)
    return patches, corners

#----------------------------------------------------------------------------

@persistence.persistent_class
class DCGNet(torch.nn.Module):
    def __init__(self,
        img_resolution,                 # Image resolution H = W.
        img_channels,                   # Image channels.
        label_dim,                      # Number of classes K (the dataset's).
        channels        = 16,           # Global branch: channels of the first stage (doubled per stage).
        num_levels      = 3,            # Global branch: stages.
        percent_t       = 0.2,          # Top-t fraction of each class map averaged into y_global (1 = mean).
        num_patches     = 4,            # k patches for the local branch.
        patch_size      = 8,            # Patch side in pixels.
        local_channels  = 16,           # Local branch: channels of the first stage.
        local_levels    = 2,            # Local branch: stages.
        attn_dim        = 32,           # Gated attention: hidden width.
    ):
        super().__init__()
        if label_dim < 2:
            raise ValueError(f'DCGNet: needs at least 2 classes, got label_dim={label_dim}')
        if not 0 < percent_t <= 1:
            raise ValueError(f'training.network.percent_t must be in (0, 1], got {percent_t}')
        if not 1 <= patch_size <= img_resolution:
            raise ValueError(f'training.network.patch_size={patch_size} must be in [1, img_resolution={img_resolution}]')
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.percent_t, self.num_patches, self.patch_size = percent_t, num_patches, patch_size
        init = dict(init_mode='kaiming_uniform', init_weight=np.sqrt(1/3), init_bias=np.sqrt(1/3))
        self.global_trunk = ConvTrunk(img_channels, channels, num_levels)
        self.cam = Conv2d(in_channels=self.global_trunk.out_channels, out_channels=label_dim, kernel=1, **init)
        self.local_trunk = ConvTrunk(img_channels, local_channels, local_levels)
        d = self.local_trunk.out_channels
        self.attn_V = Linear(in_features=d, out_features=attn_dim, **init)
        self.attn_U = Linear(in_features=d, out_features=attn_dim, **init)
        self.attn_w = Linear(in_features=attn_dim, out_features=1, **init)
        self.local_out = Linear(in_features=d, out_features=label_dim, **init)

    def forward(self, images: torch.Tensor) -> dict:
        """-> dict(prob_fusion, prob_global, prob_local (N, K); logits_global, logits_local;
        saliency (N, H, W) in [0, 1]; corners (N, k, 2); attention (N, k))."""
        x = images.to(torch.float32)
        n, _, h, w = x.shape
        cam = self.cam(self.global_trunk(x))                                        # (N, K, h', w')
        flat = cam.reshape(n, self.label_dim, -1)
        t = max(int(round(flat.shape[2] * self.percent_t)), 1)
        logits_global = flat.topk(t, dim=2).values.mean(dim=2)
        saliency = torch.nn.functional.interpolate(torch.sigmoid(cam), size=(h, w), mode='bilinear', align_corners=False).amax(dim=1)
        patches, corners = top_k_patches(x, saliency, self.num_patches, self.patch_size)
        feats = self.local_trunk(patches.reshape(n * self.num_patches, *patches.shape[2:])).mean(dim=(2, 3)).reshape(n, self.num_patches, -1)
        gate = torch.tanh(self.attn_V(feats)) * torch.sigmoid(self.attn_U(feats))
        attention = torch.softmax(self.attn_w(gate)[:, :, 0], dim=1)
        z = (attention[:, :, None] * feats).sum(dim=1)
        logits_local = self.local_out(z)
        prob_global, prob_local = torch.softmax(logits_global, dim=1), torch.softmax(logits_local, dim=1)
        return dict(prob_fusion=(prob_global + prob_local) / 2, prob_global=prob_global, prob_local=prob_local,
            logits_global=logits_global, logits_local=logits_local, saliency=saliency, corners=corners, attention=attention)

#----------------------------------------------------------------------------

@persistence.persistent_class
class DCGLoss:
    def __init__(self,
        branch_weight   = 0.5,      # Weight of the cross-entropy of each branch (besides that of y_fusion).
    ):
        self.branch_weight = float(branch_weight)

    def __call__(self, net, batch: dict, augment_pipe=None) -> torch.Tensor:
        """Per-sample loss (N,): -log y_fusion[true] + w (CE(global) + CE(local))."""
        if augment_pipe is not None:
            raise ValueError('training.augment: the DCG stage augments in the dataset (training.dataset.augment); set training.augment to null')
        onehot = batch['onehot']
        out = net(batch['image'])
        target = onehot.argmax(dim=1)
        nll = -torch.log(out['prob_fusion'].clamp(min=1e-12)).gather(1, target[:, None])[:, 0]
        ce = torch.nn.functional.cross_entropy
        return nll + self.branch_weight * (ce(out['logits_global'], target, reduction='none') + ce(out['logits_local'], target, reduction='none'))

    def grid(self, net, batch, frozen):
        return None # A classifier: no snapshot picture.

#----------------------------------------------------------------------------
