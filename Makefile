PYTHON ?= python3
SOURCE ?= https://www.gutenberg.org/cache/epub/829/pg829.txt
DATA := data/gulliver
# the GPU experiment where CUDA is present, the 5-minute CPU model otherwise; DEVICE asks torch
# once, when first used (demo), so that other targets do not pay for importing it
DEVICE = $(eval DEVICE := $(shell $(PYTHON) -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')" 2>/dev/null || echo cpu))$(DEVICE)
CONFIG = $(if $(filter cuda,$(DEVICE)),config/gulliver.py,config/gulliver_cpu.py)
OUT = $(if $(filter cuda,$(DEVICE)),out-gulliver,out-gulliver-cpu)
PROMPT := "I was going to"

.PHONY: install test data demo gpu-check

# pip runs again only when a requirements file is newer than the stamp of its last success
install: .installed
.installed: requirements.txt requirements-dev.txt
	@$(PYTHON) -m pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
	@touch $@

# the suite needs one pytest plugin, xdist: others installed beside it are not loaded
test: install
	PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 $(PYTHON) -m pytest -p xdist.plugin -q -n auto --dist worksteal --durations=15 tests

data:
	@if [ -f $(DATA)/train.bin ]; then echo "== $(DATA)/train.bin exists: reusing it (delete $(DATA) to rebuild)"; \
	else $(PYTHON) prepare.py --source=$(SOURCE) || { echo "offline? run: make demo SOURCE=path/to/pg829.txt" >&2; exit 1; }; fi

demo: install data
	@echo "== training on $(DEVICE) with $(CONFIG)"
	$(PYTHON) train.py $(CONFIG) --overwrite=True
	@echo "== an untrained model of the same shape says:"
	@$(PYTHON) sample.py --out_dir=$(OUT) --init_from=scratch --start=$(PROMPT) --max_new_tokens=40 --seed=1
	@echo "== the trained model says:"
	@$(PYTHON) sample.py --out_dir=$(OUT) --start=$(PROMPT) --max_new_tokens=40 --seed=1
	@echo "== analysing the embeddings"
	$(PYTHON) analyze.py --out_dir=$(OUT) --report_dir=$(OUT)/report
	@echo "== done: report $(OUT)/report/report.md, figures $(OUT)/report/*.png, checkpoint $(OUT)/ckpt.pt, loss curve $(OUT)/loss.png"

# the GPU path, about 5 minutes on one H100: installs nothing (a GPU machine may have no network),
# needs data/gulliver prepared; writes gpu_check.md
gpu-check:
	$(PYTHON) gpu_check.py
