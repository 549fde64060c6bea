// Answers are Markdown written by a model that may have read hostile input, so what they render is kept
// harmless: no scripts, styles, forms, frames or SVG; images only from this server or data:/blob: URLs
// (an image from elsewhere would send whatever its URL carries to that site); links only to http(s) or
// mailto, opened in a new tab that cannot reach back; no ids or classes that could borrow the page's own
// (only code blocks' `language-*`). The page's Content-Security-Policy enforces the same limits again.

import { Marked } from "./vendor/marked.esm.js";
import createDOMPurify from "./vendor/purify.es.mjs";

const marked = new Marked({
  gfm: true,
  renderer: {
    checkbox({ checked }) { return checked ? "☑ " : "☐ "; },  // task lists without <input>
  },
});

const purify = createDOMPurify(window);

const ALLOWED_TAGS = ["a", "abbr", "b", "blockquote", "br", "code", "dd", "del", "details", "div", "dl", "dt", "em",
  "h1", "h2", "h3", "h4", "h5", "h6", "hr", "i", "img", "ins", "kbd", "li", "mark", "ol", "p", "pre", "q", "s",
  "samp", "small", "span", "strong", "sub", "summary", "sup", "table", "tbody", "td", "tfoot", "th", "thead", "tr",
  "u", "ul", "var"];
const ALLOWED_ATTR = ["href", "src", "alt", "title", "class", "colspan", "rowspan", "align", "start"];
const SAFE_LINK = /^(https?:|mailto:)/i;

/** An image source that loads nothing from another site: data: and blob: URLs, or this page's origin. */
export function isSafeImageSource(src) {
  const value = src.trim();
  if (/^data:image\//i.test(value) || /^blob:/i.test(value)) return true;
  try {
    const url = new URL(value, document.baseURI);
    return (url.protocol === "http:" || url.protocol === "https:") && url.origin === location.origin;
  } catch {
    return false;
  }
}

purify.addHook("uponSanitizeAttribute", (node, data) => {
  if (data.attrName === "class") {
    data.attrValue = data.attrValue.split(/\s+/).filter((name) => /^language-[\w+-]+$/.test(name)).join(" ");
    data.keepAttr = data.attrValue !== "";
  }
});

purify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    const href = node.getAttribute("href");
    if (href === null || !SAFE_LINK.test(href.trim())) {
      node.removeAttribute("href");
    } else {
      node.setAttribute("target", "_blank");
      node.setAttribute("rel", "noopener noreferrer");
    }
  } else if (node.tagName === "IMG") {
    const src = node.getAttribute("src");
    if (src !== null && !isSafeImageSource(src)) {
      node.removeAttribute("src");
      node.setAttribute("alt", `[image from another site, not loaded${node.alt ? `: ${node.alt}` : ""}]`);
      node.setAttribute("class", "blocked-image");
    }
  }
});

/** The Markdown `text` as a sanitized fragment, ready to append. */
export function renderMarkdown(text) {
  return purify.sanitize(marked.parse(text || ""), {
    ALLOWED_TAGS, ALLOWED_ATTR, RETURN_DOM_FRAGMENT: true,
  });
}
