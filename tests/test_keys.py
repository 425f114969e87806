"""The audit key: made once per user with 0600, overridable for CI, never shown; keyed streams and ids."""

from __future__ import annotations

import stat

import pytest

from audit.core.errors import AuditError
from audit.core.keys import KEY_ENV, KEY_FILE_ENV, AuditKey, resolve_key, write_key_file
from audit.core.rng import SeededStream


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.delenv(KEY_FILE_ENV, raising=False)
    return tmp_path


def test_the_default_key_is_created_once_private_and_then_reused(home):
    first = resolve_key()
    path = home / "config" / "canary-audit" / "key"
    assert first.source == f"file:{path}"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert resolve_key().secret == first.secret and len(first.secret) == 32


def test_the_environment_wins_over_files_and_a_bad_key_is_one_line(home, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "ab" * 32)
    assert resolve_key(key_file="/nonexistent").secret == bytes.fromhex("ab" * 32)
    monkeypatch.setenv(KEY_ENV, "not hex")
    with pytest.raises(AuditError, match=r"\$CANARY_AUDIT_KEY is not 64 hex digits"):
        resolve_key()
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(AuditError, match="audit key file /nonexistent \\(canaries.key_file\\) does not exist"):
        resolve_key(key_file="/nonexistent")


def test_a_key_file_others_can_read_is_refused(home):
    path = write_key_file(home / "shared.key")
    path.chmod(0o644)
    with pytest.raises(AuditError, match="is readable by others .* chmod 600"):
        resolve_key(key_file=path)
    path.chmod(0o600)
    assert resolve_key(key_file=path).source == f"file:{path}"


def test_write_key_file_never_overwrites_a_key(home):
    path = write_key_file(home / "k")
    before = path.read_text()
    write_key_file(path)
    assert path.read_text() == before


_FIRST_USE = """
import os, sys
from audit.core.keys import resolve_key
print("ready", flush=True)
while not os.path.exists(sys.argv[1]):  # every process asks for the key at the same moment
    pass
print(resolve_key().id)
"""


