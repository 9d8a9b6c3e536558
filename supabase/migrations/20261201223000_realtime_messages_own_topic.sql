-- A broadcast row is readable only in its own topic's context (issue 12).
--
-- The policy of 20261123143000 checked the channel being joined (realtime.topic())
-- against the caller's sessions, but not the row's own `topic`: a `realtime.send`
-- row of another topic was readable from the context of a topic the caller owns.
-- Realtime evaluates the policy per row, so the row must belong to that topic too.
ALTER POLICY llm_token_topic_owner_receives ON realtime.messages
  USING (
    extension = 'broadcast'
    AND topic = (SELECT realtime.topic())
    AND EXISTS (
      SELECT 1
      FROM public.llm_sessions s
      WHERE s.topic = (SELECT realtime.topic())
        AND s.owner = (SELECT auth.uid())
    )
  );
