"""The ``rasfx`` command line: ``rasfx inspect MODEL`` shows what the compiler did to a model.

Exit codes: 0 success; 1 the model could not be loaded, captured or transformed (e.g.
``rasfx.UnsupportedModelError``), or an external tool is missing; 2 usage errors (unknown
MODEL, stage, format, option value, or a filter that matches nothing). User errors print
one ``rasfx: error: ...`` message, never a traceback (``--debug`` shows it).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import ExplainError, RasfxError, ToolMissingError, UsageError
from .loading import (
    CONFIG_CLASSES, LoadedModel, ModelLoadError, capture_model, dist_version, load_model, should_build_on_meta,
)

__all__ = ["CONFIG_CLASSES", "LoadedModel", "ModelLoadError", "UsageError", "capture_model", "load_model", "main",
           "should_build_on_meta"]

PROG = "rasfx"
KV_CACHE_OFF = "kv_cache off (--no-kv-cache): active queries attend to the active tokens only"


# ===================================================================================== versions


def version_string() -> str:
    from . import __version__

    return f"rasfx {__version__} (torch {dist_version('torch')}, diffusers {dist_version('diffusers')}, " \
           f"Python {sys.version.split()[0]})"


# ===================================================================================== argparse


EPILOG_INSPECT = """\
MODEL is one of:
  a preset name                 sd3-tiny, flux-tiny, wan-tiny ... (see rasfx presets)
  a diffusers model folder      path/to/transformer (or a pipeline folder, or its config.json);
                                random weights when no weights file is present; built on the
                                meta device with --meta or when the weights would not fit in RAM;
                                classes: SD3, Flux, PixArt, DiT, Sana, Wan, AuraFlow, CogView4
                                transformers (see rasfx presets); text length: --text-tokens,
                                else an encoder_hidden_states tensor stored in a .safetensors
                                file next to the weights, else the pipeline's default
  package.module:factory        a function returning (model, example_kwargs); it receives
                                height/width/batch/seed/frames/text_tokens when it accepts them

examples:
  rasfx inspect sd3-tiny                                  summary of the transformed graph
  rasfx inspect flux-tiny --format text --module transformer_blocks.0
  rasfx inspect sd3-tiny --format text --op attention     the attention nodes after the rewrite
  rasfx inspect sd3-tiny --diff analyzed transformed      what the rewrite passes changed
  rasfx inspect wan-tiny --format html -o wan.html        standalone page (inline SVG with Graphviz)
  rasfx inspect sd3-tiny --format svg --module transformer_blocks.1 -o block1.svg
  rasfx inspect ./my-sd3-transformer --meta --ratio 0.3   a real config, shapes only
  rasfx inspect mypkg.models:make_model --format json > graph.json

exit codes: 0 ok, 1 model error (cannot build / capture / transform), 2 usage error
"""

EPILOG_MAIN = """\
commands:
  inspect MODEL   show what the compiler did to a model (rasfx inspect --help)
  presets         list the tiny presets and the diffusers classes a config can name

