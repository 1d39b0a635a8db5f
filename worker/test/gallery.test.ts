import { env } from "cloudflare:workers";
import { afterEach, describe, expect, it, vi } from "vitest";
import { ALT_LENGTH, escape, SCRIPT, STYLE } from "../src/page";
import { sign } from "../src/signing";
import {
  IMAGE_GRACE,
  isCalendarDay,
  MAX_DAY_LIST_PAGES,
  MAX_ITEMS,
  pageParam,
  pageTag,
} from "../src/gallery";
import { BASE, countingBucket, newBase, send } from "./helpers";

// Gallery tests use their own far-future year so no other test's objects share their days.
let year = 3000;

async function sha256(text: string): Promise<string> {
  const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(text));
  return btoa(String.fromCharCode(...new Uint8Array(digest)));
}

/**
 * The gallery's policy, written out: its own inline script and style by their hashes, images
 * from this origin, and nothing else (no base, no forms, no framing). Directives in any order.
 */
async function expectPolicy(header: string | null) {
  const directives = (header ?? "")
    .split(";")
    .map((d) => d.trim().replace(/\s+/g, " "))
    .filter((d) => d !== "");
  expect(directives.sort()).toEqual(
    [
      "default-src 'none'",
      "img-src 'self'",
      `script-src 'sha256-${await sha256(SCRIPT)}'`,
      `style-src 'sha256-${await sha256(STYLE)}'`,
      "base-uri 'none'",
      "form-action 'none'",
      "frame-ancestors 'none'",
    ].sort(),
  );
}

/**
 * An image of `day` with its metadata record, and derivatives at `widths` listed in its
 * derivatives record; `stored` of them are in the bucket (all unless told: a bucket restored
 * without its derivatives keeps the records that list them).
 */
async function record(
  day: string,
  id: string,
  prompt: string,
  created: string,
  widths = [64],
  stored: string[] = widths.flatMap((w) => [`w${w}.avif`, `w${w}.webp`]),
) {
  const base = `${day}/${id}`;
  await env.IMAGES.put(`${base}.png`, "png");
  const derivatives: Record<string, string> = { record: `${base}.derivatives.json` };
  for (const w of widths) {
    derivatives[`avif:${w}`] = `${base}.w${w}.avif`;
    derivatives[`webp:${w}`] = `${base}.w${w}.webp`;
  }
  for (const name of stored) await env.IMAGES.put(`${base}.${name}`, name);
  const persisted = {
    keys: { image: `${base}.png`, metadata: `${base}.json` },
    prompt,
    seed: 42,
    model: "tiny",
    width: 64,
    height: 32,
    created_at: created,
  };
  await env.IMAGES.put(`${base}.json`, JSON.stringify({ persisted }));
  // The derivatives record, and the enhanced-prompt record: neither is an image record.
  await env.IMAGES.put(
    `${base}.derivatives.json`,
    JSON.stringify({ derived: { keys: derivatives } }),
  );
  await env.IMAGES.put(`${base}.prompt.json`, "{}");
}

async function days() {
  year += 1;
  const y = String(year);
  await record(`${y}/01/30`, "old", "an old lighthouse", `${y}-01-30T08:00:00Z`);
  await record(
    `${y}/02/01`,
    "first",
    'a <script>alert(1)</script> & "quotes"',
    `${y}-02-01T09:00:00Z`,
  );
  await record(`${y}/02/01`, "second", "two moons", `${y}-02-01T10:00:00Z`);
  return y;
}

afterEach(() => {
  vi.restoreAllMocks();
  vi.useRealTimers();
});

