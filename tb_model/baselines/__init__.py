"""Peer methods that TokenBridge is compared against in benchmarks (tools/), never used by the model itself."""
