"""Book runner (the book issue fills this module)."""

import argparse


def add_book_command(sub: "argparse._SubParsersAction") -> None:
    """Register ``fasterkd book`` (filled by the book issue)."""
