"""Structured pruning passes: ``prune.width`` (hardware-aligned channels, neurons, heads, KV groups,
hidden size) and ``prune.depth`` (whole blocks), with width alignment (``align``), cost prediction
for budgets (``budget``) and AmoebaLLM's depth programme (``depth_dp``)."""
