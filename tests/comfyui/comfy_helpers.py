"""Shared pieces of the ComfyUI tests: where things are, a small HTTP client, and graph helpers that point the
reference API workflows at the test models and a small image and add a MaskToImage + SaveImage pair behind
every MASK output so its shape can be checked."""
from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
COMFYUI_PATH = os.environ.get("COMFYUI_PATH", "")
SKIP_REASON = ("COMFYUI_PATH is not set; these tests need a ComfyUI checkout: "
               "COMFYUI_PATH=/path/to/ComfyUI python -m pytest tests/comfyui")
PACK_LINK = "comfyui-refdiff"
TEST_IMAGE = "refdiff_test.png"
TEST_IMAGE_SIZE = (53, 77)  # H, W: odd, not square
TIMINGS: dict[str, float] = {}
SCREENS: list[Path] = []  # folders the browser tests saved screenshots into, listed at the end of the session


def library_on_path() -> None:
    """Make ``import refdiff`` work in a script run by ComfyUI's Python the way the pack's __init__.py does:
    when the library is not installed, the repository root is appended to sys.path (appended, so that the
    repository's ``nodes`` package never shadows ComfyUI's ``nodes`` module)."""
    import importlib.util
    import sys

    if importlib.util.find_spec("refdiff") is None and str(REPO) not in sys.path:
        sys.path.append(str(REPO))


