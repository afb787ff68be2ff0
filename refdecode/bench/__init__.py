"""Benchmark data and workloads: `data` fetches and reads the public sources, `workloads` turns them into fixed,
seeded samples of requests. Nothing here is needed to decode; it is only imported by benchmarks and tests."""
