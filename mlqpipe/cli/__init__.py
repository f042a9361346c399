"""The `mlqpipe` command: commandline.py parses arguments and maps errors to exit codes; commands.py and
show.py do and print what each command asks."""

from mlqpipe.cli.commandline import main

__all__ = ["main"]
