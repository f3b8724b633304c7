# vballoon entry points. Each target installs what it needs when missing:
# Debian packages through apt-get (the guest image is built from Debian's
# packages too, so apt's package lists must exist), Python dependencies through tox.

MATRIX ?= standard
# 2 MiB huge pages to reserve for the +hugetlb variants (0: leave the host
# alone and let those variants skip). Needs root; see `make hugepages`.
HUGEPAGES ?= 0
# Parallel pytest workers for `make conformance` (each runs one TCG guest at a time). auto: one more than the
# CPUs (conftest.py's pytest_xdist_auto_num_workers says why), as `vballoon bench matrix` runs by default.
JOBS ?= auto
# `make conformance SHARD=K/N`: run shard K of the run split in N (README "Shards"), its JUnit in
# reports/junit-shard-K-of-N.xml. Unset, nothing is passed (an exported VBALLOON_SHARD still applies).
SHARD ?=
SHARD_ENV = $(if $(SHARD),VBALLOON_SHARD=$(SHARD) VBALLOON_JUNIT=reports/junit-shard-$(subst /,-of-,$(SHARD)).xml)
PYTHON ?= python3
PYTEST_ARGS ?=
# `make conformance TESTS='suites/guest/test_x.py::test_y[pci-modern]'`: run these tests (node ids or paths) instead
# of all of suites/; a failed test prints the line that reruns it so.
TESTS ?=
APT_PACKAGES := qemu-system-x86 qemu-utils cpio kmod gcc libc6-dev
TOX := $(PYTHON) -m tox

.PHONY: help deps hugepages test conformance bench lint image clean

help:
	@echo "make conformance [MATRIX=quick|standard|full]  run the conformance suites, write reports/junit.xml"
	@echo "make test                                      run vballoon's own tests and the smoke tier"
	@echo "make conformance HUGEPAGES=600                 also reserve huge pages so +hugetlb variants run"
	@echo "make conformance SHARD=2/4                     run shard 2 of 4, write reports/junit-shard-2-of-4.xml"
	@echo "make report-merge [JUNIT_SHARDS=\"a.xml b.xml\"] merge the shards' JUnit files into reports/junit.xml, then the requirement report"
	@echo "make test-upstream                             the same on Debian 13's QEMU 10.0 and Linux 6.12, and the mixed pairs"
	@echo "make ci-gitlab-local [VBALLOON_MATRIX=quick]   run ci/gitlab-ci.yml as a QEMU fork's pipeline with gitlab-ci-local"
	@echo "make qemu-coverage [QEMU_SOURCE=DIR]           QEMU's line and branch coverage of virtio-balloon.c (gcov build)"
	@echo "make bench | lint | image | upstream | clean"

