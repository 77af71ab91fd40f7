"""Where loadkit's notebooks, locustfiles and scenarios are, installed or in a checkout.

The repository keeps them at its top level, ``notebooks/``, ``locustfiles/`` and ``scenarios/``:
the paths users open, run with ``locust -f`` and ``loadkit run``. A wheel carries them as package
data under ``loadkit/_data/`` (``pyproject.toml`` maps the folders there), so ``loadkit report``,
``loadkit locustfile`` and ``loadkit scenario`` work from an installed package too. In a checkout
or an editable install there is no ``_data``, and the top-level folders are used.
"""

from __future__ import annotations

from pathlib import Path

from loadkit.errors import InputFileError

#: package data inside an installed wheel
PACKAGE_DATA = Path(__file__).resolve().parent / "_data"
#: the repository root of a checkout (or an editable install)
SOURCE_TREE = Path(__file__).resolve().parents[1]
#: the folders shipped as package data
KINDS = ("notebooks", "locustfiles", "scenarios")


def data_dir(kind: str) -> Path:
    """The folder of ``kind`` (one of :data:`KINDS`): the wheel's package data, else the
    checkout's top-level folder."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is not one of {KINDS}")
    for base in (PACKAGE_DATA, SOURCE_TREE):
        if (base / kind).is_dir():
            return base / kind
    raise InputFileError(f"loadkit's {kind} are missing from this installation (looked in {PACKAGE_DATA / kind} "
                         f"and {SOURCE_TREE / kind}); reinstall loadkit")


def notebook(name: str) -> Path:
    """The path of a shipped notebook, e.g. ``notebook("capacity_report")``."""
    stem = name.removesuffix(".ipynb")
    return data_dir("notebooks") / f"{stem}.ipynb"


def shipped_names(kind: str) -> list[str]:
    """The shipped files of ``kind`` by name: locustfiles (``dns_burst``, ``imap_storm``...) or
    scenarios (``smoke``, ``burst_retry_storm``...)."""
    suffix = _SUFFIX[kind]
    return sorted(p.stem for p in data_dir(kind).glob(f"*{suffix}") if not p.name.startswith("_"))


def shipped(kind: str, name: str) -> Path:
    """The path of a shipped locustfile or scenario: ``dns_burst`` or ``dns_burst.py``."""
    suffix = _SUFFIX[kind]
    stem = Path(name).name.removesuffix(suffix)
    path = data_dir(kind) / f"{stem}{suffix}"
    if not path.is_file():
        what = kind.removesuffix("s")
        raise InputFileError(f"no {what} {name!r} in loadkit; there are: {', '.join(shipped_names(kind))}")
    return path


_SUFFIX = {"locustfiles": ".py", "scenarios": ".toml"}


def locustfile_names() -> list[str]:
    """The shipped locustfiles, by name (``dns_burst``, ``imap_storm``, ...)."""
    return shipped_names("locustfiles")


def locustfile(name: str) -> Path:
    """The path of a shipped locustfile for ``locust -f``: ``dns_burst`` or ``dns_burst.py``."""
    return shipped("locustfiles", name)


def scenario(name: str) -> Path:
    """The path of a shipped scenario for ``loadkit run``: ``smoke`` or ``smoke.toml``."""
    return shipped("scenarios", name)
