"""``loadkit run``: one profile in, Locust processes started and watched, one verdict out.

Orchestration sits above the model stage because its gates may ask a model (the headroom gate);
the record stage below it stores runs and knows nothing of the analysis.
"""