examples:
  rasfx inspect sd3-tiny
  rasfx inspect flux-tiny --diff analyzed transformed --format text
  rasfx presets
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # usage errors: one message, exit code 2
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from .stages import FORMATS, STAGES, VARIANTS

    parser = _Parser(prog=PROG, description="rasfx: region-adaptive sampling for diffusion transformers, "
                                            "as an fx compiler.",
                     epilog=EPILOG_MAIN, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=version_string())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("inspect", help="show what the compiler did to a model",
                       description="Capture MODEL for one input signature (the forward is not run) and show one\n"
                                   "stage of the compiler: the captured graph, the token analysis and region plan,\n"
                                   "the transformed graph, or the difference between two stages.",
                       epilog=EPILOG_INSPECT, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="preset name, diffusers model folder or config.json, "
                                                  "or package.module:factory")
    g = p.add_argument_group("what to show")
    g.add_argument("--stage", choices=STAGES, default=None,
                   help="compiler stage (default: transformed; fused: with the Triton gather/scatter GeMM fusion; "
                        "lowered: what torch.compile receives, cache ops as in-place ATen writes)")
    g.add_argument("--variant", choices=VARIANTS, default="shared",
                   help="graph variant of the transformed and lowered stages: shared (one active set, default), rowwise "
                        "(one per batch row), dense")
    g.add_argument("--diff", nargs=2, metavar=("A", "B"), default=None,
                   help="nodes added/removed/changed from stage A to stage B, grouped by pass")
    g.add_argument("--format", choices=FORMATS, default="summary",
                   help="summary (default), text (one line per node), json, dot, svg (needs Graphviz dot), html")
    g.add_argument("-o", "--output", metavar="FILE", default=None, help="write to FILE instead of stdout")
    g.add_argument("--module", metavar="PREFIX", default=None,
                   help="only nodes under this module path (component prefix: transformer_blocks.3)")
    g.add_argument("--op", metavar="SUBSTR", default=None,
                   help="only nodes whose op contains SUBSTR (attention: sdpa and rasfx::ras_attention)")
    g.add_argument("--ratio", type=float, default=0.25, help="share of active tokens for the estimates (default 0.25)")
    g.add_argument("--color", action=argparse.BooleanOptionalAction, default=None,
                   help="colour the text output (default: only on a terminal; NO_COLOR disables)")
    g.add_argument("--no-timings", dest="timings", action="store_false",
                   help="leave out capture timings (reproducible output)")
    g.add_argument("--all-nodes", action="store_true",
                   help="dot/svg/html: draw every node (default: a whole graph as one box per module, blocks "
                        "like the one before as one box; a part (--module, --op) node by node, views folded)")
    m = p.add_argument_group("model inputs")
    m.add_argument("--height", type=int, default=None, help="image input height (latent pixels; packed grid for Flux)")
    m.add_argument("--width", type=int, default=None, help="image input width")
    m.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    m.add_argument("--frames", type=int, default=None, help="latent frames of a video model config (default 21)")
    m.add_argument("--text-tokens", type=int, default=None,
                   help="text tokens of a model config's inputs (default: the conditioning stored next to the "
                        "weights, else the pipeline's default)")
    m.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs (default 0)")
    m.add_argument("--meta", action="store_true", help="build the model on the meta device (shapes only, no weights)")
    m.add_argument("--image-input", metavar="NAME", default=None, help="forward argument carrying the image tokens")
    m.add_argument("--kv-cache", action=argparse.BooleanOptionalAction, default=True,
                   help="attention reads cached keys/values of inactive tokens (default); --no-kv-cache: "
                        "the paper's ablation, attention over the active tokens only")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks of errors")
    p.add_argument("--version", action="version", version=version_string())

    sub.add_parser("presets", help="list presets and supported config classes",
                   description="List the tiny presets (MODEL names) and the diffusers classes whose inputs "
                               "rasfx inspect builds from a config.json.",
                   epilog="example:\n  rasfx presets", formatter_class=argparse.RawDescriptionHelpFormatter)
    return parser


def _explanation(args):
    from .explain import Explanation, describe_inputs

    loaded, cc = capture_model(args.model, height=args.height, width=args.width, batch=args.batch, seed=args.seed,
                               meta=args.meta, frames=args.frames, text_tokens=args.text_tokens,
                               image_input=args.image_input, kv_cache=args.kv_cache)
    stage = args.diff[0] if args.diff else (args.stage or "transformed")
    return Explanation(cc, stage=stage, variant=args.variant, ratio=args.ratio, module=args.module, op=args.op,
                       model_name=loaded.name, model_class=type(loaded.model).__name__, source=loaded.source,
                       inputs=describe_inputs(loaded.inputs),
                       notes=loaded.notes + (() if args.kv_cache else (KV_CACHE_OFF,)))