def test_processes_making_the_default_key_at_once_all_get_the_same_whole_key(tmp_path):
    """Parallel first audits on one machine: before the key was linked into place whole, some of 180 processes
    raised FileExistsError or read a half-written key ("not 64 hex digits")."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    for round_ in range(5):
        config, go = tmp_path / f"config{round_}", tmp_path / f"go{round_}"
        env = {k: v for k, v in os.environ.items() if k not in (KEY_ENV, KEY_FILE_ENV)}
        env.update(XDG_CONFIG_HOME=str(config), PYTHONPATH=str(repo))
        procs = [subprocess.Popen([sys.executable, "-c", _FIRST_USE, str(go)], env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(6)]
        assert [p.stdout.readline() for p in procs] == ["ready\n"] * 6
        go.touch()
        results = [p.communicate(timeout=60) + (p.returncode,) for p in procs]
        assert all(rc == 0 and not err for _, err, rc in results), [err for _, err, _ in results if err]
        key = config / "canary-audit" / "key"
        assert {out.strip() for out, _, _ in results} == {AuditKey(bytes.fromhex(key.read_text()), source="").id}
        assert [p.name for p in key.parent.iterdir()] == ["key"]  # no temporary file left behind


def test_a_key_linked_by_another_process_first_is_kept_and_the_temporary_file_removed(home, monkeypatch):
    import os

    from audit.core import keys

    path = home / "config" / "canary-audit" / "key"
    real_link = os.link

    def another_process_first(src, dst):  # between this process's write and its link, another links its key
        monkeypatch.setattr(keys.os, "link", real_link)
        write_key_file(path)
        theirs.append(path.read_text())
        real_link(src, dst)

    theirs: list[str] = []
    monkeypatch.setattr(keys.os, "link", another_process_first)
    assert resolve_key().secret.hex() == theirs[0].strip()
    assert [p.name for p in path.parent.iterdir()] == ["key"] and stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_file_where_the_key_folder_goes_is_one_line_naming_it(home):
    (home / "config").mkdir()
    (home / "config" / "canary-audit").write_text("not a folder")
    with pytest.raises(AuditError, match=r"audit key folder .*canary-audit: .*canary-audit is a file, not a folder") as err:
        resolve_key()
    assert "\n" not in str(err.value) and "(fix: " in str(err.value)
    assert (home / "config" / "canary-audit").read_text() == "not a folder"


@pytest.mark.parametrize("where", ["env", "recipe"])
def test_a_key_file_that_is_a_directory_is_named_as_one(home, monkeypatch, where):
    folder = home / "keys"
    folder.mkdir()
    if where == "env":
        monkeypatch.setenv(KEY_FILE_ENV, str(folder))
    name = r"\$CANARY_AUDIT_KEY_FILE" if where == "env" else "canaries.key_file"
    with pytest.raises(AuditError, match=rf"audit key file {folder} \({name}\) is a directory, not a key file") as err:
        resolve_key(key_file=None if where == "env" else folder)
    assert "\n" not in str(err.value) and "does not exist" not in str(err.value)


def test_the_key_id_names_the_key_without_revealing_it():
    a, b = AuditKey(b"\x01" * 32, source="test"), AuditKey(b"\x02" * 32, source="test")
    assert a.id != b.id and len(a.id) == 16 and a.id == AuditKey(b"\x01" * 32, source="other").id
    assert (b"\x01" * 32).hex() not in repr(a) and "01010101" not in repr(a) and a.id in repr(a)
    assert a.digest("x", "y") != b.digest("x", "y") and a.digest("x", "y") != a.digest("xy")  # parts are separated


def test_a_keyed_stream_is_deterministic_per_key_and_unrelated_to_the_plain_one():
    def draw(key):
        s = SeededStream(7, "canaries:digits:v1:pool", key=key)
        return [s.below(10**6) for _ in range(20)]

    assert draw(b"k" * 32) == draw(b"k" * 32)
    assert draw(b"k" * 32) != draw(b"j" * 32)
    assert draw(None) == draw(None) and draw(None) != draw(b"k" * 32)


# --------------------------------------------------------------------------------------------------- wired into audits

import json  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

from audit.core.config import load_recipe, read_yaml, validate_recipe  # noqa: E402
from audit.core.store import json_text, jsonl_text  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "run_7f52ba4_tiny_lora"
KEY_A = AuditKey(b"\xa1" * 32, source="test")
KEY_B = AuditKey(b"\xb2" * 32, source="test")


def _files(tokenizer, key, recipe=None):
    from audit.data.ground_truth import ground_truth_files, prepare_ground_truth

    truth = prepare_ground_truth(recipe or load_recipe("tiny/lora_cpu"), tokenizer=tokenizer, key=key)
    text = {name: jsonl_text(obj) if name.endswith(".jsonl") else json_text(obj)
            for name, obj in ground_truth_files(truth).items()}
    return truth, text


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model_dir):
    from audit.data.ground_truth import load_tokenizer

    return load_tokenizer(tiny_model_dir)


def test_the_same_recipe_seed_and_key_give_byte_identical_canaries_and_manifest_and_another_key_other_secrets(tiny_tokenizer):
    truth_a, files_a = _files(tiny_tokenizer, KEY_A)
    _, again = _files(tiny_tokenizer, KEY_A)
    truth_b, files_b = _files(tiny_tokenizer, KEY_B)
    assert files_a == again  # canaries.jsonl, canaries.meta.json, manifest.json, preflight.json: byte for byte
    secrets_a = {c.secret for c in truth_a.canaries.canaries}
    secrets_b = {c.secret for c in truth_b.canaries.canaries}
    assert len(secrets_a) == 12 and not secrets_a & secrets_b  # 12 draws from 10^6: a shared one would be a broken key
    assert not {c.id for c in truth_a.canaries.canaries} & {c.id for c in truth_b.canaries.canaries}
    assert truth_a.reference_secrets != truth_b.reference_secrets
    for name in ("canaries.jsonl", "manifest.json"):
        assert files_a[name] != files_b[name]


def test_the_seed_alone_no_longer_gives_the_secrets(tiny_tokenizer):
    """What `audit inject RECIPE` did for anyone who read the seed from MLflow: the unkeyed draw is another set."""
    truth, _ = _files(tiny_tokenizer, KEY_A)
    unkeyed, _ = _files(tiny_tokenizer, None)
    assert not {c.secret for c in truth.canaries.canaries} & {c.secret for c in unkeyed.canaries.canaries}
    assert not set(truth.reference_secrets) & {c.secret for c in truth.canaries.canaries}


def test_the_key_id_and_never_the_key_is_recorded_in_meta_manifest_and_report_summary(tiny_tokenizer):
    truth, files = _files(tiny_tokenizer, KEY_A)
    assert json.loads(files["canaries.meta.json"])["key_id"] == KEY_A.id
    assert json.loads(files["manifest.json"])["key_id"] == KEY_A.id
    assert truth.summary()["key_id"] == KEY_A.id
    for text in files.values():
        assert KEY_A.secret.hex() not in text
    # the manifest's dataset digest after injection is keyed: not the plain sha256 of the planted records
    from audit.data.inject import fingerprint_records

    assert truth.injection.manifest.dataset_after == fingerprint_records(truth.injection.records, key=KEY_A.secret)
    assert truth.injection.manifest.dataset_after != fingerprint_records(truth.injection.records)
    assert truth.injection.manifest.dataset_before == fingerprint_records(builtin_corpus())


def builtin_corpus():
    from audit.data.corpus import load_corpus

    r = load_recipe("tiny/lora_cpu")
    return load_corpus(r.corpus.source, text_column=r.corpus.text_column, max_records=r.corpus.max_records,
                       builtin_n=r.corpus.builtin_records, seed=r.seed, format=r.corpus.format,
                       messages_column=r.corpus.messages_column).records


def test_an_edited_secret_in_a_stored_keyed_set_is_refused(tiny_tokenizer):
    from audit.data.canaries.generate import check_ids

    truth, _ = _files(tiny_tokenizer, KEY_A)
    check_ids(truth.canaries, KEY_A)
    rows = list(truth.canaries.canaries)
    rows[0] = rows[0].model_copy(update={"secret": "000000" if rows[0].secret != "000000" else "111111"})
    edited = truth.canaries.model_copy(update={"canaries": rows})
    with pytest.raises(AuditError, match=f"canary {rows[0].id} does not hold the secret"):
        check_ids(edited, KEY_A)
    with pytest.raises(AuditError, match=f"drawn under audit key {KEY_A.id}, the key in use is {KEY_B.id}"):
        check_ids(truth.canaries, KEY_B)


def _fake_run(tmp_path, key_id):
    run = tmp_path / "runs" / "half"
    run.mkdir(parents=True)
    recipe = load_recipe("tiny/lora_cpu")
    import yaml

    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
    status = {"status": "failed", "started_at": "2026-12-01T09:00:00+00:00", "schema_version": 1, "key_id": key_id}
    (run / "run.json").write_text(json.dumps(status))
    return run


def test_a_run_made_with_one_key_refuses_to_resume_with_another_in_one_line(tmp_path, monkeypatch, capsys):
    from audit.cli import main

    monkeypatch.chdir(tmp_path)
    run = _fake_run(tmp_path, KEY_B.id)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert main(["run", "--resume", str(run), "--no-tracking", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    in_use = resolve_key().id  # the test key of tests/conftest.py
    assert len(err) == 1 and err[0].startswith("error: ") and "(fix: " in err[0]
    assert KEY_B.id in err[0] and in_use in err[0] and in_use != KEY_B.id
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # refused before anything was touched


def test_resume_with_the_recorded_key_and_a_run_that_recorded_nothing_yet_use_the_key_in_use(tmp_path):
    from audit.pipeline.origin import origin_for
    from audit.pipeline.resume import RunDir

    in_use = resolve_key()
    recipe = load_recipe("tiny/lora_cpu")
    assert origin_for(recipe, directory=RunDir(_fake_run(tmp_path / "a", in_use.id))).key.id == in_use.id
    # killed before canaries.jsonl was written: nothing to stay compatible with, so no downgrade to unkeyed
    assert origin_for(recipe, directory=RunDir(_fake_run(tmp_path / "b", None))).key.id == in_use.id


def test_the_recipe_key_file_is_used_and_a_missing_one_is_one_line(tmp_path, monkeypatch):
    from audit.pipeline.origin import run_key

    monkeypatch.delenv(KEY_ENV)
    path = write_key_file(tmp_path / "team.key")
    recipe = load_recipe("tiny/lora_cpu", [f"canaries.key_file={path}"])
    assert run_key(recipe).source == f"file:{path}" and run_key(recipe).id == resolve_key(key_file=path).id
    assert "key_file" not in load_recipe("tiny/lora_cpu").canaries.model_dump()  # unset: recipe.yaml as before
    with pytest.raises(AuditError, match="canaries.key_file"):
        run_key(load_recipe("tiny/lora_cpu", [f"canaries.key_file={tmp_path / 'nope'}"]))


@pytest.fixture
def old_run(tmp_path):
    run = tmp_path / "runs" / "old"
    shutil.copytree(FIXTURE, run, ignore=shutil.ignore_patterns("README.md"))
    return run


def _stored_recipe(run):
    return validate_recipe(read_yaml(run / "recipe.yaml"), source=str(run / "recipe.yaml"))


def test_a_run_written_before_the_key_is_regenerated_unkeyed_byte_for_byte(old_run, tiny_tokenizer):
    from audit.pipeline.origin import origin_for
    from audit.pipeline.resume import RunDir

    recipe = _stored_recipe(old_run)
    origin = origin_for(recipe, directory=RunDir(old_run))
    assert origin.key is None  # no key id recorded, canaries.jsonl present: it was unkeyed
    _, files = _files(tiny_tokenizer, origin.key, recipe)
    for name in ("canaries.jsonl", "manifest.json", "preflight.json"):
        assert files[name] == (old_run / name).read_text(encoding="utf-8"), name
    assert "key_id" not in json.loads(files["canaries.meta.json"])


def test_a_further_tune_uses_its_parents_key_and_refuses_another(old_run):
    from audit.pipeline.origin import origin_for

    clean = load_recipe("tiny/clean_lora_cpu", [f"parent={old_run}"])
    assert origin_for(clean).key is None  # an unkeyed parent: its canaries are regenerated unkeyed
    status = json.loads((old_run / "run.json").read_text())
    (old_run / "run.json").write_text(json.dumps({**status, "key_id": resolve_key().id}))
    assert origin_for(clean).key.id == resolve_key().id
    (old_run / "run.json").write_text(json.dumps({**status, "key_id": KEY_B.id}))
    with pytest.raises(AuditError, match=f"parent run {old_run.resolve()} was made with audit key {KEY_B.id}"):
        origin_for(clean)


@pytest.mark.parametrize("name", ["digits", "words", "pii", "traps"])
def test_every_generator_draws_per_key(name):
    """Same spec, seed and key: the same set byte for byte; another key: other secrets, ids and references.
    (traps: a fake sampler whose text follows the sampling seed, which the keyed stream draws.)"""
    from helpers import FakeSampler

    from audit.data.canaries import GenerationContext, generate_canaries, load_spec, reference_secrets

    spec = load_spec(name)

    def draw(key):
        ctx = GenerationContext(sampler=FakeSampler()) if name == "traps" else None
        cs = generate_canaries(spec, seed=5, key=key, context=ctx)
        return cs, reference_secrets(spec, cs, n=20, seed=5, key=key, context=ctx)

    (a, refs_a), (again, refs_again), (b, refs_b) = draw(KEY_A), draw(KEY_A), draw(KEY_B)
    assert jsonl_text(a.canaries) == jsonl_text(again.canaries) and a.sha256() == again.sha256() and refs_a == refs_again
    assert a.key_id == KEY_A.id and b.key_id == KEY_B.id
    assert {c.secret for c in a.canaries} != {c.secret for c in b.canaries} and refs_a != refs_b
    assert not {c.id for c in a.canaries} & {c.id for c in b.canaries}


def test_audit_key_prints_the_id_and_never_the_key_and_new_writes_a_private_file(home, capsys):
    from audit.cli import main

    assert main(["key"]) == 0
    out = capsys.readouterr().out
    key = resolve_key()
    assert key.id in out and key.secret.hex() not in out
    path = home / "team.key"
    assert main(["key", "--new", str(path)]) == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    made = resolve_key(key_file=path)
    assert made.id in capsys.readouterr().out and made.secret != key.secret
    assert main(["key", "--new", str(path)]) == 2  # never overwritten
    assert "already exists" in capsys.readouterr().err and resolve_key(key_file=path).secret == made.secret


def test_validate_names_the_key_in_use_and_refuses_a_missing_key_file(tmp_path, capsys):
    from audit.cli import main

    assert main(["validate", "tiny/lora_cpu"]) == 0
    out = capsys.readouterr().out
    assert f"audit key: {resolve_key().id} (env:CANARY_AUDIT_KEY)" in out and resolve_key().secret.hex() not in out
    assert main(["validate", "tiny/lora_cpu", f"canaries.key_file={tmp_path / 'nope'}"]) == 0  # the env key wins
    capsys.readouterr()
    import os

    saved = os.environ.pop(KEY_ENV)
    try:
        assert main(["validate", "tiny/lora_cpu", f"canaries.key_file={tmp_path / 'nope'}"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "audit key file" in err[0] and "does not exist" in err[0]
    finally:
        os.environ[KEY_ENV] = saved
