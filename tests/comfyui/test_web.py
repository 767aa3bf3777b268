"""The pack's web extension (web/js/) and the reference workflows in a real browser against the real ComfyUI
running this pack: the full reference workflow is loaded through the UI and queued; the token strip on
RefDiffGenerativeMap and the proposal gallery on RefDiffFuseSelect appear with one thumbnail per word / proposal;
clicking a word and a proposal sets the nodes' token_override and pin_index, and the next run uses them (checked
in /history). With the extension absent or throwing, the same workflow still runs with its defaults. Every
reference workflow, run from the UI on the example image, keeps its layout: no node grows, no two nodes overlap,
every preview and view lies inside its node (at 100 % and at 42 % zoom).

Needs Chromium (Debian: apt-get install chromium; or REFDIFF_CHROMIUM=/path/to/chrome) and Python playwright
(pip install playwright; no browser download: the system Chromium is used). Screenshots of the extension go to
$REFDIFF_ARTIFACTS/web (default: .artifacts/web in the repository); the layout screenshots go to the session's
temporary folder (printed at the end) and are copied to $REFDIFF_SCREENS when that is set.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from build_workflows import GROW_H, IMAGE, NODE_W, TEMPLATES
from comfy_helpers import FAST, FULL_SIZE_ONLY, PACK_LINK, REPO, SCREENS, TEST_IMAGE, TEST_MODELS, TIMINGS
from PIL import Image

CHROMIUM = os.environ.get("REFDIFF_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser") or ""
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(os.environ.get("REFDIFF_ARTIFACTS") or REPO / ".artifacts") / "web"
WORKFLOW = REPO / "workflows" / "ref-diff.json"
TEXT_WORDS = ["the", "horse", "on", "the", "left"]  # the reference workflow's text, word by word

# Widget values that point the UI workflow at the test models and keep it fast (as comfy_helpers.FAST).
# box_nms_thresh 0.99 keeps the random SAM's distinct masks: several proposals to rank and pin.
UI_SETTINGS = {
    "CheckpointLoaderSimple": {"ckpt_name": TEST_MODELS["ckpt_name"]},
    "LoadImage": {"image": TEST_IMAGE},
    "RefDiffSAMLoader": {"sam_name": TEST_MODELS["sam_name"]},
    "RefDiffSAM3Loader": {"sam3_name": TEST_MODELS["sam3_name"]},
    "RefDiffCLIPLoader": {"clip_name": TEST_MODELS["clip_name"]},
    "RefDiffPrepareImage": {"size": 128},
    "RefDiffSAMProposals": {"points_per_side": 8, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0,
                            "post_filter": "none", "box_nms_thresh": 0.99},
}
# The layout runs: the workflows as shipped (their own example image, which the pack copied into the input
# folder), with the test models and the fast settings.
LAYOUT_SETTINGS = {**{k: dict(v) for k, v in FAST.items()},
                   **{k: dict(v) for k, v in UI_SETTINGS.items() if k != "LoadImage"}}
LAYOUT_ZOOM = 0.42  # below the canvas's low-quality threshold: nodes drawn without widgets, DOM views kept


def browser_missing() -> str:
    """Why the browser tests cannot run here ('' when they can)."""
    if importlib.util.find_spec("playwright") is None:
        return "Python playwright is not installed (pip install playwright; no browser download needed)"
    if not CHROMIUM or not Path(CHROMIUM).is_file():
        return "Chromium not found (apt-get install chromium, or set REFDIFF_CHROMIUM to a Chrome/Chromium binary)"
    return ""


SKIP_BROWSER = browser_missing()
pytestmark = pytest.mark.slow


@pytest.fixture(scope="session", autouse=True)
def browser_available(request):
    """Skip this module, saying why on the terminal, before ComfyUI is started for nothing."""
    if SKIP_BROWSER:
        plugins = request.config.pluginmanager
        reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
        if reporter is not None and capture is not None:
            with capture.global_and_fixture_disabled():
                reporter.write_line(f"\ntests/comfyui/test_web.py skipped: {SKIP_BROWSER}")
        pytest.skip(SKIP_BROWSER)

# ------------------------------------------------------------------------------------------ page helpers
JS_APP = "window.comfyAPI.app.app"
JS_READY = ("() => !!(window.comfyAPI?.app?.app?.graph && window.comfyAPI?.api?.api "
            "&& window.LiteGraph?.registered_node_types?.RefDiffGenerativeMap)")
JS_LOAD = f"""async (wf) => {{
  const app = {JS_APP};
  await app.loadGraphData(wf, true, true, null, {{showMissingNodesDialog: false, showMissingModelsDialog: false}});
}}"""
JS_SET_WIDGETS = f"""(values) => {{
  const app = {JS_APP};
  for (const node of app.graph.nodes) {{
    for (const [name, value] of Object.entries(values[node.comfyClass] ?? {{}})) {{
      const widget = node.widgets.find((w) => w.name === name);
      if (!widget) throw new Error(node.comfyClass + " has no widget " + name);
      widget.value = value;
    }}
  }}
}}"""
JS_WIDGET = f"""([cls, name]) => {{
  const node = {JS_APP}.graph.nodes.find((n) => n.comfyClass === cls);
  return node.widgets.find((w) => w.name === name)?.value ?? null;
}}"""
JS_LISTEN = """() => {
  const api = window.comfyAPI.api.api;
  window.__refdiffRuns = [];
  for (const kind of ["execution_success", "execution_error", "execution_interrupted"]) {
    api.addEventListener(kind, (e) => window.__refdiffRuns.push({kind, id: e.detail.prompt_id,
      message: e.detail.exception_message ?? null}));
  }
}"""
JS_QUEUE = f"async () => {{ await {JS_APP}.queuePrompt(0, 1); }}"
JS_CENTER = f"""(cls) => {{
  const app = {JS_APP};
  const node = app.graph.nodes.find((n) => n.comfyClass === cls);
  app.canvas.ds.scale = 1;
  app.canvas.centerOnNode(node);
  app.canvas.setDirty(true, true);
  return String(node.id);
}}"""
JS_NODE_BOX = f"""(cls) => {{
  const app = {JS_APP};
  const node = app.graph.nodes.find((n) => n.comfyClass === cls);
  const rect = app.canvas.canvas.getBoundingClientRect();
  const title = window.LiteGraph.NODE_TITLE_HEIGHT, scale = app.canvas.ds.scale;
  const [x, y] = app.canvas.ds.convertOffsetToCanvas([node.pos[0], node.pos[1] - title]);
  return {{x: Math.max(0, rect.left + x - 6), y: Math.max(0, rect.top + y - 6),
           width: node.size[0] * scale + 12, height: (node.size[1] + title) * scale + 12}};
}}"""
JS_TOKENS = """(nodeId) => [...document.querySelectorAll(
    `.refdiff-panel[data-refdiff-view="tokens"][data-node-id="${nodeId}"] .refdiff-token`)].map((e) => ({
  word: e.dataset.word, position: Number(e.dataset.position), override: e.dataset.override,
  root: e.classList.contains("refdiff-root"), wanted: e.classList.contains("refdiff-wanted"),
  loaded: e.querySelector("img").complete && e.querySelector("img").naturalWidth > 0,
  visible: e.getBoundingClientRect().width > 0}))"""
JS_PROPOSALS = """(nodeId) => [...document.querySelectorAll(
    `.refdiff-panel[data-refdiff-view="proposals"][data-node-id="${nodeId}"] .refdiff-proposal`)].map((e) => ({
  index: Number(e.dataset.index), rank: Number(e.dataset.rank), chosen: e.classList.contains("refdiff-chosen"),
  wanted: e.classList.contains("refdiff-wanted"), text: e.innerText,
  loaded: e.querySelector("img").complete && e.querySelector("img").naturalWidth > 0,
  visible: e.getBoundingClientRect().width > 0}))"""


def shot(page, name: str, node_class: str | None = None) -> Path:
    """Save a screenshot (of one node when node_class is given) into the artifacts folder."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    clip = page.evaluate(JS_NODE_BOX, node_class) if node_class else None
    page.screenshot(path=str(path), clip=clip)
    return path


