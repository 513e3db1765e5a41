"""The web app in a real browser: Playwright drives Debian's Chromium (never a downloaded one).

`python app.py` runs as a subprocess with its own work directory. The first test is a new
user's first run: pick a preset, upload a 50-row JSONL dataset, start, and check that the drawn
reward line is metrics.jsonl's values (points mapped back through the plot's axes, not counted),
then stop. The second opens the page at 420 px on a work directory holding finished runs (made
by hand, no training) and checks the overlay, the health warning, the completions browser, the
reward workbench, field errors and text contrast. The third moves the smoothing slider on such a
run and checks the redrawn reward line against the smoothed values of metrics.jsonl. The fourth
reads the base model's rewards and advantages off the workbench's table, then evaluates and
merges an adapter on the Use tab. The fifth reads the thumbnails of an image dataset's preview
and of a vision run's logged completions back from the page, pixels included.
LOWVRAM_GRPO_UPDATE_SCREENSHOT=1 refreshes the README's screenshots (docs/app.png, docs/app-*.png).

Without /usr/bin/chromium the test is skipped locally but fails under CI (CI=1): a browser test
that silently skips in CI would hide a broken page.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
REPO = Path(__file__).resolve().parents[1]
# The README's screenshot; refreshed only on request so that test runs leave the tree clean.
README_SCREENSHOT = REPO / "docs" / "app.png"
UPDATE_SCREENSHOT = os.environ.get("LOWVRAM_GRPO_UPDATE_SCREENSHOT") == "1"


def _missing(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: the browser tests must run in CI)")
    pytest.skip(reason, allow_module_level=True)


if not Path(CHROMIUM).exists():
    _missing(f"{CHROMIUM} not found; install Debian's chromium package")
try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:
    _missing("the playwright Python package is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def work_dir(tmp_path):
    return tmp_path / "work"


@pytest.fixture
def app_url(tiny_cache, tmp_path, work_dir):
    """`python app.py` on a free port; yields its URL and stops it (and any training) after."""
    port = free_port()
    log = (tmp_path / "app.log").open("wb")
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    app = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--work-dir", str(work_dir)],
                           cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 90
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if app.poll() is not None or time.time() > deadline:
                app.kill()
                pytest.fail("the app did not start:\n" + (tmp_path / "app.log").read_text(errors="replace"))
            time.sleep(0.5)
    yield url
    app.send_signal(signal.SIGINT)
    try:
        app.wait(15)
    except subprocess.TimeoutExpired:
        app.kill()
    # The trainer runs in its own session (it outlives the app on purpose): end it here.
    job = work_dir / "job.json"
    if job.exists():
        pid = json.loads(job.read_text())["pid"]
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def open_page(app_url):
    """Opens the app in Chromium: open_page(width) gives a page at that viewport width, loaded,
    with a 30 s default timeout; the browser closes after the test."""
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)

        def open_(width: int = 1280, height: int = 900):
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(30_000)
            page.goto(app_url)
            return page

        try:
            yield open_
        finally:
            browser.close()


def choose(page, label: str, option: str) -> None:
    page.get_by_label(label).first.click()
    page.get_by_role("option", name=option, exact=True).click()


def screenshot(page, name: str, tmp_path, **options) -> None:
    path = (README_SCREENSHOT.with_name(name) if UPDATE_SCREENSHOT else tmp_path / name)
    page.screenshot(path=str(path), **options)
    assert path.stat().st_size > 5_000


DRAWN = """(id) => {
  const fig = document.getElementById(id), svg = fig && fig.querySelector('svg');
  if (!svg) return null;
  const d = svg.dataset, lines = {};
  for (const line of svg.querySelectorAll('polyline.line')) {
    lines[line.dataset.run + '|' + line.dataset.series] = {
      stroke: line.getAttribute('stroke'),
      points: line.getAttribute('points').trim().split(/\\s+/).map(p => {
        const [x, y] = p.split(',').map(Number);
        return [+d.xmin + (x - d.left) / d.width * (d.xmax - d.xmin), +d.ymax - (y - d.top) / d.height * (d.ymax - d.ymin)];
      })};
  }
  return {lines, ymin: +d.ymin, ymax: +d.ymax};
}"""


def drawn(page, curve_id: str):
    return page.evaluate(DRAWN, f"curve-{curve_id}")


def settled(page, selector: str) -> None:
    """Waits until gradio has finished updating the element, and no other update follows within
    half a second (every tab switch queues one for the runs table): meanwhile gradio draws it at
    20% opacity, which a screenshot would keep."""
    page.wait_for_function("""(sel) => {
      let idle = !document.querySelector(sel + ' .pending');
      for (let e = document.querySelector(sel); e; e = e.parentElement)
        if (parseFloat(getComputedStyle(e).opacity) < 1) idle = false;
      const since = (window.__idleSince ??= {});
      if (!idle) { delete since[sel]; return false; }
      since[sel] ??= performance.now();
      return performance.now() - since[sel] > 500;
    }""", arg=selector)


def table_cells(page, selector: str) -> list[list[str]]:
    """The text of each body row's cells in a gradio Dataframe, as a person reads them."""
    return page.evaluate("""(sel) => [...document.querySelectorAll(sel + ' [role=row]')].slice(1).map(
        r => [...r.querySelectorAll('[role=gridcell]')].map(c => c.innerText.trim()))""", selector)


