// The live jobs dashboard: jobsvc serves index.html at `/`, this file bundled at
// `/dashboard.js` and dashboard.css at `/dashboard.css`; the page calls jobsvc over gRPC-Web
// on its own origin (or on the origin its `<meta name="jobsvc-api">` names).
//
//   npm --prefix clients/web run build:dashboard   # tsc, then esbuild into dist/dashboard.js
//   npm --prefix clients/web run check:dashboard   # the committed bundle is what build makes
//
// What it does: sign-in with a pasted token (sessionStorage only); the caller's jobs newest
// first, ListJobs page by page ("More jobs"), filtered by status and agent; live changes from
// StreamJobUpdates (include_existing), resumed from the last resume_token after a drop (with
// backoff) and deduplicated by (id, version); a job's detail and history (ListJobEvents);
// CancelJob; for the service role, Retry (a new job with the same agent and job_data: jobsvc
// has no re-open); GetStats, refreshed on live changes at most once a second.
//
// Hooks for tests (stable; every one is a `data-testid` unless it says otherwise):
//   <body data-ready="true">                  the script has started (signed in or not)
//   signin-form, token-input, signin-button   the sign-in form (shown while signed out)
//   signin-error                              why a sign-in was refused ("REASON: message")
//   whoami (data-role, data-sub), signout     who is signed in; the sign-out button
//   conn-state   data-state = signed-out | connecting | live | reconnecting | stopped;
//                text: "Signed out", "Connecting…", "Live", "Reconnecting…", "Stopped"
//   conn-detail  why it is reconnecting and when it tries again (text)
//   stats (data-loaded = true|false), stats-total, stats-pending, stats-running,
//     stats-completed, stats-failed, stats-cancelled (each data-value = the exact count),
//     stats-avg (data-value = seconds), stats-oldest-pending (data-value = ms since the epoch)
//   filter-status (select; values "" or JOB_STATUS_*), filter-agent, filter-apply, filter-clear
//   list-count   "N shown" (data-count = N, data-more = true|false)
//   job-list     the rows' container; data-loading = true while a ListJobs page is loading
//   job-row      one per job shown, in order; data-job-id, data-status (JOB_STATUS_*),
//                data-version, data-agent. Inside: job-open (the button that opens the
//                detail; a click anywhere on the row does too), job-status, job-agent,
//                job-age, job-duration, cancel (pending/running only), retry (service role,
//                failed/cancelled only)
//   list-empty   shown when no job matches; more: the "More jobs" button (hidden at the end)
//   notice       the last action's outcome: data-kind = info | error, data-reason (ErrorInfo
//                reason of a refusal), data-new-job-id (after a retry), data-seq (+1 each time)
//   detail       the job's dialog (open while shown): data-job-id, data-status, data-version,
//                data-loading (true while GetJob/ListJobEvents run). Inside: detail-id,
//                detail-status, detail-agent, detail-user, detail-version, detail-attempt,
//                detail-max-attempts, detail-worker, detail-created, detail-started,
//                detail-completed, detail-error, detail-progress, detail-result (each "—"
//                and hidden when there is none), detail-job-data (JSON, formatted like
//                progress and result), detail-history (history-row each, with
//                data-version and data-status), detail-cancel, detail-retry, detail-close
//   window.__jobsvcShown  { "<id>:<version>": ms since the epoch } (performance.timeOrigin +
//                performance.now()) when that version of the job was first put on the page
//                (the last 10,000 at least: older entries go past 20,000)
//   window.__jobsvcDropStream(holdMs)  drops the live stream as a network failure would and
//                opens it again (from its resume token) no sooner than holdMs later
import { toJson } from "@bufbuild/protobuf";
import { ValueSchema } from "@bufbuild/protobuf/wkt";
import { type CallOptions, type Client, Code, ConnectError } from "@connectrpc/connect";
import { type Job, type JobEvent, type JobService, JobStatus } from "../src/gen/jobs/v1/jobs_pb.js";
import { errorInfo, jobsvcClient } from "../src/jobsvc.js";
import { type ConnState, LiveFeed } from "./live.js";
import {
  type Filter,
  isActive,
  isRetryable,
  JobList,
  statusLabel,
  statusName,
  tsMillis,
} from "./model.js";

declare global {
  interface Window {
    __jobsvcShown: Record<string, number>;
    __jobsvcDropStream: (holdMs?: number) => void;
  }
}

