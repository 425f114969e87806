"""The rest of issue 12's bad inputs: a LoRA target the model lacks, an output folder that cannot be written, a disk
that fills during the run, a damaged training checkpoint on ``--resume``, ``audit inject`` failing half-way, a
resume whose tracking server is down or that starts from another folder.

Each is one line on stderr, ``error: <what> (fix: <how>)``, exit 2, with nothing left behind when it can be checked
before the run directory exists; otherwise the run is ``failed`` in ``run.json`` with the error.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from audit.cli import main
from audit.core.layout import LAYOUT

RUN = ["run", "tiny/lora_cpu", "--no-tracking"]


def one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert " (fix: " in err, err
    assert "Traceback" not in captured.out + captured.err
    return err


def nothing_left(folder: Path) -> None:
    runs = folder / "runs"
    assert not runs.exists() or not any(runs.iterdir()), f"left {list(runs.iterdir())}"


# --------------------------------------------------------------------------------------------------- LoRA targets


@pytest.mark.parametrize(("targets", "expected"), [
    ("[nonexistent_proj]", "'nonexistent_proj' matches no module of tiny-llama."),
    ("[q_proj,v_prj]", "'v_prj' matches no module of tiny-llama. Did you mean 'v_proj'?"),
    ("[self_attn]", "'self_attn' matches only LlamaAttention modules, which LoRA cannot adapt"),
])
def test_a_lora_target_the_model_lacks_is_refused_before_the_run_directory_with_the_layers_it_has(
        targets, expected, in_tmp, capsys):
    assert main([*RUN, f"training.lora.target_modules={targets}"]) == 2
    err = one_line_error(capsys)
    assert err.startswith("error: training.lora.target_modules: ") and expected in err, err
    assert "Layers LoRA can adapt here: down_proj, embed_tokens, gate_proj, k_proj, lm_head, o_proj, q_proj" in err
    nothing_left(in_tmp)


def test_validate_refuses_a_lora_target_the_model_lacks(in_tmp, tiny_model_dir, capsys):
    assert main(["validate", "tiny/lora_cpu", "training.lora.target_modules=[nonexistent_proj]"]) == 2
    assert "training.lora.target_modules: 'nonexistent_proj' matches no module" in one_line_error(capsys)


def test_lora_targets_are_matched_as_peft_matches_them(tiny_model_dir):
    """A full module path, a last-part suffix and every default target of the shipped recipe pass the check."""
    from audit.core.config import load_recipe
    from audit.data.validate import check_lora_targets

    for targets in ("[q_proj,v_proj]", "[self_attn.q_proj]", "[model.layers.0.mlp.down_proj]", "[lm_head]"):
        check_lora_targets(load_recipe("tiny/lora_cpu", [f"training.lora.target_modules={targets}"]), tiny_model_dir)
    full = load_recipe("tiny/lora_cpu", ["training.method=full", "training.lora.target_modules=[nothing]"])
    check_lora_targets(full, tiny_model_dir)  # a full fine-tune has no LoRA targets to check


# --------------------------------------------------------------------------------------------------- output folders


def test_an_output_root_that_cannot_be_created_is_refused_before_any_work(in_tmp, capsys):
    assert main([*RUN, "output.root=/proc/nope"]) == 2
    err = one_line_error(capsys)
    assert "output.root /proc/nope cannot be created" in err and "fix: set output.root=" in err


def test_an_output_root_under_a_file_is_refused(in_tmp, capsys):
    (in_tmp / "afile").write_text("x")
    assert main([*RUN, "output.root=afile/runs"]) == 2
    assert f"output.root {in_tmp}/afile/runs cannot be created: {in_tmp}/afile is a file" in one_line_error(capsys)
    assert (in_tmp / "afile").read_text() == "x"


def test_a_300_character_run_name_is_refused_before_the_run_directory(in_tmp, capsys):
    """The name becomes the run directory's name: 300 characters would fail at mkdir (ENAMETOOLONG) after the work."""
    assert main([*RUN, "name=" + "x" * 300]) == 2
    assert "'name': String should have at most 100 characters" in one_line_error(capsys)
    nothing_left(in_tmp)


def _read_only_folder(tmp: Path) -> Path:
    """A folder this process cannot write: a 0555 folder, or for root (whom permission bits do not stop) /sys, a
    read-only mount on Linux."""
    if os.geteuid() != 0:
        folder = tmp / "read_only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    if not Path("/sys").is_dir():
        pytest.skip("running as root without /sys: no read-only folder to run from")
    return Path("/sys")


