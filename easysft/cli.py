"""`easysft train|eval|infer|chat|prepare|export`: parse flags -> typed configs -> one library call.

Each subcommand lives in ``easysft/commands/<name>.py`` with ``add_arguments(parser)`` and ``run(values)``,
imported only when used so that ``--help`` and flag errors stay fast (no torch/peft/deepspeed import).

The original design's command lines keep working: with no subcommand, ``easysft --data_path ...`` means
``easysft train --data_path ...``. ``--config run.yaml`` supplies the same keys as flags; flags given on the
command line override it. Every :class:`~easysft.errors.EasySFTError` becomes one ``easysft: error: ...`` line
on stderr and the error's exit code (docs/failures.md, "Exit codes").
"""

from __future__ import annotations

import argparse
import importlib
import sys

from easysft.errors import EasySFTError

COMMANDS = {
    "train": ("easysft.commands.train", "Fine-tune a model on prompt/answer data."),
    "eval": ("easysft.commands.evaluate", "Perplexity of a model on a data split (one JSON line on stdout)."),
    "infer": ("easysft.commands.infer", "Batched generation over a dataset into CSV/JSONL."),
    "chat": ("easysft.commands.chat", "Interactive multi-turn chat, or one answer with --prompt."),
    "prepare": ("easysft.commands.prepare", "Tokenize and cache a dataset; print the data report."),
    "export": ("easysft.commands.export", "Export a model (merge a LoRA adapter into a full checkpoint)."),
    "dashboard": ("easysft.commands.dashboard", "Local web page: runs, live curves, data report, predictions, chat."),
    "env": ("easysft.commands.env", "Versions, machine and the defaults a run takes here (for bug reports)."),
}


def _command_module(name: str):
    return importlib.import_module(COMMANDS[name][0])


def build_parser(command: str) -> argparse.ArgumentParser:
    module = _command_module(command)
    parser = argparse.ArgumentParser(prog=f"easysft {command}", description=COMMANDS[command][1],
                                     argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="YAML file whose keys are flag names; command-line flags override it.")
    module.add_arguments(parser)
    return parser


def parse_values(command: str, argv: list[str]) -> dict:
    """Flags given on the command line merged over ``--config`` values (only the keys actually set)."""
    from easysft.config import load_yaml_config

    parser = build_parser(command)
    given = vars(parser.parse_args(argv))
    config_path = given.pop("config", None)
    values: dict = {}
    if config_path:
        valid = {a.dest for a in parser._actions if a.dest not in ("help", "config")}
        values.update(load_yaml_config(config_path, valid))
    values.update(given)
    return values


def _top_level_help() -> str:
    lines = ["usage: easysft {" + ",".join(COMMANDS) + "} [flags]", "", "commands:"]
    lines += [f"  {name:<9} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "Run `easysft <command> --help` for its flags. With no command, `train` is assumed."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The deepspeed launcher inserts `--local_rank=N` BEFORE the script's own arguments (`easysft --local_rank=0
    # train ...`): move it behind the subcommand so `train` is still recognised.
    while argv and "=" in argv[0] and argv[0].split("=", 1)[0] in ("--local_rank", "--local-rank"):
        argv = argv[1:] + argv[:1]
    if argv and argv[0] in ("-h", "--help"):
        print(_top_level_help())
        return 0
    if argv and argv[0] == "--version":
        from easysft import __version__

        print(__version__)
        return 0
    command = argv[0] if argv and argv[0] in COMMANDS else "train"
    rest = argv[1:] if argv and argv[0] in COMMANDS else argv
    if argv and not argv[0].startswith("-") and argv[0] not in COMMANDS:
        print(f"easysft: error: unknown command {argv[0]!r}; choose one of: {', '.join(COMMANDS)}.", file=sys.stderr)
        return 2
    try:
        values = parse_values(command, rest)
        return int(_command_module(command).run(values) or 0)
    except EasySFTError as exc:
        print(f"easysft: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("easysft: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
