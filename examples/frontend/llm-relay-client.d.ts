import type { StreamView, TokenPayload } from "./reassembly";

export { StreamAssembler } from "./reassembly";
export type { StreamView, TokenPayload, TokenKind, Snapshot, AssemblerStats } from "./reassembly";

export declare const EVENTS: {
  readonly token: "llm-token";
  readonly done: "llm-done";
  readonly error: "llm-error";
  readonly status: "llm-status";
};
export declare const DONE_STATUSES: readonly string[];
export declare const FAILED_STATUSES: readonly string[];

export interface SnapshotSource {
  /** table holding one row per stream (default "llm_requests") */
  table?: string;
  /** column matched against the payload's `stream` (default "id") */
  idColumn?: string;
  contentColumn?: string;
  reasoningColumn?: string;
  /** default "next_offset" (per kind: "content_next_offset", "reasoning_next_offset") */
  nextOffsetColumn?: string;
  statusColumn?: string;
  /** read with the snapshot for streams that ended while away (default "finish_reason"; "" to skip) */
  finishReasonColumn?: string;
}

export type UpdateEvent =
  | { type: "token"; outcome: "applied" | "duplicate" | "held" | "invalid"; payload: TokenPayload; at: number }
  | { type: "status" | "error" | "done"; payload: Record<string, unknown>; at: number }
  | { type: "snapshot"; moved: boolean; row: Record<string, unknown>; at: number }
  | { type: "snapshot-error"; error: unknown; at: number }
  | { type: "log"; tokens: number; at: number }
  | { type: "log-error"; error: unknown; at: number }
  | { type: "verified"; ok: boolean; at: number };

/** Where the token log lives (defaults: the migrations' `llm_request_chunks`). */
export interface LogSource {
  table?: string;
  requestColumn?: string;
  offsetColumn?: string;
  kindColumn?: string;
  textColumn?: string;
  /** rows per read (Supabase's default max rows is 1000) */
  pageSize?: number;
}

export interface SubscribeOptions {
  /** session id; the topic is `llm-token:<session>` */
  session: string;
  /** default "llm-token:{session}" */
  topicTemplate?: string;
  /** private channel (default true: RLS on realtime.messages decides) */
  private?: boolean;
  /** user JWT passed to `supabase.realtime.setAuth()` before joining */
  accessToken?: string;
  /** extra broadcast config for the channel, e.g. `{ ack: true, self: true }` */
  broadcast?: { ack?: boolean; self?: boolean };
  /** where the snapshot row lives; `false` to never read it */
  snapshot?: SnapshotSource | false;
  /** the write-ahead token log read on joining late and on old gaps; `false` to never read it */
  log?: LogSource | false;
  /** how long a gap is held before it is read from the token log (ms, default 300) */
  gapTimeoutMs?: number;
  /** @deprecated the old name of `gapTimeoutMs` */
  checkpointIntervalMs?: number;
  /** offsets count across kinds ("stream", the contract) or per kind */
  offsetScope?: "stream" | "kind";
  /** stream ids to follow from the start (their snapshots are read on join) */
  streams?: string[];
  onUpdate?: (view: StreamView & { channel: string }, event: UpdateEvent) => void;
  /** supabase-js channel states: SUBSCRIBED, CHANNEL_ERROR, TIMED_OUT, CLOSED */
  onChannel?: (state: string, error: Error | null) => void;
  /**
   * Delays before joining a fresh channel after the server closed ours (supabase-js
   * never rejoins a closed channel); default [1000, 2000, 5000, 10000], the last
   * repeating; `[]` to stay closed.
   */
  resubscribeDelaysMs?: number[];
  /** clock in ms (default performance.now) */
  now?: () => number;
}

export interface SessionSubscription {
  readonly topic: string;
  readonly channel: unknown;
  readonly channelState: string;
  /** number of successful joins (more than 1 after a reconnect) */
  readonly joins: number;
  /** broadcasts received */
  readonly messages: number;
  /** fresh channels joined after the server closed one */
  readonly resubscribes: number;
  watch(streamId: string): StreamView;
  view(streamId: string): StreamView | null;
  unsubscribe(): Promise<void>;
}

export declare function topicFor(session: string, template?: string): string;
export declare function subscribeToSession(supabase: unknown, options: SubscribeOptions): SessionSubscription;
