/**
 * HTTP semantics of an image response: caching headers, CORS, conditional requests (412, 304) and
 * single byte ranges (206/416), all derived from one stored full 200 response.
 *
 * A HEAD answers as a GET would without its body, except that it ignores `Range` (RFC 9110
 * §14.2: a server MUST ignore Range for methods other than GET): 200 with the whole object's
 * Content-Length, from the edge cache and from the origin alike.
 */
import { contentTypeForKey } from "./keys";
import type { OriginObject } from "./origins";

export const IMMUTABLE = "public, max-age=31536000, immutable";
/** The methods every served path answers (the `Allow` of a 405 and of a preflight's 204). */
export const ALLOWED_METHODS = "GET, HEAD, OPTIONS";

/** How long a missing key is remembered at the edge before the origin is asked again. */
export const NOT_FOUND_TTL = 60;

// Every answer of the image origin: no script, plugin, style or frame may run in it, even if a
// bucket object were a document (the type comes from the key, and nosniff holds browsers to it).
export const IMAGE_CSP = "default-src 'none'; sandbox";

const CORS: Record<string, string> = {
  "Access-Control-Allow-Origin": "*",
  "Access-Control-Expose-Headers":
    "Accept-Ranges, Content-Length, Content-Range, ETag, Last-Modified",
  "Cross-Origin-Resource-Policy": "cross-origin",
  "Content-Security-Policy": IMAGE_CSP,
  "X-Content-Type-Options": "nosniff",
};

/** A short plain-text answer (errors, 405, 416), never cached by browsers. */
export function textResponse(status: number, text: string, headers: HeadersInit = {}): Response {
  const response = new Response(`${text}\n`, {
    status,
    headers: { "Content-Type": "text/plain; charset=utf-8", "Cache-Control": "no-store", ...CORS },
  });
  new Headers(headers).forEach((value, name) => response.headers.set(name, value));
  return response;
}

/** The answer to a CORS preflight (or any OPTIONS) on a served path. */
export function preflightResponse(): Response {
  return new Response(null, {
    status: 204,
    headers: {
      ...CORS,
      Allow: ALLOWED_METHODS,
      "Access-Control-Allow-Methods": ALLOWED_METHODS,
      "Access-Control-Allow-Headers":
        "Range, If-Match, If-None-Match, If-Modified-Since, If-Unmodified-Since, If-Range",
      "Access-Control-Max-Age": "86400",
    },
  });
}

/** The headers of an object at `key`; the media type is the key's, never the origin's. */
export function objectHeaders(object: OriginObject, key: string): Headers {
  const headers = new Headers(CORS);
  headers.set("Content-Type", contentTypeForKey(key));
  if (object.size !== null) headers.set("Content-Length", String(object.size));
  if (object.etag !== null) headers.set("ETag", object.etag);
  if (object.lastModified !== null) headers.set("Last-Modified", object.lastModified.toUTCString());
  headers.set("Accept-Ranges", "bytes");
  headers.set("Cache-Control", IMMUTABLE);
  return headers;
}

/**
 * `cacheControl` (IMMUTABLE, or private with a max-age) kept at most `seconds`: for an answer
 * that is right now but will be replaced soon.
 */
export function heldTo(cacheControl: string, seconds: number): string {
  const scope = cacheControl.startsWith("private") ? "private" : "public";
  const maxAge = /max-age=(\d+)/.exec(cacheControl);
  return `${scope}, max-age=${Math.min(seconds, maxAge ? Number(maxAge[1]) : seconds)}`;
}

/** A remembered miss, stored in the edge cache for NOT_FOUND_TTL seconds. */
export function notFoundMarker(): Response {
  return textResponse(404, "Not Found", { "Cache-Control": `public, max-age=${NOT_FOUND_TTL}` });
}

