# The two entry points for a newcomer are `make demo` and `make test`; both install what they need.
SHELL := /bin/bash
STAGE := hack/stage

.PHONY: faults test-faults test-node help test demo tools fmt-check clippy unit e2e crds demo-down bench bench-scale chart-snapshot verify-snapshot image

help:
	@echo "make demo   - local control plane + the operator with an example token"
	@echo "make test   - every test tier (format, lint, unit, end-to-end, the fault suite 3x, and the node tier: the chart on a real node)"
	@echo "make bench  - verification endpoints vs a bare hyper server (ratios measured in one run)"
	@echo "make crds   - regenerate crds/ from the Rust types"
	@echo "make image  - the operator's image as an OCI archive, no Docker or registry (prints REF ARCHIVE)"

## Builds kube-apiserver, kube-controller-manager, kubectl, etcd and helm from pinned Go modules
## (first time only; cached in ~/.cache/apitoken-operator).
tools:
	@$(STAGE) deps hack/ensure-deps
	@$(STAGE) tools bash -c "hack/build-control-plane >/dev/null"

fmt-check:
	@$(STAGE) fmt cargo fmt --all -- --check

clippy:
	@$(STAGE) clippy cargo clippy --locked --all-targets -- -D warnings

unit:
	@$(STAGE) unit cargo test --locked --lib --bins --test 'fuzz_*' --test 'unit_*' --test scan_gitleaks

e2e: tools
	@$(STAGE) e2e-deps hack/ensure-deps nginx
	@$(STAGE) e2e hack/e2e

faults: tools
	@$(STAGE) faults env APITOKEN_FAULT_RUNS=3 hack/faults

## The node tier: a cluster with a real node, the operator and collector images built here, the
## chart installed with helm (tests/node_*.rs).
test-node: tools
	@$(STAGE) test-node hack/test-node

test: tools fmt-check clippy unit e2e faults test-node
	@echo "make test: all stages passed"

crds:
	cargo run --quiet -- crd > crds/apitoken.dev.yaml
	cp crds/apitoken.dev.yaml charts/apitoken-operator/crds/apitoken.dev.yaml
	mkdir -p docs && cargo run --quiet -- crd --reference > docs/crd-reference.md

## Re-record the pinned verification answers (tests/snapshots/verify-responses.txt) after an
## intended change of what clients see.
verify-snapshot:
	APITOKEN_RECORD_SNAPSHOTS=1 cargo test --locked --test unit_verify_responses

## Re-record the chart's default rendering after an intended change.
chart-snapshot: tools
	mkdir -p tests/snapshots
	$$(hack/build-control-plane --print)/helm template apitoken-operator charts/apitoken-operator \
	  --namespace apitoken-system --kube-version 1.35.4 --include-crds > tests/snapshots/chart-default.yaml

## The operator's image without Docker or a registry: a static release build packed as an OCI
## archive that starts like the Dockerfile's image (hack/image; minutes the first time, cached).
image:
	@hack/image

demo: tools
	@$(STAGE) demo-run hack/demo

demo-down:
	@hack/local-cluster down demo

## Verification throughput and latency against a bare hyper baseline, and index memory per token.
bench:
	cargo bench --locked --bench verify

## Issuing 1,000 and 10,000 tokens through the operator vs the same writes made directly
## (BENCH_SCALE_N=1000,10000). Not part of `make test`: it takes minutes.
bench-scale: tools
	cargo bench --locked --bench scale

## Fault injection (API server stopped for 30 s). Kept out of `make test` for now: its recovery
## check after the restart passed in every local run but timed out once under CI load (issue 7).
## The fault-injection suite once (make test runs it three times in a row).
test-faults: tools
	@hack/faults
