"""The `qlora` command line: one function per subcommand, and the renderer of user errors."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from .errors import UserError

app = typer.Typer(
    help="Fine-tune large language models with QLoRA from a YAML recipe.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
console = Console()
err_console = Console(stderr=True)
_debug = False

RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file, e.g. recipes/tiny-demo.yaml.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a recipe key, e.g. --set training.learning_rate=1e-4 (repeatable)."),
]


@app.callback()
def main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for every error.")] = False) -> None:
    global _debug
    _debug = debug
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _quiet_libraries()


def _quiet_libraries() -> None:
    """Silence library chatter that says nothing to a user of this tool."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=".*Paged optimizers are not supported on CPU.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


@app.command()
def train(
    recipe: RecipeArg,
    set_: SetOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check everything without loading weights.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing run directory.")] = False,
) -> None:
    """Train a LoRA adapter on a 4-bit base model as the recipe says.

    With --dry-run: print the resolved recipe, parameter counts, a data summary and the first formatted
    example (the part that carries loss highlighted), reading no weights.
    """
    from .commands import train as cmd
    from .recipe import load_recipe

    r = load_recipe(recipe, set_)
    if dry_run:
        cmd.dry_run(r, console)
    else:
        cmd.train(r, console, overwrite=overwrite)


def run() -> None:
    """Entry point: user errors become one message and exit code 2; --debug shows the traceback."""
    try:
        app()
    except UserError as e:
        if _debug or "--debug" in sys.argv:
            raise
        err_console.print(f"[bold red]error:[/] {e.render()}", highlight=False)
        sys.exit(UserError.exit_code)


if __name__ == "__main__":
    run()
