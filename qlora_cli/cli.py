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
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue the run from its latest checkpoint (weights, optimizer, scheduler, RNG, data).",
    )] = False,
    resume_from: Annotated[Path | None, typer.Option(
        "--resume-from", help="Continue the run from this checkpoint directory (or checkpoint-N of the run).",
    )] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Resume even though training fields of the recipe changed (they are listed).",
    )] = False,
    gpus: Annotated[int, typer.Option(
        "--gpus", min=1, help="Train on N GPUs of this machine (accelerate launch; see the recipe's distributed).",
    )] = 1,
) -> None:
    """Train a LoRA adapter on a 4-bit base model as the recipe says.

    With --dry-run: print the resolved recipe, parameter counts, a data summary and the first formatted
    example (the part that carries loss highlighted), reading no weights.

    Ctrl-C (SIGINT) or SIGTERM saves a checkpoint at the end of the current step, prints the command that
    resumes the run, and exits with 130 or 143.
    """
    import shlex

    from .commands import train as cmd
    from .recipe import load_recipe

    r = load_recipe(recipe, set_)
    if dry_run:
        cmd.dry_run(r, console)
        return
    if gpus > 1 and "LOCAL_RANK" not in os.environ:
        raise typer.Exit(cmd.launch(gpus, _argv_without_gpus(sys.argv[1:])))
    again = " ".join(["qlora train", shlex.quote(str(recipe)), *(f"--set {shlex.quote(s)}" for s in set_ or [])])
    cmd.train(r, console, overwrite=overwrite, resume=resume_from or resume, force=force, command=again)


@app.command()
def merge(
    path: Annotated[Path, typer.Argument(help="Run directory (or its adapter/ directory) written by qlora train.")],
    out: Annotated[Path, typer.Option("--out", help="Directory for the merged model (must not exist).")],
    base: Annotated[
        str | None, typer.Option("--base", help="Base model directory or hub id; default: the run's recipe.")
    ] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="Weights of the merged model: bf16, fp16 or fp32.")] = "bf16",
    max_shard_size: Annotated[
        str, typer.Option("--max-shard-size", help="Largest safetensors shard, e.g. 5GB or 500MB.")
    ] = "5GB",
    device: Annotated[
        str, typer.Option("--device", help="auto (GPU when it fits, else CPU), cpu or cuda.")
    ] = "auto",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out directory.")] = False,
) -> None:
    """Merge a run's LoRA adapter into its base model: a plain checkpoint for vLLM, TGI or llama.cpp.

    The base is reloaded in 16-bit (not the 4-bit weights of training), the adapter merged with PEFT, and the
    merged logits checked against base + adapter on a few prompts before sharded safetensors, config,
    tokenizer and a model card are written; the output appears only when complete.
    """
    from .commands import merge as cmd

    cmd.merge(path, out, base=base, dtype=dtype, max_shard_size=max_shard_size, device=device,
              overwrite=overwrite, console=console)


EvalPathArg = Annotated[Path, typer.Argument(help="Run directory, adapter directory or merged model directory.")]


@app.command("eval")
def eval_(
    path: EvalPathArg,
    data: Annotated[
        str | None, typer.Option("--data", help="Evaluate on this file (same columns as training) instead.")
    ] = None,
    recipe: Annotated[
        Path | None, typer.Option("--recipe", help="Take the data and evaluation sections from this recipe.")
    ] = None,
    split: Annotated[
        str, typer.Option("--split", help="eval (the recipe's held-out rows), train, or a hub split, e.g. test.")
    ] = "eval",
    compare_base: Annotated[
        bool, typer.Option("--compare-base", help="Also evaluate the untrained base, side by side.")
    ] = False,
    limit: Annotated[int | None, typer.Option(
        "--limit", help="Evaluate N rows sampled across the data (stratified by answer, seeded by training.seed)."
    )] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print the results as JSON on stdout.")] = False,
    set_: SetOpt = None,
) -> None:
    """Score a fine-tune: loss, perplexity and, for prompt -> answer data, accuracy and macro-F1.

    Rows are formatted as in training; answers are generated greedily and normalised as the recipe's
    evaluation section says (e.g. --set evaluation.lowercase=true). Results go to eval.json in the run
    directory, and the run's loss curve to loss.png.
    """
    import json

    from .commands import eval as cmd

    report = cmd.evaluate(path, recipe, data, split, compare_base=compare_base, limit=limit, overrides=set_,
                          console=err_console if json_ else console)
    if json_:
        typer.echo(json.dumps(report, indent=2))


