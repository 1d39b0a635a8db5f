/**
 * The gallery: `GET /` shows the latest day with images, `GET /YYYY/MM/DD/` one day, in pages of
 * MAX_ITEMS images (`?page=2` and on), newest first.
 *
 * Data comes from the bucket itself: day folders from listings with a `/` delimiter (days.ts), a
 * day's images from its metadata records (`YYYY/MM/DD/<id>.json`, read through the edge cache;
 * they never change). What a page shows is kept in the edge cache for PAGE_MAX_AGE seconds, and
 * a day's list of records and the folder listings as long, so a page costs the origin nothing
 * meanwhile, and neither does a page past the last or a day that does not exist. With
 * GALLERY=signed the page needs a signed link, and shows what that link names: a link made for
 * one day signs the links to that day's other pages with the same expiry, and its images
 * IMAGE_GRACE later (they load lazily, while the page is open), but links no other day; a link
 * made for `/` names the whole gallery, and signs the links to other days for it too.
 *
 * A `<picture>` does not fall back to its `<img>` when a `<source>` it picked answers 404, so a
 * derivative is offered only when its object is in the day's listing as well as in its record
 * (a bucket restored without its derivatives keeps the records that list them). The listing is
 * the one the day's records come from: the check costs no request.
 *
 * A page carries a weak ETag of its bytes, and a matching If-None-Match is answered 304.
 */
import { AFTER_EVERY_DAY, dayExists, type Folders, folderLister, walk } from "./days";
import { isNotModified, textResponse } from "./http";
import { derivativeKey, derivativeParts } from "./keys";
import { acceptsHtml, availableDerivatives, readRecord } from "./negotiate";
import { cachedJson, type Serving } from "./objects";
import { type Listing, listKeys, OriginError } from "./origins";
import { type DayLink, galleryCsp, type Item, renderMessage, renderPage } from "./page";
import { checkSignedUrl, type SignatureCheck, sign } from "./signing";

/** Links to this many earlier days under each page; `/` falls back as far for a day with images. */
export const EARLIER_DAYS = 7;
/** At most this many images on a page. */
export const MAX_ITEMS = 200;
/** Pages of 1000 keys listed for a day: some 4,500 images (about 11 keys each). */
export const MAX_DAY_LIST_PAGES = 50;
/** Seconds a page is kept, at the edge and in browsers. */
export const PAGE_MAX_AGE = 60;
/**
 * Seconds a signed page's image URLs outlive its link: images load lazily, as they are scrolled
 * to, so a page served just before its link expires keeps showing them for this long.
 */
export const IMAGE_GRACE = 3600;

const RECORD_KEY = /^[0-9]{4}\/[0-9]{2}\/[0-9]{2}\/([A-Za-z0-9][A-Za-z0-9_-]{0,127})\.json$/;

/**
 * A day's records, newest upload first, whether the listing reached the end of the day, and the
 * derivative objects it holds (their keys less the day folder).
 */
interface DayIndex {
  ids: string[];
  complete: boolean;
  derivatives: string[];
}

/** One image of a page, as stored in the edge cache: everything but its (signed) URLs. */
type Shown = Omit<Item, "href" | "fallback" | "sources"> & { avif: number[]; webp: number[] };

/** What a page shows: the day, its neighbours, one page of its images. */
interface PageData {
  day: string;
  later: string | null;
  earlier: string[];
  items: Shown[];
  page: number;
  pages: number;
  complete: boolean;
}

/** A day's records, each day listed once per request (the edge cache keeps it for the next). */
type DayIndexes = (day: string) => Promise<DayIndex>;

function dayIndexes(serving: Serving): DayIndexes {
  const read = new Map<string, Promise<DayIndex>>();
  return (day) => {
    let index = read.get(day);
    if (index === undefined) {
      index = dayIndex(serving, day);
      read.set(day, index);
    }
    return index;
  };
}

