"""Progress bars are drawn only on a terminal."""
import io
import sys

from lrnn_analysis import progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bars_are_drawn_only_on_a_terminal(monkeypatch):
    for stream, enabled, drawn in [(_Terminal(), True, True), (_Terminal(), False, False), (io.StringIO(), True, False)]:
        monkeypatch.setattr(sys, "stderr", stream)
        assert progress.bars_shown(enabled) is drawn
        for _ in progress.progress_bar(range(3), enabled=enabled, desc="work", mininterval=0):
            pass
        assert ("\r" in stream.getvalue()) is drawn
