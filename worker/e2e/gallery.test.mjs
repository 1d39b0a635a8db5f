// The Worker under `wrangler dev`, in front of moto's S3 server filled by the persist stage,
// driven by Debian's Chromium through playwright-core. Run: `npm run test:browser`.
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { accessSync, constants, mkdirSync } from "node:fs";
import { createServer } from "node:net";
import { dirname, join } from "node:path";
import { after, before, test } from "node:test";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const WORKER = dirname(dirname(fileURLToPath(import.meta.url)));
const ROOT = dirname(WORKER);
const OUTPUT = join(WORKER, "e2e", "output");
const PYTHON = process.env.PYTHON ?? join(ROOT, ".venv", "bin", "python");
const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
// Without the background-networking flags Chromium keeps dialling Google on a closed network.
const CHROMIUM_ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

// The signed gallery's secret (a second Worker with GALLERY=signed).
const SECRET = "e2e-signing-secret";

let origin;
let workers = [];
let browser;
let info;
let base;
let signedBase;

function freePort() {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
    server.on("error", reject);
  });
}

function firstLine(child) {
  return new Promise((resolve, reject) => {
    let text = "";
    child.stdout.on("data", (chunk) => {
      text += chunk;
      const end = text.indexOf("\n");
      if (end >= 0) resolve(text.slice(0, end));
    });
    child.on("exit", (code) => reject(new Error(`origin exited ${code}`)));
  });
}

async function waitFor(url, deadlineMs) {
  const deadline = Date.now() + deadlineMs;
  let last;
  while (Date.now() < deadline) {
    try {
      const res = await fetch(url);
      if (res.status < 500) return;
      last = `status ${res.status}`;
    } catch (err) {
      last = err.message;
    }
    await new Promise((resolve) => setTimeout(resolve, 250));
  }
  throw new Error(`${url} not ready: ${last}`);
}

async function startWorker(name, vars) {
  const port = await freePort();
  const args = ["wrangler", "dev", "--ip", "127.0.0.1", "--port", String(port)];
  for (const [name, value] of Object.entries(vars)) args.push("--var", `${name}:${value}`);
  // Each its own state directory: two `wrangler dev` share none.
  args.push("--persist-to", join(OUTPUT, `.wrangler-${name}`));
  const worker = spawn("npx", args, {
    cwd: WORKER,
    stdio: ["ignore", "ignore", "inherit"],
    detached: true,
    env: { ...process.env, WRANGLER_SEND_METRICS: "false", CI: "1" },
  });
  workers.push(worker);
  const url = `http://127.0.0.1:${port}`;
  await waitFor(`${url}/favicon.ico`, 90_000);
  return url;
}

/** A signed link to `key` (docs/signed-urls.md), valid until `expires`. */
function signedPath(key, expires) {
  const signature = createHmac("sha256", SECRET).update(`/${key}\n${expires}`).digest("hex");
  return `/${key}?expires=${expires}&signature=${signature}`;
}

/** Fails at once, before any server starts, when `CHROMIUM` names no executable. */
function requireChromium() {
  try {
    accessSync(CHROMIUM, constants.X_OK);
  } catch {
    throw new Error(
      `Chromium is required: no executable at ${CHROMIUM}; apt-get install chromium, ` +
        "or set CHROMIUM= to its path",
    );
  }
}

before(async () => {
  requireChromium();
  console.time("origin");
  mkdirSync(OUTPUT, { recursive: true });
  origin = spawn(PYTHON, [join(WORKER, "e2e", "origin.py")], {
    cwd: ROOT,
    stdio: ["pipe", "pipe", "ignore"],
  });
  info = JSON.parse(await firstLine(origin));
  console.timeEnd("origin");
  console.time("wrangler dev");

  const vars = {
    ORIGIN: "s3",
    S3_ENDPOINT: info.endpoint,
    S3_BUCKET: info.bucket,
    S3_REGION: "us-east-1",
    ORIGIN_PREFIX: info.prefix,
    S3_ACCESS_KEY_ID: info.access_key_id,
    S3_SECRET_ACCESS_KEY: info.secret_access_key,
  };
  base = await startWorker("public", vars);
  signedBase = await startWorker("signed", { ...vars, SIGNING_SECRET: SECRET, GALLERY: "signed" });
  console.timeEnd("wrangler dev");

  // Playwright starts Chromium with a fresh, empty profile directory of its own.
  browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS });
});

after(async () => {
  await browser?.close();
  for (const worker of workers) if (worker.pid) process.kill(-worker.pid, "SIGTERM");
  origin?.stdin.end();
});