function dayIndex(serving: Serving, day: string): Promise<DayIndex> {
  return cachedJson(serving, `_gallery/day/${day}`, PAGE_MAX_AGE, async () => {
    const listing = await listKeys(serving.config, day, { maxPages: MAX_DAY_LIST_PAGES });
    if (!listing.complete) {
      console.warn(`gallery: ${day} holds more than ${MAX_DAY_LIST_PAGES} pages of keys`);
    }
    // Listing order is the ids' (random): the newest uploads come from the whole listing.
    // Upload times are whole seconds (S3's LastModified): within one, id order is arbitrary,
    // but the same for every page.
    const uploaded = (key: string) => listing.modified.get(key) ?? 0;
    const ids = listing.keys
      .filter((key) => RECORD_KEY.test(key))
      .sort((a, b) => uploaded(b) - uploaded(a) || (a < b ? -1 : 1))
      .map((key) => RECORD_KEY.exec(key)?.[1] ?? "");
    // Past an incomplete listing a derivative is not known to exist, and is not offered: the
    // PNG shows instead (the listing is in key order, so only the last image listed can lose
    // some of its derivatives that way).
    const derivatives = listing.keys
      .filter((key) => derivativeParts(key) !== null)
      .map((key) => key.slice(day.length));
    return { ids, complete: listing.complete, derivatives };
  });
}

function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

function field(value: unknown): string {
  return typeof value === "string" || typeof value === "number" ? String(value) : "";
}

/**
 * An RFC 3339 time in UTC (`2026-11-24T16:30:00.000Z`), or `value` as it came when it is none.
 * A request's time keeps the offset its client sent: the page shows UTC, and sorts by instant.
 */
function utc(value: string): string {
  const instant = Date.parse(value);
  return Number.isNaN(instant) ? value : new Date(instant).toISOString();
}

function dimension(value: unknown): number {
  const n = Number(value);
  return Number.isInteger(n) && n > 0 ? n : 1;
}

/**
 * The image `id` of the day folder `folder` as its records describe it, or null. `stored`: the
 * derivative objects the day's listing holds (keys less the day folder).
 */
async function shown(
  serving: Serving,
  folder: string,
  id: string,
  stored: ReadonlySet<string>,
): Promise<Shown | null> {
  const day = folder.slice(0, -1);
  const record = await readRecord(serving, day, id);
  const persisted = isObject(record) ? record.persisted : undefined;
  if (!isObject(record) || !isObject(persisted)) {
    // Gone since the listing, or no metadata record: the rest of the day is still shown.
    if (record !== null) console.warn(`gallery: ${day}/${id}.json is no metadata record, skipped`);
    return null;
  }
  const listed = await availableDerivatives(serving, day, id, record);
  const held = (format: "avif" | "webp") =>
    listed[format].filter((w) =>
      stored.has(derivativeKey(day, id, format, w).slice(folder.length)),
    );
  const request = isObject(record.request) ? record.request : {};
  return {
    id,
    width: dimension(persisted.width),
    height: dimension(persisted.height),
    prompt: field(persisted.prompt),
    seed: field(persisted.seed),
    model: field(persisted.model),
    // The day of a generation is its request's; show that time, as the page's day says.
    created: utc(field(request.requested_at) || field(persisted.created_at)),
    avif: held("avif"),
    webp: held("webp"),
  };
}

/**
 * Whether the day folder `day` holds a metadata record, from one page of its listing (kept at the
 * edge like the day's records). A day of more than a page of keys counts as holding one: a folder
 * without records holds the few images rendered before their records were written.
 */
function holdsRecords(serving: Serving, day: string): Promise<boolean> {
  return cachedJson(serving, `_gallery/held/${day}`, PAGE_MAX_AGE, async () => {
    const listing = await listKeys(serving.config, day, { maxPages: 1 });
    return !listing.complete || listing.keys.some((key) => RECORD_KEY.test(key));
  });
}

/**
 * Up to `count` days of `days` that hold a record, looking at `limit` days at most (checked in
 * parallel, `count` at a time, so only the folders this needs are listed).
 */
async function daysWithRecords(
  serving: Serving,
  days: AsyncIterator<string>,
  count: number,
  limit: number,
): Promise<string[]> {
  const found: string[] = [];
  let tried = 0;
  while (found.length < count && tried < limit) {
    const batch: string[] = [];
    while (batch.length < Math.min(count - found.length, limit - tried)) {
      const next = await days.next();
      if (next.done) break;
      batch.push(next.value);
    }
    if (batch.length === 0) break;
    tried += batch.length;
    const held = await Promise.all(batch.map((day) => holdsRecords(serving, day)));
    found.push(...batch.filter((_, i) => held[i]));
  }
  await days.return?.();
  return found;
}

/** Whether the day folder `YYYY/MM/DD/` names a calendar date (not 02/31). */
export function isCalendarDay(folder: string): boolean {
  const [year, month, day] = folder.split("/").map(Number);
  if (year === undefined || month === undefined || day === undefined) return false;
  const date = new Date(0);
  // setUTCFullYear, not Date.UTC: that one reads years 0 to 99 as 1900 to 1999.
  date.setUTCFullYear(year, month - 1, day);
  return date.getUTCMonth() === month - 1 && date.getUTCDate() === day;
}

