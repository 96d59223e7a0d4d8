// The dashboard's live feed: one StreamJobUpdates stream (include_existing), kept open for as
// long as the page wants it. A stream that drops (network, server restart, a proxy, no message
// for IDLE_MS) is opened again after a backoff, from the last non-empty resume_token, so no
// change is missed however long the tab stays open; the receiver deduplicates by (id, version).
import { type Client, Code, ConnectError } from "@connectrpc/connect";
import type { Job, JobService } from "../src/gen/jobs/v1/jobs_pb.js";
import { errorInfo } from "../src/jobsvc.js";

/** What the page shows: before the first `synced`, after it, after a drop. "stopped": ended. */
export type ConnState = "connecting" | "live" | "reconnecting" | "stopped";

/** A stream with no message for this long is taken for dead (heartbeats come every 15 s). */
const IDLE_MS = 50_000;
const BACKOFF_FIRST_MS = 500;
const BACKOFF_MAX_MS = 15_000;

export interface LiveOptions {
  client: Client<typeof JobService>;
  /** Server-side filter: only this agent ("" for any). Statuses are filtered by the page. */
  agent: string;
  /** Every job the stream delivers (snapshot, catch-up after a resume, live). */
  onJob(job: Job): void;
  /** The stream's state changed; `detail` says why, for people (an error, the next try). */
  onState(state: ConnState, detail: string): void;
  /** The resume point is gone (RESUME_TOKEN_EXPIRED, ...): the page must re-list; the feed
   * goes on with a fresh snapshot. */
  onReset(): void;
  /** The token is refused (expired, revoked, wrong role): the feed has stopped. */
  onAuthError(err: ConnectError): void;
}

export class LiveFeed {
  private resumeToken = "";
  private stopped = false;
  private stream: AbortController | undefined;
  private wake: (() => void) | undefined;
  private holdUntil = 0;
  state: ConnState = "connecting";

  constructor(private readonly opts: LiveOptions) {}

  start(): void {
    void this.run();
  }

  stop(): void {
    this.stopped = true;
    this.stream?.abort();
    this.wake?.();
    this.setState("stopped", "");
  }

  /** Test hook: drop the open stream as a network failure would, and wait at least `holdMs`
   * before opening it again. */
  drop(holdMs: number): void {
    this.holdUntil = Date.now() + holdMs;
    this.stream?.abort(new Error("dropped by the page"));
  }

  /** The browser is back online: try again now instead of after the backoff. */
  retryNow(): void {
    if (Date.now() >= this.holdUntil) this.wake?.();
  }

  private setState(state: ConnState, detail: string): void {
    this.state = state;
    this.opts.onState(state, detail);
  }

  private async run(): Promise<void> {
    let failures = 0; // since the last `synced`
    while (!this.stopped) {
      this.setState(failures > 0 ? "reconnecting" : "connecting", "");
      const abort = new AbortController();
      this.stream = abort;
      let idle: ReturnType<typeof setTimeout> | undefined;
      const resetIdle = () => {
        clearTimeout(idle);
        idle = setTimeout(() => abort.abort(new Error("no message for 50 s")), IDLE_MS);
      };
      let why = "the stream ended";
      try {
        resetIdle();
        const updates = this.opts.client.streamJobUpdates(
          {
            agentIdentifier: this.opts.agent,
            includeExisting: true, // ignored by the server when resumeToken is set
            resumeToken: this.resumeToken,
          },
          { signal: abort.signal },
        );
        for await (const update of updates) {
          resetIdle();
          if (update.resumeToken !== "") this.resumeToken = update.resumeToken;
          const event = update.event;
          if (event.case === "job") {
            this.opts.onJob(event.value);
          } else if (event.case === "synced") {
            failures = 0;
            this.setState("live", "");
          }
        }
      } catch (err) {
        if (this.stopped) break;
        const e = ConnectError.from(err);
        const reason = errorInfo(e)?.reason ?? "";
        if (e.code === Code.Unauthenticated || e.code === Code.PermissionDenied) {
          this.stopped = true;
          this.setState("stopped", `${reason || Code[e.code]}: ${e.rawMessage}`);
          this.opts.onAuthError(e);
          break;
        }
        if (
          e.code === Code.OutOfRange ||
          reason === "RESUME_TOKEN_EXPIRED" ||
          reason === "INVALID_RESUME_TOKEN"
        ) {
          // The resume point is gone: start over with a snapshot, and let the page re-list.
          this.resumeToken = "";
          this.opts.onReset();
        }
        why = reason || (e.code === Code.Canceled ? "" : `${Code[e.code]}: `) + e.rawMessage;
      } finally {
        clearTimeout(idle);
        this.stream = undefined;
      }
      if (this.stopped) break;
      failures += 1;
      const backoff = Math.min(BACKOFF_MAX_MS, BACKOFF_FIRST_MS * 2 ** (failures - 1));
      const delay = Math.max(backoff * (0.75 + Math.random() * 0.5), this.holdUntil - Date.now());
      this.setState("reconnecting", `${why}; trying again in ${Math.ceil(delay / 1000)} s`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, delay);
        this.wake = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      this.wake = undefined;
    }
  }
}
