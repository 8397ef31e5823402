"""Clinician-facing batch reports (CSV, JSON, HTML) and evaluation results (JSON, figures)."""

from medmeta.reports.evaluation import write_evaluation
from medmeta.reports.writer import (
    REPORT_FILES, render_html, report_dict, write_batch_outputs, write_rejected, write_report_files, write_reports,
)

__all__ = [
    "REPORT_FILES", "render_html", "report_dict", "write_batch_outputs", "write_evaluation", "write_rejected",
    "write_report_files", "write_reports",
]
