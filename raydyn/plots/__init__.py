"""Plots: matplotlib (Agg) pictures of analysis results. Compute first, draw second."""
