"""record stage: run directories (writer, reader), the catalog across runs.

Storage only: nothing here imports Locust or the analysis (the model stage).
"""
