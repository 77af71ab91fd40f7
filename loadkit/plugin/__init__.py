"""The Locust plugin every locustfile imports (``import loadkit.plugin.recorder``).

It sits between generate and record: it adds loadkit's options to Locust's parser, writes the run
record as the run goes (through :mod:`loadkit.record.writer`), stops the run on an abort threshold,
and attaches live collectors (:mod:`loadkit.plugin.live_collector`). It is the only place where
Locust's events meet the run record.
"""
