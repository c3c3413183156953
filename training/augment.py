# medEDM: diffusion-model training toolkit for medical imaging.

"""Non-leaking geometric augmentation for diffusion training.

Follows the behaviour of the augmentation pipeline of "Training Generative
Adversarial Networks with Limited Data" (Karras et al. 2020) as used,
non-leaking, by "Elucidating the Design Space of Diffusion-Based Generative
Models" (Karras et al. 2022): every sample gets a random geometric transform,
and the denoiser is conditioned on the transform's parameters (the augment
labels), so that at sampling time (augment_labels=None, i.e. all zeros) it
produces un-augmented images. Only geometric operations exist here (no colour
operations), so any channel count works, and the same per-sample transform
is applied jointly to the batch's `image`, `cond` and `mask`.

The geometry matches EDM's pipe; the label values are this project's own
encoding below (the transform's actual parameters), not EDM's raw random
draws, which differ by constant factors and the rotation's sign. At sampling
both are zero; an imported EDM network fine-tuned here with augmentation
would see differently scaled labels than it was trained with.

Augment labels, (N, 9) float32, all zeros for the identity:
    0  xflip        1 if mirrored left-right, else 0
    1  yflip        1 if mirrored top-bottom, else 0
    2  scale        log2 of the isotropic scale factor
    3  rotate_cos   cos(theta) - 1   theta = total rotation angle: rotate_int's
    4  rotate_sin   sin(theta)       multiple of 90 degrees plus rotate_frac's angle
    5  aniso_cos    log2(a) * cos(2 phi)   stretch by a along direction phi,
    6  aniso_sin    log2(a) * sin(2 phi)   by 1/a across it (unique encoding)
    7  translate_x  total translation as a fraction of the image width  (translate_int + translate_frac)
    8  translate_y  total translation as a fraction of the image height
The transform maps an input point p (pixel units, origin at the image centre,
x right, y down; positive theta turns x towards y, i.e. clockwise on screen) to
    T(translate) . A(a, phi) . S(2^scale) . R(theta) . F(xflip, yflip) . p.
"""

import math

import torch

from torch_utils import persistence

#----------------------------------------------------------------------------
# Names of the augment label dimensions, in order.

AUGMENT_LABEL_NAMES = ('xflip', 'yflip', 'scale', 'rotate_cos', 'rotate_sin', 'aniso_cos', 'aniso_sin', 'translate_x', 'translate_y')

#----------------------------------------------------------------------------
# The tensors transformed together with `image`: `cond` and `mask`, each of the
# image's batch size and spatial size (checked with a message naming the key).

def _joint_tensors(batch: dict, images: torch.Tensor, what: str) -> dict[str, torch.Tensor]:
    N = images.shape[0]
    joint = {}
    for key in ('cond', 'mask'):
        x = batch.get(key)
        if x is None:
            continue
        if not isinstance(x, torch.Tensor) or x.ndim != images.ndim or x.shape[0] != N or x.shape[2:] != images.shape[2:]:
            raise ValueError(f'{what}: batch["{key}"] must be a tensor of shape ({N}, C, {", ".join(map(str, images.shape[2:]))}), '
                f'got {tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}')
        joint[key] = x
    return joint

#----------------------------------------------------------------------------
# Geometric augmentation pipe, non-leaking through augment labels.

