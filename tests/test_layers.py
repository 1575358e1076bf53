"""The layers hold where it matters at run time: the trainer starts without Apache Beam (the import
contracts themselves are checked by `make lint`, which `make test` runs)."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["lwm_data.train", "lwm_data.train.trainer", "lwm_data.train.__main__"])
def test_importing_the_trainer_leaves_apache_beam_out(module):
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m.split('.')[0] == 'apache_beam'))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]", f"importing {module} loads {loaded}"


def test_the_data_side_does_load_beam_so_the_check_above_can_fail():
    code = "import sys, lwm_data.pipelines.chunk; print('apache_beam' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
        == "True"
    )
