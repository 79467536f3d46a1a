"""The command line both backbone converters share: --input, --output, a report, exit 0 / 1."""

import argparse
import sys

from official_maskrcnn.modeling.backbones.checkpoint import BackboneWeightsError


def main(argv, description, input_help, convert, summary):
    """Parses `--input` / `--output`, runs `convert(input, output) -> report`, prints it.

    Args:
      argv: the arguments after the program name (None: sys.argv[1:]).
      description, input_help: the --help texts.
      convert: (input_path, output_prefix) -> report dict with "checkpoint" (the written prefix).
      summary: report -> lines printed before "wrote <checkpoint>".
    Returns:
      the exit code: 0, or 1 after printing a `BackboneWeightsError` (the file and the problem).
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--input", required=True, help=input_help)
    parser.add_argument("--output", required=True, help="checkpoint prefix to write")
    args = parser.parse_args(argv)
    try:
        report = convert(args.input, args.output)
    except BackboneWeightsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for line in summary(report):
        print(line)
    print(f"wrote {report['checkpoint']}")
    return 0
