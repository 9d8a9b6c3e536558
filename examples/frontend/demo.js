// The demo page: a prompt box that inserts a request row, and the answer streaming
// in through llm-relay-client.js, with live stats and a messages/s chart.
//
// Configuration (URL fragment or query string, fragment wins; or ./demo-config.json):
//   url      Supabase URL (default: this page's origin)
//   key      anon key (required)
//   token    the user's access token (a JWT for role `authenticated`); without it the
//            page signs in anonymously (supabase-js auth.signInAnonymously())
//   session  session id (default: a new random uuid)
//   stream   watch this request id only (no prompt box)
//   budget   the project's messages/s budget drawn on the chart (default 100)
//   private  1 (default) or 0
//   checkpoint  how long a gap is held before the token log is read, ms (default 300)

import { subscribeToSession } from "./llm-relay-client.js";

const $ = (id) => document.getElementById(id);
const CHART_WINDOW_S = 30;

async function loadConfig() {
  const params = new URLSearchParams(location.search);
  for (const [k, v] of new URLSearchParams(location.hash.slice(1))) params.set(k, v);
  let file = {};
  if (!params.get("key")) {
    try {
      const res = await fetch("./demo-config.json", { cache: "no-store" });
      if (res.ok) file = await res.json();
    } catch {
      // no config file: the fragment must carry the key
    }
  }
  const pick = (name, fileName, fallback) => params.get(name) ?? file[fileName] ?? fallback;
  return {
    url: pick("url", "url", location.origin),
    key: pick("key", "anonKey", null),
    token: pick("token", "userToken", null),
    session: pick("session", "session", null) ?? crypto.randomUUID(),
    stream: pick("stream", "stream", null),
    budget: Number(pick("budget", "budget", 100)),
    private: !["0", "false", false].includes(pick("private", "private", "1")),
    checkpointMs: Number(pick("checkpoint", "checkpointMs", 300)),
  };
}

function notice(text, bad = false) {
  const el = $("notice");
  el.hidden = !text;
  el.textContent = text ?? "";
  el.classList.toggle("bad", bad);
}

// ---------------------------------------------------------------- live rates

class Rates {
  constructor() {
    this.buckets = new Map(); // whole second -> {messages, tokens}
  }

  add(atMs, messages, tokens) {
    const sec = Math.floor(atMs / 1000);
    const b = this.buckets.get(sec) ?? { messages: 0, tokens: 0 };
    b.messages += messages;
    b.tokens += tokens;
    this.buckets.set(sec, b);
  }

  /** Per-second series of the last `n` whole seconds, oldest first. */
  series(nowMs, n) {
    const last = Math.floor(nowMs / 1000) - 1;
    const out = [];
    for (let s = last - n + 1; s <= last; s++) out.push(this.buckets.get(s) ?? { messages: 0, tokens: 0 });
    for (const key of this.buckets.keys()) if (key < last - n - 5) this.buckets.delete(key);
    return out;
  }
}

