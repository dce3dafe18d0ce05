"""Test-wide settings: nothing in the suite may reach the network; a broken install stops the run in one line."""

import os

import pytest

from core.errors import environment_problem

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_sessionstart(session: pytest.Session) -> None:
    problem = environment_problem()
    if problem:
        pytest.exit(problem, returncode=2)
