"""bench.stages: each message's latency is cut at the first checkpoint that carried it."""

from bench.stages import Applied, CheckpointSeen, stage_latencies


def test_a_message_is_timed_against_the_earliest_checkpoint_covering_its_offset() -> None:
    seen = {0: [CheckpointSeen(10, 100.5, 100.6), CheckpointSeen(20, 101.0, 101.2),
                # a fenced owner's late copy of as_of 10: it did not carry anything
                CheckpointSeen(10, 102.0, 102.1)]}
    applied = [Applied(0, 5, 100.0, 100.1, 101.0, 2), Applied(0, 15, 100.2, 100.3, 101.5, 1)]
    stages = {s.name: s for s in stage_latencies(applied, seen).stages}
    assert round(stages["acked→checkpoint"].p50_s, 3) == 0.4  # offset 5 → as_of 10, produced at 100.5
    assert round(stages["acked→checkpoint"].p99_s, 3) == 0.7  # offset 15 → as_of 20, produced at 101.0
    assert round(stages["checkpoint→applied"].p99_s, 3) == 0.5
    assert round(stages["checkpoint→readable"].p99_s, 3) == 0.2
    assert stages["produce→acked"].events == 3


def test_messages_no_seen_checkpoint_covers_are_counted_not_timed() -> None:
    seen = {0: [CheckpointSeen(10, 100.5, 100.6)]}
    applied = [Applied(0, 11, 100.0, 100.1, 101.0, 4), Applied(1, 0, 100.0, 100.1, 101.0, 3)]
    result = stage_latencies(applied, seen)
    assert result.uncovered == 7
    assert [s.name for s in result.stages] == ["produce→acked"]
    assert "7 events without a seen checkpoint" in result.line()