async function gallery(page, path = "/") {
  const dialogs = [];
  page.on("dialog", (dialog) => {
    dialogs.push(dialog.message());
    void dialog.dismiss();
  });
  const response = await page.goto(`${base}${path}`);
  assert.equal(response.status(), 200);
  return dialogs;
}

test("the gallery shows the latest day, and every image loads", async () => {
  const page = await browser.newPage({ viewport: { width: 1280, height: 1600 } });
  const failed = [];
  page.on("response", (r) => r.status() >= 400 && failed.push(`${r.status()} ${r.url()}`));
  const dialogs = await gallery(page);
  assert.equal(await page.title(), "Images of 2026-12-01");
  const items = page.locator(".item");
  assert.equal(await items.count(), 3);
  // Newest first.
  assert.deepEqual(await items.evaluateAll((els) => els.map((e) => e.id)), [
    "sea-1",
    "moon-1",
    "fox-1",
  ]);
  for (const img of await page.locator(".item img").all()) {
    await img.scrollIntoViewIfNeeded();
    await img.evaluate((el) =>
      el.complete ? null : new Promise((r) => el.addEventListener("load", r)),
    );
    const { naturalWidth, currentSrc } = await img.evaluate((el) => ({
      naturalWidth: el.naturalWidth,
      currentSrc: el.currentSrc,
    }));
    assert.ok(naturalWidth > 0, `${currentSrc} did not load`);
    // Chromium takes AVIF: the first <picture> source.
    assert.match(currentSrc, /\.w(128|256|384)\.avif$/);
  }
  assert.deepEqual(dialogs, []);
  await page.screenshot({ path: join(OUTPUT, "gallery.png"), fullPage: true });
  await page.close();
  // Nothing the page asked for failed.
  assert.deepEqual(failed, []);
});

test("a signed page's images load after its link expired, and the link says it expired", async () => {
  const page = await browser.newPage({ viewport: { width: 390, height: 844 } });
  // Images requested only once the link has expired, as lazy images scrolled to late are.
  const expires = Math.floor(Date.now() / 1000) + 3;
  const expired = new Promise((resolve) => setTimeout(resolve, (expires + 2) * 1000 - Date.now()));
  await page.route(/\.(png|avif|webp)\?/, async (route) => {
    await expired;
    await route.continue();
  });
  // Signed for the whole gallery (`/`, showing its latest day): its links lead to other days.
  const response = await page.goto(`${signedBase}${signedPath("", expires)}`);
  assert.equal(response.status(), 200);
  await expired;
  const images = page.locator(".item img");
  assert.equal(await images.count(), 3);
  for (const img of await images.all()) {
    await img.scrollIntoViewIfNeeded();
    await page.waitForFunction((el) => el.complete, await img.elementHandle());
    const { naturalWidth, currentSrc } = await img.evaluate((el) => ({
      naturalWidth: el.naturalWidth,
      currentSrc: el.currentSrc,
    }));
    assert.ok(naturalWidth > 0, `${currentSrc} did not load`);
  }
  // The day links carry the page's own expiry: the earlier day answers that the link expired.
  const [earlier] = await Promise.all([page.waitForNavigation(), page.keyboard.press("[")]);
  assert.equal(earlier.status(), 403);
  assert.equal(await page.title(), "This link has expired");
  await page.close();
});

test("a prompt holding a <script> shows as text and never runs", async () => {
  const page = await browser.newPage();
  const dialogs = await gallery(page);
  const text = await page.locator("#fox-1 .prompt").textContent();
  assert.equal(text, "<script>document.title='pwned';alert(1)</script> a fox & a hound");
  assert.notEqual(await page.title(), "pwned");
  assert.deepEqual(dialogs, []);
  await page.close();
});

test("keys move between images and between days", async () => {
  const page = await browser.newPage({ viewport: { width: 390, height: 844 } });
  await gallery(page);
  const focused = () => page.evaluate(() => document.activeElement?.closest(".item")?.id ?? null);
  await page.keyboard.press("j");
  assert.equal(await focused(), "sea-1");
  await page.keyboard.press("ArrowRight");
  assert.equal(await focused(), "moon-1");
  await page.keyboard.press("j");
  await page.keyboard.press("j");
  assert.equal(await focused(), "fox-1");
  await page.keyboard.press("k");
  assert.equal(await focused(), "moon-1");
  await page.screenshot({ path: join(OUTPUT, "gallery-phone.png") });
  // Enter opens the focused image (the PNG URL, negotiated to AVIF for Chromium).
  const [opened] = await Promise.all([page.waitForNavigation(), page.keyboard.press("Enter")]);
  assert.equal(opened.headers()["content-type"], "image/avif");
  await page.goBack();
  await Promise.all([page.waitForURL(`${base}/2026/11/30/`), page.keyboard.press("[")]);
  assert.equal(await page.title(), "Images of 2026-11-30");
  assert.equal(await page.locator(".item").count(), 1);
  await Promise.all([page.waitForURL(`${base}/2026/12/01/`), page.keyboard.press("]")]);
  assert.equal(await page.locator(".item").count(), 3);
  await page.close();
});

