// Opens the dashboard in headless Chromium, submits a job through the API, watches its bar reach
// 100 %, takes a screenshot, checks a task's lineage, pages through the job's result, and retries a
// dead letter with its button.
// Usage: node dashboard.mjs BASE_URL TOKEN SCREENSHOT.png   (exit 0 when every step passed)
import { chromium } from "playwright-core";

const [base, token, screenshot] = process.argv.slice(2);
const call = async (path, body) => {
  const response = await fetch(base + path, {
    method: body === undefined ? "GET" : "POST",
    headers: { Authorization: `Bearer ${token}`, "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status} ${await response.text()}`);
  return response.json();
};
const step = (what) => console.log(`ok - ${what}`);

const browser = await chromium.launch({ executablePath: process.env.CHROMIUM || "/usr/bin/chromium", args: ["--no-sandbox"] });
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  page.on("pageerror", (e) => { console.error("page error:", e.message); process.exitCode = 1; });
  // Signed out, the page asks for the token; signing in keeps it in an HttpOnly cookie.
  await page.goto(`${base}/`);
  await page.waitForSelector("#login", { state: "visible" });
  await page.fill("#token", token);
  await page.click("#save-token");
  await page.waitForSelector("text=Recent jobs");
  const cookies = await page.context().cookies();
  const session = cookies.find((c) => c.name === "stageflow_session");
  if (!session || !session.httpOnly || session.sameSite !== "Strict") throw new Error(`session cookie: ${JSON.stringify(cookies)}`);
  if (await page.evaluate(() => document.cookie.includes("stageflow_session"))) throw new Error("the page's script can read the token");
  if (await page.evaluate(() => Object.keys(localStorage).length) !== 0) throw new Error("the token is kept in localStorage");
  step("signing in keeps the token in an HttpOnly cookie, out of the page's reach");
  await page.waitForSelector("#live:has-text('live')");
  step("the dashboard loads and its event stream connects");

  const { job_id } = await call("/api/jobs/submit/hello_world", { message: "from the browser test", n: 300 });
  await page.waitForSelector(`tr.job[data-job="${job_id}"]`, { timeout: 30000 });
  step("the submitted job appears without reloading the page");
  await page.waitForSelector(`tr.job[data-job="${job_id}"] td.overall .bar[data-pct="100"]`, { timeout: 120000 });
  await page.waitForSelector(`tr.job[data-job="${job_id}"] .status.completed`);
  step("its progress bar reaches 100 % and it shows completed");
  await page.screenshot({ path: screenshot, fullPage: true });
  step(`screenshot written to ${screenshot}`);

  const prefix = job_id.slice(0, 16);
  await page.goto(`${base}/#job/${job_id}/completed`);
  const reply = page.locator(`tr.task[data-task="${prefix}-s2-0"]`);
  await reply.waitFor({ timeout: 15000 });
  const lineage = await reply.textContent();
  if (!lineage.includes(`← ${prefix}-s1-0`)) throw new Error(`no lineage in: ${lineage}`);
  const greet = await page.locator(`tr.task[data-task="${prefix}-s1-0"]`).textContent();
  if (!greet.includes(`→ ${prefix}-s2-0`)) throw new Error(`no successor in: ${greet}`);
  step("the job page shows a task's predecessor and successor");

  // The result: 300 replies, 100 a page, in task order; next and previous move between pages.
  const ordinals = () => page.locator("#result tr.result-entry").evaluateAll((rows) => rows.map((r) => Number(r.dataset.ordinal)));
  await page.waitForSelector("#result tr.result-entry", { timeout: 15000 });
  const expectPage = async (first, what) => {
    await page.waitForFunction((f) => document.querySelector("#result tr.result-entry")?.dataset.ordinal === String(f), first, { timeout: 15000 });
    const shown = await ordinals();
    if (shown.length !== 100 || shown.some((o, i) => o !== first + i)) throw new Error(`${what}: ordinals ${shown}`);
  };
  await expectPage(0, "the first page");
  if (!(await page.locator("#result h2").textContent()).includes("300 entries")) throw new Error("the result's size is not shown");
  const firstReply = await page.locator('#result tr.result-entry[data-ordinal="0"]').textContent();
  if (!firstReply.includes("reply")) throw new Error(`no reply in the result: ${firstReply}`);
  await page.click("#result-next");
  await expectPage(100, "the second page");
  await page.click("#result-next");
  await expectPage(200, "the last page");
  if (!(await page.locator("#result-next").isDisabled())) throw new Error("next is enabled on the last page");
  await page.click("#result-prev");
  await expectPage(100, "back to the second page");
  step("the job page shows its result a page at a time");

  const failing = await call("/api/jobs/submit/doomed", { permanent: true, message: "the browser test's failure" });
  await page.goto(`${base}/#`);
  const retry = page.locator(`tr.dead-letter button.retry[data-job="${failing.job_id}"]`).first();
  await retry.waitFor({ timeout: 60000 });
  const letter = await page.locator(`tr.dead-letter:has(button[data-job="${failing.job_id}"])`).first().textContent();
  if (!letter.includes("the browser test's failure")) throw new Error(`the error is not shown: ${letter}`);
  step("the dead letter appears with its error");
  await retry.click();
  // Said in the notice line, which live redraws of the list (the retried task may fail again at
  // once) do not replace.
  await page.waitForSelector(`#notice:has-text("${failing.job_id.slice(0, 16)}: queued 1 again")`, { timeout: 15000 });
  const events = await call(`/api/jobs/status/${failing.job_id}`);
  if (!["processing", "failed"].includes(events.status)) throw new Error(`unexpected status after retry: ${events.status}`);
  step("its retry button re-queues the job");
} finally {
  await browser.close();
}
