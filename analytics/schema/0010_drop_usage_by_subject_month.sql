-- 0008's month rollups are dropped again: measured on the 10M-event bench they saved ~20% CPU on the two top
-- consumers queries only (the fixed per-query cost dominates there), and every usage insert paid for them
-- (0008's three projections together added ~25-40% insert CPU). by_subject_meter_day (one subject's series:
-- ~40% less CPU) stays. Top consumers read by_subject_day / by_subject_day_all_meters again.
ALTER TABLE ${db}.usage_events DROP PROJECTION IF EXISTS by_subject_month SETTINGS mutations_sync = 1;
ALTER TABLE ${db}.usage_events DROP PROJECTION IF EXISTS by_subject_month_all_meters SETTINGS mutations_sync = 1;
