// Subscribe to an llm-token-relay session with the official supabase-js client.
//
// Dependency-free ES module: pass in your own supabase-js client. It joins
// `llm-token:<session>` (private by default), reassembles each stream with the
// client rule (reassembly.js), catches up late and reconnecting subscribers from
// the write-ahead token log (`llm_request_chunks`, read through PostgREST under
// RLS from the next expected offset) and the request row (final text, status),
// and reports every change through one callback.
//
//   import { subscribeToSession } from "./llm-relay-client.js";
//   const sub = subscribeToSession(supabase, {
//     session, accessToken: userJwt,
//     onUpdate: (view) => render(view.content, view.reasoning),
//   });
//   sub.watch(requestId);    // load its snapshot now (optional)
//   await sub.unsubscribe();

import { StreamAssembler, verifyChecksum } from "./reassembly.js";

export { StreamAssembler } from "./reassembly.js";

export const EVENTS = Object.freeze({
  token: "llm-token",
  done: "llm-done",
  error: "llm-error",
  status: "llm-status",
});

const DEFAULT_SNAPSHOT = Object.freeze({
  table: "llm_requests",
  idColumn: "id",
  contentColumn: "content",
  reasoningColumn: "reasoning",
  nextOffsetColumn: "next_offset",
  statusColumn: "status",
  finishReasonColumn: "finish_reason",
});

const DEFAULT_LOG = Object.freeze({
  table: "llm_request_chunks",
  requestColumn: "request_id",
  offsetColumn: "token_offset",
  kindColumn: "kind",
  textColumn: "text",
  pageSize: 1000, // Supabase's default max rows per read
});

/** Row statuses that mean the stream ended; its row then holds the final text. */
export const DONE_STATUSES = Object.freeze(["done", "completed", "succeeded"]);
export const FAILED_STATUSES = Object.freeze(["failed", "error", "cancelled", "canceled"]);

/** Rows of the token log as `llm-token`-shaped payloads (one per run of one kind). */
export function chunkPayloads(stream, rows, columns = DEFAULT_LOG) {
  const out = [];
  let run = null;
  for (const row of rows) {
    const offset = row[columns.offsetColumn];
    const kind = row[columns.kindColumn];
    if (run && (run.kind !== kind || run.offset + run.tokens.length !== offset)) {
      out.push(run);
      run = null;
    }
    if (!run) run = { v: 1, stream, seq: -1, offset, kind, tokens: [] };
    run.tokens.push(row[columns.textColumn]);
  }
  if (run) out.push(run);
  return out;
}

/** The topic of a session, from a template with `{session}` in it. */
export function topicFor(session, template = "llm-token:{session}") {
  return template.replace("{session}", String(session));
}

/**
 * @param {any} supabase a client from `createClient()` of @supabase/supabase-js
 * @param {import("./llm-relay-client").SubscribeOptions} options
 * @returns {import("./llm-relay-client").SessionSubscription}
 */
export function subscribeToSession(supabase, options) {
  if (!supabase || typeof supabase.channel !== "function") {
    throw new TypeError("subscribeToSession needs a supabase-js client");
  }
  if (!options || options.session === undefined || options.session === null) {
    throw new TypeError("subscribeToSession needs options.session");
  }
  return new Subscription(supabase, options);
}

class Subscription {
  constructor(supabase, options) {
    this.supabase = supabase;
    this.options = options;
    this.topic = topicFor(options.session, options.topicTemplate);
    // A held gap older than this is read from the token log (the live message that
    // would fill it may be gone with a dead worker, or still be retried).
    this.gapTimeoutMs = options.gapTimeoutMs ?? options.checkpointIntervalMs ?? 300;
    this.snapshot =
      options.snapshot === false ? null : { ...DEFAULT_SNAPSHOT, ...(options.snapshot ?? {}) };
    this.log = options.log === false ? null : { ...DEFAULT_LOG, ...(options.log ?? {}) };
    this.now = options.now ?? (() => performance.now());
    /** @type {Map<string, StreamAssembler>} */
    this.streams = new Map();
    /** stream id -> {timer, inFlight} */
    this._reads = new Map();
    this.channelState = "joining";
    this.closed = false;
    this.joins = 0;
    this.messages = 0;

    this.resubscribeDelaysMs = options.resubscribeDelaysMs ?? [1000, 2000, 5000, 10000];
    this.resubscribes = 0;
    this._resubscribeTimer = null;

    if (options.accessToken) supabase.realtime.setAuth(options.accessToken);
    this.channel = this._join();
    for (const id of options.streams ?? []) this.watch(id);
  }

