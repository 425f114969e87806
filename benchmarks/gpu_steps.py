"""The small steps of ``benchmarks/gpu_check.sh`` and the one JSON file it keeps (standard library at import).

    python3 benchmarks/gpu_steps.py record OUT STEP RC WALL_S LIMIT_S   # merge OUT/steps/STEP.json into OUT/gpu.json
    python3 benchmarks/gpu_steps.py machine OUT                         # nvidia-smi, python, pip freeze
    python  benchmarks/gpu_steps.py versions OUT/steps/versions.json    # libraries, where each comes from, the device
    python  benchmarks/gpu_steps.py audit RUN_ROOT OUT.json             # what an `audit run` under RUN_ROOT recorded
    python  benchmarks/gpu_steps.py reload RUN_ROOT... OUT.json         # in-process vs fresh-reload tuned scores

``OUT/gpu.json`` is rewritten (atomically) after every step, whatever its end: a step that times out still leaves
its rc, its wall time and whatever it wrote to ``OUT/steps/STEP.json`` before it was stopped.
"""

from __future__ import annotations

import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

DRY = os.environ.get("GPU_CHECK_DRYRUN") == "1"


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def record(out: Path, step: str, rc: int, wall_s: float, limit_s: float) -> dict:
    """``out/gpu.json`` with ``step``'s result merged in: rc, wall and limit, timed out or not, and its own data."""
    figures = read_json(out / "gpu.json") or {
        "schema_version": 1, "dryrun": DRY,
        "note": ("DRY RUN on the CPU: tests the check, measures nothing about a GPU" if DRY else "one CUDA GPU, air-gapped"),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "steps": {}}
    figures["steps"][step] = {"rc": rc, "wall_s": wall_s, "limit_s": limit_s, "timed_out": rc in (124, 137),
                              "data": read_json(out / "steps" / f"{step}.json")}
    figures["run_s"] = round(sum(s["wall_s"] for s in figures["steps"].values()), 1)
    write_json(out / "gpu.json", figures)
    return figures


