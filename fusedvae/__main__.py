"""Command line: ``python -m fusedvae <command>`` (also the ``fusedvae`` console script).

Commands:
    bench   time the loss forward+backward on CPU: eager PyTorch, torch.compile, fusedvae.
    demo    train small VAEs on scikit-learn data with vae_loss; write pictures and report.md.

Each command lives in its own module with ``add_arguments(parser)`` and
``main(argv)``; add one by adding it to ``_COMMANDS``. Only the module of the
command being run is imported (``python -m fusedvae --help`` imports none), so
one command's imports cannot break another.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

# name -> (module, one-line help). The module is imported only when needed.
_COMMANDS = {
    "bench": ("fusedvae.bench", "time forward+backward of the VAE loss on CPU: eager vs torch.compile vs fused"),
    "demo": ("fusedvae.demo", "train small VAEs on scikit-learn data with vae_loss; write pictures and report.md"),
}


def _parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported, to add its arguments."""
    parser = argparse.ArgumentParser(
        prog="python -m fusedvae",
        description="fusedvae: the VAE training objective in one fused forward and one fused backward.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"fusedvae {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="command", title="commands")
    for name, (module, help_text) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point: parse the command and hand its arguments to the command's ``main``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # The top-level options (--help, --version) take no value, so the first
    # argument that is not an option names the command.
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = _parser(command)
    args = parser.parse_args(argv)  # validates the arguments and serves --help
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    module = importlib.import_module(_COMMANDS[args.command][0])
    return int(module.main(argv[argv.index(args.command) + 1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
