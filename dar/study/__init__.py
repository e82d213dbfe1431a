"""Studying DAR: multi-seed experiments and their reports, the paper's diagnostics and their plots,
and side-by-side cost benchmarks."""