describe("gallery", () => {
  it("shows the latest day, newest first, escaped, with links to earlier days", async () => {
    const y = await days();
    const res = await send(`${newBase()}/`);
    expect(res.status).toBe(200);
    expect(res.headers.get("Content-Type")).toBe("text/html; charset=utf-8");
    const html = await res.text();
    expect(html).toContain(`Images of ${y}-02-01`);
    expect(html.indexOf('id="second"')).toBeLessThan(html.indexOf('id="first"'));
    expect(html).toContain("a &lt;script&gt;alert(1)&lt;/script&gt; &amp; &quot;quotes&quot;");
    expect(html).not.toContain("<script>alert");
    expect(html).toContain(`<source type="image/avif" srcset="/${y}/02/01/second.w64.avif 64w"`);
    expect(html).toContain(`<source type="image/webp" srcset="/${y}/02/01/second.w64.webp 64w"`);
    expect(html).toContain('loading="lazy"');
    expect(html).toContain('<meta name="viewport"');
    expect(html).toContain(`<a rel="prev" href="/${y}/01/30/">${y}-01-30</a>`);
    expect(html).not.toContain("prompt.json");
  });

  // A day's keys come from the origin in pages of 1000, in the order of their ids (random):
  // one page held some 80 images, an arbitrary subset of the day, the newest not among them.
  it("shows a busy day's newest images, past the first page of its keys", async () => {
    year += 1;
    const day = `${year}/03/01`;
    // 300 images of 4 keys: 1200 keys, so the newest are past the first page (ids in
    // listing order). Three batches uploaded apart: the newest 200 are the last two.
    for (let batch = 0; batch < 3; batch++) {
      const ids = Array.from({ length: 100 }, (_, i) => batch * 100 + i);
      await Promise.all(
        ids.map((n) => {
          const hour = String(Math.floor(n / 15)).padStart(2, "0");
          const id = `g${String(n).padStart(3, "0")}`;
          return record(day, id, `image ${n}`, `${year}-03-01T${hour}:00:00Z`);
        }),
      );
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
    const res = await send(`${newBase()}/${day}/`);
    expect(res.status).toBe(200);
    const html = await res.text();
    const shown = [...html.matchAll(/id="(g[0-9]{3})"/g)].map((m) => m[1]);
    const newest = Array.from({ length: 200 }, (_, i) => `g${String(i + 100).padStart(3, "0")}`);
    expect(new Set(shown)).toEqual(new Set(newest));
    expect(shown[0]).toMatch(/^g(28[5-9]|29[0-9])$/); // by the records' own times
  }, 60_000);

  it("shows one day with a link to the later one", async () => {
    const y = await days();
    const html = await (await send(`${newBase()}/${y}/01/30/`)).text();
    expect(html).toContain("an old lighthouse");
    expect(html).not.toContain("two moons");
    expect(html).toContain(`<a rel="next" href="/${y}/02/01/">`);
  });

  it("answers 404 for a day that does not exist or is no date, but not for today", async () => {
    const y = await days();
    vi.useFakeTimers({ toFake: ["Date"] });
    vi.setSystemTime(Date.UTC(Number(y), 1, 2, 0, 30));
    // Not even a bucket folder makes 02/31 a day.
    await record(`${y}/02/31`, "impossible", "p", `${y}-03-03T10:00:00Z`);
    for (const path of [`/${y}/01/31/`, `/${y}/02/03/`, `/${y}/02/31/`, "/2027/02/29/"]) {
      const res = await send(`${newBase()}${path}`);
      expect(res.status, path).toBe(404);
      expect(res.headers.get("Content-Type")).toBe("text/html; charset=utf-8");
    }
    // Today's day (UTC), with no folder yet: an empty day, linked to the one before.
    const today = await send(`${newBase()}/${y}/02/02/`);
    expect(today.status).toBe(200);
    const html = await today.text();
    expect(html).toContain("No images on this day.");
    expect(html).toContain(`<a rel="prev" href="/${y}/02/01/">`);
    expect(isCalendarDay("2028/02/29/")).toBe(true); // a leap year
    expect(isCalendarDay("0001/12/31/")).toBe(true);
    expect(isCalendarDay("2100/02/29/")).toBe(false);
  });

  it("links to neighbouring days that hold records only", async () => {
    year += 1;
    await record(`${year}/07/01`, "a", "first", `${year}-07-01T10:00:00Z`);
    // Images whose records were never written: a folder the gallery shows nothing of.
    await env.IMAGES.put(`${year}/07/02/rendered.png`, "png");
    await env.IMAGES.put(`${year}/07/31/rendered.png`, "png");
    await record(`${year}/07/03`, "c", "third", `${year}-07-03T10:00:00Z`);
    const first = await (await send(`${newBase()}/${year}/07/01/`)).text();
    expect(first).toContain(`<a rel="next" href="/${year}/07/03/">`);
    const third = await (await send(`${newBase()}/${year}/07/03/`)).text();
    expect(third).toContain(`<a rel="prev" href="/${year}/07/01/">`);
    expect(third).not.toContain(`/${year}/07/02/`);
    expect(third).not.toContain(`rel="next"`);
  });

  it("lays out each prompt in its own direction, named once and briefly", async () => {
    year += 1;
    const day = `${year}/08/01`;
    const hebrew = "חתול על גג, 2 ירחים!";
    const long = `a lighthouse ${"and a long tail of words ".repeat(90)}`.trim();
    await record(day, "rtl", hebrew, `${year}-08-01T10:00:00Z`);
    await record(day, "long", long, `${year}-08-01T09:00:00Z`);
    const html = await (await send(`${newBase()}/${day}/`)).text();
    expect(html).toMatch(/<main>\s*<h1>[^]*<ol class="grid">[^]*<\/ol>[^]*<\/main>/);
    const items = Object.fromEntries(
      [...html.matchAll(/<li class="item" id="([^"]+)"[\s\S]*?<\/li>/g)].map((m) => [m[1], m[0]]),
    );
    // The alt text names the link: whole when short, the paragraph then hidden from screen readers.
    expect(items.rtl).toContain(`dir="auto" alt="${hebrew}">`);
    expect(items.rtl).toContain(`<p class="prompt" dir="auto" aria-hidden="true">${hebrew}</p>`);
    // A long prompt: a cut alt names the link, and the whole prompt is read out below it.
    const alt = /alt="([^"]*)"/.exec(items.long ?? "")?.[1] ?? "";
    expect(Array.from(alt).length).toBeLessThanOrEqual(ALT_LENGTH);
    expect(Array.from(alt).length).toBeGreaterThan(ALT_LENGTH - 10);
    expect(alt.endsWith("…")).toBe(true);
    expect(long.startsWith(alt.slice(0, -1))).toBe(true);
    // Shown cut to four lines, its summary opening it whole: read out in full all the same.
    expect(items.long).toContain(
      `<details class="prompt" dir="auto"><summary><span class="clamp">${long}</span></summary></details>`,
    );
    expect(items.long).not.toContain("aria-hidden");
  });

  // One long prompt stretched every item of its row to its height (grid items stretch).
  it("keeps a row as high as its own items, and a long prompt to four lines", () => {
    const rules = Object.fromEntries(
      [...STYLE.matchAll(/([^{}]+)\{([^}]*)\}/g)].map((m) => [m[1]?.trim(), m[2] ?? ""]),
    );
    expect(rules["ol.grid"]).toContain("align-items: start;");
    expect(rules["details.prompt:not([open]) .clamp"]).toMatch(
      /display: -webkit-box;[^]*-webkit-line-clamp: 4;[^]*overflow: hidden;/,
    );
  });

  it("keeps all it says in its main landmark, and the keys help for when they work", async () => {
    const y = await days();
    const html = await (await send(`${newBase()}/${y}/02/01/`)).text();
    const body = /<body>\n([^]*)<\/body>/.exec(html)?.[1] ?? "";
    // Only the script follows the main landmark; the day links and keys help are inside it.
    expect(body).toMatch(/^<main>\n[^]*<\/main>\n<script>[^<]*<\/script>\n$/);
    const main = /<main>([^]*)<\/main>/.exec(body)?.[1] ?? "";
    expect(main).toContain(`<nav aria-label="Days"><a rel="prev" href="/${y}/01/30/">`);
    // Hidden without the script, which makes the keys work: it shows the help first.
    expect(main).toContain('<p class="meta keys" hidden>Keys: <kbd>j</kbd>');
    expect(SCRIPT.startsWith('document.querySelector(".keys").hidden = false;\n')).toBe(true);
  });

  it("says that there are no images yet when there is no day at all", async () => {
    year += 1;
    const res = await send(`${newBase()}/`, { ORIGIN_PREFIX: `empty${year}` });
    expect(res.status).toBe(200);
    const html = await res.text();
    expect(html).toContain("<p>No images yet.</p>");
    expect(html).not.toContain("on this day");
  });

  it("answers errors as pages under its policy, with a link to the latest day", async () => {
    const y = await days();
    for (const [query, status] of [
      ["?page=0", 400],
      ["?page=2", 404],
    ] as const) {
      const res = await send(`${newBase()}/${y}/02/01/${query}`);
      expect(res.status, query).toBe(status);
      expect(res.headers.get("Content-Type")).toBe("text/html; charset=utf-8");
      await expectPolicy(res.headers.get("Content-Security-Policy"));
      expect(res.headers.get("Cache-Control")).toBe("no-store");
      const html = await res.text();
      expect(html).toContain("<!doctype html>");
      expect(html).toContain('<a href="/">');
    }
  });

  it("allows only its own script and style", async () => {
    await days();
    const res = await send(`${newBase()}/`);
    await expectPolicy(res.headers.get("Content-Security-Policy"));
    // The hashes are of what the page holds, byte for byte.
    const html = await res.text();
    expect(html).toContain(`<script>${SCRIPT}</script>`);
    expect(html).toContain(`<style>${STYLE}</style>`);
  });

  it("escapes every HTML metacharacter", () => {
    expect(escape(`<a href="x" onclick='y'>&</a>`)).toBe(
      "&lt;a href=&quot;x&quot; onclick=&#39;y&#39;&gt;&amp;&lt;/a&gt;",
    );
  });

  it("is off when images are private, unless signed links are configured", async () => {
    await days();
    const secret = "gallery-signing-secret";
    expect((await send(`${BASE}/`, { SIGNING_SECRET: secret })).status).toBe(404);
    expect((await send(`${BASE}/`, { GALLERY: "off" })).status).toBe(404);
    expect((await send(`${BASE}/`, { SIGNING_SECRET: secret, GALLERY: "signed" })).status).toBe(
      403,
    );
    vi.spyOn(console, "error").mockImplementation(() => {});
    expect((await send(`${BASE}/`, { SIGNING_SECRET: secret, GALLERY: "on" })).status).toBe(500);
  });

  it("behind a link signed for one day, signs that day's images and nothing else", async () => {
    const y = await days();
    const secret = "gallery-signing-secret";
    vi.useFakeTimers({ toFake: ["Date"] });
    vi.setSystemTime(1_800_000_000_000);
    const expires = 1_800_000_300;
    const day = `${y}/02/01/`;
    const signature = await sign(day, expires, secret);
    const base = newBase();
    const url = `${base}/${day}?expires=${expires}&signature=${signature}`;
    const res = await send(url, { SIGNING_SECRET: secret, GALLERY: "signed" });
    expect(res.status).toBe(200);
    expect(res.headers.get("Cache-Control")).toBe("private, max-age=60");
    const html = await res.text();
    // The earlier day is no link of this page, and the day's signature does not open it.
    const prev = `${y}/01/30/`;
    expect(html).not.toContain(`href="/${prev}`);
    expect(html).not.toContain('rel="prev"');
    // Nor does the page speak of days: no empty list of them, no keys for them.
    expect(html).not.toContain('aria-label="Days"');
    expect(html).not.toContain("earlier day");
    const other = await send(`${base}/${prev}?expires=${expires}&signature=${signature}`, {
      SIGNING_SECRET: secret,
      GALLERY: "signed",
    });
    expect(other.status).toBe(403);
    // Images, which load as they are scrolled to, are signed IMAGE_GRACE longer than the link.
    const avif = `${y}/02/01/second.w64.avif`;
    const until = expires + IMAGE_GRACE;
    const signed = `/${avif}?expires=${until}&amp;signature=${await sign(avif, until, secret)}`;
    expect(html).toContain(signed);
    expect(html).not.toContain(
      `?expires=${expires}&amp;signature=${await sign(avif, expires, secret)}`,
    );

    // After the link expired: the page's images still load, the page says it expired.
    vi.setSystemTime((expires + 10) * 1000);
    const image = await send(`${base}${signed.replaceAll("&amp;", "&")}`, {
      SIGNING_SECRET: secret,
    });
    expect(image.status).toBe(200);
    expect(await image.text()).toBe("w64.avif");
    expect(image.headers.get("Cache-Control")).toBe(`private, max-age=${IMAGE_GRACE - 10}`);
    const expired = await send(url, { SIGNING_SECRET: secret, GALLERY: "signed" });
    expect(expired.status).toBe(403);
    expect(expired.headers.get("Content-Type")).toBe("text/html; charset=utf-8");
    await expectPolicy(expired.headers.get("Content-Security-Policy"));
    const text = await expired.text();
    expect(text).toContain("<h1>This link has expired</h1>");
    // Behind signed links `/` needs a signature too: no link to it.
    expect(text).not.toContain('href="/"');
  });

  it("behind a link signed for /, links every day, signed for the whole gallery", async () => {
    const y = await days();
    const secret = "gallery-signing-secret";
    const signedFor = { SIGNING_SECRET: secret, GALLERY: "signed" };
    const expires = Math.floor(Date.now() / 1000) + 300;
    const whole = `expires=${expires}&amp;signature=${await sign("", expires, secret)}`;
    const base = newBase();
    const res = await send(`${base}/?${whole.replace("&amp;", "&")}`, signedFor);
    expect(res.status).toBe(200);
    const html = await res.text();
    expect(html).toContain("two moons");
    const prev = `/${y}/01/30/?${whole}`;
    expect(html).toContain(`<a rel="prev" href="${prev}">`);

    // The earlier day, through that link: its images, and a link on to the later day.
    const earlier = await send(`${base}${prev.replace("&amp;", "&")}`, signedFor);
    expect(earlier.status).toBe(200);
    const text = await earlier.text();
    expect(text).toContain("an old lighthouse");
    expect(text).toContain(`<a rel="next" href="/${y}/02/01/?${whole}">`);
    const avif = `${y}/01/30/old.w64.avif`;
    const until = expires + IMAGE_GRACE;
    expect(text).toContain(
      `/${avif}?expires=${until}&amp;signature=${await sign(avif, until, secret)}`,
    );
  });

  it("behind a link signed for one day, signs the links to its other pages", async () => {
    const day = "3500/03/01/";
    const { bucket } = busyDay(day, MAX_ITEMS + 1);
    const secret = "gallery-signing-secret";
    const signedFor = { IMAGES: bucket, SIGNING_SECRET: secret, GALLERY: "signed" };
    const expires = Math.floor(Date.now() / 1000) + 300;
    const first = `${newBase()}/${day}?expires=${expires}&signature=${await sign(day, expires, secret)}`;
    const html = await (await send(first, signedFor)).text();
    const older = `/${day}?page=2&amp;expires=${expires}&amp;signature=${await sign(day, expires, secret, { page: "2" })}`;
    expect(html).toContain(`<a href="${older}">Older images</a>`);
    const second = await send(
      `${new URL(first).origin}${older.replaceAll("&amp;", "&")}`,
      signedFor,
    );
    expect(second.status).toBe(200);
    expect(await second.text()).toContain("<span>Page 2 of 2</span>");
  });

  // <picture> takes the first <source> whose type the browser decodes, and shows nothing when
  // that URL answers 404: it never falls back to its <img>. A record that lists derivatives
  // the bucket lost (restored from a backup without them) must not offer them.
  it("offers only derivatives whose objects the bucket holds", async () => {
    year += 1;
    const day = `${year}/03/07`;
    await record(day, "all", "p", `${year}-03-07T10:00:00Z`, [64, 128]);
    await record(day, "webp", "p", `${year}-03-07T09:00:00Z`, [64, 128], ["w64.webp"]);
    await record(day, "none", "p", `${year}-03-07T08:00:00Z`, [64], []);
    const { bucket, calls } = countingBucket();
    const res = await send(`${newBase()}/${day}/`, { IMAGES: bucket });
    expect(res.status).toBe(200);
    const items = Object.fromEntries(
      [...(await res.text()).matchAll(/<li class="item" id="([^"]+)"[\s\S]*?<\/li>/g)].map((m) => [
        m[1],
        m[0],
      ]),
    );
    expect(items.all).toContain(`srcset="/${day}/all.w64.avif 64w, /${day}/all.w128.avif 128w"`);
    expect(items.all).toContain(`srcset="/${day}/all.w64.webp 64w, /${day}/all.w128.webp 128w"`);
    expect(items.webp).toContain(`<source type="image/webp" srcset="/${day}/webp.w64.webp 64w"`);
    expect(items.webp).not.toContain("avif");
    expect(items.webp).not.toContain("w128");
    expect(items.none).not.toContain("<source");
    expect(items.none).toContain(`<img src="/${day}/none.png"`);
    // Known from the listing the day's records come from: no derivative object is read.
    expect(calls.filter((c) => /\.w\d+\./.test(c.key))).toEqual([]);
  });
});

