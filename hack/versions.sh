# Pinned versions of the local control plane. Bumping one here rebuilds into a new cache directory;
# the Go modules in hack/tools/* must be bumped to match.
KUBE_VERSION=v1.35.4
ETCD_VERSION=3.6.16
HELM_VERSION=3.21.4
# The secret scanner the README's rule is tested with (hack/build-gitleaks, tests/scan_gitleaks.rs).
GITLEAKS_VERSION=v8.30.1
APITOKEN_CACHE=${APITOKEN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/apitoken-operator}
