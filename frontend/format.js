// Numbers, counts and sizes as the page writes them.

export const number = (n) => Number(n || 0).toLocaleString("en-US");

/** "1 request", "2 requests", "1,000 iterations". */
export function plural(n, singular, pluralForm = `${singular}s`) {
  return `${number(n)} ${Number(n) === 1 ? singular : pluralForm}`;
}

export function formatBytes(bytes) {
  const units = ["bytes", "KB", "MB", "GB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit += 1; }
  if (unit === 0) return plural(value, "byte");
  return `${value.toFixed(1)} ${units[unit]}`;
}

export const seconds = (ms) => `${(ms / 1000).toFixed(1)} s`;
