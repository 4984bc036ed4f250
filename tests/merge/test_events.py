"""engine.merge.events: every event survives the JSON round trip that job logs use, and a
log line from a newer astolfo (extra fields) still loads."""

from __future__ import annotations

import json

import pytest

from engine.merge import events as ev

EXAMPLES = [
    ev.Started(outputs=["/o/a.safetensors"], tensors_total=10, bytes_to_read=100, bytes_to_write=50,
               device="cuda:0 (test card)", sources=3, resumed_tensors=2, device_uuid="GPU-0000"),
    ev.Stage("merging", "x"),
    ev.Progress("merging", 1, 10, 5, 100, 3, 0.5, 1.25, 3.0, "model.x", 123, 1, 2, 3,
                [ev.OutputProgress("/o/a.safetensors", 1, 10, 7, 50)]),
    ev.MergeWarning("nan_skipped", "m: key", "m", "key", None),
    ev.OutputDone("/o/a.safetensors", 50, 10),
    ev.Finished(outputs=["/o/a.safetensors"], elapsed_s=1.0, bytes_read=100, bytes_written=50, gbps=0.1,
                warnings=1, host_rss_peak=10, process_mem_peak=None),
    ev.Failed("broken", "m", "k"),
    ev.Cancelled("interrupted"),
]


@pytest.mark.parametrize("event", EXAMPLES, ids=lambda e: type(e).__name__)
def test_round_trip_through_json(event):
    line = json.dumps(ev.event_to_dict(event))
    assert ev.event_from_dict(json.loads(line)) == event


def test_every_event_type_is_covered():
    assert {type(e) for e in EXAMPLES} == set(ev.EVENT_TYPES.values())


def test_fields_from_a_newer_version_are_ignored():
    d = ev.event_to_dict(EXAMPLES[2])
    d["new_field"] = 1
    d["outputs"][0]["also_new"] = 2
    assert ev.event_from_dict(d) == EXAMPLES[2]


def test_unknown_type_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown event type"):
        ev.event_from_dict({"type": "telepathy"})


def test_progress_fraction():
    assert EXAMPLES[2].fraction == 0.05
    assert ev.Progress("merging", 0, 0, 0, 0, 0, 0, 0, None, None, None).fraction == 1.0