const TOKEN_KEY = "jobsvc.token";
const PAGE_SIZE = 50;
const CALL_TIMEOUT_MS = 10_000;
const HISTORY_PAGE = 200;
const HISTORY_PAGES = 10; // at most 2,000 changes shown
const SHOWN_KEEP = 10_000; // window.__jobsvcShown keeps at least the last 10,000 entries

// --- Small helpers ---------------------------------------------------------------------------

function el<T extends HTMLElement = HTMLElement>(id: string): T {
  const found = document.getElementById(id);
  if (!found) throw new Error(`#${id} is missing from index.html`);
  return found as T;
}

function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs: Record<string, string> = {},
  text = "",
): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text) node.textContent = text;
  return node;
}

function setText(node: HTMLElement, text: string): void {
  if (node.textContent !== text) node.textContent = text;
}

const shortId = (id: string) => id.slice(0, 8);
const epochNow = () => performance.timeOrigin + performance.now();

/** "0.4s", "42s", "3m 5s", "2h 10m", "3d 4h". */
function span(ms: number): string {
  if (!(ms > 0)) ms = 0;
  if (ms < 10_000) return `${(ms / 1000).toFixed(1)}s`;
  const s = Math.floor(ms / 1000);
  if (s < 60) return `${s}s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m ${s % 60}s`;
  const hr = Math.floor(m / 60);
  if (hr < 24) return `${hr}h ${m % 60}m`;
  return `${Math.floor(hr / 24)}d ${hr % 24}h`;
}

function when(ms: number | undefined): string {
  return ms === undefined ? "—" : new Date(ms).toLocaleString();
}

function age(job: Job): string {
  const created = tsMillis(job.createdAt);
  return created === undefined ? "—" : span(Date.now() - created);
}

function duration(job: Job): string {
  const started = tsMillis(job.startedAt);
  if (started === undefined) return "—";
  return span((tsMillis(job.completedAt) ?? Date.now()) - started);
}

/** A random UUID (v4) without crypto.randomUUID, which plain-http pages on a LAN lack. */
function uuid(): string {
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const x = Array.from(b, (v) => v.toString(16).padStart(2, "0")).join("");
  return `${x.slice(0, 8)}-${x.slice(8, 12)}-${x.slice(12, 16)}-${x.slice(16, 20)}-${x.slice(20)}`;
}

/** The claims of a JWT, unverified: only to label the page and offer the service role's
 * buttons; the server decides what the token may do. */
function claims(token: string): { role?: string; sub?: string; exp?: number } {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const bytes = Uint8Array.from(atob(part), (c) => c.charCodeAt(0));
    const parsed: unknown = JSON.parse(new TextDecoder().decode(bytes));
    if (typeof parsed !== "object" || parsed === null) return {};
    return parsed as ReturnType<typeof claims>;
  } catch {
    return {};
  }
}

/** "REASON: message" of a failed call (the ErrorInfo reason, else the gRPC code). */
function describe(err: unknown): { reason: string; text: string; code: Code } {
  const e = ConnectError.from(err);
  const reason = errorInfo(e)?.reason || Code[e.code];
  return { reason, text: `${reason}: ${e.rawMessage}`, code: e.code };
}

/** Runs `fn` at most once per `ms`, and once more after the last kick. */
class Throttle {
  private last = -Infinity;
  private timer: ReturnType<typeof setTimeout> | undefined;
  private running = false;
  private again = false;

  constructor(
    private readonly fn: () => Promise<void>,
    private readonly ms: number,
  ) {}

  kick(): void {
    if (this.running) {
      this.again = true;
      return;
    }
    if (this.timer !== undefined) return;
    const wait = Math.max(0, this.last + this.ms - performance.now());
    this.timer = setTimeout(() => void this.run(), wait);
  }

  cancel(): void {
    clearTimeout(this.timer);
    this.timer = undefined;
    this.again = false;
  }

  private async run(): Promise<void> {
    this.timer = undefined;
    this.running = true;
    this.last = performance.now();
    try {
      await this.fn();
    } finally {
      this.running = false;
      if (this.again) {
        this.again = false;
        this.kick();
      }
    }
  }
}

// --- State -----------------------------------------------------------------------------------

/** One signed-in view with one filter: its list, its stream, its calls (aborted together). */
class Session {
  readonly abort = new AbortController();
  readonly list: JobList;
  feed: LiveFeed | undefined;
  pageToken = "";
  loading = false;
  /** Stream jobs held while a ListJobs page is on its way, applied after it. */
  held: Job[] | undefined;
  readonly stats: Throttle;
  readonly rows = new Map<string, HTMLTableRowElement>();

