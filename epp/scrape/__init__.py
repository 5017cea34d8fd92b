"""Endpoint metrics for the plugins that need them (queue, KV usage, measured speeds, transfer profile)."""

from epp.scrape.parse import parse_metrics
from epp.scrape.scraper import MetricsScraper

__all__ = ["MetricsScraper", "parse_metrics"]