def open_ui(browser, url: str, route=None, workflow: Path = WORKFLOW, settings: dict = UI_SETTINGS):
    """A page of the ComfyUI frontend, ready, with a reference workflow loaded and set to the test models."""
    page = browser.new_page(viewport={"width": 1600, "height": 1100})
    page.refdiff_log = []
    page.on("console", lambda m: page.refdiff_log.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: page.refdiff_log.append(f"pageerror: {e}"))
    if route is not None:
        route(page)
    page.goto(url)
    page.wait_for_function(JS_READY, timeout=120_000)
    page.evaluate(JS_LOAD, json.loads(workflow.read_text(encoding="utf-8")))
    page.evaluate(JS_SET_WIDGETS, settings)
    page.evaluate(JS_LISTEN)
    return page


def queue_and_wait(page, comfy, timeout: float = 600) -> tuple[str, dict]:
    """Queue the page's workflow through the UI; wait for the run to end; its prompt id and /history entry."""
    before = page.evaluate("() => window.__refdiffRuns.length")
    page.evaluate(JS_QUEUE)
    page.wait_for_function(f"() => window.__refdiffRuns.length > {before}", timeout=timeout * 1000)
    run = page.evaluate(f"() => window.__refdiffRuns[{before}]")
    assert run["kind"] == "execution_success", (run, page.refdiff_log[-20:])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        history = comfy.get(f"/history/{run['id']}")
        if run["id"] in history:
            return run["id"], history[run["id"]]
        time.sleep(0.25)
    raise AssertionError(f"no history entry for {run['id']}")


