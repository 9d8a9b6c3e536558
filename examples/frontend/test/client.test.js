// The shell around the assembler, against an in-memory stand-in of the two
// supabase-js calls it makes (channel + from().select().eq().maybeSingle()).
import assert from "node:assert/strict";
import { describe, it } from "node:test";

import { subscribeToSession, topicFor } from "../llm-relay-client.js";

class FakeSupabase {
  constructor(rows) {
    this.rows = rows; // stream id -> array of successive snapshot rows (last one repeats)
    this.reads = [];
    this.auth = null;
    this.removed = false;
    this.realtime = { setAuth: (t) => (this.auth = t) };
  }

  channel(topic, opts) {
    const handlers = [];
    const ch = {
      topic,
      opts,
      on: (type, filter, cb) => {
        handlers.push({ event: filter.event, cb });
        return ch;
      },
      subscribe: (cb) => {
        ch.state = cb;
        return ch;
      },
      deliver: (event, payload) => {
        for (const h of handlers) if (h.event === event) h.cb({ type: "broadcast", event, payload });
      },
    };
    this.ch = ch;
    return ch;
  }

  from(table) {
    const q = { table };
    const builder = {
      select: (cols) => ((q.cols = cols), builder),
      eq: (col, v) => ((q.col = col), (q.id = v), builder),
      gte: (col, v) => ((q.gteCol = col), (q.from = v), builder),
      order: (col, opts) => ((q.order = [col, opts]), builder),
      limit: (n) => ((q.limit = n), builder),
      // a list read (the token log): supabase-js builders are thenables
      then: (resolve, reject) => {
        this.reads.push(q);
        const rows = (this.chunks?.[q.id] ?? [])
          .filter((c) => c.token_offset >= q.from)
          .sort((x, y) => x.token_offset - y.token_offset)
          .slice(0, q.limit ?? Infinity);
        return Promise.resolve({ data: rows, error: null }).then(resolve, reject);
      },
      maybeSingle: async () => {
        this.reads.push(q);
        const list = this.rows[q.id] ?? [];
        const row = list.length > 1 ? list.shift() : list[0];
        return { data: row ?? null, error: null };
      },
    };
    return builder;
  }

  async removeChannel() {
    this.removed = true;
  }
}

const wait = (ms) => new Promise((r) => setTimeout(r, ms));
async function until(pred, ms = 2000) {
  const end = Date.now() + ms;
  while (!pred()) {
    if (Date.now() > end) throw new Error("timed out");
    await wait(2);
  }
}

const tok = (offset, tokens, kind = "content") => ({ v: 1, stream: "r1", seq: 0, offset, kind, tokens });