deps:
	@missing=""; \
	for cmd in qemu-system-x86_64:qemu-system-x86 qemu-img:qemu-utils cpio:cpio depmod:kmod gcc:gcc; do \
	  command -v $${cmd%%:*} >/dev/null 2>&1 || missing="$$missing $${cmd##*:}"; \
	done; \
	dpkg -s libc6-dev >/dev/null 2>&1 || missing="$$missing libc6-dev"; \
	if [ -n "$$missing" ] || ! ls /var/lib/apt/lists/*_Packages* >/dev/null 2>&1; then \
	  apt-get update -q; \
	fi; \
	if [ -n "$$missing" ]; then \
	  echo "vballoon: installing Debian packages:$$missing"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi
	@$(TOX) --version >/dev/null 2>&1 || $(PYTHON) -m pip install -q 'tox>=4'

test: deps
	$(TOX) -e py -- $(PYTEST_ARGS)

conformance: deps hugepages
	$(SHARD_ENV) $(if $(TESTS),VBALLOON_TESTS='$(TESTS)') VBALLOON_JOBS=$(JOBS) $(TOX) -e conformance -- \
	  --matrix $(MATRIX) $(PYTEST_ARGS)

hugepages:
	@if [ "$(HUGEPAGES)" -gt 0 ]; then \
	  mountpoint -q /dev/hugepages || { mkdir -p /dev/hugepages && mount -t hugetlbfs none /dev/hugepages; }; \
	  echo $(HUGEPAGES) > /proc/sys/vm/nr_hugepages; \
	  echo "vballoon: $$(grep HugePages_Total /proc/meminfo) on /dev/hugepages"; \
	fi

bench: deps
	$(TOX) -e bench

lint:
	$(TOX) -e lint

FUZZ_TIME ?= 60

fuzz: deps
	$(TOX) -e fuzz -- --time $(FUZZ_TIME)

fuzz-corpora:
	$(PYTHON) fuzz/make_corpora.py

# .clusterfuzzlite/build.sh run without Docker, then every built fuzzer from its seeds (about 5 minutes).
.PHONY: cflite-check
cflite-check: deps
	$(TOX) -e cflite

image: deps
	$(TOX) -e image

# Debian 13's QEMU (built from source, about 4 minutes on 2 cores) and kernel
# in the cache; prints the --qemu/--kernel/--modules options that test them.
UPSTREAM_PACKAGES := ninja-build libglib2.0-dev libpixman-1-dev zlib1g-dev flex bison pkgconf \
	libslirp-dev python3-venv libfdt-dev dpkg-dev
UPSTREAM_ARGS ?=

.PHONY: upstream upstream-deps test-upstream
upstream: upstream-deps
	$(TOX) -e upstream -- $(UPSTREAM_ARGS)

upstream-deps: deps
	@missing=""; \
	for pkg in $(UPSTREAM_PACKAGES); do \
	  dpkg-query -W -f='$${db:Status-Status}' $$pkg 2>/dev/null | grep -qx installed || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "vballoon: installing Debian packages:$$missing"; \
	  apt-get update -q; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

# What CI runs after `make test`: the device suite, the guest quick tier and the migration subset on Debian 13's
# QEMU 10.0 with Linux 6.12, and the boot and stats tests on the mixed pairs (QEMU 7.2 with Linux 6.12, QEMU 10.0
# with Linux 6.1). The fetched paths are kept in reports/upstream.env.
UPSTREAM_ENV := reports/upstream.env
test-upstream: upstream-deps
	@mkdir -p reports
	$(TOX) -qq -e upstream -- --format env $(UPSTREAM_ARGS) > $(UPSTREAM_ENV)
	env $$(sed -n 's/^VBALLOON_/UPSTREAM_/p' $(UPSTREAM_ENV)) $(TOX) -e upstream-test -- $(PYTEST_ARGS)

# QEMU's own line and branch coverage of hw/virtio/virtio-balloon.c: a gcov build of the installed QEMU's Debian
# source (or QEMU_SOURCE=DIR, a tree of yours; about 15 minutes on 2 cores, cached), the device suite and the corpus
# replay on it, reports in reports/qemu-coverage/index.html, reports/qemu-coverage.json and
# reports/qemu-coverage-uncovered.md.
QEMU_SOURCE ?=

.PHONY: qemu-coverage
qemu-coverage: upstream-deps
	$(TOX) -e qemu-coverage -- $(if $(QEMU_SOURCE),--source $(QEMU_SOURCE))

# One report from many: the shards' JUnit files (reports/junit-shard-K-of-N.xml, or JUNIT_SHARDS="a.xml b.xml"
# downloaded elsewhere) merged into reports/junit.xml, then the requirement report and matrix from it.
JUNIT_SHARDS ?= $(wildcard reports/junit-shard-*.xml)

.PHONY: report-merge
report-merge:
	@test -n "$(strip $(JUNIT_SHARDS))" || { echo "vballoon: error: no reports/junit-shard-*.xml; run the shards" \
	  "(make conformance SHARD=K/N) or pass JUNIT_SHARDS=\"a.xml b.xml\"" >&2; exit 2; }
	$(TOX) -e report -- $(JUNIT_SHARDS)

# The GitLab CI template (ci/gitlab-ci.yml) run here as a QEMU fork's pipeline, with gitlab-ci-local (installed
# on first use); VBALLOON_MATRIX and PYTEST_ARGS narrow it: make ci-gitlab-local VBALLOON_MATRIX=quick PYTEST_ARGS='-k boot'
.PHONY: ci-gitlab-local
ci-gitlab-local: deps
	ci/run-gitlab-ci-local

clean:
	rm -rf .tox reports/logs reports/*.xml reports/*.json reports/*.md .coverage .pytest_cache