def show_node(page, node_class: str) -> str:
    """Centre the canvas on a node at scale 1 and wait until its DOM widgets are placed; returns its id."""
    node_id = page.evaluate(JS_CENTER, node_class)
    page.wait_for_timeout(400)  # a few frames: the DOM widgets follow the canvas when it redraws
    return node_id


def node_id_of(page, node_class: str) -> str:
    return page.evaluate(f"(cls) => String({JS_APP}.graph.nodes.find((n) => n.comfyClass === cls).id)", node_class)


def table_selected(text: str) -> int:
    """The proposal index the score table marks as selected (-1 when none)."""
    for line in text.splitlines():
        if "<- selected" in line:
            return int(line.split("proposal")[1].split(",")[0])
    return -1


def saved_pixels(comfy_env, history: dict, node_id: str) -> np.ndarray:
    item = history["outputs"][node_id]["images"][0]
    path = comfy_env.base / item.get("type", "output") / item.get("subfolder", "") / item["filename"]
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).copy()


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def browser(comfy):
    from playwright.sync_api import sync_playwright

    # no first-run tutorial or version popup over the canvas
    import requests

    for key, value in (("Comfy.TutorialCompleted", True), ("Comfy.Notification.ShowVersionUpdates", False)):
        requests.post(f"{comfy.url}/settings/{key}", json=value, timeout=30).raise_for_status()
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


# ------------------------------------------------------------------------------------------ tests
def test_extension_is_served(comfy):
    listed = comfy.get("/extensions")
    ours = sorted(e for e in listed if f"/{PACK_LINK}/" in e)
    assert ours == [f"/extensions/{PACK_LINK}/js/refdiff.js", f"/extensions/{PACK_LINK}/js/refdiff_views.js"]


