-- llm-token-relay: the write-ahead token log.
--
-- Nothing is broadcast before it is durable: the worker inserts each batch's tokens
-- here (one multi-row statement for all its streams per flush) before it sends the
-- batch to Realtime. So a dead worker's heir continues from exactly the last durable
-- offset, and a late or reconnecting client reads what it missed:
--
--   GET /rest/v1/llm_request_chunks?select=token_offset,kind,text
--       &request_id=eq.<id>&token_offset=gte.<next expected offset>&order=token_offset
--
-- One row per token. The column is `token_offset`, not `offset`: OFFSET is an SQL
-- keyword and `offset` is PostgREST's pagination parameter, so a column of that name
-- could not be filtered in a query string. Append-only for everyone but the worker;
-- rows of finished requests are deleted after RELAY_CHUNK_RETENTION_S (the request
-- row then holds the compacted transcript).

CREATE TABLE public.llm_request_chunks (
  request_id uuid NOT NULL REFERENCES public.llm_requests (id) ON DELETE CASCADE,
  token_offset integer NOT NULL CHECK (token_offset >= 0),
  kind text NOT NULL CHECK (kind IN ('content', 'reasoning')),
  text text NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now(),
  -- One token per offset, ever: a zombie worker's late write cannot replace a token
  -- that a subscriber may have seen (the insert is ON CONFLICT DO NOTHING).
  PRIMARY KEY (request_id, token_offset)
);

ALTER TABLE public.llm_request_chunks ENABLE ROW LEVEL SECURITY;

GRANT SELECT ON public.llm_request_chunks TO authenticated;
GRANT ALL ON public.llm_request_chunks TO service_role;

-- A user reads the chunks of their own requests only.
CREATE POLICY llm_request_chunks_select_own ON public.llm_request_chunks
  FOR SELECT TO authenticated
  USING (EXISTS (
    SELECT 1 FROM public.llm_requests r
    WHERE r.id = request_id AND r.owner = (SELECT auth.uid())
  ));
