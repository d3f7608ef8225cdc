"""The ``sedense`` command: its subcommands, one line each, and how every one of them ends (exit codes, one line)."""

from __future__ import annotations

import importlib
import os
import sys
import threading

from sedense.errors import STORAGE_ERRNOS, ConfigError, SedenseError, StorageError
from sedense.runs import rank_zero_only

# LightningCLI's subcommands, then sedense's own: each with the line `sedense --help` shows.
LIGHTNING = {
    "fit": "train a classifier on a labelled folder (or resume one with --ckpt_path last)",
    "validate": "score a checkpoint on the validation images of its data",
    "test": "score a checkpoint on a labelled test folder, with a per-class table",
    "predict": "classify new photos with a checkpoint or an exported model",
    "calibrate": "fit a checkpoint's temperature, and the threshold of --target_precision, on its validation images",
}
OWN = {
    "export": "write a checkpoint as ONNX (optionally INT8) or TorchScript, checked against PyTorch",
    "serve": "an HTTP service with a page to try the model",
    "optimize": "write a labelled folder as LitData chunks to stream from",
    "audit": "duplicates, leaks across the split, label issues and odd files in a labelled folder",
    "cv": "K-fold cross-validation: every fold trained, out-of-fold probabilities (oof.csv), mean ± sd",
    "compare": "whether models differ on the same labelled photos: intervals, paired difference, McNemar",
    "digits": "write scikit-learn's handwritten digits as an image folder (the demo's data)",
}


# Where each of sedense's own commands lives, imported only when it is run.
OWN_ENTRY = {
    "export": "sedense.deploy.export:export_command",
    "serve": "sedense.deploy.serve:serve_command",
    "optimize": "sedense.data.streaming:optimize_command",
    "compare": "sedense.compare:compare_command",
    "audit": "sedense.audit.command:audit_command",
    "cv": "sedense.crossval:cv_command",
    "digits": "sedense.data.digits:digits_command",
}


def own_command(name: str):
    """The entry point of one of sedense's own commands, imported when it is run."""
    module, function = OWN_ENTRY[name].split(":")
    return getattr(importlib.import_module(module), function)


def calibrate_args(argv: list[str]) -> list[str]:
    """``sedense calibrate`` is ``sedense validate`` that fits the calibration and writes it into the checkpoint."""
    if not any(a == "--ckpt_path" or a.startswith("--ckpt_path=") for a in argv) and not {"-h", "--help"} & set(argv):
        raise ConfigError("sedense calibrate needs --ckpt_path: a checkpoint of `sedense fit`, best or last")
    args = ["--calibration.target_precision" if a == "--target_precision" else
            a.replace("--target_precision=", "--calibration.target_precision=") for a in argv]
    return ["validate", "--calibration.update_checkpoint", "true", *args]


def overview() -> str:
    width = max(map(len, {**LIGHTNING, **OWN}))
    lines = ["usage: sedense COMMAND [options]", "",
             "Train, evaluate and run SE-DenseNet / DenseNet image classifiers.", "", "commands:"]
    lines += [f"  {name:<{width}}  {line}" for name, line in {**LIGHTNING, **OWN}.items()]
    lines += ["", "sedense COMMAND --help lists a command's options; --config FILE.yaml reads them from a file."]
    return "\n".join(lines)


def _stop(message: str, code: int) -> None:
    """End the command with one line on stderr (printed by the first process only)."""
    if rank_zero_only.rank == 0:
        print(f"sedense: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def _note(guard) -> str:
    """What an interrupted run kept, for the line that ends it."""
    return f"; {guard.note}" if guard is not None and guard.note else ""


def _thread_errors(args) -> None:
    """A background writer's full-disk error (TensorBoard's) reaches the main thread too: report it once, there."""
    if isinstance(args.exc_value, OSError) and args.exc_value.errno in STORAGE_ERRNOS:
        return
    threading.__excepthook__(args)


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``sedense`` command."""
    argv = list(sys.argv[1:] if args is None else args)
    guard = None  # a Lightning command's: what its run was doing when it stopped
    threading.excepthook = _thread_errors
    done = False
    try:
        if not argv or argv[0] in ("-h", "--help"):
            print(overview())
        elif argv[0] in OWN:
            own_command(argv[0])(argv[1:])
        elif argv[0] in LIGHTNING or argv[0].startswith("-"):  # LightningCLI's options before the subcommand
            from sedense.callbacks.run_guard import RunGuard
            from sedense.cli import cli_main

            guard = RunGuard()
            if argv[0] == "calibrate" and args is None:
                sys.argv[1:] = calibrate_args(argv[1:])  # LightningCLI reads the command line itself
            elif argv[0] == "calibrate":
                args = calibrate_args(argv[1:])
            cli_main(args, guard=guard)  # None: LightningCLI reads sys.argv itself
        else:
            raise SedenseError(f"unknown command {argv[0]!r}; the commands are {', '.join([*LIGHTNING, *OWN])} "
                               "(sedense --help says what each does)")
        done = True
    except SedenseError as err:
        _stop(f"error: {err}", err.exit_code)
    except KeyboardInterrupt as interrupt:
        _stop("interrupted" + (f"; {interrupt}" if str(interrupt) else _note(guard)), 130)
    except SystemExit as exit_:
        done = exit_.code in (0, None)
        if guard is not None and guard.interrupted and not done:  # Lightning ends an interrupted run with exit(1)
            _stop("interrupted" + _note(guard), 130)
        raise
    except OSError as err:
        if err.errno in STORAGE_ERRNOS:  # raised by a library (TensorBoard, fsspec) rather than through write_file
            folder = err.filename or (guard.folder if guard is not None else None) or os.getcwd()
            _stop(f"error: {StorageError(folder, err)}", 1)
        raise
    finally:
        if not done and guard is not None:
            guard.remove_if_unused()


if __name__ == "__main__":
    main()