/** Today's day folder, in UTC as the keys are: it may hold no images yet. */
function today(): string {
  return `${new Date().toISOString().slice(0, 10).replaceAll("-", "/")}/`;
}

/**
 * The day `/` shows: the newest with a record among the newest EARLIER_DAYS + 1, else the newest.
 * Render writes an image before persist writes its record, so a new day may hold images only.
 */
async function latestDay(folders: Folders, indexes: DayIndexes): Promise<string> {
  let newest = "";
  let tried = 0;
  for await (const day of walk(folders, AFTER_EVERY_DAY, "older")) {
    newest ||= day;
    if ((await indexes(day)).ids.length > 0) return day;
    if (++tried > EARLIER_DAYS) break;
  }
  return newest;
}

/**
 * Logs a warning when the root of the gallery holds folders but no year folder: the shape of a
 * bucket the functions write under a prefix (`s3://bucket/images`) that ORIGIN_PREFIX does not
 * name, whose gallery would show nothing. One listing, made only for a gallery with no year
 * (and so at most once a minute, as the page is kept).
 */
async function warnIfPrefixed(serving: Serving): Promise<void> {
  let listing: Listing;
  try {
    listing = await listKeys(serving.config, "", { delimiter: "/", maxPages: 1 });
  } catch (err) {
    // Only a hint: the empty page it would explain is served all the same.
    if (err instanceof OriginError) return;
    throw err;
  }
  if (listing.folders.some((folder) => folder !== "")) {
    console.warn(
      "gallery: the origin holds folders but no YYYY/ folder under ORIGIN_PREFIX; set " +
        "ORIGIN_PREFIX to the prefix of IMAGEGEN_STORAGE_URL",
    );
  }
}

/**
 * What the page `page` of `path` shows, or null when there is no such page (404). Whether there
 * is comes from the folder listings and the day's records alone, all kept at the edge, before
 * any neighbouring day is looked at: a page past the last or a day that does not exist costs
 * no listing while they are kept.
 */
async function pageData(serving: Serving, path: string, page: number): Promise<PageData | null> {
  const folders = folderLister(serving, PAGE_MAX_AGE);
  const indexes = dayIndexes(serving);
  // 1. The day (one that does not exist is a 404, but for today's), and its page of records,
  // newest upload first
  if (path !== "" && path !== today() && !(await dayExists(folders, path))) return null;
  const day = path === "" ? await latestDay(folders, indexes) : path;
  const index = day ? await indexes(day) : { ids: [], complete: true, derivatives: [] };
  const pages = Math.max(1, Math.ceil(index.ids.length / MAX_ITEMS));
  if (page > pages) return null;
  if (day === "" && (await folders("")).length === 0) await warnIfPrefixed(serving);

  // 2. The days around it that hold records (a folder of images only shows nothing), and the
  // page's images, each page's by its records' own time
  const around = (direction: "older" | "newer", count: number, limit: number) =>
    day ? daysWithRecords(serving, walk(folders, day, direction), count, limit) : [];
  const ids = index.ids.slice((page - 1) * MAX_ITEMS, page * MAX_ITEMS);
  // An index cached before it kept derivatives (for PAGE_MAX_AGE after a deploy) offers none.
  const stored = new Set(index.derivatives ?? []);
  const [earlier, [later = null], shownItems] = await Promise.all([
    around("older", EARLIER_DAYS, 2 * EARLIER_DAYS),
    around("newer", 1, EARLIER_DAYS + 1),
    Promise.all(ids.map((id) => shown(serving, day, id, stored))),
  ]);
  const items = shownItems
    .filter((i): i is Shown => i !== null)
    .sort((a, b) => (a.created < b.created ? 1 : a.created > b.created ? -1 : 0));
  return { day, later, earlier, items, page, pages, complete: index.complete };
}

type Link = (key: string, params?: Record<string, string>) => Promise<string>;

/**
 * Links signed until `expires` (none when null): each for its own key, or for `scope` where
 * given (the gallery path a signed gallery link was made for, which its links carry on).
 */
function linker(expires: number | null, secret: string | null, scope?: string): Link {
  return async (key, params = {}) => {
    const query = new URLSearchParams(params);
    if (expires !== null && secret !== null) {
      query.set("expires", String(expires));
      query.set("signature", await sign(scope ?? key, expires, secret, params));
    }
    const text = query.toString();
    return text ? `/${key}?${text}` : `/${key}`;
  };
}

