"""The official supabase-js, unchanged, in headless Chromium against the local Realtime.

Issue 3's "done when" for the JS client: it joins a public and a private channel and
sends and receives broadcasts with ack (protocol 2.0.0; broadcasts go out as binary
kind-3 frames and come back as kind-4 frames, which we check on the wire).
"""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import pytest

from devstack.jwt import user_token

from .conftest import Browser, Stack

pytestmark = pytest.mark.browser

TEXT = "héllo Zürich — 東京 🚀👩‍👩‍👧"

# In-page helpers: join a channel and resolve on SUBSCRIBED (or reject with the error),
# and wait for a condition with a deadline.
HELPERS = """
window.join = (client, topic, config) => new Promise((resolve, reject) => {
  const got = [];
  const ch = client.channel(topic, { config });
  ch.on("broadcast", { event: "greet" }, (m) => got.push(m.payload));
  ch.subscribe((status, err) => {
    if (status === "SUBSCRIBED") resolve({ ch, got });
    else if (status !== "CLOSED") {
      reject(new Error(`${status}: ${topic} ${JSON.stringify(config)}: ${err ? err.message : ""}`));
    }
  });
});
window.waitFor = async (pred, ms = 5000) => {
  const end = Date.now() + ms;
  while (!pred()) {
    if (Date.now() > end) throw new Error("waitFor timed out");
    await new Promise((r) => setTimeout(r, 20));
  }
};
window.client = (url, key, token, timeout = 2500) => {
  // A user's JWT the way a third-party-auth app passes it: supabase-js hands it to
  // PostgREST and to Realtime (which sends it as `access_token` when joining).
  const options = { realtime: { timeout } };
  if (token) options.accessToken = async () => token;
  else options.auth = { persistSession: false, autoRefreshToken: false };
  const c = window.supabase.createClient(url, key, options);
  // supabase-js resolves accessToken asynchronously; a join sent before that carries
  // no access_token (the apikey's role decides), so set it before subscribing.
  if (token) c.realtime.setAuth(token);
  return c;
};
// (a script ending in a function value would be called by Playwright's evaluate)
true;
"""


async def open_harness(
    browser: Browser, stack: Stack, name: str
) -> tuple[Any, dict[str, list[Any]]]:
    page = await browser.new_page(name)
    frames: dict[str, list[Any]] = {"sent": [], "received": []}

    def on_ws(ws: Any) -> None:
        frames.setdefault("urls", []).append(ws.url)
        ws.on("framesent", lambda payload: frames["sent"].append(payload))
        ws.on("framereceived", lambda payload: frames["received"].append(payload))

    page.on("websocket", on_ws)
    await page.goto(stack.url + "/__tests__/harness.html")
    await page.wait_for_function("window.harnessReady === true && !!window.supabase")
    await page.evaluate(HELPERS)
    return page, frames


async def test_public_channel_broadcast_with_ack_and_self(browser: Browser, stack: Stack) -> None:
    page, frames = await open_harness(browser, stack, "public")
    result = await page.evaluate(
        """async ({ url, key, text }) => {
          const a = client(url, key), b = client(url, key);
          const cfg = { broadcast: { ack: true, self: true } };
          const A = await join(a, "room-1", cfg);
          const B = await join(b, "room-1", cfg);
          const acks = [];
          for (let i = 0; i < 3; i++) {
            acks.push(await A.ch.send({ type: "broadcast", event: "greet", payload: { i, text } }));
          }
          await waitFor(() => A.got.length === 3 && B.got.length === 3);
          return { acks, a: A.got, b: B.got };
        }""",
        {"url": stack.url, "key": stack.anon_key, "text": TEXT},
    )
    expected = [{"i": i, "text": TEXT} for i in range(3)]
    assert result["acks"] == ["ok", "ok", "ok"]
    assert result["a"] == expected  # self: the sender hears itself
    assert result["b"] == expected
    assert any("vsn=2.0.0" in u for u in frames.get("urls", []))
    # supabase-js sends broadcasts as binary kind 3 and decodes kind 4 (ref §1)
    assert any(isinstance(f, bytes) and f[:1] == b"\x03" for f in frames["sent"])
    assert any(isinstance(f, bytes) and f[:1] == b"\x04" for f in frames["received"])


def _private_policies(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            """
            CREATE POLICY conf_read ON realtime.messages FOR SELECT TO authenticated
              USING (realtime.topic() IN ('conf-private', 'conf-readonly')
                     AND extension = 'broadcast'
                     AND (auth.jwt() ->> 'member') = 'yes');
            CREATE POLICY conf_write ON realtime.messages FOR INSERT TO authenticated
              WITH CHECK (realtime.topic() = 'conf-private' AND extension = 'broadcast'
                          AND (auth.jwt() ->> 'member') = 'yes');
            """
        )


async def test_private_channel_broadcast_with_ack_under_rls(browser: Browser, stack: Stack) -> None:
    _private_policies(stack.database_url)
    member = user_token(str(uuid.uuid4()), extra={"member": "yes"})
    other_member = user_token(str(uuid.uuid4()), extra={"member": "yes"})
    page, _ = await open_harness(browser, stack, "private")
    result = await page.evaluate(
        """async ({ url, key, member, other, text }) => {
          const cfg = { private: true, broadcast: { ack: true, self: true } };
          const A = await join(client(url, key, member), "conf-private", cfg);
          const B = await join(client(url, key, other), "conf-private", cfg);
          // the public topic of the same name is another namespace
          const P = await join(client(url, key), "conf-private", { broadcast: { self: true } });
          const ack = await A.ch.send({ type: "broadcast", event: "greet", payload: { text } });
          await waitFor(() => A.got.length === 1 && B.got.length === 1);
          await new Promise((r) => setTimeout(r, 300));
          return { ack, a: A.got, b: B.got, pub: P.got };
        }""",
        {
            "url": stack.url,
            "key": stack.anon_key,
            "member": member,
            "other": other_member,
            "text": TEXT,
        },
    )
    assert result["ack"] == "ok"
    assert result["a"] == [{"text": TEXT}]
    assert result["b"] == [{"text": TEXT}]
    assert result["pub"] == []


async def test_private_channel_refusals(browser: Browser, stack: Stack) -> None:
    _private_policies(stack.database_url)
    member = user_token(str(uuid.uuid4()), extra={"member": "yes"})
    stranger = user_token(str(uuid.uuid4()))
    page, _ = await open_harness(browser, stack, "refusals")
    result = await page.evaluate(
        """async ({ url, key, member, stranger }) => {
          const out = {};
          // read allowed, write not: the send is dropped silently, the ack never comes
          const R = await join(client(url, key, member), "conf-readonly",
                               { private: true, broadcast: { ack: true, self: true } });
          out.readonlyAck = await R.ch.send({ type: "broadcast", event: "greet", payload: {} });
          out.readonlyGot = R.got.length;
          // no read permission: the join is refused with the server's reason, after its
          // error backoff (5 s for real, 1 s here; the push timeout must outlast it)
          const c = client(url, key, stranger, 4000);
          try {
            await join(c, "conf-private", { private: true });
            out.join = "joined";
          } catch (e) {
            out.join = e.message;
          }
          c.removeAllChannels();
          return out;
        }""",
        {"url": stack.url, "key": stack.anon_key, "member": member, "stranger": stranger},
    )
    assert result["readonlyAck"] == "timed out"
    assert result["readonlyGot"] == 0
    assert result["join"].startswith("CHANNEL_ERROR")
    assert (
        "Unauthorized: You do not have permissions to read from this Channel topic"
        in (result["join"])
    )
