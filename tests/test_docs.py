"""README.md and docs/*.md show only what exists and only numbers that benchmarks/ measured.

- every ``audit SUBCOMMAND --flag`` they show is a subcommand and flag of ``audit.cli.build_parser()``;
- every recipe name (``tiny/lora_cpu``) is a file under ``recipes/``; every repository path and relative link
  (anchors included) resolves;
- every generated table equals what ``benchmarks/tables.py`` makes from its JSON now, so a number that drifts from
  its source fails here;
- a time, memory size, rate or percentage outside a generated table sits in a paragraph that names its
  ``benchmarks/*.json`` and is one of that JSON's values; a table that holds one must be generated.
The README stays at most 300 lines (issue 24): reference material goes to docs/.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import tables  # noqa: E402

DOCS = tables.doc_files()
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
SPAN = re.compile(r"`([^`\n]+)`")
COMMAND = re.compile(r"(?<![\w./-])audit(?:\.cli)?[ \t]+([a-z][\w-]*)([^#\n]*)")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
REPO_PATH = re.compile(r"(?<![\w./<-])((?:audit|tests|benchmarks|examples|recipes|canaries|docs|\.ci)/[\w./-]*)")
# a measured quantity: a time, a size, a rate, a share (m:ss too), or bits in prose
UNITS = r"ms|s|min|minutes|h|hours|GB|MB|GiB|tok/s|candidates/s|GFLOP/s|%"
_QUANTITY = r"(?<![\w.])(\d[\d,]*(?:\.\d+)?)[ \t]?({units})(?![\w/])|(?<![\w.:])(\d+):(\d\d(?:\.\d+)?)(?![\w:])"
MEASURED = re.compile(_QUANTITY.format(units=UNITS + "|bits?|nats"))
MEASURED_IN_TABLE = re.compile(_QUANTITY.format(units=UNITS))  # a reference table's bits are a spec's sizes, not results
SCALES = {"s": (1,), "ms": (1, 1000), "min": (1 / 60,), "minutes": (1 / 60,), "h": (1 / 3600,), "hours": (1 / 3600,),
          "%": (1, 100)}
# Not measurements: limits the code or a test sets, and numbers that follow from the definitions (each with why).
NOT_MEASURED = (
    "more than 90%", "under 20 s", "under 180 s",  # thresholds tests/test_precision.py, test_tracking_* assert
    "under 0.05 nats",  # tests/test_new_token_canaries.py asserts it
    "10 s pass without output", "120 s timeout",  # the heartbeat's interval; MLflow's default timeout
    "1% FPR", "0.1% FPR", "under 1%", "1% tail", "95%",  # the rates and confidence levels the metrics are defined at
    "1.44 bits", "1.38 bits",  # the null: E[log2 |R| - log2 rank] for a uniform rank (1/ln 2 as |R| grows; 64 candidates)
    "19.93 bits", "4 bits",  # log2 10^6 (6 digits) and log2 16: sizes of secret spaces, not results
    "300 s of steps", "limits add up to 300 s",  # GPU_CHECK_DEADLINE's default (benchmarks/gpu_check.sh; test_gpu_check.py)
    "8 bits per byte", "3.6 bits per parameter",  # raw UTF-8's size by definition; Morris et al. 2025's published capacity
)


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _code(text: str) -> list[str]:
    """Shell code the docs show: fenced blocks (not Python or YAML) and inline code spans."""
    blocks = [body for lang, body in FENCE.findall(text) if lang not in ("python", "yaml")]
    prose = FENCE.sub("", text)
    return blocks + SPAN.findall(prose)


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    from audit.cli import build_parser

    parser = build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def command_problems(text: str, commands: dict[str, argparse.ArgumentParser]) -> list[str]:
    """``audit X --flag`` occurrences in ``text``'s code whose subcommand or flag the CLI does not have."""
    problems = []
    for code in _code(text):
        for line in code.splitlines():
            for m in COMMAND.finditer(line):
                if re.search(r"(from|import)\s+$", line[: m.start()]):
                    continue
                name, rest = m[1], re.split(r"&&|\|\||[|;]", m[2])[0]
                if name not in commands:
                    problems.append(f"`audit {name}` is not a subcommand ({', '.join(commands)})")
                    continue
                for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", rest):
                    if flag not in _options(commands[name]):
                        problems.append(f"`audit {name} {flag}`: no such option")
    return problems


def recipe_problems(text: str) -> list[str]:
    dirs = sorted(d.name for d in (ROOT / "recipes").iterdir() if d.is_dir())
    pattern = re.compile(r"(?<![\w./-])(" + "|".join(map(re.escape, dirs)) + r")/([a-z0-9_]+)(?![\w/-])")
    return [f"recipe {m[1]}/{m[2]} is not recipes/{m[1]}/{m[2]}.yaml" for m in pattern.finditer(text)
            if not (ROOT / "recipes" / m[1] / f"{m[2]}.yaml").is_file()]


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(m[1]) for m in re.finditer(r"^#+ (.*)$", FENCE.sub("", _text(path)), re.M)}


