"""What a built distribution holds: every package of the source tree (a wheel built while
pyproject listed only "eventpipe" would have left out eventpipe._cli, and the command with it)."""

from __future__ import annotations

import tomllib

from .conftest import ROOT


def test_every_package_of_the_tree_is_in_the_distribution() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    found = {str(p.parent.relative_to(ROOT)).replace("/", ".")
             for p in (ROOT / "eventpipe").rglob("__init__.py")}
    assert found == listed
    assert "py.typed" in config["tool"]["setuptools"]["package-data"]["eventpipe"]
