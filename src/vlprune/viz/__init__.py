"""Pictures and the report: patch-selection overlays, accuracy-against-throughput plots, report.md/report.html."""

from .overlay import Panel, draw_overlay, patch_status, save_comparison, save_overlay, trace_records
from .plots import plot_tradeoff
from .report import Figure, write_report

__all__ = ["Panel", "draw_overlay", "patch_status", "save_overlay", "save_comparison", "trace_records", "plot_tradeoff", "Figure",
           "write_report"]
