"""The one exception the export CLI turns into a clear message and a non-zero exit."""

from __future__ import annotations


class ExportError(Exception):
    """Export cannot go on; the message says why (bad input, parity failure, existing version...)."""