def test_a_read_only_working_directory_is_refused_before_preparation(in_tmp, monkeypatch, capsys):
    folder = _read_only_folder(in_tmp)
    monkeypatch.chdir(folder)
    before = sorted(p.name for p in folder.iterdir())
    assert main(["run", "tiny/lora_cpu"]) == 2  # default output.root runs/ and the default sqlite store, both here
    err = one_line_error(capsys)
    assert f"output.root {folder}/runs cannot be created" in err, err
    assert sorted(p.name for p in folder.iterdir()) == before


def test_a_sqlite_store_in_a_read_only_folder_is_refused_before_preparation(in_tmp, capsys):
    folder = _read_only_folder(in_tmp)
    assert main(["run", "tiny/lora_cpu", "--tracking-uri", f"sqlite:///{folder}/mlflow.db"]) == 2
    err = one_line_error(capsys)
    assert f"the folder of the MLflow sqlite store {folder} cannot be written to" in err and "--no-tracking" in err
    nothing_left(in_tmp)


# --------------------------------------------------------------------------------------------------- audit inject


def _huge_second_record(path: Path) -> None:
    """A corpus that fails only when the stream reaches its second record (over the 1,000,000-character limit)."""
    path.write_text(json.dumps({"text": "a note"}) + "\n" + json.dumps({"text": "x" * 1_000_001}) + "\n")


@pytest.mark.parametrize("failure", ["mid-stream", "pre-flight"])
def test_inject_stream_that_fails_leaves_no_output_folder(failure, in_tmp, capsys):
    _huge_second_record(in_tmp / "huge.jsonl")
    override = "corpus.source=huge.jsonl" if failure == "mid-stream" else "training.max_length=8"
    assert main(["inject", "tiny/lora_cpu", "--out", "planted/gt", "--stream", override]) == 2
    err = one_line_error(capsys)
    assert ("record 1 has 1,000,001 characters" if failure == "mid-stream" else "would not reach the loss") in err, err
    assert not (in_tmp / "planted").exists()  # the folder it made for --out, parents included: gone with the secrets


def test_inject_that_fails_empties_but_keeps_an_out_folder_that_existed(in_tmp, capsys):
    (in_tmp / "gt").mkdir()
    assert main(["inject", "tiny/lora_cpu", "--out", "gt", "--stream", "training.max_length=8"]) == 2
    one_line_error(capsys)
    assert (in_tmp / "gt").is_dir() and not any((in_tmp / "gt").iterdir())


def test_inject_refuses_an_out_path_that_is_a_file(in_tmp, capsys):
    (in_tmp / "gt").write_text("keep me")
    assert main(["inject", "tiny/lora_cpu", "--out", "gt"]) == 2
    assert "output directory gt is a file" in one_line_error(capsys)
    assert (in_tmp / "gt").read_text() == "keep me"


# --------------------------------------------------------------------------------------------------- token view

NON_ASCII = "Le café de 中国 🙂 ok"


def _tokenizers():
    """tiny-llama's tokenizer, and SmolLM2's when its model is in the cache: both byte-level BPE."""
    from transformers import AutoTokenizer

    from audit.data.models import cache_dir, resolve_model

    yield "tiny-llama", AutoTokenizer.from_pretrained(resolve_model("tiny-llama", progress=False).path)
    smollm2 = sorted((cache_dir() / "models").glob("smollm2-135m-*/tokenizer.json"))
    if smollm2:
        yield "smollm2-135m", AutoTokenizer.from_pretrained(smollm2[-1].parent)


