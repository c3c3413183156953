# medEDM: diffusion-model training toolkit for medical imaging.

"""Test-time reconstruction of the anomaly-detection DDPMs, batched.

One network call D(x + sigma n; sigma) is the reference's x0 prediction at
its test step (training/anomaly/loss.py maps t onto sigma). The noise n is
one field per volume, shared by all its slices and boxes (as the reference).

    reconstruct_full      cDDPM / DDPM: the whole slice noised at each sigma of
                          the ensemble, reconstructions averaged (cDDPM: 250/500/750)
    reconstruct_patched   pDDPM: for every box of the grid only the box is noised
                          (per-pixel sigma; D = x outside it exactly); the box
                          regions of the predictions are stitched (overlaps averaged)

Both take any number of slices (of several volumes: `noise` per slice) and
run every (slice, box, sigma) job in forward passes of up to `batch` samples;
`reconstruct_volume_reference` is the reference's way (one box at a time, one
volume at a time) for the benchmark and the equality test.

Given the brain masks eroded as the anomaly map erodes them (`active`), the
jobs that cannot change the map are skipped: a slice (cDDPM) or a box of a
slice (pDDPM) without any voxel of the eroded mask, since the map is zeroed
there before the median filter; the reconstruction is the input there. The
final anomaly maps are the same as without skipping (the bench asserts it).
The cDDPM encoder runs once per slice for all sigmas of the ensemble."""

import torch

from training.anomaly import simplex

#----------------------------------------------------------------------------
# Boxes of a grid: (row0, col0, row1, col1); the last box is moved in so that
# the grid covers the image (evenly spaced when stride < patch_size).

def grid_boxes(height: int, width: int, patch_size: int, stride: int | None = None) -> list[tuple[int, int, int, int]]:
    stride = patch_size if stride is None else stride
    if patch_size > min(height, width):
        raise ValueError(f'patch_size={patch_size} is larger than the image ({height} x {width})')
    def starts(n):
        s = list(range(0, n - patch_size + 1, stride))
        if s[-1] + patch_size < n:
            s.append(n - patch_size)
        return s
    return [(r, c, r + patch_size, c + patch_size) for r in starts(height) for c in starts(width)]

def box_masks(corners: torch.Tensor, patch_size: int, height: int, width: int) -> torch.Tensor:
    """(N, 2) box corners (row, col) -> (N, 1, H, W) float masks, 1 inside the box."""
    rows = torch.arange(height, device=corners.device)[None, :, None]
    cols = torch.arange(width, device=corners.device)[None, None, :]
    r0, c0 = corners[:, 0, None, None], corners[:, 1, None, None]
    inside = (rows >= r0) & (rows < r0 + patch_size) & (cols >= c0) & (cols < c0 + patch_size)
    return inside[:, None].float()

#----------------------------------------------------------------------------
# Noise fields at test time: one (1, H, W) field per volume, from a seed, so a
# volume's reconstruction does not depend on the batch it was computed in.

def noise_fields(count: int, height: int, width: int, kind: str, device, seed: int = 0, frequency: float = 64) -> torch.Tensor:
    """(count, 1, H, W): field i from seed + i ('simplex' of the given first-octave feature size, or 'gaussian')."""
    out = []
    for i in range(count):
        gen = torch.Generator(device=device).manual_seed(seed + i)
        if kind == 'simplex':
            out.append(simplex.simplex_field(height, width, frequency=frequency, device=device, generator=gen))
        elif kind == 'gaussian':
            out.append(torch.randn([height, width], device=device, generator=gen))
        else:
            raise ValueError(f"noise {kind!r}: expected 'simplex' or 'gaussian'")
    return torch.stack(out)[:, None] if out else torch.zeros([0, 1, height, width], device=device)

#----------------------------------------------------------------------------

def _embedding(net, x: torch.Tensor, batch: int) -> torch.Tensor | None:
    encode = getattr(net, 'encode', None) # cDDPM: the encoder of the clean slice, once for every sigma.
    if encode is None:
        return None
    return torch.cat([encode(x[i:i + batch]) for i in range(0, len(x), batch)])

