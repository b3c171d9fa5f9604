"""Simulated call parties (media endpoints, SIP-less) for the demo, tests and benchmarks."""