function drawChart(canvas, series, budget) {
  const dpr = window.devicePixelRatio || 1;
  const cssW = canvas.clientWidth || canvas.width;
  const cssH = Math.round(cssW * 0.39);
  if (canvas.width !== Math.round(cssW * dpr)) {
    canvas.width = Math.round(cssW * dpr);
    canvas.height = Math.round(cssH * dpr);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  const W = cssW;
  const H = cssH;
  const pad = { l: 34, r: 8, t: 10, b: 20 };
  ctx.clearRect(0, 0, W, H);
  const peak = Math.max(1, ...series.map((b) => b.messages));
  const top = Math.max(budget * 1.15, peak * 1.15, 5);
  const x = (i) => pad.l + (i / (series.length - 1)) * (W - pad.l - pad.r);
  const y = (v) => H - pad.b - (v / top) * (H - pad.t - pad.b);

  ctx.font = "10px ui-monospace, monospace";
  ctx.fillStyle = "#8b93a7";
  ctx.strokeStyle = "#2a2f3f";
  ctx.lineWidth = 1;
  for (let k = 0; k <= 4; k++) {
    const v = (top * k) / 4;
    ctx.beginPath();
    ctx.moveTo(pad.l, y(v));
    ctx.lineTo(W - pad.r, y(v));
    ctx.stroke();
    ctx.fillText(String(Math.round(v)), 4, y(v) + 3);
  }
  ctx.fillText(`-${series.length}s`, pad.l, H - 5);
  ctx.fillText("now", W - pad.r - 20, H - 5);

  // the received rate: a filled area under a line
  ctx.beginPath();
  ctx.moveTo(x(0), y(0));
  series.forEach((b, i) => ctx.lineTo(x(i), y(b.messages)));
  ctx.lineTo(x(series.length - 1), y(0));
  ctx.closePath();
  ctx.fillStyle = "rgba(62, 207, 142, 0.18)";
  ctx.fill();
  ctx.beginPath();
  series.forEach((b, i) => (i ? ctx.lineTo(x(i), y(b.messages)) : ctx.moveTo(x(i), y(b.messages))));
  ctx.strokeStyle = "#3ecf8e";
  ctx.lineWidth = 2;
  ctx.stroke();

  // the budget
  ctx.setLineDash([6, 4]);
  ctx.strokeStyle = "#f2555a";
  ctx.lineWidth = 1.5;
  ctx.beginPath();
  ctx.moveTo(pad.l, y(budget));
  ctx.lineTo(W - pad.r, y(budget));
  ctx.stroke();
  ctx.setLineDash([]);
}

// ---------------------------------------------------------------- the page

class DemoPage {
  constructor(config, supabase) {
    this.config = config;
    this.supabase = supabase;
    this.cards = new Map(); // stream id -> {el, submitAt, firstAt, tokens}
    this.rates = new Rates();
    this.totals = { tokens: 0, messages: 0 };
    this.views = new Map();
    this.firstTokenLatencies = [];
  }

  card(streamId, question = "") {
    const key = String(streamId);
    let card = this.cards.get(key);
    if (!card) {
      const node = $("stream-template").content.firstElementChild.cloneNode(true);
      node.dataset.stream = key;
      node.dataset.state = "waiting";
      node.querySelector(".question").textContent = question;
      $("streams").prepend(node);
      card = { el: node, submitAt: null, firstAt: null, tokens: 0 };
      this.cards.set(key, card);
    }
    return card;
  }

  onUpdate(view, event) {
    const card = this.card(view.stream);
    this.views.set(view.stream, view);
    if (event.type === "token" && event.outcome !== "invalid") {
      const applied = view.stats.tokens - card.tokens;
      card.tokens = view.stats.tokens;
      this.rates.add(Date.now(), 1, Math.max(0, applied));
      this.totals.messages += 1;
      if (card.firstAt === null) {
        card.firstAt = performance.now();
        if (card.submitAt !== null) this.firstTokenLatencies.push(card.firstAt - card.submitAt);
      }
    } else if (["status", "error", "done"].includes(event.type)) {
      this.rates.add(Date.now(), 1, 0);
    }
    this.render(card, view);
  }

  render(card, view) {
    const el = card.el;
    el.querySelector(".answer").textContent = view.content;
    const rbox = el.querySelector(".reasoning-box");
    if (view.reasoning) {
      rbox.hidden = false;
      el.querySelector(".reasoning").textContent = view.reasoning;
      el.querySelector(".reasoning-count").textContent = `· ${Array.from(view.reasoning).length} chars`;
      if (!view.content) rbox.open = true; // open while thinking; the reader may close it
    }
    let state = "streaming";
    if (view.complete) state = "complete";
    else if (view.failed) state = "failed";
    else if (view.error) state = "error"; // retryable: the stream stopped, a retry may follow
    else if (view.gap) state = "gap";
    else if (view.nextOffset === 0 && !view.done) state = "waiting";
    el.dataset.state = state;
    if (["complete", "failed", "error"].includes(state)) el.querySelector(".stop").hidden = true;
    const label = {
      waiting: "waiting for tokens…",
      streaming: view.status?.status ? `streaming · ${view.status.status}` : "streaming",
      gap: "gap held, reading the token log…",
      complete:
        `done (${view.done?.finish_reason ?? view.done?.status ?? "complete"})` +
        (view.verified === true ? " · checksum ✓" : view.verified === false ? " · checksum ✗" : ""),
      failed: `failed · ${view.error?.type ?? "error"}${view.error?.message ? ": " + view.error.message : ""}`,
      error: `stopped · ${view.error?.type ?? "error"} (retryable) after ${view.nextOffset} tokens`,
    }[state];
    el.querySelector(".state").textContent = label;
    const s = view.stats;
    el.querySelector(".meta-stats").textContent =
      `${view.nextOffset} tok · ${s.messages} msg · ${s.duplicateMessages} dup · ${s.gapsFilled} gap · ${s.snapshotsMerged} snap`;
  }

  tick() {
    const now = Date.now();
    const series = this.rates.series(now, CHART_WINDOW_S);
    const recent = series.slice(-3);
    const mps = recent.reduce((a, b) => a + b.messages, 0) / recent.length;
    const tps = recent.reduce((a, b) => a + b.tokens, 0) / recent.length;
    let tokens = 0;
    let messages = 0;
    let dups = 0;
    let gaps = 0;
    let snaps = 0;
    for (const v of this.views.values()) {
      tokens += v.nextOffset;
      messages += v.stats.messages;
      dups += v.stats.duplicateMessages;
      gaps += v.stats.gapsFilled;
      snaps += v.stats.snapshotsMerged;
    }
    const applied = [...this.views.values()].reduce((a, v) => a + v.stats.tokens, 0);
    $("s-tps").textContent = tps.toFixed(1);
    $("s-mps").textContent = mps.toFixed(1);
    $("s-tpm").textContent = messages ? (applied / messages).toFixed(1) : "–";
    const lat = this.firstTokenLatencies;
    $("s-ttft").textContent = lat.length ? `${Math.round(lat.at(-1))} ms` : "–";
    $("s-gaps").textContent = String(gaps);
    $("s-dups").textContent = String(dups);
    $("s-snaps").textContent = String(snaps);
    $("s-tokens").textContent = String(tokens);
    drawChart($("chart"), series, this.config.budget);
  }

  async submit(text) {
    const { data, error } = await this.supabase
      .from("llm_requests")
      .insert({ session_id: this.config.session, messages: [{ role: "user", content: text }] })
      .select("id")
      .single();
    if (error) throw new Error(`${error.code ?? ""} ${error.message}`);
    const card = this.card(data.id, text);
    card.submitAt = performance.now();
    const stop = card.el.querySelector(".stop");
    stop.hidden = false;
    stop.addEventListener("click", async () => {
      // Only asks: the worker aborts the upstream and tells the page (llm-status cancelled).
      stop.disabled = true;
      const { error: err } = await this.supabase.rpc("cancel_llm_request", { request_id: data.id });
      if (err) notice(`could not cancel: ${err.message}`, true);
    });
    this.sub.watch(data.id);
    return data.id;
  }
}

function setChannelState(state, err) {
  const pill = $("channel-state");
  const ok = state === "SUBSCRIBED";
  pill.textContent = ok ? "live" : state.toLowerCase().replace("_", " ");
  pill.className = `pill ${ok ? "pill-ok" : state === "CLOSED" || err ? "pill-bad" : "pill-wait"}`;
  if (err) notice(`channel: ${err.message ?? err}`, true);
  else if (ok) notice("");
}

async function ensureSession(supabase, session) {
  // A private topic is joinable once its session row is ours (see the migrations).
  const { error } = await supabase.from("llm_sessions").insert({ id: session });
  if (error && error.code !== "23505") throw new Error(`${error.code ?? ""} ${error.message}`);
}

/**
 * A client acting as the page's user: the given token, or else the stored session,
 * or else a new anonymous user (supabase-js `auth.signInAnonymously()`).
 */
async function connect(config) {
  const { createClient } = window.supabase;
  if (config.token) {
    const token = config.token;
    return createClient(config.url, config.key, { accessToken: async () => token });
  }
  const supabase = createClient(config.url, config.key);
  let { data: { session } } = await supabase.auth.getSession();
  if (!session) {
    const { data, error } = await supabase.auth.signInAnonymously();
    if (error) {
      notice(`could not sign in: ${error.message} (or pass #token=<user JWT>)`, true);
      return null;
    }
    session = data.session;
  }
  config.token = session.access_token;
  return supabase;
}

async function main() {
  const config = await loadConfig();
  $("budget-label").textContent = `${config.budget}/s`;
  if (!config.key) {
    notice("Missing the anon key: open this page with #key=<anon key>&token=<user JWT> (llm-relay demo prints the link).", true);
    return;
  }
  const supabase = await connect(config);
  if (!supabase) return;
  const page = new DemoPage(config, supabase);
  window.demo = { page, config, supabase, ready: null };

  const form = $("prompt-form");
  if (config.stream) form.hidden = true;
  else await ensureSession(supabase, config.session).catch((e) => notice(e.message, true));

  page.sub = subscribeToSession(supabase, {
    session: config.session,
    private: config.private,
    accessToken: config.token ?? undefined,
    gapTimeoutMs: config.checkpointMs,
    streams: config.stream ? [config.stream] : [],
    onUpdate: (view, event) => page.onUpdate(view, event),
    onChannel: (state, err) => {
      setChannelState(state, err);
      window.demo.channelStates = [...(window.demo.channelStates ?? []), { state, error: err?.message ?? null }];
    },
  });
  window.demo.sub = page.sub;
  $("topic").textContent = page.sub.topic;
  if (config.stream) page.card(config.stream);

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const text = $("prompt").value.trim();
    if (!text) return;
    $("send").disabled = true;
    try {
      await page.submit(text);
      $("prompt").value = "";
    } catch (err) {
      notice(`could not send: ${err.message}`, true);
    } finally {
      $("send").disabled = false;
    }
  });
  $("prompt").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey) {
      ev.preventDefault();
      form.requestSubmit();
    }
  });
  setInterval(() => page.tick(), 250);
  page.tick();
}

main().catch((err) => notice(`demo failed to start: ${err.message}`, true));
