// Builds etcd from its published server module (its own replace lines point at a checkout and are
// ignored here). Used by hack/build-control-plane; never linked into the operator.
module apitoken-operator.local/hack/tools/etcd

go 1.26.0

require go.etcd.io/etcd/server/v3 v3.6.16
