// Builds gitleaks (the secret scanner tests/scan_gitleaks.rs runs the README's rule with) from its
// published module. Used by hack/build-gitleaks; never linked into the operator.
module apitoken-operator.local/hack/tools/gitleaks

go 1.26.0

require github.com/zricethezav/gitleaks/v8 v8.30.1
