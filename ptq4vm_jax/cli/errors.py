"""The CLI's wording of mistakes: usage errors, and the flag behind a library argument.

The commands check what the user typed themselves, before the library runs, and word those
errors with flag names (``UsageError``). A library error that a check here could not foresee is
printed as the library wrote it; when it carries an ``argument`` attribute (the Python parameter
at fault, e.g. ``"resume_dir"``), the flag that sets that parameter is named beside it. The
mapping is by that attribute, never by the message's text.
"""

from __future__ import annotations

# Python parameter of the library -> the flag that sets it.
FLAGS = {
    "model": "--model", "model_name": "--model", "key": "--key", "resume_dir": "--resume",
    "data_dir": "--data-dir", "num_examples": "--limit", "batch_size": "--batch-size",
    "gemm": "--gemm", "mode": "--mode", "dtype": "--dtype",
    "w_bits": "--w-bits", "a_bits": "--a-bits", "method": "--method", "num_calib": "--num-calib",
    "epochs": "--epochs", "train_batch": "--train-batch", "alpha": "--alpha", "act_grid": "--act-grid",
    "loss": "--loss", "loss_axis": "--loss-axis", "lr_w": "--lr-w", "lr_a": "--lr-a", "lr_s": "--lr-s",
    "train_inner_proj": "--official-inner-proj", "revert_worse": "--keep-learned",
    "float_params": "--params or --checkpoint",
}


class UsageError(SystemExit):
    """A mistake in the command line: ``main`` prints it as ``ptq4vm CMD: error: ...`` and the
    process exits with status 2, as argparse does for its own errors."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def argument_of(problem: BaseException | Warning) -> str | None:
    """The library parameter an error or warning is about (its ``argument`` attribute), if any."""
    argument = getattr(problem, "argument", None)
    return argument if isinstance(argument, str) else None


def for_the_command_line(problem: BaseException | Warning) -> str:
    """A library error's or warning's message, with the flag of the parameter it blames."""
    message = str(problem)
    flag = FLAGS.get(argument_of(problem) or "")
    return message if flag is None else f"{message} ({argument_of(problem)}: {flag} on the command line)"