async function item(data: Shown, day: string, link: Link): Promise<Item> {
  const image = `${day}${data.id}.png`;
  const sources: Item["sources"] = [];
  for (const format of ["avif", "webp"] as const) {
    const candidates = await Promise.all(
      data[format].map(async (width) => ({
        url: await link(`${day}${data.id}.w${width}.${format}`),
        width,
      })),
    );
    sources.push({ type: `image/${format}`, candidates });
  }
  const { id, width, height, prompt, seed, model, created } = data;
  const href = await link(image);
  return { id, href, fallback: href, sources, width, height, prompt, seed, model, created };
}

/**
 * The `page` parameter: 1 when absent, a page number (any digits without a leading zero), or
 * null when it is none. A number of more than 15 digits, past any day's last page (a day lists
 * at most MAX_DAY_LIST_PAGES * 1000 keys) and past the integers a number holds exactly, is read
 * as Number.MAX_SAFE_INTEGER: past the last page too, and one edge cache entry for them all.
 */
export function pageParam(params: URLSearchParams): number | null {
  const values = params.getAll("page");
  if (values.length === 0) return 1;
  const value = values[0] ?? "";
  if (values.length !== 1 || !/^[1-9][0-9]*$/.test(value)) return null;
  return value.length <= 15 ? Number(value) : Number.MAX_SAFE_INTEGER;
}

/**
 * The signed link of the gallery path `path`, and its scope: a link made for the path opens it
 * (a day: its pages and their images), one made for `""` (`/`) the whole gallery, every day.
 */
async function checkGalleryLink(
  params: URLSearchParams,
  path: string,
  secrets: readonly string[],
  now: number,
): Promise<{ ok: true; expires: number; scope: string } | Exclude<SignatureCheck, { ok: true }>> {
  let scope = path;
  let check = await checkSignedUrl(params, scope, secrets, now);
  if (!check.ok && check.reason === "mismatch" && path !== "") {
    scope = "";
    check = await checkSignedUrl(params, scope, secrets, now);
  }
  return check.ok ? { ...check, scope } : check;
}

/** A gallery error as a small HTML page under the gallery's policy, never cached. */
export async function messageResponse(
  request: Request,
  status: number,
  title: string,
  text: string,
  home: boolean,
): Promise<Response> {
  const html = renderMessage(title, text, home);
  return new Response(request.method === "HEAD" ? null : html, {
    status,
    headers: {
      "Content-Type": "text/html; charset=utf-8",
      "Content-Security-Policy": await galleryCsp(),
      "X-Content-Type-Options": "nosniff",
      "Referrer-Policy": "no-referrer",
      "Cache-Control": "no-store",
    },
  });
}

/** The CORS headers of every answer, which an error page keeps. */
const CORS_HEADERS = [
  "Access-Control-Allow-Origin",
  "Access-Control-Expose-Headers",
  "Cross-Origin-Resource-Policy",
];

/**
 * An error of a served path that is no gallery page's own error (those are always pages): for a
 * GET or HEAD that accepts `text/html` (a browser opening the URL), the gallery's message page,
 * `title` and `text`, linking to `/` only where `home` (the gallery is public); else `plain` as
 * plain text, as API clients and image loads get it. Either varies on Accept, and keeps CORS.
 */
export async function errorResponse(
  request: Request,
  status: number,
  message: { title: string; text: string; plain?: string },
  home: boolean,
  headers: HeadersInit = {},
): Promise<Response> {
  const plain = textResponse(status, message.plain ?? message.title, headers);
  if (!["GET", "HEAD"].includes(request.method)) return plain;
  plain.headers.append("Vary", "Accept");
  if (!acceptsHtml(request.headers.get("Accept"))) return plain;
  const page = await messageResponse(request, status, message.title, message.text, home);
  for (const name of CORS_HEADERS) {
    const value = plain.headers.get(name);
    if (value !== null) page.headers.set(name, value);
  }
  new Headers(headers).forEach((value, name) => page.headers.set(name, value));
  page.headers.set("Vary", "Accept");
  return page;
}

