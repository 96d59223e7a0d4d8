// The dashboard's list of jobs, without the DOM: which jobs are shown, in which order, and
// whether a job from ListJobs or from the stream changes what is shown.
//
// The list shows the jobs matching the filter, newest first (`created_at` descending, then `id`
// descending: ListJobs' order), as far down as the pages loaded so far reach (the "window").
// Updates come from ListJobs pages and from StreamJobUpdates (at least once, possibly out of
// date after a resume): a job older than what is shown (by `version`) is ignored; a job that
// no longer matches the filter leaves the list; a job outside the window is left for the
// "more" button to load.
import type { Timestamp } from "@bufbuild/protobuf/wkt";
import { type Job, JobStatus } from "../src/gen/jobs/v1/jobs_pb.js";

/** The proto name of a status, as the test hooks show it: "JOB_STATUS_RUNNING". */
export function statusName(s: JobStatus): string {
  const name = JobStatus[s] as string | undefined;
  return name ? `JOB_STATUS_${name}` : `JOB_STATUS_${s}`;
}

/** A status for people: "Running". */
export function statusLabel(s: JobStatus): string {
  const name = JobStatus[s] as string | undefined;
  return name ? name[0] + name.slice(1).toLowerCase() : `Status ${s}`;
}

/** The statuses a job can still leave: CancelJob is allowed. */
export function isActive(s: JobStatus): boolean {
  return s === JobStatus.PENDING || s === JobStatus.RUNNING;
}

/** The ends a retry (a new job with the same agent and job_data) makes sense after. */
export function isRetryable(s: JobStatus): boolean {
  return s === JobStatus.FAILED || s === JobStatus.CANCELLED;
}

/** Milliseconds since the epoch, or undefined for an unset timestamp. */
export function tsMillis(t: Timestamp | undefined): number | undefined {
  return t ? Number(t.seconds) * 1000 + Math.floor(t.nanos / 1e6) : undefined;
}

/** ListJobs' order: negative when `a` comes first (newer `created_at`, then greater `id`). */
export function compareNewestFirst(a: Job, b: Job): number {
  const as = a.createdAt?.seconds ?? 0n;
  const bs = b.createdAt?.seconds ?? 0n;
  if (as !== bs) return as > bs ? -1 : 1;
  const an = a.createdAt?.nanos ?? 0;
  const bn = b.createdAt?.nanos ?? 0;
  if (an !== bn) return an > bn ? -1 : 1;
  // Canonical lowercase UUIDs: string order is PostgreSQL's uuid order.
  return a.id === b.id ? 0 : a.id > b.id ? -1 : 1;
}

export interface Filter {
  /** One status, or undefined for any. */
  status?: JobStatus;
  /** Exactly this agent, or "" for any. */
  agent: string;
}

export type Change = "added" | "changed" | "removed" | "ignored";

export class JobList {
  /** The shown jobs by id. */
  private readonly shown = new Map<string, Job>();
  /** The highest version seen of every job passed to apply (shown or not). */
  private readonly seen = new Map<string, bigint>();
  /** The shown jobs in order; recomputed lazily. */
  private sorted: Job[] | undefined = [];
  /** The last job of the last page loaded: jobs after it are not loaded yet. */
  private boundary: Job | undefined;
  /** No page loaded yet. */
  private started = false;
  /** The last page has been loaded: every matching job is in the window. */
  complete = false;

  constructor(readonly filter: Filter) {}

  matches(job: Job): boolean {
    if (this.filter.status !== undefined && job.status !== this.filter.status) return false;
    if (this.filter.agent !== "" && job.agentIdentifier !== this.filter.agent) return false;
    return true;
  }

  /** Whether a job falls among the pages loaded so far. */
  inWindow(job: Job): boolean {
    if (this.complete) return true;
    if (!this.started || !this.boundary) return false;
    return compareNewestFirst(job, this.boundary) <= 0;
  }

  get(id: string): Job | undefined {
    return this.shown.get(id);
  }

  get size(): number {
    return this.shown.size;
  }

  /** The shown jobs, newest first. */
  jobs(): readonly Job[] {
    if (!this.sorted) this.sorted = [...this.shown.values()].sort(compareNewestFirst);
    return this.sorted;
  }

  /**
   * A page of ListJobs (with the filter). Its jobs are as new as the database was when it was
   * read; `more` says whether pages follow. Returns the jobs that changed what is shown.
   */
  addPage(jobs: readonly Job[], more: boolean): Map<string, Change> {
    this.started = true;
    const changes = new Map<string, Change>();
    for (const job of jobs) {
      const change = this.put(job, true);
      if (change !== "ignored") changes.set(job.id, change);
    }
    if (jobs.length > 0) {
      const last = jobs[jobs.length - 1];
      if (!this.boundary || compareNewestFirst(last, this.boundary) > 0) this.boundary = last;
    }
    if (!more) this.complete = true;
    return changes;
  }

  /** A job from the stream (or from a call's answer). */
  apply(job: Job): Change {
    return this.put(job, false);
  }

  private put(job: Job, listed: boolean): Change {
    const current = this.shown.get(job.id);
    const seen = this.seen.get(job.id);
    if (seen === undefined || job.version > seen) this.seen.set(job.id, job.version);
    if (current) {
      if (job.version <= current.version) return "ignored"; // a duplicate or an older one
      if (!this.matches(job)) {
        this.shown.delete(job.id);
        this.sorted = undefined;
        return "removed";
      }
      this.shown.set(job.id, job);
      return "changed"; // created_at never changes: the order stays
    }
    // Not shown, and older than a version seen before (one that left the list): ignore. (A
    // page is read after every change the stream gave before it was asked for: kept.)
    if (!listed && seen !== undefined && job.version < seen) return "ignored";
    if (!this.matches(job)) return "ignored";
    if (!listed && !this.inWindow(job)) return "ignored"; // "more" will load it
    this.shown.set(job.id, job);
    this.sorted = undefined;
    return "added";
  }
}
