"""The coalescing line's arithmetic (loadagg/cli/coalescing.py), from two readings of an aggregator's /metrics."""

from __future__ import annotations

import pytest

from loadagg.cli.coalescing import Reading, coalescing, describe, read_metrics

PAGE = """\
# TYPE loadagg_rounds_started_total counter
loadagg_rounds_started_total 100.0
# TYPE loadagg_round_callers_total counter
loadagg_round_callers_total 3900.0
# TYPE loadagg_collects_sent_total counter
loadagg_collects_sent_total 380.0
# TYPE loadagg_pushes_received_total counter
loadagg_pushes_received_total 20.0
# TYPE loadagg_watch_delivered_total counter
loadagg_watch_delivered_total 100.0
# TYPE loadagg_connected_agents gauge
loadagg_connected_agents 4.0
# TYPE loadagg_getloads_duration_seconds histogram
loadagg_getloads_duration_seconds_bucket{api="loadagg",code="OK",le="+Inf"} 3800.0
loadagg_getloads_duration_seconds_count{api="loadagg",code="OK"} 3800.0
loadagg_getloads_duration_seconds_sum{api="loadagg",code="OK"} 12.0
loadagg_getloads_duration_seconds_count{api="http",code="200"} 100.0
"""


def test_a_page_is_read_into_its_figures():
    reading = read_metrics(PAGE, at=10.0)
    assert reading == Reading(at=10.0, calls=4000, rounds=100, callers=3900, engine_reads=400, agents=4)


def test_rates_between_two_readings():
    before = Reading(at=10.0, calls=1000, rounds=40, callers=950, engine_reads=160, agents=4)
    c = coalescing(read_metrics(PAGE, at=12.0), before)
    assert c.calls_per_s == 1500 and c.rounds_per_s == 30 and c.callers_per_round == pytest.approx(2950 / 60)
    assert c.reads_asked == 6000 and c.reads_done == 120  # per second: 1500 answers x 4 engines; 240 reads / 2 s
    assert c.saved_ratio == pytest.approx(0.98)
    assert describe(c) == ("router calls 1,500/s  rounds 30/s  callers per round 49.2  engine reads saved 98.0 %: "
                           "120/s, not 6,000/s with every router asking each of 4 engine(s)")


def test_the_first_reading_and_a_restarted_aggregator_give_totals_since_start():
    now = read_metrics(PAGE, at=12.0)
    for before in (None, Reading(at=5.0, calls=9000, rounds=500)):  # counters went down: the aggregator restarted
        c = coalescing(now, before)
        assert c.calls_per_s is None and c.rounds_per_s is None and c.callers_per_round == 39
        assert c.reads_asked == 16000 and c.reads_done == 400
        assert describe(c).startswith("router calls -  rounds -  callers per round 39.0  engine reads saved 97.5 %: "
                                      "400 since start, not 16,000 since start")


def test_nothing_asked_yet_saves_nothing():
    c = coalescing(Reading(at=1.0, agents=4))
    assert c.saved_ratio is None and c.callers_per_round is None
    assert describe(c) == "router calls -  rounds -  callers per round -  engine reads saved -"
