"""A readable terminal: our own progress bars and summaries, not the libraries' chatter.

Without this an ``audit run`` interleaves MLflow's "Creating initial MLflow database tables..." INFO lines,
transformers' FutureWarnings, datasets' "Adding EOS / Tokenizing train dataset" bars (five per training run) and a
"Loading weights" bar per model load with the harness's own ``[audit]`` lines and score/train bars. Called by the
CLI only: a library user keeps whatever logging they configured.

What stays: our tqdm bars (fetching, scoring, training, generation), the Hugging Face Hub download bars (fetching
a model is long and worth a bar), warnings from our own code and any library ERROR.
"""

from __future__ import annotations

import logging
import os
import warnings

NOISY_WARNING_MODULES = r"(transformers|trl|peft|accelerate|datasets|torch|mlflow|huggingface_hub)(\.|$)"
NOISY_LOGGERS = ("mlflow", "alembic", "transformers", "trl", "peft", "accelerate", "datasets", "httpx", "urllib3")


def quiet_libraries(*, transformers: bool = True) -> None:
    """Silence library INFO logs, deprecation/future warnings and library progress bars for this process.

    ``transformers``: also switch off transformers' own bars ("Loading weights"), which needs importing it; the
    ``run`` family of commands import it anyway, ``audit report`` does not.
    """
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow configures its logger at import
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # read when datasets is imported
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # "huggingface/tokenizers: The current process just got forked"
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR if name != "mlflow" else logging.WARNING)
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category, module=NOISY_WARNING_MODULES)
    if transformers:
        from huggingface_hub.utils import enable_progress_bars
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()  # "Loading weights" ... (it switches the Hub's bars off too:)
        enable_progress_bars()  # downloads keep their bars


def say(progress: bool, msg: str) -> None:
    """One ``[audit] ...`` progress line on stderr, when ``progress`` is on."""
    if progress:
        import sys

        print(msg, file=sys.stderr, flush=True)


def text_table(header: list[str], rows: list[list[str]], *, numbers_right: bool = False) -> list[str]:
    """A fixed-width table as lines: header, a dashed rule, the rows; columns two spaces apart.

    ``numbers_right``: every column but the first is right-aligned (tiers of numbers); otherwise all are left-aligned
    and trailing blanks are cut.
    """
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        if numbers_right:
            return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]
