# keel: build, run and test. `make run` and `make test` are the quick start;
# both install the system packages they need (Debian) when missing.

CARGO        ?= cargo
TARGET_DIR   ?= $(or $(CARGO_TARGET_DIR),target)
KEEL         := $(TARGET_DIR)/release/keel
RUN_DATA_DIR ?= default.etcd
E2E          ?= ../shared/conformance/etcd-e2e
# etcd-e2e groups keel claims; `make conformance` keeps them passing, minus
# the tests in conformance/known-failures.txt (reasons in its README).
CONFORMANCE_GROUPS ?= kv cluster watch lease operations security

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export CARGO_TARGET_DIR := $(TARGET_DIR)

.PHONY: all deps build run test unit-test lint fmt fuzz conformance conformance-releases jepsen jepsen-smoke jepsen-etcd bench bench-compare etcd-releases clean

all: build

# System packages: clang/libclang (RocksDB's bindings are generated with
# bindgen and its C++ is compiled by the rocksdb crate; the RocksDB version
# is pinned by Cargo.lock, not taken from Debian), etcd-client (etcdctl, for
# tests and for you), etcd-server (real etcd, the reference the differential
# tests compare against), protobuf-compiler (the etcd-client crate, etcd's
# Rust client, which the black-box tests drive keel with, runs protoc when
# it builds; keel's own protos need none), iproute2 and iptables (network
# namespaces and faults for the Jepsen harness).
DEB_PACKAGES := clang libclang-dev protobuf-compiler etcd-client etcd-server iproute2 iptables curl
deps:
	@missing=""; \
	for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "make deps: installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

build: deps
	$(CARGO) build --release --workspace --bins

# One member, data in ./$(RUN_DATA_DIR), clients on http://localhost:2379.
run: build
	$(KEEL) --name default --data-dir $(RUN_DATA_DIR)

# The whole default test suite: unit, property and black-box tests, then a
# short fault-injection run. Tests use the release profile, like the
# binaries, so RocksDB builds only once. The black-box tests run real etcd
# 3.6 and 3.7 too (`etcd-releases`, built once per machine).
test: build etcd-releases
	$(CARGO) test --release --workspace
	$(MAKE) --no-print-directory jepsen-smoke

# Hostile-input property tests (server/src/fuzz_targets.rs: apply of
# arbitrary requests and batches, client requests and gateway JSON from
# arbitrary or damaged bytes, log records, peer messages, snapshot
# streams, the HTTP/2 shim), each target for FUZZ_SECONDS, one after the
# other; each prints how many inputs it ran. 8 targets x 180 s = 24 min.
# A hang (what some targets look for) fails the run at the outer timeout.
FUZZ_SECONDS ?= 180
fuzz:
	KEEL_FUZZ_SECONDS=$(FUZZ_SECONDS) KEEL_FUZZ_CASES=1000 timeout $$((8 * $(FUZZ_SECONDS) + 600)) \
	  $(CARGO) test --release -p keel-server --lib fuzz_targets -- --test-threads 1 --nocapture

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

conformance: build
	conformance/run $(E2E) $(KEEL) $(CONFORMANCE_GROUPS)

# Real etcd of the newest 3.6 and 3.7 releases (server, etcdctl, etcdutl),
# built with the machine's Go from the modules pinned in
# conformance/etcd-releases/<line>/go.mod into $(ETCD_RELEASES)/<tag>/
# (the target directory: outside the clone in CI), once per tag.
GO            ?= $(firstword $(wildcard /usr/local/go/bin/go) go)
ETCD_RELEASES := $(TARGET_DIR)/etcd-releases
etcd-releases:
	conformance/etcd-releases/build $(GO) $(abspath $(ETCD_RELEASES))

# etcd 3.6's and 3.7's own suites (tests/e2e, and tests/common in e2e
# mode) against keel, each minus conformance/known-failures-<line>-<suite>.txt;
# logs under $(TARGET_DIR)/etcd-suites. ETCD_SUITES picks release:suite
# pairs, SUITE_RUN a `go test -run` pattern. Not yet part of `make
# conformance`: 3.6's e2e suite does not pass whole yet
# (docs/COMPATIBILITY.md).
ETCD_SUITES        ?= v3.6.17:e2e v3.6.17:common v3.7.4:e2e v3.7.4:common
SUITE_RUN          ?= .
conformance-releases: build etcd-releases
	@failed=0; for s in $(ETCD_SUITES); do \
	  conformance/etcd-releases/suite $(ETCD_RELEASES)/$${s%%:*} $(KEEL) $${s##*:} '$(SUITE_RUN)' || failed=1; \
	done; exit $$failed

# Fault injection (jepsen/README.md). `make jepsen WORKLOAD=watch
# FAULTS=partition,kill DURATION=600`; results under $(TARGET_DIR)/jepsen.
JEPSEN       := $(TARGET_DIR)/release/keel-jepsen
WORKLOAD     ?= all
FAULTS       ?= all
DURATION     ?= 120
RATE         ?= 100
MEMBERS      ?= 3
JEPSEN_FLAGS ?=
jepsen: build
	$(JEPSEN) run --binary $(KEEL) --workload $(WORKLOAD) --faults $(FAULTS) --duration $(DURATION) \
	  --rate $(RATE) --members $(MEMBERS) --run-dir $(TARGET_DIR)/jepsen $(JEPSEN_FLAGS)

# The same harness against real etcd, to calibrate the checkers.
jepsen-etcd: build
	$(JEPSEN) run --binary /usr/bin/etcd --workload $(WORKLOAD) --faults $(FAULTS) --duration $(DURATION) \
	  --rate $(RATE) --members $(MEMBERS) --run-dir $(TARGET_DIR)/jepsen-etcd $(JEPSEN_FLAGS)

# About three minutes, part of `make test`: the checkers' corpus, then three
# workloads under process and network faults.
jepsen-smoke: build
	$(JEPSEN) selftest jepsen/corpus
	$(JEPSEN) run --binary $(KEEL) --workload register,append,watch --faults kill,pause,partition \
	  --duration 30 --rate 60 --members 3 --run-dir $(TARGET_DIR)/jepsen-smoke --seed 7

# keel against etcd (3-member clusters on loopback, same machine, same
# run); writes docs/BENCHMARKS.md. QUICK=1: under 5 minutes.
BENCH := $(TARGET_DIR)/release/keel-bench
bench-compare: build
	$(BENCH) compare --keel $(KEEL) --etcd /usr/bin/etcd --run-dir $(TARGET_DIR)/bench-compare \
	  --out docs/BENCHMARKS.md $(if $(QUICK),--quick)

# Criterion micro-benchmarks of the hot paths.
bench: deps
	$(CARGO) bench -p keel-bench --bench hot_paths

clean:
	$(CARGO) clean
