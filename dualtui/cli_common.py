"""What every `dualtui` command module shares: the Typer app, error mapping to exit codes,
stdout/stderr consoles, opening a bundle, strict JSON. The command modules (cli.py,
cli_spotlight.py, cli_compare.py) import this one and never each other's internals in a circle."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable

import typer

from .exit_codes import ExitCode
from .terminal import SafeConsole, literal


def _flags_as_flags() -> None:
    """Typer 0.29's help shows a type for every option, flags too (`--json <bool>`); a flag
    takes no value, so it gets none. Guarded: a Typer without this hook is left alone."""
    option = getattr(getattr(typer, "core", None), "TyperOption", None)
    show = getattr(option, "display_type_rich", None)
    if option is None or show is None:
        return

    def display_type_rich(self: Any, ctx: Any) -> Any:
        return None if getattr(self, "is_flag", False) else show(self, ctx)

    option.display_type_rich = display_type_rich


_flags_as_flags()

app = typer.Typer(
    name="dualtui",
    help="Spotlights of attention: which training patterns a trained network uses for a prediction.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
record_app = typer.Typer(help="Train a built-in experiment and record its exact dual form.", no_args_is_help=True)
app.add_typer(record_app, name="record")


class UsageError(Exception):
    """Bad arguments that the type system could not catch (exit code 2)."""


def _stderr() -> Any:
    return SafeConsole(stderr=True, highlight=False)


def _stdout() -> Any:
    # Piped output is data: never squeeze a table to a guessed 80 columns.
    console = SafeConsole(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 240)
    if _APPROXIMATE and not _APPROXIMATE[0].get("said"):
        # a table of an approximate bundle starts by saying so (stderr alone is lost in `> file`)
        _APPROXIMATE[0]["said"] = True
        console.print(_APPROXIMATE[0]["label"], style="yellow", markup=False)
    return console


def fail(code: ExitCode, message: str) -> None:
    """Print one line to stderr and exit with `code`."""
    print(f"dualtui: error: {literal(message)}", file=sys.stderr)
    raise typer.Exit(int(code))


def handles_errors(fn: Callable) -> Callable:
    """Map every expected failure to one stderr line and a documented exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from .bundle.errors import BundleError
        from .bundle.writer import OutputError
        from .record.errors import RecorderError

        _APPROXIMATE.clear()  # one command at a time (tests run several in one process)
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except BundleError as e:
            fail(ExitCode.INVALID_BUNDLE, str(e))
        except OutputError as e:
            fail(ExitCode.OUTPUT, str(e))
        except RecorderError as e:  # a recording that cannot stay exact stops with its reason
            fail(ExitCode.CHECK_FAILED, str(e))
        except UsageError as e:
            fail(ExitCode.USAGE, str(e))
        except KeyboardInterrupt as e:
            signum = getattr(e, "signum", None)
            print(f"dualtui: interrupted{f' ({e})' if signum else ''}", file=sys.stderr)
            raise typer.Exit(128 + signum if signum else int(ExitCode.INTERRUPTED))
        except MemoryError:
            fail(ExitCode.CHECK_FAILED, "out of memory")
        except OSError as e:
            fail(ExitCode.INVALID_BUNDLE, f"{getattr(e, 'filename', None) or ''}: {e.strerror or e}".lstrip(": "))

    return wrapper


def _open(path: Path) -> Any:
    """Open and check a bundle before any command uses it: structure, and the contents of
    every tensor but the per-pattern ones, which the engine checks as it streams them."""
    from .bundle import Bundle

    b = Bundle.open(path)
    b.validate_small()
    from .dual_form import label, marker

    if b.manifest.approximate:  # said by every command, on stderr so that CSV and JSON stay parseable
        print(f"dualtui: {label(b.manifest)}", file=sys.stderr)
        _APPROXIMATE.append({"marker": marker(b.manifest), "label": label(b.manifest)})
    return b


# The dual_form marker of the approximate bundle this command opened (dual_form.marker).
_APPROXIMATE: list[dict] = []


def _emit_json(obj: Any) -> None:
    """Strict JSON (RFC 8259): a NaN or infinity that reached here is written as null, never as
    the bare NaN that jq and other strict parsers reject. The output of an approximate bundle
    says so (`dual_form`)."""
    if _APPROXIMATE and isinstance(obj, dict) and "dual_form" not in obj:
        obj = {**obj, "dual_form": _APPROXIMATE[0]["marker"]}
    try:
        text = json.dumps(obj, indent=2, allow_nan=False)
    except ValueError:
        text = json.dumps(_finite_or_null(obj), indent=2, allow_nan=False)
    sys.stdout.write(text + "\n")


def _finite_or_null(obj: Any) -> Any:
    import math

    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_null(v) for v in obj]
    return obj
