"""Training engine (the training issue fills this module)."""

import argparse


def add_train_commands(sub: "argparse._SubParsersAction") -> None:
    """Register train/search/eval/predict/export (filled by the training issue)."""