def test_token_strip_and_gallery_drive_the_next_run(browser, comfy, comfy_env):
    page = open_ui(browser, comfy.url)
    start = time.perf_counter()
    first_id, first = queue_and_wait(page, comfy)
    TIMINGS["browser: ref-diff queued from the UI"] = time.perf_counter() - start
    map_id, fuse_id = node_id_of(page, "RefDiffGenerativeMap"), node_id_of(page, "RefDiffFuseSelect")
    table_id = node_id_of(page, "PreviewAny")
    strip = first["outputs"][map_id]["refdiff_tokens"][0]
    gallery = first["outputs"][fuse_id]["refdiff_proposals"][0]
    n_proposals = int(first["outputs"][table_id]["text"][0].split("image 0: ")[1].split(" proposals")[0])
    assert strip["root"]["label"] == "horse" and strip["root"]["source"] == "parser"
    assert gallery["count"] == n_proposals >= 2, "the test needs several proposals to pin another one"
    assert gallery["chosen"] == table_selected(first["outputs"][table_id]["text"][0]) >= 0

    # the token strip: one thumbnail per word of the text, the root marked, every image fetched through /view
    show_node(page, "RefDiffGenerativeMap")
    page.wait_for_function(f"(id) => ({JS_TOKENS})(id).length > 0 && ({JS_TOKENS})(id).every((t) => t.loaded)",
                           arg=map_id, timeout=30_000)
    tokens = page.evaluate(JS_TOKENS, map_id)
    assert [t["word"] for t in tokens] == TEXT_WORDS
    assert all(t["visible"] for t in tokens)
    assert [t["word"] for t in tokens if t["root"]] == ["horse"]
    shot(page, "01_token_strip_after_run", "RefDiffGenerativeMap")

    # the gallery: one thumbnail per proposal, best fused score first, the chosen one highlighted
    show_node(page, "RefDiffFuseSelect")
    page.wait_for_function(f"(id) => ({JS_PROPOSALS})(id).length > 0 && ({JS_PROPOSALS})(id).every((p) => p.loaded)",
                           arg=fuse_id, timeout=30_000)
    cells = page.evaluate(JS_PROPOSALS, fuse_id)
    assert len(cells) == n_proposals
    assert [c["rank"] for c in cells] == list(range(1, n_proposals + 1))
    assert sorted(c["index"] for c in cells) == list(range(n_proposals))
    fused = {item["index"]: item["fused"] for item in gallery["items"]}
    assert [fused[c["index"]] for c in cells] == sorted(fused.values(), reverse=True)
    assert [c["index"] for c in cells if c["chosen"]] == [gallery["chosen"]]
    best = next(c for c in cells if c["chosen"])
    assert f"p{best['index']}" in best["text"] and "s " in best["text"] and "G " in best["text"]
    shot(page, "02_gallery_after_run", "RefDiffFuseSelect")

    # click a word and a proposal: the nodes' widget values change, marked "queue to apply"
    show_node(page, "RefDiffGenerativeMap")
    page.locator(f'.refdiff-panel[data-node-id="{map_id}"] .refdiff-token[data-word="left"]').click()
    assert page.evaluate(JS_WIDGET, ["RefDiffGenerativeMap", "token_override"]) == "left"
    assert [t["word"] for t in page.evaluate(JS_TOKENS, map_id) if t["wanted"]] == ["left"]
    shot(page, "03_token_clicked", "RefDiffGenerativeMap")
    show_node(page, "RefDiffFuseSelect")
    pinned = cells[-1]["index"]  # the lowest-ranked proposal
    assert pinned != gallery["chosen"]
    page.locator(f'.refdiff-panel[data-node-id="{fuse_id}"] .refdiff-proposal[data-index="{pinned}"]').click()
    assert page.evaluate(JS_WIDGET, ["RefDiffFuseSelect", "pin_index"]) == pinned
    assert [c["index"] for c in page.evaluate(JS_PROPOSALS, fuse_id) if c["wanted"]] == [pinned]
    shot(page, "04_proposal_clicked", "RefDiffFuseSelect")

    # the next run uses both: c is the map of "left", the pinned proposal is the output mask
    second_id, second = queue_and_wait(page, comfy)
    assert second_id != first_id
    strip2 = second["outputs"][map_id]["refdiff_tokens"][0]
    gallery2 = second["outputs"][fuse_id]["refdiff_proposals"][0]
    assert strip2["root"] == {"label": "left", "position": 5, "token": "left</w>", "source": "token_override",
                              "word": 4}
    assert strip2["override"] == "left"
    assert gallery2["chosen"] == pinned and gallery2["pinned"] and gallery2["pin_index"] == pinned
    if n_proposals <= 5:  # the score table lists the top_k (5) proposals
        assert table_selected(second["outputs"][table_id]["text"][0]) == pinned
    save_id = next(k for k, v in second["prompt"][2].items() if v["class_type"] == "SaveImage")
    assert not np.array_equal(saved_pixels(comfy_env, first, save_id), saved_pixels(comfy_env, second, save_id))
    assert not np.array_equal(saved_pixels(comfy_env, first, map_id), saved_pixels(comfy_env, second, map_id))
    s_g1 = {i["index"]: i["generative"] for i in gallery["items"]}
    s_g2 = {i["index"]: i["generative"] for i in gallery2["items"]}
    assert s_g1 != s_g2  # s_G is computed on the new c

    # the views show the new run: "left" is the root, the pinned proposal is the chosen one
    show_node(page, "RefDiffGenerativeMap")
    tokens = page.evaluate(JS_TOKENS, map_id)
    assert [t["word"] for t in tokens if t["root"]] == ["left"] and not any(t["wanted"] for t in tokens)
    shot(page, "05_token_strip_rerun", "RefDiffGenerativeMap")
    show_node(page, "RefDiffFuseSelect")
    cells = page.evaluate(JS_PROPOSALS, fuse_id)
    assert [c["index"] for c in cells if c["chosen"]] == [pinned] and not any(c["wanted"] for c in cells)
    shot(page, "06_gallery_rerun", "RefDiffFuseSelect")

    # back to the method's own choice: the parse's root word and "by score"
    page.locator(f'.refdiff-panel[data-node-id="{fuse_id}"] .refdiff-reset').click()
    assert page.evaluate(JS_WIDGET, ["RefDiffFuseSelect", "pin_index"]) == -1
    show_node(page, "RefDiffGenerativeMap")
    page.locator(f'.refdiff-panel[data-node-id="{map_id}"] .refdiff-token[data-word="horse"]').click()
    assert page.evaluate(JS_WIDGET, ["RefDiffGenerativeMap", "token_override"]) == ""
    shot(page, "07_whole_graph")
    assert not [line for line in page.refdiff_log if "[RefDiff]" in line], page.refdiff_log
    page.close()


