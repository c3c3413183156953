# medEDM: diffusion-model training toolkit for medical imaging.

"""Evaluate a trained network on a test split with the metrics its family reports.

Examples:

\b
# PET dose enhancement: EDM posterior mean vs low-dose MLEM and three classical
# baselines tuned on the validation split (Gaussian post-filter, early-stopped
# MLEM, MAP-EM; add --supervised PKL for the U-Net), against the full-dose MLEM
# and against the phantom:
python evaluate.py pet --network demo-runs/00000-pet64-cond-edm/network-snapshot-000008.pkl \\
    --data datasets/pet-64-test.npz --val-data datasets/pet-64-val.npz --outdir demo-runs/pet-eval

\b
# The same with DPM-Solver++(2M), warped log-SNR steps, UniC and the analytic first step:
python evaluate.py pet ... --solver dpmpp_2m --discretization logsnr_warped --corrector unic --afs --steps 10

\b
# 3-D LDM inpainting (BraTS 2023 layout): official challenge metrics, model vs mean fill and diffusion fill:
python evaluate.py inpaint --network demo-runs/00001-ldm3d-latent/network-snapshot-000003.pkl \\
    --data datasets/brats-inpaint-6mm/cases --growth datasets/brats-inpaint-6mm/growth \\
    --tissue datasets/brats-inpaint-6mm/tissue --outdir demo-runs/ldm3d-eval --samples 4

One subcommand per family, defined in training/<family>/evaluation.py (its
click command `command`) and found by the family's name. Every subcommand
takes the same sampler options as generate.py (checked by the same function,
sampling.check_sampler_options), loads the snapshot as generate.py does and
writes metrics.json and metrics.csv atomically (metrics.write_metrics). A bad
input is one line on stderr and exit status 1, before anything is written.
"""

import importlib

import click

#----------------------------------------------------------------------------
# Families with an evaluate.py subcommand (training/<family>/evaluation.py).

FAMILIES = ('pet', 'diffmic', 'anomaly')

#----------------------------------------------------------------------------
# The one error wrapper: a ValueError / FileNotFoundError from any subcommand
# (bad options, files, networks) becomes one line "Error: <message>" and exit 1.

class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (ValueError, FileNotFoundError) as err:
            raise click.ClickException(' '.join(str(err).split('\n'))) from None

@click.group(cls=_Group)
def main():
    """Evaluate medEDM models: one subcommand per family."""

for _family in FAMILIES:
    main.add_command(importlib.import_module(f'training.{_family}.evaluation').command, _family)
main.add_command(importlib.import_module('training.ldm3d.evaluation').command, 'inpaint') # 3-D LDM inpainting (family ldm3d).

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------
