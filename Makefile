# medEDM: set-up, demo and tests. `make demo` and `make test` work on a fresh machine.
PYTHON   ?= python3
VENV     := .venv
PY       := $(VENV)/bin/python
TORCHRUN := $(VENV)/bin/torchrun
NPROC    ?= 2
PEERS_DIR := .peers
export OMP_NUM_THREADS ?= 1
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE = 1

.PHONY: venv demo demo-data demo-pet demo-pet-data demo-ldm demo-ldm-data bench-ldm3d demo-diffmic demo-diffmic-data bench-diffmic demo-anomaly demo-anomaly-data bench-anomaly test test-all bench bench-train bench-sampler bench-peers bench-mlem bench-projector bench-pet-quality clean

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

datasets/mni-slices-32.npz: | venv
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
datasets/pet-64-train.npz: | venv
	$(PY) dataset_tool.py pet-data --dest $@ --resolution 64 --subjects 40 --slices-per-subject 16 --seed 0
datasets/pet-64-val.npz: | venv
	$(PY) dataset_tool.py pet-data --dest $@ --resolution 64 --subjects 2 --slices-per-subject 8 --seed 1000
datasets/pet-64-test.npz: | venv
	$(PY) dataset_tool.py pet-data --dest $@ --resolution 64 --subjects 4 --slices-per-subject 4 --seed 2000

demo-pet-data: $(PET_DATA)

demo-pet: venv demo-pet-data
	$(TORCHRUN) --standalone --nproc_per_node=$(NPROC) train.py -cn=edm_pet resume=none
	$(PY) -c "import glob; print(sorted(glob.glob('demo-runs/*-pet64-cond-edm/network-snapshot-*.pkl'))[-1])" > demo-runs/latest-pet.txt
	$(PY) evaluate.py pet --network $$(cat demo-runs/latest-pet.txt) --data datasets/pet-64-test.npz --val-data datasets/pet-64-val.npz --outdir demo-runs/pet-eval --samples 8

# 3-D latent diffusion for BraTS-style inpainting: cases from MNI152 (6 mm),
# stage 1 KL autoencoder, stage 2 latent EDM (frozen autoencoder), both with
# 2 processes; inpaint the held-out 20 % of patients, official BraTS 2023
# metrics for the model and two baselines, NIfTI outputs and PNG panels. The
# evaluation runs single-threaded like the torchrun ranks (two threads on a busy
# 2-core machine spent several times the CPU time, spinning).
LDM_DIR := datasets/brats-inpaint-6mm
$(LDM_DIR)/.built: training/ldm3d/synth.py | venv
	rm -rf $(LDM_DIR)
	$(PY) dataset_tool.py brats-inpaint --dest $(LDM_DIR) --cases 40 --masks-per-case 2 --voxel-mm 6 --seed 0
	touch $@

demo-ldm-data: $(LDM_DIR)/.built

demo-ldm: venv demo-ldm-data
	$(TORCHRUN) --standalone --nproc_per_node=$(NPROC) train.py -cn=ldm3d_ae resume=none
	$(PY) -c "import glob; print(sorted(glob.glob('demo-runs/*-ldm3d-ae/network-snapshot-*.pkl'))[-1])" > demo-runs/latest-ldm3d-ae.txt
	$(TORCHRUN) --standalone --nproc_per_node=$(NPROC) train.py -cn=ldm3d_latent resume=none training.frozen.autoencoder=$$(cat demo-runs/latest-ldm3d-ae.txt)
	$(PY) -c "import glob; print(sorted(glob.glob('demo-runs/*-ldm3d-latent/network-snapshot-*.pkl'))[-1])" > demo-runs/latest-ldm3d.txt
	OMP_NUM_THREADS=1 $(PY) evaluate.py inpaint --network $$(cat demo-runs/latest-ldm3d.txt) --data $(LDM_DIR)/cases --growth $(LDM_DIR)/growth \
		--tissue $(LDM_DIR)/tissue --split test --outdir demo-runs/ldm3d-eval --samples 8

bench-ldm3d: venv
	$(PY) bench/ldm3d.py