def link_problems(path: Path) -> list[str]:
    problems = []
    for target in LINK.findall(FENCE.sub("", _text(path))):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            problems.append(f"link {target}: {file} does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"link {target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    return problems


def path_problems(text: str) -> list[str]:
    found = {m.rstrip(".") for m in REPO_PATH.findall(text)}
    return [f"{p} does not exist" for p in sorted(found) if not (ROOT / p).exists()]


def _numbers(node) -> list[float]:
    """Every number in a JSON document, numbers inside its strings too (notes quote some of their own)."""
    if isinstance(node, dict):
        return [x for v in node.values() for x in _numbers(v)]
    if isinstance(node, list):
        return [x for v in node for x in _numbers(v)]
    if isinstance(node, bool) or node is None:
        return []
    if isinstance(node, int | float):
        return [float(node)]
    return [float(x.replace(",", "")) for x in re.findall(r"\d[\d,]*(?:\.\d+)?", str(node))]


def _seconds(minutes: str, seconds: str) -> str:
    """``m:ss.ff`` as seconds, shown with the clock's decimals."""
    decimals = len(seconds.split(".")[1]) if "." in seconds else 0
    return f"{int(minutes) * 60 + float(seconds):.{decimals}f}"


def _matches(shown: str, unit: str, values: list[float]) -> bool:
    decimals = len(shown.split(".")[1]) if "." in shown else 0
    x = float(shown.replace(",", ""))
    return any(abs(round(v * k, decimals) - x) < 1e-9 for v in values for k in SCALES.get(unit, (1,)))


def _prose(text: str) -> str:
    """``text`` without generated blocks, code, comments and link targets: what a reader takes as a claim."""
    text = tables.BLOCK.sub("", text)
    text = FENCE.sub("", text)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = SPAN.sub("CODE", text)
    text = LINK.sub("LINK", text)
    for phrase in NOT_MEASURED:
        text = re.sub(r"\s+".join(map(re.escape, phrase.split())), "SETTING", text)
    return text


def number_problems(text: str) -> list[str]:
    """Measured quantities outside generated tables that no cited ``benchmarks/*.json`` holds."""
    cited_in = {p: re.findall(r"benchmarks/(\w+\.json)", p) for p in re.split(r"\n\s*\n", text)}
    problems = []
    for para in re.split(r"\n\s*\n", _prose(text)):
        if any(line.lstrip().startswith("|") and MEASURED_IN_TABLE.search(line) for line in para.splitlines()):
            problems.append(f"a table holds measured numbers but is not generated by benchmarks/tables.py: {para[:80]!r}")
        found = [m for m in MEASURED.finditer(para) if not para[: m.start()].rsplit("\n", 1)[-1].lstrip().startswith("|")]
        if not found:
            continue
        sources = next((c for p, c in cited_in.items() if _prose(p).strip() == para.strip()), [])
        values = [v for name in sources if (ROOT / "benchmarks" / name).is_file()
                  for v in _numbers(json.loads((ROOT / "benchmarks" / name).read_text(encoding="utf-8")))]
        for m in found:
            shown, unit = (m[1], m[2]) if m[1] else (_seconds(m[3], m[4]), "s")
            if not sources:
                problems.append(f"{m[0]!r} names no benchmarks/*.json in its paragraph: {para[:80]!r}")
            elif not _matches(shown, unit, values):
                problems.append(f"{m[0]!r} is not a value of {', '.join(sources)}: {para[:80]!r}")
    return problems


@pytest.fixture(scope="module")
def commands():
    return _subparsers()


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_every_audit_command_and_flag_shown_exists(path, commands):
    assert command_problems(_text(path), commands) == []


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_every_recipe_name_shown_is_a_shipped_recipe(path):
    assert recipe_problems(_text(path)) == []


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_every_relative_link_and_repository_path_resolves(path):
    assert link_problems(path) + path_problems(_text(path)) == []


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_every_generated_table_equals_what_its_json_gives_now(path):
    text = _text(path)
    assert tables.render(text) == text, f"run `python benchmarks/tables.py --write` (or fix the JSON): {path.name}"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_every_measured_number_in_prose_is_a_value_of_the_json_it_cites(path):
    assert number_problems(_text(path)) == []


def test_the_readme_is_at_most_300_lines_and_its_result_table_is_generated():
    text = _text(ROOT / "README.md")
    assert len(text.splitlines()) <= 300
    assert tables.marker("default") in text


def test_the_checks_catch_the_drifts_they_are_for(commands):
    """Each check fails on the kind of drift issue 27 found (a time not in its JSON, an unsourced RAM figure, a
    hand-typed timing table, a stale table) and on a command, flag or recipe that does not exist."""
    assert number_problems("Both runs took 628 s (`benchmarks/chain.json`).") != []
    assert number_problems("The LoRA run took 364.9 s (`benchmarks/chain.json`).") == []
    assert number_problems("It needs ~2 GB RAM.") != []
    assert number_problems("| recipe | time |\n|---|---|\n| `tiny/lora_cpu` | ~15 s |") != []
    stale = tables.marker("chain") + "\n| tier | n |\n<!-- /table -->\n"
    assert tables.render(stale) != stale
    assert command_problems("```bash\naudit runn tiny/lora_cpu\n```", commands) != []
    assert command_problems("`audit gate runs/x --junitt x.xml`", commands) != []
    assert command_problems("`audit gate runs/x --junit x.xml` and `from audit import inject_canaries`", commands) == []
    assert recipe_problems("`audit run tiny/lora_gpu`") != [] and recipe_problems("`tiny/lora_cpu`") == []
    assert path_problems("see `audit/no_such_module.py`") != []
