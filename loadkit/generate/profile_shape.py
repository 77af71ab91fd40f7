"""The load shape a profile's ``[load] shape`` asks for, as a Locust shape class.

``loadkit run`` passes this file to Locust as the first ``-f`` locustfile (Locust takes a
comma-separated list and uses the first shape class it finds, so the profile's shape wins over
one defined in a locustfile) and puts the checked shape into the environment as JSON::

    LOADKIT_PROFILE_SHAPE='{"kind": "steps", "steps": [[2.0, 1], [3.0, 4]], "run_time_s": 10}'

Without that variable the module defines no shape and Locust ignores it. ``run_time_s`` (the
profile's duration) ends the shape at the latest then: Locust does not apply ``-t`` to a
shape, so the shape itself must stop.

Locust imports this file with its folder first on ``sys.path``; it imports nothing that a
sibling module or package (``dns/``) could shadow.
"""

from __future__ import annotations

import json
import os
from typing import Any

from locust import LoadTestShape

from loadkit.errors import ProfileError
from loadkit.generate.shapes import (
    DailyShape,
    KneeCriteria,
    RampToKnee,
    SpikeTrainShape,
    StepShape,
)

#: the environment variable the runner puts the shape into
ENV_VAR = "LOADKIT_PROFILE_SHAPE"

#: ``[load] shape`` kind -> the shape class it configures
KINDS: dict[str, type] = {
    "steps": StepShape,
    "spike_train": SpikeTrainShape,
    "daily": DailyShape,
    "ramp_to_knee": RampToKnee,
}

_KNEE_KEYS = ("max_loss_ratio", "max_p99_s", "intervals_n")


def shape_class(spec: dict[str, Any], name: str = "ProfileShape") -> type[LoadTestShape]:
    """A concrete shape class from a checked ``[load] shape`` (see
    :func:`loadkit.profile.profile.check_shape`), ending at ``spec["run_time_s"]`` if given."""
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind not in KINDS:
        raise ProfileError(f"load shape kind {kind!r} is not one of {', '.join(KINDS)}")
    base = KINDS[kind]
    run_time_s = spec.pop("run_time_s", None)
    attrs: dict[str, Any] = {"abstract": False, "__module__": __name__}
    knee = {k: spec.pop(k) for k in _KNEE_KEYS if k in spec}
    if knee:
        attrs["criteria"] = KneeCriteria()._replace(**knee)
    if "steps" in spec:
        attrs["steps"] = tuple((float(d), int(u)) for d, u in spec.pop("steps"))
    for key, value in spec.items():
        if not hasattr(base, key):
            raise ProfileError(f"load shape {kind}: unknown parameter {key!r}")
        attrs[key] = value
    if run_time_s is not None:
        limit = float(run_time_s)

        def users_at(self, t_s: float, _limit: float = limit) -> int | None:
            return None if t_s >= _limit else base.users_at(self, t_s)

        attrs["users_at"] = users_at
    return type(name, (base,), attrs)


def _from_environment() -> type[LoadTestShape] | None:
    text = os.environ.get(ENV_VAR)
    if not text:
        return None
    try:
        spec = json.loads(text)
    except ValueError as err:
        raise ProfileError(f"{ENV_VAR} is not JSON: {err}") from None
    if not isinstance(spec, dict):
        raise ProfileError(f"{ENV_VAR} must be a JSON object with a kind, got {text!r}")
    return shape_class(spec)


_shape = _from_environment()
if _shape is not None:
    ProfileShape = _shape  # the name Locust finds
