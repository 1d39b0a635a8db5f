/**
 * Signed URLs: `/<key>?expires=<unix-seconds>&signature=<hex>`.
 *
 * signature = lowercase hex of HMAC-SHA256(secret, "/" + key + "\n" + expires). The scheme is
 * specified in docs/signed-urls.md and shared with imagegen/urls.py through
 * schemas/signed-url-vectors.json.
 */

const encoder = new TextEncoder();
const SIGNATURE_PATTERN = /^[0-9a-f]{64}$/;
// Whole seconds in decimal digits; fifteen digits stay well inside Number.MAX_SAFE_INTEGER.
const EXPIRES_PATTERN = /^\d{1,15}$/;

export type SignatureCheck =
  | { ok: true; expires: number }
  | { ok: false; reason: "missing" | "malformed" | "mismatch" | "expired" };

function message(key: string, expires: number): Uint8Array {
  return encoder.encode(`/${key}\n${expires}`);
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

/** The lowercase hex signature of `key` valid until `expires` (Unix seconds). */
export async function sign(key: string, expires: number, secret: string): Promise<string> {
  const mac = await crypto.subtle.sign(
    "HMAC",
    await hmacKey(secret, "sign"),
    message(key, expires),
  );
  return Array.from(new Uint8Array(mac), (b) => b.toString(16).padStart(2, "0")).join("");
}

/** Whether `signature` is the MAC of `key` and `expires`, compared in constant time. */
async function macMatches(
  key: string,
  expires: number,
  signature: string,
  secret: string,
): Promise<boolean> {
  // Only the canonical spelling (64 lowercase hex digits) is accepted.
  if (!SIGNATURE_PATTERN.test(signature)) return false;
  return crypto.subtle.verify(
    "HMAC",
    await hmacKey(secret, "verify"),
    hexToBytes(signature),
    message(key, expires),
  );
}

/** Whether `signature` signs `key` and `expires`, and `now` (Unix seconds) is not past `expires`. */
export async function verify(
  key: string,
  expires: number,
  signature: string,
  secret: string,
  now: number,
): Promise<boolean> {
  const matches = await macMatches(key, expires, signature, secret);
  return matches && now <= expires;
}

/** Checks the `expires` and `signature` query parameters of a request for `key`. */
export async function checkSignedUrl(
  params: URLSearchParams,
  key: string,
  secret: string,
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
  if (!(await macMatches(key, expires, signature, secret))) {
    return { ok: false, reason: "mismatch" };
  }
  if (now > expires) return { ok: false, reason: "expired" };
  return { ok: true, expires };
}