def machine(out: Path) -> dict:
    """The machine as the check found it, before anything is installed."""
    smi = shutil.which("nvidia-smi")
    gpus = None
    if smi:
        q = subprocess.run([smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
        gpus = q.stdout.strip().splitlines() or q.stderr.strip()[:300]
    freeze = subprocess.run([sys.executable, "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True,
                            timeout=60).stdout
    (out / "pip_freeze.txt").write_text(freeze)  # the --have of the next `wheelhouse.py build`
    data = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(),
            "cpus": os.cpu_count(), "nvidia_smi": gpus, "distributions": len(freeze.splitlines())}
    write_json(out / "steps" / "machine.json", data)
    return data


def versions(path: Path) -> dict:
    """Each library's version and the folder it is imported from (the machine's own CUDA torch, never the target's),
    ``pip check`` over the combined environment, the device, and what ``auto`` resolves to for LoRA and full."""
    import importlib.metadata

    data: dict = {}
    write_json(path, data)
    target = os.environ.get("GPU_CHECK_TARGET", "")
    for name in ("torch", "transformers", "accelerate", "peft", "trl", "datasets", "pydantic", "gguf", "numpy", "scipy",
                 "pandas", "pyarrow", "matplotlib", "audit"):
        try:
            module = __import__(name)
            where = str(Path(module.__file__).parent)
            data[name] = {"version": getattr(module, "__version__", None), "from": where,
                          "from_target": bool(target) and where.startswith(target)}
        except Exception as e:  # noqa: BLE001 - a missing or broken library is the finding
            data[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
        write_json(path, data)
    data["canary-audit"] = importlib.metadata.version("canary-audit") if data["audit"].get("from") else None
    check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=60)
    data["pip_check"] = (check.stdout + check.stderr).strip().splitlines()[-20:]
    import torch
    from transformers.utils import is_torch_available

    data["transformers_sees_torch"] = is_torch_available()
    data["cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        data["device"] = {"name": p.name, "total_gib": round(p.total_memory / 2**30, 1), "cc": f"{p.major}.{p.minor}",
                          "native_bf16": torch.cuda.is_bf16_supported(including_emulation=False),
                          "tf32_matmul_default": torch.backends.cuda.matmul.allow_tf32}
    else:
        data["device"] = "cpu (dry run)" if DRY else None
    from audit.core.schema import TrainingSection
    from audit.train.sft import choose_device

    data["auto"] = {m: str(choose_device(TrainingSection(method=m))) for m in ("lora", "full")}
    write_json(path, data)
    problems = [n for n in ("torch", "transformers", "trl", "datasets", "audit") if "error" in data[n]]
    problems += ["torch comes from the target"] if data["torch"].get("from_target") else []
    problems += [] if DRY or data["device"] else ["torch sees no CUDA device"]
    if problems:
        print("cannot run the audit:", "; ".join(problems), file=sys.stderr)
        sys.exit(1)
    return data


def audit_summary(root: Path, path: Path) -> dict:
    """What the one ``audit run`` under ``root`` recorded: status, training device and precision, scoring precision,
    exact-walk statuses, tier exposures, gates, calibration (the bf16 scoring's gap to fp32), timings."""
    runs = sorted(glob.glob(str(root / "*" / "run.json")))
    if not runs:
        data = {"error": f"no run directory under {root}"}
    else:
        d = Path(runs[-1]).parent
        st, tr, rep = read_json(d / "run.json"), read_json(d / "train.json"), read_json(d / "report.json")
        walks: dict = {}
        for line in (d / "scores_tuned.jsonl").read_text().splitlines() if (d / "scores_tuned.jsonl").is_file() else []:
            status = json.loads(line).get("exact_status")
            walks[status] = walks.get(status, 0) + 1
        data = {"run_dir": str(d), "status": st.get("status"), "error": (st.get("error") or "")[:500],
                "train": {k: tr.get(k) for k in ("device", "precision", "steps", "final_loss", "wall_s")},
                "scoring_precision": rep.get("recipe", {}).get("scoring", {}).get("precision"),
                "tuned_exact_walks": walks, "calibration": rep.get("calibration"),
                "exposure_mean": {t["repetitions"]: t.get("exposure_mean") for t in rep.get("tiers", [])},
                "gates": [[g.get("name"), g.get("passed")] for g in rep.get("gates", [])],
                "timings_s": rep.get("timings_s") or st.get("timings_s")}
    write_json(path, data)
    return data


RESCORED = ("scores_tuned.jsonl", "calibration_tuned.json")
DERIVED = ("scores.jsonl", "token_view.json", "report.json", "report.html", "report.md")


def reload_check(run_dir: Path) -> dict:
    """Issue 26 section 1 on this device: the tuned scores a run computed in process (after ``bf16-mixed`` training
    on CUDA) are byte-identical to those ``audit run --resume`` computes from the saved weights reloaded."""
    kept = {name: (run_dir / name).read_bytes() for name in RESCORED if (run_dir / name).is_file()}
    for name in (*RESCORED, *DERIVED):
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / "plots", ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "audit.cli", "run", "--resume", str(run_dir), "--no-tracking", "--quiet",
                           "--no-fail-on-gates"], capture_output=True, text=True)
    data = {"run_dir": str(run_dir), "resume_rc": proc.returncode, "resume_s": round(time.perf_counter() - t0, 1),
            "train_precision": read_json(run_dir / "train.json").get("precision"),
            "identical": {name: (run_dir / name).is_file() and (run_dir / name).read_bytes() == old
                          for name, old in kept.items()}}
    if proc.returncode:
        data["stderr_tail"] = proc.stderr[-1500:]
    if kept.get("scores_tuned.jsonl") and (run_dir / "scores_tuned.jsonl").is_file():
        old = [json.loads(x) for x in kept["scores_tuned.jsonl"].decode().splitlines()]
        new = [json.loads(x) for x in (run_dir / "scores_tuned.jsonl").read_text().splitlines()]
        data["max_abs_bits"] = max((abs(a["secret_nll_bits"] - b["secret_nll_bits"]) for a, b in zip(old, new, strict=True)),
                                   default=None)
        data["rank_mismatches"] = sum(a.get("rank") != b.get("rank") for a, b in zip(old, new, strict=True))
    data["ok"] = proc.returncode == 0 and bool(kept) and all(data["identical"].values())
    return data


def reload_all(roots: list[Path], path: Path) -> dict:
    """:func:`reload_check` for the run under each of ``roots`` (keyed by the root's name), written after each."""
    data: dict = {}
    for root in roots:
        runs = sorted(glob.glob(str(root / "*" / "run.json")))
        data[root.name] = reload_check(Path(runs[-1]).parent) if runs else {"ok": False, "error": f"no run under {root}"}
        write_json(path, data)
    if not data or not all(d["ok"] for d in data.values()):
        sys.exit(3)
    return data


def main(argv: list[str]) -> None:
    cmd, args = argv[0], argv[1:]
    if cmd == "record":
        out, step, rc, wall, limit = Path(args[0]), args[1], int(args[2]), float(args[3]), float(args[4])
        record(out, step, rc, wall, limit)
    elif cmd == "machine":
        machine(Path(args[0]))
    elif cmd == "versions":
        versions(Path(args[0]))
    elif cmd == "audit":
        audit_summary(Path(args[0]), Path(args[1]))
    elif cmd == "reload":
        reload_all([Path(a) for a in args[:-1]], Path(args[-1]))
    else:
        raise SystemExit(f"unknown command {cmd!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
