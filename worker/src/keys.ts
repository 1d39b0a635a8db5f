/**
 * Which request paths name a served object or a gallery page, and what they contain.
 *
 * KEY_PATTERN is PUBLIC_KEY_PATTERN in imagegen/urls.py and GALLERY_PATTERN is its
 * GALLERY_PATH_PATTERN; docs/signed-urls.md is the specification. Only the full image, its
 * thumbnail and its AVIF/WebP derivatives match: the metadata record (.json), dots inside the
 * generation id, percent-escapes and empty segments never do, so nothing outside these shapes
 * can reach the origin.
 */
export const KEY_PATTERN =
  /^([0-9]{4}\/(?:0[1-9]|1[0-2])\/(?:0[1-9]|[12][0-9]|3[01]))\/([A-Za-z0-9][A-Za-z0-9_-]{0,127})(\.png|\.thumb\.webp|\.w[1-9][0-9]{0,4}\.(?:avif|webp))$/;

/** The gallery: `""` (the latest day) or one day folder `YYYY/MM/DD/`. */
export const GALLERY_PATTERN = /^(?:[0-9]{4}\/(?:0[1-9]|1[0-2])\/(?:0[1-9]|[12][0-9]|3[01])\/)?$/;

const MEDIA_TYPES: Record<string, string> = {
  png: "image/png",
  webp: "image/webp",
  avif: "image/avif",
};

/** Whether `key` (without a leading slash) is a served object key. */
export function isPublicKey(key: string): boolean {
  return KEY_PATTERN.test(key);
}

/**
 * The path without its leading slash, or null.
 *
 * `pathname` is `URL.pathname`: the WHATWG URL parser has already resolved `.` and `..`
 * segments (`%2e` spellings included), as every browser does before sending a request. It is
 * still percent-encoded, so an encoded slash stays `%2F` and fails every pattern instead of
 * being decoded into a path separator.
 */
function pathOf(pathname: string): string | null {
  return pathname.startsWith("/") ? pathname.slice(1) : null;
}

/** The object key a request path names, or null when it names nothing served. */
export function keyFromPath(pathname: string): string | null {
  const key = pathOf(pathname);
  return key !== null && isPublicKey(key) ? key : null;
}

/** The gallery path (`""` or `YYYY/MM/DD/`) a request path names, or null. */
export function galleryFromPath(pathname: string): string | null {
  const path = pathOf(pathname);
  return path !== null && GALLERY_PATTERN.test(path) ? path : null;
}

/**
 * The gallery day folder a request path names without its trailing slash (`/YYYY/MM/DD`), with
 * that slash, or null: redirected to the gallery path.
 */
export function slashlessGalleryDay(pathname: string): string | null {
  const path = pathOf(pathname);
  return path !== null && path !== "" && GALLERY_PATTERN.test(`${path}/`) ? `${path}/` : null;
}

/**
 * The media type of a served key, decided by its name alone: whatever type the origin stored
 * (or failed to store) is never trusted.
 */
export function contentTypeForKey(key: string): string {
  const extension = key.slice(key.lastIndexOf(".") + 1);
  return MEDIA_TYPES[extension] ?? "application/octet-stream";
}

/** The parts of a full image key `YYYY/MM/DD/<id>.png`, or null for any other key. */
export function imageParts(key: string): { day: string; id: string } | null {
  const match = KEY_PATTERN.exec(key);
  if (match === null || match[3] !== ".png") return null;
  return { day: match[1] ?? "", id: match[2] ?? "" };
}

/** The parts of a thumbnail key `YYYY/MM/DD/<id>.thumb.webp`, or null for any other key. */
export function thumbnailParts(key: string): { day: string; id: string } | null {
  const match = KEY_PATTERN.exec(key);
  if (match === null || match[3] !== ".thumb.webp") return null;
  return { day: match[1] ?? "", id: match[2] ?? "" };
}

/**
 * The parts of a derivative key `YYYY/MM/DD/<id>.w<width>.<avif|webp>`, or null for any other
 * key.
 */
export function derivativeParts(
  key: string,
): { day: string; id: string; format: "avif" | "webp"; width: number } | null {
  const match = KEY_PATTERN.exec(key);
  const suffix = /^\.w([1-9][0-9]*)\.(avif|webp)$/.exec(match?.[3] ?? "");
  if (match === null || suffix === null) return null;
  const format = suffix[2] === "avif" ? "avif" : "webp";
  return { day: match[1] ?? "", id: match[2] ?? "", format, width: Number(suffix[1]) };
}

/** The key of the metadata record of the image `YYYY/MM/DD/<id>.png` (never served). */
export function recordKey(day: string, id: string): string {
  return `${day}/${id}.json`;
}

/**
 * The key of the derivatives record of the image `YYYY/MM/DD/<id>.png` (never served): written
 * by the derive stage once every derivative it lists is stored.
 */
export function derivativesRecordKey(day: string, id: string): string {
  return `${day}/${id}.derivatives.json`;
}

/** The key of a derivative, as imagegen/derivatives.py names it. */
export function derivativeKey(day: string, id: string, format: string, width: number): string {
  return `${day}/${id}.w${width}.${format}`;
}
