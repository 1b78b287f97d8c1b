// Drives headless Chromium against the proxy's status page, for tests/status_page.rs.
//
//   node status-page.mjs <status url> <screenshot.png> [<gate state to wait for> <ms>]
//
// Loads the page and prints one JSON line ("loaded": what the page shows, console and page
// errors so far). With a gate state, it then reads a line from stdin (the test closed the
// gate), and from that moment waits (the page reloads itself by its <meta refresh>;
// nothing here reloads it) until #gate-state shows that state, and prints a second line
// ("waited": how long after the closure, the page's values, every error seen).
import { chromium } from 'playwright-core';
import { createInterface } from 'node:readline';

const [url, screenshot, waitFor, withinMs] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: [
    '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
  ],
});
const errors = [];
try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  page.on('console', (m) => { if (m.type() === 'error' || m.type() === 'warning') errors.push(`console ${m.type()}: ${m.text()}`); });
  page.on('pageerror', (e) => errors.push(`page error: ${e.message}`));
  page.on('requestfailed', (r) => errors.push(`request failed: ${r.url()} ${r.failure()?.errorText}`));
  page.on('response', (r) => { if (r.status() >= 400) errors.push(`HTTP ${r.status()}: ${r.url()}`); });
  const response = await page.goto(url, { waitUntil: 'load' });
  const shows = async () => page.evaluate(() => {
    const text = (id) => document.getElementById(id)?.textContent ?? null;
    return {
      hit_ratio: text('hit-ratio'), token_state: text('token-state'), gate_state: text('gate-state'),
      gate_until: text('gate-until'), requests_per_second: text('requests-per-second'),
      cache_entries: text('cache-entries'), callers: [...document.querySelectorAll('#callers td:first-child')].map((td) => td.textContent),
      scripts: document.scripts.length, sparkline: !!document.querySelector('#sparkline polyline'),
      title: document.title,
    };
  });
  const first = await shows();
  await page.screenshot({ path: screenshot, fullPage: true });
  console.log(JSON.stringify({ step: 'loaded', status: response.status(), csp: response.headers()['content-security-policy'] ?? null, shows: first, errors }));
  if (waitFor) {
    const input = createInterface({ input: process.stdin });
    await new Promise((resolve) => input.once('line', resolve));
    input.close();
    const started = Date.now();
    let seen = null;
    while (Date.now() - started < Number(withinMs)) {
      try {
        const state = await page.evaluate(() => document.getElementById('gate-state')?.textContent ?? null);
        if (state === waitFor) { seen = Date.now() - started; break; }
      } catch { /* the page is reloading */ }
      await new Promise((r) => setTimeout(r, 100));
    }
    await page.waitForLoadState('load');
    const after = await shows();
    await page.screenshot({ path: screenshot.replace(/\.png$/, '-throttled.png'), fullPage: true });
    console.log(JSON.stringify({ step: 'waited', seen_after_ms: seen, shows: after, errors }));
  }
} finally {
  await browser.close();
}