  constructor(
    readonly client: Client<typeof JobService>,
    readonly filter: Filter,
    readonly service: boolean,
  ) {
    this.list = new JobList(filter);
    this.stats = new Throttle(() => refreshStats(this), 1000);
  }

  call(): CallOptions {
    return { timeoutMs: CALL_TIMEOUT_MS, signal: this.abort.signal };
  }

  get current(): boolean {
    return session === this;
  }

  stop(): void {
    this.feed?.stop();
    this.stats.cancel();
    this.abort.abort();
  }
}

let token = "";
let session: Session | undefined;
const dirty = new Set<string>();
let renderQueued = false;
let shownCount = 0;

interface Detail {
  id: string;
  job?: Job;
  events?: JobEvent[];
  truncated?: boolean;
  history: Throttle;
}
let detail: Detail | undefined;

window.__jobsvcShown = {};
window.__jobsvcDropStream = (holdMs = 0) => session?.feed?.drop(holdMs);

// --- Connection state ------------------------------------------------------------------------

const CONN_TEXT: Record<ConnState | "signed-out", string> = {
  "signed-out": "Signed out",
  connecting: "Connecting…",
  live: "Live",
  reconnecting: "Reconnecting…",
  stopped: "Stopped",
};

function showConn(state: ConnState | "signed-out", why: string): void {
  const node = el("conn-state");
  node.dataset.state = state;
  setText(node, CONN_TEXT[state]);
  setText(el("conn-detail"), why);
}

// --- Notices ---------------------------------------------------------------------------------

function notice(kind: "info" | "error", text: string, extra: Record<string, string> = {}): void {
  const node = el("notice");
  node.dataset.kind = kind;
  node.dataset.seq = String(Number(node.dataset.seq ?? "0") + 1);
  delete node.dataset.reason;
  delete node.dataset.newJobId;
  Object.assign(node.dataset, extra);
  node.textContent = text;
}

/** A refused call: sign out when the token is no longer good, else say why. */
function refused(what: string, err: unknown): void {
  const { reason, text, code } = describe(err);
  if (code === Code.Canceled) return; // the page aborted it
  if (code === Code.Unauthenticated) {
    signOut(`Signed out: ${text}`);
    return;
  }
  notice("error", `${what} refused: ${text}`, { reason });
}

// --- Sign-in ---------------------------------------------------------------------------------

function apiBase(): string {
  const meta = document.querySelector<HTMLMetaElement>('meta[name="jobsvc-api"]');
  const configured = meta?.content.trim() ?? "";
  return configured ? new URL(configured, location.href).href.replace(/\/+$/, "") : location.origin;
}

function newClient(): Client<typeof JobService> {
  return jobsvcClient(apiBase(), () => token);
}

async function signIn(candidate: string): Promise<void> {
  const button = el<HTMLButtonElement>("signin-button");
  const error = el("signin-error");
  error.textContent = "";
  button.disabled = true;
  try {
    token = candidate;
    await newClient().getStats({}, { timeoutMs: CALL_TIMEOUT_MS }); // does the token work?
    sessionStorage.setItem(TOKEN_KEY, candidate);
    el<HTMLInputElement>("token").value = "";
    startApp();
  } catch (err) {
    token = "";
    error.textContent = `Not signed in: ${describe(err).text}`;
  } finally {
    button.disabled = false;
  }
}

function signOut(why = ""): void {
  sessionStorage.removeItem(TOKEN_KEY);
  token = "";
  session?.stop();
  session = undefined;
  closeDetail();
  el("job-list").replaceChildren();
  el("app").hidden = true;
  el("who").hidden = true;
  el("signin").hidden = false;
  el("signin-error").textContent = why;
  showConn("signed-out", "");
  el<HTMLInputElement>("token").focus();
}

function startApp(): void {
  const c = claims(token);
  const service = c.role === "service_role";
  const who = el("whoami");
  who.dataset.role = c.role ?? "";
  who.dataset.sub = c.sub ?? "";
  const expires = c.exp ? ` · token expires ${new Date(c.exp * 1000).toLocaleTimeString()}` : "";
  who.textContent = service
    ? `Service role (every job)${expires}`
    : `User ${c.sub ? shortId(c.sub) : "?"}${expires}`;
  if (c.sub) who.title = c.sub;
  setText(el("stats-scope"), service ? "(every job)" : "(your jobs)");
  el("signin").hidden = true;
  el("who").hidden = false;
  el("app").hidden = false;
  el("signin-error").textContent = "";
  startSession(readFilter(), service);
}

