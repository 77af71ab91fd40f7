"""Locust plugin every locustfile imports: records the run and attaches collectors.

(Filled in by the record stage: custom arguments ``--record-dir``, ``--collector``; per-interval
request statistics, generator metrics and collector samples written to a run directory.)
"""
