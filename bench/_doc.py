"""Shared by every benchmark: the machine line, the exact command, and appending a result to docs/benchmarks.md."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
IMG = ROOT / "docs" / "img"


def command_line() -> str:
    """The command that produced this result, with the thread setting that matters on CPU."""
    threads = os.environ.get("OMP_NUM_THREADS")
    return (f"OMP_NUM_THREADS={threads} " if threads else "") + "python " + shlex.join(sys.argv)


def machine() -> str:
    import torch

    parts = [f"{platform.machine()} {platform.processor() or ''}".strip(), f"{os.cpu_count()} CPU cores",
             f"torch {torch.__version__} ({torch.get_num_threads()} thread(s))"]
    if torch.cuda.is_available():
        parts.append(f"GPU {torch.cuda.get_device_name()}")
    try:
        import transformers
        import trl

        parts.append(f"transformers {transformers.__version__}, trl {trl.__version__}")
    except ImportError:  # pragma: no cover - the package depends on both
        pass
    return ", ".join(parts)


def commit() -> str:
    """The checkout's short commit, marked ``+dirty`` when tracked files outside docs/ differ from it."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    # results written to docs/ by earlier runs do not change what runs
    return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!docs") else "")


def append_result(heading: str, intro: str, body: str) -> None:
    """Append ``### date: `command``` + body at the end of the ``## heading`` section (created if missing)."""
    doc = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    title = f"## {heading}"
    if title not in doc:
        doc = doc.rstrip("\n") + f"\n\n{title}\n\n{intro}\n"
    start = doc.index(title) + len(title)
    end = doc.find("\n## ", start)
    end = len(doc) if end < 0 else end
    entry = f"### {datetime.date.today().isoformat()}: `{command_line()}` (commit {commit()})\n\n{body.strip()}\n"
    doc = doc[:end].rstrip("\n") + "\n\n" + entry + doc[end:]
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(doc)
    print(f"appended to {DOC}")
