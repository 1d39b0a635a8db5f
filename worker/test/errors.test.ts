import { env } from "cloudflare:workers";
import { afterEach, describe, expect, it, vi } from "vitest";
import { galleryCsp } from "../src/page";
import { sign } from "../src/signing";
import { countingBucket, mockFetch, newBase, newKey, send } from "./helpers";

// What Chromium and Firefox send when they open a URL, and what they send for an `<img>`.
const CHROMIUM =
  "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,image/apng," +
  "*/*;q=0.8,application/signed-exchange;v=b3;q=0.7";
const FIREFOX = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8";
const IMAGE = "image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8";

const SECRET = "errors-signing-secret";
const SIGNED = { SIGNING_SECRET: SECRET, GALLERY: "signed" };

afterEach(() => {
  vi.restoreAllMocks();
  vi.useRealTimers();
});

function get(url: string, accept: string | null, method = "GET"): Request {
  return new Request(url, { method, headers: accept === null ? {} : { Accept: accept } });
}

/** A gallery message page: its status, policy, no caching, and what it says. */
async function expectPage(res: Response, status: number) {
  expect(res.status).toBe(status);
  expect(res.headers.get("Content-Type")).toBe("text/html; charset=utf-8");
  expect(res.headers.get("Content-Security-Policy")).toBe(await galleryCsp());
  expect(res.headers.get("Cache-Control")).toBe("no-store");
  expect(res.headers.get("Vary")).toBe("Accept");
  expect(res.headers.get("Access-Control-Allow-Origin")).toBe("*");
  const html = await res.text();
  expect(html).toMatch(/^<!doctype html>/);
  return html;
}

async function expectText(res: Response, status: number, text: string) {
  expect(res.status).toBe(status);
  expect(res.headers.get("Content-Type")).toBe("text/plain; charset=utf-8");
  expect(res.headers.get("Content-Security-Policy")).toBe("default-src 'none'; sandbox");
  expect(res.headers.get("Cache-Control")).toBe("no-store");
  expect(await res.text()).toBe(`${text}\n`);
}

