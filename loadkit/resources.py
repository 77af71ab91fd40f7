"""Where loadkit's notebooks and locustfiles are, installed or in a checkout.

The repository keeps them at its top level, ``notebooks/`` and ``locustfiles/``: the paths users
open and run with ``locust -f``. A wheel carries them as package data under ``loadkit/_data/``
(``pyproject.toml`` maps the two folders there), so ``loadkit report`` and ``loadkit locustfile``
work from an installed package too. In a checkout or an editable install there is no
``_data``, and the top-level folders are used.
"""

from __future__ import annotations

from pathlib import Path

from loadkit.errors import InputFileError

#: package data inside an installed wheel
PACKAGE_DATA = Path(__file__).resolve().parent / "_data"
#: the repository root of a checkout (or an editable install)
SOURCE_TREE = Path(__file__).resolve().parents[1]
#: the folders shipped as package data
KINDS = ("notebooks", "locustfiles")


def data_dir(kind: str) -> Path:
    """The folder of ``kind`` (``notebooks`` or ``locustfiles``): the wheel's package data, else
    the checkout's top-level folder."""
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


def locustfile_names() -> list[str]:
    """The shipped locustfiles, by name (``dns_burst``, ``imap_storm``, ...)."""
    return sorted(p.stem for p in data_dir("locustfiles").glob("*.py") if not p.name.startswith("_"))


def locustfile(name: str) -> Path:
    """The path of a shipped locustfile for ``locust -f``: ``dns_burst`` or ``dns_burst.py``."""
    stem = Path(name).name.removesuffix(".py")
    path = data_dir("locustfiles") / f"{stem}.py"
    if not path.is_file():
        raise InputFileError(f"no locustfile {name!r} in loadkit; there are: {', '.join(locustfile_names())}")
    return path
