"""Progress output: a bar on a terminal, plain periodic lines in a file or pipe (no carriage-return frames)."""

import io

from epp.util.progress import PlainProgress, progress


def test_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    bar = progress(100, desc="bench", unit="req", stream=out)
    assert isinstance(bar, PlainProgress)
    bar.every_s = 0.0
    with bar:
        for _ in range(3):
            bar.update(10)
        bar.set_description("bench fs")
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines[0].startswith("bench: 10/100 req (10%)") and lines[-1].startswith("bench fs: 30/100 req (30%)")


def test_a_bar_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    bar = progress(5, desc="x", stream=Tty())
    assert type(bar).__name__ == "tqdm"
    bar.close()


def test_disabled_prints_nothing():
    out = io.StringIO()
    with progress(3, disable=True, stream=out) as bar:
        bar.update(3)
    assert out.getvalue() == ""