// --- The list --------------------------------------------------------------------------------

function readFilter(): Filter {
  const value = el<HTMLSelectElement>("filter-status").value;
  const status = value
    ? (JobStatus[value.replace(/^JOB_STATUS_/, "") as keyof typeof JobStatus] as JobStatus)
    : undefined;
  return { status, agent: el<HTMLInputElement>("filter-agent").value.trim() };
}

function startSession(filter: Filter, service: boolean): void {
  session?.stop();
  closeDetail();
  el("job-list").replaceChildren();
  dirty.clear();
  const s = new Session(newClient(), filter, service);
  session = s;
  s.held = []; // until the first page is in
  s.feed = new LiveFeed({
    client: s.client,
    agent: filter.agent,
    onJob: (job) => onStreamJob(s, job),
    onState: (state, why) => {
      if (!s.current) return;
      showConn(state, why);
      if (state === "live") s.stats.kick();
    },
    onReset: () => {
      if (s.current) startSession(s.filter, s.service); // re-list from the top
    },
    onAuthError: (err) => {
      if (s.current) signOut(`Signed out: ${describe(err).text}`);
    },
  });
  s.feed.start();
  s.stats.kick();
  renderList(s);
  void loadPage(s);
}

async function loadPage(s: Session): Promise<void> {
  if (s.loading) return;
  s.loading = true;
  s.held ??= [];
  renderList(s);
  try {
    const page = await s.client.listJobs(
      {
        pageSize: PAGE_SIZE,
        pageToken: s.pageToken,
        statuses: s.filter.status === undefined ? [] : [s.filter.status],
        agentIdentifier: s.filter.agent,
      },
      s.call(),
    );
    if (!s.current) return;
    s.pageToken = page.nextPageToken;
    for (const id of s.list.addPage(page.jobs, page.nextPageToken !== "").keys()) dirty.add(id);
  } catch (err) {
    if (!s.current) return;
    if (describe(err).reason === "PAGE_TOKEN_EXPIRED") {
      notice("info", "The list was more than a day old: loaded again from the top.");
      startSession(s.filter, s.service);
      return;
    }
    refused("Listing jobs", err);
  } finally {
    if (s.current) {
      s.loading = false;
      const held = s.held ?? [];
      s.held = undefined;
      for (const job of held) applyJob(s, job);
      scheduleRender();
    }
  }
}

function onStreamJob(s: Session, job: Job): void {
  if (!s.current) return;
  if (detail?.id === job.id) updateDetail(job);
  if (s.held) s.held.push(job);
  else applyJob(s, job);
  s.stats.kick();
}

function applyJob(s: Session, job: Job): void {
  if (s.list.apply(job) !== "ignored") {
    dirty.add(job.id);
    scheduleRender();
  }
}

function scheduleRender(): void {
  if (renderQueued) return;
  renderQueued = true;
  queueMicrotask(() => {
    renderQueued = false;
    if (session) renderList(session);
  });
}

function renderList(s: Session): void {
  const at = epochNow();
  for (const id of dirty) {
    const job = s.list.get(id);
    let row = s.rows.get(id);
    if (!job) {
      row?.remove();
      s.rows.delete(id);
      continue;
    }
    if (!row) {
      row = makeRow(id);
      s.rows.set(id, row);
    }
    fillRow(row, job, s.service);
    markShown(`${id}:${job.version}`, at);
  }
  dirty.clear();
  // Put the rows in the list's order, moving only those out of place.
  const body = el("job-list");
  let cursor = body.firstElementChild;
  for (const job of s.list.jobs()) {
    const row = s.rows.get(job.id);
    if (!row) continue;
    if (row === cursor) cursor = cursor.nextElementSibling;
    else body.insertBefore(row, cursor);
  }
  body.dataset.loading = String(s.loading);
  const more = el<HTMLButtonElement>("more");
  more.hidden = s.list.complete && !s.loading;
  more.disabled = s.loading;
  more.textContent = s.loading ? "Loading…" : "More jobs";
  el("list-empty").hidden = s.loading || s.list.size > 0 || !s.list.complete;
  const count = el("list-count");
  count.dataset.count = String(s.list.size);
  count.dataset.more = String(!s.list.complete);
  setText(count, `${s.list.size} shown${s.list.complete ? "" : ", more to load"}`);
}