def test_a_word_not_in_the_text_is_refused_by_name(browser, comfy):
    page = open_ui(browser, comfy.url)
    page.evaluate(JS_SET_WIDGETS, {"RefDiffGenerativeMap": {"token_override": "zebra"}})
    page.evaluate(JS_QUEUE)
    page.wait_for_function("() => window.__refdiffRuns.length > 0", timeout=600_000)
    run = page.evaluate("() => window.__refdiffRuns[0]")
    assert run["kind"] == "execution_error"
    assert "token_override 'zebra' is not a word of the text 'the horse on the left'" in run["message"]
    page.close()


def _throwing_extension(page) -> None:
    page.route(f"**/extensions/{PACK_LINK}/**", lambda route: route.fulfill(
        status=200, content_type="text/javascript", body="throw new Error('refdiff web extension broken');"))


def _absent_extension(page) -> None:
    """The server's extension list without this pack's files: what the frontend sees without web/."""

    def handle(route):
        response = route.fetch()
        listed = [e for e in response.json() if f"/{PACK_LINK}/" not in e]
        route.fulfill(response=response, json=listed)

    page.route("**/api/extensions", handle)


@pytest.mark.parametrize("failure", ["throwing", "absent"])
def test_workflow_runs_without_the_extension(failure, browser, comfy):
    page = open_ui(browser, comfy.url, _throwing_extension if failure == "throwing" else _absent_extension)
    map_id, fuse_id = node_id_of(page, "RefDiffGenerativeMap"), node_id_of(page, "RefDiffFuseSelect")
    assert page.evaluate(JS_WIDGET, ["RefDiffGenerativeMap", "token_override"]) == ""
    assert page.evaluate(JS_WIDGET, ["RefDiffFuseSelect", "pin_index"]) == -1
    if failure == "throwing":
        assert any("refdiff web extension broken" in line for line in page.refdiff_log), page.refdiff_log
    comfy.free()  # run every node again, with the extension missing
    _, history = queue_and_wait(page, comfy)
    strip = history["outputs"][map_id]["refdiff_tokens"][0]
    gallery = history["outputs"][fuse_id]["refdiff_proposals"][0]
    assert strip["root"]["label"] == "horse" and strip["root"]["source"] == "parser"  # the defaults
    assert not gallery["pinned"] and gallery["chosen"] == max(gallery["items"], key=lambda i: i["fused"])["index"]
    show_node(page, "RefDiffFuseSelect")
    assert page.evaluate("() => document.querySelectorAll('.refdiff-panel').length") == 0
    assert page.evaluate(f"() => {JS_APP}.graph.nodes.every((n) => !n.refdiffView)")
    # the node's own preview image still shows
    page.wait_for_function(f"() => ({JS_APP}.graph.getNodeById({fuse_id}).imgs ?? []).length > 0", timeout=30_000)
    shot(page, f"08_without_extension_{failure}", "RefDiffFuseSelect")
    page.close()



