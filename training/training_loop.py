# medEDM: diffusion-model training toolkit for medical imaging.

"""The one training loop of medEDM (after NVlabs/edm's training_loop.py):
infinite sampler -> batch dict -> augment pipe -> loss object -> backward ->
optimizer -> EMA -> kimg ticks, network snapshots and training states.
Every family plugs in through `_target_` configs: dataset, network, loss,
augment pipe and optimizer. Resuming from a training state continues the data
stream and the random streams at `cur_nimg`, so an interrupted and resumed run
ends with bit-identical weights (same world size)."""

import copy
import fnmatch
import functools
import json
import math
import os
import time

import numpy as np
import psutil
import torch

from torch_utils import distributed as dist
from torch_utils import misc
from torch_utils import persistence
from torch_utils import training_stats
from training import image_io
from training import sampling
from training import stages
from training import training_state

#----------------------------------------------------------------------------

def training_loop(
    run_dir             = '.',      # Output directory.
    dataset_kwargs      = {},       # Options of the training set (`_target_` + kwargs).
    network_kwargs      = {},       # Options of the model and preconditioner.
    loss_kwargs         = {},       # Options of the loss object.
    augment_kwargs      = None,     # Options of the augmentation pipeline, None = disable.
    optimizer_kwargs    = {},       # Options of the optimizer (`_target_` + kwargs).
    seed                = 0,        # Global random seed.
    batch_size          = 512,      # Total batch size for one training iteration.
    batch_gpu           = None,     # Limit batch size per process, None = no limit.
    total_kimg          = 200000,   # Training duration, measured in thousands of training images.
    ema_halflife_kimg   = 500,      # Half-life of the exponential moving average (EMA) of model weights.
    ema_rampup_ratio    = 0.05,     # EMA ramp-up coefficient, None = no rampup.
    lr_rampup_kimg      = 10000,    # Learning rate ramp-up duration.
    lr_decay            = 'constant', # Learning rate after the ramp-up: 'constant', 'cosine' or 'isqrt'.
    lr_decay_kimg       = 0,        # 'isqrt': lr = lr_ref / sqrt(max(kimg / lr_decay_kimg, 1)).
    lr_min_ratio        = 0,        # 'cosine': final learning rate as a fraction of the base rate.
    grad_clip           = None,     # Clip the gradient norm to this value, None = no clipping.
    loss_scaling        = 1,        # Loss scaling factor for reducing FP16 under/overflows.
    precision           = 'fp32',   # 'fp32', 'bf16' (autocast) or 'fp16' (autocast + grad scaler, CUDA only).
    freeze              = (),       # Freezing schedule: [{params: glob, start_kimg: 0, end_kimg: None}, ...].
    max_nonfinite_steps = 10,       # Abort after this many consecutive steps with non-finite loss or gradients.
    kimg_per_tick       = 50,       # Interval of progress prints.
    snapshot_ticks      = 50,       # How often to save network snapshots and sample grids, None = disable.
    state_dump_ticks    = 500,      # How often to dump training state, None = disable.
    grid_images         = 64,       # Number of images in the sample grid, 0 = disable.
    grid_steps          = 18,       # Sampler steps for the sample grid.
    slice_kimg          = None,     # Stop (with a state dump) after this many kimg in this invocation, None = run to the end.
    workers             = 2,        # DataLoader worker processes per rank.
    resume_state        = None,     # Training-state file to resume from, None = start afresh.
    frozen              = {},       # Networks of earlier stages {name: network-snapshot-*.pkl}, handed to the loss (training/stages.py).
    init_from           = None,     # Warm start: a snapshot path or {path, module, source, strict}, None = off (ignored on resume).
    print_summary       = True,     # Print a module summary at start-up?
    cudnn_benchmark     = True,     # Enable torch.backends.cudnn.benchmark?
):
    """Train a network; write snapshots, training states and stats to `run_dir`."""
    # Initialize.
    start_time = launch_time = time.time()
    device = dist.get_device()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.backends.cudnn.benchmark = cudnn_benchmark
    batch_gpu, num_accumulation_rounds, batch_note = check_options(batch_size=batch_size, batch_gpu=batch_gpu, precision=precision,
        lr_decay=lr_decay, lr_decay_kimg=lr_decay_kimg, total_kimg=total_kimg, kimg_per_tick=kimg_per_tick, ema_halflife_kimg=ema_halflife_kimg,
        ema_rampup_ratio=ema_rampup_ratio, slice_kimg=slice_kimg, grad_clip=grad_clip, loss_scaling=loss_scaling, lr_rampup_kimg=lr_rampup_kimg,
        lr_min_ratio=lr_min_ratio, snapshot_ticks=snapshot_ticks, state_dump_ticks=state_dump_ticks, max_nonfinite_steps=max_nonfinite_steps,
        grid_steps=grid_steps, workers=workers, grid_images=grid_images)
    if batch_note:
        dist.print0(batch_note)
    batch_gpu_total = batch_size // world_size
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False

    # Load dataset.
    dist.print0('Loading dataset...')
    dataset_obj = misc.construct_class(dataset_kwargs, 'training.dataset')
    if len(dataset_obj) == 0:
        raise ValueError(f'training.dataset: the dataset is empty ({dataset_kwargs.get("path")})')

    # Construct network.
    dist.print0('Constructing network...')
    augment_pipe = misc.construct_class(augment_kwargs, 'training.augment') if augment_kwargs is not None else None
    interface_kwargs = dict(img_resolution=dataset_obj.resolution, img_channels=dataset_obj.num_channels, label_dim=dataset_obj.label_dim)
    if getattr(dataset_obj, 'cond_channels', 0):
        interface_kwargs['cond_channels'] = dataset_obj.cond_channels
    if augment_pipe is not None:
        interface_kwargs['augment_dim'] = augment_pipe.augment_dim
    elif network_kwargs.get('augment_dim'): # Its input would stay unused: DDP fails on the unused weights, one process trains them never.
        raise ValueError(f'training.network.augment_dim={network_kwargs["augment_dim"]} needs an augment pipe, but training.augment '
            f'is null (set training.network.augment_dim=0 or configure training.augment)')
    frozen_nets = {name: module.to(device) for name, module in stages.load_frozen(frozen).items()} # Eval mode, no gradients.
    with torch.random.fork_rng(devices=[]): # Built before the network: it may set the network's interface (e.g. a latent shape).
        torch.manual_seed(seed)
        loss_fn = misc.construct_class(loss_kwargs, 'training.loss')
    loss_extra = _loss_extra(loss_fn, frozen_nets)
    if hasattr(loss_fn, 'network_interface'):
        interface_kwargs = dict(loss_fn.network_interface(dict(interface_kwargs), frozen_nets))
    for key, value in interface_kwargs.items():
        if key in network_kwargs and network_kwargs[key] != value:
            raise ValueError(f'training.network.{key}={network_kwargs[key]} does not match the dataset/augment pipe ({value})')
    torch.manual_seed(seed)
    net = misc.construct_class(network_kwargs, 'training.network', **{k: v for k, v in interface_kwargs.items() if k not in network_kwargs})
    net.train().requires_grad_(True).to(device)
    if resume_state is None and init_from is not None: # A resumed run has its own weights.
        copied = stages.init_from(net, init_from)
        dist.print0(f'Initialized {len(copied)} tensors from "{stages.parse_init_from(init_from)["path"]}".')

    # Set up loss and optimizer.
    dist.print0('Setting up optimizer...')
    if isinstance(loss_fn, torch.nn.Module):
        loss_fn.to(device)
        if world_size > 1: # DDP broadcasts the network's weights; a trainable loss gets rank 0's the same way.
            for tensor in list(loss_fn.parameters()) + list(loss_fn.buffers()):
                torch.distributed.broadcast(tensor.data, src=0)
    device_transform = getattr(dataset_obj, 'device_transform', lambda batch: batch) # On-device data simulation (e.g. PET).
    if stages.takes_frozen(device_transform):
        device_transform = functools.partial(device_transform, frozen=frozen_nets)
    if rank == 0 and print_summary:
        _print_summary(net, loss_fn, augment_pipe, dataset_obj, batch_gpu, device, device_transform, loss_extra)
    frozen_sha256 = stages.fingerprint(frozen_nets) # Kept in the training state, checked on resume.
    frozen_ids = stages.frozen_param_ids(frozen_nets) # Not optimized, not all-reduced: frozen nets, requires_grad=False parameters.
    loss_params = [p for p in loss_fn.parameters() if p.requires_grad and id(p) not in frozen_ids] if isinstance(loss_fn, torch.nn.Module) else []
    params = list(net.parameters()) + loss_params
    optimizer = misc.construct_class(optimizer_kwargs, 'training.optimizer', params=params)
    optimizer_class = f'{type(optimizer).__module__}.{type(optimizer).__qualname__}' # Kept in the training state.
    base_lrs = [group['lr'] for group in optimizer.param_groups]
    grad_scaler = torch.amp.GradScaler('cuda') if precision == 'fp16' else None
    autocast_dtype = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}[precision]
    freeze_groups = _resolve_freeze(net, freeze)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    ema_params, net_params = list(ema.parameters()), list(net.parameters())

    # Resume training from a previous state.
    cur_nimg, cur_tick, nonfinite_total, nonfinite_run = 0, 0, 0, 0
    tick_start_nimg = None # Start of the current tick; a resumed slice may continue one.
    if resume_state is not None:
        dist.print0(f'Resuming from "{resume_state}"...')
        state = training_state.load_state(resume_state)
        training_state.check_state_values(state, resume_state) # Counters in range, finite weights.
        stages.check_fingerprint(state, frozen_nets, resume_state) # The same frozen networks as before.
        if state.get('optimizer_class', optimizer_class) != optimizer_class: # torch would load one optimizer's state into another.
            raise ValueError(f'{resume_state} was trained with the optimizer {state["optimizer_class"]}, not the configured '
                f'training.optimizer {optimizer_class}; resume with the configuration of that run, or resume=none')
        for key, value in (('seed', seed), ('batch_size', batch_size)):
            if key in state and int(state[key]) != value:
                raise ValueError(f'training.{key}={value} differs from the {key}={int(state[key])} of {resume_state}; '
                    f'resuming would not continue that run (set training.{key}={int(state[key])} or resume=none)')
        for key, target, name in (('net', net, 'network'), ('ema', ema, 'network'), ('optimizer', optimizer, 'optimizer'),
                ('loss_fn', loss_fn if isinstance(loss_fn, torch.nn.Module) else None, 'loss')):
            if target is None or (key == 'loss_fn' and state.get(key) is None):
                continue
            try:
                target.load_state_dict(state[key])
            except (RuntimeError, ValueError, KeyError) as err: # A changed architecture, optimizer or loss.
                raise ValueError(f'{resume_state} does not fit the configured training.{name} ({key}: '
                    f'{str(err).strip().splitlines()[0][:300]}); resume with the configuration of that run, or resume=none') from None
        if grad_scaler is not None and state.get('grad_scaler') is not None:
            grad_scaler.load_state_dict(state['grad_scaler'])
        cur_nimg, cur_tick = int(state['cur_nimg']), int(state['cur_tick'])
        tick_start_nimg = state.get('tick_start_nimg') # None in states of older versions: a tick starts here.
        nonfinite_total = int(state.get('nonfinite_total', 0))
        nonfinite_run = int(state.get('nonfinite_run', 0))
        start_time -= float(state.get('total_elapsed_time', 0)) # The tick line's time counts all invocations.
        if int(state.get('world_size', world_size)) != world_size:
            dist.print0(f'Note: resuming a {state["world_size"]}-process run with {world_size} processes (not bit-identical).')
        del state
    ddp = net
    if world_size > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == 'cuda' else None)
    total_nimg = max(int(round(total_kimg * 1000)), 1)
    if cur_nimg >= total_nimg:
        dist.print0(f'Training already complete at kimg {cur_nimg / 1e3:.3f} (total_kimg={total_kimg}); nothing to do.')
        return

    # Set up the data stream, continuing at cur_nimg.
    sampler = misc.InfiniteSampler(dataset_obj, rank=rank, num_replicas=world_size, seed=seed, start_idx=cur_nimg)
    loader_kwargs = dict(pin_memory=(device.type == 'cuda'), num_workers=workers)
    if workers > 0:
        loader_kwargs.update(prefetch_factor=2, persistent_workers=True)
    dataset_iterator = iter(torch.utils.data.DataLoader(dataset_obj, sampler=sampler, batch_size=batch_gpu, **loader_kwargs))
    grid_fn = getattr(loss_fn, 'grid', None) # The stage's own picture (e.g. reconstructions) instead of the sampler's.
    want_grid = grid_images > 0 and snapshot_ticks is not None
    grid = _grid_setup(dataset_obj, grid_images, seed, device, device_transform) if want_grid and grid_fn is None else None
    grid_batch = _grid_batch(dataset_obj, grid_images, seed, device, device_transform) if want_grid and grid_fn is not None and rank == 0 else None

    # Train.
    dist.print0(f'Training for {total_kimg} kimg...')
    dist.print0()
    stats_path = os.path.join(run_dir, 'stats.jsonl')
    if rank == 0:
        _truncate_stats(stats_path, cur_nimg)
    stats_jsonl = None
    start_nimg = cur_nimg
    slice_end_nimg = start_nimg + int(round(slice_kimg * 1000)) if slice_kimg is not None else None
    tick_start_nimg = cur_nimg if tick_start_nimg is None else int(tick_start_nimg)
    timing_start_nimg = cur_nimg # Images of the tick's timing (this invocation only).
    tick_start_time = time.time()
    maintenance_time = tick_start_time - launch_time
    while True:

        # Accumulate gradients.
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros([], device=device)
        for round_idx in range(num_accumulation_rounds):
            misc.set_random_seed(seed, rank, cur_nimg, round_idx)
            with misc.ddp_sync(ddp, (round_idx == num_accumulation_rounds - 1)):
                batch = device_transform(_to_device(next(dataset_iterator), device))
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=(autocast_dtype is not None)):
                    loss = loss_fn(net=ddp, batch=batch, augment_pipe=augment_pipe, **loss_extra)
                loss = loss.float()
                training_stats.report('Loss/loss', loss)
                loss = loss.sum().mul(loss_scaling / batch_gpu_total)
                loss_sum += loss.detach()
                (grad_scaler.scale(loss) if grad_scaler is not None else loss).backward()

        # Average the gradients of trainable loss objects over ranks (DDP covers the network only).
        if world_size > 1 and loss_params:
            for p in loss_params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                torch.distributed.all_reduce(p.grad)
                p.grad /= world_size

        # Freeze modules on schedule: no gradient, no optimizer update.
        for pattern_params, start, end in freeze_groups:
            if start <= cur_nimg and (end is None or cur_nimg < end):
                for p in pattern_params:
                    p.grad = None

        # Decide on all ranks alike whether the step is finite.
        grads = [p.grad for p in params if p.grad is not None]
        if grad_scaler is not None:
            grad_scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros([], device=device)
        flags = torch.stack([torch.isfinite(grad_norm), torch.isfinite(loss_sum)]).to(torch.float64)
        if world_size > 1:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN)
        grads_finite, loss_finite = (bool(v) for v in flags.tolist())
        finite = grads_finite and loss_finite
        scaler_overflow = grad_scaler is not None and loss_finite and not grads_finite # fp16: expected now and then.

        # Update weights.
        lr_factor = _lr_factor(cur_nimg, total_nimg, lr_rampup_kimg, lr_decay, lr_decay_kimg, lr_min_ratio)
        for group, base_lr in zip(optimizer.param_groups, base_lrs):
            group['lr'] = base_lr * lr_factor
        if finite:
            nonfinite_run = 0
            training_stats.report('Loss/grad_norm', grad_norm)
            if grad_clip is not None:
                torch.nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None], grad_clip, grad_norm) # Takes parameters, not grads.
            if grad_scaler is not None:
                grad_scaler.step(optimizer)
            else:
                optimizer.step()
        elif scaler_overflow:
            grad_scaler.step(optimizer) # The scaler skips the step; update() lowers the scale.
        else:
            nonfinite_run += 1
            nonfinite_total += 1
            optimizer.zero_grad(set_to_none=True)
            dist.print0(f'Warning: non-finite loss or gradients at kimg {cur_nimg / 1e3:.3f}; step skipped ({nonfinite_run} in a row).')
            if nonfinite_run >= max_nonfinite_steps:
                raise FloatingPointError(f'aborting: {nonfinite_run} consecutive training steps had non-finite loss or gradients '
                    f'(last at kimg {cur_nimg / 1e3:.3f}); lower the learning rate or check the data '
                    f'(training.max_nonfinite_steps={max_nonfinite_steps})')
        if grad_scaler is not None:
            grad_scaler.update()

        # Update EMA (EDM: half-life in images, ramped up with cur_nimg).
        if finite:
            beta = ema_beta(cur_nimg, batch_size, ema_halflife_kimg, ema_rampup_ratio)
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, net_params, 1 - beta) # p_ema = beta * p_ema + (1 - beta) * p_net.
                for b_ema, b_net in zip(ema.buffers(), net.buffers()): # Buffers (running statistics) follow the network.
                    b_ema.copy_(b_net)

        # Perform maintenance tasks once per tick.
        cur_nimg += batch_size
        done = (cur_nimg >= total_nimg) or (slice_end_nimg is not None and cur_nimg >= slice_end_nimg)
        if (not done) and (cur_tick != 0) and (cur_nimg < tick_start_nimg + kimg_per_tick * 1000):
            continue

        # Print status line, accumulating the same information in training_stats.
        tick_end_time = time.time()
        fields = []
        fields += [f"tick {training_stats.report0('Progress/tick', cur_tick):<5d}"]
        fields += [f"kimg {training_stats.report0('Progress/kimg', cur_nimg / 1e3):<9.1f}"]
        fields += [f"time {misc.format_time(training_stats.report0('Timing/total_sec', tick_end_time - start_time)):<12s}"]
        fields += [f"sec/tick {training_stats.report0('Timing/sec_per_tick', tick_end_time - tick_start_time):<7.1f}"]
        fields += [f"sec/kimg {training_stats.report0('Timing/sec_per_kimg', (tick_end_time - tick_start_time) / max(cur_nimg - timing_start_nimg, 1) * 1e3):<7.2f}"]
        fields += [f"maintenance {training_stats.report0('Timing/maintenance_sec', maintenance_time):<6.1f}"]
        fields += [f"cpumem {training_stats.report0('Resources/cpu_mem_gb', psutil.Process(os.getpid()).memory_info().rss / 2**30):<6.2f}"]
        if device.type == 'cuda':
            fields += [f"gpumem {training_stats.report0('Resources/peak_gpu_mem_gb', torch.cuda.max_memory_allocated(device) / 2**30):<6.2f}"]
            fields += [f"reserved {training_stats.report0('Resources/peak_gpu_mem_reserved_gb', torch.cuda.max_memory_reserved(device) / 2**30):<6.2f}"]
            torch.cuda.reset_peak_memory_stats()
        fields += [f"skipped {training_stats.report0('Progress/skipped_steps', nonfinite_total)}"]
        training_stats.report0('Loss/learning_rate', base_lrs[0] * lr_factor)
        dist.print0(' '.join(fields))

        # Save network snapshot and sample grid.
        if (snapshot_ticks is not None) and (done or cur_tick % snapshot_ticks == 0):
            data = dict(ema=ema, loss_fn=loss_fn, augment_pipe=augment_pipe, dataset_kwargs=dict(dataset_kwargs))
            for key, value in data.items():
                if isinstance(value, torch.nn.Module):
                    value = copy.deepcopy(value).eval().requires_grad_(False)
                    misc.check_ddp_consistency(value)
                    data[key] = value.cpu()
            if frozen_nets: # Embedded: the stage's snapshot alone serves generate.py and evaluate.py.
                data['frozen'] = {name: copy.deepcopy(value).cpu() for name, value in frozen_nets.items()}
            if rank == 0:
                persistence.save_snapshot(data, training_state.snapshot_path(run_dir, cur_nimg))
            del data
            if grid_batch is not None: # Rank 0 draws the stage's picture.
                _save_loss_grid(grid_fn, ema, grid_batch, frozen_nets, seed, os.path.join(run_dir, f'samples-{cur_nimg // 1000:06d}.png'))
            if grid is not None: # Every rank samples its share of the grid.
                _save_grid(ema, grid, grid_steps, os.path.join(run_dir, f'samples-{cur_nimg // 1000:06d}.png'))

        # Save full dump of the training state.
        slice_stop = done and cur_nimg < total_nimg # Stopped by slice_kimg: the next invocation resumes from this state.
        tick_open = slice_stop and cur_tick != 0 and cur_nimg < tick_start_nimg + kimg_per_tick * 1000 # ... and continues this tick,
        next_tick, next_tick_start = (cur_tick, tick_start_nimg) if tick_open else (cur_tick + 1, cur_nimg) # so ticks fall where they would.
        if slice_stop or ((state_dump_ticks is not None) and (done or (cur_tick != 0 and cur_tick % state_dump_ticks == 0))):
            if rank == 0:
                training_state.save_state(training_state.state_path(run_dir, cur_nimg), dict(
                    cur_nimg=cur_nimg, cur_tick=next_tick, tick_start_nimg=next_tick_start, seed=seed, batch_size=batch_size, world_size=world_size,
                    total_elapsed_time=time.time() - start_time,
                    nonfinite_total=nonfinite_total, nonfinite_run=nonfinite_run,
                    net=net.state_dict(), ema=ema.state_dict(), optimizer=optimizer.state_dict(),
                    optimizer_class=optimizer_class, frozen_sha256=frozen_sha256,
                    loss_fn=(loss_fn.state_dict() if isinstance(loss_fn, torch.nn.Module) else None),
                    grad_scaler=(grad_scaler.state_dict() if grad_scaler is not None else None),
                ))
            dist.barrier()

        # Update logs.
        training_stats.default_collector.update()
        if rank == 0:
            if stats_jsonl is None:
                stats_jsonl = open(stats_path, 'at', encoding='utf-8')
            stats_jsonl.write(json.dumps(_finite_json(dict(training_stats.default_collector.as_dict(), timestamp=time.time()))) + '\n')
            stats_jsonl.flush()

        # Update state.
        cur_tick += 1
        tick_start_nimg = timing_start_nimg = cur_nimg
        tick_start_time = time.time()
        maintenance_time = tick_start_time - tick_end_time
        if done:
            break

    # Done.
    if stats_jsonl is not None:
        stats_jsonl.close()
    dist.print0()
    dist.print0('Exiting...' if cur_nimg >= total_nimg else f'Stopping at kimg {cur_nimg / 1e3:.3f} (slice_kimg={slice_kimg}); run again to continue.')