/**
 * The answer built straight from an origin read that carried the client's range, validators or
 * method (a cache miss): 200 without body for HEAD, 206, 304, 412 or 416. Null when the origin
 * answered 304 to a condition that does not hold for the metadata it sent: the caller reads the
 * object as for a plain GET.
 *
 * The preconditions are checked here, in RFC 9110 §13.2.2's order, against the origin's metadata,
 * as for a cache hit: R2's `head` takes none, If-Match and If-Unmodified-Since never go to the
 * origin, and §13.1 applies to HEAD as to GET. An origin's 304 is only passed on when the
 * Worker finds the same: workerd's R2 binding keeps If-Modified-Since as an unsigned count of
 * ms (src/workerd/api/r2-bucket.c++, initOnlyIf), so a date before 1970 wraps around and would
 * make a 304 of any object.
 */
export function passedThrough(
  request: Request,
  object: OriginObject,
  key: string,
  cacheControl: string,
): Response | null {
  const headers = objectHeaders(object, key);
  headers.set("Cache-Control", cacheControl);
  const condition = evaluatePreconditions(request, headers);
  if (condition !== null) {
    void object.body?.cancel();
    return conditionalResponse(condition, headers);
  }
  switch (object.status) {
    case 304:
      return null;
    case 416:
      return textResponse(416, "Range Not Satisfiable", {
        "Content-Range": `bytes */${object.size ?? "*"}`,
        "Accept-Ranges": "bytes",
      });
    case 206: {
      const range = object.range ?? { start: 0, end: 0 };
      headers.set("Content-Range", `bytes ${range.start}-${range.end}/${object.size ?? "*"}`);
      headers.set("Content-Length", String(range.end - range.start + 1));
      return new Response(request.method === "HEAD" ? null : object.body, { status: 206, headers });
    }
    default: {
      // A HEAD asked the origin for headers only, and ignores any Range (RFC 9110 §14.2).
      return new Response(request.method === "HEAD" ? null : object.body, { status: 200, headers });
    }
  }
}

