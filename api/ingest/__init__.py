"""Usage-event ingestion: the HTTP edge in front of ``usage.events.v1``.

- ``validate``: pure, lean per-event validation and normalization (CloudEvents and Lago shapes);
- ``packing``: pure grouping of accepted events per partition into size-bounded messages;
- ``producer``: the confluent producer edge (idempotent, acks=all) awaited without blocking the loop;
- ``log``: the bounded ``ingested_events`` log behind GET /api/v1/events;
- ``service``: the request-level flow the routes call.
"""
