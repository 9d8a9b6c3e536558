-- Every SQL statement of the request queue, as named blocks (`-- name: <key>`),
-- loaded once by worker/jobs/queries.py. Parameters are psycopg's %(name)s.
-- Time is the database's now(): one clock for every worker.

-- name: claim
-- Take up to %(limit)s requests: queued ones, and running ones whose lease
-- expired (their worker died). One statement: FOR UPDATE SKIP LOCKED makes
-- concurrent workers take disjoint rows without waiting for each other, and a
-- row another worker claimed since our snapshot fails the re-check of the WHERE
-- clause that FOR UPDATE performs on the newest row version.
-- messages and params come back as text: the worker decodes each row on its own
-- (worker/jobs/decode.py), so one undecodable row cannot fail the whole fetch.
WITH claimable AS (
  SELECT id
  FROM public.llm_requests
  WHERE status IN ('queued', 'running')
    AND (status = 'queued' OR lease_expires_at < now())
    AND NOT cancel_requested
    AND attempts < %(max_attempts)s
  ORDER BY created_at
  LIMIT %(limit)s
  FOR UPDATE SKIP LOCKED
)
UPDATE public.llm_requests AS r
SET status = 'running',
    lease_owner = %(worker)s,
    lease_expires_at = now() + make_interval(secs => %(lease_s)s),
    attempts = r.attempts + 1,
    started_at = coalesce(r.started_at, now()),
    updated_at = now()
FROM claimable
WHERE r.id = claimable.id
RETURNING r.id, r.session_id, r.owner, r.provider, r.model,
          r.messages::text AS messages, r.params::text AS params, r.attempts, r.content, r.reasoning, r.next_offset, r.next_seq,
          r.cancel_requested, r.created_at;

-- name: sweep
-- Settle rows no worker may claim: cancelled by their owner while queued or
-- while their worker was dead, or out of attempts after a crash.
UPDATE public.llm_requests
SET status = CASE WHEN cancel_requested THEN 'cancelled' ELSE 'failed' END,
    finish_reason = CASE WHEN cancel_requested THEN 'cancelled' ELSE finish_reason END,
    error = CASE WHEN cancel_requested THEN error
                 ELSE jsonb_build_object(
                   'type', 'attempts_exhausted',
                   'message', format('gave up after %%s attempts', attempts),
                   'retryable', false,
                   'last_error', error)
            END,
    lease_owner = NULL,
    lease_expires_at = NULL,
    finished_at = now(),
    updated_at = now()
WHERE status IN ('queued', 'running')
  AND (status = 'queued' OR lease_expires_at < now())
  AND (cancel_requested OR attempts >= %(max_attempts)s)
RETURNING id, session_id, status, attempts;

-- name: heartbeat
-- Extend the leases this worker still holds; a row missing from the result was
-- lost (reclaimed after expiry) and must not be written any more.
UPDATE public.llm_requests
SET lease_expires_at = now() + make_interval(secs => %(lease_s)s)
WHERE id = ANY(%(ids)s::uuid[])
  AND lease_owner = %(worker)s
  AND status = 'running'
RETURNING id, cancel_requested;

-- name: checkpoint
-- Store the snapshot (text + next offset); fenced by the lease.
UPDATE public.llm_requests
SET content = %(content)s,
    reasoning = %(reasoning)s,
    next_offset = %(next_offset)s,
    next_seq = %(next_seq)s,
    checkpointed_at = now(),
    updated_at = now()
WHERE id = %(id)s
  AND lease_owner = %(worker)s
  AND status = 'running'
RETURNING cancel_requested;

-- name: cancel_requested
SELECT id
FROM public.llm_requests
WHERE id = ANY(%(ids)s::uuid[])
  AND cancel_requested;

-- name: finish
-- The end of a request: done, failed or cancelled, with its final snapshot.
UPDATE public.llm_requests
SET status = %(status)s,
    content = %(content)s,
    reasoning = %(reasoning)s,
    next_offset = %(next_offset)s,
    next_seq = %(next_seq)s,
    finish_reason = %(finish_reason)s,
    usage = %(usage)s,
    error = %(error)s,
    lease_owner = NULL,
    lease_expires_at = NULL,
    checkpointed_at = now(),
    finished_at = now(),
    updated_at = now()
WHERE id = %(id)s
  AND lease_owner = %(worker)s
  AND status = 'running'
RETURNING id;

-- name: release
-- Give a request back to the queue with its snapshot, so the next worker
-- continues from it. A drain refunds the attempt: it was not the request's fault.
UPDATE public.llm_requests
SET status = 'queued',
    content = %(content)s,
    reasoning = %(reasoning)s,
    next_offset = %(next_offset)s,
    next_seq = %(next_seq)s,
    error = coalesce(%(error)s, error),
    attempts = greatest(attempts - %(refund)s, 0),
    lease_owner = NULL,
    lease_expires_at = NULL,
    checkpointed_at = now(),
    updated_at = now()
WHERE id = %(id)s
  AND lease_owner = %(worker)s
  AND status = 'running'
RETURNING id;

-- name: get
-- Not the inputs: a status read must work for a row whose messages cannot be decoded.
SELECT id, session_id, owner, provider, model, status, attempts,
       lease_owner, lease_expires_at, cancel_requested, content, reasoning,
       next_offset, next_seq, finish_reason, usage, error, created_at, finished_at
