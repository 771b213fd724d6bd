"""The house's layering: the app composes panes and widgets; they never import the app (they
receive a ViewState or post a message), so a new view is a new pane, not an edit of app.py."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

TUI = Path(__file__).resolve().parents[1] / "dualtui" / "tui"
PARTS = sorted([*TUI.glob("panes/*.py"), *TUI.glob("widgets/*.py")])


def _imports(path: Path) -> set[str]:
    """Every module a file imports, resolved against its package (TYPE_CHECKING blocks too)."""
    pkg = ["dualtui", "tui", path.parent.name]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = pkg[: len(pkg) - node.level + 1] if node.level else []
            out.add(".".join(base + ([node.module] if node.module else [])))
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


@pytest.mark.parametrize("path", PARTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_panes_and_widgets_never_import_the_app(path: Path) -> None:
    assert "dualtui.tui.app" not in _imports(path)


def test_importing_every_pane_leaves_the_app_unloaded() -> None:
    mods = [f"dualtui.tui.{p.parent.name}.{p.stem}" for p in PARTS if p.stem != "__init__"]
    code = "\n".join(f"import {m}" for m in mods) + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "dualtui.tui.app" not in set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_cli_modules_import_the_common_module_not_each_other() -> None:
    """cli_spotlight and cli_compare register commands on the app from cli_common; cli.py
    imports them (to register them), never the other way round."""
    cli = TUI.parent
    for name in ("cli_spotlight.py", "cli_compare.py", "cli_common.py"):
        assert "dualtui.cli" not in {m for m in _imports_pkg(cli / name)}, name


def _imports_pkg(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            out.add("dualtui." + (node.module or ""))
    return out