describe("errors a browser opens", () => {
  const unserved = [
    "/2026/13/01/",
    "/index.html",
    "//2026/12/01/",
    "/2026/12/01//",
    "/2026/12/01/index.html",
    "/2026/12/01/heb-1.json",
  ];

  it.each(unserved)("%s is a page with a link to the latest images", async (path) => {
    const r2 = countingBucket();
    for (const accept of [CHROMIUM, FIREFOX]) {
      const html = await expectPage(await send(get(`${newBase()}${path}`, accept)), 404);
      expect(html).toContain("<h1>Not Found</h1>");
      expect(html).toContain('<a href="/">Latest images</a>');
    }
    const head = await send(get(`${newBase()}${path}`, CHROMIUM, "HEAD"), { IMAGES: r2.bucket });
    expect(head.status).toBe(404);
    expect(head.headers.get("Content-Type")).toBe("text/html; charset=utf-8");
    expect(r2.calls).toEqual([]);
  });

  it.each(unserved)("%s is plain text to API clients and image loads", async (path) => {
    for (const accept of [null, "*/*", "application/json", IMAGE, "text/html;q=0, */*"]) {
      const res = await send(get(`${newBase()}${path}`, accept));
      await expectText(res, 404, "Not Found");
      expect(res.headers.get("Vary"), String(accept)).toBe("Accept");
    }
  });

  it("a missing image is a page when opened, plain text when loaded", async () => {
    const base = newBase();
    const path = `/${newKey()}`;
    // The second time from the miss the edge remembers.
    for (const time of ["first", "remembered"]) {
      const html = await expectPage(await send(get(`${base}${path}`, CHROMIUM)), 404);
      expect(html, time).toContain("There is no such image.");
      expect(html).toContain('<a href="/">Latest images</a>');
      await expectText(await send(get(`${base}${path}`, IMAGE)), 404, "Not Found");
    }
    const thumbnail = `/${newKey("thumb")}`;
    await expectPage(await send(get(`${base}${thumbnail}`, CHROMIUM)), 404);
  });

  it("a bad width is a page when opened, plain text when loaded", async () => {
    const key = newKey();
    await env.IMAGES.put(key, "png");
    const url = `${newBase()}/${key}?w=abc`;
    const html = await expectPage(await send(get(url, CHROMIUM)), 400);
    expect(html).toContain("<h1>Bad Request</h1>");
    expect(html).toContain("w must be a whole number of pixels, 1 to 8192, on a .png URL.");
    await expectText(
      await send(get(url, IMAGE)),
      400,
      "Bad Request: w must be a whole number of pixels, 1 to 8192, on a .png URL",
    );
    // An image that exists is the image, whatever a browser's Accept names first.
    const image = await send(get(`${newBase()}/${key}`, CHROMIUM));
    expect([image.status, await image.text()]).toEqual([200, "png"]);
  });

  it("an origin that fails is a page when opened", async () => {
    vi.spyOn(console, "error").mockImplementation(() => {});
    mockFetch(() => new Response("down", { status: 500 }));
    const origin = { ORIGIN: "public", PUBLIC_ORIGIN_URL: "https://bucket.example.net" };
    const url = `${newBase()}/${newKey()}`;
    const html = await expectPage(await send(get(url, CHROMIUM), origin), 502);
    expect(html).toContain("<h1>Bad Gateway</h1>");
    await expectText(await send(get(url, IMAGE), origin), 502, "Origin Unavailable");
  });

  it("links nowhere where the gallery is off", async () => {
    for (const path of ["/index.html", "/", "/2026/12/01/", "/2026/12/01"]) {
      const res = await send(get(`${newBase()}${path}`, CHROMIUM), { GALLERY: "off" });
      const html = await expectPage(res, 404);
      expect(html, path).not.toContain("href");
    }
    const text = await send(get(`${newBase()}/`, "*/*"), { GALLERY: "off" });
    await expectText(text, 404, "Not Found");
  });

  it("behind signed links, links nowhere and names no day", async () => {
    const base = newBase();
    const shape = await expectPage(await send(get(`${base}/index.html`, CHROMIUM), SIGNED), 404);
    expect(shape).not.toContain("href");
    const key = newKey();
    await env.IMAGES.put(key, "png");
    const unsigned = await expectPage(await send(get(`${base}/${key}`, CHROMIUM), SIGNED), 403);
    expect(unsigned).toContain("<h1>Forbidden</h1>");
    expect(unsigned).not.toContain("href");
    expect(unsigned).not.toContain(key.slice(0, 10));
    await expectText(await send(get(`${base}/${key}`, IMAGE), SIGNED), 403, "Forbidden");

    // Expired: said as the gallery's own expired page says it.
    vi.useFakeTimers({ toFake: ["Date"] });
    vi.setSystemTime(1_800_000_000_000);
    const expires = 1_799_999_000;
    const url = `${base}/${key}?expires=${expires}&signature=${await sign(key, expires, SECRET)}`;
    const expired = await expectPage(await send(get(url, CHROMIUM), SIGNED), 403);
    expect(expired).toContain("<h1>This link has expired</h1>");
    expect(expired).not.toContain("href");
    // A missing image, through a valid link: no link to `/`, which needs one too.
    const missing = newKey();
    const later = 1_800_000_300;
    const valid = `${base}/${missing}?expires=${later}&signature=${await sign(missing, later, SECRET)}`;
    const html = await expectPage(await send(get(valid, CHROMIUM), SIGNED), 404);
    expect(html).not.toContain("href");
  });

  it("answers OPTIONS in plain text, as ever", async () => {
    const res = await send(
      new Request(`${newBase()}/index.html`, { method: "OPTIONS", headers: { Accept: CHROMIUM } }),
    );
    await expectText(res, 404, "Not Found");
    expect(res.headers.get("Vary")).toBeNull();
  });
});
