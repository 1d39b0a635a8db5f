/**
 * Choosing the representation of a full image (`.png`) from `Accept` and the `w` parameter.
 *
 * The derivatives that exist are read from the image's derivatives record (written by the
 * derive stage after the image is persisted, never served): its `derived.keys` lists them as
 * `avif:<width>` and `webp:<width>`. Images persisted before derivatives had a stage of their
 * own list them in their metadata record's `persisted.keys` instead. Until either lists any,
 * the PNG is served. AVIF is preferred, then WebP, then the PNG; the width is the narrowest
 * derivative at least `w` wide, or the widest there is (the image's own width) when none is:
 * never upscaled. A record may list a derivative whose object is gone (a bucket restored
 * without them, until imagegen/derive.py `_remake_lost` makes them again): the caller tries
 * the candidates in order and serves the first that exists.
 */
import { derivativeKey, derivativesRecordKey, recordKey } from "./keys";
import { type Serving, wholeObject } from "./objects";

export type Format = "avif" | "webp";
const FORMATS: readonly Format[] = ["avif", "webp"];

/** The largest `w` accepted; imagegen.urls.MAX_WIDTH. */
export const MAX_WIDTH = 8192;

/** The media types `accept` names with a non-zero quality, in lower case, wildcards as sent. */
function acceptedTypes(accept: string | null): Set<string> {
  const accepted = new Set<string>();
  for (const part of (accept ?? "").toLowerCase().split(",")) {
    const [type = "", ...params] = part.split(";").map((p) => p.trim());
    const q = params.find((p) => p.startsWith("q="));
    if (q !== undefined && !(Number(q.slice(2)) > 0)) continue;
    accepted.add(type);
  }
  return accepted;
}

/** The derivative formats `accept` names with a non-zero quality, AVIF first. */
export function acceptedFormats(accept: string | null): Format[] {
  // Only explicit types count: */* and image/* are sent by clients that cannot decode AVIF.
  const accepted = acceptedTypes(accept);
  return FORMATS.filter((f) => accepted.has(`image/${f}`));
}

/**
 * Whether `accept` names `text/html` with a non-zero quality: a browser opening the URL. API
 * clients (which take any type, or JSON) and image loads (image types) do not.
 */
export function acceptsHtml(accept: string | null): boolean {
  return acceptedTypes(accept).has("text/html");
}

/** The `w` parameter: null when absent, a number, or "invalid". */
export function widthParam(params: URLSearchParams): number | null | "invalid" {
  const values = params.getAll("w");
  if (values.length === 0) return null;
  const value = values[0] ?? "";
  if (values.length > 1 || !/^[1-9][0-9]{0,4}$/.test(value) || Number(value) > MAX_WIDTH) {
    return "invalid";
  }
  return Number(value);
}

/** Widths of each derivative format of one image. */
export type Available = Record<Format, number[]>;

/**
 * The derivatives a record of `YYYY/MM/DD/<id>` lists (a derivatives record's `derived.keys`,
 * or an older metadata record's `persisted.keys`). Entries are believed only when the key is
 * exactly the one imagegen names, so a record can never point elsewhere.
 */
export function availableFrom(record: unknown, day: string, id: string): Available {
  const available: Available = { avif: [], webp: [] };
  const sections = record as { persisted?: { keys?: unknown }; derived?: { keys?: unknown } };
  const keys = sections?.derived?.keys ?? sections?.persisted?.keys;
  if (typeof keys !== "object" || keys === null) return available;
  for (const [name, value] of Object.entries(keys)) {
    const match = /^(avif|webp):([1-9][0-9]{0,4})$/.exec(name);
    if (match === null) continue;
    const format = match[1] as Format;
    const width = Number(match[2]);
    if (value === derivativeKey(day, id, format, width)) available[format].push(width);
  }
  available.avif.sort((a, b) => a - b);
  available.webp.sort((a, b) => a - b);
  return available;
}

async function readJson(serving: Serving, key: string): Promise<unknown> {
  const whole = await wholeObject(serving, key);
  if (whole === null) return null;
  try {
    return JSON.parse(await whole.text()) as unknown;
  } catch {
    return null;
  }
}

/** The metadata record of an image (from the edge cache or the origin), or null. */
export function readRecord(serving: Serving, day: string, id: string): Promise<unknown> {
  return readJson(serving, recordKey(day, id));
}

/**
 * The derivatives of an image that exist: those its derivatives record lists, else those of its
 * metadata record (`record` when the caller has read it already). A missing derivatives record
 * is remembered at the edge for NOT_FOUND_TTL seconds, so new derivatives are found that soon.
 */
export async function availableDerivatives(
  serving: Serving,
  day: string,
  id: string,
  record?: unknown,
): Promise<Available> {
  const derived = await readJson(serving, derivativesRecordKey(day, id));
  if (derived !== null) return availableFrom(derived, day, id);
  return availableFrom(record === undefined ? await readRecord(serving, day, id) : record, day, id);
}

/**
 * The derivatives to serve, best first: for each accepted format that lists any, the width the
 * rule above picks among its widths. One a format, so trying them all costs at most a lookup a
 * format, and never gives a narrower image than asked for.
 */
export function candidates(
  formats: Format[],
  width: number | null,
  available: Available,
): { format: Format; width: number }[] {
  const found: { format: Format; width: number }[] = [];
  for (const format of formats) {
    const widths = available[format];
    if (widths.length === 0) continue;
    const fits = width === null ? undefined : widths.find((w) => w >= width);
    found.push({ format, width: fits ?? widths[widths.length - 1] ?? 0 });
  }
  return found;
}
