/**
 * The gallery page's HTML: one day of images, newest first, with links to earlier days.
 *
 * No framework: every piece of text (prompts are user text) goes through `escape`, the page's
 * only script and style are inline and allowed by their SHA-256 in its Content-Security-Policy,
 * and images load lazily from `<picture>` sources (AVIF, then WebP, then the PNG).
 */

export interface Source {
  type: "image/avif" | "image/webp";
  /** `srcset` entries: URL and real width. */
  candidates: { url: string; width: number }[];
}

export interface Item {
  id: string;
  href: string;
  fallback: string;
  sources: Source[];
  width: number;
  height: number;
  prompt: string;
  seed: string;
  model: string;
  created: string;
}

export interface DayLink {
  day: string;
  href: string;
}

export interface Page {
  day: string;
  items: Item[];
  earlier: DayLink[];
  later: DayLink | null;
  /** The day's pages: this one, how many, and the links to the next newer and older one. */
  pages: { current: number; count: number; newer: string | null; older: string | null };
  /** False when the day holds more than the gallery lists: some of its images are not shown. */
  complete: boolean;
}

const ESCAPES: Record<string, string> = {
  "&": "&amp;",
  "<": "&lt;",
  ">": "&gt;",
  '"': "&quot;",
  "'": "&#39;",
};

