-- Per-subject rollups for the dashboard's subject views (measured by bench/analytics_queries.py).
-- by_subject_month(_all_meters): top consumers over a month-long window read one row per subject and month
-- instead of one per subject and day; the query takes a month minus the few days of it outside the window
-- (counts and sums subtract exactly) when that reads fewer rows (analytics/queries.py, month_plan).
-- by_subject_meter_day: one subject's series; by_subject_day is ordered meter first, so a subject's rows sat in
-- one granule per meter (~8k rows each); subject first they sit together.
-- Projections, like every usage rollup: inside the same part as their rows (see 0001).
ALTER TABLE ${db}.usage_events ADD PROJECTION IF NOT EXISTS by_subject_month
(
    SELECT project_id, event_type, subject, toStartOfMonth(time), count(), sum(units)
    GROUP BY project_id, event_type, subject, toStartOfMonth(time)
);
ALTER TABLE ${db}.usage_events ADD PROJECTION IF NOT EXISTS by_subject_month_all_meters
(
    SELECT project_id, subject, toStartOfMonth(time), count()
    GROUP BY project_id, subject, toStartOfMonth(time)
);
ALTER TABLE ${db}.usage_events ADD PROJECTION IF NOT EXISTS by_subject_meter_day
(
    SELECT project_id, subject, event_type, toStartOfDay(time), count(), sum(units)
    GROUP BY project_id, subject, event_type, toStartOfDay(time)
);
-- Existing parts get them too (a mutation; instant on an empty table).
ALTER TABLE ${db}.usage_events MATERIALIZE PROJECTION by_subject_month SETTINGS mutations_sync = 1;
ALTER TABLE ${db}.usage_events MATERIALIZE PROJECTION by_subject_month_all_meters SETTINGS mutations_sync = 1;
ALTER TABLE ${db}.usage_events MATERIALIZE PROJECTION by_subject_meter_day SETTINGS mutations_sync = 1;