test("a document stored at an image key is served as an image, and runs nothing", async () => {
  const page = await browser.newPage();
  const response = await page.goto(`${base}/2026/12/01/rogue-1.png`);
  assert.equal(response.headers()["content-type"], "image/png");
  assert.match(response.headers()["content-security-policy"], /default-src 'none'; sandbox/);
  assert.notEqual(await page.title(), "pwned");
  await page.close();
});

test("widths and formats from one URL", async () => {
  const png = `${base}/${info.persisted[1].key}`;
  const avif = await fetch(`${png}?w=200`, { headers: { Accept: "image/avif,image/webp" } });
  assert.equal(avif.headers.get("content-type"), "image/avif");
  assert.equal(avif.headers.get("vary"), "Accept");
  const webp = await fetch(`${png}?w=100`, { headers: { Accept: "image/webp" } });
  assert.equal(webp.headers.get("content-type"), "image/webp");
  const original = await fetch(png);
  assert.equal(original.headers.get("content-type"), "image/png");
  assert.equal((await original.arrayBuffer()).byteLength, info.persisted[1].size);
});

test("a long prompt shows four lines, opens whole, and leaves its row as high as it is", async () => {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  await gallery(page, "/2026/11/29/");
  const box = (selector) =>
    page.locator(selector).evaluate((el) => {
      const { top, height } = el.getBoundingClientRect();
      return { top, height, line: parseFloat(getComputedStyle(el).lineHeight) || 20 };
    });
  const [long, short] = [await box("#long-1"), await box("#short-1")];
  assert.equal(long.top, short.top, "both in one row");
  const prompt = await box("#long-1 .prompt");
  assert.ok(prompt.height <= 4.5 * prompt.line, `a prompt of ${prompt.height}px`);
  // The short item keeps its own height: nothing stretches it to the long one's.
  const shortPrompt = await box("#short-1 .prompt");
  const meta = await box("#short-1 .meta");
  assert.ok(short.height <= meta.top + meta.height - short.top + 1, "short item stretched");
  assert.ok(short.height < long.height);
  assert.ok(shortPrompt.height < 2 * shortPrompt.line);
  // Its summary opens the whole prompt, without a script.
  await page.locator("#long-1 summary").click();
  const opened = await box("#long-1 .prompt");
  assert.ok(opened.height > 10 * prompt.height, `opened to ${opened.height}px`);
  assert.equal(
    await page.locator("#long-1 .prompt").textContent(),
    info.persisted.find((r) => r.generation_id === "long-1").prompt,
  );
  await page.close();
});

test("the keys help shows only where the script runs", async () => {
  for (const javaScriptEnabled of [true, false]) {
    const context = await browser.newContext({ javaScriptEnabled });
    const page = await context.newPage();
    await gallery(page);
    assert.equal(await page.locator(".keys").isVisible(), javaScriptEnabled);
    // All the page says is in its main landmark (the script follows it).
    const outside = await page.evaluate(
      () =>
        [...document.body.children].filter((el) => !["MAIN", "SCRIPT"].includes(el.tagName)).length,
    );
    assert.equal(outside, 0);
    await context.close();
  }
});

test("an error opened in the browser is a page linking to the latest images", async () => {
  const page = await browser.newPage();
  for (const path of ["/2026/13/01/", "/index.html", "/2026/12/01/nope-1.png"]) {
    const response = await page.goto(`${base}${path}`);
    assert.equal(response.status(), 404, path);
    assert.equal(await page.title(), "Not Found");
    await Promise.all([page.waitForURL(`${base}/`), page.getByText("Latest images").click()]);
    assert.equal(await page.title(), "Images of 2026-12-01");
  }
  const response = await page.goto(`${base}/${info.persisted[1].key}?w=abc`);
  assert.equal(response.status(), 400);
  assert.equal(await page.title(), "Bad Request");
  // An API client still reads plain text.
  const text = await fetch(`${base}/index.html`);
  assert.equal(text.headers.get("content-type"), "text/plain; charset=utf-8");
  await page.close();
});

test("a page revalidates with its ETag", async () => {
  const first = await fetch(`${base}/2026/12/01/`);
  const etag = first.headers.get("etag");
  assert.match(etag, /^W\/"/);
  const again = await fetch(`${base}/2026/12/01/`, { headers: { "If-None-Match": etag } });
  assert.equal(again.status, 304);
  assert.equal(again.headers.get("cache-control"), "public, max-age=60");
});
