"""_layout.Folder: entries reached only through descriptors, safe to share between threads."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from eventpipe._layout import Folder


def test_threads_listing_one_folder_at_once_each_see_every_entry(tmp_path: Path) -> None:
    # os.listdir(fd) reads through a dup() that shares the directory offset: two threads
    # listing one descriptor at once each missed entries (a reader then took a segment for
    # missing while the compressor thread listed the same folder: 1 suite run in 20).
    for i in range(300):
        (tmp_path / f"f{i:04d}").touch()
    short: list[int] = []
    with Folder.open(tmp_path) as folder:

        def lister() -> None:
            for _ in range(200):
                n = len(folder.names())
                if n != 300:
                    short.append(n)

        threads = [threading.Thread(target=lister) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert short == []
        assert os.listdir(tmp_path) and len(folder.names()) == 300
