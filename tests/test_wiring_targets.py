"""Where the load went reaches the master: a worker's resolved targets ride on its reports."""

from __future__ import annotations

from locust.env import Environment

from loadkit.generate.wiring import note_target, targets_noted


def test_a_workers_targets_reach_the_master_once_each_in_order() -> None:
    master, worker = Environment(), Environment()
    assert targets_noted(master) == []  # attached at init, before any worker reports
    note_target(worker, "udp", "127.0.0.1:5353")
    note_target(worker, "imap", "127.0.0.1:1143")
    note_target(worker, "udp", "127.0.0.1:5353")  # a second user class to the same place: one entry
    for _ in range(2):  # every report carries them; the master keeps each once
        data: dict = {}
        worker.events.report_to_master.fire(client_id="w1", data=data)
        master.events.worker_report.fire(client_id="w1", data=data)
    assert targets_noted(master) == ["udp://127.0.0.1:5353", "imap://127.0.0.1:1143"]
