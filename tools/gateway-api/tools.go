//go:build tools

// The packages this module pins, so `go mod tidy` keeps them.
package tools

import (
	_ "sigs.k8s.io/gateway-api/conformance"
	_ "sigs.k8s.io/gateway-api/conformance/echo-basic"
)