/** Records when a job version was first shown, keeping the last SHOWN_KEEP of them (a tab may
 * stay open for days). */
function markShown(key: string, at: number): void {
  if (key in window.__jobsvcShown) return;
  window.__jobsvcShown[key] = at;
  shownCount += 1;
  if (shownCount > 2 * SHOWN_KEEP) {
    const kept = Object.entries(window.__jobsvcShown).slice(-SHOWN_KEEP);
    window.__jobsvcShown = Object.fromEntries(kept);
    shownCount = kept.length;
  }
}

function makeRow(id: string): HTMLTableRowElement {
  const row = h("tr", { "data-testid": "job-row", "data-job-id": id });
  const head = h("th", { scope: "row" });
  head.append(
    h("button", {
      type: "button",
      class: "link",
      "data-testid": "job-open",
      "data-action": "open",
      "aria-label": `Details of job ${id}`,
      title: id,
    }, shortId(id)),
  );
  const status = h("td", { "data-testid": "job-status", "data-label": "Status" });
  status.append(h("span", { class: "badge" }));
  const actions = h("td", { class: "actions" });
  actions.append(
    h("button", {
      type: "button",
      class: "danger",
      "data-testid": "cancel",
      "data-action": "cancel",
      "aria-label": `Cancel job ${shortId(id)}`,
    }, "Cancel"),
    h("button", {
      type: "button",
      "data-testid": "retry",
      "data-action": "retry",
      "aria-label": `Retry job ${shortId(id)} as a new job`,
      "aria-describedby": "retry-help",
      title: el("retry-help").textContent?.replace(/\s+/g, " ").trim() ?? "",
    }, "Retry"),
  );
  row.append(
    head,
    status,
    h("td", { "data-testid": "job-agent", "data-label": "Agent" }),
    h("td", { "data-testid": "job-age", "data-label": "Age", class: "num" }),
    h("td", { "data-testid": "job-duration", "data-label": "Duration", class: "num" }),
    actions,
  );
  return row;
}

function fillRow(row: HTMLTableRowElement, job: Job, service: boolean): void {
  const status = statusName(job.status);
  row.dataset.status = status;
  row.dataset.version = String(job.version);
  row.dataset.agent = job.agentIdentifier;
  const cells = row.cells;
  const badge = cells[1].firstElementChild as HTMLElement;
  badge.dataset.status = status;
  setText(badge, statusLabel(job.status));
  setText(cells[2], job.agentIdentifier);
  setText(cells[3], age(job));
  setText(cells[4], duration(job));
  const buttons = cells[5].children;
  (buttons[0] as HTMLButtonElement).hidden = !isActive(job.status); // cancel
  (buttons[1] as HTMLButtonElement).hidden = !(service && isRetryable(job.status)); // retry
}

/** Ages and running durations move on by themselves. */
function tick(): void {
  const s = session;
  if (!s) return;
  for (const [id, row] of s.rows) {
    const job = s.list.get(id);
    if (!job) continue;
    setText(row.cells[3], age(job));
    if (job.status === JobStatus.RUNNING) setText(row.cells[4], duration(job));
  }
  const oldest = el("stats").querySelector<HTMLElement>('[data-testid="stats-oldest-pending"]');
  const ms = Number(oldest?.dataset.value);
  if (oldest && ms > 0) setText(oldest, span(Date.now() - ms));
}

// --- Figures ---------------------------------------------------------------------------------

async function refreshStats(s: Session): Promise<void> {
  if (!s.current) return;
  try {
    const st = await s.client.getStats({}, s.call());
    if (!s.current) return;
    const box = el("stats");
    const put = (name: string, value: string, text: string) => {
      const node = box.querySelector<HTMLElement>(`[data-testid="stats-${name}"]`);
      if (!node) return;
      node.dataset.value = value;
      setText(node, text);
    };
    for (const [name, n] of [
      ["total", st.total],
      ["pending", st.pending],
      ["running", st.running],
      ["completed", st.completed],
      ["failed", st.failed],
      ["cancelled", st.cancelled],
    ] as const) {
      put(name, String(n), n.toLocaleString());
    }
    put(
      "avg",
      String(st.avgProcessingSeconds),
      st.completed > 0n ? span(st.avgProcessingSeconds * 1000) : "—",
    );
    const oldest = tsMillis(st.oldestPendingCreatedAt);
    const waiting = oldest === undefined ? "—" : span(Date.now() - oldest);
    put("oldest-pending", String(oldest ?? 0), waiting);
    box.dataset.loaded = "true";
  } catch (err) {
    if (s.current) refused("GetStats", err);
  }
}

