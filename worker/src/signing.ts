/**
 * Signed URLs: `/<key>?[<params>&]expires=<unix-seconds>&signature=<hex>`.
 *
 * signature = lowercase hex of HMAC-SHA256(secret, "/" + key + ["?" + canonical params] + "\n" +
 * expires), where the canonical params are every other parameter, RFC 3986-encoded, sorted and
 * `&`-joined. The scheme is specified in docs/signed-urls.md and shared with imagegen/urls.py
 * through schemas/signed-url-vectors.json.
 */

const encoder = new TextEncoder();
const SIGNATURE_PATTERN = /^[0-9a-f]{64}$/;
// Whole seconds in decimal digits; fifteen digits stay well inside Number.MAX_SAFE_INTEGER.
const EXPIRES_PATTERN = /^\d{1,15}$/;

export type SignatureCheck =
  | { ok: true; expires: number }
  | { ok: false; reason: "missing" | "malformed" | "mismatch" | "expired" };

const SIGNATURE_PARAMS = new Set(["expires", "signature"]);

// encodeURIComponent keeps !'()* unescaped; RFC 3986 (and Python's quote) escape them.
function rfc3986(value: string): string {
  return encodeURIComponent(value).replace(
    /[!'()*]/g,
    (c) => `%${c.charCodeAt(0).toString(16).toUpperCase()}`,
  );
}

/** The signed form of a URL's parameters, without `expires` and `signature`. */
export function canonicalQuery(params: URLSearchParams | Record<string, string>): string {
  const entries = params instanceof URLSearchParams ? [...params] : Object.entries(params);
  return entries
    .filter(([name]) => !SIGNATURE_PARAMS.has(name))
    .map(([name, value]) => [rfc3986(name), rfc3986(value)] as const)
    .sort(([a, x], [b, y]) => (a < b ? -1 : a > b ? 1 : x < y ? -1 : x > y ? 1 : 0))
    .map(([name, value]) => `${name}=${value}`)
    .join("&");
}

function message(key: string, expires: number, query: string): Uint8Array {
  return encoder.encode(query ? `/${key}?${query}\n${expires}` : `/${key}\n${expires}`);
}

function hmacKey(secret: string, usage: "sign" | "verify"): Promise<CryptoKey> {
  return crypto.subtle.importKey(
    "raw",
    encoder.encode(secret),
    { name: "HMAC", hash: "SHA-256" },
    false,
    [usage],
  );
}

function hexToBytes(hex: string): Uint8Array {
  const bytes = new Uint8Array(hex.length / 2);
  for (let i = 0; i < bytes.length; i++) {
    bytes[i] = parseInt(hex.slice(2 * i, 2 * i + 2), 16);
  }
  return bytes;
}

/** The lowercase hex signature of `key` (and `params`) valid until `expires` (Unix seconds). */
export async function sign(
  key: string,
  expires: number,
  secret: string,
  params: URLSearchParams | Record<string, string> = {},
): Promise<string> {
  const mac = await crypto.subtle.sign(
    "HMAC",
    await hmacKey(secret, "sign"),
    message(key, expires, canonicalQuery(params)),
  );
  return Array.from(new Uint8Array(mac), (b) => b.toString(16).padStart(2, "0")).join("");
}

/** Whether `signature` is the MAC of `key` and `expires`, compared in constant time. */
async function macMatches(
  key: string,
  expires: number,
  signature: string,
  secret: string,
  query: string,
): Promise<boolean> {
  // Only the canonical spelling (64 lowercase hex digits) is accepted.
  if (!SIGNATURE_PATTERN.test(signature)) return false;
  return crypto.subtle.verify(
    "HMAC",
    await hmacKey(secret, "verify"),
    hexToBytes(signature),
    message(key, expires, query),
  );
}

/** Whether `signature` signs `key` and `expires`, and `now` (Unix seconds) is not past `expires`. */
export async function verify(
  key: string,
  expires: number,
  signature: string,
  secret: string,
  now: number,
  params: URLSearchParams | Record<string, string> = {},
): Promise<boolean> {
  const matches = await macMatches(key, expires, signature, secret, canonicalQuery(params));
  return matches && now <= expires;
}

/**
 * Checks the `expires` and `signature` query parameters of a request for `key`; they sign every
 * other parameter too.
 *
 * @param secrets The signature may be made with any of them (the current secret, and the
 *   previous one during a rotation); each is compared in constant time, every one of them.
 */
export async function checkSignedUrl(
  params: URLSearchParams,
  key: string,
  secrets: string | readonly string[],
  now: number,
): Promise<SignatureCheck> {
  const expiresValues = params.getAll("expires");
  const signatureValues = params.getAll("signature");
  if (expiresValues.length === 0 || signatureValues.length === 0) {
    return { ok: false, reason: "missing" };
  }
  // A repeated parameter is ambiguous: refuse it rather than pick one.
  const expiresText = expiresValues[0] ?? "";
  const signature = signatureValues[0] ?? "";
  if (
    expiresValues.length > 1 ||
    signatureValues.length > 1 ||
    !EXPIRES_PATTERN.test(expiresText) ||
    !SIGNATURE_PATTERN.test(signature)
  ) {
    return { ok: false, reason: "malformed" };
  }
  const expires = Number(expiresText);
  const query = canonicalQuery(params);
  const matches = await Promise.all(
    (typeof secrets === "string" ? [secrets] : secrets).map((secret) =>
      macMatches(key, expires, signature, secret, query),
    ),
  );
  if (!matches.includes(true)) return { ok: false, reason: "mismatch" };
  if (now > expires) return { ok: false, reason: "expired" };
  return { ok: true, expires };
}
