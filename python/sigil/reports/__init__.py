"""Looking back over many sessions: ``sigil report`` and ``sigil diff`` (issue 13).

Every number about a session comes from the native session model (contract
12): :mod:`sigil.reports.index` keeps each run's folded summary in a small
SQLite file under the log path, rebuilt from the logs whenever it is missing or
stale, and :mod:`sigil.reports.query` aggregates those rows in SQL. Python never
adds tokens; it only reads a percentile off merged histogram buckets
(:func:`sigil.reports.query.latency_quantile`, the native rule).
"""
