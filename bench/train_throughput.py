# medEDM: diffusion-model training toolkit for medical imaging.

"""Training throughput: the full training loop against a bare loop.

Both variants train the same network (EDMPrecond + SongUNet, the DDPM++ set-up
of configs/edm_mri.yaml at the chosen width; with --dims 3 a small
DhariwalUNet3D on volumes) on the same synthetic .npz data
(written to a temporary folder) with the same world size, batch size and
number of steps, in the same invocation of this script:

  bare  a minimal loop under torchrun (N gloo processes; N=1 plain python):
        DDP-wrapped network, pre-built batch tensors (no DataLoader), EDMLoss,
        backward, Adam step. No EMA, no statistics, no ticks, no snapshots.
  full  `training.training_loop.training_loop` called in a torchrun worker:
        DataLoader, DDP, per-step seeding, grad norm and finiteness check,
        EMA, training_stats, kimg ticks with status lines and stats.jsonl,
        network snapshots and training-state dumps. The sample grid drawn at
        snapshot time is off by default (--grid-images N turns it on): it is
        sampling, not training, and its cost depends only on N and the
        snapshot cadence.

The variants run alternately (bare, full, bare, full, ...) and the median of
each is reported, to reduce noise on a shared machine. The headline is the
ratio of the two throughputs; the loop overhead is the extra wall time per
image, bare_img_per_s / full_img_per_s - 1. Goal: overhead under 10%.
Further lines split the full loop's time into training steps and maintenance
and compare rank 0's CPU time per image, which other processes on a shared
machine hardly disturb (the wall-time numbers they do: see `other load`).

Examples:

\b
# Defaults: 2 processes, 32x32 images, batch 32, 1 kimg per run (about 3 minutes on 2 idle cores):
python bench/train_throughput.py

\b
# One process:
python bench/train_throughput.py --nproc 1

\b
# A small 3-D network on 16^3 volumes:
python bench/train_throughput.py --dims 3 --resolution 16 --batch 8 --channels 16 --kimg 0.25
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import click

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
GOAL_OVERHEAD = 0.10

#----------------------------------------------------------------------------
# Shared set-up of both variants: network, optimizer, data, step schedule.

def network_kwargs(channels: int, dims: int = 2) -> dict:
    if dims == 3:
        return dict(_target_='training.networks.EDMPrecond', model_type='DhariwalUNet3D', model_channels=channels,
            channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[4], channels_per_head=channels, dropout=0.0)
    return dict(_target_='training.networks.EDMPrecond', model_type='SongUNet', model_channels=channels,
        channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[8], dropout=0.0, embedding_type='positional',
        channel_mult_noise=1, encoder_type='standard', decoder_type='standard', resample_filter=[1, 1])

OPTIMIZER_KWARGS = dict(_target_='torch.optim.Adam', lr=2e-3, betas=[0.9, 0.999], eps=1e-8)

def make_data(path: str, n: int, resolution: int, seed: int = 0, dims: int = 2) -> None:
    """Smooth random discs (balls with dims=3) in [-1, 1], float32 (N, 1, H, W) or (N, 1, D, H, W), as in tests/launch.py."""
    import numpy as np
    rng = np.random.default_rng(seed)
    grid = np.mgrid[(slice(None, resolution),) * dims] / resolution
    images = np.empty([n, 1] + [resolution] * dims, dtype=np.float32)
    for i in range(n):
        centre, r = rng.uniform(0.3, 0.7, dims), rng.uniform(0.15, 0.3)
        images[i, 0] = np.where(sum((g - c) ** 2 for g, c in zip(grid, centre)) < r ** 2, 1.0, -1.0)
    np.savez(path, images=images)

def schedule(kimg: float, batch: int, ticks: int) -> dict:
    """Steps of the run: tick 0 is one step (the loop's first tick, start-up);
    then `ticks` ticks of `steps_per_tick` steps each are timed."""
    steps_per_tick = max(1, round((kimg * 1000 / batch - 1) / ticks))
    total_steps = 1 + ticks * steps_per_tick
    return dict(steps_per_tick=steps_per_tick, total_steps=total_steps, timed_steps=ticks * steps_per_tick,
        total_kimg=total_steps * batch / 1000,
        kimg_per_tick=(steps_per_tick * batch - 0.5) / 1000) # Half an image short: a tick ends after exactly steps_per_tick steps despite rounding.

#----------------------------------------------------------------------------
# Peak resident memory of this process in MiB. VmHWM is the high-water mark
# of this process image only; ru_maxrss (the fallback) also keeps the peak of
# the image before exec, i.e. of the forking torchrun agent.

def peak_rss_mib() -> float:
    try:
        with open('/proc/self/status', encoding='ascii') as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

def read_json(path: str) -> dict:
    with open(path, encoding='utf-8') as f:
        return json.load(f)

def write_json(path: str, obj: dict) -> None:
    with open(path + '.tmp', 'w', encoding='utf-8') as f:
        json.dump(obj, f)
    os.replace(path + '.tmp', path)

#----------------------------------------------------------------------------
# CPU seconds used on the whole machine (Linux /proc/stat) and by this
# process's finished children. Their difference over a run is the load of
# other processes, which makes the timings noisy on a shared machine.

def machine_cpu_s() -> float | None:
    try:
        with open('/proc/stat', encoding='ascii') as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
        return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf('SC_CLK_TCK') # All but idle and iowait.
    except (OSError, ValueError, IndexError):
        return None

def children_cpu_s() -> float:
    import resource
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime

#----------------------------------------------------------------------------
# Worker: the bare loop. Rank 0 times the steps after the warm-up step (the
# same single step the full loop spends in tick 0), from a barrier to the end
# of its last optimizer step.

def worker_bare(out: str, data: str, batch: int, channels: int, sched: dict, dims: int = 2) -> None:
    import numpy as np
    import torch
    from torch_utils import distributed as dist
    from torch_utils import misc
    from training.loss import EDMLoss

    dist.init()
    device = dist.get_device() # The training loop's device: cpu, or cuda:<local rank> where CUDA exists.
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    batch_per_rank = batch // world_size
    images = torch.from_numpy(np.load(data)['images'])
    torch.manual_seed(0)
    net = misc.construct_class(network_kwargs(channels, dims), 'network', img_resolution=images.shape[-1], img_channels=images.shape[1], label_dim=0)
    net.train().requires_grad_(True).to(device)
    ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == 'cuda' else None) if world_size > 1 else net
    optimizer = misc.construct_class(OPTIMIZER_KWARGS, 'optimizer', params=list(net.parameters()))
    loss_fn = EDMLoss()
    gen = torch.Generator().manual_seed(rank)
    batches = [images[torch.randint(len(images), [batch_per_rank], generator=gen)].to(device) for _ in range(sched['total_steps'])]

    dist.barrier()
    start, cpu_start = time.perf_counter(), time.process_time()
    for step, x in enumerate(batches):
        if step == sched['total_steps'] - sched['timed_steps']:
            sync()
            dist.barrier()
            start, cpu_start = time.perf_counter(), time.process_time()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(ddp, {'image': x})
        loss.sum().mul(1 / batch_per_rank).backward()
        optimizer.step()
    sync()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    write_json(os.path.join(out, f'rank{rank}.json'), dict(peak_rss_mib=peak_rss_mib(),
        images=sched['timed_steps'] * batch, seconds=seconds, cpu_seconds=cpu_seconds))
    dist.shutdown(0)

#----------------------------------------------------------------------------
# Worker: the full loop, as train.py calls it (minus Hydra and the log file).
# The process CPU time is noted at each tick's stats update (once per tick,
# next to the stats.jsonl timestamp): CPU seconds per image hardly depend on
# what other processes do, unlike wall time on a shared machine.

def worker_full(out: str, data: str, batch: int, channels: int, sched: dict, cadence: dict, dims: int = 2) -> None:
    from torch_utils import distributed as dist
    from torch_utils import training_stats
    from training import training_loop

    dist.init()
    cpu_marks = []
    update = training_stats.default_collector.update
    def update_and_mark() -> None:
        update()
        cpu_marks.append(time.process_time())
    training_stats.default_collector.update = update_and_mark
    training_loop.training_loop(run_dir=out,
        dataset_kwargs=dict(_target_='training.dataset.NpzDataset', path=data),
        network_kwargs=network_kwargs(channels, dims), loss_kwargs=dict(_target_='training.loss.EDMLoss'),
        optimizer_kwargs=dict(OPTIMIZER_KWARGS), seed=0, batch_size=batch,
        total_kimg=sched['total_kimg'], kimg_per_tick=sched['kimg_per_tick'],
        ema_halflife_kimg=1, lr_rampup_kimg=0.5, print_summary=False, **cadence)
    write_json(os.path.join(out, f'rank{dist.get_rank()}.json'), dict(peak_rss_mib=peak_rss_mib(),
        cpu_seconds=(cpu_marks[-1] - cpu_marks[0]) if len(cpu_marks) >= 2 else None))
    dist.shutdown(0)

#----------------------------------------------------------------------------
# Throughput of a full-loop run from its stats.jsonl. Each line's `timestamp`
# is taken at the very end of its tick, after that tick's snapshot, state dump
# and stats all-reduce. The window from tick 0's line to the last line
# therefore holds exactly ticks 1..N: every training step (DataLoader, seeding,
# forward/backward with DDP all-reduce, grad norm and finiteness all-reduce,
# Adam, EMA, training_stats.report) plus every tick's maintenance (status line,
# stats all-reduce and stats.jsonl write, network snapshots with sample grids
# and training-state dumps, including the final ones). Excluded, as for the
# bare loop: process start, imports, dataset load, network construction, and
# tick 0 (one step plus its snapshot). `steps_img_per_s` uses the loop's own
# Timing/sec_per_tick of ticks 1..N instead, which leaves out maintenance.

def full_loop_rate(stats_path: str) -> dict:
    with open(stats_path, encoding='utf-8') as f:
        lines = [json.loads(line) for line in f if line.strip()]
    if len(lines) < 2:
        raise RuntimeError(f'{stats_path}: expected tick 0 and later ticks, got {len(lines)} lines')
    kimg = [line['Progress/kimg']['mean'] for line in lines]
    images = (kimg[-1] - kimg[0]) * 1000
    seconds = lines[-1]['timestamp'] - lines[0]['timestamp']
    step_seconds = sum(line['Timing/sec_per_tick']['mean'] for line in lines[1:])
    return dict(images=images, seconds=seconds, img_per_s=images / seconds,
        steps_img_per_s=images / step_seconds, maintenance_s=seconds - step_seconds)

#----------------------------------------------------------------------------
# Launch one run: torchrun with N processes (N=1: plain python), this script
# in worker mode. Returns the run's throughput and per-rank peak RSS.

def launch(variant: str, out: str, opts: dict) -> dict:
    nproc = opts['nproc']
    os.makedirs(out)
    config = os.path.join(out, 'options.json') # Options travel in a file: torchrun would take --nproc=... for its own.
    write_json(config, opts)
    worker = [os.path.abspath(__file__), '--worker', variant, '--outdir', out, '--config', config]
    cmd = [sys.executable, *worker] if nproc == 1 else [os.path.join(BIN, 'torchrun'), '--standalone', f'--nproc_per_node={nproc}', *worker]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, cores // nproc)), TORCH_DISABLE_SHARE_RDZV_TCP_STORE='1',
        PYTHONPATH=os.pathsep.join([ROOT] + ([os.environ['PYTHONPATH']] if os.environ.get('PYTHONPATH') else [])))
    start, machine0, children0 = time.time(), machine_cpu_s(), children_cpu_s()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    wall, machine1, children1 = time.time() - start, machine_cpu_s(), children_cpu_s()
    other_load = None if machine0 is None or machine1 is None else max(machine1 - machine0 - (children1 - children0), 0) / wall
    if proc.returncode != 0:
        raise click.ClickException(f'{variant} run failed (exit {proc.returncode}): {" ".join(cmd)}\n'
            f'STDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-3000:]}')
    ranks = [read_json(os.path.join(out, f'rank{r}.json')) for r in range(nproc)]
    if variant == 'bare':
        rate = dict(images=ranks[0]['images'], seconds=ranks[0]['seconds'])
        rate['img_per_s'] = rate['images'] / rate['seconds']
    else:
        rate = full_loop_rate(os.path.join(out, 'stats.jsonl'))
    rate['cpu_ms_per_img'] = ranks[0]['cpu_seconds'] / rate['images'] * 1e3 if ranks[0]['cpu_seconds'] is not None else float('nan')
    return dict(rate, rss_mib=[r['peak_rss_mib'] for r in ranks], wall_s=wall, other_load=other_load)

#----------------------------------------------------------------------------

@click.command(help=__doc__.split('\n\n')[0])
@click.option('--nproc',            help='Processes per run (torchrun, gloo on CPU; 1 = plain python)', metavar='INT', type=click.IntRange(min=1), default=2, show_default=True)
@click.option('--dims',             help='2: images and SongUNet; 3: volumes and DhariwalUNet3D', metavar='INT', type=click.IntRange(min=2, max=3), default=2, show_default=True)
@click.option('--resolution',       help='Image (volume) resolution', metavar='INT',                  type=click.IntRange(min=8), default=32, show_default=True)
@click.option('--batch',            help='Total batch size over all processes', metavar='INT', type=click.IntRange(min=1), default=32, show_default=True)
@click.option('--kimg',             help='Training length of each run (approximate)', metavar='KIMG', type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True)
@click.option('--channels',         help='model_channels of the SongUNet', metavar='INT',    type=click.IntRange(min=1), default=32, show_default=True)
@click.option('--repeats',          help='Runs of each variant, alternating', metavar='INT', type=click.IntRange(min=1), default=2, show_default=True)
@click.option('--ticks',            help='Timed ticks of the full loop (after tick 0)', metavar='INT', type=click.IntRange(min=1), default=6, show_default=True)
@click.option('--snapshot-ticks',   help='Full loop: snapshot every N ticks', metavar='INT', type=click.IntRange(min=1), default=3, show_default=True)
@click.option('--state-dump-ticks', help='Full loop: training-state dump every N ticks', metavar='INT', type=click.IntRange(min=1), default=3, show_default=True)
@click.option('--grid-images',      help='Full loop: images in the snapshot sample grid (0 = none)', metavar='INT', type=click.IntRange(min=0), default=0, show_default=True)
@click.option('--grid-steps',       help='Full loop: sampler steps of the grid', metavar='INT', type=click.IntRange(min=1), default=18, show_default=True)
@click.option('--workers',          help='Full loop: DataLoader workers per rank', metavar='INT', type=click.IntRange(min=0), default=0, show_default=True)
@click.option('--worker',           help='Internal: run one rank of this variant', type=click.Choice(['bare', 'full']), default=None, hidden=True)
@click.option('--outdir',           help='Internal: output folder of the run', type=str, default=None, hidden=True)
@click.option('--config',           help='Internal: options of the launcher (JSON)', type=str, default=None, hidden=True)
def main(**opts):
    """Run bare and full loop alternately; print overhead and peak memory."""
    if opts['worker'] is not None:
        opts.update({k: v for k, v in read_json(opts['config']).items() if k not in ('worker', 'outdir', 'config')})
    if opts['batch'] % opts['nproc'] != 0:
        raise click.BadParameter(f'--batch={opts["batch"]} must be a multiple of --nproc={opts["nproc"]}')
    sched = schedule(opts['kimg'], opts['batch'], opts['ticks'])
    cadence = dict(snapshot_ticks=opts['snapshot_ticks'], state_dump_ticks=opts['state_dump_ticks'],
        grid_images=opts['grid_images'], grid_steps=opts['grid_steps'], workers=opts['workers'])

    # Worker mode (inside torchrun).
    if opts['worker'] is not None:
        sys.path.insert(0, ROOT)
        if opts['worker'] == 'bare':
            worker_bare(opts['outdir'], opts['data'], opts['batch'], opts['channels'], sched, opts['dims'])
        else:
            worker_full(opts['outdir'], opts['data'], opts['batch'], opts['channels'], sched, cadence, opts['dims'])
        return

    # Launcher: data, then bare/full alternately.
    size = 'x'.join([str(opts['resolution'])] * opts['dims'])
    model = 'DhariwalUNet3D' if opts['dims'] == 3 else 'SongUNet'
    print(f'medEDM training throughput: {opts["nproc"]} process(es), {size}, batch {opts["batch"]}, '
        f'{model} model_channels {opts["channels"]}, {sched["total_steps"]} steps ({sched["total_kimg"]:.3f} kimg) per run, '
        f'{sched["timed_steps"]} timed ({opts["ticks"]} ticks x {sched["steps_per_tick"]} steps)')
    grid = f'{opts["grid_images"]}-image grid, {opts["grid_steps"]} steps' if opts['grid_images'] else 'no grid'
    print(f'full loop cadence: snapshot every {opts["snapshot_ticks"]} ticks ({grid}), '
        f'state dump every {opts["state_dump_ticks"]} ticks, final snapshot and dump, workers={opts["workers"]}')
    results = dict(bare=[], full=[])
    with tempfile.TemporaryDirectory(prefix='medEDM-bench-') as tmp:
        opts['data'] = os.path.join(tmp, 'data.npz')
        make_data(opts['data'], n=max(256, opts['batch'] * 4), resolution=opts['resolution'], dims=opts['dims'])
        order = ['bare', 'full'] * opts['repeats']
        for idx, variant in enumerate(order):
            r = launch(variant, os.path.join(tmp, f'{idx}-{variant}'), opts)
            results[variant].append(r)
            extra = f', steps only {r["steps_img_per_s"]:.2f} img/s, maintenance {r["maintenance_s"]:.1f} s' if variant == 'full' else ''
            print(f'  [{idx + 1}/{len(order)}] {variant:<4s} {r["img_per_s"]:7.2f} img/s ({r["images"]:.0f} images in {r["seconds"]:.1f} s{extra}), '
                f'rank-0 CPU {r["cpu_ms_per_img"]:.1f} ms/img, peak RSS rank 0 {r["rss_mib"][0]:.0f} MiB, wall {r["wall_s"]:.0f} s'
                + (f', other load {r["other_load"]:.1f} cores' if r['other_load'] is not None else ''), flush=True)

    # Report medians.
    def med(variant: str, key: str) -> float:
        return statistics.median(r['rss_mib'][0] if key == 'rss0' else r[key] for r in results[variant])
    bare, full, steps = med('bare', 'img_per_s'), med('full', 'img_per_s'), med('full', 'steps_img_per_s')
    overhead = bare / full - 1
    ticks = opts['ticks']
    snapshots = sum(1 for k in range(1, ticks + 1) if k % opts['snapshot_ticks'] == 0 or k == ticks)
    dumps = sum(1 for k in range(1, ticks + 1) if k % opts['state_dump_ticks'] == 0 or k == ticks)
    print()
    print(f'loop overhead: {overhead * 100:.1f}% (full loop {full:.1f} img/s vs bare {bare:.1f} img/s, ratio {full / bare:.3f})')
    print(f'peak RSS: rank 0 {med("full", "rss0"):.0f} MiB (full loop) vs {med("bare", "rss0"):.0f} MiB (bare)')
    print(f'absolute (median of {opts["repeats"]}): {sched["timed_steps"] * opts["batch"]} images in {med("bare", "seconds"):.1f} s bare, '
        f'{med("full", "seconds"):.1f} s full loop, of which {med("full", "maintenance_s"):.1f} s maintenance '
        f'({snapshots} snapshot(s){" with grid" if opts["grid_images"] else ""}, {dumps} state dump(s), {ticks} stats lines)')
    print(f'full loop training steps alone (Timing/sec_per_tick): {steps:.1f} img/s, overhead {(bare / steps - 1) * 100:.1f}%')
    print(f'rank-0 CPU time per image (hardly affected by other load): full loop {med("full", "cpu_ms_per_img"):.1f} ms vs bare '
        f'{med("bare", "cpu_ms_per_img"):.1f} ms, overhead {(med("full", "cpu_ms_per_img") / med("bare", "cpu_ms_per_img") - 1) * 100:.1f}%')
    print(f'goal: overhead < {GOAL_OVERHEAD * 100:.0f}%: {"met" if overhead < GOAL_OVERHEAD else "NOT met"}')
    loads = [r['other_load'] for r in results['bare'] + results['full'] if r['other_load'] is not None]
    if loads and max(loads) > 0.25:
        print(f'warning: other processes kept up to {max(loads):.1f} cores busy during the runs; the timings are noisy, rerun on a quiet machine')

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------