#----------------------------------------------------------------------------
# Option checks: ValueErrors that name the key (None = off where allowed).
# train.py calls check_options before it makes the run directory.

def check_options(batch_size=512, batch_gpu=None, precision='fp32', lr_decay='constant', lr_decay_kimg=0, total_kimg=200000,
        kimg_per_tick=50, ema_halflife_kimg=500, ema_rampup_ratio=0.05, slice_kimg=None, grad_clip=None, loss_scaling=1,
        lr_rampup_kimg=10000, lr_min_ratio=0, snapshot_ticks=50, state_dump_ticks=500, max_nonfinite_steps=10, grid_steps=18,
        workers=2, grid_images=64, **_other_options) -> tuple[int, int, str | None]:
    """Check the options that need no data or network, for this world size and device;
    -> (batch_gpu, num_accumulation_rounds, a note if batch_gpu was clamped, else None)."""
    world_size, device = dist.get_world_size(), dist.get_device()
    if precision not in ('fp32', 'bf16', 'fp16'):
        raise ValueError(f"training.precision: expected 'fp32', 'bf16' or 'fp16', got {precision!r}")
    if precision == 'fp16' and device.type != 'cuda':
        raise ValueError("training.precision=fp16 needs CUDA; use bf16 on CPU")
    if lr_decay not in ('constant', 'cosine', 'isqrt'):
        raise ValueError(f"training.lr_decay: expected 'constant', 'cosine' or 'isqrt', got {lr_decay!r}")
    if lr_decay == 'isqrt' and not lr_decay_kimg > 0:
        raise ValueError('training.lr_decay_kimg must be > 0 for isqrt decay')
    _check_numbers(dict(total_kimg=total_kimg, kimg_per_tick=kimg_per_tick, ema_halflife_kimg=ema_halflife_kimg,
        ema_rampup_ratio=ema_rampup_ratio, slice_kimg=slice_kimg, grad_clip=grad_clip, loss_scaling=loss_scaling), positive=True)
    _check_numbers(dict(lr_rampup_kimg=lr_rampup_kimg, lr_min_ratio=lr_min_ratio), positive=False)
    _check_counts(dict(snapshot_ticks=snapshot_ticks, state_dump_ticks=state_dump_ticks, max_nonfinite_steps=max_nonfinite_steps,
        grid_steps=grid_steps), least=1)
    _check_counts(dict(workers=workers, grid_images=grid_images), least=0)

    # Batch size per process.
    if batch_size < 1 or batch_size % world_size != 0:
        raise ValueError(f'training.batch_size={batch_size} must be a positive multiple of the number of processes ({world_size})')
    batch_gpu_total = batch_size // world_size
    note = None
    if batch_gpu is not None and batch_gpu > batch_gpu_total:
        note = (f'Note: training.batch_gpu={batch_gpu} is larger than the batch per process (batch_size {batch_size} / '
            f'{world_size} processes = {batch_gpu_total}); using batch_gpu={batch_gpu_total}.')
    if batch_gpu is None or batch_gpu > batch_gpu_total:
        batch_gpu = batch_gpu_total
    if batch_gpu < 1 or batch_gpu_total % batch_gpu != 0:
        raise ValueError(f'training.batch_gpu={batch_gpu} must divide batch_size / processes = {batch_gpu_total}')
    return batch_gpu, batch_gpu_total // batch_gpu, note