def _use_color(args) -> bool:
    if args.color is not None:
        return args.color
    if args.output or os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    return sys.stdout.isatty()


def _cmd_inspect(args) -> int:
    from .stages import STAGES

    if args.diff:
        if args.stage:
            raise UsageError("--diff A B and --stage are exclusive (the diff names both stages)")
        for s in args.diff:
            if s not in STAGES:
                raise UsageError(f"--diff: unknown stage {s!r} (choose from {', '.join(STAGES)})")
        if args.format in ("dot", "svg"):
            raise UsageError("--diff writes summary, text, json or html, not " + args.format)
    if not (0.0 < args.ratio <= 1.0):
        raise UsageError(f"--ratio must be in (0, 1], got {args.ratio}")
    if args.format == "svg":
        import shutil

        from .explain import DOT_BINARY_HINT

        if shutil.which("dot") is None:  # before the (slow) capture
            raise ToolMissingError(f"--format svg needs Graphviz's `dot` program, which is not on PATH: {DOT_BINARY_HINT}")
    exp = _explanation(args)
    exp.check_filters()
    color = _use_color(args)
    fmt = args.format
    if args.diff:
        d = exp.diff(args.diff[1], args.variant)
        out = {"summary": lambda: d.summary(color=color), "text": lambda: d.text(color=color),
               "json": d.to_json, "html": lambda: exp.with_stage(args.diff[1]).to_html(
                   diff=d, timings=args.timings, all_nodes=args.all_nodes)}[fmt]()
    else:
        out = {"summary": lambda: exp.summary(timings=args.timings, color=color),
               "text": lambda: exp.text(color=color),
               "json": lambda: exp.to_json(timings=args.timings),
               "dot": lambda: exp.to_dot(all_nodes=args.all_nodes),
               "svg": lambda: exp.to_svg(all_nodes=args.all_nodes),
               "html": lambda: exp.to_html(timings=args.timings, all_nodes=args.all_nodes)}[fmt]()
    _write(out, args.output)
    return 0


def _write(text: str, path: str | None) -> None:
    if path is None or path == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    try:
        Path(path).write_text(text, encoding="utf-8")
    except OSError as e:
        raise ModelLoadError(f"cannot write {path}: {e.strerror or e}") from None
    print(f"rasfx: wrote {path} ({len(text.encode('utf-8'))} bytes)", file=sys.stderr)


def _cmd_presets(args) -> int:
    from .presets import PRESETS

    lines = ["presets (rasfx inspect NAME):"]
    width = max(len(n) for n in PRESETS)
    for name, p in PRESETS.items():
        lines.append(f"  {name:<{width}}  {p.description}")
        if p.known_failure is not None:
            lines.append(f"  {'':<{width}}  UNSUPPORTED: {p.known_failure.reason}")
    lines.append("")
    lines.append("diffusers classes a config.json may name (inputs built from the config):")
    width = max(len(n) for n in CONFIG_CLASSES)
    for name, info in CONFIG_CLASSES.items():
        lines.append(f"  {name:<{width}}  {info.describe()}")
    _write("\n".join(lines) + "\n", None)
    return 0


def main(argv: list | None = None) -> int:
    """Console entry point (``rasfx``). Returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    debug = getattr(args, "debug", False) or bool(os.environ.get("RASFX_DEBUG"))
    prog = f"{PROG} {args.command}"
    try:
        if args.command == "presets":
            return _cmd_presets(args)
        return _cmd_inspect(args)
    except (UsageError, ExplainError) as e:
        if debug:
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except RasfxError as e:  # ModelLoadError, ToolMissingError, UnsupportedModelError...
        if debug:
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. | head
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except Exception as e:  # a bug: say so in one line; --debug shows the traceback
        if debug:
            raise
        first = (str(e).strip().splitlines() or [""])[0]
        print(f"{prog}: error: internal error ({type(e).__name__}): {first} (run with --debug for the full message)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
