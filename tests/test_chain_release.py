"""`audit chain --release`: the chain ends with the releases of its last tune (pretrained -> tuned -> further tune ->
release), their persistence rows beside the further tune's, and `audit compare` shows each release as a row."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from audit.cli import main
from audit.core.config import load_recipe
from audit.core.errors import AuditError
from audit.core.schema import PersistenceSummary, SequenceScore
from audit.pipeline.chain import PARENT_LABEL, format_persistence, persistence_summary, release_overrides

Q4 = "release:q4_0"
CHEAP = ["training.epochs=2", "canaries.tiers=[1,16]", "scoring.exposure_references=63"]
"""Both links of the test chain: what is checked is the chain's shape and bookkeeping, not how much is memorized."""


def score(cid: str, model: str, reps: int, bits: float, exposure: float) -> SequenceScore:
    return SequenceScore(canary_id=cid, model=model, repetitions=reps, secret_tokens=6, secret_nll_bits=bits, rank=1,
                         n_references=255, exposure=min(exposure, 8.0), extracted=False, exposure_space=exposure)


# --------------------------------------------------------------------------------------------------- pure


def test_release_overrides_add_to_the_last_links_releases():
    plain = load_recipe("tiny/clean_lora_cpu")
    assert release_overrides("q4_0", plain) == ["release.merged=false", "release.gguf=[q4_0]"]
    assert release_overrides(" Q8_0 ,merged", plain) == ["release.merged=true", "release.gguf=[q8_0]"]
    shipped = load_recipe("tiny/release_cpu")  # merged + q8_0 + q4_0 already: kept, q4_0 not listed twice, f16 added
    assert release_overrides("q4_0,f16", shipped) == ["release.merged=true", "release.gguf=[q8_0,q4_0,f16]"]
    recipe = load_recipe("tiny/clean_lora_cpu", release_overrides("merged,q4_0", plain))
    assert recipe.release.labels == ["release:merged", Q4]


@pytest.mark.parametrize("value", ["q4_k", "q4_0,gguf", ","])
def test_an_unknown_release_format_names_the_supported_ones(value):
    with pytest.raises(AuditError) as err:
        release_overrides(value, load_recipe("tiny/clean_lora_cpu"))
    line = err.value.one_line()
    assert "--release" in line and "merged, f32, f16, bf16, q8_0" in line and "q4_0" in line