def _check_numbers(values: dict, positive: bool) -> None:
    for key, value in values.items():
        if value is not None and not (value > 0 if positive else value >= 0):
            raise ValueError(f'training.{key} must be {"> 0" if positive else ">= 0"}{" (or null)" if key in _NULLABLE else ""}, got {value}')

def _check_counts(values: dict, least: int) -> None:
    for key, value in values.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise ValueError(f'training.{key} must be an integer >= {least}{" (or null)" if key in _NULLABLE else ""}, got {value!r}')

_NULLABLE = ('ema_rampup_ratio', 'slice_kimg', 'grad_clip', 'snapshot_ticks', 'state_dump_ticks')

#----------------------------------------------------------------------------
# EMA decay (EDM): beta = 0.5 ** (batch_size / halflife_nimg), with the
# half-life ramped up as cur_nimg * ema_rampup_ratio.

def ema_beta(cur_nimg: int, batch_size: int, ema_halflife_kimg: float, ema_rampup_ratio: float | None) -> float:
    ema_halflife_nimg = ema_halflife_kimg * 1000
    if ema_rampup_ratio is not None:
        ema_halflife_nimg = min(ema_halflife_nimg, cur_nimg * ema_rampup_ratio)
    return 0.5 ** (batch_size / max(ema_halflife_nimg, 1e-8))