def contrast(page, selector: str) -> float:
    """WCAG contrast of an element's text colour with the page background."""
    return page.evaluate("""(sel) => {
      const el = document.querySelector(sel);
      const rgb = c => c.match(/[\\d.]+/g).slice(0, 3).map(Number);
      const lum = ([r, g, b]) => { const f = v => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; };
                                    return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b); };
      const fg = lum(rgb(getComputedStyle(el).color)), bg = lum(rgb(getComputedStyle(document.body).backgroundColor));
      return (Math.max(fg, bg) + 0.05) / (Math.min(fg, bg) + 0.05);
    }""", selector)


def test_first_run_draws_the_reward_of_metrics_jsonl(open_page, tmp_path, work_dir):
    """#1: in a fresh work directory the reward line of the first run follows metrics.jsonl;
    #2: the legend stays in its panel and colours stay put; #4: Stop is off once the run has
    stopped."""
    data = tmp_path / "sums.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n"
                            for a in range(10) for b in range(0, 10, 2)), encoding="utf-8")
    assert len(data.read_text().splitlines()) == 50

    page = open_page(1280)
    model = page.get_by_label("Model (hub id or local directory)")

    # A preset fills the form.
    choose(page, "Preset", "qwen2.5-0.5b-gsm8k")
    expect(model).to_have_value("Qwen/Qwen2.5-0.5B-Instruct")
    choose(page, "Preset", "tiny-cpu")
    expect(model).to_have_value("builtin:tiny")

    # Upload a dataset: it is copied into the work dir and previewed.
    page.locator("#dataset-upload input[type=file]").set_input_files(str(data))
    expect(page.get_by_text("Saved as")).to_be_visible()
    expect(page.locator("#field-dataset :is(input, textarea)")).to_have_value(
        re.compile(r".*/uploads/sums\.jsonl$"))
    page.get_by_label("Steps").fill("400")
    page.get_by_label("Run name").fill("browser-run")

    page.locator("#start").click()
    status = page.locator("#run-status")
    expect(status).to_contain_text("running", timeout=60_000)  # the Train tab opens by itself
    expect(page.locator("#stop")).to_be_enabled(timeout=30_000)

    # Wait for a reward line with some history (the page refreshes every 2 s).
    page.wait_for_function("""() => { const l = document.querySelector('#curve-reward polyline.line');
                                      return l && l.getAttribute('points').trim().split(/\\s+/).length >= 8; }""",
                           timeout=120_000)
    expect(status).to_contain_text("ETA")
    shown = drawn(page, "reward")
    line = shown["lines"]["browser-run|reward"]
    on_disk = {r["step"]: r for r in map(json.loads, (work_dir / "runs" / "browser-run" / "metrics.jsonl")
                                           .read_text().splitlines())}
    tolerance = (shown["ymax"] - shown["ymin"]) * 0.002  # two decimals of a pixel on a 190 px plot
    for step, value in line["points"]:
        assert round(step) in on_disk and abs(step - round(step)) < 0.05
        assert value == pytest.approx(on_disk[round(step)]["reward"], abs=tolerance)
    assert len(line["points"]) >= 8
    assert page.locator("#curve-reward polygon.band").count() == 1  # the ±std band

    # The legend is inside its panel, and the colours do not change on the next redraw.
    # (measured in one go in the page: a redraw between two calls would replace the elements)
    panels, outside = page.evaluate("""() => { const figures = [...document.querySelectorAll('#curve-grid figure')];
      return [figures.length, figures.filter(f => { const b = f.getBoundingClientRect(),
        l = f.querySelector('.legend').getBoundingClientRect();
        return l.bottom > b.bottom + 1 || l.right > b.right + 1; }).map(f => f.id)]; }""")
    assert panels >= 10 and outside == []
    strokes = {k: v["stroke"] for k, v in drawn(page, "length")["lines"].items()}
    page.wait_for_function("(n) => document.querySelector('#curve-reward polyline.line')"
                           ".getAttribute('points').trim().split(/\\s+/).length > n", arg=len(line["points"]))
    assert {k: v["stroke"] for k, v in drawn(page, "length")["lines"].items()} == strokes
    assert len(set(strokes.values())) == 3  # mean, min, max: three colours

    # Values on hover.
    page.locator("#curve-reward svg").hover()
    expect(page.locator("#curve-reward .tip")).to_contain_text("step")

    page.wait_for_timeout(700)
    screenshot(page, "app.png", tmp_path, full_page=True)

    page.locator("#stop").click()
    expect(page.locator("#job-message")).to_contain_text("Stop requested")
    expect(status).to_contain_text("stopped", timeout=60_000)
    expect(page.locator("#checkpoints")).to_contain_text("checkpoint-", timeout=10_000)
    expect(page.locator("#stop")).to_be_disabled()
    expect(page.locator("#resume")).to_be_enabled(timeout=30_000)  # once the trainer process has exited


