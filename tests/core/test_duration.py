import pytest

from epp.util.duration import format_duration, parse_duration


@pytest.mark.parametrize(
    "text,seconds",
    [("50ms", 0.05), ("2m", 120.0), ("1h30m", 5400.0), ("1.5s", 1.5), ("250us", 250e-6), ("3", 3.0), (2, 2.0)],
)
def test_parse(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["", "abc", "5x", "-1s", "1s2", -3])
def test_parse_rejects_with_hint(bad):
    with pytest.raises(ValueError) as err:
        parse_duration(bad)
    assert "duration" in str(err.value)


@pytest.mark.parametrize("seconds,text", [(0, "0s"), (0.05, "50ms"), (120, "2m"), (7200, "2h"), (90, "90s"), (1.5, "1.5s")])
def test_format_round_trips(seconds, text):
    assert format_duration(seconds) == text
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds)
