#!/usr/bin/env python3
"""A Stageflow worker in plain Python: any SQL client is a worker.

It only calls the extension's SQL functions (claim_tasks, complete_task_and_check_stage,
fail_task), here for the built-in hello_world handlers. Run it beside or instead of
`stageflow worker`:

    python3 examples/python_worker.py postgres://postgres@127.0.0.1:5432/postgres
    python3 examples/python_worker.py URL --until-idle 2   # exit after 2 s without work

It fences every report: complete_task_and_check_stage and fail_task pass its worker id and the
lease_token the claim returned, so a report of a task whose lease was lost (it expired and another
worker claimed the task, or its job ended) is refused with SQLSTATE 55000 instead of overwriting
the other claim's work; such a report is counted as "lost" and the worker goes on.

Needs psycopg 3 (Debian: python3-psycopg; PyPI: psycopg).
"""
import argparse
import json
import os
import socket
import sys
import time

import psycopg
from psycopg.types.json import Jsonb


def greet(task):
    return {"greeting": f"{task['params'].get('message', 'hello')} #{task['params'].get('index', 0)}"}


def reply(task):
    return {"reply": f"reply to {task['predecessor']['greeting']} (from python)"}


HANDLERS = {"hello_world.greet": greet, "hello_world.reply": reply}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("database_url")
    parser.add_argument("--queue", default="default")
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--lease-seconds", type=int, default=60)
    parser.add_argument("--until-idle", type=float, default=None,
                        help="exit after this many seconds without a task (default: run forever)")
    args = parser.parse_args()
    worker_id = f"python-{socket.gethostname()}-{os.getpid()}"

    done = failed = lost = 0
    idle_since = time.monotonic()
    with psycopg.connect(args.database_url, autocommit=True) as conn:
        while True:
            tasks = conn.execute(
                "SELECT task_id, handler, params, predecessor, inputs, attempt, lease_token"
                "  FROM stageflow.claim_tasks(%s, %s, %s, %s)",
                (args.queue, args.batch, args.lease_seconds, worker_id),
            ).fetchall()
            if not tasks:
                if args.until_idle is not None and time.monotonic() - idle_since > args.until_idle:
                    break
                time.sleep(0.1)
                continue
            idle_since = time.monotonic()
            for task_id, handler, params, predecessor, inputs, attempt, lease_token in tasks:
                task = {"task_id": task_id, "params": params, "predecessor": predecessor,
                        "inputs": inputs, "attempt": attempt}
                try:
                    result = HANDLERS[handler](task)
                    succeeded = True
                    # (report => false: the answer is only {"task_id"}; this loop reads none)
                    report = ("SELECT stageflow.complete_task_and_check_stage(%s, %s, %s, %s, report => false)",
                              (task_id, Jsonb(result), worker_id, lease_token))
                except Exception as error:  # any handler failure is reported, never fatal
                    succeeded = False
                    retryable = not isinstance(error, KeyError)
                    report = ("SELECT stageflow.fail_task(%s, %s, %s, %s, %s)",
                              (task_id, Jsonb({"type": type(error).__name__, "message": str(error),
                                               "retryable": retryable}),
                               retryable, worker_id, lease_token))
                try:
                    conn.execute(*report)
                except psycopg.errors.ObjectNotInPrerequisiteState as refused:  # 55000: the lease is lost
                    print(f"lost the lease of {task_id}: {refused}", file=sys.stderr)
                    lost += 1
                    continue
                if succeeded:
                    done += 1
                else:
                    failed += 1
    print(json.dumps({"worker_id": worker_id, "completed": done, "failed": failed, "lost": lost}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