/** A 404 for a path that names nothing served (see errorResponse). */
export function notFoundResponse(request: Request, home: boolean): Promise<Response> {
  const message = { title: "Not Found", text: "There is nothing at this address." };
  return errorResponse(request, 404, message, home);
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
  if (config.gallery === "off") return notFoundResponse(request, false);

  // 1. A signed link when the images are private, and what it opens: the gallery path it was
  // made for, the whole gallery for `/`
  let expires: number | null = null;
  let scope: string | null = null;
  let cacheControl = `public, max-age=${PAGE_MAX_AGE}`;
  const signed = config.gallery === "signed" && config.signingSecret !== null;
  // Behind signed links `/` needs one too: error pages link to it only when it is public.
  const fail = (status: number, title: string, text: string) =>
    messageResponse(request, status, title, text, !signed);
  if (signed) {
    const now = Math.floor(Date.now() / 1000);
    const check = await checkGalleryLink(params, path, config.verifyingSecrets, now);
    if (!check.ok && check.reason === "expired") {
      return fail(403, "This link has expired", "Ask whoever shared it for a new link.");
    }
    if (!check.ok) return fail(403, "Forbidden", "This page needs a valid signed link.");
    expires = check.expires;
    scope = check.scope;
    cacheControl = `private, max-age=${Math.min(PAGE_MAX_AGE, expires - now)}`;
  }
  const page = pageParam(params);
  if (page === null) return fail(400, "Bad Request", "The page must be a page number.");
  if (path !== "" && !isCalendarDay(path)) {
    return fail(404, "Not Found", "There is no such day.");
  }
  // Pages of the gallery, signed for the link's scope; its images each for their own key, and
  // IMAGE_GRACE longer, so those scrolled to after the link expired still load while the page
  // is open. Other days are linked only where the link opens them.
  const link = linker(expires, config.signingSecret, scope ?? undefined);
  const imageLink = linker(expires === null ? null : expires + IMAGE_GRACE, config.signingSecret);
  const everyDay = scope === null || scope === "";
  const dayLink = async (folder: string, n = 1): Promise<DayLink> => ({
    day: folder.slice(0, -1).replaceAll("/", "-"),
    href: await (n === 1 ? link(folder) : link(folder, { page: String(n) })),
  });
  // One URL a page: the first page is the path's own (as a day is its path with the slash).
  if (page === 1 && params.has("page")) {
    return textResponse(301, "Moved Permanently", { Location: await link(path) });
  }

  // 2. What the page shows, from the edge cache or the origin
  const data = await cachedJson(serving, `_gallery/page/${path}?page=${page}`, PAGE_MAX_AGE, () =>
    pageData(serving, path, page),
  );
  if (data === null) return fail(404, "Not Found", "There are no images here.");

  // 3. Its links
  const html = renderPage({
    day: data.day ? data.day.slice(0, -1).replaceAll("/", "-") : "",
    items: await Promise.all(data.items.map((i) => item(i, data.day, imageLink))),
    earlier: everyDay ? await Promise.all(data.earlier.map((d) => dayLink(d))) : [],
    later: everyDay && data.later !== null ? await dayLink(data.later) : null,
    pages: {
      current: data.page,
      count: data.pages,
      newer: data.page > 1 ? (await dayLink(data.day, data.page - 1)).href : null,
      older: data.page < data.pages ? (await dayLink(data.day, data.page + 1)).href : null,
    },
    complete: data.complete,
  });
  const headers = new Headers({
    "Content-Type": "text/html; charset=utf-8",
    "Content-Security-Policy": await galleryCsp(),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": cacheControl,
    ETag: await pageTag(html),
  });
  // 4. Revalidation (RFC 9110 §13.1.2, weak comparison): the same bytes, a 304 with the
  // headers of the 200 but its body's (RFC 9110 §15.4.5). Behind signed links the bytes are
  // those of the link (its expiry is in every URL of the page), and an expired link never
  // gets this far, so a 304 never keeps a page whose links outlive the link's own.
  if (isNotModified(request, headers)) {
    headers.delete("Content-Type");
    return new Response(null, { status: 304, headers });
  }
  return new Response(request.method === "HEAD" ? null : html, { status: 200, headers });
}

/**
 * The entity tag of a page: the SHA-256 of its bytes. Weak (`W/`), as a page's tag only
 * revalidates (no page is served in ranges), and Cloudflare compresses HTML on its way out,
 * which a strong tag, naming one byte sequence, would not survive.
 */
export async function pageTag(html: string): Promise<string> {
  const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(html));
  const text = btoa(String.fromCharCode(...new Uint8Array(digest)));
  return `W/"${text.replaceAll("+", "-").replaceAll("/", "_").replace(/=+$/, "")}"`;
}
