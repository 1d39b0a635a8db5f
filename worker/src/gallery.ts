/**
 * The gallery: `GET /` shows the latest day with images, `GET /YYYY/MM/DD/` one day.
 *
 * Data comes from the bucket itself: day folders are found by listing with a `/` delimiter
 * (years, then months, then days, newest first and only as far as needed), and a day's images
 * from its metadata records (`YYYY/MM/DD/<id>.json`, read through the edge cache; they never
 * change). With GALLERY=signed the page needs a signed link and signs every URL on it with the
 * same expiry.
 */
import { keyFromPath } from "./keys";
import { availableDerivatives, readRecord } from "./negotiate";
import type { Serving } from "./objects";
import { listKeys } from "./origins";
import { type DayLink, galleryCsp, type Item, renderPage } from "./page";
import { checkSignedUrl, sign } from "./signing";
import { textResponse } from "./http";

/** Links to this many earlier days under each page. */
export const EARLIER_DAYS = 7;
/** At most this many images on a page (a day's newest). */
export const MAX_ITEMS = 200;
const PAGE_MAX_AGE = 60;

const RECORD_KEY = /^([0-9]{4}\/[0-9]{2}\/[0-9]{2})\/([A-Za-z0-9][A-Za-z0-9_-]{0,127})\.json$/;

/** Day folders (`YYYY/MM/DD/`), newest first, listed lazily. */
async function* daysNewestFirst(serving: Serving): AsyncGenerator<string> {
  const folders = async (prefix: string, shape: RegExp) =>
    (await listKeys(serving.config, prefix, "/")).folders
      .filter((f) => shape.test(f))
      .sort()
      .reverse();
  for (const year of await folders("", /^[0-9]{4}\/$/)) {
    for (const month of await folders(year, /^[0-9]{4}\/[0-9]{2}\/$/)) {
      yield* await folders(month, /^[0-9]{4}\/[0-9]{2}\/[0-9]{2}\/$/);
    }
  }
}

/** The day to show, the next later day and up to EARLIER_DAYS earlier ones. */
async function neighbours(serving: Serving, wanted: string) {
  let day = wanted;
  let later: string | null = null;
  const earlier: string[] = [];
  for await (const folder of daysNewestFirst(serving)) {
    if (day === "") day = folder;
    if (folder > day) later = folder;
    else if (folder < day) earlier.push(folder);
    if (earlier.length >= EARLIER_DAYS) break;
  }
  return { day, later, earlier };
}

type Link = (key: string, params?: Record<string, string>) => Promise<string>;

function linker(expires: number | null, secret: string | null): Link {
  return async (key, params = {}) => {
    const query = new URLSearchParams(params);
    if (expires !== null && secret !== null) {
      query.set("expires", String(expires));
      query.set("signature", await sign(key, expires, secret, params));
    }
    const text = query.toString();
    return text ? `/${key}?${text}` : `/${key}`;
  };
}

function field(value: unknown): string {
  return typeof value === "string" || typeof value === "number" ? String(value) : "";
}

async function item(serving: Serving, key: string, link: Link): Promise<Item | null> {
  const match = RECORD_KEY.exec(key);
  if (match === null) return null;
  const [, day = "", id = ""] = match;
  const image = `${day}/${id}.png`;
  if (keyFromPath(`/${image}`) === null) return null;
  const record = await readRecord(serving, day, id);
  const persisted = (record as { persisted?: Record<string, unknown> } | null)?.persisted;
  if (persisted === undefined) return null;
  const available = await availableDerivatives(serving, day, id, record);
  const sources: Item["sources"] = [];
  for (const format of ["avif", "webp"] as const) {
    const candidates = await Promise.all(
      available[format].map(async (width) => ({
        url: await link(`${day}/${id}.w${width}.${format}`),
        width,
      })),
    );
    sources.push({ type: `image/${format}`, candidates });
  }
  const width = Number(persisted.width);
  const height = Number(persisted.height);
  return {
    id,
    href: await link(image),
    fallback: await link(image),
    sources,
    width: Number.isInteger(width) && width > 0 ? width : 1,
    height: Number.isInteger(height) && height > 0 ? height : 1,
    prompt: field(persisted.prompt),
    seed: field(persisted.seed),
    model: field(persisted.model),
    // The day of a generation is its request's; show that time, as the page's day says.
    created:
      field((record as { request?: { requested_at?: unknown } }).request?.requested_at) ||
      field(persisted.created_at),
  };
}

/**
 * The gallery page for `path` (`""` for the latest day, or `YYYY/MM/DD/`).
 *
 * @throws OriginError when the origin fails.
 */
export async function serveGallery(
  request: Request,
  serving: Serving,
  path: string,
  params: URLSearchParams,
): Promise<Response> {
  const { config } = serving;
  if (config.gallery === "off") return textResponse(404, "Not Found");

  // 1. A signed link when the images are private
  let expires: number | null = null;
  let cacheControl = `public, max-age=${PAGE_MAX_AGE}`;
  if (config.gallery === "signed" && config.signingSecret !== null) {
    const now = Math.floor(Date.now() / 1000);
    const check = await checkSignedUrl(params, path, config.signingSecret, now);
    if (!check.ok) return textResponse(403, "Forbidden");
    expires = check.expires;
    cacheControl = `private, max-age=${Math.min(PAGE_MAX_AGE, expires - now)}`;
  }
  const link = linker(expires, config.signingSecret);

  // 2. Days: this one, its neighbours
  const { day, later, earlier } = await neighbours(serving, path);
  const dayLink = async (folder: string): Promise<DayLink> => ({
    day: folder.slice(0, -1).replaceAll("/", "-"),
    href: await link(folder),
  });

  // 3. The day's records, newest first: the newest uploads only are read (listing order is
  // the ids', random), then ordered by the time each record gives.
  const listing = day ? await listKeys(config, day) : null;
  const records = (listing?.keys ?? [])
    .filter((key) => RECORD_KEY.test(key))
    .sort((a, b) => (listing?.modified.get(b) ?? 0) - (listing?.modified.get(a) ?? 0))
    .slice(0, MAX_ITEMS);
  const items = (await Promise.all(records.map((key) => item(serving, key, link))))
    .filter((i): i is Item => i !== null)
    .sort((a, b) => (a.created < b.created ? 1 : a.created > b.created ? -1 : 0))
    .slice(0, MAX_ITEMS);

  const html = renderPage({
    day: day ? day.slice(0, -1).replaceAll("/", "-") : "",
    items,
    earlier: await Promise.all(earlier.map(dayLink)),
    later: later === null ? null : await dayLink(later),
  });
  const headers = {
    "Content-Type": "text/html; charset=utf-8",
    "Content-Security-Policy": await galleryCsp(),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": cacheControl,
  };
  return new Response(request.method === "HEAD" ? null : html, { status: 200, headers });
}