# ------------------------------------------------------------------------------------------ layout after a run
JS_SHOW_NODE = f"""([id, scale]) => {{
  const app = {JS_APP};
  app.canvas.ds.scale = scale;
  app.canvas.centerOnNode(app.graph.getNodeById(id));
  app.canvas.setDirty(true, true);
}}"""
JS_SET_VIEW = f"""(ds) => {{
  const app = {JS_APP};
  app.canvas.ds.scale = ds.scale;
  app.canvas.ds.offset = [...ds.offset];
  app.canvas.setDirty(true, true);
}}"""
# Every node's frame (canvas units, the title bar included) and widgets; for the DOM widgets on screen, their
# element's box and the node's box, in page pixels.
JS_LAYOUT = f"""() => {{
  const app = {JS_APP};
  const T = window.LiteGraph.NODE_TITLE_HEIGHT, ds = app.canvas.ds;
  const canvasRect = app.canvas.canvas.getBoundingClientRect();
  const screenBox = (x, y, w, h) => {{
    const [sx, sy] = ds.convertOffsetToCanvas([x, y]);
    return [canvasRect.left + sx, canvasRect.top + sy, w * ds.scale, h * ds.scale];
  }};
  return app.graph.nodes.map((n) => ({{
    id: n.id, type: n.type, title: n.title, pos: [...n.pos], size: [...n.size], T,
    visible: app.canvas.isNodeVisible(n), images: (n.imgs ?? []).length,
    screen: screenBox(n.pos[0], n.pos[1] - T, n.size[0], n.size[1] + T),
    widgets: (n.widgets ?? []).map((w) => {{
      const el = w.element, r = el?.isConnected ? el.getBoundingClientRect() : null;
      const shown = !!r && r.width > 0 && r.height > 0 && getComputedStyle(el).display !== "none"
        && getComputedStyle(el.parentElement ?? el).display !== "none";
      return {{name: w.name, type: w.type, y: w.y, h: w.computedHeight ?? null,
               dom: shown ? [r.left, r.top, r.width, r.height] : null}};
    }}),
  }}));
}}"""
JS_VIEW_HEIGHTS = f"""async () => {{
  const m = await import("/extensions/{PACK_LINK}/js/refdiff_views.js");
  const items = Array.from({{length: 32}}, (_, i) => ({{index: i}}));
  return {{tokens: m.stripHeight([{{}}]), gallery: m.galleryHeight([{{items, more: 0}}], {NODE_W})}};
}}"""


