//go:build tools

// Package tools names the etcd 3.6 commands this module builds, and its
// end-to-end test framework (the suites are compiled from the same
// tag), so that go.mod and go.sum pin them.
package tools

import (
	_ "go.etcd.io/etcd/etcdctl/v3"
	_ "go.etcd.io/etcd/etcdutl/v3"
	_ "go.etcd.io/etcd/server/v3"
	_ "go.etcd.io/etcd/tests/v3/framework/e2e"
)