/** Text made safe for HTML content and quoted attribute values. */
export function escape(text: string): string {
  return text.replace(/[&<>"']/g, (c) => ESCAPES[c] ?? c);
}

// Keys: j / ArrowRight next image, k / ArrowLeft previous, [ earlier day, ] later day. The help
// that names them is hidden until the script runs: without it the keys do nothing.
export const SCRIPT = `document.querySelector(".keys").hidden = false;
document.addEventListener("keydown", (e) => {
  if (e.altKey || e.ctrlKey || e.metaKey) return;
  const links = [...document.querySelectorAll(".item > a")];
  const at = links.indexOf(document.activeElement);
  const go = (rel) => { const a = document.querySelector('a[rel="' + rel + '"]'); if (a) location.href = a.href; };
  let next = null;
  if (e.key === "ArrowRight" || e.key === "j") next = links[Math.min(at + 1, links.length - 1)];
  else if (e.key === "ArrowLeft" || e.key === "k") next = links[Math.max(at - 1, 0)];
  else if (e.key === "[") return go("prev");
  else if (e.key === "]") return go("next");
  if (next) { e.preventDefault(); next.focus(); next.scrollIntoView({ block: "nearest" }); }
});`;

export const STYLE = `
:root { color-scheme: light dark; font-family: system-ui, sans-serif; }
body { margin: 0 auto; max-width: 72rem; padding: 1rem; }
h1 { font-size: 1.4rem; margin: 0 0 1rem; }
ol.grid { list-style: none; padding: 0; margin: 0; display: grid; gap: 1rem; align-items: start;
  grid-template-columns: repeat(auto-fill, minmax(min(100%, 16rem), 1fr)); }
.item a { display: block; border-radius: .5rem; outline-offset: 3px; }
.item a:focus-visible { outline: 3px solid #4a8af4; }
.item img { display: block; width: 100%; height: auto; border-radius: .5rem; background: #8884; }
.prompt { margin: .5rem 0 .25rem; overflow-wrap: anywhere; }
details.prompt > summary { cursor: pointer; list-style-position: outside; margin-inline-start: 1rem; }
details.prompt > summary:focus-visible { outline: 3px solid #4a8af4; outline-offset: 2px; }
details.prompt:not([open]) .clamp { display: -webkit-box; -webkit-box-orient: vertical;
  -webkit-line-clamp: 4; line-clamp: 4; overflow: hidden; }
.meta { margin: 0; font-size: .85rem; opacity: .75; }
.meta span + span::before { content: " · "; }
nav { margin: 1.5rem 0; display: flex; flex-wrap: wrap; gap: .5rem 1rem; }
kbd { font-size: .8rem; border: 1px solid #8888; border-radius: .25rem; padding: 0 .25rem; }
`;

async function sha256(text: string): Promise<string> {
  const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(text));
  return btoa(String.fromCharCode(...new Uint8Array(digest)));
}

let csp: Promise<string> | null = null;

/** The gallery's policy: its own script and style, images from this origin, nothing else. */
export function galleryCsp(): Promise<string> {
  csp ??= Promise.all([sha256(SCRIPT), sha256(STYLE)]).then(
    ([script, style]) =>
      `default-src 'none'; img-src 'self'; script-src 'sha256-${script}'; ` +
      `style-src 'sha256-${style}'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'`,
  );
  return csp;
}

/** Longest alt text, in characters: a prompt may run to thousands, and it names the link. */
export const ALT_LENGTH = 150;

/** `prompt` cut to ALT_LENGTH characters (never inside a surrogate pair), marked when cut. */
export function shortText(prompt: string, length = ALT_LENGTH): string {
  const chars = Array.from(prompt);
  if (chars.length <= length) return prompt;
  return `${chars
    .slice(0, length - 1)
    .join("")
    .trimEnd()}…`;
}

function picture(item: Item): string {
  const sizes = "(max-width: 34rem) 100vw, 22rem";
  const sources = item.sources
    .filter((s) => s.candidates.length > 0)
    .map((s) => {
      const srcset = s.candidates.map((c) => `${escape(c.url)} ${c.width}w`).join(", ");
      return `<source type="${s.type}" srcset="${srcset}" sizes="${sizes}">`;
    })
    .join("");
  return (
    `<picture>${sources}<img src="${escape(item.fallback)}" width="${item.width}" ` +
    `height="${item.height}" loading="lazy" decoding="async" dir="auto" ` +
    `alt="${escape(shortText(item.prompt))}">` +
    `</picture>`
  );
}

/**
 * The prompt below an image. The image's alt names its link: a prompt the alt holds whole is
 * hidden from assistive technology here, so it is announced once. A longer one is read out in
 * full here, and shown cut to four lines (CSS) in a `<details>` whose summary opens it whole,
 * so one long prompt neither stretches its row nor needs a script to be read.
 */
function promptOf(prompt: string): string {
  if (shortText(prompt) === prompt) {
    return `<p class="prompt" dir="auto" aria-hidden="true">${escape(prompt)}</p>`;
  }
  return (
    `<details class="prompt" dir="auto"><summary><span class="clamp">${escape(prompt)}</span>` +
    `</summary></details>`
  );
}

function entry(item: Item): string {
  return (
    `<li class="item" id="${escape(item.id)}"><a href="${escape(item.href)}">${picture(item)}</a>` +
    `${promptOf(item.prompt)}<p class="meta">` +
    `<span>seed ${escape(item.seed)}</span><span>${escape(item.model)}</span>` +
    `<span><time datetime="${escape(item.created)}">${escape(item.created.slice(0, 16).replace("T", " "))} UTC</time></span>` +
    `</p></li>`
  );
}

/** The whole HTML document of one gallery page. */
export function renderPage(page: Page): string {
  const title = page.day ? `Images of ${page.day}` : "Images";
  // No day at all: the gallery holds no day folder yet.
  const empty = page.day ? "No images on this day." : "No images yet.";
  const items = page.items.length
    ? `<ol class="grid">${page.items.map(entry).join("")}</ol>`
    : `<p>${empty}</p>`;
  const { current, count, newer, older } = page.pages;
  const pages =
    count > 1
      ? `<nav aria-label="Pages">` +
        (newer ? `<a href="${escape(newer)}">Newer images</a>` : "") +
        `<span>Page ${current} of ${count}</span>` +
        (older ? `<a href="${escape(older)}">Older images</a>` : "") +
        `</nav>`
      : "";
  const partial = page.complete
    ? ""
    : `<p class="meta">This day holds more images than the gallery lists: some are not shown.</p>`;
  const links = [
    page.later
      ? `<a rel="next" href="${escape(page.later.href)}">Later: ${escape(page.later.day)}</a>`
      : "",
    ...page.earlier.map(
      (d, i) => `<a${i === 0 ? ' rel="prev"' : ""} href="${escape(d.href)}">${escape(d.day)}</a>`,
    ),
  ].join("");
  // A page that links no other day (behind a link signed for one day) says nothing of days.
  const days = links ? `<nav aria-label="Days">${links}</nav>\n` : "";
  const dayKeys = links ? ", <kbd>[</kbd> earlier day, <kbd>]</kbd> later day" : "";
  // All the page says is in its main landmark, its links in navigation landmarks within it. The
  // keys help is hidden until the script, which makes the keys work, shows it.
  return documentOf(
    title,
    `<main>
<h1>${escape(title)}</h1>
${partial}${items}
${pages}${days}<p class="meta keys" hidden>Keys: <kbd>j</kbd>/<kbd>→</kbd> next, <kbd>k</kbd>/<kbd>←</kbd> previous,
<kbd>Enter</kbd> open${dayKeys}.</p>
</main>
<script>${SCRIPT}</script>
`,
  );
}

/** A whole page titled `title` around `body` (HTML already escaped), under the gallery's style. */
function documentOf(title: string, body: string): string {
  return `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>${escape(title)}</title>
<style>${STYLE}</style>
</head>
<body>
${body}</body>
</html>
`;
}

/**
 * A gallery error as a small page: `title` as its heading, `text` below it, and a link to the
 * latest day where that link works (`home`: not behind signed links, where `/` needs one too).
 */
export function renderMessage(title: string, text: string, home: boolean): string {
  const link = home ? `\n<p><a href="/">Latest images</a></p>` : "";
  return documentOf(
    title,
    `<main>
<h1>${escape(title)}</h1>
<p>${escape(text)}</p>${link}
</main>
`,
  );
}
