"""shrink recipes: list the built-in recipes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..console import out, print_json

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


def builtin_recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.yaml"))}


def register(app: typer.Typer) -> None:
    @app.command()
    def recipes(
        json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
    ) -> None:
        """List the built-in recipes."""
        from ..cli import cli_errors

        with cli_errors():
            import yaml

            found = {}
            for name, path in builtin_recipes().items():
                data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
                found[name] = data.get("description", "")
            if json_output:
                print_json({"recipes": found})
            elif not found:
                out.print("no built-in recipes yet")
            else:
                for name, description in found.items():
                    out.print(f"[bold]{name}[/bold]  {description}")