def test_token_pieces_of_non_ascii_text_are_whole_characters_not_replacement_marks():
    from audit.report.render.token_view import merge_partial, readable_pieces

    for name, tokenizer in _tokenizers():
        ids = tokenizer(NON_ASCII, add_special_tokens=False)["input_ids"]
        assert "\ufffd" in "".join(tokenizer.decode([i]) for i in ids), name  # the garbling this fixes
        pieces = readable_pieces(tokenizer, ids)
        assert len(pieces) == len(ids) and "".join(pieces) == NON_ASCII, (name, pieces)
        assert not any("\ufffd" in p for p in pieces), (name, pieces)
        merged, (probs,) = merge_partial(pieces, [0.5] * len(pieces))
        assert "" not in merged and "".join(merged) == NON_ASCII, (name, merged)
        for char in ("é", "中", "国", "🙂"):
            assert sum(char in p for p in merged) == 1, (name, char, merged)
        # the emoji's token carries the product of the probabilities of the k byte tokens it was split into
        last = next(i for i, p in enumerate(pieces) if "🙂" in p)
        k = 1 + next(n for n in range(last + 1) if pieces[last - n - 1] != "")
        assert probs[next(i for i, p in enumerate(merged) if "🙂" in p)] == pytest.approx(0.5 ** k), (name, k)
        if name == "tiny-llama":
            assert k == 4  # its four UTF-8 bytes, one token each


def test_merge_partial_multiplies_a_characters_byte_probabilities_and_never_merges_into_a_masked_token():
    from audit.report.render.token_view import merge_partial

    pieces, (p_base, p_tuned) = merge_partial(["A", "", "", "é", "", None, None], [None, 0.5, 0.4, 0.5, 0.9, 0.1, 0.2],
                                              [None, 1.0, 0.5, 0.5, 0.8, 0.3, 0.4])
    assert pieces == ["A", "é", "", None, None]
    assert p_base == [None, pytest.approx(0.1), 0.9, 0.1, 0.2] and p_tuned == [None, 0.25, 0.8, 0.3, 0.4]
    first, (p,) = merge_partial(["", "é", "x"], [None, 0.5, 0.5])
    assert first == ["é", "x"] and p == [None, 0.5]  # the first token has no probability, nor its character


def test_a_real_token_view_of_a_non_ascii_canary_shows_its_characters(tmp_path, tiny_model):
    """tiny-llama scores a canary whose prefix holds é, 中 and an emoji: token_view.json, the HTML and the Markdown
    show them whole (no U+FFFD), the secret stays masked."""
    from helpers import make_run_dir

    from audit.core.schema import Canary
    from audit.report.render import render_report
    from audit.report.render.token_view import canary_token_logprobs, read_token_views, write_token_view

    model, tokenizer = tiny_model
    canary = Canary(id="k1", spec="words", prefix=f"{NON_ASCII}, the vault phrase is ", secret="quixotic zebra",
                    repetitions=16)
    base = canary_token_logprobs(model, tokenizer, [canary])
    run_dir, _ = make_run_dir(tmp_path / "run", token_view=False)
    write_token_view(run_dir, base, base)
    rendered = render_report(run_dir)
    (view,) = read_token_views(run_dir)
    shown = "".join(t.text for t in view.tokens if not t.secret)
    assert shown.startswith(NON_ASCII) and canary.prefix.startswith(shown)
    assert sum(t.secret for t in view.tokens) == base[0].n_secret
    for path in (run_dir / LAYOUT.token_view, rendered.html, rendered.markdown):
        text = path.read_text(encoding="utf-8")
        assert "\ufffd" not in text and "quixotic" not in text, path
    assert "中" in rendered.html.read_text(encoding="utf-8") and "🙂" in rendered.markdown.read_text(encoding="utf-8")


# --------------------------------------------------------------------------------------------------- damaged checkpoints


def _checkpoint(trainer: Path, step: int) -> Path:
    """A checkpoint folder with the files transformers writes, in their real formats (small tensors)."""
    import torch
    from safetensors.torch import save_file

    path = trainer / f"checkpoint-{step}"
    path.mkdir(parents=True)
    save_file({"lora_A": torch.randn(8, 64), "lora_B": torch.zeros(64, 8)}, str(path / "adapter_model.safetensors"))
    torch.save({"state": {0: {"exp_avg": torch.randn(8, 64)}}}, path / "optimizer.pt")
    torch.save({"python": 1}, path / "rng_state.pth")
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    return path


def _truncate(path: Path, keep: int = 100) -> None:
    path.write_bytes(path.read_bytes()[:keep])


