"""The pure core (schema, config, canaries, inject, metrics) must not import torch: it runs anywhere, fast."""

from __future__ import annotations

import subprocess
import sys


def test_pure_modules_do_not_import_torch():
    code = (
        "import sys\n"
        "import audit.schema, audit.config, audit.canaries, audit.inject, audit.metrics, audit.corpus, audit.lineage\n"
        "from audit.canaries import load_spec, generate_canaries\n"
        "from audit.inject import inject\n"
        "from audit.corpus import builtin_records\n"
        "cs = generate_canaries(load_spec('digits'), seed=0)\n"
        "inject(builtin_records('notes', n=20, seed=0), cs, seed=0)\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