def _seed_run(runs: Path, name: str, rewards: list[float], **extra) -> None:
    """A run directory as a finished training leaves it (no training needed)."""
    from lowvram_grpo.config import load_config, save_config

    run = runs / name
    run.mkdir(parents=True)
    save_config(load_config(preset="tiny-cpu", overrides={"output_dir": str(run)}), run / "config.yaml")
    (run / "status.json").write_text(json.dumps({"state": "finished", "step": len(rewards),
                                                 "total_steps": len(rewards), "pid": None, "error": None}))
    (run / "metrics.jsonl").write_text("".join(json.dumps(
        {"step": i + 1, "reward": r, "reward_std": 0.1, "kl": 0.01 * i, "loss": 0.1, "rewards/arith_answer/mean": r,
         "completions/mean_length": 3.0, "frac_reward_zero_std": 0.2, **extra}) + "\n" for i, r in enumerate(rewards)))
    (run / "completions.jsonl").write_text("".join(json.dumps(
        {"step": i + 1, "prompt": f"{i}+1=", "completion": str(i + 1), "reward": r, "advantage": 0.0,
         "rewards": {"arith_answer": r}}) + "\n" for i, r in enumerate(rewards)))
    (run / "train.log").write_text("".join(f"line {i}\n" for i in range(60)) + "RuntimeError: the last line\n")


@pytest.fixture
def seeded(work_dir):
    _seed_run(work_dir / "runs", "stuck", [0.0] * 20, frac_reward_zero_std=1.0)
    time.sleep(0.05)  # newest run first
    _seed_run(work_dir / "runs", "climbing", [i / 20 for i in range(20)])


