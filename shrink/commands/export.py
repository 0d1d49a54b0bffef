"""shrink export CKPT: ONNX that matches the checkpoint, or exit 3."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from shrink.console import note, out, print_json


def register(app: typer.Typer) -> None:
    @app.command()
    def export(
        model: Annotated[str, typer.Argument(help="Checkpoint (plain or slim), alias or hub id.")],
        output: Annotated[Optional[Path], typer.Option("--output", "-o", help="ONNX file to write (default ./<model>.onnx).")] = None,
        opset: Annotated[int, typer.Option(help="ONNX opset.")] = 17,
        int8: Annotated[bool, typer.Option("--int8", help="Dynamic int8 quantization (onnxruntime); checked by agreement, not atol.")] = False,
        optimize: Annotated[bool, typer.Option("--optimize", help="onnxruntime transformer fusions, kept only if parity holds.")] = False,
        atol: Annotated[float, typer.Option(min=0, help="fp32 parity tolerance (max abs difference).")] = 1e-4,
        min_agreement: Annotated[float, typer.Option(min=0, max=1, help="int8: minimum top-1 agreement / embedding cosine.")] = 0.98,
        pooling_in_graph: Annotated[bool, typer.Option("--pooling-in-graph", help="Embedding models: the output is the pooled, normalized `sentence_embedding` (the model's own sentence-transformers pooling; mean for a plain model) instead of the token states.")] = False,
        sparse_onnx: Annotated[bool, typer.Option("--sparse-onnx", help="Store mostly-zero weights (unstructured pruning; those above 2/3 zeros) as ONNX sparse initializers: a smaller file (~3.3x per 90%-zero fp32 matrix), parity-gated; onnxruntime densifies them at load, so it runs no faster.")] = False,
        overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output file.")] = False,
        json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
    ) -> None:
        """Export to ONNX (dynamic batch/sequence) and check it against torch."""
        from shrink.commands import cli_errors

        with cli_errors(json_output):
            from shrink.errors import BadInputError
            from shrink.measure.export import check_opset, export_onnx
            from shrink.models.hub import display_name, load_model, load_tokenizer, resolve
            from shrink.models.slim import check_writable

            target = output or Path(f"{display_name(model)}{'-int8' if int8 else ''}.onnx")
            if target.suffix != ".onnx":
                raise BadInputError(f"-o {target}: the output file must end in .onnx")
            check_opset(opset)
            if sparse_onnx and int8:
                raise BadInputError("--sparse-onnx and --int8 together are not supported", hint="export the sparse graph in fp32")
            try:
                if target.exists() and not overwrite:
                    raise BadInputError(f"{target} exists", hint="pass --overwrite or choose another -o")
                if target.is_dir():
                    raise BadInputError(f"{target} is a directory", hint="-o names the .onnx file to write")
            except OSError as exc:  # e.g. a name too long for the file system
                raise BadInputError(f"cannot write to {target}: {exc.strerror or exc}", hint="choose another -o") from None
            check_writable(target)  # before any work: unwritable, read-only, /proc
            source = Path(resolve(model))
            if source.is_dir() and target.resolve().parent == source.resolve() and target.name in {p.name for p in source.iterdir()} and not overwrite:
                raise BadInputError(f"refusing to write over {target} in the input directory")
            loaded = load_model(model)
            pooling = None
            if pooling_in_graph:
                from shrink.arch import task_head
                from shrink.models.sentence import pooling_of

                if task_head(loaded) is not None:
                    raise BadInputError("--pooling-in-graph needs an embedding model; this one has a task head")
                if int8:
                    raise BadInputError("--pooling-in-graph and --int8 together are not supported", hint="export the pooled graph in fp32")
                pooling = pooling_of(loaded)
            try:
                tokenizer = load_tokenizer(model)
            except BadInputError:
                tokenizer = None  # parity then runs on random ids only
                note("note: no tokenizer found; parity is checked on random token ids only")
            report = export_onnx(
                loaded, target, opset=opset, optimize=optimize, int8=int8, atol=atol,
                min_agreement=min_agreement, tokenizer=tokenizer, overwrite=overwrite, pooling=pooling, sparse=sparse_onnx,
            )
            report["model"] = model
            if json_output:
                print_json(report)
                return
            from rich.markup import escape

            out.print(f"wrote [bold]{escape(report['path'])}[/bold] ({report['size_bytes'] / 2**20:.1f} MiB, {report['seconds']} s)")
            out.print(f"inputs {', '.join(report['inputs'])} -> outputs {', '.join(report['outputs'])}, opset {opset}")
            worst = max(report["max_abs_diff"].values())
            out.print(f"parity with torch: max abs diff {worst:.2e} over {len(report['max_abs_diff'])} input sets (tolerance {atol})")
            if optimize:
                out.print(f"optimized: {report.get('fused_ops') or report.get('optimize_skipped')}")
            if int8:
                out.print(f"int8 agreement with torch: {report['agreement']}")
            if sparse_onnx:
                out.print(f"{report['sparse']['sparse_initializers']} weights stored as sparse initializers (onnxruntime densifies them at load: same speed)")
