# Set-up is automatic: the first `make test` or `make demo` creates .venv and installs requirements.txt
# (and requirements-export.txt, the optional ONNX packages, so that the tests cover export.py).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_OUT ?= output/demo

.PHONY: test test-bad-input demo bench clean

$(VENV)/.installed: requirements.txt requirements-export.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-export.txt
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

# the generated bad-input tests with many random examples (make test runs a small fixed set)
test-bad-input: $(VENV)/.installed
	HYPOTHESIS_PROFILE=thorough $(PY) -m pytest -q tests/test_bad_input.py

demo: $(VENV)/.installed
	$(PY) main.py --data-set synthetic --model sdt2net_tiny_patch16_224 --input-size 64 --epochs 2 \
		--batch-size 32 --target_flops 0.12 --output_dir $(DEMO_OUT) --num_workers 0 --warmup-epochs 0 --autoresume
	$(PY) main.py --data-set synthetic --model sdt2net_tiny_patch16_224 --input-size 64 --eval \
		--load_compression_rate --compression-rate-file $(DEMO_OUT)/compression_rate.json --target_flops 0.12 \
		--resume $(DEMO_OUT)/checkpoint.pth --output_dir $(DEMO_OUT)/eval --num_workers 0
	@echo "demo outputs: $(DEMO_OUT) (log.txt, checkpoint.pth, compression_rate.json, eval/eval_metrics.json)"

bench: $(VENV)/.installed
	$(PY) benchmark.py

clean:
	rm -rf output __pycache__ */__pycache__ .pytest_cache