function opaqueTag(tag: string): string {
  return tag.trim().replace(/^W\//, "");
}

/**
 * RFC 9110 §13.1.1, §13.1.4: whether If-Match (strong comparison; `*` holds for any object
 * there is) or, only without it, If-Unmodified-Since fails against the representation's
 * `headers`. An If-Unmodified-Since that is no HTTP-date, or an object of no known
 * modification time, is ignored (§13.1.4).
 */
export function isPreconditionFailed(request: Request, headers: Headers): boolean {
  const ifMatch = request.headers.get("If-Match");
  if (ifMatch !== null) {
    if (ifMatch.trim() === "*") return false;
    // §8.8.3.2: strong comparison, so neither tag may be weak; a value that lists no
    // entity-tag matches none.
    const etag = headers.get("ETag");
    if (etag === null || etag.startsWith("W/")) return true;
    return !ifMatch.split(",").some((tag) => tag.trim() === etag);
  }
  const since = parseHttpDate(request.headers.get("If-Unmodified-Since"));
  const modified = parseHttpDate(headers.get("Last-Modified"));
  return since !== null && modified !== null && modified > since;
}

/** RFC 9110 §13.1.1-2: If-None-Match (weak comparison) wins over If-Modified-Since. */
export function isNotModified(request: Request, headers: Headers): boolean {
  const etag = headers.get("ETag");
  const ifNoneMatch = request.headers.get("If-None-Match");
  if (ifNoneMatch !== null) {
    if (ifNoneMatch.trim() === "*") return true;
    return (
      etag !== null && ifNoneMatch.split(",").some((tag) => opaqueTag(tag) === opaqueTag(etag))
    );
  }
  const since = parseHttpDate(request.headers.get("If-Modified-Since"));
  const modified = parseHttpDate(headers.get("Last-Modified"));
  return since !== null && modified !== null && modified <= since;
}

// RFC 9110 §5.6.7: IMF-fixdate, and the obsolete RFC 850 and asctime forms a recipient must
// still accept. Anything else is no HTTP-date, and a condition on it is ignored (§13.1.3);
// Date.parse would take "3000" or "Foo 2099" for dates.
const IMF_FIXDATE =
  /^(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d{2} (?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) \d{4} \d{2}:\d{2}:\d{2} GMT$/;
const RFC_850 =
  /^(?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday), \d{2}-(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)-\d{2} \d{2}:\d{2}:\d{2} GMT$/;
const ASCTIME =
  /^(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun) (?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) [ \d]\d \d{2}:\d{2}:\d{2} \d{4}$/;

/**
 * The time an HTTP-date names, in ms; null when `value` is none.
 *
 * @param now The current time in ms, which an RFC 850 date's two-digit year is read against.
 */
export function parseHttpDate(value: string | null, now: number = Date.now()): number | null {
  const text = value?.trim() ?? "";
  if (RFC_850.test(text)) return rfc850Time(text, now);
  if (!IMF_FIXDATE.test(text) && !ASCTIME.test(text)) return null;
  const time = Date.parse(ASCTIME.test(text) ? `${text} GMT` : text);
  return Number.isNaN(time) ? null : time;
}

/**
 * The time of an RFC 850 date. RFC 9110 §5.6.7: "Recipients of a timestamp value in
 * rfc850-date format, which uses a two-digit year, MUST interpret a timestamp that appears to
 * be more than 50 years in the future as representing the most recent year in the past that
 * had the same last two digits." Date.parse reads 00-49 as 20xx and 50-99 as 19xx whatever the
 * date: "01-Jan-60" was 1960, which made a condition on it fail (412) as one in the past.
 */
function rfc850Time(text: string, now: number): number | null {
  const latest = new Date(now);
  latest.setUTCFullYear(latest.getUTCFullYear() + 50);
  const century = latest.getUTCFullYear() - (latest.getUTCFullYear() % 100);
  // RFC_850 ends "-YY HH:MM:SS GMT": the two digits stand 15 to 13 characters from the end.
  const [date, twoDigits, time] = [text.slice(0, -15), text.slice(-15, -13), text.slice(-13)];
  // The latest year with these digits that is not more than 50 years ahead: the one in the
  // century of the date 50 years on, else the one a century before.
  for (const start of [century, century - 100]) {
    const parsed = Date.parse(`${date}${start + Number(twoDigits)}${time}`);
    if (Number.isNaN(parsed)) return null;
    if (parsed <= latest.getTime()) return parsed;
  }
  return null;
}

/**
 * RFC 9110 §13.2.2's order for a GET or HEAD: If-Match, else If-Unmodified-Since (412), then
 * If-None-Match, else If-Modified-Since (304); null when the request goes on (to If-Range).
 */
export function evaluatePreconditions(request: Request, headers: Headers): 304 | 412 | null {
  if (isPreconditionFailed(request, headers)) return 412;
  if (isNotModified(request, headers)) return 304;
  return null;
}

/** The answer to a failed precondition, with the representation's `headers`. */
function conditionalResponse(status: 304 | 412, headers: Headers): Response {
  if (status === 412) return textResponse(412, "Precondition Failed");
  headers.delete("Content-Length");
  headers.delete("Content-Type");
  return new Response(null, { status: 304, headers });
}

/** RFC 9110 §13.1.5: a Range only applies while If-Range still names this representation. */
function ifRangeHolds(request: Request, headers: Headers): boolean {
  const ifRange = request.headers.get("If-Range");
  if (ifRange === null) return true;
  const value = ifRange.trim();
  if (value.startsWith('"') || value.startsWith("W/")) {
    // Strong comparison: a weak validator never matches.
    return !value.startsWith("W/") && value === headers.get("ETag");
  }
  const date = parseHttpDate(value);
  const modified = parseHttpDate(headers.get("Last-Modified"));
  return date !== null && date === modified;
}

/**
 * `request` without the validators that are dates, for an answer that a date cannot identify:
 * one whose URL answers, or once answered, another object (a stand-in, a derivative chosen for a
 * `.png` URL, any answer of a thumbnail URL), which may bear a time of the same second (HTTP
 * dates are whole seconds, and derive often writes within the second the PNG was written).
 * Such an answer carries no `Last-Modified`, so only its strong ETag validates: without a
 * modification date, If-Modified-Since and If-Unmodified-Since are ignored (RFC 9110 §13.1.3,
 * §13.1.4), and an If-Range date does not match, so the Range is ignored and the whole object
 * sent (§13.1.5: "the recipient ... MUST ignore the Range header field"). An If-Range that is an
 * entity-tag stays, and is compared strongly as ever.
 */
export function withoutDateValidators(request: Request): Request {
  const headers = new Headers(request.headers);
  headers.delete("If-Modified-Since");
  headers.delete("If-Unmodified-Since");
  const ifRange = headers.get("If-Range");
  if (ifRange !== null && !ifRange.trim().startsWith('"')) {
    // A date, or a weak tag that never matches (§13.1.5): either way the whole object.
    headers.delete("If-Range");
    headers.delete("Range");
  }
  return new Request(request, { headers });
}

export type ByteRange =
  { kind: "none" } | { kind: "unsatisfiable" } | { kind: "partial"; start: number; end: number };

/**
 * Parses a single-range `Range` header against an object of `size` bytes.
 *
 * Multiple ranges, other units and malformed values are ignored (the whole object is sent), as
 * RFC 9110 §14.2 allows.
 */
export function parseRange(header: string | null, size: number): ByteRange {
  const match = header === null ? null : /^bytes=(\d*)-(\d*)$/.exec(header.trim());
  if (match === null) return { kind: "none" };
  const [, first = "", last = ""] = match;
  if (first === "" && last === "") return { kind: "none" };
  if (first === "") {
    const suffix = Number(last);
    if (suffix === 0 || size === 0) return { kind: "unsatisfiable" };
    return { kind: "partial", start: Math.max(0, size - suffix), end: size - 1 };
  }
  const start = Number(first);
  if (last !== "" && Number(last) < start) return { kind: "none" };
  if (start >= size) return { kind: "unsatisfiable" };
  const end = last === "" ? size - 1 : Math.min(Number(last), size - 1);
  return { kind: "partial", start, end };
}

/**
 * The answer to `request` from the stored full response `stored`.
 *
 * @param cacheControl The policy for this client: immutable for public URLs, private with the
 *   remaining lifetime for signed ones.
 */
export async function answer(
  request: Request,
  stored: Response,
  cacheControl: string,
): Promise<Response> {
  const headers = new Headers(stored.headers);
  headers.set("Cache-Control", cacheControl);
  // The cached copy's Date (and any Age) is when the origin answered, not this response: a
  // browser would count its max-age from then (RFC 9111 §4.2.3), and a signed URL's
  // "max-age=<seconds left>" would arrive stale. The runtime dates the response itself.
  headers.delete("Date");
  headers.delete("Age");
  const isHead = request.method === "HEAD";

  // 1. Preconditions (RFC 9110 §13.2.2): 412, then 304
  const condition = evaluatePreconditions(request, headers);
  if (condition !== null) {
    await stored.body?.cancel();
    return conditionalResponse(condition, headers);
  }

  // 2. Byte range, cut from the full object (GET only: RFC 9110 §14.2)
  if (!isHead && request.headers.has("Range") && ifRangeHolds(request, headers)) {
    const bytes = await stored.arrayBuffer();
    const range = parseRange(request.headers.get("Range"), bytes.byteLength);
    if (range.kind === "unsatisfiable") {
      return textResponse(416, "Range Not Satisfiable", {
        "Content-Range": `bytes */${bytes.byteLength}`,
        "Accept-Ranges": "bytes",
      });
    }
    if (range.kind === "partial") {
      headers.set("Content-Range", `bytes ${range.start}-${range.end}/${bytes.byteLength}`);
      headers.set("Content-Length", String(range.end - range.start + 1));
      const part = bytes.slice(range.start, range.end + 1);
      return new Response(part, { status: 206, headers });
    }
    headers.set("Content-Length", String(bytes.byteLength));
    return new Response(bytes, { status: 200, headers });
  }

  // 3. The whole object, streamed
  if (isHead) {
    await stored.body?.cancel();
    return new Response(null, { status: 200, headers });
  }
  return new Response(stored.body, { status: 200, headers });
}
