# medEDM: diffusion-model training toolkit for medical imaging.

"""Loss functions of "Elucidating the Design Space of Diffusion-Based
Generative Models" (Karras et al. 2022), as loss objects with parts.

A loss object is called as `loss_fn(net, batch, augment_pipe=None)` with the
batch dict of the dataset (`image`, optional `label`, `cond`, `mask`,
`embedding`, ...) and returns the per-element loss, of the target's shape; the
training loop sums over elements and averages over samples. `DiffusionLoss`
composes the parts that vary between families; each is a constructor argument
(plain values, set from YAML) or a method a family's subclass overrides:

    where sigma comes from      `sample_sigma`  (VP, VE, EDM below)
    where the noise comes from  `noise`         a registered noise source ('gaussian'; a family
                                                registers e.g. 'simplex' with `register_noise`),
                                                or override `sample_noise`
    where the noise goes        `sigma_map`     per-element multiplier M: sigma(p) = sigma * M(p)
                                                (e.g. a box; default None = one sigma per sample)
    what is denoised            `target_key`    batch key of the target (default 'image')
    what conditions the network `condition`     class labels, condition images, `embed` (embedding)
    where the loss is taken     `mask_key`      batch key of the mask; None = everywhere
    the distance                `distance`      'l2' (EDM) or 'l1'
    the weights                 `weight`        lambda(sigma) per element; `sample_weight`: (N,)

Elements where the mask is 0 or where sigma(p) = 0 (no noise, nothing to
denoise) give exactly 0, and lambda is never evaluated there, so the loss and
its gradient stay finite: a per-pixel sigma map that is 0 outside a box gives
the loss inside the box."""

from typing import Callable

import torch

from torch_utils import persistence

#----------------------------------------------------------------------------
# Noise sources by name: fn(y) -> unit-scale noise of y's shape, drawn from
# torch's global generator (seeded per step by the training loop). A family
# registers its own (e.g. simplex noise) from its package at import time, so
# the engine does not import it and a pickled loss stores only the name.

_NOISE_SOURCES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {'gaussian': torch.randn_like}

