# medEDM: diffusion-model training toolkit for medical imaging.

"""Projector cache: build time against load time of the sparse system matrix.

For every resolution, in a fresh temporary cache folder:

  build  `get_system_matrix` with no cache file: exact ray-pixel lengths
         (vectorised Siddon), CSR A and A^T, column normalisation, and the
         atomic write of the .npz cache file.
  load   the same call again, which now reads and checks the cache file
         (median of several loads).

The headline is the ratio build / load: how much a cached matrix saves.

Examples:

\b
# Defaults: 64x64 and 128x128 (about 15 s on 2 cores):
python bench/projector.py

\b
# Also 256x256 (about 40 M non-zeros, 0.6 GiB file):
python bench/projector.py --resolutions 64,128,256
"""

import os
import statistics
import sys
import tempfile
import time

import click

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tomography_utils import projector # pylint: disable=wrong-import-position

#----------------------------------------------------------------------------
# One resolution: build once, load several times.

def measure(resolution: int, loads: int, cache_dir: str) -> dict:
    t0 = time.perf_counter()
    built = projector.get_system_matrix(resolution, cache_dir=cache_dir)
    build_s = time.perf_counter() - t0
    assert built.source == 'built'
    load_times = []
    for _ in range(loads):
        t0 = time.perf_counter()
        loaded = projector.get_system_matrix(resolution, cache_dir=cache_dir)
        load_times.append(time.perf_counter() - t0)
        assert loaded.source == 'loaded'
    load_s = statistics.median(load_times)
    return dict(resolution=resolution, nnz=built.nnz, file_mib=os.path.getsize(built.path) / 2**20,
        build_s=build_s, load_s=load_s, ratio=build_s / load_s)

#----------------------------------------------------------------------------

@click.command()
@click.option('--resolutions', help='Image sizes, comma-separated', default='64,128', show_default=True)
@click.option('--loads',       help='Cache loads per resolution (median reported)', type=click.IntRange(min=1), default=5, show_default=True)
def main(resolutions: str, loads: int) -> None:
    """Build time against cache-load time of the projector matrix."""
    try:
        sizes = [int(r) for r in resolutions.split(',')]
    except ValueError:
        raise click.BadParameter(f'expected comma-separated integers, got {resolutions!r}', param_hint='--resolutions') from None
    print(f'{"N":>5s} {"nnz":>11s} {"file MiB":>9s} {"build s":>9s} {"load s":>9s} {"build/load":>11s}')
    with tempfile.TemporaryDirectory(prefix='medEDM-bench-projector-') as cache_dir:
        for n in sizes:
            r = measure(n, loads, cache_dir)
            print(f'{n:5d} {r["nnz"]:11d} {r["file_mib"]:9.1f} {r["build_s"]:9.3f} {r["load_s"]:9.4f} {r["ratio"]:10.1f}x', flush=True)
    print('Headline: loading a cached matrix is build/load times faster than building it (same run, same machine).')

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main() # pylint: disable=no-value-for-parameter

#----------------------------------------------------------------------------
