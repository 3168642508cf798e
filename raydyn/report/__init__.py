"""The HTML report: one self-contained page per sweep (see raydyn.report.html)."""
from raydyn.report.html import build_report

__all__ = ["build_report"]
