"""Benchmark data and workloads: `data` fetches and reads the public sources, `workloads` turns them into fixed,
seeded samples of requests; `replay` replays drafting against known greedy outputs without the model (drafting
policies under a cost curve, free-verification bounds, vLLM's ngram rule). Nothing here is needed to decode; it is
only imported by benchmarks and tests."""