// --- Actions ---------------------------------------------------------------------------------

async function cancelJob(id: string, button: HTMLButtonElement): Promise<void> {
  const s = session;
  if (!s) return;
  button.disabled = true;
  try {
    const job = await s.client.cancelJob({ id }, s.call());
    if (!s.current) return;
    onStreamJob(s, job);
    notice("info", `Job ${shortId(id)} is ${statusLabel(job.status).toLowerCase()}.`);
  } catch (err) {
    if (s.current) refused(`Cancelling job ${shortId(id)}`, err);
  } finally {
    button.disabled = false;
  }
}

async function retryJob(id: string, button: HTMLButtonElement): Promise<void> {
  const s = session;
  const old = s?.list.get(id) ?? (detail?.id === id ? detail.job : undefined);
  if (!s || !old) return;
  button.disabled = true;
  try {
    const job = await s.client.createJob(
      {
        agentIdentifier: old.agentIdentifier,
        jobData: old.jobData,
        userId: old.userId,
        requestId: uuid(),
      },
      s.call(),
    );
    if (!s.current) return;
    onStreamJob(s, job);
    notice("info", `Job ${shortId(id)} retried as a new job, ${shortId(job.id)}.`, {
      newJobId: job.id,
    });
  } catch (err) {
    if (s.current) refused(`Retrying job ${shortId(id)}`, err);
  } finally {
    button.disabled = false;
  }
}

// --- The detail ------------------------------------------------------------------------------

function json(value: unknown): string {
  return JSON.stringify(value, null, 2);
}

function openDetail(id: string): void {
  const s = session;
  if (!s) return;
  const d: Detail = {
    id,
    job: s.list.get(id),
    history: new Throttle(() => loadDetail(s, d), 1000),
  };
  detail = d;
  const dialog = el<HTMLDialogElement>("detail");
  dialog.dataset.loading = "true"; // until GetJob and ListJobEvents have answered
  fillDetail(d);
  if (!dialog.open) dialog.showModal();
  d.history.kick();
}

function closeDetail(): void {
  detail?.history.cancel();
  detail = undefined;
  const dialog = el<HTMLDialogElement>("detail");
  if (dialog.open) dialog.close();
}

function updateDetail(job: Job): void {
  const d = detail;
  if (!d || (d.job && job.version <= d.job.version)) return;
  d.job = job;
  fillDetail(d);
  d.history.kick(); // the history has a new entry
}

async function loadDetail(s: Session, d: Detail): Promise<void> {
  const dialog = el("detail");
  dialog.dataset.loading = "true";
  try {
    const [job, history] = await Promise.all([
      s.client.getJob({ id: d.id }, s.call()),
      (async () => {
        const events: JobEvent[] = [];
        let pageToken = "";
        for (let i = 0; i < HISTORY_PAGES; i++) {
          const page = await s.client.listJobEvents(
            { jobId: d.id, pageSize: HISTORY_PAGE, pageToken },
            s.call(),
          );
          events.push(...page.events);
          pageToken = page.nextPageToken;
          if (!pageToken) break;
        }
        return { events, truncated: pageToken !== "" };
      })(),
    ]);
    if (detail !== d) return;
    // The same version may be fresher: a Heartbeat's progress within a second of the job's
    // last change is stored without a new version (and without a stream message).
    if (!d.job || job.version >= d.job.version) d.job = job;
    d.events = history.events;
    d.truncated = history.truncated;
    fillDetail(d);
  } catch (err) {
    if (detail === d) refused(`Reading job ${shortId(d.id)}`, err);
  } finally {
    if (detail === d) dialog.dataset.loading = "false";
  }
}