/**
 * An R2 bucket holding one day of `count` images, `KEYS_PER_IMAGE` keys each, listed as R2 lists
 * (key order, `limit` keys a page, a cursor to the next): image `n` was uploaded at minute `n`,
 * and its id is a hash of `n`, so listing order is no order of time. `dayLists` counts the
 * listings of the day's keys.
 */
const KEYS_PER_IMAGE = 10;
function busyDay(day: string, count: number) {
  const id = (n: number) => `i${((n * 2654435761) % 2 ** 32).toString(16).padStart(8, "0")}`;
  const suffixes = [".png", ".json", ".thumb.webp", ".derivatives.json", ".w64.avif"];
  while (suffixes.length < KEYS_PER_IMAGE) suffixes.push(`.w${suffixes.length}.webp`);
  const keys: { key: string; n: number }[] = [];
  for (let n = 0; n < count; n++) {
    for (const suffix of suffixes) keys.push({ key: `${day}${id(n)}${suffix}`, n });
  }
  keys.sort((a, b) => (a.key < b.key ? -1 : 1));
  const start = Date.UTC(3500, 0, 1);
  let dayLists = 0;
  const bucket = {
    async list(options: R2ListOptions) {
      const prefix = options.prefix ?? "";
      if (options.delimiter) {
        const below = [day.slice(0, 5), day.slice(0, 8), day].filter(
          (folder) => folder.startsWith(prefix) && folder.length > prefix.length,
        );
        return { objects: [], delimitedPrefixes: below.slice(0, 1), truncated: false };
      }
      dayLists += 1;
      const from = Number(options.cursor ?? 0);
      const page = keys.filter((k) => k.key.startsWith(prefix)).slice(from, from + 1000);
      const next = from + page.length;
      const objects = page.map((k) => ({ key: k.key, uploaded: new Date(start + k.n * 60_000) }));
      return { objects, delimitedPrefixes: [], truncated: next < keys.length, cursor: `${next}` };
    },
    async get(key: string) {
      const n = keys.find((k) => k.key === key)?.n;
      if (n === undefined || !key.endsWith(".json") || key.endsWith(".derivatives.json")) {
        return null;
      }
      const created = new Date(start + n * 60_000).toISOString();
      const body = JSON.stringify({ persisted: { prompt: `image ${n}`, created_at: created } });
      const uploaded = new Date(start);
      return { body: new Response(body).body, size: body.length, httpEtag: '"r"', uploaded };
    },
    async head() {
      return null;
    },
  } as unknown as R2Bucket;
  return { bucket, id, dayLists: () => dayLists };
}

