"""The one atomic JSON write (record.writer.write_json_atomic), used by run records and by the lab's
state file, which the lab and its supervisor both write."""

from __future__ import annotations

import json
import threading

from loadkit.lab.config import LabConfig
from loadkit.lab.lab import Lab
from loadkit.record.writer import write_json_atomic


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "state.json"
    write_json_atomic(path, {"n": 1})
    blocker = tmp_path / "dir.json"
    blocker.mkdir()  # renaming a file onto a directory fails after the temporary is written
    try:
        write_json_atomic(blocker, {"n": 2})
    except OSError:
        pass
    else:
        raise AssertionError("replacing a directory should fail")
    assert json.loads(path.read_text()) == {"n": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.json", "state.json"]


def test_two_writers_of_one_file_never_take_each_others_temporary(tmp_path):
    path = tmp_path / "state.json"
    errors: list[BaseException] = []

    def write(who: str) -> None:
        try:
            for i in range(200):
                write_json_atomic(path, {"who": who, "i": i})
        except BaseException as err:  # a shared temporary name makes one rename miss its file
            errors.append(err)

    threads = [threading.Thread(target=write, args=(w,)) for w in ("lab", "supervisor")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert json.loads(path.read_text())["i"] == 199
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_the_lab_state_file_goes_through_it(tmp_path):
    lab = Lab(LabConfig(dir=tmp_path, address="127.0.63.1"))
    lab._write_state({"config": {"proxies": 3}, "components": []})
    assert json.loads(lab.state_path.read_text()) == {"config": {"proxies": 3}, "components": []}
    assert [p.name for p in tmp_path.iterdir()] == [lab.state_path.name]
