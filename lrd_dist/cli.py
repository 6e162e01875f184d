"""``lrd-dist``: prepare data, train, evaluate and inspect LRD recommenders.

One module per command under ``lrd_dist/commands/``; this file only builds the parser and
dispatches. An ``InputError`` is printed as one line naming the file, the line or record and the
fix, and the exit code is 2; a training stopped for a signal (``Preempted``, its checkpoint written)
exits with the requeue code 75. Whatever the command, a process group it opened is closed here
before the interpreter exits (``release_process_group``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from lrd_dist.commands import COMMANDS
from lrd_dist.data.remote import TransientFetchError
from lrd_dist.errors import InputError
from lrd_dist.train.preemption import REQUEUE_EXIT_CODE, NonFiniteLoss, Preempted, PreemptionFlag

log = logging.getLogger("lrd_dist")


def command_module(name: str):
    return importlib.import_module(f"lrd_dist.commands.{name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lrd-dist",
        description="Distributed trainer for LLM-based relation-aware sequential recommendation (LRD).",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = command_module(name)
        sub = commands.add_parser(name, help=module.HELP, description=module.HELP)
        if hasattr(module, "add_arguments"):
            module.add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["launch"]:  # everything after is accelerate's and the launched command's
        return command_module("launch").launch(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for chatty in ("accelerate", "deepspeed", "DeepSpeed", "torch.distributed"):
        logging.getLogger(chatty).setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    completed = False
    try:
        command_module(args.command).run(args)
        completed = True
    except TransientFetchError as exc:  # a bad moment, not a bad input: let the scheduler run it again
        print(f"lrd-dist {args.command}: error: {exc}", file=sys.stderr)
        PreemptionFlag.announce()  # `lrd-dist launch` exits with the requeue code too
        return REQUEUE_EXIT_CODE
    except InputError as exc:
        print(f"lrd-dist {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Preempted as stop:
        log.warning("%s", stop)
        return REQUEUE_EXIT_CODE
    except NonFiniteLoss as stop:
        print(f"lrd-dist {args.command}: error: {stop}", file=sys.stderr)
        return NonFiniteLoss.EXIT_CODE
    finally:
        if "torch.distributed" in sys.modules:  # a command that never imported it opened no group
            from lrd_dist.runtime import release_process_group

            release_process_group(completed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