#----------------------------------------------------------------------------
# Learning-rate factor: linear ramp-up, then constant, cosine or inverse sqrt.

def _lr_factor(cur_nimg, total_nimg, lr_rampup_kimg, lr_decay, lr_decay_kimg, lr_min_ratio) -> float:
    rampup_nimg = lr_rampup_kimg * 1000
    factor = min(cur_nimg / max(rampup_nimg, 1e-8), 1)
    if lr_decay == 'cosine':
        t = min(max((cur_nimg - rampup_nimg) / max(total_nimg - rampup_nimg, 1e-8), 0), 1)
        factor *= lr_min_ratio + (1 - lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    elif lr_decay == 'isqrt':
        factor /= math.sqrt(max(cur_nimg / (lr_decay_kimg * 1000), 1))
    return factor

#----------------------------------------------------------------------------
# Freezing schedule: parameters matching a glob are not updated while
# start_kimg <= kimg < end_kimg (end_kimg None = to the end of the run).

def _resolve_freeze(net: torch.nn.Module, freeze) -> list:
    groups = []
    names = [name for name, _ in net.named_parameters()]
    for i, item in enumerate(freeze or ()):
        item = dict(item)
        pattern = item.pop('params', None)
        start_kimg = item.pop('start_kimg', 0)
        end_kimg = item.pop('end_kimg', None)
        if item:
            raise ValueError(f'training.freeze[{i}]: unknown keys {sorted(item)} (expected params, start_kimg, end_kimg)')
        if not isinstance(pattern, str):
            raise ValueError(f'training.freeze[{i}].params: expected a glob over parameter names like "model.enc.*"')
        matched = [n for n in names if fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(n, pattern + '.*')]
        if not matched:
            raise ValueError(f'training.freeze[{i}].params={pattern!r} matches no parameter of the network')
        lookup = dict(net.named_parameters())
        groups.append(([lookup[n] for n in matched], int(round(start_kimg * 1000)), None if end_kimg is None else int(round(end_kimg * 1000))))
    return groups

#----------------------------------------------------------------------------

def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True).to(torch.float32) if isinstance(v, torch.Tensor) and v.is_floating_point()
                else v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}

