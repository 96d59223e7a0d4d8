// Bundles the dashboard (dashboard.ts and what it imports) with esbuild into ONE minified file,
// dist/dashboard.js, which is committed: jobsvc embeds it (with index.html and dashboard.css),
// so building the server needs no Node.js. The bundle is deterministic: the same sources and
// node_modules (package-lock.json) give the same bytes.
//
//   node dashboard/build.mjs           # write dist/dashboard.js   (npm run build:dashboard)
//   node dashboard/build.mjs --check   # rebuild into a temporary directory and compare with
//                                      # the committed dist/dashboard.js (npm run check:dashboard)
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, relative } from "node:path";
import { fileURLToPath } from "node:url";
import { gzipSync } from "node:zlib";
import { build } from "esbuild";

const here = dirname(fileURLToPath(import.meta.url));
const committed = join(here, "dist", "dashboard.js");
const check = process.argv.includes("--check");
const LIMIT_GZIPPED = 200 * 1024;

const out = check ? mkdtempSync(join(tmpdir(), "jobsvc-dashboard-")) : join(here, "dist");
try {
  const outfile = join(out, "dashboard.js");
  await build({
    absWorkingDir: here,
    entryPoints: ["dashboard.ts"],
    outfile,
    bundle: true,
    format: "esm",
    platform: "browser",
    target: ["es2022", "chrome100", "firefox100", "safari15.4"],
    minify: true,
    sourcemap: false,
    legalComments: "eof",
    charset: "utf8",
    logLevel: "warning",
  });
  const fresh = readFileSync(outfile);
  const gzipped = gzipSync(fresh, { level: 9 }).length;
  const sizes = `${fresh.length} bytes, ${gzipped} gzipped`;
  if (gzipped > LIMIT_GZIPPED) {
    console.error(`dashboard: the bundle is ${sizes}: more than ${LIMIT_GZIPPED} gzipped`);
    process.exitCode = 1;
  } else if (check) {
    let old;
    try {
      old = readFileSync(committed);
    } catch {
      old = Buffer.alloc(0);
    }
    if (!fresh.equals(old)) {
      console.error(
        `dashboard: ${relative(process.cwd(), committed)} is stale (${old.length} bytes; a ` +
          `build makes ${fresh.length}): run 'npm --prefix clients/web run build:dashboard' ` +
          "and commit it",
      );
      process.exitCode = 1;
    } else {
      console.log(`dashboard: dist/dashboard.js is what the sources build (${sizes})`);
    }
  } else {
    console.log(`dashboard: wrote ${relative(process.cwd(), outfile)} (${sizes})`);
  }
} finally {
  if (check) rmSync(out, { recursive: true, force: true });
}
