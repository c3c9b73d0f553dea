"""Provenance shared by runs, evaluation profiles and the demo backbone's manifest: installed package versions."""
from __future__ import annotations

import sys
from typing import Iterable


def package_versions(packages: Iterable[str], *, python: bool = True) -> dict[str, str]:
    """``{distribution: version}`` for each of ``packages`` that is installed (absent ones are left out),
    preceded by ``{"python": X.Y.Z}`` unless ``python=False``."""
    from importlib import metadata

    out = {"python": sys.version.split()[0]} if python else {}
    for pkg in packages:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out
