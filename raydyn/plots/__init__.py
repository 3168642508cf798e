"""Plots of analysis results (matplotlib, Agg backend): info in raydyn.analysis, drawing here."""