@app.command()
def generate(
    path: EvalPathArg,
    prompt: Annotated[
        list[str] | None, typer.Option("--prompt", "-p", help="Prompt to answer (repeatable); none: interactive.")
    ] = None,
    max_new_tokens: Annotated[
        int | None, typer.Option("--max-new-tokens", help="Longest answer; default evaluation.max_new_tokens.")
    ] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Send prompts as typed, without the training format.")] = False,
    no_adapter: Annotated[
        bool, typer.Option("--no-adapter", help="Answer with the base model (the adapter switched off).")
    ] = False,
    set_: SetOpt = None,
) -> None:
    """Answer prompts with a fine-tune, formatted as in training, for a quick look at its outputs."""
    from .commands import eval as cmd

    cmd.generate_command(path, prompt, max_new_tokens=max_new_tokens, raw=raw, no_adapter=no_adapter,
                         overrides=set_, console=console)


@app.command()
def footprint(
    recipe: RecipeArg,
    set_: SetOpt = None,
    gpu: Annotated[list[str] | None, typer.Option(
        "--gpu", help="GPU to judge against, e.g. --gpu L4 (repeatable); default: T4, L4, RTX 4090, A100, H100."),
    ] = None,
    vram: Annotated[str | None, typer.Option("--vram", help="GPU memory to judge against, e.g. --vram 24GB.")] = None,
    max_batch: Annotated[bool, typer.Option(
        "--max-batch", help="Report the largest micro-batch that fits each GPU.")] = False,
    json_: Annotated[bool, typer.Option(
        "--json", help="Print the estimate, verdicts and suggestions as JSON.")] = False,
    measure: Annotated[bool, typer.Option(
        "--measure", help="On a CUDA GPU: run 2 training steps and print measured memory next to the estimate."),
    ] = False,
    gpus: Annotated[int, typer.Option(
        "--gpus", min=1, help="Per-GPU memory of a run on N GPUs (distributed.strategy: ddp or fsdp).")] = 1,
) -> None:
    """Estimate the GPU memory of a run before downloading weights: by component, with a verdict per GPU.

    Reads only the model's config (a local directory, or the shipped config of a known model). When the run
    does not fit the GPU named with --gpu or --vram, ranked changes to the recipe are listed with the total each
    gives. docs/footprint.md explains every term and how the estimate was checked against measured runs.
    """
    from .commands import footprint as cmd
    from .recipe import load_recipe

    r = load_recipe(recipe, set_)
    cmd.footprint(r, console, gpus=gpu, vram=vram, max_batch=max_batch, as_json=json_, measure=measure,
                  processes=gpus)


@app.command()
def export(
    path: Annotated[Path, typer.Argument(help="Run directory, adapter directory or merged model directory.")],
    out: Annotated[Path, typer.Option("--out", help="Directory to write (must not exist).")],
    format_: Annotated[str, typer.Option("--format", help="gguf (llama.cpp, Ollama, LM Studio) or hf (vLLM, TGI).")
                       ] = "gguf",
    quant: Annotated[str, typer.Option(
        "--quant", help="GGUF type: f16, bf16, f32, q8_0, q5_1, q5_0, q4_1 or q4_0 (K-quants: llama-quantize).")
    ] = "f16",
    base: Annotated[
        str | None, typer.Option("--base", help="Base model directory or hub id; default: the run's recipe.")
    ] = None,
    rows: Annotated[int, typer.Option("--rows", help="Held-out rows the GGUF is checked on.")] = 16,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out directory.")] = False,
) -> None:
    """Export a fine-tune for deployment: GGUF with an Ollama Modelfile, or merged safetensors for vLLM/TGI.

    A run or adapter is merged first (as qlora merge does). The GGUF is loaded back by transformers and, when
    llama-cpp-python is installed, by llama.cpp, and compared with the merged model on held-out rows (tokens,
    logits, greedy answers) before --out appears; a failed check leaves nothing there. docs/deploy.md has the
    serving commands.
    """
    from .commands import export as cmd

    cmd.export(path, out, fmt=format_, quant=quant, base=base, overwrite=overwrite, rows=rows, console=console)


def _argv_without_gpus(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--gpus":
            skip = True
        elif not a.startswith("--gpus="):
            out.append(a)
    return out


def run(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line and exit code 2 (130/143 when a signal stopped training, after
    its checkpoint); --debug shows the traceback. Typer turns a KeyboardInterrupt elsewhere into exit code 130."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        app(args=argv, prog_name="qlora")
    except UserError as e:
        if _debug or "--debug" in argv:
            raise
        label = "[bold red]error:[/]" if e.exit_code == UserError.exit_code else "[bold yellow]stopped:[/]"
        err_console.print(f"{label} {e.render()}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    run()