def test_chain_with_an_unknown_release_is_one_line_before_any_run(in_tmp, capsys):
    assert main(["chain", "tiny/lora_cpu", "--release", "q3_k", "--quiet", "--no-tracking"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown release format q3_k" in err[0] and "q8_0" in err[0]
    assert not (in_tmp / "runs").exists()


def test_a_release_of_a_further_tune_gets_its_own_persistence_rows():
    rows = []
    for model, bits16 in (("base", 50.0), (PARENT_LABEL, 10.0), ("tuned", 30.0), (Q4, 40.0)):
        rows += [score("a", model, 16, bits16, 60.0 - bits16), score("b", model, 16, bits16, 60.0 - bits16),
                 score("r", model, 0, 50.0, 1.4)]
    parent = SimpleNamespace(run_dir=Path("p"), origin=SimpleNamespace(run_dir=Path("o")),
                             train=SimpleNamespace(weights_fingerprint="f" * 64), report=SimpleNamespace(metrics={}))
    summary, metrics = persistence_summary(rows, parent, mia_after=None, inject=False)  # type: ignore[arg-type]
    # the first tune took 40 bits off; the further tune keeps 20 of them, its Q4_0 release 10: a quarter
    assert metrics["persistence.retained_bits/rep_16"].value == pytest.approx(0.5)
    assert metrics[f"persistence.retained_bits/rep_16/{Q4}"].value == pytest.approx(0.25)
    assert metrics[f"persistence.retained_exposure/rep_16/{Q4}"].value == pytest.approx((20.0 - 10.0) / (50.0 - 10.0))
    report_part = PersistenceSummary.model_validate(summary)
    assert [t.repetitions for t in report_part.by_release[Q4]] == [0, 16] and report_part.by_release[Q4][1].bits.after == 40.0
    table = format_persistence(report_part.tiers, report_part.mia_auc_loss_diff, report_part.by_release).splitlines()
    (q4_row,) = [line for line in table if line.lstrip().startswith(f"16x {Q4}")]
    assert "0.25" in q4_row and "40.0" in q4_row
    # a further tune without releases writes its persistence as before the field existed
    plain, _ = persistence_summary([r for r in rows if r.model != Q4], parent, mia_after=None, inject=False)  # type: ignore[arg-type]
    assert "by_release" not in PersistenceSummary.model_validate(plain).model_dump(mode="json")


# --------------------------------------------------------------------------------------------------- the chain


@pytest.fixture(scope="module")
def chain_with_release(tmp_path_factory):
    """`audit chain tiny/lora_cpu --release q4_0`: base -> LoRA tune -> further clean tune -> its GGUF Q4_0 file."""
    work = tmp_path_factory.mktemp("chain-release")
    old = Path.cwd()
    os.chdir(work)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        import contextlib
        import io

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main(["chain", "tiny/lora_cpu", "--release", "q4_0", "--quiet", "--no-fail-on-gates", "outputs.samples=0",
                         *CHEAP])
    finally:
        os.chdir(old)
    assert code == 0
    runs = sorted((work / "runs").iterdir(), key=lambda p: json.loads((p / "run.json").read_text())["started_at"] + p.name)
    from audit.report import read_report

    return out.getvalue(), runs, [read_report(r / "report.json") for r in runs]


def test_chain_release_ends_the_lineage_with_the_release_of_the_last_tune(chain_with_release):
    out, (parent_dir, child_dir), (parent, child) = chain_with_release
    assert parent.release is None and parent.recipe.get("release") is None  # the first link ships nothing
    kinds = [n.kind for n in child.lineage]
    assert kinds[-1] == "release" and kinds.count("tuned_weights") == 2 and kinds[0] == "base_weights"
    further = next(n for n in child.lineage if n.fingerprint == child.training.weights_fingerprint)
    release = child.lineage[-1]
    assert release.parents == [further.id] and release.details["quantization"] == "q4_0"
    assert (child_dir / release.details["path"]).is_file()
    # the release is measured like the further tune: per-tier keys, and persistence of the parent's canaries in it
    assert f"exposure.mean/rep_16/{Q4}" in child.flat_metrics()
    assert [t.repetitions for t in child.persistence.by_release[Q4]] == [t.repetitions for t in child.persistence.tiers]
    assert f"persistence.base/rep_16/{Q4}" in child.disclosure.withheld  # 2 canaries a tier: base numbers withheld
    # the printed summary: the release column, its persistence rows, the chain line ending with the file
    assert f"exposure {Q4}" in out and f"16x {Q4}" in out
    last = out.rstrip().splitlines()[-1]
    assert re.fullmatch(rf"chain: \S*{parent_dir.name} -> \S*{child_dir.name} -> {Q4} \(releases/model\.q4_0\.gguf\)", last), last


def test_compare_shows_the_release_as_a_row_read_from_mlflow(chain_with_release, tmp_path, capsys):
    _, (parent_dir, child_dir), (_, child) = chain_with_release
    assert main(["compare", str(parent_dir), str(child_dir), "--plot", str(tmp_path / "c.png")]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]  # header and rows
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {cells[0]: dict(zip(header, cells, strict=True))
            for line in lines[1:] if (cells := [c.strip() for c in line.strip("|").split("|")])}
    assert list(rows) == [parent_dir.name, child_dir.name, f"{child_dir.name} {Q4}"]
    q4 = rows[f"{child_dir.name} {Q4}"]
    assert q4["exposure 16x"] == f"{child.flat_metrics()[f'exposure.mean/rep_16/{Q4}'].value:.2f}"
    assert q4["MIA AUC"] == f"{child.metrics[f'mia.auc/loss_diff/{Q4}'].value:.2f}"
    assert q4["final loss"] == "n/a" and rows[child_dir.name]["final loss"] != "n/a"
