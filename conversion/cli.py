"""`armorm`: one console script, one sub-command per pipeline stage. It only parses and dispatches.

Each stage module defines `add_arguments(parser)` (flags only: defaults live in the stage function's signature,
their one home, so an absent flag is not passed at all) and `main(**kwargs)`, the importable function that does
the work and that tests call directly.
"""

import argparse
import importlib


COMMANDS = {
    "assemble": "conversion.assemble",
    "build": "conversion.build",
    "convert-rlhflow": "conversion.convert_rlhflow",
    "decorrelate": "conversion.decorrelate",
    "extract": "conversion.extract",
    "fit": "conversion.fit",
    "gate": "conversion.gate",
    "push": "conversion.push",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="armorm", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(
            name,
            help=module.__doc__.splitlines()[0],
            description=module.__doc__,
            argument_default=argparse.SUPPRESS,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(sub)
        sub.set_defaults(_main=module.main)
    return parser


def main(argv: list[str] | None = None) -> None:
    # Returns nothing: the console script passes the return value to `sys.exit`, where anything but None fails.
    args = vars(build_parser().parse_args(argv))
    args.pop("command")
    args.pop("_main")(**args)


if __name__ == "__main__":
    main()