@persistence.persistent_class
class AugmentPipe:
    augment_dim = len(AUGMENT_LABEL_NAMES)

    def __init__(self,
        p                   = 1,        # Overall probability multiplier; each op applies with prob min(p * op value, 1).
        xflip               = 0,        # Left-right mirror (50/50 when applied).
        yflip               = 0,        # Top-bottom mirror (50/50 when applied).
        rotate_int          = 0,        # Rotation by a random multiple of 90 degrees.
        translate_int       = 0,        # Integer-pixel translation.
        translate_int_max   = 0.125,    # Range of integer translation, fraction of the image size.
        scale               = 0,        # Isotropic scaling.
        rotate_frac         = 0,        # Arbitrary rotation.
        aniso               = 0,        # Anisotropic scaling.
        translate_frac      = 0,        # Fractional translation.
        scale_std           = 0.2,      # Log2 standard deviation of isotropic scaling.
        rotate_frac_max     = 1,        # Largest rotation, fraction of a half turn.
        aniso_std           = 0.2,      # Log2 standard deviation of anisotropic scaling.
        aniso_rotate_prob   = 0.5,      # Probability that the stretch direction is random (else axis-aligned).
        translate_frac_std  = 0.125,    # Standard deviation of fractional translation, fraction of the image size.
    ):
        args = dict(p=p, xflip=xflip, yflip=yflip, rotate_int=rotate_int, translate_int=translate_int,
            translate_int_max=translate_int_max, scale=scale, rotate_frac=rotate_frac, aniso=aniso,
            translate_frac=translate_frac, scale_std=scale_std, rotate_frac_max=rotate_frac_max,
            aniso_std=aniso_std, aniso_rotate_prob=aniso_rotate_prob, translate_frac_std=translate_frac_std)
        for key, value in args.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f'AugmentPipe: {key} must be a finite number >= 0, got {value!r}')
        for key in ('p', 'aniso_rotate_prob'):
            if args[key] > 1:
                raise ValueError(f'AugmentPipe: {key} is a probability in [0, 1], got {args[key]!r}')
        for key, value in args.items():
            setattr(self, key, float(value))

    # Probability that op `value` is applied to a sample.
    def _prob(self, value: float) -> float:
        return min(self.p * value, 1.0)

    # Draw per-sample parameters; ops that cannot apply draw nothing.
    def _draw(self, N: int, H: int, W: int, device: torch.device) -> dict:
        zeros = lambda *shape: torch.zeros(shape, dtype=torch.float32, device=device)
        applied = lambda value: (torch.rand([N], device=device) < self._prob(value)).to(torch.float32)
        d = dict(xflip=zeros(N), yflip=zeros(N), k=torch.zeros([N], dtype=torch.int64, device=device),
            scale=zeros(N), theta=zeros(N), aniso=zeros(N), phi=zeros(N), t=zeros(N, 2))
        if self._prob(self.xflip) > 0:
            d['xflip'] = torch.randint(2, [N], device=device).to(torch.float32) * applied(self.xflip)
        if self._prob(self.yflip) > 0:
            d['yflip'] = torch.randint(2, [N], device=device).to(torch.float32) * applied(self.yflip)
        if self._prob(self.rotate_int) > 0:
            d['k'] = torch.randint(4, [N], device=device) * applied(self.rotate_int).to(torch.int64)
        if self._prob(self.translate_int) > 0:
            t = (torch.rand([N, 2], device=device) * 2 - 1) * self.translate_int_max
            size = torch.tensor([W, H], dtype=torch.float32, device=device)
            d['t'] = d['t'] + (t * size).round() / size * applied(self.translate_int)[:, None]
        if self._prob(self.scale) > 0:
            d['scale'] = torch.randn([N], device=device) * self.scale_std * applied(self.scale)
        if self._prob(self.rotate_frac) > 0:
            d['theta'] = (torch.rand([N], device=device) * 2 - 1) * (math.pi * self.rotate_frac_max) * applied(self.rotate_frac)
        if self._prob(self.aniso) > 0:
            a = torch.randn([N], device=device) * self.aniso_std
            rotated = torch.rand([N], device=device) < self.aniso_rotate_prob
            phi = (torch.rand([N], device=device) * 2 - 1) * math.pi
            on = applied(self.aniso)
            d['aniso'] = a * on
            d['phi'] = torch.where(rotated, phi, torch.zeros_like(phi)) * on
        if self._prob(self.translate_frac) > 0:
            d['t'] = d['t'] + torch.randn([N, 2], device=device) * self.translate_frac_std * applied(self.translate_frac)[:, None]
        return d

    # Augment labels (N, 9) from the drawn parameters.
    @staticmethod
    def _labels(d: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ck = torch.tensor([1.0, 0.0, -1.0, 0.0], device=d['k'].device)[d['k']] # Exact cos/sin of k * 90 degrees.
        sk = torch.tensor([0.0, 1.0, 0.0, -1.0], device=d['k'].device)[d['k']]
        c = ck * d['theta'].cos() - sk * d['theta'].sin()
        s = sk * d['theta'].cos() + ck * d['theta'].sin()
        labels = torch.stack([d['xflip'], d['yflip'], d['scale'], c - 1, s,
            d['aniso'] * (2 * d['phi']).cos(), d['aniso'] * (2 * d['phi']).sin(), d['t'][:, 0], d['t'][:, 1]], dim=1)
        return labels, c, s

    # Inverse affine (N, 2, 3) in affine_grid's normalised coordinates.
    @staticmethod
    def _theta(d: dict, c: torch.Tensor, s: torch.Tensor, H: int, W: int) -> torch.Tensor:
        def rot(cos, sin): return torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
        def diag(a, b): return torch.diag_embed(torch.stack([a, b], -1))
        f_inv = diag(1 - 2 * d['xflip'], 1 - 2 * d['yflip'])
        r_inv = rot(c, -s)
        sc = 2.0 ** -d['scale']
        s_inv = diag(sc, sc)
        pc, ps = d['phi'].cos(), d['phi'].sin()
        a_inv = rot(pc, ps) @ diag(2.0 ** -d['aniso'], 2.0 ** d['aniso']) @ rot(pc, -ps)
        l_inv = f_inv @ r_inv @ s_inv @ a_inv                           # Output -> input, pixel units.
        size = torch.tensor([W / 2, H / 2], dtype=torch.float32, device=c.device)
        lin = l_inv / size[None, :, None] * size[None, None, :]         # D^-1 L^-1 D.
        t_pix = d['t'] * torch.tensor([W, H], dtype=torch.float32, device=c.device)
        shift = -(l_inv @ t_pix[:, :, None])[:, :, 0] / size            # -D^-1 L^-1 t.
        return torch.cat([lin, shift[:, :, None]], dim=2)

    def __call__(self, batch: dict) -> tuple[dict, torch.Tensor]:
        """Augment `image` and, with the same transforms, `cond` and `mask`
        (nearest neighbour) of a batch dict; other keys pass through. Returns
        a new dict and the (N, 9) float32 augment labels."""
        if not isinstance(batch, dict) or not isinstance(batch.get('image'), torch.Tensor) or batch['image'].ndim != 4:
            raise ValueError('AugmentPipe: batch must be a dict with an "image" tensor of shape (N, C, H, W)')
        images = batch['image']
        N, C, H, W = images.shape
        device = images.device
        spatial = _joint_tensors(batch, images, 'AugmentPipe')
        out = dict(batch)
        d = self._draw(N, H, W, device) if self.p > 0 else None
        if d is None:
            return out, torch.zeros([N, self.augment_dim], dtype=torch.float32, device=device)
        labels, c, s = self._labels(d)

        # Samples that only flip and turn by multiples of 90 degrees: exact pixel permutations.
        general = (d['scale'] != 0) | (d['theta'] != 0) | (d['aniso'] != 0) | (d['t'] != 0).any(dim=1)
        if H != W:
            general = general | (d['k'] % 2 == 1)
        tensors = dict(image=images, **spatial)
        for key, x in tensors.items():
            y = torch.where(d['xflip'].bool()[:, None, None, None], x.flip(3), x)
            y = torch.where(d['yflip'].bool()[:, None, None, None], y.flip(2), y)
            for k in (1, 2, 3):
                sel = d['k'] == k
                if sel.any() and (H == W or k == 2):
                    y = torch.where(sel[:, None, None, None], torch.rot90(y, -k, dims=(2, 3)), y)
            out[key] = y

        # All other samples: one resampling of image and cond (bilinear) and mask (nearest).
        if general.any():
            idx = general.nonzero()[:, 0]
            theta = self._theta({k: v[idx] for k, v in d.items()}, c[idx], s[idx], H, W)
            smooth = [images] + ([spatial['cond']] if 'cond' in spatial else [])
            x = torch.cat([t[idx].to(images.dtype) for t in smooth], dim=1)
            grid = torch.nn.functional.affine_grid(theta.to(images.dtype), list(x.shape), align_corners=False)
            x = torch.nn.functional.grid_sample(x, grid, mode='bilinear', padding_mode='reflection', align_corners=False)
            out['image'] = out['image'].index_copy(0, idx, x[:, :C])
            if 'cond' in spatial:
                out['cond'] = out['cond'].index_copy(0, idx, x[:, C:].to(spatial['cond'].dtype))
            if 'mask' in spatial:
                m = spatial['mask'][idx].to(images.dtype)
                m = torch.nn.functional.grid_sample(m, grid, mode='nearest', padding_mode='reflection', align_corners=False)
                out['mask'] = out['mask'].index_copy(0, idx, m.to(spatial['mask'].dtype))
        return out, labels

#----------------------------------------------------------------------------
# Joint augmentation of volumes (N, C, D, H, W): flips, axis-aligned
# rotations by multiples of 90 degrees and integer shifts, all exact voxel
# permutations (image, cond and mask move together, nothing is resampled),
# non-leaking through augment labels like AugmentPipe.
#
# Coordinates: tensor axes (D, H, W) = (z, y, x), voxel p measured from the
# volume's centre (p_a = index_a - (n_a - 1) / 2). The transform is
#     q = R F p + t
# F = diag of the flips (xflip mirrors W, yflip H, zflip D), R a product of
# quarter turns in the (H, W), (D, W) and (D, H) planes (only planes whose two
# sizes agree turn by 90 degrees; others by 0 or 180), t integer voxels with
# reflection at the borders (EDM's integer translation pads by reflection).
# Augment labels, (N, 15) float32, all zeros for the identity:
#     0-2   xflip, yflip, zflip     1 if mirrored, else 0
#     3-11  R - I                   the rotation matrix (rows z, y, x), minus the identity
#     12-14 translate_x, _y, _z     shift as a fraction of the size along W, H, D

AUGMENT3D_LABEL_NAMES = ('xflip', 'yflip', 'zflip', *(f'rotate_{r}{c}' for r in 'zyx' for c in 'zyx'),
    'translate_x', 'translate_y', 'translate_z')

_PLANES = ((1, 2), (0, 2), (0, 1)) # Rotation planes as pairs of spatial axes (D=0, H=1, W=2).

def _quarter_turn(a: int, b: int, k: int) -> torch.Tensor:
    # Matrix of torch.rot90(x, k, dims=(a, b)) on centred coordinates: q_a = -p_b, q_b = p_a per turn.
    m = torch.eye(3)
    for _ in range(k % 4):
        turn = torch.eye(3)
        turn[a, a] = turn[b, b] = 0
        turn[a, b], turn[b, a] = -1, 1
        m = turn @ m
    return m

def _reflect_index(n: int, shift: int) -> torch.Tensor:
    # Source index of output voxel i for a shift by `shift`: i - shift, reflected (no edge repeat) into [0, n).
    i = torch.arange(n) - shift
    if n == 1:
        return torch.zeros_like(i)
    period = 2 * (n - 1)
    i = i.remainder(period)
    return torch.where(i >= n, period - i, i)

@persistence.persistent_class
class AugmentPipe3D:
    augment_dim = len(AUGMENT3D_LABEL_NAMES)

    def __init__(self,
        p                   = 1,        # Overall probability multiplier; each op applies with prob min(p * op value, 1).
        xflip               = 0,        # Mirror along W (50/50 when applied).
        yflip               = 0,        # Mirror along H (50/50 when applied).
        zflip               = 0,        # Mirror along D (50/50 when applied).
        rotate_int          = 0,        # Random quarter turns in the three planes.
        translate_int       = 0,        # Integer-voxel translation.
        translate_int_max   = 0.125,    # Range of integer translation, fraction of the size per axis.
    ):
        args = dict(p=p, xflip=xflip, yflip=yflip, zflip=zflip, rotate_int=rotate_int, translate_int=translate_int,
            translate_int_max=translate_int_max)
        for key, value in args.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f'AugmentPipe3D: {key} must be a finite number >= 0, got {value!r}')
        if args['p'] > 1:
            raise ValueError(f'AugmentPipe3D: p is a probability in [0, 1], got {p!r}')
        for key, value in args.items():
            setattr(self, key, float(value))

    def _prob(self, value: float) -> float:
        return min(self.p * value, 1.0)

    # Per-sample parameters: flips (N, 3) in x, y, z order, quarter turns (N, 3) per plane, shifts (N, 3) in D, H, W order.
    def _draw(self, N: int, size: list[int]) -> dict:
        applied = lambda value: (torch.rand([N]) < self._prob(value)).to(torch.int64)
        flips = torch.zeros([N, 3], dtype=torch.int64)
        for i, value in enumerate((self.xflip, self.yflip, self.zflip)):
            if self._prob(value) > 0:
                flips[:, i] = torch.randint(2, [N]) * applied(value)
        turns = torch.zeros([N, 3], dtype=torch.int64)
        if self._prob(self.rotate_int) > 0:
            on = applied(self.rotate_int)
            for i, (a, b) in enumerate(_PLANES):
                k = torch.randint(4, [N])
                turns[:, i] = (k if size[a] == size[b] else 2 * (k % 2)) * on # Non-square planes: half turns only.
        shifts = torch.zeros([N, 3], dtype=torch.int64)
        if self._prob(self.translate_int) > 0:
            n = torch.tensor(size, dtype=torch.float32)
            t = ((torch.rand([N, 3]) * 2 - 1) * self.translate_int_max * n).round().to(torch.int64)
            shifts = t * applied(self.translate_int)[:, None]
        return dict(flips=flips, turns=turns, shifts=shifts)

    @staticmethod
    def rotation(turns: torch.Tensor) -> torch.Tensor:
        """Rotation matrix R (3, 3) on centred (z, y, x) coordinates of the quarter turns of one sample."""
        m = torch.eye(3)
        for (a, b), k in zip(_PLANES, turns.tolist()):
            m = _quarter_turn(a, b, k) @ m
        return m

    @staticmethod
    def _apply(x: torch.Tensor, flips: list, turns: list, shifts: list) -> torch.Tensor:
        # One sample (C, D, H, W): flip, turn, shift.
        dims = [d for d, f in zip((3, 2, 1), flips) if f] # xflip -> W (dim 3 of C, D, H, W).
        if dims:
            x = x.flip(dims)
        for (a, b), k in zip(_PLANES, turns):
            if k % 4:
                x = torch.rot90(x, k, dims=(a + 1, b + 1))
        for axis, t in enumerate(shifts):
            if t:
                x = x.index_select(axis + 1, _reflect_index(x.shape[axis + 1], t).to(x.device))
        return x

    def __call__(self, batch: dict) -> tuple[dict, torch.Tensor]:
        """Augment `image` and, with the same transforms, `cond` and `mask` of a
        batch dict of volumes; other keys pass through. Returns a new dict and
        the (N, 15) float32 augment labels."""
        if not isinstance(batch, dict) or not isinstance(batch.get('image'), torch.Tensor) or batch['image'].ndim != 5:
            raise ValueError('AugmentPipe3D: batch must be a dict with an "image" tensor of shape (N, C, D, H, W)')
        images = batch['image']
        N, size, device = images.shape[0], list(images.shape[2:]), images.device
        keys = ['image', *_joint_tensors(batch, images, 'AugmentPipe3D')]
        out = dict(batch)
        if self.p == 0:
            return out, torch.zeros([N, self.augment_dim], dtype=torch.float32, device=device)
        d = self._draw(N, size)
        for key in keys:
            out[key] = torch.stack([self._apply(batch[key][i], d['flips'][i].tolist(), d['turns'][i].tolist(), d['shifts'][i].tolist())
                for i in range(N)])
        rot = torch.stack([self.rotation(d['turns'][i]) for i in range(N)])
        frac = d['shifts'].flip(1).to(torch.float32) / torch.tensor(size[::-1], dtype=torch.float32) # x, y, z order.
        labels = torch.cat([d['flips'].to(torch.float32), (rot - torch.eye(3)).reshape(N, 9), frac], dim=1)
        return out, labels.to(device)

#----------------------------------------------------------------------------
