// The dashboard's browser driver for tests: opens the page jobsvc serves at `/` in Debian's
// Chromium (headless, through puppeteer-core; no browser is downloaded) and does what a test
// process asks on stdin, answering on stdout. The test makes changes over gRPC itself and asks
// this script what the page shows.
//
//   JOBSVC_URL=http://127.0.0.1:50051 JOBSVC_TOKEN=<JWT> JOBSVC_SCREENSHOTS=<dir> \
//     node clients/web/dashboard/e2e.mjs          # or: npm --prefix clients/web run e2e:dashboard
//
// Environment:
//   JOBSVC_URL          http://host:port whose `/` serves the dashboard (required)
//   JOBSVC_TOKEN        the token `signin` pastes (required; a command may give another)
//   JOBSVC_SCREENSHOTS  directory for `screenshot` (created if missing; default: the cwd)
//   CHROMIUM            the browser (default /usr/bin/chromium)
//   JOBSVC_E2E_IDLE_MS  quit after this long without a command (default 300000)
// stdout carries the protocol only; diagnostics (the page's console errors, failures) go to
// stderr, prefixed "e2e:". Neither ever prints a token.
//
// PROTOCOL. One JSON object per line on stdin, each with "cmd"; for each, one JSON line on
// stdout, in order: {"cmd": <cmd>, "ok": true|false, ...}. A "seq" in a command is echoed in
// its answer. ok:false carries "error" ("timeout", or what went wrong) and, where it applies,
// the state seen last. Commands run one at a time. Every wait is bounded: "timeout_ms"
// (default 5000, at most 120000). "ms" is the time the command waited, measured here.
// Before the first command the script prints {"event":"ready","browser":"Chrome/...","url":...}
// once the page has loaded (or {"event":"fatal","error":...} and exits 1). A browser that dies
// later prints {"event":"fatal",...} and exits 1. End of stdin, "quit", SIGTERM or SIGINT close
// the browser and delete its profile.
//
//   signin        {token?}      paste JOBSVC_TOKEN (or token), press Sign in, wait for "live";
//                               answers {state} or {ok:false, error, signin_error}
//   signout                     press Sign out, wait for the sign-in form
//   reload                      reload the page (the token stays in sessionStorage); wait for
//                               "live" when signed in, else for the sign-in form
//   conn                        {state, text, detail, signin_error}; state: signed-out |
//                               connecting | live | reconnecting | stopped; signin_error: why
//                               the page signed out or refused a token ("" if it did not)
//   wait_conn     {state}       wait until the connection state is `state`
//   rows                        {rows: [{id, status, agent, version}] in page order, count, more,
//                               loading}
//   wait_list                   wait until no ListJobs page is loading; answers as rows
//   wait_row      {id, status?, version?}  wait until the row of job `id` is shown (with that
//                               status: "JOB_STATUS_RUNNING" or "RUNNING"; and a version at
//                               least `version`); answers {row}
//   wait_gone     {id}          wait until job `id` has no row
//   stats                       {stats: {total, pending, running, completed, failed, cancelled,
//                               avg_seconds, oldest_pending_ms}} (null before the first GetStats)
//   wait_stats    {total?, pending?, running?, completed?, failed?, cancelled?}  wait until
//                               every figure given is shown; answers {stats}
//   filter        {status?, agent?}  set the filters ("" or absent: any), press Apply, wait
//                               for the first page and "live"; answers as rows
//   more                        press "More jobs", wait for the page; answers as rows
//   open_detail   {id, via?}    open job `id`'s detail, via "click" (the row, default) or
//                               "keyboard" (Tab focus on its id button, Enter); wait until its
//                               GetJob and history are in; answers {detail}
//   detail                      {detail: {id, status, version, agent, user, attempt,
//                               max_attempts, worker, error, progress, job_data, result,
//                               history: [{version, status}], loading}} or {detail: null}
//   wait_detail   {status?, version?, history?}  wait until the open detail shows that status,
//                               a version at least `version`, at least `history` entries
//   close_detail                press Escape; wait until the dialog is closed
//   cancel        {id, from?}   press Cancel on job `id`'s row (from: "row", default) or in
//                               its open detail ("detail"); wait until the row shows
//                               CANCELLED or the page shows a refusal: answers {status} or
//                               {ok:false, error:"refused", reason, text}
//   retry         {id, from?}   press Retry (service role; FAILED or CANCELLED jobs); wait for
//                               the new job's notice: answers {new_id} or {ok:false, reason}
//   notice                      {notice: {kind, reason, text, seq, new_job_id}}
//   screenshot    {name, full_page?}  write <JOBSVC_SCREENSHOTS>/<name>.png; answers {path}
//   viewport      {width, height}  resize the page (e.g. 390 x 844 for a phone)
//   shown         {id?}         {shown: window.__jobsvcShown}: "<id>:<version>" -> ms since the
//                               epoch (performance.timeOrigin + now) when the page first showed
//                               that version; only job `id`'s keys when given
//   drop_stream   {hold_ms?}    drop the page's live stream as a network failure would; it
//                               reconnects (from its resume token) after at least hold_ms
//   privacy                     {token_in_url, token_in_local_storage, token_in_session_storage,
//                               token_in_console}: where the page's token is found (booleans)
//   a11y                        Chrome's accessibility tree: {controls, unnamed: [roles]};
//                               ok:false when a button, field or link has no accessible name
//   errors                      {page_errors: [...], console_errors: [...]} seen so far
//   quit                        answers, then closes the browser and exits 0
//
// Example:  {"cmd":"signin"}  ->  {"cmd":"signin","ok":true,"ms":412,"state":"live"}
//           {"cmd":"wait_row","id":"5d0c...","status":"RUNNING","timeout_ms":2000}
//           ->  {"cmd":"wait_row","ok":true,"ms":87,"row":{"id":"5d0c...","status":
//               "JOB_STATUS_RUNNING","agent":"a","version":2}}
import { mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { createInterface } from "node:readline";
import puppeteer from "puppeteer-core";

const DEFAULT_TIMEOUT_MS = 5000;
const MAX_TIMEOUT_MS = 120_000;

const url = (process.env.JOBSVC_URL ?? "").replace(/\/+$/, "");
const envToken = process.env.JOBSVC_TOKEN ?? "";
const shots = resolve(process.env.JOBSVC_SCREENSHOTS || ".");
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
const idleMs = Number(process.env.JOBSVC_E2E_IDLE_MS) || 300_000;

const say = (line) => process.stderr.write(`e2e: ${line}\n`);
const answer = (obj) => process.stdout.write(`${JSON.stringify(obj)}\n`);

if (!/^https?:\/\//.test(url) || !envToken) {
  answer({ event: "fatal", error: "set JOBSVC_URL (http://host:port) and JOBSVC_TOKEN" });
  process.exit(2);
}

let browser;
let page;
let quitting = false;
let tokenInUse = envToken;
const pageErrors = [];
const consoleErrors = [];
const consoleTexts = []; // every console message, only to tell whether a token was printed
const profile = mkdtempSync(join(tmpdir(), "jobsvc-e2e-chromium-"));

async function cleanup() {
  quitting = true;
  if (browser) {
    const proc = browser.process();
    await Promise.race([browser.close().catch(() => {}), new Promise((r) => setTimeout(r, 5000))]);
    if (proc && proc.exitCode === null && proc.signalCode === null) proc.kill("SIGKILL");
  }
  rmSync(profile, { recursive: true, force: true });
}

async function exit(code) {
  await cleanup();
  process.exit(code);
}

for (const signal of ["SIGTERM", "SIGINT"]) process.on(signal, () => void exit(1));

// --- Waiting in the page -----------------------------------------------------------------------

function timeoutOf(cmd) {
  const t = Number(cmd.timeout_ms ?? DEFAULT_TIMEOUT_MS);
  return Math.max(0, Math.min(Number.isFinite(t) ? t : DEFAULT_TIMEOUT_MS, MAX_TIMEOUT_MS));
}

/** Waits until `fn(arg)` is truthy in the page (checked at once and on every DOM change:
 * every condition here reads the DOM): {ok, ms, value} or {ok:false, ms, error:"timeout"}. */
async function until(fn, arg, timeoutMs) {
  const t0 = performance.now();
  const ms = () => Math.round(performance.now() - t0);
  try {
    const handle = await page.waitForFunction(fn, { timeout: timeoutMs, polling: "mutation" }, arg);
    const value = await handle.jsonValue();
    await handle.dispose();
    return { ok: true, ms: ms(), value };
  } catch (err) {
    if (err?.name === "TimeoutError") return { ok: false, ms: ms(), error: "timeout" };
    throw err;
  }
}

// Functions evaluated in the page (they see only their argument).
const readRows = () => {
  const list = document.querySelector('[data-testid="job-list"]');
  const count = document.querySelector('[data-testid="list-count"]');
  return {
    rows: [...document.querySelectorAll('[data-testid="job-row"]')].map((r) => ({
      id: r.dataset.jobId,
      status: r.dataset.status,
      agent: r.dataset.agent,
      version: Number(r.dataset.version),
    })),
    count: Number(count?.dataset.count ?? 0),
    more: count?.dataset.more === "true",
    loading: list?.dataset.loading === "true",
  };
};

const readConn = () => {
  const c = document.querySelector('[data-testid="conn-state"]');
  const d = document.querySelector('[data-testid="conn-detail"]');
  const e = document.querySelector('[data-testid="signin-error"]');
  return {
    state: c?.dataset.state ?? "",
    text: c?.textContent ?? "",
    detail: d?.textContent ?? "",
    signin_error: e?.textContent ?? "",
  };
};

const readRow = (id) => {
  const r = document.querySelector(`[data-testid="job-row"][data-job-id="${CSS.escape(id)}"]`);
  return r
    ? { id, status: r.dataset.status, agent: r.dataset.agent, version: Number(r.dataset.version) }
    : null;
};

const readStats = () => {
  const box = document.querySelector('[data-testid="stats"]');
  if (!box || box.dataset.loaded !== "true") return null;
  const v = (name) => box.querySelector(`[data-testid="stats-${name}"]`)?.dataset.value;
  const stats = {};
  for (const n of ["total", "pending", "running", "completed", "failed", "cancelled"]) {
    stats[n] = Number(v(n));
  }
  stats.avg_seconds = Number(v("avg"));
  stats.oldest_pending_ms = Number(v("oldest-pending")) || null;
  return stats;
};

const readDetail = () => {
  const d = document.querySelector('[data-testid="detail"]');
  if (!d || !d.open) return null;
  const text = (id) => d.querySelector(`[data-testid="${id}"]`)?.textContent ?? "";
  const none = (s) => (s === "—" ? null : s);
  const json = (s) => {
    if (s === "—" || s === "") return null;
    try {
      return JSON.parse(s);
    } catch {
      return s;
    }
  };
  return {
    id: d.dataset.jobId,
    status: d.dataset.status,
    version: Number(d.dataset.version),
    loading: d.dataset.loading === "true",
    agent: text("detail-agent"),
    user: text("detail-user"),
    attempt: Number(text("detail-attempt")),
    max_attempts: Number(text("detail-max-attempts")),
    worker: none(text("detail-worker")),
    error: none(text("detail-error")),
    progress: json(text("detail-progress")),
    job_data: json(text("detail-job-data")),
    result: json(text("detail-result")),
    history: [...d.querySelectorAll('[data-testid="history-row"]')].map((r) => ({
      version: Number(r.dataset.version),
      status: r.dataset.status,
    })),
  };
};

const readNotice = () => {
  const n = document.querySelector('[data-testid="notice"]');
  return {
    kind: n?.dataset.kind ?? "",
    reason: n?.dataset.reason ?? "",
    text: n?.textContent ?? "",
    seq: Number(n?.dataset.seq ?? 0),
    new_job_id: n?.dataset.newJobId ?? "",
  };
};

const evalIn = (fn, arg) => page.evaluate(fn, arg);
/** An answer from a wait's outcome and what to add to it. */
const settled = (r, extra) => ({
  ok: r.ok,
  ms: r.ms,
  ...(r.ok ? {} : { error: r.error }),
  ...extra,
});
const statusOf = (s) => (!s ? "" : s.startsWith("JOB_STATUS_") ? s : `JOB_STATUS_${s}`);
const rowSel = (id) => `[data-testid="job-row"][data-job-id="${id}"]`;

function needId(cmd) {
  if (typeof cmd.id !== "string" || !/^[0-9a-f-]{36}$/.test(cmd.id)) {
    throw new Error(`"${cmd.cmd}" needs "id", a job UUID`);
  }
  return cmd.id;
}

async function waitLive(timeoutMs) {
  return until(
    () => {
      const state = document.querySelector('[data-testid="conn-state"]')?.dataset.state;
      const error = document.querySelector('[data-testid="signin-error"]')?.textContent ?? "";
      return state === "live" || (state === "signed-out" && error !== "") ? { state, error } : null;
    },
    null,
    timeoutMs,
  );
}

async function waitListed(timeoutMs) {
  return until(
    () => {
      const list = document.querySelector('[data-testid="job-list"]');
      const state = document.querySelector('[data-testid="conn-state"]')?.dataset.state;
      return list?.dataset.loading === "false" && state === "live";
    },
    null,
    timeoutMs,
  );
}

// --- Commands ------------------------------------------------------------------------------------

const commands = {
  async signin(cmd, timeoutMs) {
    tokenInUse = typeof cmd.token === "string" && cmd.token ? cmd.token : envToken;
    await page.locator('[data-testid="token-input"]').setTimeout(timeoutMs).fill(tokenInUse);
    await page.click('[data-testid="signin-button"]');
    const r = await waitLive(timeoutMs);
    if (!r.ok) return { ...r, ...(await evalIn(readConn)) };
    if (r.value.state !== "live") {
      return { ok: false, ms: r.ms, error: "refused", signin_error: r.value.error };
    }
    return { ok: true, ms: r.ms, state: "live" };
  },

  async signout(_cmd, timeoutMs) {
    await page.click('[data-testid="signout"]');
    return until(
      () => !document.querySelector('[data-testid="signin-form"]')?.closest("[hidden]"),
      null,
      timeoutMs,
    ).then(({ value: _, ...r }) => r);
  },

  async reload(_cmd, timeoutMs) {
    await page.reload({ waitUntil: "load", timeout: timeoutMs });
    const ready = await until(() => document.body.dataset.ready === "true", null, timeoutMs);
    if (!ready.ok) return ready;
    const signedIn = await evalIn(
      () => document.querySelector('[data-testid="conn-state"]')?.dataset.state !== "signed-out",
    );
    if (!signedIn) return { ok: true, ms: ready.ms, state: "signed-out" };
    const r = await waitLive(timeoutMs);
    if (!r.ok) return settled(r, await evalIn(readConn));
    return { ok: true, ms: r.ms, state: r.value.state };
  },

  async conn() {
    return { ok: true, ...(await evalIn(readConn)) };
  },

  async wait_conn(cmd, timeoutMs) {
    const r = await until(
      (want) => document.querySelector('[data-testid="conn-state"]')?.dataset.state === want,
      String(cmd.state ?? ""),
      timeoutMs,
    );
    return settled(r, await evalIn(readConn));
  },

  async rows() {
    return { ok: true, ...(await evalIn(readRows)) };
  },

  async wait_list(_cmd, timeoutMs) {
    const r = await waitListed(timeoutMs);
    return settled(r, await evalIn(readRows));
  },

  async wait_row(cmd, timeoutMs) {
    const want = {
      id: needId(cmd),
      status: statusOf(cmd.status),
      version: Number(cmd.version ?? 0),
    };
    const r = await until(
      (w) => {
        const row = document.querySelector(
          `[data-testid="job-row"][data-job-id="${CSS.escape(w.id)}"]`,
        );
        if (!row) return null;
        if (w.status && row.dataset.status !== w.status) return null;
        if (Number(row.dataset.version) < w.version) return null;
        const version = Number(row.dataset.version);
        return { id: w.id, status: row.dataset.status, agent: row.dataset.agent, version };
      },
      want,
      timeoutMs,
    );
    if (r.ok) return { ok: true, ms: r.ms, row: r.value };
    return { ...r, row: await evalIn(readRow, want.id) };
  },

  async wait_gone(cmd, timeoutMs) {
    const id = needId(cmd);
    const r = await until(
      (i) => !document.querySelector(`[data-testid="job-row"][data-job-id="${CSS.escape(i)}"]`),
      id,
      timeoutMs,
    );
    const { value: _, ...rest } = r;
    return r.ok ? rest : { ...rest, row: await evalIn(readRow, id) };
  },

  async stats() {
    return { ok: true, stats: await evalIn(readStats) };
  },

  async wait_stats(cmd, timeoutMs) {
    const want = {};
    for (const n of ["total", "pending", "running", "completed", "failed", "cancelled"]) {
      if (cmd[n] !== undefined) want[n] = Number(cmd[n]);
    }
    const r = await until(
      (w) => {
        const box = document.querySelector('[data-testid="stats"]');
        if (!box || box.dataset.loaded !== "true") return false;
        return Object.entries(w).every(
          ([n, v]) => Number(box.querySelector(`[data-testid="stats-${n}"]`)?.dataset.value) === v,
        );
      },
      want,
      timeoutMs,
    );
    return settled(r, { stats: await evalIn(readStats) });
  },

  async filter(cmd, timeoutMs) {
    await page.select('[data-testid="filter-status"]', statusOf(cmd.status ?? ""));
    await page.$eval(
      '[data-testid="filter-agent"]',
      (input, agent) => {
        input.value = agent;
      },
      String(cmd.agent ?? ""),
    );
    await page.click('[data-testid="filter-apply"]');
    const r = await waitListed(timeoutMs);
    return settled(r, await evalIn(readRows));
  },

  async more(_cmd, timeoutMs) {
    const visible = await evalIn(() => {
      const b = document.querySelector('[data-testid="more"]');
      return !!b && !b.hidden && !b.disabled;
    });
    if (!visible) return { ok: false, error: "no more button", ...(await evalIn(readRows)) };
    await page.click('[data-testid="more"]');
    const r = await waitListed(timeoutMs);
    return settled(r, await evalIn(readRows));
  },

  async open_detail(cmd, timeoutMs) {
    const id = needId(cmd);
    const t0 = performance.now();
    const row = await page.waitForSelector(rowSel(id), { timeout: timeoutMs }).catch(() => null);
    if (!row) return { ok: false, error: "no such row" };
    if (cmd.via === "keyboard") {
      await page.focus(`${rowSel(id)} [data-testid="job-open"]`);
      await page.keyboard.press("Enter");
    } else {
      await page.click(`${rowSel(id)} [data-testid="job-agent"]`);
    }
    const left = Math.max(0, timeoutMs - (performance.now() - t0));
    const r = await until(
      (i) => {
        const d = document.querySelector('[data-testid="detail"]');
        return (
          d?.open &&
          d.dataset.jobId === i &&
          d.dataset.loading === "false" &&
          d.querySelectorAll('[data-testid="history-row"]').length > 0
        );
      },
      id,
      left,
    );
    return {
      ok: r.ok,
      ms: Math.round(performance.now() - t0),
      ...(r.ok ? {} : { error: r.error }),
      detail: await evalIn(readDetail),
    };
  },

  async detail() {
    return { ok: true, detail: await evalIn(readDetail) };
  },

  async wait_detail(cmd, timeoutMs) {
    const want = {
      status: statusOf(cmd.status),
      version: Number(cmd.version ?? 0),
      history: Number(cmd.history ?? 0),
    };
    const r = await until(
      (w) => {
        const d = document.querySelector('[data-testid="detail"]');
        if (!d?.open) return false;
        if (w.status && d.dataset.status !== w.status) return false;
        if (Number(d.dataset.version) < w.version) return false;
        return d.querySelectorAll('[data-testid="history-row"]').length >= w.history;
      },
      want,
      timeoutMs,
    );
    return settled(r, { detail: await evalIn(readDetail) });
  },

  async close_detail(_cmd, timeoutMs) {
    await page.keyboard.press("Escape");
    const r = await until(
      () => !document.querySelector('[data-testid="detail"]')?.open,
      null,
      timeoutMs,
    );
    const { value: _, ...rest } = r;
    return rest;
  },

  async cancel(cmd, timeoutMs) {
    const id = needId(cmd);
    const selector =
      cmd.from === "detail"
        ? '[data-testid="detail-cancel"]'
        : `${rowSel(id)} [data-testid="cancel"]`;
    return pressAndWait(selector, id, timeoutMs, (w) => {
      const row = document.querySelector(
        `[data-testid="job-row"][data-job-id="${CSS.escape(w.id)}"]`,
      );
      if (row?.dataset.status === "JOB_STATUS_CANCELLED") return { status: row.dataset.status };
      const n = document.querySelector('[data-testid="notice"]');
      if (Number(n?.dataset.seq) > w.seq && n?.dataset.kind === "error") {
        return { refused: true, reason: n.dataset.reason ?? "", text: n.textContent ?? "" };
      }
      return null;
    });
  },

  async retry(cmd, timeoutMs) {
    const id = needId(cmd);
    const selector =
      cmd.from === "detail"
        ? '[data-testid="detail-retry"]'
        : `${rowSel(id)} [data-testid="retry"]`;
    return pressAndWait(selector, id, timeoutMs, (w) => {
      const n = document.querySelector('[data-testid="notice"]');
      if (Number(n?.dataset.seq) <= w.seq) return null;
      if (n?.dataset.kind === "error") {
        return { refused: true, reason: n.dataset.reason ?? "", text: n.textContent ?? "" };
      }
      return n?.dataset.newJobId ? { new_id: n.dataset.newJobId } : null;
    });
  },

  async notice() {
    return { ok: true, notice: await evalIn(readNotice) };
  },

  async screenshot(cmd) {
    const name = String(cmd.name ?? "");
    if (!/^[A-Za-z0-9_-]{1,64}$/.test(name)) {
      throw new Error(`bad screenshot name ${JSON.stringify(name)}`);
    }
    mkdirSync(shots, { recursive: true });
    const path = join(shots, `${name}.png`);
    const full = !!cmd.full_page;
    await page.screenshot({ path, fullPage: full, captureBeyondViewport: full });
    return { ok: true, path };
  },

  async viewport(cmd) {
    const width = Math.round(Number(cmd.width));
    const height = Math.round(Number(cmd.height));
    if (!(width >= 200 && width <= 4000 && height >= 200 && height <= 4000)) {
      throw new Error("viewport needs width and height, 200..4000");
    }
    // Width and height only: the layout follows the width (a media query), and changing
    // isMobile or hasTouch would make puppeteer reload the page.
    await page.setViewport({ width, height });
    return { ok: true, width, height };
  },

  async shown(cmd) {
    const all = await evalIn(() => window.__jobsvcShown ?? {});
    if (typeof cmd.id !== "string") return { ok: true, shown: all };
    const prefix = `${cmd.id}:`;
    const mine = Object.entries(all).filter(([key]) => key.startsWith(prefix));
    return { ok: true, shown: Object.fromEntries(mine) };
  },

  async drop_stream(cmd) {
    const holdMs = Math.max(0, Math.min(Number(cmd.hold_ms ?? 0) || 0, MAX_TIMEOUT_MS));
    await evalIn((h) => window.__jobsvcDropStream(h), holdMs);
    return { ok: true, hold_ms: holdMs };
  },

  async privacy() {
    const where = await evalIn((t) => {
      const has = (store) =>
        Object.keys(store).some((k) => k.includes(t) || (store.getItem(k) ?? "").includes(t));
      return {
        token_in_url: location.href.includes(t) || document.referrer.includes(t),
        token_in_local_storage: has(localStorage),
        token_in_session_storage: has(sessionStorage),
      };
    }, tokenInUse);
    const inConsole = consoleTexts.some((text) => text.includes(tokenInUse));
    return { ok: true, ...where, token_in_console: inConsole };
  },

  async a11y() {
    const tree = await page.accessibility.snapshot({ interestingOnly: true });
    const controls = new Set(["button", "textbox", "combobox", "link", "checkbox", "listbox"]);
    const unnamed = [];
    let named = 0;
    const walk = (node) => {
      if (!node) return;
      if (controls.has(node.role)) {
        if ((node.name ?? "").trim() === "") unnamed.push(node.role);
        else named += 1;
      }
      for (const child of node.children ?? []) walk(child);
    };
    walk(tree);
    return { ok: unnamed.length === 0, controls: named + unnamed.length, unnamed };
  },

  async errors() {
    return { ok: true, page_errors: pageErrors, console_errors: consoleErrors };
  },

  async quit() {
    return { ok: true };
  },
};

/** Presses a button that belongs to job `id` and waits for `done` (given the notice's seq
 * before the press) to return something. */
async function pressAndWait(selector, id, timeoutMs, done) {
  const t0 = performance.now();
  const usable = await evalIn((s) => {
    const b = document.querySelector(s);
    return !!b && !b.hidden && !b.disabled;
  }, selector);
  if (!usable) return { ok: false, error: "no such button", row: await evalIn(readRow, id) };
  const seq = (await evalIn(readNotice)).seq;
  await page.click(selector);
  const left = Math.max(0, timeoutMs - (performance.now() - t0));
  const r = await until(done, { id, seq }, left);
  const ms = Math.round(performance.now() - t0);
  if (!r.ok) return { ok: false, ms, error: r.error, notice: await evalIn(readNotice) };
  if (r.value.refused) {
    return { ok: false, ms, error: "refused", reason: r.value.reason, text: r.value.text };
  }
  return { ok: true, ms, ...r.value };
}

// --- Main ------------------------------------------------------------------------------------

async function start() {
  browser = await puppeteer.launch({
    executablePath,
    headless: true, // puppeteer passes --headless=new
    pipe: true, // DevTools over a pipe: no port for other processes to reach
    userDataDir: profile,
    timeout: 30_000,
    protocolTimeout: MAX_TIMEOUT_MS + 15_000, // a wait is one DevTools call: outlast the longest
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
  browser.on("disconnected", () => {
    if (quitting) return;
    answer({ event: "fatal", error: "the browser went away" });
    void exit(1);
  });
  page = (await browser.pages())[0] ?? (await browser.newPage());
  page.setDefaultTimeout(10_000);
  await page.setViewport({ width: 1280, height: 800 });
  page.on("pageerror", (err) => {
    const text = String(err?.message ?? err);
    pageErrors.push(text);
    say(`page error: ${text}`);
  });
  page.on("console", (msg) => {
    const text = msg.text();
    consoleTexts.push(text);
    if (msg.type() === "error" || msg.type() === "warn") {
      consoleErrors.push(text);
      say(`console ${msg.type()}: ${text}`);
    }
  });
  await page.goto(`${url}/`, { waitUntil: "load", timeout: 30_000 });
  await page.waitForFunction(() => document.body?.dataset.ready === "true", { timeout: 10_000 });
  answer({ event: "ready", browser: await browser.version(), url: `${url}/` });
}

async function main() {
  try {
    await start();
  } catch (err) {
    answer({ event: "fatal", error: String(err?.message ?? err) });
    await exit(1);
    return;
  }
  const lines = createInterface({ input: process.stdin, crlfDelay: Infinity });
  let idle = setTimeout(() => {
    say(`no command for ${idleMs} ms: quitting`);
    void exit(1);
  }, idleMs);
  for await (const line of lines) {
    if (!line.trim()) continue;
    clearTimeout(idle);
    let cmd = {};
    let reply;
    try {
      cmd = JSON.parse(line);
      const run = commands[cmd?.cmd];
      if (typeof cmd !== "object" || !run || !Object.hasOwn(commands, cmd.cmd)) {
        reply = { ok: false, error: `unknown command ${JSON.stringify(cmd?.cmd)}` };
      } else {
        reply = await run(cmd, timeoutOf(cmd));
      }
    } catch (err) {
      reply = { ok: false, error: String(err?.message ?? err) };
      say(`${cmd?.cmd ?? "?"}: ${reply.error}`);
    }
    const seq = cmd?.seq !== undefined ? { seq: cmd.seq } : {};
    answer({ cmd: cmd?.cmd ?? null, ...seq, ...reply });
    if (cmd?.cmd === "quit") break;
    idle = setTimeout(() => {
      say(`no command for ${idleMs} ms: quitting`);
      void exit(1);
    }, idleMs);
  }
  clearTimeout(idle);
  await exit(0);
}

void main();
