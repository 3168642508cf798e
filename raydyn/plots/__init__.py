"""Plotting helpers (matplotlib, Agg backend) that draw the result objects of raydyn.analysis."""
