"""Make the README's pictures with the project itself: `python scripts/make_images.py`.

- `assets/screenshot.png`: the page in Chromium, mid-run, against the fake OpenAI server.
- `assets/hero.png`: a drawing of how a run flows, laid out in HTML with the page's own styles and
  rendered by Chromium.

Needs the test dependencies and Debian's chromium (the same as the browser tests).
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "backend"), str(ROOT)]

from tests.conftest import LiveServer, make_settings  # noqa: E402
from tests.fake_openai import FakeOpenAI  # noqa: E402

TRANSCRIPT = "\n".join(
    f"[{h:02d}:{m:02d}] {speaker}: {line}"
    for h in range(2)
    for m in range(0, 60, 2)
    for speaker, line in (
        ("HOST", "So where does the context window actually start to hurt?"),
        (
            "GUEST",
            "Past a few hundred thousand tokens the answers drift; we keep the data "
            "outside and let the model read it with code.",
        ),
    )
)

TURNS = [
    {
        "text": "A two-hour podcast transcript. Let me look at its structure first.",
        "code": [
            "lines = context.splitlines()\nprint(len(context), 'chars,', len(lines), 'lines')\n"
            "speakers = {l.split(']')[1].split(':')[0].strip() for l in lines if ']' in l}\nspeakers"
        ],
    },
    {
        "text": "I will summarize it in slices of a few minutes each, in parallel.",
        "code": [
            "answer['content'] = '## Podcast summary\\n\\n_(reading the transcript…)_'\n"
            "size = len(lines) // 40 + 1\n"
            "slices = ['\\n'.join(lines[i:i + size]) for i in range(0, len(lines), size)]\n"
            "notes = llm_batch([f'Summarize the key points of this part:\\n{s}' for s in slices])\n"
            "print(len(notes), 'notes;', sum(n.startswith('Error') for n in notes), 'failed')"
        ],
    },
    {
        "text": "Combining the notes.",
        "code": [
            "answer['content'] = '## Podcast summary\\n\\n' + '\\n'.join(f'- {n}' for n in notes[:6])\n"
            "answer['ready'] = True"
        ],
    },
]

HERO = """<!doctype html><html><head><meta charset="utf-8"><link rel="stylesheet" href="/styles.css">
<style>
  body { width: 1280px; height: 640px; overflow: hidden; display: grid; place-items: center; }
  .hero { width: 1180px; padding: 40px 48px; }
  .hero h1 { font-size: 3rem; margin-bottom: 4px; }
  .hero .lead { color: var(--muted); font-size: 1.25rem; margin: 0 0 30px; }
  .flow { display: grid; grid-template-columns: 1fr auto 1.3fr auto 1fr; align-items: center; gap: 18px; }
  .box { padding: 18px 20px; border-radius: 14px; border: 1px solid var(--glass-border);
         background: rgba(8,12,26,.55); }
  .box h3 { margin: 0 0 6px; color: var(--accent); font-size: 1.1rem; }
  .box p { margin: 0; color: var(--text); font-size: .98rem; }
  .box code { font-family: var(--mono); color: #9ee6b0; }
  .arrow { font-size: 2rem; color: var(--accent-2); }
  .subs { display: grid; gap: 8px; }
  .subs .box { padding: 8px 14px; }
  .foot { margin-top: 28px; color: var(--muted); font-size: 1rem; }
</style></head><body><div class="backdrop"></div>
<section class="hero glass">
  <h1><span class="logo">◎</span> RLM service</h1>
  <p class="lead">Recursive Language Models: the input never enters the prompt. A root model writes code
  against it in a REPL and hands the reading to sub-models, in parallel.</p>
  <div class="flow">
    <div class="box"><h3>Root model</h3>
      <p>sees only the size, shape and a preview; writes Python, turn by turn</p></div>
    <div class="arrow">⇄</div>
    <div class="box"><h3>Sandboxed REPL</h3><p><code>context</code> holds 1 GB as easily as 1 KB;
      slices, regexes, numpy; builds <code>answer</code> until it is ready</p></div>
    <div class="arrow">⇉</div>
    <div class="subs">
      <div class="box"><p><code>llm_batch([…])</code> ×64 at once</p></div>
      <div class="box"><p><code>llm_query(chunk)</code></p></div>
      <div class="box"><p>any OpenAI-compatible server</p></div>
    </div>
  </div>
  <p class="foot">FastAPI · Server-Sent Events · PydanticAI · every step streamed live to the page</p>
</section></body></html>"""


def main() -> None:
    chromium = shutil.which("chromium")
    if not chromium:
        raise SystemExit("needs Debian's chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    assets = ROOT / "assets"
    assets.mkdir(exist_ok=True)
    fake = FakeOpenAI(root_model="root-model", sub_latency=0.35, latency=0.4).start()
    fake.sub = lambda prompt: "The guest explains why long contexts degrade and how code-driven reading avoids it."
    fake.root = lambda messages, body: TURNS[min(sum(m.get("role") == "assistant" for m in messages), 2)]
    settings = make_settings(
        fake, openai_model_name="root-model", openai_sub_model_name="sub-model", rlm_subcall_concurrency=4
    )
    with LiveServer(settings) as server, sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium,
            args=["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        page = browser.new_page(viewport={"width": 1360, "height": 860}, device_scale_factor=1)
        page.goto(server.url + "/")
        page.wait_for_function("() => document.getElementById('model-chip').textContent.includes('root')")
        page.fill("#prompt", "Summarize this podcast: the main arguments and who made them.")
        page.fill("#input-text", TRANSCRIPT)
        page.click("#run-button")
        page.wait_for_function(
            "() => Number(document.querySelector('.progress')?.dataset.done || 0) >= 18", timeout=60000
        )
        page.screenshot(path=str(assets / "screenshot.png"))
        page.wait_for_selector("#answer-badge.ready", timeout=60000)
        hero = browser.new_page(viewport={"width": 1280, "height": 640})
        hero.route("**/hero.html", lambda route: route.fulfill(body=HERO, content_type="text/html"))
        hero.goto(server.url + "/hero.html")
        time.sleep(0.3)
        hero.screenshot(path=str(assets / "hero.png"))
        browser.close()
    fake.stop()
    print("wrote", assets / "screenshot.png", "and", assets / "hero.png")


if __name__ == "__main__":
    main()