def overlap(a: list[float], b: list[float]) -> float:
    """Area shared by two [x, y, w, h] boxes."""
    w = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    h = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return max(0.0, w) * max(0.0, h)


def inside(inner: list[float], outer: list[float], slack: float = 1.5) -> bool:
    return (inner[0] >= outer[0] - slack and inner[1] >= outer[1] - slack
            and inner[0] + inner[2] <= outer[0] + outer[2] + slack
            and inner[1] + inner[3] <= outer[1] + outer[3] + slack)


def frame(node: dict) -> list[float]:
    return [node["pos"][0], node["pos"][1] - node["T"], node["size"][0], node["size"][1] + node["T"]]


def layout_problems(nodes: list[dict], saved: dict[int, dict]) -> list[str]:
    """What is wrong with the canvas after a run: nodes that grew past their saved size, nodes that overlap,
    widgets (previews included) that reach past their node's body, DOM views drawn outside their node."""
    problems = []
    for n in nodes:
        if [round(v) for v in n["size"]] != saved[n["id"]]["size"]:
            problems.append(f"{n['title']!r} grew from {saved[n['id']]['size']} to {[round(v) for v in n['size']]}")
        for w in n["widgets"]:
            if w["h"] is not None and (w["y"] < 0 or w["y"] + w["h"] > n["size"][1] + 0.5):
                problems.append(f"{n['title']!r}: widget {w['name']} at {w['y']}+{w['h']} past {n['size'][1]}")
            if w["dom"] is not None and n["visible"] and not inside(w["dom"], n["screen"]):
                problems.append(f"{n['title']!r}: {w['name']} drawn at {w['dom']} outside the node at {n['screen']}")
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            if overlap(frame(a), frame(b)) > 0:
                problems.append(f"{a['title']!r} overlaps {b['title']!r}")
    return problems


@pytest.fixture(scope="module")
def screens(comfy_env) -> Path:
    """Where the layout screenshots go (printed at the end of the session; copied to $REFDIFF_SCREENS)."""
    folder = comfy_env.root / "screens"
    folder.mkdir(exist_ok=True)
    SCREENS.append(folder)
    return folder


def save_screen(page, folder: Path, name: str) -> Path:
    path = folder / f"{name}.png"
    page.screenshot(path=str(path))
    if os.environ.get("REFDIFF_SCREENS"):
        copy = Path(os.environ["REFDIFF_SCREENS"])
        copy.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, copy / path.name)
    return path


def settle_every_node(page, nodes: list[dict], scale: float = 1.0) -> list[dict]:
    """Show each node once at ``scale`` (the canvas adds a node's previews when it draws it); the layout seen
    with each node in view."""
    seen = []
    for n in nodes:
        page.evaluate(JS_SHOW_NODE, [n["id"], scale])
        page.wait_for_timeout(250)
        seen.append(next(m for m in page.evaluate(JS_LAYOUT) if m["id"] == n["id"]))
    return seen


def test_layout_budget_matches_the_views(browser, comfy):
    """The heights the builder gives the token strip and the gallery are the extension's largest views."""
    page = open_ui(browser, comfy.url)
    heights = page.evaluate(JS_VIEW_HEIGHTS)
    margins = 2 * 10  # the DOM widget's margin above and below
    assert heights["tokens"] + margins == GROW_H["tokens"]
    assert heights["gallery"] + margins == GROW_H["gallery"]
    page.close()


