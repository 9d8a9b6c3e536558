// The client rule of the llm-token-relay frontend contract, as a pure state machine.
//
// No I/O, no timers, no clock: the shell (llm-relay-client.js) feeds it the
// broadcasts it receives and the snapshot rows it reads, and asks it what to do
// next (`needsSnapshot()`). Everything here runs the same in node and a browser.
//
// The rule:
//   - apply tokens by `offset`: a message's first token sits at `offset`;
//   - drop what lies below the next expected offset (duplicates after retries,
//     or tokens already covered by a snapshot); apply the new tail of a message
//     that straddles it;
//   - hold what lies above it (a gap) until the gap fills, from a retried message
//     or from the snapshot row;
//   - a late or reconnecting subscriber merges the snapshot row (text + next
//     offset) and continues from the live messages.
//
// Offsets are stream-wide by default (one counter across content and reasoning,
// as the contract says); `offsetScope: "kind"` keeps one counter per kind.

/** @typedef {"content" | "reasoning"} TokenKind */

export const KINDS = Object.freeze(["content", "reasoning"]);
const STREAM_LANE = "*";

/**
 * Check a decoded `llm-token` payload; returns an error string or null.
 * @param {any} p
 * @returns {string | null}
 */
export function validateTokenPayload(p) {
  if (p === null || typeof p !== "object") return "payload is not an object";
  if (p.stream === undefined || p.stream === null) return "payload has no stream";
  if (!Number.isSafeInteger(p.offset) || p.offset < 0) return "offset is not a non-negative integer";
  if (!KINDS.includes(p.kind)) return `unknown kind ${JSON.stringify(p.kind)}`;
  if (!Array.isArray(p.tokens)) return "tokens is not an array";
  if (!p.tokens.every((t) => typeof t === "string")) return "a token is not a string";
  return null;
}

/**
 * The total token count a `llm-done` payload announces, if it says one.
 * @param {any} done
 * @returns {number | null}
 */
export function doneTotal(done) {
  if (!done || typeof done !== "object") return null;
  for (const key of ["next_offset", "total_tokens", "tokens"]) {
    const v = done[key];
    if (Number.isSafeInteger(v) && v >= 0) return v;
  }
  if (done.totals && typeof done.totals === "object") return doneTotal(done.totals);
  return null;
}

function newStats() {
  return {
    messages: 0, // llm-token messages received (live)
    tokens: 0, // tokens applied from live messages
    duplicateMessages: 0, // live messages re-sent: wholly below what live messages gave
    overtakenMessages: 0, // live messages a catch-up read or snapshot had already given
    duplicateTokens: 0, // tokens dropped (wholly or partly duplicate messages)
    gapsOpened: 0, // times a message arrived above the next expected offset
    gapsFilled: 0, // times held messages became applicable
    snapshotsMerged: 0, // snapshot rows that moved the text forward
    snapshotTokens: 0, // tokens covered by snapshots
    logTokens: 0, // tokens applied from the write-ahead token log (catch-up reads)
    invalid: 0, // malformed payloads ignored
  };
}

class Lane {
  constructor() {
    /** next expected offset */
    this.next = 0;
    /** @type {Map<number, {offset:number, kind:TokenKind, tokens:string[]}>} held above `next` */
    this.held = new Map();
    /** offset of the first live message seen, or null */
    this.firstLive = null;
    /** @type {Array<[number, number]>} ranges [start, end) given by the log or a snapshot */
    this.filled = [];
  }

  /** Record [start, end) as given by a catch-up read or a snapshot (merged, few). */
  fill(start, end) {
    if (end <= start) return;
    const last = this.filled[this.filled.length - 1];
    if (last && start <= last[1]) last[1] = Math.max(last[1], end);
    else this.filled.push([start, end]);
  }

  /** Whether a live message's range overlaps what a catch-up read or snapshot gave. */
  overtaken(start, end) {
    return this.filled.some(([a, b]) => start < b && a < end);
  }

  /** smallest held offset, or null */
  heldStart() {
    let min = null;
    for (const o of this.held.keys()) if (min === null || o < min) min = o;
    return min;
  }
}

/**
 * Hex SHA-256 of the UTF-8 bytes of `text` (the `llm-done` checksum), or null where
 * WebCrypto is unavailable (plain http on a non-local host).
 * @param {string} text
 * @returns {Promise<string | null>}
 */
