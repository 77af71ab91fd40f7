"""The headroom and DNS-burst notebooks execute with papermill on recorded runs."""

from __future__ import annotations

import json
from pathlib import Path

import papermill as pm
import pytest

from loadkit.model import HeadroomResult
from model_synth import write_headroom_run, write_retry_run

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def _outputs(nb_path: Path) -> str:
    nb = json.loads(nb_path.read_text())
    text = []
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            text.append("".join(out.get("text", "")))
            if "data" in out:
                text.append("".join(out["data"].get("text/plain", "")))
    return "\n".join(text)


def _has_image(nb_path: Path) -> bool:
    nb = json.loads(nb_path.read_text())
    return any("image/png" in out.get("data", {}) for c in nb["cells"] for out in c.get("outputs", []))


def test_headroom_notebook_executes(tmp_path):
    write_headroom_run(tmp_path / "run")
    out_nb = tmp_path / "headroom.out.ipynb"
    result_json = tmp_path / "headroom.json"
    pm.execute_notebook(str(NOTEBOOKS / "headroom.ipynb"), str(out_nb), kernel_name="python3",
                        parameters={"run_dirs": [str(tmp_path / "run")], "release": "1.2.3",
                                    "forecast_peak_sessions": 400, "out_json": str(result_json)},
                        progress_bar=False, cwd=str(tmp_path))
    text = _outputs(out_nb)
    assert "release 1.2.3: all 3 proxies fall over at ≈ " in text
    assert HeadroomResult.from_json(result_json.read_text()).forecast_peak_sessions == 400
    assert _has_image(out_nb)


def test_dns_burst_notebook_executes(tmp_path):
    write_retry_run(tmp_path / "ok", metastable=False)
    write_retry_run(tmp_path / "stuck", metastable=True)
    out_nb = tmp_path / "dns_burst.out.ipynb"
    pm.execute_notebook(str(NOTEBOOKS / "dns_burst.ipynb"), str(out_nb), kernel_name="python3",
                        parameters={"run_dirs": [str(tmp_path / "ok"), str(tmp_path / "stuck")],
                                    "release": "1.2.3", "rcvbuf_bytes": 32768},
                        progress_bar=False, cwd=str(tmp_path))
    text = _outputs(out_nb)
    assert "retry-recovers: recovers" in text
    assert "retry-metastable: metastable" in text
    assert "rcvbuf 32768 B holds 39 datagrams" in text
    assert _has_image(out_nb)


def test_notebook_error_names_the_problem(tmp_path):
    with pytest.raises(pm.PapermillExecutionError, match="no runs given"):
        pm.execute_notebook(str(NOTEBOOKS / "headroom.ipynb"), str(tmp_path / "out.ipynb"),
                            kernel_name="python3", parameters={"run_dirs": []}, progress_bar=False)
