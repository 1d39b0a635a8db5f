import { env } from "cloudflare:workers";
import { afterEach, describe, expect, it, vi } from "vitest";
import { escape, galleryCsp, SCRIPT } from "../src/page";
import { sign } from "../src/signing";
import { BASE, send } from "./helpers";

// Gallery tests use their own far-future year so no other test's objects share their days.
let year = 3000;

async function record(day: string, id: string, prompt: string, created: string, widths = [64]) {
  const base = `${day}/${id}`;
  await env.IMAGES.put(`${base}.png`, "png");
  const derivatives: Record<string, string> = { record: `${base}.derivatives.json` };
  for (const w of widths) {
    derivatives[`avif:${w}`] = `${base}.w${w}.avif`;
    derivatives[`webp:${w}`] = `${base}.w${w}.webp`;
  }
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
    const res = await send(`${BASE}/`);
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
    const res = await send(`${BASE}/${day}/`);
    expect(res.status).toBe(200);
    const html = await res.text();
    const shown = [...html.matchAll(/id="(g[0-9]{3})"/g)].map((m) => m[1]);
    const newest = Array.from({ length: 200 }, (_, i) => `g${String(i + 100).padStart(3, "0")}`);
    expect(new Set(shown)).toEqual(new Set(newest));
    expect(shown[0]).toMatch(/^g(28[5-9]|29[0-9])$/); // by the records' own times
  }, 60_000);

  it("shows one day with a link to the later one", async () => {
    const y = await days();
    const html = await (await send(`${BASE}/${y}/01/30/`)).text();
    expect(html).toContain("an old lighthouse");
    expect(html).not.toContain("two moons");
    expect(html).toContain(`<a rel="next" href="/${y}/02/01/">`);
    const empty = await (await send(`${BASE}/${y}/01/31/`)).text();
    expect(empty).toContain("No images on this day.");
  });

  it("allows only its own script and style", async () => {
    await days();
    const res = await send(`${BASE}/`);
    const csp = res.headers.get("Content-Security-Policy") ?? "";
    expect(csp).toBe(await galleryCsp());
    const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(SCRIPT));
    const hash = btoa(String.fromCharCode(...new Uint8Array(digest)));
    expect(csp).toContain(`script-src 'sha256-${hash}'`);
    expect(csp).toContain("default-src 'none'");
    expect(await res.text()).toContain(`<script>${SCRIPT}</script>`);
  });

  it("escapes every HTML metacharacter", () => {
    expect(escape(`<a href="x" onclick='y'>&</a>`)).toBe(
      "&lt;a href=&quot;x&quot; onclick=&#39;y&#39;&gt;&amp;&lt;/a&gt;",
    );
  });

  it("is off when images are private, unless signed links are configured", async () => {
    await days();
    expect((await send(`${BASE}/`, { SIGNING_SECRET: "s" })).status).toBe(404);
    expect((await send(`${BASE}/`, { GALLERY: "off" })).status).toBe(404);
    expect((await send(`${BASE}/`, { SIGNING_SECRET: "s", GALLERY: "signed" })).status).toBe(403);
    vi.spyOn(console, "error").mockImplementation(() => {});
    expect((await send(`${BASE}/`, { SIGNING_SECRET: "s", GALLERY: "on" })).status).toBe(500);
  });

  it("behind a signed link, signs every URL on the page with its expiry", async () => {
    const y = await days();
    const secret = "gallery-secret";
    vi.useFakeTimers({ toFake: ["Date"] });
    vi.setSystemTime(1_800_000_000_000);
    const expires = 1_800_000_300;
    const day = `${y}/02/01/`;
    const url = `${BASE}/${day}?expires=${expires}&signature=${await sign(day, expires, secret)}`;
    const res = await send(url, { SIGNING_SECRET: secret, GALLERY: "signed" });
    expect(res.status).toBe(200);
    expect(res.headers.get("Cache-Control")).toBe("private, max-age=60");
    const html = await res.text();
    const avif = `${y}/02/01/second.w64.avif`;
    expect(html).toContain(
      `/${avif}?expires=${expires}&amp;signature=${await sign(avif, expires, secret)}`,
    );
    const prev = `${y}/01/30/`;
    expect(html).toContain(
      `/${prev}?expires=${expires}&amp;signature=${await sign(prev, expires, secret)}`,
    );
    // The image link on the page works against the Worker.
    const image = await send(
      `${BASE}/${avif}?expires=${expires}&signature=${await sign(avif, expires, secret)}`,
      { SIGNING_SECRET: secret },
    );
    expect(image.status).toBe(404); // only the record was stored, not the derivative bytes
    expect(image.headers.get("Cache-Control")).toBe("no-store");
  });
});