function shownIds(html: string): string[] {
  return [...html.matchAll(/<li class="item" id="([^"]+)"/g)].map((m) => m[1] ?? "");
}

describe("gallery on a busy day", () => {
  it("shows the newest first, and every image through its pages", async () => {
    const day = "3500/01/01/";
    const count = 2 * MAX_ITEMS + 50; // 4,500 keys: five list pages
    const { bucket, id, dayLists } = busyDay(day, count);
    const base = newBase();
    const first = await send(`${base}/${day}`, { IMAGES: bucket });
    expect(first.status).toBe(200);
    const html = await first.text();
    const newest = Array.from({ length: MAX_ITEMS }, (_, i) => id(count - 1 - i));
    expect(shownIds(html)).toEqual(newest);
    expect(html).toContain("<span>Page 1 of 3</span>");
    expect(html).toContain(`<a href="/${day}?page=2">Older images</a>`);
    expect(html).not.toContain("holds more images than the gallery lists");

    const seen = new Set(shownIds(html));
    for (const page of [2, 3]) {
      const res = await send(`${base}/${day}?page=${page}`, { IMAGES: bucket });
      expect(res.status).toBe(200);
      const text = await res.text();
      expect(text).toContain(`<span>Page ${page} of 3</span>`);
      expect(text).toContain(page === 2 ? `href="/${day}">Newer images` : `?page=2">Newer`);
      for (const shown of shownIds(text)) seen.add(shown);
    }
    expect(seen.size).toBe(count);
    // The day's 4,500 keys were listed once (five pages of 1000), for all three pages.
    expect(dayLists()).toBe(5);

    expect((await send(`${base}/${day}?page=4`, { IMAGES: bucket })).status).toBe(404);
    expect((await send(`${base}/${day}?page=0`, { IMAGES: bucket })).status).toBe(400);
    expect((await send(`${base}/${day}?page=x`, { IMAGES: bucket })).status).toBe(400);
  }, 60_000);

  it("says so when a day holds more keys than it lists", async () => {
    vi.spyOn(console, "warn").mockImplementation(() => {});
    const day = "3500/02/01/";
    const count = (MAX_DAY_LIST_PAGES * 1000) / KEYS_PER_IMAGE + 100;
    const { bucket } = busyDay(day, count);
    const res = await send(`${newBase()}/${day}`, { IMAGES: bucket });
    expect(res.status).toBe(200);
    const html = await res.text();
    expect(html).toContain("This day holds more images than the gallery lists");
    expect(shownIds(html)).toHaveLength(MAX_ITEMS);
  }, 60_000);
});