def load_pack(repo: str | Path) -> "types.ModuleType":
    """Import the pack at ``repo`` the way ComfyUI does (a package named by its path) and return its nodes
    package (for scripts run by ComfyUI's Python)."""
    import importlib
    import importlib.util
    import sys

    name = "refdiff_pack_under_test"
    spec = importlib.util.spec_from_file_location(name, os.path.join(repo, "__init__.py"),
                                                  submodule_search_locations=[str(repo)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return importlib.import_module(name + ".nodes")


def comfy_available() -> bool:
    return bool(COMFYUI_PATH) and (Path(COMFYUI_PATH) / "main.py").is_file()


@dataclass
class ComfyEnv:
    """Folders of a test ComfyUI: base (input/output/temp/user), models, custom_nodes, and its YAML."""

    root: Path
    base: Path
    models: Path
    custom_nodes: Path
    yaml: Path
    logs: Path

    def server_args(self, port: int) -> list[str]:
        return ["main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-api-nodes",
                "--extra-model-paths-config", str(self.yaml), "--base-directory", str(self.base),
                "--database-url", "sqlite:///:memory:", "--disable-auto-launch"]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "2")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyClient:
    """Minimal HTTP client of a ComfyUI server."""

    def __init__(self, url: str, log: Path, process: subprocess.Popen) -> None:
        self.url, self.log, self.process = url, log, process

    def get(self, path: str, timeout: float = 30):
        import requests

        r = requests.get(self.url + path, timeout=timeout)
        r.raise_for_status()
        return r.json()

    def queue(self, graph: dict):
        """POST /prompt; returns (status code, JSON answer)."""
        import requests

        r = requests.post(self.url + "/prompt", json={"prompt": graph, "client_id": "refdiff-tests"}, timeout=60)
        return r.status_code, r.json()

    def free(self) -> None:
        """Unload the models and clear ComfyUI's output cache (applied by the queue worker within ~1 s)."""
        import requests

        requests.post(self.url + "/free", json={"unload_models": True, "free_memory": True}, timeout=30)
        time.sleep(2.0)

    def run(self, graph: dict, timeout: float = 900) -> dict:
        """Queue a graph and wait for its history entry (status and outputs)."""
        code, answer = self.queue(graph)
        if code != 200:
            raise AssertionError(f"prompt rejected ({code}): {json.dumps(answer)[:4000]}")
        prompt_id = answer["prompt_id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"ComfyUI exited ({self.process.returncode}); log: {self.log}")
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history:  # an entry appears once the prompt finished, with or without error
                return history[prompt_id]
            time.sleep(0.25)
        raise AssertionError(f"prompt {prompt_id} did not finish in {timeout} s; log: {self.log}")

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace") if self.log.is_file() else ""


@dataclass
class Outputs:
    """Files a finished prompt wrote, by node id."""

    history: dict
    base: Path
    files: dict[str, list[Path]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for node_id, out in self.history.get("outputs", {}).items():
            for item in out.get("images", []) + out.get("latents", []):
                folder = self.base / item.get("type", "output") / item.get("subfolder", "")
                self.files.setdefault(node_id, []).append(folder / item["filename"])

    @property
    def ok(self) -> bool:
        return self.history.get("status", {}).get("status_str") == "success"

    def error(self) -> str:
        """The exception message of a failed prompt ('' when it succeeded)."""
        for kind, data in self.history.get("status", {}).get("messages", []):
            if kind == "execution_error":
                return f"{data.get('node_type')}: {data.get('exception_type')}: {data.get('exception_message')}"
        return ""

    def text(self, node_id: str) -> str:
        """What a PreviewAny node showed."""
        return "".join(self.history.get("outputs", {}).get(node_id, {}).get("text", []))


API_DIR = REPO / "workflows" / "api"
OBJECT_INFO = json.loads((Path(__file__).resolve().parent / "object_info.json").read_text(encoding="utf-8"))

TEST_MODELS = {"ckpt_name": "refdiff_test_sd15.safetensors", "sam_name": "refdiff_test_sam.pth",
               "clip_name": "refdiff_test_clip.safetensors", "sam3_name": "refdiff_test_sam3.safetensors"}
# Small and fast settings for random-weight models (a random SAM passes no quality threshold).
FAST = {
    "RefDiffPrepareImage": {"size": 128},
    "RefDiffSegment": {"image_size": 128, "points_per_side": 8, "pred_iou_thresh": 0.0,
                       "stability_score_thresh": 0.0, "preset": "paper"},
    "RefDiffSAMProposals": {"points_per_side": 8, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0,
                            "post_filter": "none"},
    "RefDiffPromptedSAM": {"post_filter": "none"},
    "RefDiffConceptProposals": {"threshold": 0.0},  # a random SAM 3's scores are low
    "KSampler": {"steps": 2},
}


# Workflows whose loaders build full-size models from fixed configurations whatever the file holds (Flux's T5-XXL
# text encoder: 4.7 billion parameters), so no tiny test file can stand in and the server tests do not run them;
# ref-diff-flux's graph runs through the nodes' own execute methods on tiny Flux / SD 3 models with ComfyUI's
# text-encoder classes in test_comfyui_dit.py.
FULL_SIZE_ONLY = {"ref-diff-flux"}


def api_workflows() -> list[str]:
    return sorted(p.stem for p in API_DIR.glob("*.json"))


def load_api(name: str) -> dict:
    return json.loads((API_DIR / f"{name}.json").read_text(encoding="utf-8"))


def for_tests(graph: dict, image: str) -> dict:
    """The graph with the test models, the test image and the fast settings."""
    g = copy.deepcopy(graph)
    for node in g.values():
        inputs = node["inputs"]
        for key, value in TEST_MODELS.items():
            if key in inputs:
                inputs[key] = value
        if node["class_type"] == "LoadImage":
            inputs["image"] = image
        inputs.update(FAST.get(node["class_type"], {}))
    return g


def output_types(class_type: str) -> list[str]:
    return list(OBJECT_INFO[class_type]["output"])


def save_every_mask(graph: dict, prefix: str = "check") -> dict[str, tuple[str, int]]:
    """Add MaskToImage + SaveImage behind each MASK output of a RefDiff node; returns save-node id -> source."""
    added: dict[str, tuple[str, int]] = {}
    next_id = max(int(k) for k in graph) + 1
    for node_id, node in list(graph.items()):
        if not node["class_type"].startswith("RefDiff"):
            continue
        for slot, kind in enumerate(output_types(node["class_type"])):
            if kind != "MASK":
                continue
            to_image, save = str(next_id), str(next_id + 1)
            next_id += 2
            graph[to_image] = {"class_type": "MaskToImage", "inputs": {"mask": [node_id, slot]}}
            graph[save] = {"class_type": "SaveImage",
                           "inputs": {"images": [to_image, 0], "filename_prefix": f"{prefix}/{node_id}_{slot}"}}
            added[save] = (node_id, slot)
    return added


def find(graph: dict, class_type: str) -> str:
    """Id of the (first) node of a class."""
    return next(k for k, v in graph.items() if v["class_type"] == class_type)
