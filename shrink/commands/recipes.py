"""shrink recipes [NAME]: list the built-in recipes, or show one with every option and its default."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from shrink.console import out, print_json


def describe_recipe(name: str) -> dict:
    """A recipe's steps with the full option and target values (defaults filled in) and their help."""
    from shrink.methods.catalog import get_method
    from shrink.prune.recipe import load_recipe

    recipe = load_recipe(name)
    steps = []
    for step in recipe.steps:
        method = get_method(step.method)
        fields = {}
        for part, model in (("target", method.target), ("options", method.options)):
            for key, info in model.model_fields.items():
                fields[f"{part}.{key}"] = {
                    "value": getattr(step, part).get(key),
                    "default": None if info.is_required() else info.get_default(call_default_factory=True),
                    "help": info.description or "",
                }
        steps.append({"method": step.method, "description": method.description, "fields": fields})
    return {"name": recipe.name, "description": recipe.description, "expected_time": recipe.expected_time,
            "file": recipe.source, "steps": steps}


def register(app: typer.Typer) -> None:
    @app.command()
    def recipes(
        name: Annotated[Optional[str], typer.Argument(help="Show this recipe's steps and options.")] = None,
        json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
    ) -> None:
        """List the built-in recipes, or show one recipe's steps with options and defaults."""
        from shrink.commands import cli_errors

        with cli_errors(json_output):
            if name is not None:
                detail = describe_recipe(name)
                print_json(detail) if json_output else show_recipe(detail)
                return
            import yaml

            from shrink.prune.recipe import builtin_recipes

            found = {}
            for recipe_name, path in builtin_recipes().items():
                data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
                found[recipe_name] = data.get("description", "")
            if json_output:
                print_json({"recipes": found})
            elif not found:
                out.print("no built-in recipes")
            else:
                for recipe_name, description in found.items():
                    out.print(f"[bold]{recipe_name}[/bold]  {description}")


def show_recipe(detail: dict) -> None:
    from rich.table import Table

    out.print(f"[bold]{detail['name']}[/bold]  {detail['description']}")
    if detail["expected_time"]:
        out.print(f"expected time: {detail['expected_time']}")
    out.print(f"file: {detail['file']}")
    for i, step in enumerate(detail["steps"]):
        table = Table(title=f"step {i}: {step['method']} ({step['description']})", show_edge=False, title_justify="left")
        for col in ("key", "value", "default", "meaning"):
            table.add_column(col)
        for key, field in step["fields"].items():
            table.add_row(f"steps.{i}.{key}", repr(field["value"]), repr(field["default"]), field["help"])
        out.print(table)
