"""Options: README's tables say what the option tables hold (names, variables, defaults)."""

from __future__ import annotations

import re
from typing import Any

from eventpipe._config import CONSUMER_OPTIONS, LOG_OPTIONS, Option

from .conftest import ROOT

_ROW = re.compile(r"^\| `(\w+)` \| `(EVENTPIPE_\w+)` \| `([^`]+)` \| (.+) \|$", re.M)


def _shown(value: Any, name: str) -> str:
    if name == "file_mode":
        return oct(value)
    return f'"{value}"' if isinstance(value, str) else repr(value)


def test_readme_lists_every_option_with_its_variable_and_default() -> None:
    rows = {m.group(1): m.groups()[1:] for m in _ROW.finditer((ROOT / "README.md").read_text())}
    options: tuple[Option, ...] = (*LOG_OPTIONS, *CONSUMER_OPTIONS)
    assert set(rows) == {o.name for o in options}
    for o in options:
        env, default, meaning = rows[o.name]
        assert env == o.env_name, o.name
        assert default == _shown(o.default, o.name), o.name
        # The README may say more than the option's one-line doc, never something else:
        # they share their first words.
        assert meaning.split()[0].strip("`.") == o.doc.split()[0].strip("`."), o.name
