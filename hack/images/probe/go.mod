// A tiny static test program for pods on the local node (hack/local-node): serves files over
// HTTP, fetches URLs, resolves names. No dependencies, so it builds offline.
module apitoken-operator.local/hack/images/probe

go 1.25.0
