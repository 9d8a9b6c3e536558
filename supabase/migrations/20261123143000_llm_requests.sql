-- llm-token-relay: sessions, generation requests (the queue and the durable
-- transcript), row-level security, wake-ups, cancellation, and who may join a
-- session's private Realtime topic `llm-token:<session id>`.
--
-- Roles (Supabase): `authenticated` = a signed-in frontend user (auth.uid());
-- `service_role` and the table owner (the worker's direct DATABASE_URL) bypass
-- RLS. Users create and read their own rows; only the worker writes status,
-- leases and outputs; users may only *ask* for cancellation.

-- ---------------------------------------------------------------------------
-- Sessions: one per conversation; the owner of a session owns its topic.
-- ---------------------------------------------------------------------------
CREATE TABLE public.llm_sessions (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  owner uuid NOT NULL DEFAULT auth.uid(),
  -- Must match the worker's RELAY_TOPIC_TEMPLATE (default `llm-token:{session_id}`).
  topic text GENERATED ALWAYS AS ('llm-token:' || id::text) STORED,
  created_at timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX llm_sessions_topic ON public.llm_sessions (topic);
CREATE INDEX llm_sessions_owner ON public.llm_sessions (owner);

ALTER TABLE public.llm_sessions ENABLE ROW LEVEL SECURITY;
REVOKE ALL ON public.llm_sessions FROM anon, authenticated;
GRANT SELECT ON public.llm_sessions TO authenticated;
-- Users may choose the id (to subscribe before the first request); the owner is
-- always auth.uid() (its default), never chosen.
GRANT INSERT (id) ON public.llm_sessions TO authenticated;
GRANT ALL ON public.llm_sessions TO service_role;

CREATE POLICY llm_sessions_select_own ON public.llm_sessions
  FOR SELECT TO authenticated
  USING (owner = (SELECT auth.uid()));
CREATE POLICY llm_sessions_insert_own ON public.llm_sessions
  FOR INSERT TO authenticated
  WITH CHECK (owner = (SELECT auth.uid()));

-- ---------------------------------------------------------------------------
-- Requests: one row per generation. Inputs from the user, queue state and the
-- snapshot (text + next offset, checkpointed about once a second) from the worker.
-- ---------------------------------------------------------------------------
CREATE TABLE public.llm_requests (
  id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  session_id uuid NOT NULL DEFAULT gen_random_uuid()
    REFERENCES public.llm_sessions (id) ON DELETE CASCADE,
  owner uuid NOT NULL DEFAULT auth.uid(),
  -- inputs (validated by the worker: a malformed row is failed with its reason)
  provider text,
  model text,
  messages jsonb NOT NULL,
  params jsonb NOT NULL DEFAULT '{}'::jsonb,
  -- queue state
  status text NOT NULL DEFAULT 'queued'
    CHECK (status IN ('queued', 'running', 'done', 'failed', 'cancelled')),
  attempts integer NOT NULL DEFAULT 0,
  lease_owner text,
  lease_expires_at timestamptz,
  cancel_requested boolean NOT NULL DEFAULT false,
  -- outputs: the snapshot a late subscriber catches up from, then the result
  content text NOT NULL DEFAULT '',
  reasoning text NOT NULL DEFAULT '',
  next_offset integer NOT NULL DEFAULT 0 CHECK (next_offset >= 0),
  next_seq integer NOT NULL DEFAULT 0 CHECK (next_seq >= 0),
  token_count integer GENERATED ALWAYS AS (next_offset) STORED,
  finish_reason text,
  usage jsonb,
  error jsonb,
  -- timestamps
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now(),
  started_at timestamptz,
  checkpointed_at timestamptz,
  finished_at timestamptz
);
-- The claim scans only live rows, oldest first.
CREATE INDEX llm_requests_live ON public.llm_requests (created_at)
  WHERE status IN ('queued', 'running');
CREATE INDEX llm_requests_session ON public.llm_requests (session_id, created_at);
CREATE INDEX llm_requests_owner ON public.llm_requests (owner, created_at);

ALTER TABLE public.llm_requests ENABLE ROW LEVEL SECURITY;
REVOKE ALL ON public.llm_requests FROM anon, authenticated;
GRANT SELECT ON public.llm_requests TO authenticated;
-- Column grants: a user can only supply inputs; status, lease, attempts and
-- outputs keep their defaults until the worker writes them.
GRANT INSERT (id, session_id, provider, model, messages, params)
  ON public.llm_requests TO authenticated;
GRANT ALL ON public.llm_requests TO service_role;

CREATE POLICY llm_requests_select_own ON public.llm_requests
  FOR SELECT TO authenticated
  USING (owner = (SELECT auth.uid()));
CREATE POLICY llm_requests_insert_own ON public.llm_requests
  FOR INSERT TO authenticated
  WITH CHECK (owner = (SELECT auth.uid()));

-- A request names its session; the session is created on first use and must
-- belong to the same owner (otherwise B could attach to A's session and, through
-- it, to A's topic).
CREATE FUNCTION public.llm_requests_attach_session() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
DECLARE
  session_owner uuid;
BEGIN
  INSERT INTO public.llm_sessions (id, owner)
  VALUES (NEW.session_id, NEW.owner)
  ON CONFLICT (id) DO NOTHING;
  SELECT s.owner INTO session_owner FROM public.llm_sessions s WHERE s.id = NEW.session_id;
  IF session_owner IS DISTINCT FROM NEW.owner THEN
    RAISE EXCEPTION 'session % belongs to another user', NEW.session_id
      USING ERRCODE = '42501';
  END IF;
  RETURN NEW;
END;
$$;
REVOKE ALL ON FUNCTION public.llm_requests_attach_session() FROM PUBLIC, anon, authenticated;

CREATE TRIGGER llm_requests_attach_session
  BEFORE INSERT ON public.llm_requests
  FOR EACH ROW EXECUTE FUNCTION public.llm_requests_attach_session();

-- ---------------------------------------------------------------------------
-- Wake-ups: NOTIFY llm_requests '{"op": "queued"|"cancel", "id": ...}'.
-- Workers LISTEN for them and poll anyway (a NOTIFY can be missed).
-- ---------------------------------------------------------------------------
CREATE FUNCTION public.llm_requests_notify() RETURNS trigger
LANGUAGE plpgsql SET search_path = '' AS $$
BEGIN
  IF TG_OP = 'INSERT' OR (NEW.status = 'queued' AND OLD.status <> 'queued') THEN
    PERFORM pg_notify('llm_requests', json_build_object('op', 'queued', 'id', NEW.id)::text);
  ELSIF NEW.cancel_requested AND NOT OLD.cancel_requested THEN
    PERFORM pg_notify('llm_requests', json_build_object('op', 'cancel', 'id', NEW.id)::text);
  END IF;
  RETURN NULL;
END;
$$;

CREATE TRIGGER llm_requests_notify_insert
  AFTER INSERT ON public.llm_requests
  FOR EACH ROW EXECUTE FUNCTION public.llm_requests_notify();
CREATE TRIGGER llm_requests_notify_update
  AFTER UPDATE OF status, cancel_requested ON public.llm_requests
  FOR EACH ROW
  WHEN ((NEW.status = 'queued' AND OLD.status <> 'queued')
        OR (NEW.cancel_requested AND NOT OLD.cancel_requested))
  EXECUTE FUNCTION public.llm_requests_notify();

-- ---------------------------------------------------------------------------
-- Cancellation: the owner asks; a queued request is cancelled at once, a running
-- one is flagged and its worker aborts the upstream and tells the client.
-- Returns the status after the call, or NULL (not yours, unknown, or finished).
-- Frontends: supabase.rpc('cancel_llm_request', { request_id }).
-- ---------------------------------------------------------------------------
CREATE FUNCTION public.cancel_llm_request(request_id uuid) RETURNS text
LANGUAGE sql SECURITY DEFINER SET search_path = '' AS $$
  UPDATE public.llm_requests
  SET cancel_requested = true,
      status = CASE WHEN status = 'queued' THEN 'cancelled' ELSE status END,
      finished_at = CASE WHEN status = 'queued' THEN now() ELSE finished_at END,
      updated_at = now()
  WHERE id = request_id
    AND owner = (SELECT auth.uid())
    AND status IN ('queued', 'running')
  RETURNING status;
$$;
REVOKE ALL ON FUNCTION public.cancel_llm_request(uuid) FROM PUBLIC, anon;
GRANT EXECUTE ON FUNCTION public.cancel_llm_request(uuid) TO authenticated, service_role;

-- ---------------------------------------------------------------------------
-- Realtime authorization for private channels. Realtime checks a join by
-- SELECTing a probe row under RLS with `role`, `request.jwt.claims` and
-- `realtime.topic` set for the transaction: a user may receive broadcasts on
-- `llm-token:<session>` only for a session they own. No INSERT policy: users
-- cannot broadcast on these topics (no forged tokens); the worker publishes
-- with the service_role key, which bypasses RLS.
-- ---------------------------------------------------------------------------
CREATE POLICY llm_token_topic_owner_receives ON realtime.messages
  FOR SELECT TO authenticated
  USING (
    extension = 'broadcast'
    AND EXISTS (
      SELECT 1
      FROM public.llm_sessions s
      WHERE s.topic = (SELECT realtime.topic())
        AND s.owner = (SELECT auth.uid())
    )
  );
