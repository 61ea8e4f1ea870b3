-- An hourly rollup: hour/day/month series and per-meter totals over long windows read ~60x fewer rows than
-- from by_minute (measured by bench/analytics_queries.py). Added as a new version, never by editing 0001.
ALTER TABLE ${db}.usage_events ADD PROJECTION IF NOT EXISTS by_hour
(
    SELECT project_id, event_type, toStartOfHour(time), count(), sum(units)
    GROUP BY project_id, event_type, toStartOfHour(time)
);
-- Existing parts get the projection too (a mutation; instant on an empty table).
ALTER TABLE ${db}.usage_events MATERIALIZE PROJECTION by_hour SETTINGS mutations_sync = 1;
