"""The docs run: docs/finetune.md's commands, in order, as a new user would type them.

A page's fenced blocks are its script: `bash` blocks run in bash (-euo pipefail), `python` blocks in
this interpreter, and a block whose info string carries `title="NAME"` (a TOML file to save) is
written to NAME; `sh` blocks (the full-scale commands) and `text` blocks (what a command printed) are
shown only. Everything runs in one fresh directory with the project's venv first on PATH.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
TITLE = re.compile(r'title="([^"]+)"')


@dataclass(frozen=True)
class Block:
    language: str
    title: str | None
    code: str
    line: int  # where it starts in the page, for failure messages


def blocks(text: str) -> list[Block]:
    found = []
    for match in FENCE.finditer(text):
        title = TITLE.search(match.group(2))
        line = text.count("\n", 0, match.start()) + 1
        found.append(Block(match.group(1), title.group(1) if title else None, match.group(3), line))
    return found


def run_page(page: Path, directory: Path) -> list[str]:
    """Run every runnable block of `page` in `directory`; returns each run block's output."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("COLUMNS", None)
    outputs = []
    for block in blocks(page.read_text()):
        if block.title:
            (directory / block.title).write_text(block.code)
            continue
        if block.language == "bash":
            command = ["bash", "-euo", "pipefail", "-c", block.code]
        elif block.language == "python":
            command = [sys.executable, "-c", block.code]
        else:
            continue
        result = subprocess.run(command, cwd=directory, env=env, capture_output=True, text=True, timeout=600)
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"{page.name} line {block.line}:\n{block.code}\n---\n{output[-4000:]}"
        outputs.append(output)
    return outputs


def test_blocks_are_read_as_documented():
    page = 'text\n```bash\necho a\n```\n```toml title="f.toml"\nk = 1\n```\nmore\n```sh\nnot run\n```\n'
    parsed = [(b.language, b.title, b.code, b.line) for b in blocks(page)]
    assert parsed == [("bash", None, "echo a\n", 2), ("toml", "f.toml", "k = 1\n", 5), ("sh", None, "not run\n", 9)]


@pytest.mark.slow
def test_finetune_walkthrough_runs_and_trains(tmp_path):
    """From a folder of books and one of captioned videos to a fine-tuned, evaluated, exported model."""
    outputs = run_page(REPO / "docs" / "finetune.md", tmp_path)
    run = tmp_path / "run"
    assert (run / "export" / "model.safetensors").exists() and (run / "export" / "vision.safetensors").exists()
    assert (run / "loss.png").stat().st_size > 0
    losses = dict(re.findall(r"^(\S+)\s+LlamaForCausalLM: held-out loss ([\d.]+)$", outputs[-1], re.MULTILINE))
    assert float(losses["run/export"]) < float(losses["base-model"])  # the fine-tuned model reads it better