def _finite_json(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite_json(v) for k, v in obj.items()}
    return obj

def _truncate_stats(path: str, cur_nimg: int) -> None:
    """On resume, drop stats.jsonl lines past the resumed kimg (an interrupted run may have written them)."""
    if not os.path.isfile(path):
        return
    keep = []
    with open(path, encoding='utf-8') as f:
        for line in f:
            try:
                kimg = json.loads(line)['Progress/kimg']['mean']
            except (ValueError, KeyError, TypeError):
                continue
            if kimg * 1000 <= cur_nimg + 0.5:
                keep.append(line if line.endswith('\n') else line + '\n')
    persistence.atomic_write_bytes(path, ''.join(keep).encode('utf-8'))

#----------------------------------------------------------------------------
# Module summary on rank 0: the loss object calls the network on the first
# items of the dataset, so the summary sees the inputs that training gives it
# (labels, condition images, embeddings, augment labels, per-pixel sigma).
# The random streams are restored: the summary does not change the run.

def _print_summary(net, loss_fn, augment_pipe, dataset_obj, batch_gpu: int, device: torch.device, device_transform, loss_extra: dict) -> None:
    calls = [] # The network's inputs of its first call.
    def capture(_module, args, kwargs):
        if not calls:
            calls.append((args, kwargs))
    hook = net.register_forward_pre_hook(capture, with_kwargs=True)
    np_state = np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []), torch.no_grad():
            items = [dataset_obj[i % len(dataset_obj)] for i in range(batch_gpu)]
            batch = device_transform(_to_device(torch.utils.data.default_collate(items), device))
            loss_fn(net=net, batch=batch, augment_pipe=augment_pipe, **loss_extra)
            if calls:
                misc.print_module_summary(net, list(calls[0][0]), calls[0][1], max_nesting=2)
    finally:
        hook.remove()
        np.random.set_state(np_state)

