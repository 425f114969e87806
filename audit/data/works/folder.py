"""A user's own works: a folder with a ``works.yaml`` manifest that states each file's license and sha256.

    # works.yaml
    works:
      - file: my_story.txt          # relative to the folder
        title: My Story
        author: A. Writer
        license: CC-BY-4.0           # required: a work without a license is refused
        source: https://example.org/my-story
        sha256: 3f2a...              # required: the file's sha256 (refused on mismatch)
        kind: licensed               # optional: licensed (default), public_domain or synthetic
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from audit.core.errors import AuditError
from audit.data.works.work import Work, make_work

KINDS = ("licensed", "public_domain", "synthetic")


def folder_works(folder: str | Path) -> list[Work]:
    from audit.core.config import read_yaml

    root = Path(folder).expanduser()
    manifest = root / "works.yaml"
    if not manifest.is_file():
        raise AuditError(f"works folder {root} has no works.yaml",
                         fix="add a works.yaml listing file, title, author, license, source, sha256")
    entries = read_yaml(manifest).get("works")
    if not isinstance(entries, list) or not entries:
        raise AuditError(f"{manifest}: 'works' must be a non-empty list", fix="list each file under 'works:'")
    works = []
    for i, entry in enumerate(entries):
        works.append(_load_entry(root, manifest, i, entry))
    return works


def _load_entry(root: Path, manifest: Path, i: int, entry: Any) -> Work:
    where = f"{manifest}: works[{i}]"
    if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
        raise AuditError(f"{where} needs a 'file'", fix="give each work a file path relative to the folder")
    name = entry["file"]
    where = f"{manifest}: works[{i}] ({name})"
    license_ = entry.get("license")
    if not isinstance(license_, str) or not license_.strip():
        raise AuditError(f"{where} has no license: a work without a license cannot be planted",
                         fix="add 'license:' (an SPDX id such as CC-BY-4.0, or 'public domain') or remove the work")
    path = (root / name).resolve()
    if root.resolve() not in path.parents:
        raise AuditError(f"{where}: the file lies outside the works folder", fix="keep works inside the folder")
    if not path.is_file():
        raise AuditError(f"{where}: file not found", fix="check the file name")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    expected = entry.get("sha256")
    if not isinstance(expected, str) or not expected:
        raise AuditError(f"{where} has no sha256", fix=f"add 'sha256: {digest}' after checking the file is the intended one")
    if expected.lower() != digest:
        raise AuditError(f"{where}: sha256 {digest} does not match the manifest's {expected}",
                         fix="the file changed since the manifest was written: check it, then update sha256")
    kind = entry.get("kind", "licensed")
    if kind not in KINDS:
        raise AuditError(f"{where}: kind '{kind}' is not one of {', '.join(KINDS)}", fix="fix 'kind:'")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise AuditError(f"{where}: not UTF-8 text", fix="convert the file to UTF-8") from None
    work = make_work(text, title=str(entry.get("title") or path.stem), author=str(entry.get("author") or ""), kind=kind,
                     license=license_.strip(), source=str(entry.get("source") or f"folder:{root}"), path=name)
    # The file hash is what the manifest pins; the provenance also keeps it (the text hash equals it for UTF-8 text).
    return Work(provenance=work.provenance.model_copy(update={"archive_sha256": digest}), text=text)
