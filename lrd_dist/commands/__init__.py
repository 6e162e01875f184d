"""The ``lrd-dist`` commands, one module each, in the order ``lrd-dist --help`` lists them.

Each module has ``HELP`` (its one line in ``--help``), ``add_arguments(parser)`` and
``run(args)``. Every command validates its input at this boundary: an ``InputError`` is printed as
one line naming the file, the line or record and the fix, and the exit code is 2.
"""

# What --help says of a config read back from a run or a weight file (lrd_dist.config.drop_acting).
STORED_NOTE = (
    " Read as data, as every config read back from a run or a weight file: a pipe: data.dir, "
    "train.callbacks and llm.trust_remote_code in it are ignored (give them as overrides)."
)

COMMANDS = (
    "demo",
    "prepare",
    "synth",
    "verify",
    "embed",
    "train",
    "launch",
    "export",
    "eval",
    "relations",
    "recommend",
)
