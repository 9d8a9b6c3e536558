import assert from "node:assert/strict";
import { describe, it } from "node:test";

import { StreamAssembler, doneTotal, validateTokenPayload } from "../reassembly.js";

/** Split `text` into tokens of 1..3 code points (multi-byte safe). */
function tokenize(text, seed = 7) {
  const chars = Array.from(text);
  const out = [];
  let i = 0;
  let s = seed;
  while (i < chars.length) {
    s = (s * 1103515245 + 12345) & 0x7fffffff;
    const n = 1 + (s % 3);
    out.push(chars.slice(i, i + n).join(""));
    i += n;
  }
  return out;
}

/** Batches of `size` tokens, with stream-wide offsets, all of one kind. */
function batches(tokens, size, kind = "content", start = 0, seq0 = 0) {
  const out = [];
  for (let i = 0; i < tokens.length; i += size) {
    out.push({
      v: 1,
      stream: "s1",
      seq: seq0 + out.length,
      offset: start + i,
      kind,
      tokens: tokens.slice(i, i + size),
    });
  }
  return out;
}

/** A deterministic shuffle (Fisher-Yates with a small LCG). */
function shuffle(items, seed) {
  const a = items.slice();
  let s = seed;
  for (let i = a.length - 1; i > 0; i--) {
    s = (s * 1103515245 + 12345) & 0x7fffffff;
    const j = s % (i + 1);
    [a[i], a[j]] = [a[j], a[i]];
  }
  return a;
}

const TEXT = "Grüße aus Zürich — 東京の夜 🌃🚀, naïve café; emoji 👩‍👩‍👧 and plain ASCII too.";

describe("in-order delivery", () => {
  it("concatenates tokens exactly", () => {
    const a = new StreamAssembler();
    for (const m of batches(tokenize(TEXT), 4)) assert.equal(a.pushTokens(m), "applied");
    assert.equal(a.content, TEXT);
    assert.equal(a.reasoning, "");
    assert.equal(a.stats.duplicateTokens, 0);
    assert.equal(a.stats.gapsOpened, 0);
  });

  it("separates reasoning from content with one stream-wide offset", () => {
    const a = new StreamAssembler();
    const r = tokenize("let me think… 考える", 3);
    const c = tokenize("The answer is 42 ✅", 5);
    for (const m of batches(r, 2, "reasoning")) a.pushTokens(m);
    for (const m of batches(c, 2, "content", r.length, 100)) a.pushTokens(m);
    assert.equal(a.reasoning, "let me think… 考える");
    assert.equal(a.content, "The answer is 42 ✅");
    assert.equal(a.nextOffset(), r.length + c.length);
  });
});

describe("duplicates", () => {
  it("drops a message that is wholly below the next offset", () => {
    const a = new StreamAssembler();
    const ms = batches(tokenize(TEXT), 5);
    a.pushTokens(ms[0]);
    a.pushTokens(ms[1]);
    assert.equal(a.pushTokens(ms[0]), "duplicate");
    assert.equal(a.pushTokens(ms[1]), "duplicate");
    for (const m of ms.slice(2)) a.pushTokens(m);
    assert.equal(a.content, TEXT);
    assert.equal(a.stats.duplicateMessages, 2);
    assert.equal(a.stats.duplicateTokens, ms[0].tokens.length + ms[1].tokens.length);
  });

  it("a live message a catch-up read already gave is overtaken, not a duplicate send", () => {
    const a = new StreamAssembler();
    const ms = batches(tokenize(TEXT), 5);
    a.pushTokens(ms[0]);
    // ms[1] is late (REST and the socket crossed): the gap is filled from the log
    assert.equal(a.pushTokens(ms[2]), "held");
    assert.equal(a.pushTokens(ms[1], "log"), "applied");
    assert.equal(a.pushTokens(ms[1]), "duplicate"); // the late live copy
    assert.equal(a.stats.duplicateMessages, 0);
    assert.equal(a.stats.overtakenMessages, 1);
    // a real re-send of a live-delivered message still counts
    assert.equal(a.pushTokens(ms[0]), "duplicate");
    assert.equal(a.stats.duplicateMessages, 1);
    for (const m of ms.slice(3)) a.pushTokens(m);
    assert.equal(a.content, TEXT);
  });

  it("applies only the new tail of a straddling message (token-by-token after a batch)", () => {
    const a = new StreamAssembler();
    const toks = tokenize(TEXT);
    a.pushTokens({ stream: "s1", offset: 0, kind: "content", tokens: toks.slice(0, 6) });
    // a retried batch that overlaps by 3 tokens
    assert.equal(
      a.pushTokens({ stream: "s1", offset: 3, kind: "content", tokens: toks.slice(3, 10) }),
      "applied",
    );
    for (let i = 8; i < toks.length; i++) {
      a.pushTokens({ stream: "s1", offset: i, kind: "content", tokens: [toks[i]] });
    }
    assert.equal(a.content, TEXT);
    assert.equal(a.stats.duplicateTokens, 3 + 2);
  });
});

