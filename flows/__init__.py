"""Prefect flows, thin tasks and the ``gelato`` command line (the top layer: may import workers)."""
import os

# Offline machines log telemetry failures otherwise; users can still turn analytics on.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