#----------------------------------------------------------------------------
# Stages (training/stages.py): what the loss object is called with, and its
# own picture at snapshot time (reconstructions of an autoencoder, ...).

def _loss_extra(loss_fn, frozen_nets: dict) -> dict:
    if stages.takes_frozen(loss_fn):
        return dict(frozen=frozen_nets)
    if frozen_nets:
        raise ValueError(f'training.frozen: the loss object {type(loss_fn).__qualname__} takes no frozen= argument, so it '
            f'cannot use the networks {sorted(frozen_nets)} (remove training.frozen or use a loss that takes them)')
    return {}

def _grid_batch(dataset_obj, grid_images: int, seed: int, device: torch.device, device_transform) -> dict:
    with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []): # Must not move the training stream.
        torch.manual_seed(seed)
        items = [dataset_obj[i % len(dataset_obj)] for i in range(int(grid_images))]
        return device_transform(_to_device(torch.utils.data.default_collate(items), device))

@torch.no_grad()
def _save_loss_grid(grid_fn, ema: torch.nn.Module, batch: dict, frozen_nets: dict, seed: int, path: str) -> None:
    device = batch['image'].device
    with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
        torch.manual_seed(seed)
        images = grid_fn(ema, batch, frozen_nets)
    if images is not None:
        image_io.save_image_grid(images.float().cpu().numpy(), path, drange=(-1, 1)) # Volumes: three mid-slices.