describe("gaps", () => {
  it("holds messages above a gap and applies them once it fills", () => {
    const a = new StreamAssembler();
    const ms = batches(tokenize(TEXT), 3);
    a.pushTokens(ms[0]);
    assert.equal(a.pushTokens(ms[2]), "held");
    assert.equal(a.pushTokens(ms[3]), "held");
    assert.equal(a.content, ms[0].tokens.join(""));
    assert.equal(a.hasGap(), true);
    assert.equal(a.needsSnapshot(), true);
    assert.equal(a.pushTokens(ms[1]), "applied");
    assert.equal(a.hasGap(), false);
    assert.equal(a.stats.gapsOpened, 1);
    assert.equal(a.stats.gapsFilled, 1);
    for (const m of ms.slice(4)) a.pushTokens(m);
    assert.equal(a.content, TEXT);
  });

  it("reassembles any permutation with duplicates to the exact text", () => {
    const toks = tokenize(TEXT, 11);
    const ms = batches(toks, 2);
    for (let seed = 1; seed <= 50; seed++) {
      const a = new StreamAssembler();
      const withDups = ms.concat(ms.filter((_, i) => (i * seed) % 3 === 0));
      for (const m of shuffle(withDups, seed)) a.pushTokens(m);
      assert.equal(a.content, TEXT, `seed ${seed}`);
      assert.equal(a.hasGap(), false);
      assert.equal(a.stats.tokens, toks.length);
    }
  });

  it("keeps the longer of two held messages at the same offset", () => {
    const a = new StreamAssembler();
    const toks = tokenize(TEXT);
    a.pushTokens({ stream: "s1", offset: 5, kind: "content", tokens: [toks[5]] });
    a.pushTokens({ stream: "s1", offset: 5, kind: "content", tokens: toks.slice(5, 9) });
    a.pushTokens({ stream: "s1", offset: 0, kind: "content", tokens: toks.slice(0, 5) });
    assert.equal(a.content, toks.slice(0, 9).join(""));
  });
});

describe("snapshot merge", () => {
  const toks = tokenize(TEXT, 3);
  const ms = batches(toks, 4);
  const snapAt = (n) => ({ content: toks.slice(0, n).join(""), reasoning: "", nextOffset: n });

  it("a late subscriber: snapshot then live messages, overlap dropped", () => {
    const a = new StreamAssembler();
    // joined mid-stream: the first live message is ms[3]
    for (const m of ms.slice(3, 5)) a.pushTokens(m);
    assert.equal(a.content, "");
    assert.equal(a.needsSnapshot(), true);
    // the snapshot is ahead of the first live offset: everything fits
    assert.equal(a.applySnapshot(snapAt(14)), true);
    assert.equal(a.hasGap(), false);
    for (const m of ms.slice(5)) a.pushTokens(m);
    assert.equal(a.content, TEXT);
    assert.equal(a.stats.snapshotsMerged, 1);
  });

  it("a snapshot that ends before the first live offset leaves the gap open", () => {
    const a = new StreamAssembler();
    for (const m of ms.slice(4, 6)) a.pushTokens(m);
    a.applySnapshot(snapAt(10)); // checkpoint older than the first live message (16)
    assert.equal(a.content, toks.slice(0, 10).join(""));
    assert.equal(a.needsSnapshot(), true);
    a.applySnapshot(snapAt(17)); // the next checkpoint covers it
    assert.equal(a.needsSnapshot(), false);
    for (const m of ms.slice(6)) a.pushTokens(m);
    assert.equal(a.content, TEXT);
  });

  it("never moves backwards", () => {
    const a = new StreamAssembler();
    for (const m of ms.slice(0, 4)) a.pushTokens(m);
    assert.equal(a.applySnapshot(snapAt(8)), false);
    assert.equal(a.content, toks.slice(0, 16).join(""));
  });

  it("a finished stream: done announces more than we have until the final snapshot", () => {
    const a = new StreamAssembler();
    a.pushTokens(ms[0]);
    a.pushDone({ stream: "s1", next_offset: toks.length, finish_reason: "stop" });
    assert.equal(a.isComplete(), false);
    assert.equal(a.needsSnapshot(), true);
    a.applySnapshot(snapAt(toks.length));
    assert.equal(a.isComplete(), true);
    assert.equal(a.content, TEXT);
  });

  it("keeps reasoning and content apart when merging", () => {
    const a = new StreamAssembler();
    a.applySnapshot({ content: "ab", reasoning: "thought", nextOffset: 5 });
    a.pushTokens({ stream: "s1", offset: 5, kind: "content", tokens: ["c"] });
    assert.equal(a.reasoning, "thought");
    assert.equal(a.content, "abc");
  });
});

