"""The notebooks' shared set-up, in one place: `from nbsetup import *` in a first cell.

It finds brain.py (in the working folder or a folder above it) and puts it on sys.path, reads the
mode (FAST = the environment variable BRAIN_NOTEBOOK_FAST=1, as the test suite sets it), turns
off progress bars, sets the plots' defaults, and offers a few helpers that more than one notebook
uses: Markdown tables, the mode line, the claims table and plot labels. Everything about the
method comes from brain.py itself (brain.VARIANTS, brain.estimator_gradients,
brain.exact_gradients, brain.gradient_errors, ...): nothing of it is copied here.
real_model_folder() is the real model's one cache folder ($BRAIN_REAL_CACHE, else
~/.cache/brain-real-model), shared with build_real_model.py's default, README's recipe and the
tests.
"""

import os
import sys
import time
import warnings
from pathlib import Path

FAST = os.environ.get("BRAIN_NOTEBOOK_FAST", "0") == "1"  # the test suite runs the FAST mode
T0 = time.time()  # when the notebook imported this module: its running time starts here
os.environ["TQDM_DISABLE"] = "1"  # no progress bars in the stored outputs
warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm.auto, from brain.py


def find_root(start=None):
    """The folder that holds brain.py: the working folder or the nearest one above it."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "brain.py").is_file():
            return folder
    raise FileNotFoundError(
        "brain.py not found in the working folder or above it: run the notebook from the repository"
    )


ROOT = find_root()
for folder in (str(ROOT), str(Path(__file__).resolve().parent)):  # brain.py; this folder's files
    if folder not in sys.path:
        sys.path.insert(0, folder)

import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import torch  # noqa: E402
from build_real_model import default_folder as real_model_folder  # noqa: E402
from IPython.display import Markdown, display  # noqa: E402

import brain  # noqa: E402

plt.rcParams.update(
    {"figure.dpi": 64, "figure.figsize": (6.4, 4.0), "axes.grid": True, "grid.alpha": 0.3}
)
DEVICE = torch.device("cpu")  # every number in the stored outputs was measured on the CPU

__all__ = [
    "FAST", "ROOT", "DEVICE", "brain", "torch", "plt", "Markdown", "display", "md", "md_table",
    "mode_line", "elapsed", "plain_log_axis", "fast_note", "claims_table", "LABEL",
    "real_model_folder",
]  # fmt: skip


def md(text):
    """Display Markdown text."""
    display(Markdown(text))


def md_table(header, rows, digits=3):
    """A Markdown table: strings as they are, numbers to `digits` significant digits."""

    def cell(c):
        return c if isinstance(c, str) else f"{c:.{digits}g}"

    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    md("\n".join(lines))


def mode_line(note=""):
    """Print which mode made the outputs ("mode: FAST" or "mode: full"), then an optional note."""
    print(f"mode: {'FAST' if FAST else 'full'}" + (f"; {note}" if note else ""))


def elapsed():
    """Seconds since the notebook imported nbsetup (the kernel's start is not included)."""
    return time.time() - T0


def plain_log_axis(axis):
    """Log-scale ticks written plainly (0.2, 1, 2) instead of 2 x 10^-1."""
    axis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    axis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def fast_note():
    """The words that open a computed reading in FAST mode (nothing in full mode)."""
    return "*(A FAST run: too short to decide anything.)* " if FAST else ""


def claims_table(rows, title="Summary of this run"):
    """The closing table, one line per claim: (claim, this run, verdict). A FAST run says first
    that its verdicts decide nothing."""
    lines = [f"### {title} ({'FAST' if FAST else 'full'} mode)", ""]
    if FAST:
        lines += [
            "**This is a FAST run (BRAIN_NOTEBOOK_FAST=1): too few steps, seeds and batches;"
            " its verdicts only show that every cell runs and decide nothing.**",
            "",
        ]
    lines += ["| claim | this run | verdict |", "| --- | --- | --- |"]
    lines += [f"| {claim} | {measured} | {verdict} |" for claim, measured, verdict in rows]
    md("\n".join(lines))


# Plot and table labels of brain.VARIANTS' names (and the notebooks' own extra estimators)
LABEL = {
    "brain": "BRAIn", "gdcpp": "GDC++", "dpg": "DPG", "dpo-argmax": "DPO (argmax)",
    "dpo-bt": "DPO (BT)", "brain-on": "BRAIn (on-policy)", "rloo": "RLOO", "dpg-z": "DPG, Z known",
}  # fmt: skip
