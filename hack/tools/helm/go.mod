// Builds helm from its published module. Used by hack/build-control-plane; never linked into the
// operator.
module apitoken-operator.local/hack/tools/helm

go 1.26.0

require helm.sh/helm/v3 v3.21.4
