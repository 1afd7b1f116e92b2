// A test client for pods on the local node (hack/local-node): calls the operator's verify
// endpoint with a mounted token and counts the answers. No dependencies, so it builds offline.
module apitoken-operator.local/hack/images/collector

go 1.25.0
