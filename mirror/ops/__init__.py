"""Ops: what an operator sets and sees.

options (every flag declared once), config (the settings they fill), metrics (Prometheus and
/healthz, /readyz), failures (an error told in words), resync_options (backfill's and
reconcile's settings). May import ``decode.records`` (the enums metric labels take) and, lazily,
``sim.simulate`` for the ``simulate`` command's options; nothing else of ``mirror``.
"""
