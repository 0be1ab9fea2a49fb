"""Mutation check of the documented guarantees: every promise has a test that can fail.

Each mutation breaks one promise with exact text replacements (file, old text, new text) applied to a
scratch copy of the repository, never to the checkout, then runs the tests named to catch it:

    .venv/bin/python tests/mutation_check.py            # every mutation (make mutation; CI runs it)
    .venv/bin/python tests/mutation_check.py --applies  # only whether each still applies (seconds)
    .venv/bin/python tests/mutation_check.py --list     # the mutations, and whether each still applies
    .venv/bin/python tests/mutation_check.py --only reply-twice --only skip-redaction
    .venv/bin/python tests/mutation_check.py --write-table docs/reliability-table.md

pytest never collects this file (its name does not match ``test_*.py``). CI runs ``--applies``
(``make mutation-applies``) right after lint and the full run (``make mutation``) after ``make test``.

The old text must occur exactly once, else the script stops before running anything ("mutation ...
no longer applies: update the table."): whoever changes the code a mutation edits updates its entry
below in the same commit, so the check never silently checks nothing. Python files are compiled and
Lua files loaded into a throwaway Redis (SCRIPT LOAD) after the edit, so a typo cannot pass for a
caught mutation.

The copy's code is what runs, also in the worker processes the tests start: PYTHONPATH puts the copy's
titan_broker, titan_worker and titan_cli ahead of the editable install (a canary subprocess checks it
before each run), and pytest runs from inside the copy with ``--rootdir`` set to it.

First a baseline: the named tests run once on the unmutated copy; a test that fails there proves
nothing and is dropped (and reported). Then, one mutation at a time, a fresh copy is mutated and only
its named tests run, cheapest first, with ``-x``. "caught" means a named test failed; "survived" means
they all passed: the promise has no test that can fail. Exit status 0 when every mutation was caught,
1 when one survived or could not be checked, 2 when a mutation no longer applies (or the published
table names other mutations than this file).

``--write-table PATH`` writes the outcome of a full run as a Markdown table (mutation, promise, the
test that caught it, seconds): docs/reliability-table.md, which a reader consults to see which test
stands behind each promise. ``--applies``, and a full run that does not write the table, also check
it against the mutations below (names, promises and tests, not the seconds), so that it is
regenerated whenever the mutations change.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"
PYTEST_ARGS = ("-x", "-q", "-p", "no:cacheprovider", "--timeout", "180")
RUN_LIMIT = 1800.0
"""Seconds one pytest run may take in all before it is stopped (a test's own limit is 180 s)."""
IGNORED = shutil.ignore_patterns(
    ".venv", ".git", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache", ".hypothesis", "*.egg-info"
)
TABLE = "docs/reliability-table.md"
"""Where the table of a full run is published (relative to the repository)."""

# The files the mutations edit, named once: a module that moves is a one-line change here.
CODEC = "titan_broker/_wire/codec.py"
CONFIG = "titan_broker/_config.py"
CONNECTION = "titan_broker/_redis/connection.py"
DEAD_LETTERS = "titan_broker/_registry/dead_letters.py"
DECORATORS = "titan_broker/_service/decorators.py"
JOB = "titan_broker/_calling/jobs.py"
KEYS = "titan_broker/_wire/keys.py"
PROXY = "titan_broker/_calling/proxy.py"
SENDING = "titan_broker/_calling/sending.py"
CANCEL_LUA = "titan_broker/_redis/lua/cancel.lua"
ENQUEUE_LUA = "titan_broker/_redis/lua/enqueue.lua"
FINISH_LUA = "titan_broker/_redis/lua/finish.lua"
OVERTAKEN_LUA = "titan_broker/_redis/lua/overtaken.lua"
PROMOTE_LUA = "titan_broker/_redis/lua/promote.lua"
RECLAIM_LUA = "titan_broker/_redis/lua/reclaim.lua"
RENEW_LUA = "titan_broker/_redis/lua/renew.lua"
SETTLING_LUA = "titan_broker/_redis/lua/settling.lua"
STARTED_LUA = "titan_broker/_redis/lua/started.lua"
SUBMITTING_LUA = "titan_broker/_redis/lua/submitting.lua"
TICK_LUA = "titan_broker/_redis/lua/tick.lua"
EXECUTION = "worker/titan_worker/execution.py"
HANDOFF = "worker/titan_worker/handoff.py"
SCHEDULING = "worker/titan_worker/scheduling.py"
SETTLEMENT = "worker/titan_worker/settlement.py"
WORKER = "worker/titan_worker/worker.py"
INTAKE = "worker/titan_worker/intake.py"
WORKER_MAIN = "worker/titan_worker/main.py"
ARGUMENTS_MW = "worker/titan_worker/middleware/arguments.py"
DEADLINE_MW = "worker/titan_worker/middleware/deadline.py"
INVALIDATION_MW = "worker/titan_worker/middleware/invalidation.py"
RETRY_MW = "worker/titan_worker/middleware/retry.py"

# Test node ids, named once (the test files first).
CALLS = "tests/test_calls.py::"
CLIENT = "tests/test_client.py::"
CLUSTER = "tests/test_cluster.py::"
CODEC_TESTS = "tests/test_codec.py::"
DEAD_LETTERS_TESTS = "tests/test_dead_letters.py::"
ERRORS = "tests/test_errors.py::"
HANDOFF_TESTS = "tests/test_handoff.py::"
INTAKE_TESTS = "tests/test_intake.py::"
JOBS = "tests/test_jobs.py::"
LIVENESS = "tests/test_liveness.py::"
REDIS_ACCESS = "tests/test_redis_access.py::"
REPLIES = "tests/test_replies.py::"
SCHEDULES = "tests/test_schedules.py::"
SCRIPTS = "tests/test_scripts.py::"
SETTLEMENT_TESTS = "tests/test_settlement.py::"
TYPES = "tests/test_types.py::"
WK = "tests/test_worker.py::"
BLOCKED_LOOP = LIVENESS + "test_blocked_event_loop_does_not_get_a_live_worker_robbed"
BLOCKED_LOOP_KEYED = LIVENESS + "test_blocked_event_loop_with_an_affinity_key_runs_once"
FULL_REDIS_REPLY = SETTLEMENT_TESTS + "test_reply_held_by_a_full_redis_is_written_once_memory_is_back"
BOOKKEEPING = (
    SETTLEMENT_TESTS + "test_redis_error_in_bookkeeping_after_success_is_an_internal_error_not_a_rerun"
)
MILLION_MAPS = INTAKE_TESTS + "test_a_million_empty_maps_are_refused_without_a_memory_blowup"
TRACEBACK_IN_LOG = ERRORS + "test_error_reply_has_an_error_id_and_the_traceback_stays_in_the_worker_log"
UNWRITABLE_REPLY = (
    SETTLEMENT_TESTS + "test_a_reply_that_cannot_be_written_leaves_the_call_in_the_dead_letters"
)
MIDDLEWARE_ERROR = SETTLEMENT_TESTS + "test_a_redis_error_in_a_middleware_is_an_internal_error_at_once"
REPLAYED_DEADLINE = DEAD_LETTERS_TESTS + "test_a_replayed_dead_letter_gets_a_new_deadline"
HANDOFF_TARGET = HANDOFF_TESTS + "test_a_call_is_handed_only_to_a_worker_that_has_its_method"
PARTITION = "tests/test_partition.py::test_worker_cut_off_from_redis_never_replies_for_calls_taken_over"
NEVER_ROBBED = LIVENESS + "test_live_worker_on_long_call_is_never_robbed"
POISON = INTAKE_TESTS + "test_poison_call_is_dead_lettered_and_its_caller_told"
BACKLOG = CALLS + "test_full_backlog_refuses_calls_at_once"
MAX_DELIVERIES_1 = (
    INTAKE_TESTS + "test_a_max_deliveries_1_call_is_dead_lettered_not_rerun_when_its_worker_dies"
)
REPLY_TTL = REPLIES + "test_reply_stream_is_trimmed_by_its_reader_and_expires"
EXPIRED_CALL = WK + "test_expired_call_is_dropped_without_running"
WRONG_PASSWORD = REDIS_ACCESS + "test_wrong_password_is_a_clear_error_without_the_password"
REMOTE_EXCEPTION = CALLS + "test_remote_exception_carries_type_and_message"
CANCELLED_CALL = CLIENT + "test_a_call_its_caller_cancelled_is_never_run"
STOPPED_AFTER_SEND = CLIENT + "test_a_call_ends_at_its_timeout_when_redis_is_stopped_after_the_send"
STALLED_REPLY = CLIENT + "test_a_channel_drops_a_reply_that_stalls_past_its_bound"
DEPTH_LIMIT = CODEC_TESTS + "test_decoding_accepts_the_deepest_nesting_allowed_and_refuses_one_more"
DEPTH_LIMIT_COUNTING = CODEC_TESTS + "test_depth_is_checked_on_the_counting_path_too"
RECLAIM_OWN = SCRIPTS + "test_reclaim_never_takes_an_entry_its_own_worker_is_running"
TICK_ONCE = SCRIPTS + "test_a_tick_is_queued_once_however_many_workers_ask_for_it"
PERIODIC_ONCE = JOBS + "test_periodic_runs_once_per_tick_across_three_workers_and_a_killed_one"
RETRY_DEADLINE = JOBS + "test_a_retry_that_could_not_start_before_the_deadline_is_not_queued"
JOB_OUTCOMES = JOBS + "test_a_typed_job_result_and_its_remote_error"
JOB_CANCELLED = JOBS + "test_a_job_cancelled_before_it_started_never_runs"
DELAYED_ONCE = JOBS + "test_a_delayed_call_waits_for_its_delay_and_runs_once"
CLUSTER_CALLS = CLUSTER + "test_calls_reach_three_services_on_three_primaries"
WRONG_ARGUMENT = TYPES + "test_a_wrong_argument_is_refused_naming_the_parameter_the_type_and_what_came"
WRONG_RESULT = TYPES + "test_a_result_that_breaks_its_annotation_is_a_bad_result_from_the_worker"
CALLER_DECODES = TYPES + "test_a_proxy_from_connect_decodes_into_the_class_it_was_given"
CRON_AT_START = SCHEDULES + "test_a_cron_whose_last_match_is_hours_ago_does_not_run_at_start"
CURRENT_TICK = SCHEDULES + "test_after_all_workers_were_down_an_every_schedule_runs_only_its_current_tick"
OVERTAKEN = SCHEDULES + "test_after_an_outage_the_runs_of_overtaken_ticks_are_dropped_not_piled_up"
DRAINING_TICKS = SCHEDULES + "test_a_draining_worker_queues_no_more_ticks"
TINY_DELAY = SCHEDULES + "test_a_delayed_call_with_a_tiny_delay_starts_close_to_its_due_time"
REFUSED_SCHEDULE = SCHEDULES + "test_a_schedule_that_cannot_tick_is_refused_naming_its_method"
CANNOT_TICK = SCHEDULES + "test_a_schedule_that_cannot_tick_stops_neither_the_others_nor_delayed_calls"
KILLED_MID_RUN = JOBS + "test_a_job_survives_its_worker_killed_mid_run"
KILLED_TWICE = JOBS + "test_a_job_that_killed_its_worker_twice_counts_two_runs"
CANCELLED_IN_BACKOFF = JOBS + "test_a_job_cancelled_during_its_retry_backoff_says_it_ran"
AT_ANY_ZONE = JOBS + "test_at_is_an_instant_whatever_the_local_time_zone"
AT_JUST_PASSED = JOBS + "test_at_a_moment_just_passed_runs_now"
JOB_LOST = JOBS + "test_a_job_lost_with_redis_data_says_so"
RESULT_THROUGH_OUTAGE = JOBS + "test_a_job_result_rides_out_a_redis_outage_shorter_than_its_timeout"
ERROR_IDS_IN_LOG = ERRORS + "test_every_error_id_is_in_the_workers_log"
GIVEN_UP_NOT_TAKEN_OVER = ERRORS + "test_a_call_given_up_by_its_caller_is_not_said_to_be_taken_over"
BOOLEANS = CALLS + "test_booleans_are_not_seconds"

# Texts more than one mutation replaces.
ANSWER = "  if keys[2] then answer(keys[2], reply, shared[3], job_status, expiring) end\n"
ACK = "  table.insert(answered[keys[1]], id)\n"
"""An entry answered is acknowledged (and deleted) at the end of finish.lua."""


@dataclass(frozen=True)
class Edit:
    path: str
    """Relative to the repository."""
    old: str
    """Must occur exactly once in the file."""
    new: str


@dataclass(frozen=True)
class Mutation:
    name: str
    promise: str
    """The README promise it breaks (quoted or paraphrased)."""
    edits: tuple[Edit, ...]
    tests: tuple[str, ...]
    """Node ids expected to catch it, cheapest first (the run stops at the first failure)."""
    gap: str = ""
    """For a mutation known to survive: the test that would catch it (printed when it survives)."""


MUTATIONS: tuple[Mutation, ...] = (
    Mutation(
        "ack-before-reply",
        "an entry is acknowledged and deleted after its reply is written, in one script",
        (Edit(FINISH_LUA, ANSWER + ACK, ACK + ANSWER),),
        (UNWRITABLE_REPLY,),
    ),
    Mutation(
        "ack-without-reply",
        "a reply that cannot be written (full Redis) waits: the entry stays pending, answered once",
        (
            Edit(
                FINISH_LUA,
                ANSWER,
                "  if keys[2] then pcall(answer, keys[2], reply, shared[3], job_status, expiring) end\n",
            ),
        ),
        (FULL_REDIS_REPLY,),
    ),
    Mutation(
        "no-ownership-check",
        "a worker cut off from Redis does not answer the calls it lost: one answer per call",
        (
            Edit(
                FINISH_LUA,
                "  if not held[keys[1]][id] then return 0 end\n",
                "-- mutated: no ownership check\n",
            ),
        ),
        (PARTITION, BLOCKED_LOOP),
    ),
    Mutation(
        "no-deadline-drop",
        "a worker drops a call whose deadline has passed",
        (
            Edit(
                DEADLINE_MW,
                "        if remaining <= 0:\n",
                "        if remaining <= 0 and False:  # mutated\n",
            ),
        ),
        (EXPIRED_CALL,),
    ),
    Mutation(
        "renew-nothing",
        "every beat renews the entries a live worker runs: a live worker on a long call is never robbed",
        (Edit(RENEW_LUA, "    mine[#mine + 1] = ARGV[i]\n", "    -- mutated: renew nothing\n"),),
        (NEVER_ROBBED, BLOCKED_LOOP, BLOCKED_LOOP_KEYED),
    ),
    Mutation(
        "reply-twice",
        "one answer per outcome (the settle script writes one reply)",
        (Edit(FINISH_LUA, ANSWER, ANSWER + ANSWER),),
        (BLOCKED_LOOP, PARTITION),
    ),
    Mutation(
        "skip-redaction",
        "passwords never appear in messages or logs",
        (
            Edit(
                CONFIG,
                '    if not at or ":" not in userinfo:\n        return url\n',
                "    if True:  # mutated: the password in the userinfo is kept\n        return url\n",
            ),
        ),
        (WRONG_PASSWORD,),
    ),
    Mutation(
        "decode-no-container-limit",
        "decoding is bounded: at most 65,536 arrays and maps",
        (
            Edit(
                CODEC,
                "        if self.count > MAX_CONTAINERS:\n",
                "        if self.count > MAX_CONTAINERS and False:  # mutated\n",
            ),
        ),
        (MILLION_MAPS,),
    ),
    Mutation(
        "decode-all-with-msgspec",
        "decoding is bounded: at most 65,536 arrays and maps (a payload that may hold more is counted)",
        (
            Edit(
                CODEC,
                "    if bound > MAX_CONTAINERS:\n",
                "    if bound > MAX_CONTAINERS and False:  # mutated: msgspec decodes whatever comes\n",
            ),
        ),
        (MILLION_MAPS,),
    ),
    Mutation(
        "decode-no-depth-limit",
        "decoding is bounded: nested at most 64 deep",
        (
            Edit(
                CODEC,
                "    if bound > MAX_DEPTH:  # fewer containers cannot nest deeper\n",
                "    if bound > MAX_DEPTH and False:  # mutated: no depth check\n",
            ),
        ),
        (DEPTH_LIMIT,),
    ),
    Mutation(
        "decode-no-depth-limit-when-counting",
        "decoding is bounded: nested at most 64 deep (on msgpack-python's path too)",
        (
            Edit(
                CODEC,
                "    if counter.count > MAX_DEPTH:\n",
                "    if counter.count > MAX_DEPTH and False:  # mutated: no depth check\n",
            ),
        ),
        (DEPTH_LIMIT_COUNTING,),
    ),
    Mutation(
        "no-backlog-check",
        "a full backlog (max_backlog) refuses new calls at once with BacklogFull",
        (Edit(SUBMITTING_LUA, "  if full then return full end\n", "  -- mutated: no backlog check\n"),),
        (BACKLOG,),
    ),
    Mutation(
        "keep-untaken-request",
        "the caller removes its request if no worker took it (timeout, cancellation)",
        (
            Edit(
                SENDING,
                "                    pipe.xdel(key, entry_id)\n",
                "                    pass  # mutated: the request given up stays\n",
            ),
        ),
        (CANCELLED_CALL, STOPPED_AFTER_SEND),
    ),
    Mutation(
        "no-dead-letter",
        "a call delivered more than max_deliveries times goes to the dead letters; its caller is told",
        (
            Edit(
                INTAKE,
                "        if deliveries > limit or moves >= limit:\n",
                "        if moves >= limit:  # mutated: deliveries never counted\n",
            ),
        ),
        (MAX_DELIVERIES_1, POISON),
    ),
    Mutation(
        "heartbeat-on-loop",
        "the heartbeat runs on a thread with a connection of its own: a blocked event loop is not robbed",
        (
            Edit(
                WORKER,
                "            await self.heartbeat.start(topology)\n",
                "            self.heartbeat.connect(topology)  # mutated: no heartbeat thread\n"
                "            self.heartbeat.register()\n",
            ),
            Edit(
                WORKER,
                "                self._health = await self._check_health()\n            self._publish()\n",
                "                self._health = await self._check_health()\n            self._publish()\n"
                "            self.heartbeat.beat()  # mutated: the beat runs on the event loop\n",
            ),
        ),
        (BLOCKED_LOOP, BLOCKED_LOOP_KEYED),
    ),
    Mutation(
        "internal-error-escapes",
        "a failure around the method is answered at once with InternalError, never a silent rerun",
        (
            Edit(
                EXECUTION,
                "            outcome = call.raised(exc, WireError.INTERNAL)\n",
                "            raise  # mutated: the failure escapes, the entry stays pending\n",
            ),
        ),
        (MIDDLEWARE_ERROR,),
    ),
    Mutation(
        "internal-error-without-ran",
        "a Redis error in its cache invalidation: InternalError with details['ran']",
        (
            Edit(
                INVALIDATION_MW,
                "outcome = call.raised(exc, WireError.INTERNAL, message, ran=True)\n",
                "outcome = call.raised(exc, WireError.INTERNAL, message)  # mutated: no 'ran'\n",
            ),
        ),
        (BOOKKEEPING,),
    ),
    Mutation(
        "tracebacks-by-default",
        "a traceback goes to the caller only with --expose-tracebacks (WorkerOptions default, pm.spawn)",
        (
            Edit(
                CONFIG,
                "    expose_tracebacks: bool = False\n",
                "    expose_tracebacks: bool = True  # mutated\n",
            ),
        ),
        (REMOTE_EXCEPTION,),
    ),
    Mutation(
        "tracebacks-by-default-cli",
        "a traceback goes to the caller only with --expose-tracebacks (titan-worker's flag default)",
        (
            Edit(
                WORKER_MAIN,
                '(for development).")\n    ] = False,\n',
                '(for development).")\n    ] = True,  # mutated\n',
            ),
        ),
        (TRACEBACK_IN_LOG,),
    ),
    Mutation(
        "replay-keeps-old-deadline",
        "a replayed dead letter gets a new deadline",
        (
            Edit(
                DEAD_LETTERS,
                "    ttl = str(int(timeout * 1000)).encode()\n",
                '    ttl = b"0"  # mutated: the original deadline, long gone\n',
            ),
        ),
        (REPLAYED_DEADLINE,),
    ),
    Mutation(
        "no-stall-watchdog",
        "a hot-path connection whose Redis stops answering is dropped within its bound: never a hang",
        (
            Edit(
                CONNECTION,
                "        if conn is not None:  # closing the socket ends the read in flight\n",
                "        if conn is None:  # mutated: the watchdog never drops the connection\n",
            ),
        ),
        (STALLED_REPLY,),
    ),
    Mutation(
        "reclaim-own-running",
        "a live worker never claims (and reruns) the entries it is running itself",
        (
            Edit(
                RECLAIM_LUA,
                "  if not (e[2] == ARGV[2] and running[id]) then\n",
                "  if true then  -- mutated: its own running entries too\n",
            ),
        ),
        (RECLAIM_OWN,),
    ),
    Mutation(
        "arguments-not-decoded",
        "the worker decodes arguments into the parameter annotations; a value that does not fit is "
        "BadArguments and the method never runs",
        (
            Edit(
                ARGUMENTS_MW,
                "        problem = parameters.decode(call.method, call.request.args, call.request.kwargs)\n",
                "        problem = None  # mutated: arguments arrive as plain data, unchecked\n",
            ),
        ),
        (WRONG_ARGUMENT,),
    ),
    Mutation(
        "result-not-checked",
        "a result that does not match its return annotation is an error, not a silent wrong type",
        (
            Edit(
                EXECUTION,
                "        returns = call.spec.returns\n        if returns is None:\n",
                "        returns = call.spec.returns\n        if True:  # mutated: results unchecked\n",
            ),
        ),
        (WRONG_RESULT,),
    ),
    Mutation(
        "results-not-decoded-by-the-caller",
        "the caller decodes results into the return annotation of the class it was given",
        (
            Edit(
                PROXY,
                "        returns = self._proxy._results.get(self._method)\n",
                "        returns = None  # mutated: plain data for every caller\n",
            ),
        ),
        (CALLER_DECODES,),
    ),
    Mutation(
        "tick-without-compare-and-set",
        "a @periodic method runs once per tick, whatever the number of workers",
        (
            Edit(
                TICK_LUA,
                "if last >= tick and last <= now + 1000 then return 0 end\n",
                "-- mutated: the tick is not compared with the last one queued\n",
            ),
        ),
        (TICK_ONCE, PERIODIC_ONCE),
    ),
    Mutation(
        "retry-past-deadline",
        "@retry queues no run that could not start before the call's deadline: the caller gets the error",
        (
            Edit(
                RETRY_MW,
                "        if time.monotonic() + delay >= call.deadline:\n",
                "        if False:  # mutated: retried whatever the deadline\n",
            ),
        ),
        (RETRY_DEADLINE,),
    ),
    Mutation(
        "job-outcome-to-another-key",
        "a job's outcome is kept in its own hash, read by its id from any process",
        (
            Edit(
                EXECUTION,
                "            req = dataclasses.replace(req, reply_to=ctx.keys.job(scope, req.job))\n",
                "            req = dataclasses.replace(req, reply_to=ctx.keys.job(scope, req.call_id))"
                "  # mutated\n",
            ),
        ),
        (JOB_OUTCOMES,),
    ),
    Mutation(
        "cancelled-job-still-queued",
        "a job cancelled before it started never runs",
        (
            Edit(
                CANCEL_LUA,
                "  if redis.call('XDEL', KEYS[2], id) == 0 then return 'running' end\n",
                "  -- mutated: the request stays on the stream\n",
            ),
        ),
        (JOB_CANCELLED,),
    ),
    Mutation(
        "delayed-call-promoted-twice",
        "a delayed call is moved onto the stream once (ZREM and XADD in one script): it runs once",
        (Edit(PROMOTE_LUA, "  redis.call('ZREM', KEYS[1], member)\n", "  -- mutated: the member stays\n"),),
        (DELAYED_ONCE,),
    ),
    Mutation(
        "handoff-to-any-worker",
        "a call for a method this worker lacks goes to a live worker whose record lists the method",
        (
            Edit(
                HANDOFF,
                "        found = [wid for wid, methods in self._methods.items() if method in methods]\n",
                "        found = list(self._methods)  # mutated: any other live worker, the method or not\n",
            ),
        ),
        (HANDOFF_TARGET,),
    ),
    Mutation(
        "reply-key-outside-the-slot",
        "Redis Cluster: every key a settle touches shares the service's hash tag (one slot, one script)",
        (
            Edit(
                KEYS,
                '        return f"{self.namespace}:{{{service}}}:reply:"\n',
                '        return f"{self.namespace}:reply:{service}:"  # mutated: outside its slot\n',
            ),
            Edit(
                KEYS,
                '        return f"{self.namespace}:{{{service}}}:reply:{client_id}"\n',
                '        return f"{self.namespace}:reply:{service}:{client_id}"  # mutated\n',
            ),
        ),
        (CLUSTER_CALLS,),
    ),
    Mutation(
        "reply-stream-without-ttl",
        "a reply stream nobody reads expires reply_ttl after the last reply written to it",
        (Edit(SETTLING_LUA, "  redis.call('PEXPIRE', key, ttl_ms)\n", "  -- mutated: no TTL\n"),),
        (REPLY_TTL,),
    ),
    Mutation(
        "missed-tick-made-up",
        "a tick missed while no worker was ticking is not made up (a deploy never fires a nightly job "
        "at noon); the next tick runs",
        (
            Edit(
                TICK_LUA,
                "if tick < now - tonumber(ARGV[7]) then return 3 end\n",
                "-- mutated: a tick however old is queued\n",
            ),
        ),
        (CRON_AT_START, CURRENT_TICK),
    ),
    Mutation(
        "overtaken-run-rerun",
        "after an outage, the reclaimed runs of ticks a later tick has overtaken are dropped, not piled up",
        (
            Edit(
                OVERTAKEN_LUA,
                "if not (last > tick or (last == tick and following > tick and following <= now)) "
                "then return 0 end\n",
                "if true then return 0 end  -- mutated: every reclaimed run runs again\n",
            ),
        ),
        (OVERTAKEN,),
    ),
    Mutation(
        "draining-worker-ticks",
        "a draining worker queues no more ticks (it would not run them)",
        (
            Edit(
                SCHEDULING,
                "            for periodic in self.periodic if self.ticking else ():\n",
                "            for periodic in self.periodic:  # mutated: ticks queued while draining\n",
            ),
        ),
        (DRAINING_TICKS,),
    ),
    Mutation(
        "short-delay-waits-for-the-next-look",
        "a delayed call due before the workers' next look at the delayed set wakes one: it starts on time",
        (Edit(ENQUEUE_LUA, "  wake_promoters(KEYS[2], delay)\n", "  -- mutated: no worker woken\n"),),
        (TINY_DELAY,),
    ),
    Mutation(
        "never-matching-cron-accepted",
        "a @periodic cron expression that never matches a date is refused, naming the method",
        (
            Edit(
                DECORATORS,
                "            croniter(cron, now).get_next(float)\n"
                "            croniter(cron, now).get_prev(float)\n",
                "            pass  # mutated: whether it ever matches is not checked\n",
            ),
        ),
        (REFUSED_SCHEDULE,),
    ),
    Mutation(
        "infinite-every-accepted",
        "@periodic(every=...) must be a finite number of seconds of at least 0.1, else refused",
        (Edit(DECORATORS, "        and math.isfinite(value)\n", "        # mutated: infinity passes\n"),),
        (REFUSED_SCHEDULE,),
    ),
    Mutation(
        "one-schedule-stops-the-others",
        "a schedule that cannot tick holds up neither the worker's other schedules nor its delayed calls",
        (
            Edit(
                SCHEDULING,
                '"(%s); still trying", ctx.worker_id, periodic.method, exc)  # fmt: skip\n',
                '"(%s); still trying", ctx.worker_id, periodic.method, exc)  # fmt: skip\n'
                "                    break  # mutated: the first failure ends the pass for the others\n",
            ),
        ),
        (CANNOT_TICK,),
    ),
    Mutation(
        "crash-rerun-not-counted",
        "a job's attempts count its runs, a rerun after its worker died included",
        (
            Edit(
                STARTED_LUA,
                "return redis.call('HINCRBY', KEYS[1], 'attempts', 1)\n",
                "redis.call('HSET', KEYS[1], 'attempts', 1)  -- mutated: a rerun is not counted\nreturn 1\n",
            ),
        ),
        (KILLED_MID_RUN, KILLED_TWICE),
    ),
    Mutation(
        "cancelled-in-backoff-said-never-ran",
        "a job cancelled while @retry's backoff was due says it ran, and how many times",
        (
            Edit(
                JOB,
                "            if runs:  # cancelled while @retry's backoff was due: it ran, and failed\n",
                "            if False:  # mutated: said never to have started\n",
            ),
        ),
        (CANCELLED_IN_BACKOFF,),
    ),
    Mutation(
        "naive-at-accepted",
        "at= is an instant: an aware datetime, whatever the local time zone; a naive one is refused",
        (
            Edit(
                PROXY,
                "            _check_aware(at)\n",
                "            pass  # mutated: a naive at is read as local time\n",
            ),
        ),
        (AT_ANY_ZONE,),
    ),
    Mutation(
        "passed-moment-is-a-delay",
        "at= a moment (all but) passed runs the call now, not as a delayed call",
        (
            Edit(
                PROXY,
                "            return left if left >= 0.001 else None\n",
                "            return max(0.0, left)  # mutated: a moment passed is still a delay\n",
            ),
        ),
        (AT_JUST_PASSED,),
    ),
    Mutation(
        "lost-job-said-unknown",
        "a job Redis lost (a restart or failover without its data) says so, not merely unknown",
        (
            Edit(
                JOB,
                "            if now and now != self._run_id:\n",
                "            if False:  # mutated: a lost job is only unknown\n",
            ),
        ),
        (JOB_LOST,),
    ),
    Mutation(
        "job-result-fails-in-an-outage",
        "job.result() rides out a Redis outage shorter than its timeout",
        (
            Edit(
                JOB,
                "                except CONNECTION_ERRORS as exc:"
                "  # Redis restarting, a failover: read again\n",
                "                except ZeroDivisionError as exc:  # mutated: an outage ends the wait\n",
            ),
        ),
        (RESULT_THROUGH_OUTAGE,),
    ),
    Mutation(
        "folded-error-id-not-logged",
        "every error id a caller gets is in the worker's log, even when the traceback is folded",
        (Edit(EXECUTION, "            self._folded(level, call, exc)\n", "            pass  # mutated\n"),),
        (ERROR_IDS_IN_LOG,),
    ),
    Mutation(
        "given-up-said-taken-over",
        "a call given up by its caller is logged as such, not as taken over by another worker",
        (
            Edit(
                SETTLEMENT,
                "        if gone == 1:\n",
                "        if False:  # mutated: the caller's withdrawal goes unnoticed\n",
            ),
        ),
        (GIVEN_UP_NOT_TAKEN_OVER,),
    ),
    Mutation(
        "booleans-as-seconds",
        "a boolean is not a number of seconds: delay=True or deadline=True is refused",
        (Edit(CONFIG, "isinstance(value, bool)\n        or not", "not"),),
        (BOOLEANS,),
    ),
)


@dataclass
class Outcome:
    status: str
    """caught, survived, unproven (every test skipped or dropped) or error."""
    caught_by: str = ""
    why: str = ""
    seconds: float = 0.0
    dropped: list[str] = field(default_factory=list)


@dataclass
class Case:
    nodeid: str
    state: str
    """passed, failed, error or skipped."""
    message: str = ""


# --- copies and edits ---------------------------------------------------------------------------


def copy_tree(source: Path, dest: Path) -> None:
    shutil.copytree(source, dest, ignore=IGNORED, symlinks=True)


def apply(copy: Path, edits: Iterable[Edit]) -> None:
    """Apply the edits to the copy; raise if an old text is missing or not unique."""
    for edit in edits:
        path = copy / edit.path
        source = path.read_text()
        found = source.count(edit.old)
        if found != 1:
            raise BadMutation(f"{edit.path}: the text to replace occurs {found} times, not once:\n{edit.old}")
        mutated = source.replace(edit.old, edit.new)
        path.write_text(mutated)
        if path.read_text() != mutated or mutated == source:
            raise BadMutation(f"{edit.path}: the edit did not take")


class BadMutation(Exception):
    """A mutation's source text is no longer in the code, or the mutated code does not load."""


def check_syntax(copy: Path, edits: Iterable[Edit], redis_url: str | None) -> None:
    """Compile each edited Python file, SCRIPT LOAD each edited Lua file; raise BadMutation if broken."""
    for rel in sorted({e.path for e in edits}):
        path = copy / rel
        if rel.endswith(".py"):
            try:
                compile(path.read_text(), str(path), "exec")
            except SyntaxError as exc:
                raise BadMutation(f"{rel}: the mutated file does not compile: {exc}") from exc
        elif rel.endswith(".lua"):
            if redis_url is None:
                raise BadMutation(f"{rel}: no Redis to check the mutated script with")
            import redis as sync_redis

            client = sync_redis.Redis.from_url(redis_url)
            try:
                client.script_load(path.read_text())
            except sync_redis.ResponseError as exc:
                raise BadMutation(f"{rel}: the mutated script does not load: {exc}") from exc
            finally:
                client.close()


# --- running tests ------------------------------------------------------------------------------


def environment(copy: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in (copy, copy / "worker", copy / "cli"))
    return env


def canary(copy: Path) -> None:
    """A subprocess with the tests' environment imports the copy's packages, not the checkout's."""
    code = (
        "import titan_broker, titan_worker, titan_cli\n"
        "for m in (titan_broker, titan_worker, titan_cli): print(m.__file__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=copy, env=environment(copy),
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    files = done.stdout.split()
    if done.returncode != 0 or len(files) != 3 or not all(Path(f).is_relative_to(copy) for f in files):
        raise SystemExit(f"canary: the copy's code would not run in workers: {done.stdout}{done.stderr}")


def run_pytest(copy: Path, tests: Sequence[str], report: Path, *, stop_first: bool) -> tuple[int, str]:
    """Run the tests in the copy; return pytest's exit status and the end of its output."""
    args = [a for a in PYTEST_ARGS if stop_first or a != "-x"]
    cmd = [str(VENV_BIN / "pytest"), "--rootdir", str(copy), *args, "--junitxml", str(report), *tests]
    proc = subprocess.Popen(cmd, cwd=copy, env=environment(copy), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=RUN_LIMIT)
    except BaseException:  # a timeout or Ctrl-C: end this pytest and what it started, by its group id
        stop_group(proc)
        raise
    with contextlib.suppress(ProcessLookupError):  # what the tests left behind (a worker, a Redis
        os.killpg(proc.pid, signal.SIGKILL)  # a timed-out test had stopped) goes too
    return proc.returncode, out.decode(errors="replace")[-4000:]


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


def read_report(report: Path, copy: Path) -> list[Case]:
    if not report.exists():
        return []
    cases = []
    for case in ET.parse(report).getroot().iter("testcase"):
        nodeid = node_id(case.get("classname", ""), case.get("name", ""), copy)
        state, message = "passed", ""
        for kind in ("failure", "error", "skipped"):
            found = case.find(kind)
            if found is not None:
                state = {"failure": "failed"}.get(kind, kind)
                message = found.get("message") or (found.text or "")
                break
        cases.append(Case(nodeid, state, " ".join(message.split())[:200]))
    return cases


def node_id(classname: str, name: str, copy: Path) -> str:
    """tests.test_x[.Class] + name -> tests/test_x.py[::Class]::name."""
    parts = classname.split(".")
    for i in range(len(parts), 0, -1):
        path = "/".join(parts[:i]) + ".py"
        if (copy / path).exists():
            return "::".join([path, *parts[i:], name])
    return f"{classname}::{name}"


def belongs(case: str, nodeid: str) -> bool:
    return case == nodeid or case.startswith(nodeid + "[")


# --- the check ----------------------------------------------------------------------------------


def baseline(base: Path, work: Path, mutations: Sequence[Mutation]) -> set[str]:
    """Run every named test once, unmutated; return the node ids that did not pass there."""
    tests = list(dict.fromkeys(t for m in mutations for t in m.tests))
    print(f"baseline: {len(tests)} test(s) on the unmutated copy ...", flush=True)
    started = time.monotonic()
    report = work / "baseline.xml"
    status, output = run_pytest(base, tests, report, stop_first=False)
    cases = read_report(report, base)
    if status not in (0, 1) or not cases:
        raise SystemExit(f"baseline: pytest exited with {status}; its output ends with:\n{output}")
    bad = set()
    for nodeid in tests:
        mine = [c for c in cases if belongs(c.nodeid, nodeid)]
        if not mine:
            raise SystemExit(f"baseline: {nodeid} did not run:\n{output}")
        for c in mine:
            if c.state != "passed":
                print(f"  baseline: {c.nodeid} {c.state}: {c.message}", flush=True)
                bad.add(nodeid)
    print(f"baseline: done in {time.monotonic() - started:.0f} s; {len(bad)} test(s) dropped", flush=True)
    return bad


def check(mutation: Mutation, base: Path, work: Path, dropped: set[str]) -> Outcome:
    tests = [t for t in mutation.tests if t not in dropped]
    gone = [t for t in mutation.tests if t in dropped]
    if not tests:
        return Outcome("unproven", why="every named test fails unmutated", dropped=gone)
    copy = work / mutation.name
    copy_tree(base, copy)
    started = time.monotonic()
    try:
        apply(copy, mutation.edits)
        canary(copy)
        report = work / f"{mutation.name}.xml"
        status, output = run_pytest(copy, tests, report, stop_first=True)
        cases = read_report(report, copy)
    finally:
        shutil.rmtree(copy, ignore_errors=True)
    seconds = time.monotonic() - started
    failed = [c for c in cases if c.state in ("failed", "error")]
    if status == 1 and failed:
        first = failed[0]
        note = " (error)" if first.state == "error" else ""
        return Outcome("caught", first.nodeid + note, first.message, seconds, gone)
    if status == 0:
        ran = [c for c in cases if c.state == "passed"]
        skipped = [c for c in cases if c.state == "skipped"]
        if not ran:
            why = skipped[0].message if skipped else "nothing ran"
            return Outcome("unproven", why=f"every test skipped: {why}", seconds=seconds, dropped=gone)
        why = f"{len(ran)} test(s) passed" + (f", {len(skipped)} skipped" if skipped else "")
        return Outcome("survived", why=why, seconds=seconds, dropped=gone)
    return Outcome(
        "error", why=f"pytest exited with {status}: {output[-600:]}", seconds=seconds, dropped=gone
    )


def short(nodeid: str) -> str:
    return nodeid.removeprefix("tests/")


def print_table(rows: Sequence[tuple[Mutation, Outcome]]) -> None:
    print("\n| mutation | promise it breaks | test that caught it | result |")
    print("|---|---|---|---|")
    for m, o in rows:
        caught_by = (
            f"`{short(o.caught_by)}`"
            if o.caught_by
            else "none of: " + ", ".join(f"`{short(t)}`" for t in m.tests)
        )
        print(f"| `{m.name}` | {m.promise} | {caught_by} | {o.status} ({o.seconds:.0f} s) |")
    print()
    for m, o in rows:
        print(f"- {m.name}: {o.status}: {o.why}")
        if o.status == "survived" and m.gap:
            print(f"    would be caught by: {m.gap}")
        for t in o.dropped:
            print(f"    dropped (fails unmutated): {t}")


# --- the published table ------------------------------------------------------------------------

TABLE_HEAD = """# Reliability table: which test stands behind each promise

Generated by `tests/mutation_check.py --write-table {path}` from a full run of the mutation
check; do not edit it by hand. Each row breaks one documented promise in a scratch copy of the
code (a *mutation*) and names the test that failed because of it: the test that stands behind the
promise. *Seconds* is how long the mutated copy's tests ran until that test failed. CI runs the same
check (`make mutation`): a promise whose test no longer fails when it is broken fails the build.

| mutation | promise it breaks | test that catches it | seconds |
|---|---|---|---|
"""
NOT_CAUGHT = "not caught"


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def table_text(rows: Sequence[tuple[Mutation, Outcome]], path: str, total: float) -> str:
    lines = [TABLE_HEAD.format(path=path)]
    for m, o in rows:
        test = (
            f"`{o.caught_by.removesuffix(' (error)')}`"
            if o.status == "caught"
            else f"{NOT_CAUGHT} ({o.status})"
        )
        lines.append(f"| `{m.name}` | {cell(m.promise)} | {test} | {o.seconds:.0f} |\n")
    caught = sum(1 for _, o in rows if o.status == "caught")
    lines.append(
        f"\n{caught} of {len(rows)} mutations caught; the whole run (a baseline of every named test "
        f"unmutated, then each mutation) took {total:.0f} s on {os.cpu_count()} cores.\n"
    )
    return "".join(lines)


def read_table(path: Path) -> dict[str, tuple[str, str]]:
    """The published table's rows: mutation name -> (promise, test that catches it)."""
    rows = {}
    for line in path.read_text().splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip().replace("\\|", "|") for c in line.strip().strip("|").split(" | ")]
        if len(cells) == 4:
            rows[cells[0].strip("`")] = (cells[1], cells[2].strip("`"))
    return rows


def table_problems(mutations: Sequence[Mutation], path: Path) -> list[str]:
    """How the published table differs from the mutations here (names, promises, tests; not seconds)."""
    if not path.exists():
        return ["it does not exist"]
    published = read_table(path)
    problems = []
    for m in mutations:
        row = published.pop(m.name, None)
        if row is None:
            problems.append(f"{m.name!r} is not in it")
        elif row[0] != m.promise:
            problems.append(f"{m.name!r}: its promise reads {row[0]!r}, not {m.promise!r}")
        elif not any(belongs(row[1], t) for t in m.tests):  # a parametrized test names its case
            problems.append(f"{m.name!r}: {row[1]!r} is not one of the tests named to catch it")
    problems += [f"{name!r} is no longer a mutation" for name in published]
    return problems


# --- whether each mutation applies --------------------------------------------------------------


def try_mutation(m: Mutation, base: Path, work: Path, redis_url: str) -> str | None:
    """Why the mutation cannot be applied to a copy of ``base`` and loaded, or None when it can."""
    copy = work / f"try-{m.name}"
    copy_tree(base, copy)
    try:
        apply(copy, m.edits)
        check_syntax(copy, m.edits, redis_url)
    except BadMutation as exc:
        return str(exc)
    finally:
        shutil.rmtree(copy, ignore_errors=True)
    return None


def validate(mutations: Sequence[Mutation], base: Path, work: Path) -> dict[str, str | None]:
    """For each mutation: why it does not apply to today's code, or None when it does."""
    from titan_broker.testing._local_redis import LocalRedis  # a throwaway Redis to load mutated scripts

    with LocalRedis() as server:
        return {m.name: try_mutation(m, base, work, server.url) for m in mutations}


def report_problems(problems: dict[str, str | None], table: list[str]) -> int:
    """Print why mutations do not apply, and how the published table is stale; the exit status."""
    for name, why in problems.items():
        if why:
            print(f"mutation {name!r} no longer applies: update the table.\n{why}", file=sys.stderr)
    if table:
        print(f"{TABLE} is stale: run tests/mutation_check.py --write-table {TABLE}", file=sys.stderr)
        for problem in table:
            print(f"  {problem}", file=sys.stderr)
    return 2 if table or any(problems.values()) else 0


def list_mutations(mutations: Sequence[Mutation], base: Path, work: Path) -> int:
    problems = validate(mutations, base, work)
    print("| mutation | promise it breaks | files | tests | applies now |")
    print("|---|---|---|---|---|")
    for m in mutations:
        problem = problems[m.name]
        applies = "yes" if problem is None else f"NO: {problem.splitlines()[0]}"
        files = ", ".join(sorted({e.path for e in m.edits}))
        tests = ", ".join(f"`{short(t)}`" for t in m.tests)
        print(f"| `{m.name}` | {m.promise} | {files} | {tests} | {applies} |")
    return 2 if any(problems.values()) else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--list", action="store_true", help="show the mutations and whether each applies")
    parser.add_argument("--applies", action="store_true",
                        help=f"only check that every mutation applies and {TABLE} is current")  # fmt: skip
    parser.add_argument("--only", action="append", metavar="NAME", help="run this mutation (repeatable)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the tests")
    parser.add_argument("--write-table", metavar="PATH", help=f"write the full run's table there ({TABLE})")
    opts = parser.parse_args(argv)
    mutations = list(MUTATIONS)
    if opts.only:
        names = {m.name for m in MUTATIONS}
        unknown = sorted(set(opts.only) - names)
        if unknown:
            parser.error(f"unknown mutation(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        if opts.write_table:
            parser.error("--write-table needs a full run (no --only): the table lists every mutation")
        mutations = [m for m in MUTATIONS if m.name in opts.only]
    for sig in (signal.SIGTERM, signal.SIGHUP):  # stopped: end the pytest run and remove the copies
        signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))
    work = Path(tempfile.mkdtemp(prefix="mut-titan-"))
    try:
        started = time.monotonic()
        base = work / "base"
        copy_tree(ROOT, base)  # one snapshot: others may be editing the checkout meanwhile
        if opts.list:
            return list_mutations(mutations, base, work)
        # The published table is checked on a full run that does not rewrite it, and by --applies.
        stale = [] if opts.only or opts.write_table else table_problems(MUTATIONS, base / TABLE)
        status = report_problems(validate(mutations, base, work), stale)
        if status or opts.applies:
            if not status:
                print(f"every mutation ({len(mutations)}) applies; {TABLE} names them all")
            return status
        canary(base)
        dropped = set() if opts.no_baseline else baseline(base, work, mutations)
        rows = []
        for i, m in enumerate(mutations, 1):
            print(f"[{i}/{len(mutations)}] {m.name}: {', '.join(short(t) for t in m.tests)} ...", flush=True)
            outcome = check(m, base, work, dropped)
            print(f"    {outcome.status} in {outcome.seconds:.0f} s {outcome.caught_by} {outcome.why[:160]}",
                  flush=True)  # fmt: skip
            rows.append((m, outcome))
        print_table(rows)
        total = time.monotonic() - started
        print(f"\ntotal run time: {total:.0f} s")
        if opts.write_table:
            Path(opts.write_table).write_text(table_text(rows, opts.write_table, total))
            print(f"table written to {opts.write_table}")
        bad = [m.name for m, o in rows if o.status != "caught"]
        if bad:
            print(f"not caught: {', '.join(bad)}")
        return 1 if bad else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
