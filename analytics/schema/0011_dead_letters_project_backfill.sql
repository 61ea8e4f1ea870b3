-- Dead letters written by workers before the `project` header (streams/dead_letters.py) were stored with
-- project_id '' because their project sat inside "original", a JSON string: visible to no project. Re-file
-- each under the project its original names (project_id is in the sort key, so: copy, then delete the '' row).
-- Re-runnable: the copy skips a message already filed under a project, the delete only removes '' rows that
-- name one.
-- (no alias on the derived project: a ClickHouse alias would shadow the column in WHERE)
INSERT INTO ${db}.dead_letters (project_id, received_at, reason, payload, headers, kafka_topic, kafka_partition,
                                kafka_offset, kafka_index)
SELECT JSONExtractString(JSONExtractString(payload, 'original'), 'project'), received_at, reason,
       payload, headers, kafka_topic, kafka_partition, kafka_offset, kafka_index
FROM ${db}.dead_letters
WHERE project_id = '' AND JSONExtractString(JSONExtractString(payload, 'original'), 'project') != ''
  AND (kafka_topic, kafka_partition, kafka_offset) NOT IN
      (SELECT kafka_topic, kafka_partition, kafka_offset FROM ${db}.dead_letters WHERE project_id != '');
ALTER TABLE ${db}.dead_letters DELETE
WHERE project_id = '' AND JSONExtractString(JSONExtractString(payload, 'original'), 'project') != ''
SETTINGS mutations_sync = 1;