  _join() {
    const config = { private: this.options.private !== false };
    if (this.options.broadcast) config.broadcast = this.options.broadcast;
    const channel = this.supabase.channel(this.topic, { config });
    channel
      .on("broadcast", { event: EVENTS.token }, (m) => this._onToken(m.payload))
      .on("broadcast", { event: EVENTS.status }, (m) => this._onMeta("status", m.payload))
      .on("broadcast", { event: EVENTS.error }, (m) => this._onMeta("error", m.payload))
      .on("broadcast", { event: EVENTS.done }, (m) => this._onMeta("done", m.payload))
      .subscribe((state, err) => {
        // a replaced channel's late callbacks are not ours any more
        if (channel === this.channel) this._onChannel(state, err);
      });
    return channel;
  }

  /**
   * The server closed the channel (`phx_close` after "Too many messages per second",
   * a revoked permission, an expired token): supabase-js removes it and never rejoins,
   * so join a new one, with backoff; the rejoin reads the snapshots.
   */
  _scheduleResubscribe() {
    if (this.closed || this._resubscribeTimer) return;
    const delays = this.resubscribeDelaysMs;
    if (!delays.length) return;
    const delay = delays[Math.min(this.resubscribes, delays.length - 1)];
    this._resubscribeTimer = setTimeout(async () => {
      this._resubscribeTimer = null;
      if (this.closed) return;
      this.resubscribes += 1;
      const old = this.channel;
      this.channel = null;
      try {
        await this.supabase.removeChannel(old);
      } catch {
        // already gone
      }
      if (!this.closed) this.channel = this._join();
    }, delay);
  }

  /** The assembler of a stream, created on first sight. */
  _stream(id) {
    const key = String(id);
    let s = this.streams.get(key);
    if (!s) {
      s = new StreamAssembler({ stream: key, offsetScope: this.options.offsetScope });
      s.firstSeenAt = this.now();
      this.streams.set(key, s);
    }
    return s;
  }

  _emit(stream, event) {
    if (stream.isComplete() && stream.verified === null && !stream.verifying) this._verify(stream);
    const view = stream.view();
    view.channel = this.channelState;
    try {
      this.options.onUpdate?.(view, event);
    } catch (err) {
      // a throwing callback must not break reassembly of the next message
      console.error("llm-relay onUpdate callback failed", err);
    }
  }

  /** Once complete, check the text against llm-done's SHA-256 (async WebCrypto). */
  async _verify(stream) {
    stream.verifying = true;
    const ok = await verifyChecksum(stream.done, stream.content, stream.reasoning);
    if (ok === null || this.closed) return;
    stream.verified = ok;
    this._emit(stream, { type: "verified", ok, at: this.now() });
  }

  _onToken(payload) {
    if (this.closed || !payload || payload.stream === undefined) return;
    this.messages += 1;
    const stream = this._stream(payload.stream);
    const at = this.now();
    if (stream.firstTokenAt === undefined) stream.firstTokenAt = at;
    stream.lastMessageAt = at;
    const outcome = stream.pushTokens(payload);
    this._emit(stream, { type: "token", outcome, payload, at });
    this._scheduleRead(stream);
  }

  _onMeta(kind, payload) {
    if (this.closed || !payload || payload.stream === undefined) return;
    this.messages += 1;
    const stream = this._stream(payload.stream);
    if (kind === "status") stream.pushStatus(payload);
    else if (kind === "error") stream.pushError(payload);
    else stream.pushDone(payload);
    this._emit(stream, { type: kind, payload, at: this.now() });
    this._scheduleRead(stream);
  }

  _onChannel(state, err) {
    this.channelState = state;
    if (state === "CLOSED" && !this.closed) this._scheduleResubscribe();
    if (state === "SUBSCRIBED") {
      this.joins += 1;
      // (Re)joined: whatever was broadcast while we were away is only in the
      // snapshot row, so read it for every stream not yet complete.
      for (const stream of this.streams.values()) {
        if (!stream.isComplete() && !stream.isFailed()) this._readSnapshot(stream);
      }
    }
    this.options.onChannel?.(state, err ?? null);
  }

  /**
   * Read the snapshot when the assembler needs it (a gap, or done but short),
   * then again every checkpoint interval while it still does.
   */
  _scheduleRead(stream) {
    if (!this.snapshot || this.closed || !stream.needsSnapshot()) return;
    let r = this._reads.get(stream.stream);
    if (r && (r.timer || r.inFlight)) return;
    // Joined late (nothing applied yet): read now. A gap in a stream we follow
    // usually fills by itself (retries, pipelining): read once it is old.
    if (stream.nextOffset() === 0 && stream.content === "" && stream.reasoning === "") {
      this._readSnapshot(stream);
      return;
    }
    if (!r) {
      r = { timer: null, inFlight: false };
      this._reads.set(stream.stream, r);
    }
    r.timer = setTimeout(() => {
      r.timer = null;
      if (stream.needsSnapshot()) this._readSnapshot(stream);
    }, this.gapTimeoutMs);
  }

