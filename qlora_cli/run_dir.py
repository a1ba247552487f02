"""The run directory: what `qlora train` writes and every later command reads.

    runs/<name>/
      recipe.yaml         the resolved recipe (all defaults written out)
      adapter/            adapter_model.safetensors, adapter_config.json, tokenizer files
      metrics.jsonl       one JSON object per log event (train and eval)
      summary.json        steps, time, tokens/s, peak memory, losses
      checkpoints/        trainer checkpoints (for resuming)
      eval.json, loss.png written by `qlora eval`

Files are written to a temporary name beside their target and renamed, so a kill leaves either the old
complete file or the new complete one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def recipe(self) -> Path:
        return self.path / "recipe.yaml"

    @property
    def adapter(self) -> Path:
        return self.path / "adapter"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def eval_results(self) -> Path:
        return self.path / "eval.json"

    @property
    def loss_plot(self) -> Path:
        return self.path / "loss.png"

    def is_complete(self) -> bool:
        return (self.adapter / "adapter_config.json").is_file() and self.summary.is_file()

    @classmethod
    def locate(cls, path: str | Path) -> RunDir:
        """A run directory given itself or its adapter directory."""
        path = Path(path)
        if not path.exists():
            raise UserError(f"{str(path)!r} does not exist", fix="Give a run directory written by qlora train")
        if (path / "adapter_config.json").is_file() and path.name == "adapter":
            return cls(path.parent)
        return cls(path)


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


@contextlib.contextmanager
def atomic_dir(final: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `final`; on success it replaces `final` in one rename.

    On any error (or a kill) the temporary directory is removed or left under a dot-name that no command
    mistakes for a complete output; `final` keeps its previous content.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and not overwrite:
        raise UserError(f"{final} already exists", fix="Choose another path or pass --overwrite")
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the output is an ordinary directory
    publish_dir(tmp, final)


def publish_dir(tmp: Path, final: Path) -> None:
    """Move the complete directory `tmp` to `final`, replacing what is there in one step where the OS can.

    On Linux an existing `final` is swapped with `tmp` by one renameat2(RENAME_EXCHANGE), so a kill at any moment
    leaves `final` either old and complete or new and complete; elsewhere the old one is renamed aside first.
    """
    tmp, final = Path(tmp), Path(final)
    if final.exists() and _exchange(tmp, final):
        shutil.rmtree(tmp, ignore_errors=True)  # now holds the previous content
        return
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file; a last line cut short by a kill is left out."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def check_writable(path: Path) -> None:
    """Fail before any work when `path` (or the first existing parent) cannot be written."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{probe} is a file, so {path} cannot be created", fix="Choose an output directory path")
    try:  # a real file, not os.access: root passes os.access everywhere, read-only filesystems included
        fd, name = tempfile.mkstemp(prefix=".qlora-write-test-", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise UserError(f"{probe} is not writable ({e.strerror})", where=str(path),
                        fix="Choose an output directory you can write to") from None
