"""Name a stale torch-extension build lock instead of waiting on it in silence.

DeepSpeed JIT-builds its ops with torch.utils.cpp_extension, which takes ``<build root>/<op>/lock``
(torch's FileBaton: created exclusively, held open while building, deleted after). Every other process
waits for the file to go away, without a timeout or a message, so a build killed midway leaves a lock
that makes every later start hang. While a run starts, a watcher thread reports each lock that is old
and held open by no process on this host.
"""

from __future__ import annotations

import glob
import os
import sys
import threading
import time
from typing import List, Optional, Set


def files_open_on_this_host() -> Set[str]:
    """Every file some process on this host holds open (of the processes this user may inspect)."""
    held = set()
    for fd_dir in glob.glob("/proc/[0-9]*/fd"):
        try:
            names = os.listdir(fd_dir)
        except OSError:
            continue
        for name in names:
            try:
                held.add(os.readlink(os.path.join(fd_dir, name)))
            except OSError:
                continue
    return held


def stale_locks(root: str, min_age_s: float) -> List[str]:
    """Lock files under ``root/<op>/`` older than ``min_age_s`` that no process on this host holds open."""
    now, old = time.time(), []
    for path in sorted(glob.glob(os.path.join(root, "*", "lock"))):
        try:
            if now - os.path.getmtime(path) >= min_age_s:
                old.append(path)
        except FileNotFoundError:  # released meanwhile
            continue
    if not old:
        return []
    held = files_open_on_this_host()
    return [path for path in old if os.path.realpath(path) not in held]


class BuildLockWatch:
    """While in the ``with`` block, print a message to stderr naming each stale lock under ``root``
    (default: torch's extension build root, ``$TORCH_EXTENSIONS_DIR`` if set)."""

    def __init__(self, root: Optional[str] = None, interval_s: float = 5.0, min_age_s: float = 30.0):
        if root is None:
            from torch.utils.cpp_extension import get_default_build_root

            root = get_default_build_root()
        self.root, self.interval_s, self.min_age_s = root, interval_s, min_age_s
        self.reported: Set[str] = set()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="build-lock-watch", daemon=True)

    def __enter__(self) -> BuildLockWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()

    def _watch(self) -> None:
        while True:
            for path in stale_locks(self.root, self.min_age_s):
                if path not in self.reported:
                    self.reported.add(path)
                    print(
                        f"warning: {path} is held open by no process on this host; a torch extension build "
                        "killed midway leaves its lock behind, and every build or load of that op waits for it "
                        f"without end. Unless a process on another host is building it in {self.root}, remove "
                        f"the file: rm {path}",
                        file=sys.stderr,
                        flush=True,
                    )
            if self._done.wait(self.interval_s):
                return