@torch.inference_mode()
def reconstruct_full(net, x: torch.Tensor, noise: torch.Tensor, sigmas, batch: int = 256, active: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over sigma of D(x + sigma n; sigma) for slices x (M, 1, H, W) and noise (M or 1, 1, H, W);
    slices without any True pixel of `active` (M, 1, H, W) are not computed (output = input)."""
    sigmas = [float(s) for s in sigmas]
    noise = noise.expand_as(x)
    if active is not None:
        keep = active.reshape(len(x), -1).any(dim=1)
        out = x.clone()
        if keep.any():
            out[keep] = reconstruct_full(net, x[keep], noise[keep], sigmas, batch=batch)
        return out
    emb = _embedding(net, x, batch)
    m = len(x)
    jobs = [(k, i) for k in range(len(sigmas)) for i in range(m)] # Every (sigma, slice) pair.
    out = torch.zeros_like(x)
    for start in range(0, len(jobs), batch):
        k = torch.as_tensor([j[0] for j in jobs[start:start + batch]], device=x.device)
        i = torch.as_tensor([j[1] for j in jobs[start:start + batch]], device=x.device)
        sigma = torch.as_tensor(sigmas, device=x.device)[k].reshape(-1, 1, 1, 1)
        kwargs = {} if emb is None else dict(embedding=emb[i])
        D = net(x[i] + sigma * noise[i], sigma, **kwargs)
        out.index_add_(0, i, D.to(out.dtype))
    return out / len(sigmas)

@torch.inference_mode()
def reconstruct_patched(net, x: torch.Tensor, noise: torch.Tensor, sigma: float, boxes, batch: int = 256, active: torch.Tensor | None = None) -> torch.Tensor:
    """Stitched reconstruction of slices x (M, 1, H, W): box b of slice i comes from
    D(x_i + sigma M_b n_i; sigma M_b), for every box of `boxes` (overlaps averaged);
    boxes without any True pixel of `active` (M, 1, H, W) are skipped (output = input where no box ran)."""
    h, w = x.shape[-2:]
    noise = noise.expand_as(x)
    corners = torch.as_tensor([b[:2] for b in boxes], device=x.device)
    size = boxes[0][2] - boxes[0][0]
    masks = box_masks(corners, size, h, w)                      # (B, 1, H, W)
    if (masks.sum(0) == 0).any():
        raise ValueError(f'the boxes do not cover the {h} x {w} image')
    m = len(x)
    if active is None:
        jobs = [(b, i) for b in range(len(boxes)) for i in range(m)]
    else:
        hit = ((masks[:, None] > 0) & active[None].bool()).reshape(len(boxes), m, -1).any(dim=2).cpu() # (B, M)
        jobs = [(b, i) for b in range(len(boxes)) for i in range(m) if hit[b, i]]
    out = torch.zeros_like(x)
    count = torch.zeros_like(x)
    for start in range(0, len(jobs), batch):
        b = torch.as_tensor([j[0] for j in jobs[start:start + batch]], device=x.device)
        i = torch.as_tensor([j[1] for j in jobs[start:start + batch]], device=x.device)
        sigma_map = sigma * masks[b]                            # Per-pixel sigma: 0 outside the box.
        D = net(x[i] + sigma_map * noise[i], sigma_map)
        out.index_add_(0, i, (D * masks[b]).to(out.dtype))      # Keep the box region only.
        count.index_add_(0, i, masks[b].to(out.dtype))
    return torch.where(count > 0, out / count.clamp(min=1), x)

#----------------------------------------------------------------------------
# Whole volumes: every slice of every volume in the same large passes.

@torch.inference_mode()
def reconstruct_volumes(net, volumes: list[torch.Tensor], method: dict, seed: int = 0, batch: int = 256, first_index: int = 0,
        active: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Reconstruct volumes [(S_v, 1, H, W)]; method = dict(kind='full'|'patched', sigmas, noise, boxes).
    Volume v uses the noise field of seed + first_index + v. `active`: per volume the (S_v, 1, H, W)
    eroded brain mask; jobs without any of its pixels are skipped (module docstring)."""
    if not volumes:
        return []
    device = volumes[0].device
    h, w = volumes[0].shape[-2:]
    fields = noise_fields(len(volumes), h, w, method['noise'], device, seed=seed + first_index, frequency=method.get('frequency', 64))
    x = torch.cat(volumes)
    noise = torch.cat([fields[v:v + 1].expand(len(vol), -1, -1, -1) for v, vol in enumerate(volumes)])
    act = None if active is None else torch.cat([a.to(device) for a in active])
    if method['kind'] == 'patched':
        out = reconstruct_patched(net, x, noise, method['sigmas'][0], _boxes(method, h, w), batch=batch, active=act)
    elif method.get('steps', 1) > 1:
        out = reconstruct_solver(net, x, noise, method['sigmas'], method['steps'], batch=batch)
    else:
        out = reconstruct_full(net, x, noise, method['sigmas'], batch=batch, active=act)
    return list(out.split([len(v) for v in volumes]))

@torch.inference_mode()
def reconstruct_solver(net, x: torch.Tensor, noise: torch.Tensor, sigmas, steps: int, batch: int = 256) -> torch.Tensor:
    """Mean over sigma of a `steps`-step deterministic solve (training.sampling.reconstruct,
    Euler, EDM's time steps from sigma_test down to sigma_min) from x + sigma n: the
    optional multi-step variant of the one-call x0 prediction (steps = 1)."""
    from training import sampling
    noise = noise.expand_as(x)
    emb = _embedding(net, x, batch)
    out = torch.zeros_like(x)
    for s in [float(v) for v in sigmas]:
        for i in range(0, len(x), batch):
            kwargs = {} if emb is None else dict(embedding=emb[i:i + batch])
            r = sampling.reconstruct(net, x[i:i + batch], noise[i:i + batch], sigma_start=s, solver='euler', num_steps=steps,
                sigma_min=min(0.002, s), **kwargs)
            out[i:i + batch] += r.to(out.dtype)
    return out / len(sigmas)

@torch.inference_mode()
def reconstruct_volume_reference(net, volume: torch.Tensor, method: dict, seed: int = 0, index: int = 0) -> torch.Tensor:
    """The reference's way: one volume at a time, one box (or one sigma) per forward pass."""
    h, w = volume.shape[-2:]
    noise = noise_fields(1, h, w, method['noise'], volume.device, seed=seed + index, frequency=method.get('frequency', 64)).expand_as(volume)
    if method['kind'] == 'patched':
        out = volume.clone()
        for r0, c0, r1, c1 in _boxes(method, h, w):
            sigma_map = torch.zeros_like(volume)
            sigma_map[..., r0:r1, c0:c1] = method['sigmas'][0]
            D = net(volume + sigma_map * noise, sigma_map)
            out[..., r0:r1, c0:c1] = D[..., r0:r1, c0:c1]
        return out
    emb = net.encode(volume) if hasattr(net, 'encode') else None
    recos = []
    for s in method['sigmas']:
        kwargs = {} if emb is None else dict(embedding=emb)
        recos.append(net(volume + s * noise, torch.full([len(volume)], float(s), device=volume.device), **kwargs))
    return torch.stack(recos).mean(0)

def _boxes(method: dict, h: int, w: int) -> list:
    return method.get('boxes') or grid_boxes(h, w, method['patch_size'], method['stride'])

def method_of(loss_fn, sigmas=None, noise=None) -> dict:
    """The reconstruction of a snapshot's loss object (PatchedLoss -> patched)."""
    patched = hasattr(loss_fn, 'patch_size') and hasattr(loss_fn, 'box')
    method = dict(kind='patched' if patched else 'full', sigmas=list(sigmas or loss_fn.test_sigmas), noise=noise or loss_fn.noise,
        frequency=getattr(loss_fn, 'frequency', 64.0))
    if patched:
        method['patch_size'], method['stride'] = loss_fn.patch_size, loss_fn.stride
    return method

#----------------------------------------------------------------------------
