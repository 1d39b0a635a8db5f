/**
 * Which request paths name a served object, and what they contain.
 *
 * The expression is the same as PUBLIC_KEY_PATTERN in imagegen/urls.py; docs/signed-urls.md is
 * the specification. Only the full image and its thumbnail match: the metadata record (.json),
 * dots inside the generation id, percent-escapes and empty segments never do, so nothing outside
 * this shape can reach the origin.
 */
export const KEY_PATTERN =
  /^[0-9]{4}\/(?:0[1-9]|1[0-2])\/(?:0[1-9]|[12][0-9]|3[01])\/[A-Za-z0-9][A-Za-z0-9_-]{0,127}(?:\.png|\.thumb\.webp)$/;

/** Whether `key` (without a leading slash) is a served object key. */
export function isPublicKey(key: string): boolean {
  return KEY_PATTERN.test(key);
}

/**
 * The object key a request path names, or null when it names nothing served.
 *
 * `pathname` is `URL.pathname`, still percent-encoded: an encoded slash stays `%2F` and fails the
 * pattern instead of being decoded into a path separator.
 */
export function keyFromPath(pathname: string): string | null {
  if (!pathname.startsWith("/")) return null;
  const key = pathname.slice(1);
  return isPublicKey(key) ? key : null;
}

/** The media type of a served key, used when the origin does not store one. */
export function contentTypeForKey(key: string): string {
  return key.endsWith(".webp") ? "image/webp" : "image/png";
}
