# Two commands: `make run` and `make test`. Both set up .venv on their own.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
KSTAMP := $(VENV)/.kernels-built
KERNEL_SRC := $(wildcard src/glm130b/quant/kernels/*.cpp src/glm130b/quant/kernels/*.h)

.PHONY: run test test-all bench lint setup clean browser arm-tools

setup: $(STAMP) $(KSTAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (Python 3.11 is required)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# The C++ CPU kernels are built here (torch.utils.cpp_extension, for this CPU's instruction sets),
# not at the first command; rebuilt when their sources change. A first-use build stays the fallback
# (and without a compiler everything runs on the slower PyTorch path, as the message says).
$(KSTAMP): $(STAMP) $(KERNEL_SRC)
	$(PY) -c "from glm130b.quant.kernels import cpu; raise SystemExit(cpu.main())" || true
	touch $(KSTAMP)

run: setup
	$(VENV)/bin/glm130b demo

test: setup browser arm-tools
	$(PY) -m pytest

# The serving page's test drives Debian's chromium; installed when root and apt can reach Debian.
# Without it that one test is skipped with a reason, nothing else changes.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  echo "note: chromium not installed; the web-page test will be skipped"; }

# The ARM kernel test cross-compiles gemv.h and runs it under qemu-aarch64 (tests/test_native_kernels.py);
# installed when root and apt can reach Debian, else those tests are skipped with a reason.
arm-tools:
	@command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 && command -v qemu-aarch64 >/dev/null 2>&1 || { \
	  [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++-aarch64-linux-gnu qemu-user >/dev/null) || \
	  echo "note: aarch64 cross-compiler or qemu not installed; the ARM kernel tests will be skipped"; }

test-all: $(STAMP)
	$(PY) -m pytest -m ''

bench: setup
	@for f in benchmarks/*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks tools

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
