"""What a new owner of a source partition seeds its dedupe memory from (issue 13 items 5–6, DESIGN §2
invariant 10): the NEWEST keys, bounded in SQL, within the horizon measured in stream time — against the newest
arrival stored for the partition, never the wall clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, text

from ledger import queries


def _sets(engine: Engine, rows: list[tuple[str, int, int, datetime | None, datetime, list[int]]]) -> None:
    with engine.begin() as conn:
        for topic, partition, as_of, arrived_at, seen_at, hashes in rows:
            conn.execute(text("INSERT INTO dedupe_key_sets (source_topic, partition, as_of_offset, arrived_at, "
                              "seen_at, key_hashes) VALUES (:t, :p, :o, :a, :s, :h)"),
                         {"t": topic, "p": partition, "o": as_of, "a": arrived_at, "s": seen_at, "h": hashes})


def test_seeding_keeps_the_newest_keys_within_the_stream_time_horizon(engine: Engine) -> None:
    now = datetime.now(UTC)
    stream = now - timedelta(days=3)  # the partition's stream runs three days behind the wall clock
    _sets(engine, [
        ("u", 0, 10, stream - timedelta(hours=30), now, [1, 2]),        # beyond 24 h of stream time
        ("u", 0, 20, stream - timedelta(hours=20), now, [3, 4, 5]),
        ("u", 0, 30, stream - timedelta(hours=1), now, [6, 7, 8]),
        ("u", 0, 40, stream, now, [9, 10]),                              # the newest arrival
        ("u", 1, 50, now, now, [99]),                                    # another partition
        ("u@2", 0, 5, stream - timedelta(minutes=30), now, [11]),        # an earlier life of the topic
    ])
    with engine.connect() as conn:
        everything = queries.dedupe_keys_newest(conn, source_topic="u", partition=0, horizon_s=86_400,
                                                limit=1_000)
        newest = queries.dedupe_keys_newest(conn, source_topic="u", partition=0, horizon_s=86_400, limit=4)
    # the wall clock says every key is 2+ days old: measured in stream time, the last 24 h are all there
    assert sorted(h for h, _ in everything) == [3, 4, 5, 6, 7, 8, 9, 10, 11]
    assert {h: at for h, at in everything}[9] == stream
    # above the bound: the newest keys (not an arbitrary subset), newest first
    hashes = [h for h, _ in newest]
    assert len(hashes) == 4 and set(hashes[:2]) == {9, 10} and hashes[2] == 11 and hashes[3] in (6, 7, 8)


def test_rows_from_before_stream_times_were_stored_fall_back_to_seen_at(engine: Engine) -> None:
    now = datetime.now(UTC)
    _sets(engine, [("u", 0, 1, None, now - timedelta(hours=30), [1]), ("u", 0, 2, None, now, [2])])
    with engine.connect() as conn:
        keys = queries.dedupe_keys_newest(conn, source_topic="u", partition=0, horizon_s=86_400, limit=10)
    assert [h for h, _ in keys] == [2]


def test_every_key_set_of_the_horizon_streams_oldest_first_as_binary_arrays(engine: Engine) -> None:
    """Issue 17: the seed is no longer cut to the newest N — every set within the horizon (stream time, every life
    of the topic) streams oldest first, decoded exactly (extreme int64 values too)."""
    from streams.dedupe_seed import decode_key_set

    now = datetime.now(UTC)
    stream = now - timedelta(days=3)
    big = list(range(-30_000, 30_000))  # one row wider than a fetch of small ones
    _sets(engine, [
        ("u", 0, 10, stream - timedelta(hours=30), now, [1, 2]),        # beyond 24 h of stream time
        ("u", 0, 20, stream - timedelta(hours=20), now, [-(2**63), 2**63 - 1]),
        ("u", 0, 30, stream - timedelta(hours=1), now, big),
        ("u", 0, 40, stream, now, []),
        ("u", 1, 50, now, now, [99]),                                    # another partition
        ("u@2", 0, 5, stream - timedelta(minutes=30), now, [11]),        # an earlier life of the topic
    ])
    with engine.connect() as conn, conn.begin():
        rows = list(queries.dedupe_key_sets_in_horizon(conn, source_topic="u", partition=0, horizon_s=86_400,
                                                       rows_per_fetch=2))
    assert [at for at, _ in rows] == [stream - timedelta(hours=20), stream - timedelta(hours=1),
                                      stream - timedelta(minutes=30), stream]
    decoded = [decode_key_set(packed).tolist() for _, packed in rows]
    assert decoded == [[-(2**63), 2**63 - 1], big, [11], []]