# DiffMIC: MNI152 brain slices in 4 lesion classes (class folders + split file),
# the DCG classifier stage, then label-space EDM with the DCG frozen, both with
# 2 processes; each stage's snapshot chosen on the validation split; test metrics
# of the DCG prior and DiffMIC side by side, confusion matrices, reliability, panel.
# The evaluations run alone, so they take the NPROC cores as threads (1.46x faster
# than one thread on 2 cores, outputs identical).
# The stamp names the build: an older demo build (300 per class, files not named by subject) is replaced.
DIFFMIC_DATA := datasets/diffmic-mni-32
DIFFMIC_STAMP := $(DIFFMIC_DATA)/.built-1000-per-class-by-subject
$(DIFFMIC_STAMP): | venv
	rm -rf $(DIFFMIC_DATA)
	$(PY) dataset_tool.py diffmic-data --dest $(DIFFMIC_DATA) --resolution 32 --train-per-class 1000 --test-per-class 200 --seed 0
	touch $@

demo-diffmic-data: $(DIFFMIC_STAMP)

demo-diffmic: venv demo-diffmic-data
	$(TORCHRUN) --standalone --nproc_per_node=$(NPROC) train.py -cn=diffmic_dcg resume=none
	OMP_NUM_THREADS=$(NPROC) $(PY) evaluate.py diffmic --network $$(ls -d demo-runs/*-diffmic-dcg | tail -1) --split val --outdir demo-runs/diffmic-dcg-val
	$(TORCHRUN) --standalone --nproc_per_node=$(NPROC) train.py -cn=diffmic_edm resume=none \
		training.frozen.dcg=$$($(PY) -c "import json; print(json.load(open('demo-runs/diffmic-dcg-val/selection.json'))['selected'])")
	OMP_NUM_THREADS=$(NPROC) $(PY) evaluate.py diffmic --network $$(ls -d demo-runs/*-diffmic-edm | tail -1) --outdir demo-runs/diffmic-eval --samples 256 --steps 6 --sigma-max 5

bench-diffmic: venv
	$(PY) bench/diffmic.py

# Brain MRI anomaly detection: IXI-/BraTS-/MSLUB-like volumes from MNI152 with
# synthetic lesions, the patched DDPM and the cDDPM trained with 2 processes,
# evaluated with the reference's pipeline against two baselines.
ANOMALY_DATA := datasets/anomaly-32/splits/MSLUB_test.csv
$(ANOMALY_DATA): | venv
	$(PY) dataset_tool.py anomaly-data --dest datasets/anomaly-32 --resolution 32 --slices 20 --seed 0

demo-anomaly-data: $(ANOMALY_DATA)

demo-anomaly: venv demo-anomaly-data
	$(TORCHRUN) --standalone --nproc_per_node=$(NPROC) train.py -cn=anomaly_pddpm
	$(PY) -c "import glob; print(sorted(glob.glob('demo-runs/*-anomaly-pddpm/network-snapshot-*.pkl'))[-1])" > demo-runs/latest-anomaly-pddpm.txt
	$(TORCHRUN) --standalone --nproc_per_node=$(NPROC) train.py -cn=anomaly_cddpm
	$(PY) -c "import glob; print(sorted(glob.glob('demo-runs/*-anomaly-cddpm/network-snapshot-*.pkl'))[-1])" > demo-runs/latest-anomaly-cddpm.txt
	$(PY) evaluate.py anomaly --data-root datasets/anomaly-32 --outdir demo-runs/anomaly-eval \
		--network pddpm=$$(cat demo-runs/latest-anomaly-pddpm.txt) --network cddpm=$$(cat demo-runs/latest-anomaly-cddpm.txt) \
		--select-t 'pddpm=300;400;500;600;700' --select-t 'cddpm=250,500,750;150,300,450;400,500,600;500'

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
# The public samplers (k-diffusion, diffusers) beside ours: bench-only wheels, pinned in
# bench/requirements-peers.txt, installed without dependency resolution into ./.peers
# (not into .venv; the toolkit never imports them), then the side-by-side run.
$(PEERS_DIR)/.installed: bench/requirements-peers.txt | venv
	$(PY) -m pip install -q --no-deps --target $(PEERS_DIR) -r bench/requirements-peers.txt
	touch $@

bench-peers: venv $(PEERS_DIR)/.installed
	$(PY) bench/sampler_peers.py --peers-dir $(PEERS_DIR)
bench-mlem: venv
	$(PY) bench/mlem.py
bench-projector: venv
	$(PY) bench/projector.py
bench-pet-quality: venv demo-pet-data
	$(PY) bench/pet_quality.py

clean:
	rm -rf demo-runs training-runs .pytest_cache $(PEERS_DIR)
