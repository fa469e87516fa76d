"""The benchmark's timing rule: contenders timed interleaved, medians with their range,
ratios taken within each round (never the best run alone)."""

from __future__ import annotations

import statistics

from deformarray.bench import common as B


class _Quiet:
    def detail(self, text: str) -> None:
        pass


def _impl(name: str, calls: list):
    def fwd():
        calls.append((name, "fwd"))

    def fwdbwd():
        calls.append((name, "fwdbwd"))

    return B.Impl(name, name, fwd, fwdbwd)


def test_contenders_are_interleaved_round_by_round():
    calls: list = []
    B.measure_all([_impl("ours", calls), _impl("dense", calls)], 3, _Quiet())
    fwd = [name for name, phase in calls if phase == "fwd"]
    # warm-ups, then rounds whose starting contender rotates
    assert fwd == ["ours", "dense", "ours", "dense", "dense", "ours", "ours", "dense"]
    assert len([c for c in calls if c[1] == "fwdbwd"]) == 8


def test_median_and_range_are_reported():
    res = B.measure_all([_impl("ours", [])], 5, _Quiet())["ours"]
    for ph in ("fwd", "fwdbwd"):
        times = res[f"{ph}_times_ms"]
        assert len(times) == 5
        assert res[f"{ph}_ms"] == statistics.median(times)
        assert (res[f"{ph}_min_ms"], res[f"{ph}_max_ms"]) == (min(times), max(times))


def test_ratio_is_the_median_of_per_round_ratios():
    ours = {"fwd_times_ms": [2.0, 4.0, 9.0], "fwdbwd_times_ms": [1.0, 1.0, 1.0], "fwd_ms": 4.0, "fwdbwd_ms": 1.0}
    ref = {"fwd_times_ms": [1.0, 1.0, 3.0], "fwdbwd_times_ms": [2.0, 4.0, 1.0], "fwd_ms": 1.0, "fwdbwd_ms": 2.0}
    r = B.ratios_of(ours, ref)
    assert r["fwd"] == 3.0 and r["fwd_range"] == [2.0, 4.0]  # per round: 2, 4, 3 (ratio of medians: 4)
    assert r["fwdbwd"] == 0.5 and r["fwdbwd_range"] == [0.25, 1.0]


def test_ratio_falls_back_to_medians_when_not_timed_together():
    r = B.ratios_of({"fwd_ms": 3.0, "fwdbwd_ms": 6.0}, {"fwd_ms": 1.5, "fwdbwd_ms": 2.0})
    assert r == {"fwd": 2.0, "fwdbwd": 3.0}


def test_a_failing_contender_does_not_hide_the_others():
    calls: list = []

    def boom():
        raise RuntimeError("no")

    bad = B.Impl("bad", "bad", boom, boom)
    res = B.measure_all([bad, _impl("ours", calls)], 2, _Quiet())
    assert "error" in res["bad"] and res["ours"]["fwd_ms"] >= 0
