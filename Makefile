# Every target creates and fills .venv itself; constraints.txt pins torch to the local CPU wheel.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast bench lint experiments docs clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[all]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/ppl-vae train vae_digits --out runs/vae_digits --overwrite
	$(BIN)/ppl-vae eval runs/vae_digits --plots
	$(BIN)/ppl-vae sample runs/vae_digits --n 64 --out runs/vae_digits/samples.png

# pytest-xdist, two worker processes, an idle one taking queued tests from the busy one
# (worksteal): the suite took 552 s on 2 quiet cores (2026-12-08; 700 s before the changes of
# that day: one XLA compilation cache per run, float64 parity on one case per formula, the
# longest tests first).
test: $(STAMP)
	$(BIN)/ruff check ppl_vae tests examples benchmarks
	$(BIN)/python -m pytest -q -n 2 --dist worksteal

# The suite without the tests marked slow (the smoke runs of examples and benchmarks, launches of
# data-parallel processes, longer trainings; tests/conftest.py and the test files mark them).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist worksteal -m "not slow"

# make bench DEVICE=cuda: the GPU benchmark (batches 128, 1024, 4096 and the conv step)
DEVICE ?= cpu
bench: $(STAMP)
	$(BIN)/python benchmarks/bench_step.py --device $(DEVICE)
	$(BIN)/python benchmarks/bench_psis.py
	$(BIN)/python benchmarks/precision_check.py
	$(BIN)/python benchmarks/bench_devices.py
	$(BIN)/python benchmarks/bench_streaming.py
	$(BIN)/python benchmarks/bench_sweep.py

# The lecture's five experiments, the latent-graph comparison, M2 and the discrete latents
# (examples/README.md): about 95 minutes on 2 CPU cores (latent_graphs about 58 CPU-minutes,
# discrete_latents about 17), then the dSprites sweep (3 β x 3 seeds, about 40 CPU-minutes).
experiments: $(STAMP)
	for e in posterior_collapse rate_distortion universality encoder_autonomy latent_graphs \
			semi_supervised discrete_latents; do \
		$(BIN)/python examples/$$e.py --backend numpyro || exit 1; done
	$(BIN)/python examples/disentangle.py --backend pyro

# The documentation site into site/, strict (a broken link, anchor or API reference fails it).
# tests/test_docs.py loads it in Debian's headless Chromium: installed here where missing, as
# root with apt-get; elsewhere the browser test skips and says why.
DOCS_STAMP := $(VENV)/.installed-docs
$(DOCS_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[docs]'
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			chromium chromium-driver || echo "note: chromium not installed: the browser test skips"; \
	else echo "note: no chromium/chromedriver and no apt-get as root: the browser test skips"; fi
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site
	@echo "site/ built: python3 -m http.server -d site, then http://127.0.0.1:8000/ (or $(BIN)/mkdocs serve)"

lint: $(STAMP)
	$(BIN)/ruff check ppl_vae tests examples benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache site
