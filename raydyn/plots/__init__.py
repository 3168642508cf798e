"""Plotting helpers: matplotlib (Agg) pictures of analysis results; no math, no store I/O."""
