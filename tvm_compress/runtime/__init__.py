"""Runtime: evaluation, metrics, benchmarks, RPC, deployment bundles and the C++ runner."""
