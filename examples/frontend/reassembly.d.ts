export type TokenKind = "content" | "reasoning";

/** The `llm-token` payload (frontend contract v1). */
export interface TokenPayload {
  v: 1;
  stream: string;
  seq: number;
  offset: number;
  kind: TokenKind;
  tokens: string[];
  [extra: string]: unknown;
}

export interface Snapshot {
  content?: string | null;
  reasoning?: string | null;
  /** stream-wide next offset (offsetScope "stream") */
  nextOffset?: number;
  /** per-kind next offsets (offsetScope "kind") */
  nextOffsets?: { content?: number; reasoning?: number };
}

export interface AssemblerStats {
  messages: number;
  tokens: number;
  duplicateMessages: number;
  overtakenMessages: number;
  duplicateTokens: number;
  gapsOpened: number;
  gapsFilled: number;
  snapshotsMerged: number;
  snapshotTokens: number;
  logTokens: number;
  invalid: number;
}

export interface StreamView {
  stream: string | null;
  content: string;
  reasoning: string;
  status: Record<string, unknown> | null;
  error: Record<string, unknown> | null;
  done: Record<string, unknown> | null;
  /** done, no gap, nothing missing: the text is final */
  complete: boolean;
  /** an error the relay will not retry */
  failed: boolean;
  /** messages are held above a gap */
  gap: boolean;
  nextOffset: number;
  /** null until checked; then whether the text matches llm-done's SHA-256 checksums */
  verified: boolean | null;
  stats: AssemblerStats;
}

export declare const KINDS: readonly TokenKind[];
export declare function validateTokenPayload(payload: unknown): string | null;
export declare function doneTotal(done: unknown): number | null;
export declare function sha256Hex(text: string): Promise<string | null>;
export declare function verifyChecksum(
  done: unknown,
  content: string,
  reasoning: string,
): Promise<boolean | null>;

export declare class StreamAssembler {
  constructor(options?: { stream?: string; offsetScope?: "stream" | "kind" });
  readonly stream: string | null;
  content: string;
  reasoning: string;
  status: Record<string, unknown> | null;
  error: Record<string, unknown> | null;
  done: Record<string, unknown> | null;
  stats: AssemblerStats;
  verified: boolean | null;
  nextOffset(kind?: TokenKind): number;
  pushTokens(payload: unknown, source?: "live" | "log"): "applied" | "duplicate" | "held" | "invalid";
  applySnapshot(snapshot: Snapshot | null | undefined): boolean;
  pushStatus(payload: unknown): void;
  pushError(payload: unknown): void;
  pushDone(payload: unknown): void;
  hasGap(): boolean;
  missingAtEnd(): number;
  needsSnapshot(): boolean;
  isComplete(): boolean;
  isFailed(): boolean;
  view(): StreamView;
}