def test_narrow_page_overlay_health_browser_workbench(seeded, open_page, tmp_path):
    """#12: the 420 px layout stacks; overlays, the health warning, the completions browser, the
    workbench; #3 (log end), #4 (buttons), #5 (preview), #6 (field errors), #13 (contrast)."""
    page = open_page(420)

    # Every tab name is on screen (none hidden in an overflow menu).
    for name in ("Set up", "Train and watch", "Runs", "Completions", "Try rewards", "Use the adapter"):
        expect(page.get_by_role("tab", name=name)).to_be_visible()

    # #5: a preset whose dataset is on the hub empties the previous preview.
    sums = re.compile(r"\d\+\d=")  # builtin:arith's rows
    expect(page.locator("#preview")).to_contain_text(sums, timeout=30_000)
    choose(page, "Preset", "qwen2.5-0.5b-gsm8k")
    expect(page.locator("#preview-message")).to_contain_text("Press Preview")
    expect(page.locator("#preview")).not_to_contain_text(sums)

    # #6: a field error is readable and marks its field.
    page.get_by_label("Steps").fill("0")
    page.locator("#check").click()
    error = page.locator("#error-max_steps")
    expect(error).to_contain_text("max_steps")
    assert float(error.locator("p").first.evaluate("e => parseFloat(getComputedStyle(e).fontSize)")) >= 12
    shadow = page.locator("#field-max_steps").evaluate("e => getComputedStyle(e).boxShadow")
    assert shadow and shadow != "none", shadow

    # #13: help text contrast.
    assert contrast(page, "#field-dataset [data-testid='block-info'], #field-dataset .info, "
                          "#field-dataset span") >= 4.5

    page.get_by_role("tab", name="Train and watch").click()
    expect(page.locator("#run-status")).to_contain_text("finished")
    # The newest run is selected; compare the other one with it.
    page.locator("#compare input").click()
    page.get_by_role("option", name="stuck", exact=True).click()
    page.keyboard.press("Escape")
    page.wait_for_function("() => document.querySelectorAll('#curve-reward polyline.line').length == 2")
    lines = drawn(page, "reward")["lines"]
    assert [v[1] for v in lines["stuck|reward"]["points"]] == pytest.approx([0.0] * 20, abs=1e-3)
    assert lines["climbing|reward"]["stroke"] != lines["stuck|reward"]["stroke"]

    # #12: the curve panels stack at 420 px, each the page's width.
    boxes = [f.bounding_box() for f in page.locator("#curve-grid figure").all()[:3]]
    assert len({round(b["x"]) for b in boxes}) == 1 and all(b["width"] > 300 for b in boxes)
    screenshot(page, "app-narrow.png", tmp_path)

    # Health: a run with no learning signal says so, naming the metric.
    page.locator("#run-choice input").click()
    page.get_by_role("option", name="stuck", exact=True).click()
    expect(page.locator("#health")).to_contain_text("frac_reward_zero_std", timeout=20_000)
    expect(page.locator("#more-steps")).to_be_enabled()
    expect(page.locator("#stop")).to_be_disabled()

    # #3: the log box shows its end: a traceback's last line is in view.
    log = page.locator("#log pre")
    expect(log).to_contain_text("RuntimeError: the last line")
    assert log.evaluate("p => p.scrollHeight > p.clientHeight")  # it does overflow
    assert log.evaluate("p => p.scrollTop + p.clientHeight >= p.scrollHeight - 2")

    # Completions browser.
    page.get_by_role("tab", name="Completions").click()
    page.locator("#browse").click()
    expect(page.locator("#browse-message")).to_contain_text("20 of 20")

    # Reward workbench.
    page.get_by_role("tab", name="Try rewards").click()
    page.locator("#wb-score").click()
    # The first scoring imports every reward function (math-verify among them): seconds, not ms.
    expect(page.locator("#wb-message")).to_contain_text("scored as one group", timeout=60_000)
    expect(page.locator("#wb-table")).to_contain_text("advantage")

    # The runs table and the completions browser at desktop width, as the README shows them.
    page.set_viewport_size({"width": 1280, "height": 800})
    page.get_by_role("tab", name="Runs").click()
    expect(page.locator("#runs-table")).to_contain_text("climbing")
    runs = {row[0]: row for row in table_cells(page, "#runs-table")}
    assert runs["climbing"][1:5] == ["finished", "builtin:tiny", "builtin:arith", "20 / 20"]
    assert float(runs["climbing"][5]) == float(runs["climbing"][6]) == 0.95  # last and best reward
    assert runs["stuck"][1] == "finished" and float(runs["stuck"][6]) == 0.0
    settled(page, "#runs-table")
    screenshot(page, "app-runs.png", tmp_path)

    page.get_by_role("tab", name="Train and watch").click()
    page.locator("#run-choice input").click()
    page.get_by_role("option", name="climbing", exact=True).click()
    expect(page.locator("#run-status")).to_contain_text("climbing")
    page.get_by_role("tab", name="Completions").click()
    page.get_by_label("Reward at least").fill("0.5")
    page.locator("#browse").click()
    expect(page.locator("#browse-message")).to_contain_text("10 of 20")  # climbing's steps 11-20
    shown = table_cells(page, "#completions")
    assert [int(row[0]) for row in shown] == list(range(20, 10, -1))  # newest first
    assert all(float(row[1]) >= 0.5 for row in shown)
    settled(page, "#completions")
    screenshot(page, "app-completions.png", tmp_path)