function fillDetail(d: Detail): void {
  const dialog = el("detail");
  const job = d.job;
  dialog.dataset.jobId = d.id;
  dialog.dataset.status = job ? statusName(job.status) : "";
  dialog.dataset.version = job ? String(job.version) : "";
  setText(el("detail-id"), d.id);
  const badge = el("detail-status");
  badge.dataset.status = job ? statusName(job.status) : "";
  setText(badge, job ? statusLabel(job.status) : "Loading…");
  setText(el("detail-agent"), job?.agentIdentifier ?? "");
  setText(el("detail-user"), job ? job.userId || "no user" : "");
  setText(el("detail-version"), job ? String(job.version) : "");
  setText(el("detail-attempt"), job ? String(job.attempt) : "");
  setText(el("detail-max-attempts"), job ? String(job.maxAttempts) : "");
  setText(el("detail-worker"), job?.workerId || "—");
  setText(el("detail-created"), when(tsMillis(job?.createdAt)));
  setText(el("detail-started"), when(tsMillis(job?.startedAt)));
  setText(el("detail-completed"), when(tsMillis(job?.completedAt)));
  setText(el("detail-error"), job?.errorMessage || "—");
  el("detail-error-box").hidden = !job?.errorMessage;
  setText(el("detail-progress"), job?.progress ? json(toJson(ValueSchema, job.progress)) : "—");
  el("detail-progress-box").hidden = !job?.progress;
  setText(el("detail-result"), job?.result ? json(toJson(ValueSchema, job.result)) : "—");
  el("detail-result-box").hidden = !job?.result;
  setText(el("detail-job-data"), job ? json(job.jobData ?? {}) : "");
  el("detail-cancel").hidden = !job || !isActive(job.status);
  const retry = el("detail-retry");
  retry.hidden = !job || !session?.service || !isRetryable(job.status);
  retry.title = el("retry-help").textContent?.replace(/\s+/g, " ").trim() ?? "";
  if (d.events) {
    el("detail-history").replaceChildren(
      ...d.events.map((e) => {
        const row = h("tr", {
          "data-testid": "history-row",
          "data-version": String(e.version),
          "data-status": statusName(e.status),
        });
        row.append(
          h("td", {}, String(e.version)),
          h("td", {}, statusLabel(e.status)),
          h("td", {}, when(tsMillis(e.occurredAt))),
          h("td", {}, e.errorMessage),
        );
        return row;
      }),
    );
    setText(
      el("detail-history-note"),
      d.truncated ? `The first ${d.events.length} changes.` : "",
    );
  } else {
    el("detail-history").replaceChildren();
    setText(el("detail-history-note"), "Loading…");
  }
}

// --- Wiring ----------------------------------------------------------------------------------

function init(): void {
  el<HTMLFormElement>("signin-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = el<HTMLInputElement>("token").value.trim();
    if (value) void signIn(value);
  });
  el("signout").addEventListener("click", () => signOut());
  el<HTMLFormElement>("filters").addEventListener("submit", (event) => {
    event.preventDefault();
    if (session) startSession(readFilter(), session.service);
  });
  el("filter-clear").addEventListener("click", () => {
    el<HTMLSelectElement>("filter-status").value = "";
    el<HTMLInputElement>("filter-agent").value = "";
    if (session) startSession(readFilter(), session.service);
  });
  el("more").addEventListener("click", () => {
    if (session) void loadPage(session);
  });
  el("job-list").addEventListener("click", (event) => {
    const target = event.target as HTMLElement;
    const row = target.closest<HTMLTableRowElement>('tr[data-testid="job-row"]');
    const id = row?.dataset.jobId;
    if (!id) return;
    const button = target.closest<HTMLButtonElement>("button[data-action]");
    const action = button?.dataset.action ?? "open";
    if (action === "cancel" && button) void cancelJob(id, button);
    else if (action === "retry" && button) void retryJob(id, button);
    else openDetail(id);
  });
  const dialog = el<HTMLDialogElement>("detail");
  el("detail-close").addEventListener("click", () => closeDetail());
  dialog.addEventListener("close", () => {
    detail?.history.cancel();
    detail = undefined;
  });
  el("detail-cancel").addEventListener("click", (event) => {
    if (detail) void cancelJob(detail.id, event.currentTarget as HTMLButtonElement);
  });
  el("detail-retry").addEventListener("click", (event) => {
    if (detail) void retryJob(detail.id, event.currentTarget as HTMLButtonElement);
  });
  window.addEventListener("online", () => session?.feed?.retryNow());
  setInterval(tick, 1000);

  const saved = sessionStorage.getItem(TOKEN_KEY);
  if (saved) {
    token = saved;
    startApp();
  } else {
    signOut();
  }
  document.body.dataset.ready = "true";
}

init();
