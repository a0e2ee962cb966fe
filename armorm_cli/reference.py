"""The command-line reference (`docs/cli.md`), generated from the settings dataclasses, the one home of every flag.

    python -m armorm_cli.reference > docs/cli.md

A test keeps `docs/cli.md` equal to what this prints, so the page can never drift from the flags.
"""

import dataclasses
import typing

from armorm_cli.cli import COMMANDS
from modeling_armorm.settings import fields_in_order, is_list_type


__all__ = ["flags_table", "reference"]


def flags_table(command: str) -> str:
    """The markdown table of `command`'s flags (flag, default, meaning), from its settings dataclasses. `armorm build`
    lists its own flags; each stage's settings follow it as `--<stage>-<name>`."""
    module = COMMANDS[command]
    lines = ["| flag | default | meaning |", "|---|---|---|"]
    for config_class in module.ARGUMENTS[:1] if command == "build" else module.ARGUMENTS:
        hints = typing.get_type_hints(config_class)
        for field in fields_in_order(config_class):
            if field.default is not dataclasses.MISSING:
                default = "—" if field.default is None else f"`{_flag_value(field.default)}`"
            elif field.default_factory is not dataclasses.MISSING:
                default = f"`{_flag_value(field.default_factory())}`"
            else:
                default = "required"
            flag = f"`--{field.name.replace('_', '-')}`"
            if is_list_type(hints[field.name]):
                flag += " …"
            lines.append(f"| {flag} | {default} | {field.metadata.get('help', '')} |")
    renamed = getattr(module, "RENAMED_FLAGS", {})
    for old, new in renamed.items():
        lines.append(f"| `--{old}` | | Deprecated name of `--{new}`. |")
    return "\n".join(lines)


def _flag_value(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def reference() -> str:
    """docs/cli.md: every command with its first docstring line and its flags table."""
    parts = [
        "# Command-line reference",
        "",
        "Generated from the settings dataclasses by `python -m armorm_cli.reference > docs/cli.md`; a test keeps this",
        "page equal to the code. Every command also prints its own help: `armorm COMMAND --help`.",
    ]
    for name, module in sorted(COMMANDS.items()):
        parts += ["", f"## `armorm {name}`", "", module.__doc__.strip().splitlines()[0], "", flags_table(name)]
        if name == "build":
            parts += [
                "",
                "Each stage's settings follow as `--<stage>-<name>` (`--extract-batch-size`, `--gate-steps`, …).",
            ]
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    print(reference(), end="")