describe("gallery costs", () => {
  it("lists only the folders between the day and its neighbours", async () => {
    year += 1;
    const first = year;
    year += 2;
    for (const y of [first, first + 1, first + 2]) {
      for (let m = 1; m <= 12; m++) {
        const month = String(m).padStart(2, "0");
        await record(`${y}/${month}/01`, `m${month}`, "p", `${y}-${month}-01T00:00:00Z`);
      }
    }
    const { bucket, calls } = countingBucket();
    const res = await send(`${newBase()}/${first + 1}/06/01/`, { IMAGES: bucket });
    expect(res.status).toBe(200);
    const html = await res.text();
    expect(html).toContain(`<a rel="next" href="/${first + 1}/07/01/">`);
    expect(html).toContain(`<a rel="prev" href="/${first + 1}/05/01/">`);
    const listed = calls.filter((c) => c.method === "list").map((c) => c.key);
    // Nothing past the later day, nothing before the seventh earlier one.
    expect(listed.filter((prefix) => prefix.startsWith(`${first + 2}/`))).toEqual([]);
    expect(listed.filter((prefix) => prefix.startsWith(`${first}/0`))).toEqual([]);
    // The years, the months of two years, the days of nine months, the day itself, and one
    // page of each of its eight neighbours (whether it holds records).
    expect(listed.length).toBeLessThanOrEqual(21);
  });

  it("answers 404 for a day before the oldest, after one listing", async () => {
    await days();
    const { bucket, calls } = countingBucket();
    const res = await send(`${newBase()}/0001/01/01/`, { IMAGES: bucket });
    expect(res.status).toBe(404);
    expect(calls.filter((c) => c.method === "list")).toHaveLength(1);
  });

  it("answers pages past the last and missing days from the edge, listing nothing", async () => {
    const y = await days();
    const base = newBase();
    const { bucket, calls } = countingBucket();
    // A page past the last is known from the day's folders and records, before its neighbours.
    expect((await send(`${base}/${y}/02/01/?page=2`, { IMAGES: bucket })).status).toBe(404);
    const listed = calls.filter((c) => c.method === "list").map((c) => c.key);
    expect(listed).toEqual(["", `${y}/`, `${y}/02/`, `${y}/02/01/`]);
    for (const path of ["/", `/${y}/02/01/`]) {
      expect((await send(`${base}${path}`, { IMAGES: bucket })).status).toBe(200);
    }
    calls.length = 0;
    // Each a page of its own at the edge: only the listings kept there answer them.
    const missing = [
      ...[2, 3, 4, 999999, 9999999].map((n) => `/${y}/02/01/?page=${n}`),
      ...[2, 3, 999999, 9999999].map((n) => `/?page=${n}`),
      // Past the integers a number holds exactly, and past any number at all.
      ...["9007199254740993", "9".repeat(400)].map((n) => `/${y}/02/01/?page=${n}`),
      ...["02/02", "02/28", "03/01", "12/31"].map((date) => `/${y}/${date}/`),
      `/${y + 1000}/01/01/`,
      "/1999/01/01/",
    ];
    for (const path of missing) {
      expect((await send(`${base}${path}`, { IMAGES: bucket })).status, path).toBe(404);
    }
    expect(calls).toEqual([]);
  });

  it("answers ?page=1 with the day's own URL, and refuses other spellings of a page", async () => {
    const y = await days();
    const base = newBase();
    for (const path of [`/${y}/02/01/`, "/"]) {
      const res = await send(`${base}${path}?page=1&utm=x`);
      expect(res.status, path).toBe(301);
      expect(res.headers.get("Location")).toBe(path);
      expect(res.headers.get("Cache-Control")).toBe("no-store");
      expect(res.headers.get("Content-Security-Policy")).toBe("default-src 'none'; sandbox");
    }
    for (const page of ["01", "+1", "1.0", "2e0", "1&page=1", "0", "00", "-1", "", " 2"]) {
      expect((await send(`${base}/${y}/02/01/?page=${page}`)).status, page).toBe(400);
    }
    // Behind signed links the redirect is signed for the same day, until the same time.
    const secret = "gallery-signing-secret";
    const expires = Math.floor(Date.now() / 1000) + 300;
    const day = `${y}/02/01/`;
    const signature = await sign(day, expires, secret, { page: "1" });
    const res = await send(`${base}/${day}?page=1&expires=${expires}&signature=${signature}`, {
      SIGNING_SECRET: secret,
      GALLERY: "signed",
    });
    expect(res.status).toBe(301);
    expect(res.headers.get("Location")).toBe(
      `/${day}?expires=${expires}&signature=${await sign(day, expires, secret)}`,
    );
  });

  it("keeps a page at the edge for a minute: a repeat costs the origin nothing", async () => {
    const y = await days();
    for (const path of ["/", `/${y}/02/01/`]) {
      const base = newBase();
      const { bucket, calls } = countingBucket();
      const first = await send(`${base}${path}`, { IMAGES: bucket });
      expect(first.status).toBe(200);
      expect(first.headers.get("Cache-Control")).toBe("public, max-age=60");
      expect(calls.length).toBeGreaterThan(0);
      calls.length = 0;
      const again = await send(`${base}${path}`, { IMAGES: bucket });
      expect(await again.text()).toBe(await first.text());
      expect(calls).toEqual([]);
    }
  });
});