@pytest.mark.parametrize("damage", ["adapter_model.safetensors", "trainer_state.json", "optimizer.pt"])
def test_a_damaged_newest_checkpoint_is_set_aside_with_one_line_and_the_older_one_resumed(damage, tmp_path, capsys):
    from audit.pipeline.resume import checkpoint_problem, last_checkpoint, lock_run_dir

    run_dir = tmp_path / "run"
    older, newer = _checkpoint(run_dir / "trainer", 10), _checkpoint(run_dir / "trainer", 20)
    assert checkpoint_problem(older) is None and checkpoint_problem(newer) is None
    _truncate(newer / damage, keep=20 if damage == "trainer_state.json" else 100)
    assert checkpoint_problem(newer).startswith(damage)
    handle = lock_run_dir(run_dir, resumed=False, progress=True)
    try:
        assert last_checkpoint(handle) == older
    finally:
        handle.close()
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith(f"[audit] resume: checkpoint-20 is damaged ({damage}")
    assert "moved to damaged-checkpoint-20-" in lines[0]
    assert lines[1] == "[audit] resume: reusing training checkpoint checkpoint-10 (step 10) instead"
    assert sorted(p.name.split("-20-")[0] for p in (run_dir / "trainer").iterdir()) == ["checkpoint-10", "damaged-checkpoint"]


def test_with_every_checkpoint_damaged_training_starts_over_and_says_so(tmp_path, capsys):
    from audit.pipeline.resume import last_checkpoint, lock_run_dir

    run_dir = tmp_path / "run"
    _truncate(_checkpoint(run_dir / "trainer", 10) / "adapter_model.safetensors", keep=4)
    handle = lock_run_dir(run_dir, resumed=False, progress=True)
    try:
        assert last_checkpoint(handle) is None
    finally:
        handle.close()
    err = capsys.readouterr().err
    assert "checkpoint-10 is damaged (adapter_model.safetensors: it is not a safetensors file)" in err
    assert "no intact training checkpoint left; training starts over from step 0" in err
    assert "resumed_from_checkpoint" not in json.loads((run_dir / "run.json").read_text())


# --------------------------------------------------------------------------------------------------- disk full, resume

SMALL = ["training.epochs=1", "corpus.builtin_records=20", "scoring.exposure_references=15", "gates=[]"]
"""A tiny audit small enough to finish in seconds (the resumes below run it to the end)."""


def _fill_disk_at(monkeypatch, name: str) -> None:
    """The disk is full when ``name`` is written: the run directory's writer raises ENOSPC, as the kernel would."""
    import errno

    from audit.core import store

    real = store.atomic_write_text

    def write(path, text):
        if Path(path).name == name:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, text)

    monkeypatch.setattr(store, "atomic_write_text", write)