export async function sha256Hex(text) {
  const subtle = globalThis.crypto?.subtle;
  if (!subtle) return null;
  const digest = await subtle.digest("SHA-256", new TextEncoder().encode(text));
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
}

/**
 * Compare the assembled texts with the checksums of an `llm-done` payload.
 * @returns {Promise<boolean | null>} null when there is nothing to compare
 */
export async function verifyChecksum(done, content, reasoning) {
  const sum = done?.checksum;
  if (!sum || sum.algorithm !== "sha256") return null;
  const [c, r] = await Promise.all([sha256Hex(content), sha256Hex(reasoning)]);
  if (c === null || r === null) return null;
  return c === sum.content && (sum.reasoning === undefined || r === sum.reasoning);
}

export class StreamAssembler {
  /**
   * @param {{stream?: string, offsetScope?: "stream" | "kind"}} [options]
   */
  constructor(options = {}) {
    this.stream = options.stream ?? null;
    this.offsetScope = options.offsetScope === "kind" ? "kind" : "stream";
    this.content = "";
    this.reasoning = "";
    /** @type {Map<string, Lane>} */
    this.lanes = new Map();
    this.status = null;
    this.error = null;
    this.done = null;
    this.lastSeq = -1;
    /** null until checked; then whether the text matches llm-done's checksums */
    this.verified = null;
    this.stats = newStats();
  }

  /** @param {TokenKind} kind */
  _lane(kind) {
    const key = this.offsetScope === "kind" ? kind : STREAM_LANE;
    let lane = this.lanes.get(key);
    if (!lane) {
      lane = new Lane();
      this.lanes.set(key, lane);
    }
    return lane;
  }

  /** Next expected offset (stream scope), or of one kind (kind scope). */
  nextOffset(kind = "content") {
    return this._lane(kind).next;
  }

  _append(kind, tokens) {
    if (tokens.length === 0) return;
    const text = tokens.join("");
    if (kind === "reasoning") this.reasoning += text;
    else this.content += text;
  }

  /**
   * Apply the part of `msg` at or above `lane.next`; `msg.offset <= lane.next`.
   * Returns the number of tokens applied.
   */
  _applyFrom(lane, msg) {
    const skip = lane.next - msg.offset;
    const fresh = msg.tokens.slice(skip);
    this.stats.duplicateTokens += Math.min(skip, msg.tokens.length);
    this._append(msg.kind, fresh);
    lane.next = Math.max(lane.next, msg.offset + msg.tokens.length);
    return fresh.length;
  }

  /** Apply every held message that the lane has reached. Returns messages drained. */
  _drain(lane) {
    let drained = 0;
    for (;;) {
      const start = lane.heldStart();
      if (start === null || start > lane.next) return drained;
      const msg = lane.held.get(start);
      lane.held.delete(start);
      drained += 1;
      if (start + msg.tokens.length <= lane.next) {
        this.stats.duplicateTokens += msg.tokens.length;
        continue;
      }
      this.stats.tokens += this._applyFrom(lane, msg);
    }
  }

  _hold(lane, msg) {
    const prev = lane.held.get(msg.offset);
    if (prev && prev.tokens.length >= msg.tokens.length) {
      this.stats.duplicateMessages += 1;
      this.stats.duplicateTokens += msg.tokens.length;
      return;
    }
    if (lane.held.size === 0) this.stats.gapsOpened += 1;
    lane.held.set(msg.offset, msg);
  }