#----------------------------------------------------------------------------
# Sample grid at snapshot time: fixed seeds, labels and conditions, so grids of
# successive snapshots are comparable.

def _grid_setup(dataset_obj, grid_images: int, seed: int, device: torch.device, device_transform) -> dict | None:
    if len(dataset_obj.image_shape) < 3: # Vectors: no picture to show.
        return None
    n = int(grid_images)
    grid = dict(seeds=list(range(seed, seed + n)))
    if dataset_obj.label_dim:
        grid['class_labels'] = torch.eye(dataset_obj.label_dim)[torch.arange(n) % dataset_obj.label_dim]
    if getattr(dataset_obj, 'cond_channels', 0) or 'embedding' in dataset_obj[0]:
        items = [dataset_obj[i % len(dataset_obj)] for i in range(n)]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            batch = device_transform(_to_device(torch.utils.data.default_collate(items), device))
        if getattr(dataset_obj, 'cond_channels', 0):
            grid['cond'] = batch['cond'].float().cpu()
        if 'embedding' in batch: # Embedding vectors of the network's embedding path, from the same items.
            grid['embedding'] = batch['embedding'].float().cpu()
    return grid

@torch.no_grad()
def _save_grid(ema: torch.nn.Module, grid: dict, num_steps: int, path: str) -> None:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = next(ema.parameters()).device
    idx = list(range(rank, len(grid['seeds']), world_size))
    shape = sampling.sample_shape(ema) # [C, H, W] or [C, D, H, W].
    if len(shape) < 3: # Vector networks (label space): no grid.
        return
    images = torch.zeros([0, *shape])
    if idx:
        seeds = [grid['seeds'][i] for i in idx]
        rnd = sampling.StackedRandomGenerator(device, seeds)
        latents = rnd.randn([len(seeds), *shape], device=device)
        labels, cond, embedding = grid.get('class_labels'), grid.get('cond'), grid.get('embedding')
        images = sampling.edm_sampler(ema, latents, class_labels=None if labels is None else labels[idx].to(device),
            cond=None if cond is None else cond[idx].to(device), randn_like=rnd.randn_like, num_steps=num_steps,
            embedding=None if embedding is None else embedding[idx].to(device)).float().cpu()
    parts = [images]
    if world_size > 1:
        parts = [None] * world_size if rank == 0 else None
        torch.distributed.gather_object(images, parts, dst=0)
    if rank == 0:
        order = [i for r in range(world_size) for i in range(r, len(grid['seeds']), world_size)]
        stacked = torch.cat(parts)[torch.argsort(torch.as_tensor(order))]
        image_io.save_image_grid(stacked.numpy(), path, drange=(-1, 1))

#----------------------------------------------------------------------------
