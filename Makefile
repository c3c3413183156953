# medEDM: set-up, demo and tests. `make demo` and `make test` work on a fresh machine.
PYTHON   ?= python3
VENV     := .venv
PY       := $(VENV)/bin/python
TORCHRUN := $(VENV)/bin/torchrun
NPROC    ?= 2
export OMP_NUM_THREADS ?= 1
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE = 1

.PHONY: venv demo demo-data demo-pet demo-pet-data demo-anomaly demo-anomaly-data bench-anomaly test test-all bench bench-train bench-sampler bench-mlem bench-projector clean

venv: $(VENV)/.installed

# torch first and pinned (the CPU wheel on this machine's disk; a bare `torch`
# would pull a CUDA build), then the rest; nilearn without its dependencies,
# only for the MNI152 template files inside its wheel.
$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -r requirements.txt
	$(VENV)/bin/pip install -q --no-deps nilearn==0.14.1
	touch $@

datasets/mni-slices-32.npz: venv
	$(PY) dataset_tool.py mri-slices --dest $@ --resolution 32 --subjects 48 --slices-per-subject 16 --seed 0

demo-data: datasets/mni-slices-32.npz

# Train a small unconditional EDM on 2-D MNI152 slices with 2 processes,
# then generate a grid of samples from the final snapshot.
demo: venv demo-data
	$(TORCHRUN) --standalone --nproc_per_node=$(NPROC) train.py -cn=edm_mri resume=none
	$(PY) -c "import glob; print(sorted(glob.glob('demo-runs/*/network-snapshot-*.pkl'))[-1])" > demo-runs/latest.txt
	$(TORCHRUN) --standalone --nproc_per_node=$(NPROC) generate.py -cn=edm_mri sampling.network_pkl=$$(cat demo-runs/latest.txt) sampling.seeds=0-63 sampling.format=npz
	$(PY) -c "import numpy as np, sys; from training import image_io; p=sys.argv[1]; d=np.load(p); image_io.save_image_grid(d['images'], p.replace('.npz', '-grid.png')); print('Sample grid:', p.replace('.npz', '-grid.png'))" $$(dirname $$(cat demo-runs/latest.txt))/$$(basename $$(cat demo-runs/latest.txt) .pkl)-samples/images.npz

# PET dose enhancement: phantoms from MNI152 GM/WM, full/low-dose simulation with
# MLEM, conditional EDM trained with 2 processes, posterior mean/std, metrics.
PET_DATA := datasets/pet-64-train.npz datasets/pet-64-val.npz datasets/pet-64-test.npz
datasets/pet-64-train.npz: venv
	$(PY) dataset_tool.py pet-data --dest $@ --resolution 64 --subjects 40 --slices-per-subject 16 --seed 0
datasets/pet-64-val.npz: venv
	$(PY) dataset_tool.py pet-data --dest $@ --resolution 64 --subjects 2 --slices-per-subject 8 --seed 1000
datasets/pet-64-test.npz: venv
	$(PY) dataset_tool.py pet-data --dest $@ --resolution 64 --subjects 4 --slices-per-subject 4 --seed 2000

demo-pet-data: $(PET_DATA)

demo-pet: venv demo-pet-data
	$(TORCHRUN) --standalone --nproc_per_node=$(NPROC) train.py -cn=edm_pet resume=none
	$(PY) -c "import glob; print(sorted(glob.glob('demo-runs/*-pet64-cond-edm/network-snapshot-*.pkl'))[-1])" > demo-runs/latest-pet.txt
	$(PY) evaluate.py pet --network $$(cat demo-runs/latest-pet.txt) --data datasets/pet-64-test.npz --val-data datasets/pet-64-val.npz --outdir demo-runs/pet-eval --samples 8

# Brain MRI anomaly detection: IXI-/BraTS-/MSLUB-like volumes from MNI152 with
# synthetic lesions, the patched DDPM and the cDDPM trained with 2 processes,
# evaluated with the reference's pipeline against two baselines.
ANOMALY_DATA := datasets/anomaly-32/splits/MSLUB_test.csv
$(ANOMALY_DATA): venv
	$(PY) dataset_tool.py anomaly-data --dest datasets/anomaly-32 --resolution 32 --slices 20 --seed 0

demo-anomaly-data: $(ANOMALY_DATA)

demo-anomaly: venv demo-anomaly-data
	$(TORCHRUN) --standalone --nproc_per_node=$(NPROC) train.py -cn=anomaly_pddpm
	$(PY) -c "import glob; print(sorted(glob.glob('demo-runs/*-anomaly-pddpm/network-snapshot-*.pkl'))[-1])" > demo-runs/latest-anomaly-pddpm.txt
	$(TORCHRUN) --standalone --nproc_per_node=$(NPROC) train.py -cn=anomaly_cddpm
	$(PY) -c "import glob; print(sorted(glob.glob('demo-runs/*-anomaly-cddpm/network-snapshot-*.pkl'))[-1])" > demo-runs/latest-anomaly-cddpm.txt
	$(PY) evaluate.py anomaly --data-root datasets/anomaly-32 --outdir demo-runs/anomaly-eval \
		--network pddpm=$$(cat demo-runs/latest-anomaly-pddpm.txt) --network cddpm=$$(cat demo-runs/latest-anomaly-cddpm.txt)

bench-anomaly: venv demo-anomaly-data
	$(PY) bench/anomaly_inference.py --data-root datasets/anomaly-32

test: venv
	$(PY) -m pytest -q -m "not slow"

test-all: venv
	$(PY) -m pytest -q

# Benchmarks print ratios against a baseline measured in the same run (see bench/*.py).
bench: bench-train bench-sampler bench-mlem bench-projector
bench-train: venv
	$(PY) bench/train_throughput.py
bench-sampler: venv
	$(PY) bench/sampler_accuracy.py
bench-mlem: venv
	$(PY) bench/mlem.py
bench-projector: venv
	$(PY) bench/projector.py

clean:
	rm -rf demo-runs training-runs .pytest_cache