  /**
   * Feed one `llm-token` payload (or a run of the token log: `source` "log").
   * @param {any} payload
   * @param {"live" | "log"} [source]
   * @returns {"applied" | "duplicate" | "held" | "invalid"}
   */
  pushTokens(payload, source = "live") {
    if (validateTokenPayload(payload) !== null) {
      this.stats.invalid += 1;
      return "invalid";
    }
    const fromLog = source === "log";
    if (!fromLog) this.stats.messages += 1;
    if (Number.isSafeInteger(payload.seq)) this.lastSeq = Math.max(this.lastSeq, payload.seq);
    const msg = { offset: payload.offset, kind: payload.kind, tokens: payload.tokens };
    const lane = this._lane(msg.kind);
    if (lane.firstLive === null) lane.firstLive = msg.offset;
    if (msg.offset + msg.tokens.length <= lane.next) {
      // Overlap between the log and live messages, in either order, is no re-send:
      // only a live message below what live messages gave counts as a duplicate.
      if (fromLog) return "duplicate";
      if (lane.overtaken(msg.offset, msg.offset + msg.tokens.length)) {
        this.stats.overtakenMessages += 1;
      } else {
        this.stats.duplicateMessages += 1;
      }
      this.stats.duplicateTokens += msg.tokens.length;
      return "duplicate";
    }
    if (msg.offset > lane.next) {
      this._hold(lane, msg);
      return "held";
    }
    const hadGap = lane.held.size > 0;
    const from = lane.next;
    const applied = this._applyFrom(lane, msg);
    if (fromLog) lane.fill(from, lane.next);
    if (fromLog) this.stats.logTokens += applied;
    else this.stats.tokens += applied;
    if (this._drain(lane) > 0 && hadGap) this.stats.gapsFilled += 1;
    return "applied";
  }

  /**
   * Merge a snapshot row: the text of the stream up to its next offset.
   * Only moves forward: a snapshot behind what we already have changes nothing.
   * @param {{content?: string|null, reasoning?: string|null, nextOffset?: number,
   *          nextOffsets?: {content?: number, reasoning?: number}}} snap
   * @returns {boolean} whether the text moved forward
   */
  applySnapshot(snap) {
    if (!snap) return false;
    if (this.offsetScope === "kind") {
      let moved = false;
      for (const kind of KINDS) {
        const next = snap.nextOffsets?.[kind];
        if (Number.isSafeInteger(next)) moved = this._mergeLane(kind, next, snap) || moved;
      }
      return moved;
    }
    if (!Number.isSafeInteger(snap.nextOffset)) return false;
    return this._mergeLane("content", snap.nextOffset, snap);
  }

  _mergeLane(kind, next, snap) {
    const lane = this._lane(kind);
    if (next <= lane.next) return false;
    const hadGap = lane.held.size > 0;
    this.stats.snapshotsMerged += 1;
    this.stats.snapshotTokens += next - lane.next;
    lane.fill(lane.next, next);
    const both = this.offsetScope === "stream";
    if (both || kind === "content") this.content = snap.content ?? "";
    if (both || kind === "reasoning") this.reasoning = snap.reasoning ?? "";
    lane.next = next;
    if (this._drain(lane) > 0 && hadGap) this.stats.gapsFilled += 1;
    return true;
  }

  /** @param {any} payload an `llm-status` payload */
  pushStatus(payload) {
    this.status = payload ?? null;
  }

  /** @param {any} payload an `llm-error` payload */
  pushError(payload) {
    this.error = payload ?? {};
  }

  /** @param {any} payload an `llm-done` payload */
  pushDone(payload) {
    this.done = payload ?? {};
  }

  /** Whether some lane holds messages above a gap. */
  hasGap() {
    for (const lane of this.lanes.values()) if (lane.held.size > 0) return true;
    return false;
  }

  /** Tokens known to be missing: done announced more than we have. */
  missingAtEnd() {
    const total = doneTotal(this.done);
    if (total === null || this.offsetScope === "kind") return 0;
    return Math.max(0, total - this._lane("content").next);
  }

  /** The shell should read the snapshot row: a gap is held, or the end is short. */
  needsSnapshot() {
    return this.hasGap() || (this.done !== null && this.missingAtEnd() > 0);
  }

  /** Done and whole: the text is final. */
  isComplete() {
    return this.done !== null && !this.hasGap() && this.missingAtEnd() === 0;
  }

  /** Failed for good: an error that the relay will not retry. */
  isFailed() {
    return this.error !== null && this.error.retryable !== true;
  }

  /** A plain snapshot of the state for callbacks (copied, safe to keep). */
  view() {
    return {
      stream: this.stream,
      content: this.content,
      reasoning: this.reasoning,
      status: this.status,
      error: this.error,
      done: this.done,
      complete: this.isComplete(),
      failed: this.isFailed(),
      gap: this.hasGap(),
      nextOffset: this._lane("content").next,
      verified: this.verified,
      stats: { ...this.stats },
    };
  }
}
