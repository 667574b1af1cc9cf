"""Repository-relative locations (no machine-specific paths)."""

import os

TOOL_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tools/fixture-gen
REPO_ROOT = os.path.dirname(os.path.dirname(TOOL_DIR))
FIXTURES_DIR = os.path.join(REPO_ROOT, "tests", "fixtures")
# Mipha-style tokenizer files (phi-2 vocab/merges + Mipha's pad settings), copied into new checkpoints.
TOKENIZER_FILES_SRC = os.path.join(FIXTURES_DIR, "tiny-a", "checkpoint")
# tokenizer.json built with the `tokenizers` library, for the cross-check.
TOKENIZER_JSON = os.path.join(REPO_ROOT, "assets", "phi2-tokenizer", "tokenizer.json")


def rel(path):
    """Path relative to the repository root, with forward slashes (for committed metadata)."""
    return os.path.relpath(os.path.abspath(path), REPO_ROOT).replace(os.sep, "/")
