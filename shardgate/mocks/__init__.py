"""Mock inference workers (HTTP, gRPC, prefill/decode roles): real servers with deterministic
output and runtime fault injection, for the tests, the demo and the benchmarks. Never a GPU.
"""
