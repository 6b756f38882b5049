"""The forked command-line runner gives what a fresh interpreter gives: exit codes, stdout, stderr, atexit."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.forked_cli import forkable, run_forked

SCRIPTS = {
    "ok.py": "import atexit, sys\natexit.register(lambda: print('bye'))\nprint('out')\nprint('err', file=sys.stderr)\n",
    "code.py": "import sys\nsys.exit(3)\n",
    "message.py": "import sys\nsys.exit('error: bad flag')\n",
    "crash.py": "raise ValueError('boom')\n",
    "env.py": "import os\nprint(os.environ.get('FORKED_CLI_TEST', 'unset'))\n",
}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_a_forked_run_equals_a_fresh_interpreter(name, tmp_path):
    for file, text in SCRIPTS.items():
        (tmp_path / file).write_text(text)
    forked = run_forked([name], tmp_path, timeout=60)
    fresh = subprocess.run([sys.executable, name], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert forked.returncode == fresh.returncode
    assert forked.stdout == fresh.stdout
    if name == "crash.py":  # both print a traceback ending in the same line
        assert forked.stderr.strip().splitlines()[-1] == fresh.stderr.strip().splitlines()[-1]
    else:
        assert forked.stderr == fresh.stderr


def test_a_changed_environment_gets_a_fresh_interpreter(tmp_path, monkeypatch):
    """A variable torch may read when imported, changed since the server imported it: a fresh interpreter. Any
    other variable reaches the forked child as it is."""
    (tmp_path / "env.py").write_text(SCRIPTS["env.py"])
    run_forked(["env.py"], tmp_path, timeout=60)  # the server exists now
    before = forkable(["env.py"], None)
    monkeypatch.setenv("FORKED_CLI_TEST", "set")
    assert forkable(["env.py"], None) == before
    assert run_forked(["env.py"], tmp_path, timeout=60).stdout == "set\n"
    monkeypatch.setenv("OMP_NUM_THREADS", str(int(os.environ.get("OMP_NUM_THREADS", "1")) + 7))
    assert not forkable(["env.py"], None)
    assert not forkable(["env.py"], {"X": "1"}) and not forkable(["-m", "torch.distributed.run"], None)