  async _readSnapshot(stream) {
    if (!this.snapshot || this.closed) return;
    let r = this._reads.get(stream.stream);
    if (!r) {
      r = { timer: null, inFlight: false };
      this._reads.set(stream.stream, r);
    }
    if (r.inFlight) return;
    if (r.timer) {
      clearTimeout(r.timer);
      r.timer = null;
    }
    r.inFlight = true;
    const s = this.snapshot;
    const cols = [
      s.contentColumn,
      s.reasoningColumn,
      s.nextOffsetColumn,
      s.statusColumn,
      s.finishReasonColumn,
    ];
    let result;
    try {
      result = await this.supabase
        .from(s.table)
        .select(cols.filter(Boolean).join(","))
        .eq(s.idColumn, stream.stream)
        .maybeSingle();
    } catch (err) {
      result = { data: null, error: err };
    } finally {
      r.inFlight = false;
    }
    if (this.closed) return;
    const { data, error } = result;
    if (error) {
      this._emit(stream, { type: "snapshot-error", error, at: this.now() });
    } else if (data) {
      const moved = stream.applySnapshot({
        content: data[s.contentColumn],
        reasoning: data[s.reasoningColumn],
        nextOffset: data[s.nextOffsetColumn],
        nextOffsets: {
          content: data[`content_${s.nextOffsetColumn}`],
          reasoning: data[`reasoning_${s.nextOffsetColumn}`],
        },
      });
      stream.rowStatus = s.statusColumn ? (data[s.statusColumn] ?? null) : null;
      const terminal =
        DONE_STATUSES.includes(stream.rowStatus) || FAILED_STATUSES.includes(stream.rowStatus);
      // The row is written at the end; while the stream runs its text is in the log.
      if (this.log && !terminal && !this.closed) await this._readLog(stream, r);
      this._settleFromRow(stream, data);
      this._emit(stream, { type: "snapshot", moved, row: data, at: this.now() });
    }
    // Still short of the held live messages (or of the announced end): the tokens
    // are being written, read again after the gap timeout.
    if (stream.needsSnapshot() && !this.closed && !r.timer) {
      r.timer = setTimeout(() => {
        r.timer = null;
        this._readSnapshot(stream);
      }, this.gapTimeoutMs);
    }
  }

  /**
   * Catch up from the write-ahead token log: every token at and after the next
   * expected offset, in pages, applied with the client rule like live messages.
   *
   *   GET /rest/v1/llm_request_chunks?select=token_offset,kind,text
   *       &request_id=eq.<id>&token_offset=gte.<next>&order=token_offset&limit=1000
   */
  async _readLog(stream, r) {
    const l = this.log;
    r.inFlight = true;
    try {
      for (;;) {
        const from = stream.nextOffset();
        const { data, error } = await this.supabase
          .from(l.table)
          .select([l.offsetColumn, l.kindColumn, l.textColumn].join(","))
          .eq(l.requestColumn, stream.stream)
          .gte(l.offsetColumn, from)
          .order(l.offsetColumn, { ascending: true })
          .limit(l.pageSize);
        if (this.closed) return;
        if (error) {
          this._emit(stream, { type: "log-error", error, at: this.now() });
          return;
        }
        const rows = data ?? [];
        for (const payload of chunkPayloads(stream.stream, rows, l)) stream.pushTokens(payload, "log");
        if (rows.length) this._emit(stream, { type: "log", tokens: rows.length, at: this.now() });
        if (rows.length < l.pageSize || stream.nextOffset() === from) return;
      }
    } catch (error) {
      this._emit(stream, { type: "log-error", error, at: this.now() });
    } finally {
      r.inFlight = false;
    }
  }

  /**
   * A subscriber that was away when `llm-done` / `llm-error` went out learns the
   * end from the row: a terminal status with the final text.
   */
  _settleFromRow(stream, row) {
    if (stream.done !== null || stream.isFailed()) return;
    const status = stream.rowStatus;
    const s = this.snapshot;
    if (DONE_STATUSES.includes(status)) {
      stream.pushDone({
        stream: stream.stream,
        status,
        finish_reason: s.finishReasonColumn ? (row[s.finishReasonColumn] ?? null) : null,
        next_offset: row[s.nextOffsetColumn],
        from_snapshot: true,
      });
    } else if (FAILED_STATUSES.includes(status)) {
      stream.pushError({ stream: stream.stream, type: status, retryable: false, from_snapshot: true });
    }
  }

  /** Follow a stream by id (e.g. the request row you just inserted); reads its snapshot. */
  watch(streamId) {
    const stream = this._stream(streamId);
    if (this.channelState === "SUBSCRIBED") this._readSnapshot(stream);
    return stream.view();
  }

  /** The current view of one stream, or null. */
  view(streamId) {
    const s = this.streams.get(String(streamId));
    return s ? s.view() : null;
  }

  /** Leave the channel and stop reading snapshots. */
  async unsubscribe() {
    this.closed = true;
    if (this._resubscribeTimer) clearTimeout(this._resubscribeTimer);
    for (const r of this._reads.values()) if (r.timer) clearTimeout(r.timer);
    this._reads.clear();
    await this.supabase.removeChannel(this.channel);
  }
}