describe("per-kind offsets", () => {
  it("keeps one counter per kind", () => {
    const a = new StreamAssembler({ offsetScope: "kind" });
    a.pushTokens({ stream: "s", offset: 0, kind: "reasoning", tokens: ["r0", "r1"] });
    a.pushTokens({ stream: "s", offset: 0, kind: "content", tokens: ["c0"] });
    a.pushTokens({ stream: "s", offset: 2, kind: "content", tokens: ["c2"] });
    assert.equal(a.hasGap(), true);
    a.applySnapshot({ content: "c0c1", reasoning: "", nextOffsets: { content: 2 } });
    assert.equal(a.content, "c0c1c2");
    assert.equal(a.reasoning, "r0r1");
  });
});

describe("bad input", () => {
  it("ignores malformed payloads and counts them", () => {
    const a = new StreamAssembler();
    assert.equal(a.pushTokens(null), "invalid");
    assert.equal(a.pushTokens({ stream: "s", offset: -1, kind: "content", tokens: [] }), "invalid");
    assert.equal(a.pushTokens({ stream: "s", offset: 0, kind: "tool", tokens: [] }), "invalid");
    assert.equal(a.pushTokens({ stream: "s", offset: 0, kind: "content", tokens: [1] }), "invalid");
    assert.equal(a.stats.invalid, 4);
    assert.equal(a.content, "");
  });

  it("validates and reads done totals", () => {
    assert.equal(validateTokenPayload({ stream: "s", offset: 0, kind: "content", tokens: ["a"] }), null);
    assert.equal(doneTotal({ next_offset: 12 }), 12);
    assert.equal(doneTotal({ totals: { tokens: 3 } }), 3);
    assert.equal(doneTotal({}), null);
  });

  it("error and status surface in the view; a retryable error is not a failure", () => {
    const a = new StreamAssembler({ stream: "s" });
    a.pushStatus({ state: "retrying", attempt: 2 });
    a.pushError({ type: "rate_limit", retryable: true });
    assert.equal(a.view().failed, false);
    a.pushError({ type: "auth", retryable: false });
    const v = a.view();
    assert.equal(v.failed, true);
    assert.deepEqual(v.status, { state: "retrying", attempt: 2 });
  });
});

describe("checksum", () => {
  it("verifies the texts against llm-done's SHA-256 of UTF-8", async () => {
    const { createHash } = await import("node:crypto");
    const { verifyChecksum } = await import("../reassembly.js");
    const hex = (t) => createHash("sha256").update(t, "utf8").digest("hex");
    const done = { checksum: { algorithm: "sha256", content: hex(TEXT), reasoning: hex("") } };
    assert.equal(await verifyChecksum(done, TEXT, ""), true);
    assert.equal(await verifyChecksum(done, TEXT.slice(0, -1), ""), false);
    assert.equal(await verifyChecksum({}, TEXT, ""), null);
  });
});