describe("gallery page numbers", () => {
  it("reads any number without a leading zero as a page, however long", () => {
    const page = (value: string) => pageParam(new URLSearchParams({ page: value }));
    expect(page("7")).toBe(7);
    expect(page("9999999")).toBe(9_999_999);
    expect(page("999999999999999")).toBe(999_999_999_999_999);
    // Past 15 digits, no longer exact: read as the largest exact integer, past any last page.
    expect(page("1000000000000000")).toBe(Number.MAX_SAFE_INTEGER);
    expect(page("9".repeat(400))).toBe(Number.MAX_SAFE_INTEGER);
    for (const bad of ["0", "01", "1.5", "1e3", "-2", "+2", "", "x"])
      expect(page(bad), bad).toBeNull();
    expect(pageParam(new URLSearchParams())).toBe(1);
    expect(pageParam(new URLSearchParams("page=2&page=2"))).toBeNull();
  });
});

describe("gallery revalidation", () => {
  const revalidate = (url: string, tag: string, method = "GET", overrides = {}) =>
    send(new Request(url, { method, headers: { "If-None-Match": tag } }), overrides);

  it("tags a page with the hash of its bytes, and answers a matching If-None-Match 304", async () => {
    const y = await days();
    const url = `${newBase()}/${y}/02/01/`;
    const res = await send(url);
    expect(res.status).toBe(200);
    const html = await res.text();
    const tag = res.headers.get("ETag") ?? "";
    expect(tag).toBe(await pageTag(html));
    expect(tag).toMatch(/^W\/"[A-Za-z0-9_-]{43}"$/);
    const head = await send(new Request(url, { method: "HEAD" }));
    expect(head.headers.get("ETag")).toBe(tag);

    // Weak comparison (RFC 9110 §13.1.2): the tag, weak or not, in a list, or `*`.
    for (const asked of [tag, tag.slice(2), `"other", ${tag}`, "*"]) {
      for (const method of ["GET", "HEAD"]) {
        const again = await revalidate(url, asked, method);
        expect(again.status, `${method} ${asked}`).toBe(304);
        expect(again.body).toBeNull();
        expect(again.headers.get("ETag")).toBe(tag);
        // The headers a 200 would carry, but those of its body (RFC 9110 §15.4.5).
        expect(again.headers.get("Cache-Control")).toBe("public, max-age=60");
        expect(again.headers.get("Content-Security-Policy")).toBe(
          res.headers.get("Content-Security-Policy"),
        );
        expect(again.headers.get("Content-Type")).toBeNull();
      }
    }
    const other = await revalidate(url, 'W/"other"');
    expect(other.status).toBe(200);
    expect(await other.text()).toBe(html);
  });

  it("changes the tag when the page changes", async () => {
    const y = await days();
    const first = await send(`${newBase()}/${y}/02/01/`);
    await record(`${y}/02/01`, "third", "three moons", `${y}-02-01T11:00:00Z`);
    // A base of its own: the page as it is now, not as the edge keeps it for a minute.
    const url = `${newBase()}/${y}/02/01/`;
    const tag = first.headers.get("ETag") ?? "";
    const changed = await revalidate(url, tag);
    expect(changed.status).toBe(200);
    expect(await changed.text()).toContain("three moons");
    expect(changed.headers.get("ETag")).not.toBe(tag);
  });

  it("revalidates a signed page while its link holds, never once it expired", async () => {
    const y = await days();
    const secret = "gallery-signing-secret";
    const signedFor = { SIGNING_SECRET: secret, GALLERY: "signed" };
    vi.useFakeTimers({ toFake: ["Date"] });
    vi.setSystemTime(1_800_000_000_000);
    const expires = 1_800_000_300;
    const day = `${y}/02/01/`;
    const url = `${newBase()}/${day}?expires=${expires}&signature=${await sign(day, expires, secret)}`;
    const res = await send(url, signedFor);
    const tag = res.headers.get("ETag") ?? "";
    expect(tag).toBe(await pageTag(await res.text()));
    const again = await revalidate(url, tag, "GET", signedFor);
    expect(again.status).toBe(304);
    expect(again.headers.get("Cache-Control")).toBe("private, max-age=60");
    vi.setSystemTime((expires + 1) * 1000);
    const expired = await revalidate(url, tag, "GET", signedFor);
    expect(expired.status).toBe(403);
    expect(expired.headers.get("ETag")).toBeNull();
  });

  it("tags no error page", async () => {
    const y = await days();
    const res = await revalidate(`${newBase()}/${y}/02/01/?page=2`, "*");
    expect(res.status).toBe(404);
    expect(res.headers.get("ETag")).toBeNull();
  });
});

