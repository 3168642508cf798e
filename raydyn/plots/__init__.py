"""Plotting helpers (matplotlib, Agg): each takes the result objects of one analysis module."""
