"""The command line both backbone converters share: --input, --output, a report, exit 0 / 1."""

import argparse
import sys

from official_maskrcnn.modeling.backbones.checkpoint import BackboneWeightsError


def main(argv, description, input_help, convert, summary, add_arguments=None, finish=None):
    """Parses `--input` / `--output`, runs `convert(input, output) -> report`, prints it.

    Args:
      argv: the arguments after the program name (None: sys.argv[1:]).
      description, input_help: the --help texts.
      convert: (input_path, output_prefix, **options) -> report dict with "checkpoint" (the
        written prefix); `options` are the flags `add_arguments` added, by their dest names.
      summary: report -> lines printed before "wrote <checkpoint>".
      add_arguments: optional parser -> None, adding a converter's own flags.
      finish: optional (report, **options) -> exit code, run after "wrote" (a converter's
        check of what it wrote); it may raise `BackboneWeightsError` too.
    Returns:
      the exit code: 0, or 1 after printing a `BackboneWeightsError` (the file and the problem),
      or what `finish` returns.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--input", required=True, help=input_help)
    parser.add_argument("--output", required=True, help="checkpoint prefix to write")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    options = {k: v for k, v in vars(args).items() if k not in ("input", "output")}
    try:
        report = convert(args.input, args.output, **options)
        for line in summary(report):
            print(line)
        print(f"wrote {report['checkpoint']}")
        return 0 if finish is None else finish(report, **options)
    except BackboneWeightsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