describe("gallery records", () => {
  it("drops a record that is no metadata record, and shows the rest of the day", async () => {
    year += 1;
    const day = `${year}/04/01`;
    await record(day, "good", "a good one", `${year}-04-01T10:00:00Z`);
    const warnings = vi.spyOn(console, "warn").mockImplementation(() => {});
    const bad = [{ persisted: null }, { persisted: "text" }, [1, 2], "just text", null, 7];
    for (const [i, value] of bad.entries()) {
      await env.IMAGES.put(`${day}/bad${i}.png`, "png");
      await env.IMAGES.put(`${day}/bad${i}.json`, JSON.stringify(value));
    }
    await env.IMAGES.put(`${day}/broken.json`, "{ not json");
    const res = await send(`${newBase()}/${day}/`);
    expect(res.status).toBe(200);
    const html = await res.text();
    expect(shownIds(html)).toEqual(["good"]);
    expect(warnings.mock.calls.map((c) => String(c[0])).join("\n")).toContain(`${day}/bad0.json`);
  });

  it("shows each request's time in UTC, and orders the day by instant", async () => {
    year += 1;
    const day = `${year}/05/02`;
    // Times as clients sent them, offsets kept: 04:30, 03:00 and 05:00 UTC on 05-02.
    const sent = {
      west: `${year}-05-01T23:30:00-05:00`,
      east: `${year}-05-02T05:00:00+02:00`,
      utc: `${year}-05-02T05:00:00Z`,
    };
    for (const [id, requested] of Object.entries(sent)) {
      await record(day, id, id, "");
      const key = `${day}/${id}.json`;
      const stored = (await (await env.IMAGES.get(key))?.json()) as Record<string, unknown>;
      await env.IMAGES.put(
        key,
        JSON.stringify({ ...stored, request: { requested_at: requested } }),
      );
    }
    const html = await (await send(`${newBase()}/${day}/`)).text();
    expect(shownIds(html)).toEqual(["utc", "west", "east"]);
    expect(html).toContain(
      `<time datetime="${year}-05-02T04:30:00.000Z">${year}-05-02 04:30 UTC</time>`,
    );
    expect(html).toContain(`${year}-05-02 03:00 UTC`);
  });

  it("shows on / the newest day with a record, while the newest holds images only", async () => {
    year += 1;
    await record(`${year}/06/01`, "persisted", "persisted", `${year}-06-01T23:59:00Z`);
    // Rendered just after midnight: the image is stored, its record not yet.
    await env.IMAGES.put(`${year}/06/02/rendered.png`, "png");
    const res = await send(`${newBase()}/`);
    const html = await res.text();
    expect(html).toContain(`Images of ${year}-06-01`);
    expect(shownIds(html)).toEqual(["persisted"]);
    // The newest day shows nothing yet: no link leads there.
    expect(html).not.toContain(`/${year}/06/02/`);
  });

  // The functions write under the prefix of IMAGEGEN_STORAGE_URL however it is spelled
  // (imagegen/storage/s3.py `_check_prefix`), and the Worker reads it alike.
  it.each(["images", "/images/", "images/"])(
    "shows the images under ORIGIN_PREFIX %o",
    async (spelling) => {
      year += 1;
      const folder = `g${year}`;
      const base = `${folder}/images/${year}/07/01/prefixed`;
      await env.IMAGES.put(`${base}.png`, "png");
      const persisted = { keys: { image: `${year}/07/01/prefixed.png` }, prompt: "under a prefix" };
      await env.IMAGES.put(`${base}.json`, JSON.stringify({ persisted }));
      const prefix = spelling.replace("images", `${folder}/images`);
      for (const path of ["/", `/${year}/07/01/`]) {
        const res = await send(`${newBase()}${path}`, { ORIGIN_PREFIX: prefix });
        expect(res.status, path).toBe(200);
        expect(shownIds(await res.text()), path).toEqual(["prefixed"]);
      }
      const image = await send(`${newBase()}/${year}/07/01/prefixed.png`, {
        ORIGIN_PREFIX: prefix,
      });
      expect(await image.text()).toBe("png");
    },
  );

  // A forgotten ORIGIN_PREFIX shows an empty gallery: the root holds the prefix's folder.
  it("warns, naming ORIGIN_PREFIX, when the root holds folders but no year", async () => {
    year += 1;
    const root = `r${year}`;
    await env.IMAGES.put(`${root}/images/${year}/07/01/x.png`, "png");
    const warnings = vi.spyOn(console, "warn").mockImplementation(() => {});
    const res = await send(`${newBase()}/`, { ORIGIN_PREFIX: `${root}/` });
    expect(res.status).toBe(200);
    expect(shownIds(await res.text())).toEqual([]);
    expect(warnings).toHaveBeenCalledOnce();
    expect(String(warnings.mock.calls[0]?.[0])).toContain("ORIGIN_PREFIX");

    // An empty bucket, or one with its years, is no such shape.
    warnings.mockClear();
    await send(`${newBase()}/`, { ORIGIN_PREFIX: `${root}/images/` });
    await send(`${newBase()}/`, { ORIGIN_PREFIX: `${root}/none/` });
    expect(warnings).not.toHaveBeenCalled();
  });
});
