"""Progress bars are drawn on a terminal only: a redirected log gets none (core/progress.py, the one bar)."""
from __future__ import annotations

import io
import re
from pathlib import Path
from types import SimpleNamespace

from core.progress import progress
from tests.helpers import ROOT


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_bar_only_on_a_terminal():
    for stream, show, drawn in ((io.StringIO(), True, False), (Terminal(), True, True), (Terminal(), False, False)):
        assert list(progress(range(5), file=stream, show=show, desc="work")) == list(range(5))
        assert ("work" in stream.getvalue()) == drawn, (type(stream).__name__, show)


def test_the_training_loop_writes_no_bar_into_a_log(capsys):
    from training.loop import run_training_steps

    cfg = SimpleNamespace(train_steps=3, val_loss_every=0, log_every=1, save_every=0)
    done = []
    run_training_steps(cfg, 0, 10, True, done.append, lambda d, tps: {"loss": 1.0}, lambda d: None,  # type: ignore[arg-type]
                       lambda d: None)
    assert done == [0, 1, 2]
    err = capsys.readouterr().err  # pytest's captured stderr is not a terminal
    assert "step" not in err and "%|" not in err


def test_every_bar_goes_through_the_helper():
    """No module of the project draws a tqdm bar of its own (tqdm.write, which keeps a bar intact, is fine)."""
    own = [p for d in ("core", "data", "model", "experiment", "training", "interp") for p in (ROOT / d).rglob("*.py")]
    own += list(ROOT.glob("*.py"))
    direct = [str(Path(p).relative_to(ROOT)) for p in own if p.name != "progress.py"
              and re.search(r"\btqdm\((?!.*\bwrite\b)", p.read_text())]
    assert direct == []