FROM public.llm_requests
WHERE id = %(id)s;

-- name: act_as_user
-- What PostgREST does for a request with a user's JWT: the role and the claims
-- for this transaction only, so RLS and auth.uid() see the user.
SELECT set_config('role', 'authenticated', true),
       set_config('request.jwt.claims', %(claims)s, true);

-- name: create_session
-- A session before any request, so a frontend can join its topic first.
INSERT INTO public.llm_sessions (id)
VALUES (coalesce(%(session_id)s::uuid, gen_random_uuid()))
RETURNING id;

-- name: submit
INSERT INTO public.llm_requests (session_id, provider, model, messages, params)
VALUES (coalesce(%(session_id)s::uuid, gen_random_uuid()),
        %(provider)s, %(model)s, %(messages)s, %(params)s)
RETURNING id, session_id;

-- name: cancel
SELECT public.cancel_llm_request(%(id)s::uuid) AS status;

-- name: append_chunks
-- The write-ahead token log: every stream's new tokens in one statement (one commit
-- per flush of the worker's writer, whatever the number of streams). The worker
-- sends one JSON parameter, a run per relay batch (`ChunkRun` as orjson writes it:
-- [{"job_id", "offset" (of the first text), "kind", "texts": [...]}, ...]), and gets
-- back one row: so its cost is per batch, not per token (the table keeps a row per
-- token: PostgREST readers see no difference).
-- Fenced by the lease: FOR KEY SHARE makes a concurrent claim (FOR UPDATE SKIP
-- LOCKED) pass this row by until we commit, and after a claim committed the re-check
-- of the WHERE clause on the newest row version finds another owner, so nothing is
-- written. ON CONFLICT DO NOTHING: an offset, once written, is never replaced.
-- `written`: rows inserted. `short`: the (0-based) runs not every offset of which
-- this statement wrote. An inserted offset counts for every run that carried it, as
-- when the caller checked each token's key against a RETURNING row per token.
WITH runs AS (
  SELECT r.run - 1 AS run, r.job_id AS request_id, r."offset" AS first_offset, r.kind,
         r.texts, json_array_length(r.texts) AS n
  FROM ROWS FROM (
    json_to_recordset(%(runs)s::json) AS (job_id uuid, "offset" integer, kind text, texts json)
  ) WITH ORDINALITY AS r(job_id, "offset", kind, texts, run)
),
owned AS (
  SELECT id
  FROM public.llm_requests
  WHERE id = ANY(%(ids)s::uuid[])
    AND lease_owner = %(worker)s
    AND status = 'running'
  FOR KEY SHARE
),
ins AS (
  INSERT INTO public.llm_request_chunks (request_id, token_offset, kind, text)
  SELECT runs.request_id, runs.first_offset + t.i::integer - 1, runs.kind, t.text
  FROM runs
  JOIN owned ON owned.id = runs.request_id
  CROSS JOIN LATERAL json_array_elements_text(runs.texts) WITH ORDINALITY AS t(text, i)
  ON CONFLICT DO NOTHING
  RETURNING request_id, token_offset
),
landed AS (
  SELECT request_id, count(*) AS n FROM ins GROUP BY request_id
),
-- A request as many of whose offsets landed as its runs carry has every run whole
-- (landed <= distinct offsets sent <= their sum). Only the others, rare (a lease
-- lost, an offset taken, runs overlapping), are judged run by run, offset by offset.
unsure AS (
  SELECT runs.request_id
  FROM runs
  LEFT JOIN landed USING (request_id)
  GROUP BY runs.request_id, landed.n
  HAVING coalesce(landed.n, 0) < sum(runs.n)
)
SELECT
  (SELECT coalesce(sum(n), 0) FROM landed)::integer AS written,
  ARRAY(
    SELECT runs.run
    FROM runs
    JOIN unsure USING (request_id)
    CROSS JOIN LATERAL generate_series(runs.first_offset, runs.first_offset + runs.n - 1)
      AS o(token_offset)
    LEFT JOIN ins ON ins.request_id = runs.request_id AND ins.token_offset = o.token_offset
    GROUP BY runs.run, runs.n
    HAVING count(ins.request_id) < runs.n
    ORDER BY runs.run
  ) AS short;

-- name: read_chunks
-- The logs of several requests, each from its own offset on (the heirs of a burst of
-- claims read theirs in one statement, not one each through the pool).
SELECT c.request_id, c.token_offset, c.kind, c.text
FROM unnest(%(ids)s::uuid[], %(from_offsets)s::integer[]) AS want (id, from_offset)
JOIN public.llm_request_chunks AS c
  ON c.request_id = want.id AND c.token_offset >= want.from_offset
ORDER BY c.request_id, c.token_offset;

-- name: prune_chunks
-- Retention: the chunks of requests that ended long enough ago (their row holds the
-- compacted transcript).
DELETE FROM public.llm_request_chunks AS c
USING public.llm_requests AS r
WHERE c.request_id = r.id
  AND r.status IN ('done', 'failed', 'cancelled')
  AND r.finished_at < now() - make_interval(secs => %(retention_s)s);
