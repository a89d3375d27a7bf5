"""Sub-commands of the ``fed-nessa`` CLI, one module each.

Each module exposes ``register(subparsers)``, which adds its parser and sets
``func(args) -> int`` as default. :mod:`fed_nessa.cli` discovers them, so a new
command never edits a shared file.
"""