@pytest.mark.parametrize("name", sorted(set(TEMPLATES) - FULL_SIZE_ONLY))
def test_workflow_layout_after_a_run(name, browser, comfy, comfy_env, screens):
    """Loaded from its file and run on the example image: nothing grows, overlaps, or is drawn outside its node,
    with every node in view at 100 % and at 42 % zoom; screenshots at the workflow's own view and zoomed out."""
    path = REPO / "workflows" / f"{name}.json"
    workflow = json.loads(path.read_text(encoding="utf-8"))
    saved = {n["id"]: n for n in workflow["nodes"]}
    page = open_ui(browser, comfy.url, workflow=path, settings=LAYOUT_SETTINGS)
    assert page.evaluate(JS_WIDGET, ["LoadImage", "image"]) == IMAGE
    comfy.free()  # every node runs, so every preview is sent
    start = time.perf_counter()
    queue_and_wait(page, comfy)
    TIMINGS[f"browser layout: {name} run from the UI"] = time.perf_counter() - start
    nodes = page.evaluate(JS_LAYOUT)
    with_previews = [n["id"] for n in nodes if n["type"] in ("PreviewImage", "SaveImage")]
    seen = settle_every_node(page, nodes)
    for node_id in with_previews:  # the run's images arrived and are drawn in their nodes
        page.wait_for_function(f"() => ({JS_APP}.graph.getNodeById({node_id}).imgs ?? []).length > 0",
                               timeout=30_000)
    seen = settle_every_node(page, nodes)  # again, now that every preview is there
    page.evaluate(JS_SET_VIEW, workflow["extra"]["ds"])
    page.wait_for_timeout(500)
    save_screen(page, screens, f"{name}_after_run")
    problems = layout_problems(seen, saved)
    zoomed = settle_every_node(page, nodes, LAYOUT_ZOOM)
    problems += [f"at {LAYOUT_ZOOM:.0%}: {p}" for p in layout_problems(zoomed, saved)]
    focus = next((n for n in nodes if n["type"] in ("RefDiffFuseSelect", "RefDiffSegment")), nodes[-1])
    page.evaluate(JS_SHOW_NODE, [focus["id"], workflow["extra"]["ds"]["scale"]])
    page.wait_for_timeout(500)
    save_screen(page, screens, f"{name}_results")
    page.evaluate(JS_SHOW_NODE, [focus["id"], LAYOUT_ZOOM])
    page.wait_for_timeout(500)
    save_screen(page, screens, f"{name}_zoom42")
    assert not problems, "\n".join(problems)
    note = next(n for n in workflow["nodes"] if n["type"] == "MarkdownNote")
    assert TEMPLATES[name].description in note["widgets_values"][0]
    page.close()


def test_gallery_stays_inside_its_node_when_run_zoomed_out(browser, comfy, screens):
    """Queued while the canvas shows the graph at 42 %: the views arrive in low-quality drawing and still lie
    inside their nodes, which keep their size."""
    saved = {n["id"]: n for n in json.loads(WORKFLOW.read_text(encoding="utf-8"))["nodes"]}
    page = open_ui(browser, comfy.url, workflow=WORKFLOW, settings=LAYOUT_SETTINGS)
    fuse_id = int(node_id_of(page, "RefDiffFuseSelect"))
    page.evaluate(JS_SHOW_NODE, [fuse_id, LAYOUT_ZOOM])
    comfy.free()
    queue_and_wait(page, comfy)
    page.wait_for_function(f"(id) => ({JS_PROPOSALS})(id).length > 0 && ({JS_PROPOSALS})(id).every((p) => p.loaded)",
                           arg=str(fuse_id), timeout=30_000)
    page.wait_for_timeout(500)
    nodes = page.evaluate(JS_LAYOUT)
    save_screen(page, screens, "ref-diff_run_at_zoom42")
    fuse = next(n for n in nodes if n["id"] == fuse_id)
    gallery = next(w for w in fuse["widgets"] if w["name"] == "refdiff_proposals")
    assert gallery["dom"] is not None and inside(gallery["dom"], fuse["screen"]), (gallery, fuse["screen"])
    problems = layout_problems([n for n in nodes if n["visible"]], saved)
    assert not problems, "\n".join(problems)
    page.close()