def register_noise(name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Make `fn(y) -> noise like y` available as `noise=name` of every loss object."""
    if not isinstance(name, str) or not name or not callable(fn):
        raise ValueError(f'register_noise: expected a non-empty name and a callable, got {name!r}, {fn!r}')
    _NOISE_SOURCES[name] = fn

_DISTANCES = ('l2', 'l1')

#----------------------------------------------------------------------------
# Shared mechanics: draw sigma, augment image and conditions jointly, add
# noise, denoise, compare, weight (Eq. 2 and Eq. 8 of the paper).

class DiffusionLoss:
    def __init__(self,
        noise       = 'gaussian',   # Noise source: 'gaussian' or a name given to register_noise().
        distance    = 'l2',         # Distance between D(y + n) and y: 'l2' (squared error) or 'l1' (absolute error).
        mask_key    = None,         # Batch key of the mask in which the loss is taken, None = everywhere.
        target_key  = 'image',      # Batch key of the target that is noised and denoised.
    ):
        if not isinstance(noise, str):
            raise ValueError(f'training.loss.noise: expected the name of a noise source, got {noise!r}')
        if distance not in _DISTANCES:
            raise ValueError(f"training.loss.distance: expected 'l2' or 'l1', got {distance!r}")
        for key, value in (('mask_key', mask_key), ('target_key', target_key)):
            if not (isinstance(value, str) or (value is None and key == 'mask_key')):
                raise ValueError(f'training.loss.{key}: expected the name of a batch key, got {value!r}')
        self.noise = noise
        self.distance = distance
        self.mask_key = mask_key
        self.target_key = target_key

    def sample_sigma(self, shape: list[int], device: torch.device) -> torch.Tensor:
        raise NotImplementedError

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # Parts a family overrides. ---------------------------------------------

    def sample_noise(self, y: torch.Tensor) -> torch.Tensor:
        """Unit-scale noise of y's shape (before multiplying by sigma)."""
        fn = _NOISE_SOURCES.get(self.noise)
        if fn is None:
            raise ValueError(f'training.loss.noise={self.noise!r}: unknown noise source (registered: {", ".join(sorted(_NOISE_SOURCES))}); '
                f'a family registers its own with training.loss.register_noise')
        return fn(y)

    def sigma_map(self, batch: dict, y: torch.Tensor) -> torch.Tensor | None:
        """Per-element multiplier M of sigma, broadcastable to y (0 = no noise there); None = per sample."""
        return None

    def embed(self, net, batch: dict) -> torch.Tensor | None:
        """Embedding vectors (N, E) for the network's embedding path; None = none."""
        return batch.get('embedding')

    def condition(self, net, batch: dict) -> dict:
        """Keyword arguments of the network call besides x and sigma."""
        kwargs = dict(class_labels=batch.get('label'), cond=batch.get('cond'))
        embedding = self.embed(net, batch)
        if embedding is not None:
            kwargs['embedding'] = embedding
        return kwargs

    def sample_weight(self, batch: dict, D: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """Per-sample weights (N,), e.g. a focal weight; None = 1."""
        return None

    def noisy(self, y: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The network's input for target y at noise level sigma: y + n, n = unit noise * sigma."""
        return y + self.sample_noise(y) * sigma

    # The loss. ---------------------------------------------------------------

    def __call__(self, net, batch: dict, augment_pipe=None) -> torch.Tensor:
        y = self._batch_tensor(batch, self.target_key, 'target_key')
        sigma = self.sample_sigma([y.shape[0]] + [1] * (y.ndim - 1), y.device)
        augment_labels = None
        if augment_pipe is not None:
            batch, augment_labels = augment_pipe(batch)
        y = batch[self.target_key]
        M = self.sigma_map(batch, y)
        if M is not None:
            sigma = sigma * self._broadcastable(M, y, 'the sigma map')
        x = self.noisy(y, sigma)
        kwargs = self.condition(net, batch)
        if augment_labels is not None:
            kwargs['augment_labels'] = augment_labels
        D_yn = net(x, sigma, **kwargs)
        return self.compare(D_yn, y, sigma, batch)

    def compare(self, D_yn: torch.Tensor, y: torch.Tensor, sigma: torch.Tensor, batch: dict) -> torch.Tensor:
        """Per-element loss lambda(sigma) d(D_yn, y) [* mask] [* sample weight], exactly 0 where masked out or sigma = 0."""
        valid = sigma > 0
        lam = self.weight(torch.where(valid, sigma, torch.ones_like(sigma))) # lambda where it is finite only.
        diff = D_yn - y
        loss = lam * (diff ** 2 if self.distance == 'l2' else diff.abs())
        if self.mask_key is not None:
            mask = self._broadcastable(self._batch_tensor(batch, self.mask_key, 'mask_key'), y, f'batch[{self.mask_key!r}]')
            valid = valid & (mask != 0)
            loss = loss * mask.to(loss.dtype)
        loss = torch.where(valid, loss, torch.zeros_like(loss))
        w = self.sample_weight(batch, D_yn, y)
        if w is not None:
            loss = loss * w.reshape([y.shape[0]] + [1] * (y.ndim - 1)).to(loss.dtype)
        return loss

    # Checks with messages that name the config key. ----------------------------

    @staticmethod
    def _batch_tensor(batch: dict, key: str, option: str) -> torch.Tensor:
        value = batch.get(key)
        if not isinstance(value, torch.Tensor):
            raise ValueError(f'training.loss.{option}={key!r}: the batch has no tensor {key!r} (keys: {", ".join(sorted(batch))})')
        return value

    @staticmethod
    def _broadcastable(t: torch.Tensor, y: torch.Tensor, what: str) -> torch.Tensor:
        if t.ndim > y.ndim or any(s not in (1, u) for s, u in zip(t.shape[::-1], y.shape[::-1])):
            raise ValueError(f'training.loss: {what} of shape {tuple(t.shape)} does not broadcast to the target of shape {tuple(y.shape)}')
        return t

#----------------------------------------------------------------------------
# Variance preserving (VP) formulation, Song et al. 2021 (Eq. 103 of EDM).

@persistence.persistent_class
class VPLoss(DiffusionLoss):
    def __init__(self,
        beta_d      = 19.9,     # Extent of the noise level schedule.
        beta_min    = 0.1,      # Initial slope of the noise level schedule.
        epsilon_t   = 1e-5,     # Minimum t-value used during training.
        **parts,                # Parts of DiffusionLoss: noise, distance, mask_key, target_key.
    ):
        super().__init__(**parts)
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.epsilon_t = epsilon_t

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * (t ** 2) + self.beta_min * t).exp() - 1).sqrt()

    def sample_sigma(self, shape, device):
        rnd_uniform = torch.rand(shape, device=device)
        return self.sigma(1 + rnd_uniform * (self.epsilon_t - 1))

    def weight(self, sigma):
        return 1 / sigma ** 2

#----------------------------------------------------------------------------
# Variance exploding (VE) formulation, Song et al. 2021 (Eq. 104 of EDM).

@persistence.persistent_class
class VELoss(DiffusionLoss):
    def __init__(self,
        sigma_min   = 0.02,     # Minimum supported noise level.
        sigma_max   = 100,      # Maximum supported noise level.
        **parts,                # Parts of DiffusionLoss: noise, distance, mask_key, target_key.
    ):
        super().__init__(**parts)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def sample_sigma(self, shape, device):
        rnd_uniform = torch.rand(shape, device=device)
        return self.sigma_min * ((self.sigma_max / self.sigma_min) ** rnd_uniform)

    def weight(self, sigma):
        return 1 / sigma ** 2

#----------------------------------------------------------------------------
# EDM formulation (Section 5): log-normal sigma, lambda(sigma) = 1 / c_out^2.

@persistence.persistent_class
class EDMLoss(DiffusionLoss):
    def __init__(self,
        P_mean      = -1.2,     # Mean of ln(sigma) during training.
        P_std       = 1.2,      # Standard deviation of ln(sigma) during training.
        sigma_data  = 0.5,      # Expected standard deviation of the training data.
        **parts,                # Parts of DiffusionLoss: noise, distance, mask_key, target_key.
    ):
        super().__init__(**parts)
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data

    def sample_sigma(self, shape, device):
        rnd_normal = torch.randn(shape, device=device)
        return (rnd_normal * self.P_std + self.P_mean).exp()

    def weight(self, sigma):
        return (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2

#----------------------------------------------------------------------------
# Supervised regression through the same network, loop and snapshots: the
# network is called on x = 0 at one fixed sigma, so that c_skip x = 0 and
# D(0; sigma, cond) = c_out F(0, c_noise(sigma), cond) sees only its
# conditioning (with EDMPrecond's cond_offset: (1 - c_skip) o + c_out F(-c_in o, ...),
# o the condition image, ~ o + sigma_data F at sigma = 80); trained with L2 against the target it is the MMSE regressor
# E[y | cond], the estimate a posterior mean approaches (the supervised
# U-Net baseline of PET dose enhancement: same network, data and budget).
# Training is DiffusionLoss's step with `noisy` returning 0; `predict` is the
# same call for evaluation.

@persistence.persistent_class
class RegressionLoss(DiffusionLoss):
    def __init__(self,
        sigma       = 80.0,     # The fixed noise level the network is called at (EDM's sigma_max).
        **parts,                # Parts of DiffusionLoss: distance, mask_key, target_key (noise is unused).
    ):
        super().__init__(**parts)
        if not (isinstance(sigma, (int, float)) and not isinstance(sigma, bool) and sigma > 0):
            raise ValueError(f'training.loss.sigma: expected a positive number, got {sigma!r}')
        self.sigma = float(sigma)

    def sample_sigma(self, shape, device):
        return torch.full(shape, self.sigma, device=device)

    def weight(self, sigma):
        return torch.ones_like(sigma)

    def noisy(self, y, sigma):
        return torch.zeros_like(y)

    def predict(self, net, like: torch.Tensor, **kwargs) -> torch.Tensor:
        """The regressor's output for targets shaped like `like`, given the network's conditioning kwargs."""
        sigma = self.sample_sigma([like.shape[0]] + [1] * (like.ndim - 1), like.device).to(like.dtype)
        return net(self.noisy(like, sigma), sigma, **kwargs)

    @torch.no_grad()
    def grid(self, net, batch: dict, frozen=None) -> torch.Tensor:
        """Snapshot picture: the conditions' predictions (there is nothing to sample)."""
        y = batch[self.target_key]
        return self.predict(net, y, **self.condition(net, batch))

#----------------------------------------------------------------------------
