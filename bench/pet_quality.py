# medEDM: diffusion-model training toolkit for medical imaging.

"""PET dose enhancement, the whole comparison under one training budget: the
conditional EDM (configs/edm_pet.yaml) and the supervised U-Net of the same
size (configs/pet_supervised.yaml) each trained with torchrun for the same
number of kimg on the same phantoms and noise model (configs: noise redrawn every step), then `evaluate.py pet` with every
classical baseline tuned on the validation split (Gaussian filter,
early-stopped MLEM, MAP-EM; per metric, reference and region).

Headline: posterior mean - best classical baseline and posterior mean -
supervised U-Net, per metric, per reference, over the whole image and the
brain, with standard errors over test images (paired). The training wall
time of each model is printed beside it: that is the budget (the issue's is
at most 30 minutes of training on 2 CPU cores at 64 x 64).

Examples:

\b
# The budgeted run (datasets from `make demo-pet-data`; 80 kimg each, about
# 25 min of training per model on 2 idle CPU cores):
python bench/pet_quality.py

\b
# Re-evaluate snapshots already trained:
python bench/pet_quality.py --edm run/network-snapshot-000080.pkl --supervised run2/network-snapshot-000080.pkl
"""

import glob
import json
import os
import shlex
import subprocess
import sys
import time

import click

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#----------------------------------------------------------------------------
# Train one configuration with torchrun; return (snapshot path, wall seconds).

def train(config: str, kimg: float, nproc: int, outdir: str, data: str, extra: list[str]) -> tuple[str, float]:
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}', os.path.join(ROOT, 'train.py'),
        f'-cn={config}', 'resume=none', f'training.outdir={outdir}', f'training.total_kimg={kimg}', f'training.dataset.path={data}', *extra]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, check=False)
    if proc.returncode:
        raise click.ClickException(f'training -cn={config} exited with status {proc.returncode} (its message is above)')
    seconds = time.time() - t0
    runs = sorted(glob.glob(os.path.join(outdir, '*', 'network-snapshot-*.pkl')), key=os.path.getmtime)
    return runs[-1], seconds

#----------------------------------------------------------------------------
# The sampler options, parsed and checked as evaluate.py pet will (its click
# options, sampling.check_sampler_options) before anything is trained.

def check_sampler_args(args: list[str]) -> None:
    sys.path.insert(0, ROOT)
    from training import evaluation, sampling # pylint: disable=import-outside-toplevel
    from training.pet import evaluation as pet_evaluation # pylint: disable=import-outside-toplevel
    required = ['--network', 'x', '--data', 'x', '--val-data', 'x', '--outdir', 'x']
    try:
        params = pet_evaluation.command.make_context('pet', required + args).params
        sampling.check_sampler_options({k: params[k] for k in sampling.SAMPLER_KEYS if k in params}, names=evaluation.SAMPLER_OPTION_NAMES)
    except click.ClickException as err:
        raise click.BadParameter(err.format_message(), param_hint='--sampler') from None
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint='--sampler') from None

#----------------------------------------------------------------------------

def headline(result: dict) -> None:
    for region in ('image', 'brain'):
        for ref in ('full_dose_mlem', 'phantom'):
            pairs = [('best classical', f'edm_minus_best_baseline_vs_{ref}'), ('supervised U-Net', f'edm_minus_supervised_unet_vs_{ref}')]
            if ref == 'full_dose_mlem':                                     # The ceiling (knows the phantom): how far from it.
                pairs.append(('oracle bound', 'edm_minus_oracle_bound_vs_full_dose_mlem'))
            for name, key in pairs:
                d = result['paired'][region].get(key)
                if d is None:
                    continue
                cells = [f'{m} {v["mean"]:+.4f} +- {v["se"]:.4f}' + (f' ({v["baseline"]})' if 'baseline' in v else '') for m, v in d.items()]
                print(f'  {region:5s} vs {ref:14s} EDM mean - {name:16s}: ' + ';  '.join(cells))
    print('  (paired over test images, standard error of the mean; NRMSE sign flipped: positive = EDM better)')
    for key in ('vs_full_dose_mlem/brain', 'vs_phantom/brain'):
        c = result['calibration'][key]
        print(f'  posterior calibration {key}: corr(std, |error|) {c["std_error_correlation"]:.3f}, '
            f'coverage +-1 std {c["coverage_1sigma"]:.3f} (calibrated: {c["calibrated_coverage_1sigma"]:.3f}), '
            f'+-2 std {c["coverage_2sigma"]:.3f} (calibrated: {c["calibrated_coverage_2sigma"]:.3f})')

@click.command()
@click.option('--kimg',       help='Training length of each model', metavar='KIMG', type=click.FloatRange(min=0, min_open=True), default=80, show_default=True)
@click.option('--nproc',      help='torchrun processes', metavar='INT', type=click.IntRange(min=1), default=2, show_default=True)
@click.option('--train-data', help='Training split', metavar='NPZ', default='datasets/pet-64-train.npz', show_default=True)
@click.option('--val-data',   help='Validation split', metavar='NPZ', default='datasets/pet-64-val.npz', show_default=True)
@click.option('--test-data',  help='Test split', metavar='NPZ', default='datasets/pet-64-test.npz', show_default=True)
@click.option('--outdir',     help='Runs and evaluation go here', metavar='DIR', default='bench-runs/pet-quality', show_default=True)
@click.option('--edm',        help='Skip training: this EDM snapshot', metavar='PKL', default=None)
@click.option('--supervised', help='Skip training: this supervised U-Net snapshot', metavar='PKL', default=None)
@click.option('--samples',    help='Posterior samples per test image', metavar='INT', type=click.IntRange(min=2), default=32, show_default=True)
@click.option('--sampler',    help='evaluate.py sampler options for the posterior samples', metavar='ARGS', default='--preset fast --steps 12', show_default=True)
def main(kimg, nproc, train_data, val_data, test_data, outdir, edm, supervised, samples, sampler):
    """Budgeted training of the EDM and the supervised U-Net, then every baseline, paired."""
    sampler_args = shlex.split(sampler)
    check_sampler_args(sampler_args)                                        # A typo fails now, not after the trainings.
    os.makedirs(outdir, exist_ok=True)
    times = {}
    if edm is None:
        edm, times['edm'] = train('edm_pet', kimg, nproc, os.path.join(outdir, 'edm'), train_data, [])
    if supervised is None:
        supervised, times['supervised'] = train('pet_supervised', kimg, nproc, os.path.join(outdir, 'supervised'), train_data, [])
    evaldir = os.path.join(outdir, 'eval')
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'evaluate.py'), 'pet', '--network', edm, '--supervised', supervised,
        '--data', test_data, '--val-data', val_data, '--outdir', evaldir, '--samples', str(samples), *sampler_args], cwd=ROOT, check=False)
    if proc.returncode:
        raise click.ClickException(f'evaluate.py pet exited with status {proc.returncode} (its message is above)')
    with open(os.path.join(evaldir, 'metrics.json'), encoding='utf-8') as f:
        result = json.load(f)
    print(f'\nPET quality: {result["images"]} test images, {samples} posterior samples ({sampler}); EDM {edm}; supervised {supervised}')
    for name, seconds in times.items():
        print(f'  training budget {name}: {kimg:g} kimg in {seconds / 60:.1f} min ({nproc} processes)')
    headline(result)

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main() # pylint: disable=no-value-for-parameter

#----------------------------------------------------------------------------
