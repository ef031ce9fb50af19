"""The notebooks' shared set-up, in one place: `from nbsetup import *` in a first cell.

It finds brain.py (in the working folder or a folder above it) and puts it on sys.path, reads the
mode (FAST = the environment variable BRAIN_NOTEBOOK_FAST=1, as the test suite sets it), turns
off progress bars, sets the plots' defaults, and offers a few helpers that more than one notebook
uses: Markdown tables, the mode line, the claims table, and each estimator's gradient on shared
sample batches, written with Part I of brain.py only (score_batch -> sequence_logprobs ->
method_loss -> torch.autograd.grad). real_model_folder() is the real model's one cache folder
($BRAIN_REAL_CACHE, else ~/.cache/brain-real-model), shared with build_real_model.py's default,
README's recipe and the tests.
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
    "mode_line", "elapsed", "plain_log_axis", "fast_note", "claims_table", "VARIANTS", "LABEL",
    "estimator_gradients", "grad_stats", "flat", "real_model_folder",
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


# Each estimator by name: (brain.method_loss's method, DPO labels, proposal: 0 = SFT, 1 = policy)
VARIANTS = {
    "brain": ("brain", "argmax", 0),
    "gdcpp": ("gdcpp", "argmax", 0),
    "dpg": ("dpg", "argmax", 0),
    "dpo-argmax": ("dpo", "argmax", 0),
    "dpo-bt": ("dpo", "bt", 0),
    "brain-on": ("brain", "argmax", 1),
    "rloo": ("rloo", "argmax", 1),
}
LABEL = {
    "brain": "BRAIn", "gdcpp": "GDC++", "dpg": "DPG", "dpo-argmax": "DPO (argmax)",
    "dpo-bt": "DPO (BT)", "brain-on": "BRAIn (on-policy)", "rloo": "RLOO", "dpg-z": "DPG, Z known",
}  # fmt: skip


def flat(grads, params):
    """One flat vector from autograd's per-parameter gradients (None: a zero block)."""
    blocks = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]
    return torch.cat([b.reshape(-1) for b in blocks])


def estimator_gradients(cfg, policy, proposal, sft, task, names, batches, generator, extra=None):
    """{name: (batches, parameters)}: each estimator's gradient on the same `batches` fresh
    batches from `proposal`, at the same `policy`. `extra`: {name: fn(policy_logp, scores, seqs)
    -> loss} for estimators that brain.method_loss does not name."""
    params = [p for p in policy.parameters() if p.requires_grad]
    out = {name: [] for name in [*names, *(extra or {})]}
    for _ in range(batches):
        seqs, *scores = brain.score_batch(cfg, proposal, sft, task, generator)
        coin = torch.rand(cfg.prompts_per_step, generator=generator)  # DPO's Bradley-Terry labels
        policy_logp = brain.sequence_logprobs(policy, *seqs, task.eos_id)
        policy_logp = policy_logp.view(-1, cfg.n_samples)
        for name in out:
            if name in names:
                method, labels, _ = VARIANTS[name]
                loss = brain.method_loss(method, policy_logp, *scores, cfg.beta, labels, coin)
            else:
                loss = extra[name](policy_logp, scores, seqs)
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            out[name].append(flat(grads, params))
    return {name: torch.stack(g) for name, g in out.items()}


def grad_stats(grads):
    """Trace of the covariance of K gradient draws (unbiased), and the norm of their mean."""
    mean = grads.mean(0)
    trace_cov = ((grads - mean) ** 2).sum().item() / (len(grads) - 1)
    return {"trace_cov": trace_cov, "mean_norm": mean.norm().item()}