describe("subscribeToSession", () => {
  it("a late joiner catches up from the token log at its next expected offset", async () => {
    const sb = new FakeSupabase({ r1: [{ content: "", reasoning: "", next_offset: 0, status: "running" }] });
    sb.chunks = {
      r1: [
        { token_offset: 0, kind: "reasoning", text: "hm" },
        { token_offset: 1, kind: "content", text: "a" },
        { token_offset: 2, kind: "content", text: "b" },
        { token_offset: 3, kind: "content", text: "c" },
      ],
    };
    const sub = subscribeToSession(sb, { session: "s", gapTimeoutMs: 5 });
    sb.ch.state("SUBSCRIBED");
    sb.ch.deliver("llm-token", tok(4, ["d"])); // joined mid-stream: offsets 0..3 missed
    await until(() => sub.view("r1")?.content === "abcd");
    assert.equal(sub.view("r1").reasoning, "hm");
    assert.equal(sub.view("r1").stats.logTokens, 4);
    const log = sb.reads.find((q) => q.table === "llm_request_chunks");
    assert.deepEqual(
      [log.col, log.id, log.gteCol, log.from, log.order[0], log.cols],
      ["request_id", "r1", "token_offset", 0, "token_offset", "token_offset,kind,text"],
    );
  });

  it("a gap held longer than the gap timeout is read from the log, from the gap", async () => {
    const sb = new FakeSupabase({ r1: [{ content: "", reasoning: "", next_offset: 0, status: "running" }] });
    sb.chunks = { r1: ["a", "b", "c", "d"].map((text, i) => ({ token_offset: i, kind: "content", text })) };
    const sub = subscribeToSession(sb, { session: "s", gapTimeoutMs: 20 });
    sb.ch.state("SUBSCRIBED");
    sb.ch.deliver("llm-token", tok(0, ["a", "b"]));
    sb.ch.deliver("llm-token", tok(3, ["d"])); // offset 2 lost with a dead worker
    assert.equal(sb.reads.length, 0); // not at once: a retry may still fill it
    await until(() => sub.view("r1")?.content === "abcd");
    const log = sb.reads.find((q) => q.table === "llm_request_chunks");
    assert.equal(log.from, 2);
    sb.ch.deliver("llm-done", { stream: "r1", total_tokens: 4 });
    assert.equal(sub.view("r1").complete, true);
    // the late live copy of what the log gave is overtaken, not a re-send
    sb.ch.deliver("llm-token", tok(2, ["c"]));
    assert.equal(sub.view("r1").stats.overtakenMessages, 1);
    assert.equal(sub.view("r1").stats.duplicateMessages, 0);
    // a re-send of what live messages gave is a duplicate
    sb.ch.deliver("llm-token", tok(0, ["a", "b"]));
    assert.equal(sub.view("r1").stats.duplicateMessages, 1);
    // a log read overtaken by the live messages is not counted as a duplicate send
    const overtaken = { v: 1, stream: "r1", seq: -1, offset: 0, kind: "content", tokens: ["a", "b"] };
    assert.equal(sub.streams.get("r1").pushTokens(overtaken, "log"), "duplicate");
    assert.equal(sub.view("r1").stats.duplicateMessages, 1);
  });

  it("joins the private topic after setAuth", () => {
    const sb = new FakeSupabase({});
    const sub = subscribeToSession(sb, { session: "abc", accessToken: "jwt" });
    assert.equal(sub.topic, "llm-token:abc");
    assert.equal(topicFor("x", "t:{session}"), "t:x");
    assert.equal(sb.auth, "jwt");
    assert.deepEqual(sb.ch.opts, { config: { private: true } });
  });

  it("a late joiner re-reads the snapshot until it reaches the first live offset", async () => {
    const rows = {
      r1: [
        { content: "ab", reasoning: "", next_offset: 2, status: "running" },
        { content: "abcde", reasoning: "", next_offset: 5, status: "running" },
      ],
    };
    const sb = new FakeSupabase(rows);
    const views = [];
    const sub = subscribeToSession(sb, {
      session: "s",
      checkpointIntervalMs: 5,
      onUpdate: (v) => views.push(v),
    });
    sb.ch.state("SUBSCRIBED");
    sb.ch.deliver("llm-token", tok(4, ["e", "f"])); // joined mid-stream
    await until(() => sub.view("r1")?.content === "abcdef");
    assert.equal(sb.reads.filter((q) => q.table === "llm_requests").length, 2);
    assert.equal(sb.reads[0].table, "llm_requests");
    assert.equal(sb.reads[0].col, "id");
    sb.ch.deliver("llm-token", tok(6, ["g"]));
    sb.ch.deliver("llm-done", { stream: "r1", next_offset: 7 });
    assert.equal(sub.view("r1").complete, true);
    assert.equal(sub.view("r1").content, "abcdefg");
    assert.equal(views.at(-1).complete, true);
    await sub.unsubscribe();
    assert.equal(sb.removed, true);
  });

  it("after a rejoin it reads the snapshot and learns the end from the row status", async () => {
    const sb = new FakeSupabase({
      r1: [
        { content: "hello wörld", reasoning: "hm", next_offset: 4, status: "done", finish_reason: "stop" },
      ],
    });
    const sub = subscribeToSession(sb, { session: "s", checkpointIntervalMs: 5 });
    sb.ch.state("SUBSCRIBED");
    sb.ch.deliver("llm-token", tok(0, ["hm"], "reasoning"));
    sb.ch.deliver("llm-token", tok(1, ["hello"]));
    sb.ch.state("CHANNEL_ERROR"); // the socket was cut; the rest went out meanwhile
    sb.ch.state("SUBSCRIBED");
    await until(() => sub.view("r1").complete);
    assert.equal(sub.view("r1").content, "hello wörld");
    assert.equal(sub.view("r1").reasoning, "hm");
    assert.equal(sub.view("r1").done.finish_reason, "stop");
    assert.equal(sb.reads[0].cols, "content,reasoning,next_offset,status,finish_reason");
    assert.equal(sub.joins, 2);
    await sub.unsubscribe();
  });

  it("a watched stream is loaded on join, and a throwing callback breaks nothing", async () => {
    const sb = new FakeSupabase({ r1: [{ content: "x", reasoning: null, next_offset: 1, status: "running" }] });
    const sub = subscribeToSession(sb, {
      session: "s",
      streams: ["r1"],
      onUpdate: () => {
        throw new Error("boom");
      },
    });
    const orig = console.error;
    console.error = () => {};
    try {
      sb.ch.state("SUBSCRIBED");
      await until(() => sub.view("r1").content === "x");
      sb.ch.deliver("llm-token", tok(1, ["y"]));
      assert.equal(sub.view("r1").content, "xy");
    } finally {
      console.error = orig;
    }
    await sub.unsubscribe();
  });
});

describe("server-closed channel", () => {
  it("joins a fresh channel after CLOSED and reads the snapshot again", async () => {
    const sb = new FakeSupabase({ r1: [{ content: "abc", reasoning: "", next_offset: 3, status: "running" }] });
    const removed = [];
    sb.removeChannel = async (ch) => removed.push(ch);
    const sub = subscribeToSession(sb, { session: "s", resubscribeDelaysMs: [5] });
    const first = sb.ch;
    first.state("SUBSCRIBED");
    first.deliver("llm-token", tok(0, ["a"]));
    first.state("CLOSED"); // "Too many messages per second" + phx_close
    await until(() => sb.ch !== first);
    first.state("CLOSED"); // late callbacks of the old channel are ignored
    assert.deepEqual(removed, [first]);
    sb.ch.state("SUBSCRIBED");
    await until(() => sub.view("r1").content === "abc");
    assert.equal(sub.resubscribes, 1);
    assert.equal(sub.joins, 2);
    await sub.unsubscribe();
  });

  it("does not rejoin after unsubscribe()", async () => {
    const sb = new FakeSupabase({});
    const sub = subscribeToSession(sb, { session: "s", resubscribeDelaysMs: [5] });
    const first = sb.ch;
    await sub.unsubscribe();
    first.state("CLOSED");
    await wait(20);
    assert.equal(sb.ch, first);
    assert.equal(sub.resubscribes, 0);
  });
});
