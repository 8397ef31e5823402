"""Clinician-facing batch reports (CSV, JSON, HTML)."""

from medmeta.reports.writer import REPORT_FILES, render_html, report_dict, write_rejected, write_reports

__all__ = ["REPORT_FILES", "render_html", "report_dict", "write_rejected", "write_reports"]