def ema(values: list[float], weight: float) -> list[float]:
    """TensorBoard's debiased exponential moving average: what the smoothing slider draws."""
    out, last, norm = [], 0.0, 0.0
    for v in values:
        last, norm = last * weight + (1 - weight) * v, norm * weight + (1 - weight)
        out.append(last / norm)
    return out


ZIGZAG = [0.5 + 0.4 * (-1) ** i + i / 50 for i in range(30)]  # a noisy reward: smoothing shows


@pytest.fixture
def noisy(work_dir):
    _seed_run(work_dir / "runs", "noisy", ZIGZAG)


TRAJECTORY = [
    {"role": "assistant", "content": "Let me use the calculator.",
     "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 37, "b": 48}}}]},
    {"role": "tool", "name": "add", "content": "85"},
    {"role": "assistant", "content": "85"},
]


@pytest.fixture
def agent_run(work_dir):
    """A finished run with tools: tool metrics in metrics.jsonl, trajectories in completions.jsonl."""
    run = work_dir / "runs" / "agent"
    _seed_run(work_dir / "runs", "agent", [0.5, 0.7, 0.9], **{"tools/call_frequency": 0.5,
                                                             "tools/failure_frequency": 0.1})
    (run / "completions.jsonl").write_text(json.dumps(
        {"step": 3, "prompt": [{"role": "user", "content": "37+48="}], "completion": "85", "reward": 1.0,
         "advantage": 0.5, "rewards": {"arith_answer": 1.0}, "messages": TRAJECTORY}) + "\n")
    time.sleep(0.05)  # older than the runs seeded after it: the page opens on theirs


def check_trajectory_turns(page) -> None:
    """On run "agent": a multi-turn completion reads as turns: the model's text, the tool call
    with its arguments, the tool's result, each a visibly different block; the tool curves are
    drawn."""
    page.get_by_role("tab", name="Train and watch").click()
    page.locator("#run-choice input").click()
    page.get_by_role("option", name="agent", exact=True).click()
    page.wait_for_function("() => document.querySelectorAll('#curve-tools polyline.line').length >= 2")
    assert {key.split("|")[1] for key in drawn(page, "tools")["lines"]} >= {"tools/call_frequency",
                                                                                "tools/failure_frequency"}

    page.get_by_role("tab", name="Completions").click()
    page.locator("#browse").click()
    expect(page.locator("#browse-message")).to_contain_text("1 of 1")
    turns = page.locator("#trajectories .turn")
    expect(turns).to_have_count(4)
    shown = [(t.get_attribute("class").split()[-1], t.locator(".turn-label").inner_text(),
              t.locator(".turn-content").inner_text()) for t in turns.all()]
    assert shown == [("turn-assistant", "model", "Let me use the calculator."),
                     ("turn-call", "calls add", '{"a": 37, "b": 48}'),
                     ("turn-tool", "add returned", "85"),
                     ("turn-assistant", "model", "85")]
    backgrounds = {kind: t.evaluate("e => getComputedStyle(e).backgroundColor")
                   for (kind, _, _), t in zip(shown, turns.all())}
    assert len(set(backgrounds.values())) == 3, backgrounds  # model, call and result look different


def _red_square_png(path: Path) -> None:
    from PIL import Image

    image = Image.new("RGB", (40, 40), (255, 255, 255))
    image.paste(Image.new("RGB", (20, 20), (220, 30, 30)), (10, 10))
    image.save(path)


@pytest.fixture
def vision_run(work_dir, tmp_path):
    """A dataset of pictures (a red square each) and a finished vision run whose logged
    completions carry that picture's thumbnail; returns the dataset file."""
    from PIL import Image

    from lowvram_grpo.vision import thumbnail

    data = tmp_path / "pictures"
    data.mkdir()
    _red_square_png(data / "square.png")
    (data / "train.jsonl").write_text("".join(json.dumps({"prompt": f"how many squares? ({i})", "image": "square.png",
                                                          "answer": "1"}) + "\n" for i in range(3)))
    _seed_run(work_dir / "runs", "vision", [0.5, 1.0])
    completions = work_dir / "runs" / "vision" / "completions.jsonl"
    records = [json.loads(line) for line in completions.read_text().splitlines()]
    for record in records:
        record["images"] = [thumbnail(Image.open(data / "square.png"))]
    completions.write_text("".join(json.dumps(r) + "\n" for r in records))
    time.sleep(0.05)  # older than the runs seeded after it: the page opens on theirs
    return data / "train.jsonl"


THUMBNAILS = """(sel) => [...document.querySelectorAll(sel + ' [role=gridcell] img')].map(img => {
  const canvas = document.createElement('canvas');
  canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
  const ctx = canvas.getContext('2d');
  ctx.drawImage(img, 0, 0);
  const [r, g, b] = ctx.getImageData(img.naturalWidth >> 1, img.naturalHeight >> 1, 1, 1).data;
  return {width: img.naturalWidth, centre: [r, g, b], src: img.src.slice(0, 22)};
})"""


def check_thumbnails(page, dataset: Path) -> None:
    """An image dataset's preview and the vision run's logged completions show each row's
    picture: a person sees the red square (the thumbnail's pixels are read back from the page)."""
    page.get_by_role("tab", name="Set up").click()
    page.get_by_label("Dataset").first.fill(str(dataset))
    page.get_by_role("button", name="Preview").click()
    expect(page.locator("#preview")).to_contain_text("how many squares? (2)")
    page.wait_for_function("(sel) => document.querySelectorAll(sel + ' [role=gridcell] img').length == 3",
                           arg="#preview")
    shown = page.evaluate(THUMBNAILS, "#preview")
    assert all(t["src"] == "data:image/png;base64," and t["width"] == 40 for t in shown), shown
    assert all(t["centre"] == [220, 30, 30] for t in shown), shown  # the red square, as drawn

    page.get_by_role("tab", name="Train and watch").click()
    page.locator("#run-choice input").click()
    page.get_by_role("option", name="vision", exact=True).click()
    page.get_by_role("tab", name="Completions").click()
    page.locator("#browse").click()
    expect(page.locator("#browse-message")).to_contain_text("2 of 2")
    page.wait_for_function("(sel) => document.querySelectorAll(sel + ' [role=gridcell] img').length == 2",
                           arg="#completions")
    shown = page.evaluate(THUMBNAILS, "#completions")
    assert all(t["centre"] == [220, 30, 30] for t in shown), shown


def test_smoothing_slider_draws_the_smoothed_reward(vision_run, agent_run, noisy, open_page):
    """Moving the smoothing slider redraws the reward line as the smoothed rewards of
    metrics.jsonl (drawn points mapped back through the axes), and back to the raw ones at 0.
    The run's loss is constant: smoothed, it wobbles in its last digits and must still draw
    (it once sent the axis ticks into an endless loop that stopped every redraw). Then a run
    with tools: its trajectories as turns (check_trajectory_turns); and images as thumbnails
    (check_thumbnails)."""
    page = open_page(1280)
    page.get_by_role("tab", name="Train and watch").click()
    page.wait_for_function("""() => { const l = document.querySelector('#curve-reward polyline.line');
                                      return l && l.getAttribute('points').trim().split(/\\s+/).length == 30; }""")

    def reward_line():
        shown = drawn(page, "reward")
        points = shown["lines"]["noisy|reward"]["points"]
        assert [round(step) for step, _ in points] == list(range(1, 31))
        return [value for _, value in points], (shown["ymax"] - shown["ymin"]) * 0.002

    values, tolerance = reward_line()
    assert values == pytest.approx(ZIGZAG, abs=tolerance)

    number, knob = page.locator("#smoothing input[type=number]"), page.locator("#smoothing input[type=range]")
    for weight in (0.6, 0.99, 0.0):
        expected = ema(ZIGZAG, weight)
        if weight == 0.99:  # the slider's knob moved to its end with the keyboard
            knob.press("End")
        else:  # a value typed into the slider's box
            number.fill(str(weight))
            number.press("Enter")
        deadline = time.time() + 10  # the redraw follows the slider's change event
        values, tolerance = reward_line()
        while values != pytest.approx(expected, abs=tolerance) and time.time() < deadline:
            page.wait_for_timeout(100)
            values, tolerance = reward_line()
        assert values == pytest.approx(expected, abs=tolerance), weight
        loss = drawn(page, "loss")["lines"]["noisy|loss"]["points"]
        assert [value for _, value in loss] == pytest.approx([0.1] * 30, abs=1e-6)
    assert max(abs(a - b) for a, b in zip(ema(ZIGZAG, 0.6), ZIGZAG)) > 0.3  # smoothed lines are other lines

    check_trajectory_turns(page)  # issue 23, on the same page (one app start fewer)
    check_thumbnails(page, vision_run)  # issue 24, likewise


@pytest.fixture
def tuned(work_dir, demo_run):
    """The trained tiny-cpu demo run, in the app's work directory."""
    config, _ = demo_run
    shutil.copytree(config.output_dir, work_dir / "runs" / "tuned")


def test_workbench_base_model_groups_and_use_tab_eval_and_merge(tuned, open_page, work_dir, tmp_path):
    """The workbench's base-model groups show each completion's reward and advantage; the Use
    tab's eval shows base vs adapter, and the merge says where the model went (or why not)."""
    page = open_page(1280)

    page.get_by_role("tab", name="Try rewards").click()
    page.locator("#wb-sample").click()
    message = page.locator("#wb-sample-message")
    expect(message).to_contain_text("mean reward", timeout=90_000)
    rows = table_cells(page, "#wb-sample-table")
    header = page.evaluate("""() => [...document.querySelectorAll('#wb-sample-table thead th')].map(
        th => th.innerText.trim()).filter(t => t)""")
    assert header[:7] == ["row", "prompt", "answer", "completion", "arith_answer", "total", "advantage"]
    assert len(rows) == 16  # 2 rows x G = 8
    for _, _, answer, completion, reward, total, _ in (r[:7] for r in rows):
        assert float(reward) == (1.0 if completion.strip() == answer else 0.0) == float(total)
    mean = sum(float(r[5]) for r in rows) / len(rows)
    expect(message).to_contain_text(f"mean reward {mean:.3f}")
    page.locator("#wb-score").click()  # the pasted completions too, for the screenshot
    expect(page.locator("#wb-message")).to_contain_text("scored as one group", timeout=60_000)
    settled(page, "#wb-table")
    screenshot(page, "app-workbench.png", tmp_path, full_page=True)

    page.get_by_role("tab", name="Use the adapter").click()
    # The run was there when the app started: the adapter picker is filled all the same.
    expect(page.locator("#use-adapter input")).to_have_value("final")
    page.locator("#eval-prompts input").fill("8")
    page.locator("#eval").click()
    expect(page.locator("#eval-message")).to_contain_text("final on 8 prompts", timeout=90_000)
    expect(page.locator("#eval-message")).not_to_contain_text("training prompts")  # the demo holds rows out
    expect(page.locator("#eval-examples")).to_contain_text("with the adapter")
    metric_rows = {row[0]: row[1:] for row in table_cells(page, "#eval-table")}
    base, adapter = (float(v) for v in metric_rows["rewards/arith_answer/mean"][:2])
    assert adapter > base, f"the trained demo's adapter should score above the base model: {base} -> {adapter}"

    # A run that gets its adapter while the page is open: the picker lists it once the tab is opened again.
    (work_dir / "runs" / "later").mkdir()
    shutil.copy(work_dir / "runs" / "tuned" / "config.yaml", work_dir / "runs" / "later" / "config.yaml")
    page.locator("#use-run input").fill("later")
    page.locator("#use-run input").press("Enter")
    expect(page.locator("#use-adapter input")).to_have_value("")
    shutil.copytree(work_dir / "runs" / "tuned" / "final", work_dir / "runs" / "later" / "final")
    page.get_by_role("tab", name="Runs").click()
    page.get_by_role("tab", name="Use the adapter").click()
    expect(page.locator("#use-adapter input")).to_have_value("final")
    page.locator("#use-run input").fill("tuned")
    page.locator("#use-run input").press("Enter")
    expect(page.locator("#use-adapter input")).to_have_value("final")

    page.locator("#merge-dir input, #merge-dir textarea").first.fill("my-model")
    page.locator("#merge").click()
    out = work_dir / "exports" / "my-model"
    expect(page.locator("#merge-message")).to_contain_text(f"Saved the merged model to {out}", timeout=90_000)
    assert (out / "config.json").is_file()
    page.locator("#merge").click()
    expect(page.locator("#merge-message")).to_contain_text("already exists and is not empty")
    screenshot(page, "app-use.png", tmp_path, full_page=True)