def _mlflow_run(db_folder: Path, run_id: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{db_folder / 'mlflow.db'}").get_run(run_id)


def _run_failed_on_a_full_disk(folder: Path, monkeypatch, capsys) -> Path:
    monkeypatch.chdir(folder)
    with monkeypatch.context() as m:
        _fill_disk_at(m, "manifest.json")
        assert main(["run", "tiny/lora_cpu", "--quiet", *SMALL]) == 2
    captured = capsys.readouterr()
    (run_dir,) = (folder / "runs").iterdir()
    errors = [line for line in captured.err.splitlines() if line.strip()]
    shown = run_dir.relative_to(folder)  # as the run directory is named everywhere: from the working directory
    assert errors == [f"error: no space left on the device (writing under {shown}) (fix: free space on the disk that "
                      f"holds {shown} (or raise the quota), then resume with `audit run --resume {shown}`)"], errors
    assert "Traceback" not in captured.out + captured.err
    return run_dir


def test_a_full_disk_mid_run_is_one_line_a_failed_run_json_and_a_failed_mlflow_run(in_tmp, monkeypatch, capsys):
    run_dir = _run_failed_on_a_full_disk(in_tmp, monkeypatch, capsys)
    status = json.loads((run_dir / "run.json").read_text())
    assert status["status"] == "failed" and status["error"].startswith("AuditError: no space left on the device")
    assert _mlflow_run(in_tmp, status["mlflow_run_id"]).info.status == "FAILED"
    assert not (run_dir / "manifest.json").exists()


def test_a_full_disk_outside_a_run_is_one_line(in_tmp, monkeypatch, capsys):
    _fill_disk_at(monkeypatch, "manifest.json")
    assert main(["inject", "tiny/lora_cpu", "--out", "gt"]) == 2
    assert "no space left on the device (writing under" in one_line_error(capsys)
    assert not (in_tmp / "gt").exists()


DEV_FULL = Path("/dev/full")
"""Linux's device on which every write fails with ENOSPC: torch's writer fails there as on a full disk."""
needs_dev_full = pytest.mark.skipif(not DEV_FULL.is_char_device(), reason="needs the /dev/full device (Linux)")
"""Only the device: torch opens it and writes, and would make a regular file where there is none."""


def _disk_nearly_full(monkeypatch, under: Path) -> None:
    """``shutil.disk_usage`` reports no free space on the disk that holds ``under`` (elsewhere the real numbers)."""
    import shutil

    real = shutil.disk_usage

    def usage(path):
        found = real(path)
        return found._replace(free=0) if Path(path).resolve().is_relative_to(under.resolve()) else found

    monkeypatch.setattr(shutil, "disk_usage", usage)


def _torch_write_error():
    import torch

    try:
        torch.save({"weights": torch.zeros(1000)}, str(DEV_FULL))
    except RuntimeError as exc:
        return exc
    raise AssertionError("torch.save wrote to /dev/full")


@needs_dev_full
def test_torch_and_safetensors_write_failures_are_taken_for_the_full_disk_behind_them(tmp_path, monkeypatch):
    import errno

    from safetensors import SafetensorError

    from audit.core.errors import AuditError
    from audit.train.disk import write_error

    torch_error = _torch_write_error()
    assert "inline_container.cc" in str(torch_error)  # torch's own words, no errno: "unexpected pos 704 vs 598"
    assert write_error(torch_error, tmp_path) is None  # the disk has room: some other failure, keep the traceback
    _disk_nearly_full(monkeypatch, tmp_path)
    assert write_error(torch_error, tmp_path).errno == errno.ENOSPC
    try:
        raise ValueError("the Trainer gave up") from torch_error
    except ValueError as wrapped:
        assert write_error(wrapped, tmp_path).errno == errno.ENOSPC
    rust = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")  # as on a full tmpfs
    assert write_error(rust, tmp_path).errno == errno.ENOSPC
    quota = SafetensorError("Error while serializing: I/O error: Disk quota exceeded (os error 122)")
    assert write_error(quota, tmp_path).errno == errno.EDQUOT
    assert write_error(RuntimeError("CUDA out of memory"), tmp_path) is None  # a bug or the GPU: not the disk
    assert write_error(AuditError("already one line"), tmp_path) is None
    assert write_error(KeyboardInterrupt(), tmp_path) is None
    try:
        try:
            raise torch_error
        except RuntimeError:
            raise KeyError("handled, and replaced on purpose") from None
    except KeyError as replaced:
        assert write_error(replaced, tmp_path) is None


@needs_dev_full
def test_a_full_disk_during_a_trainer_checkpoint_is_one_line_and_the_run_resumes(in_tmp, monkeypatch, capsys):
    """torch's checkpoint writer fails as on a full disk (it writes to /dev/full): the traceback it raised, ``RuntimeError:
    [enforce fail at inline_container.cc:672]``, is one line naming the run directory; run.json says failed; once
    there is space, the resume sets the half-written checkpoint aside and finishes."""
    import torch

    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if str(f).endswith("optimizer.pt"):  # the Trainer's checkpoint, after its adapter weights
            Path(f).write_bytes(b"PK\x03\x04")  # the part written before the disk filled
            real_save(obj, str(DEV_FULL), *args, **kwargs)
        return real_save(obj, f, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(torch, "save", save)
        _disk_nearly_full(m, in_tmp)
        assert main(["run", "tiny/lora_cpu", "--quiet", "--no-tracking", *SMALL]) == 2
        (run_dir,) = (in_tmp / "runs").iterdir()
        shown = run_dir.relative_to(in_tmp)
        assert one_line_error(capsys) == (
            f"error: no space left on the device (writing under {shown}) (fix: free space on the disk that holds {shown} "
            f"(or raise the quota), then resume with `audit run --resume {shown}`)")
    status = json.loads((run_dir / "run.json").read_text())
    assert status["status"] == "failed" and status["error"].startswith("AuditError: no space left on the device")
    assert list((run_dir / "trainer").glob("checkpoint-*/optimizer.pt")), "the failure did not come from the checkpoint"
    assert main(["run", "--resume", str(run_dir), "--quiet", "--no-tracking"]) == 0
    assert json.loads((run_dir / "run.json").read_text())["status"] == "complete"


@pytest.mark.slow
def test_a_resume_from_another_folder_logs_to_the_tracking_store_run_json_recorded(tmp_path, monkeypatch, capsys):
    """The first attempt ran in a/ (its default store a/mlflow.db); the resume, started in b/, finishes that same
    MLflow run there and makes no store of its own."""
    first, elsewhere = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    elsewhere.mkdir()
    run_dir = _run_failed_on_a_full_disk(first, monkeypatch, capsys)
    recorded = json.loads((run_dir / "run.json").read_text())
    assert recorded["tracking_uri"] == f"sqlite:///{first / 'mlflow.db'}"
    monkeypatch.chdir(elsewhere)
    assert main(["run", "--resume", str(run_dir), "--quiet"]) == 0
    status = json.loads((run_dir / "run.json").read_text())
    assert status["status"] == "complete" and status["mlflow_run_id"] == recorded["mlflow_run_id"]
    assert status["tracking_uri"] == recorded["tracking_uri"] and status["tracking"] == "complete"
    finished = _mlflow_run(first, recorded["mlflow_run_id"])
    assert finished.info.status == "FINISHED" and "exposure.mean/rep_1/tuned" in finished.data.metrics
    assert not any(elsewhere.iterdir())  # no mlflow.db, no runs/ in the folder the resume started from


@pytest.mark.slow
def test_a_resume_whose_tracking_server_is_down_finishes_with_one_warning_and_keeps_the_calls(tmp_path, monkeypatch, capsys):
    import socket


    run_dir = _run_failed_on_a_full_disk(tmp_path, monkeypatch, capsys)
    with socket.socket() as s:  # a port nothing listens on: the server recorded in run.json is down
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    status = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**status, "tracking_uri": dead}))
    assert main(["run", "--resume", str(run_dir), "--quiet"]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and warnings[0].startswith(f"[audit] warning: MLflow at {dead} failed"), err
    assert "error:" not in err and "Traceback" not in err
    status = json.loads((run_dir / "run.json").read_text())
    assert status["status"] == "complete" and status["tracking"] == "incomplete" and status["tracking_uri"] == dead
    kept = [json.loads(line) for line in (run_dir / LAYOUT.pending).read_text().splitlines()]
    logged = {metric[0] for op in kept if op["op"] == "log_batch" for metric in op.get("metrics", [])}
    assert {"train.loss", "exposure.mean/rep_1/tuned"} <= logged, sorted(logged)[:20]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["metric_notes"]["tracking"].startswith("tracking incomplete")

    # the server back (here: the store the first attempt used), `audit sync` sends what was kept to the same run
    assert main(["sync", str(run_dir), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]) == 0
    synced = _mlflow_run(tmp_path, status["mlflow_run_id"])
    assert synced.info.status == "FINISHED" and "exposure.mean/rep_1/tuned" in synced.data.metrics


@pytest.mark.slow
def test_a_killed_run_whose_checkpoint_was_then_truncated_resumes_by_training_again(tmp_path):
    """A real tiny run killed after its first checkpoint; the checkpoint's adapter weights are cut short; the resume
    says so in one line, sets it aside, trains from step 0 and finishes (no traceback from safetensors)."""
    import subprocess

    from helpers import AUDIT, audit_env, kill_after_first_checkpoint

    run_dir = kill_after_first_checkpoint(tmp_path, ["run", "tiny/lora_cpu", "--quiet", "--no-tracking",
                                                      "training.checkpoint_every=10"])
    (checkpoint,) = (run_dir / "trainer").glob("checkpoint-*")
    _truncate(checkpoint / "adapter_model.safetensors", keep=1000)
    resumed = subprocess.run(AUDIT + ["run", "--resume", str(run_dir), "--no-tracking"], cwd=tmp_path, env=audit_env(),
                             capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    said = [line for line in resumed.stderr.splitlines() if line.startswith(f"[audit] resume: {checkpoint.name}")]
    assert len(said) == 1 and said[0].startswith(f"[audit] resume: {checkpoint.name} is damaged (adapter_model"
                                                 ".safetensors: ") and f"moved to damaged-{checkpoint.name}-" in said[0], said
    assert "no intact training checkpoint left; training starts over from step 0" in resumed.stderr
    assert "Traceback" not in resumed.stderr
    status = json.loads((run_dir / "run.json").read_text())
    assert status["status"] == "complete" and "resumed_from_checkpoint" not in status
    assert json.loads((run_dir / "report.json").read_text())["training"]["steps"] == 210
