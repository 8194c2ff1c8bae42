-- The built-in job type: stage 1 `greet` fans out n greetings, stage 2 `reply` answers each one
-- (lineage: every reply task receives its greeting's result). The job's result is the n replies.
-- Stored without creating its queue (what register_job_type would do): CREATE EXTENSION makes no
-- pgmq queue, so a pg_restore, which runs CREATE EXTENSION and then restores every queue with
-- its messages, finds none in its way; `default` is made on first use (_ensure_queue).
INSERT INTO stageflow.job_types AS jt (name, definition)
SELECT 'hello_world', stageflow._normalize_definition('hello_world', $json$
{
  "description": "Greets n times, then replies to each greeting: the smallest job with fan-out and lineage.",
  "parameters": {
    "type": "object",
    "properties": {
      "message": {"type": "string", "minLength": 1, "maxLength": 1000, "default": "hello"},
      "n": {"type": "integer", "minimum": 1, "maximum": 10000, "default": 3}
    },
    "required": ["message", "n"],
    "additionalProperties": false
  },
  "retry": {"max_attempts": 3, "backoff_base_seconds": 1, "backoff_max_seconds": 60},
  "stages": [
    {"name": "greet", "handler": "hello_world.greet", "fan_out": "count", "param": "n"},
    {"name": "reply", "handler": "hello_world.reply", "fan_out": "lineage"}
  ]
}
$json$::jsonb)
ON CONFLICT ON CONSTRAINT job_types_pkey DO UPDATE SET definition = excluded.definition, updated_at = now();
