"""The values that travel on the pack's own wires (the REFDIFF_* custom types), as plain dataclasses.

Every payload holds one entry per image of the batch, so a batch of B images flows through the graph as
B independent problems. No ComfyUI import here, so offline tests build and check them too; the ComfyUI
sockets of these types are in ``sockets.py``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from refdiff.capture import CrossAttentionMaps
from refdiff.errors import InputError
from refdiff.stores import CapturedAffinity
from refdiff.text import ParsedText

# Custom wire type names, as ComfyUI shows them on sockets.
ATTENTION = "REFDIFF_ATTENTION"
PARSE = "REFDIFF_PARSE"
PROPOSALS = "REFDIFF_PROPOSALS"
SCORES = "REFDIFF_SCORES"
SAM_MODEL = "REFDIFF_SAM"
CLIP_MODEL = "REFDIFF_CLIP"
SAM3_MODEL = "REFDIFF_SAM3"
BOUNDING_BOX = "BOUNDING_BOX"  # ComfyUI core's box type (SAM3_Detect's second output: per image a list of boxes)

# Key under which RefDiffNoiseInjection stores its plan in a LATENT dict.
INJECTION_KEY = "refdiff_injection"


@dataclass
class Injection:
    """The noise injection plan of RefDiffNoiseInjection (Eq. 3), carried inside a LATENT dict.

    ``noise`` is float32 [B, C, h, w] on the CPU (every image of the batch gets the noise of ``seed``, so
    an image's result does not depend on its place in the batch); ``noise_timestep`` is the DDPM step the
    clean latent is noised to, ``step_timesteps`` / ``prev_timesteps`` the DDIM steps the UNet then runs.
    """

    noise: torch.Tensor
    seed: int
    strength: float
    ddim_steps: int
    num_train_timesteps: int
    noise_timestep: int
    step_timesteps: list[int]
    prev_timesteps: list[int]

    def describe(self) -> str:
        """One line for logs and summaries."""
        return (f"noise to DDPM t={self.noise_timestep}, UNet steps at t={self.step_timesteps} "
                f"(strength {self.strength}, {self.ddim_steps} DDIM steps, seed {self.seed})")


@dataclass
class AttentionBatch:
    """REFDIFF_ATTENTION: the captured cross-attention of every image, with what is needed to read it.

    ``maps[i]`` holds image i's maps of every captured layer and step; ``tokens[i]`` the text tokens of its
    prompt by position (position 0 = start token), when the prompt is known; ``latent_hw`` the latent
    grid the UNet ran on: the prepared square is ``8 * latent_hw`` pixels.
    """

    maps: list[CrossAttentionMaps]
    prompts: list[str | None]
    tokens: list[list[str] | None]
    latent_hw: tuple[int, int]
    guidance_scale: float
    kind: str
    model_family: str
    layers: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.maps)

    @property
    def image_hw(self) -> tuple[int, int]:
        """Pixel size of the square the latent was encoded from (the VAE downsamples by 8)."""
        return 8 * self.latent_hw[0], 8 * self.latent_hw[1]


@dataclass
class InternalsAttentionBatch(AttentionBatch):
    """REFDIFF_ATTENTION as RefDiffCaptureAttention makes it: the cross-attention maps plus what the sibling
    methods need.

    ``layer_factors``: captured cross-attention layer name (without "step{i}/") -> downsampling factor;
    ``unet_factors``: every factor at which the UNet has cross-attention in the captured blocks;
    ``self_attention``: per image, the conditional branch's head-averaged self-attention of every captured
    level (``refdiff.stores.CapturedAffinity``, layers and steps averaged), or None when not captured;
    ``self_max_tokens``: the grid-size limit it was captured with.
    """

    layer_factors: dict[str, int] = field(default_factory=dict)
    unet_factors: tuple[int, ...] = ()
    self_attention: list[list[CapturedAffinity]] | None = None
    self_max_tokens: int = 0

    @property
    def captured_factors(self) -> tuple[int, ...]:
        """The factors of the captured cross-attention layers, ascending."""
        return tuple(sorted(set(self.layer_factors.values())))


@dataclass
class JointAttentionBatch(AttentionBatch):
    """REFDIFF_ATTENTION from a Flux / SD 3 MODEL's joint attention (docs/METHOD.md section 15): the same maps
    per image [L, h, w, T] over the model's text context (``latent_hw / 2`` grid), read as the UNet's are.

    ``kind`` is the map kind ("attention" or "concept"); ``blocks`` the double blocks recorded, ``flow_ts`` the
    noise fractions the model ran at, ``concepts`` per image the concept words of the concept map (else []).
    """

    blocks: list[int] = field(default_factory=list)
    flow_ts: list[float] = field(default_factory=list)
    concepts: list[list[str]] = field(default_factory=list)


@dataclass
class ParsedItem:
    """One parsed referring expression and where its root word sits in the diffusion model's tokens."""

    parsed: ParsedText
    prompt: str  # the text the UNet is conditioned on: parsed.text + prompt suffix
    root_positions: list[int]  # every BPE position of the root word
    root_position: int  # the LAST BPE piece (docs/METHOD.md section 4)
    tokens: list[str]  # token strings by position (0 = start token), for summaries
    root_rule: str
    root_overridden: bool = False
    # BPE positions of each word of parsed.words (same order; empty for a word cut off by the token limit)
    word_positions: list[list[int]] = field(default_factory=list)


@dataclass
class ParsedBatch:
    """REFDIFF_PARSE: one ParsedItem per line of the text input, and the warnings its parse gave (a text that
    names no object, a prompt cut at the token limit), shown by the nodes that parse."""

    items: list[ParsedItem]
    warnings: list[str] = field(default_factory=list)
    context: str = "CLIP"  # whose token positions: "CLIP" (SD 1.x/2.x, SDXL), "Flux" (T5) or "SD3" (CLIP + T5)

    def __len__(self) -> int:
        return len(self.items)

    def for_batch(self, batch: int, what: str = "text") -> list[ParsedItem]:
        """One item per image: a single item serves every image; otherwise the counts must match."""
        return match_batch(self.items, batch, what)


@dataclass
class ProposalBatch:
    """REFDIFF_PROPOSALS: candidate masks of every image, bool [N_i, H, W] at the image's own size (CPU), and
    per image index why it has none (``notes``: the post-filter removed every mask, SAM found none)."""

    masks: list[torch.Tensor]
    source: str  # "threshold", "sam", "prompted", "cluster", "concept" or "external"
    notes: dict[int, str] = field(default_factory=dict)
    prompts_info: list[str] = field(default_factory=list)  # "prompted": each image's prompts, for reports

    def __len__(self) -> int:
        return len(self.masks)

    def describe(self) -> str:
        """How many proposals each image got, for the nodes' info outputs."""
        return ", ".join(f"image {i}: {m.shape[0]} proposals" for i, m in enumerate(self.masks))

    @property
    def warnings(self) -> list[str]:
        """The notes as lines "image i: why", in image order."""
        return [f"image {i}: {self.notes[i]}" for i in sorted(self.notes)]


@dataclass
class ScoreBatch:
    """REFDIFF_SCORES: one float32 score [N_i] per proposal of every image, of one kind.

    Kind "fused" (RefDiffSpatial): s_G and s_D already fused with ``weights`` and the spatial terms added;
    ``parts`` keeps the scores it was made of ("generative", "discriminative": one tensor per image, or None)
    and ``spatial`` each image's refdiff.spatial.SpatialScores (base fused score, each term's contribution)."""

    scores: list[torch.Tensor]
    kind: str  # "generative", "discriminative" or "fused"
    counts: list[int]  # N_i of the proposals that were scored, to catch mismatched wiring
    parts: dict[str, list[torch.Tensor] | None] = field(default_factory=dict)
    spatial: list[Any] = field(default_factory=list)
    weights: tuple[float, float] = (1.0, 1.0)

    def __len__(self) -> int:
        return len(self.scores)

    def check_against(self, proposals: ProposalBatch, name: str) -> None:
        """InputError unless these scores were computed on ``proposals`` (same images, same counts)."""
        got = [int(m.shape[0]) for m in proposals.masks]
        if len(self.scores) != len(got) or self.counts != got:
            raise InputError(f"{name}: these {self.kind} scores were computed for {len(self.scores)} image(s) "
                             f"with {self.counts} proposals, but the proposals input holds {len(got)} image(s) "
                             f"with {got}; connect the scores made from the same proposals")


def check_unfused_scores(proposals: ProposalBatch, generative: ScoreBatch | None,
                         discriminative: ScoreBatch | None, if_fused: str) -> None:
    """InputError unless at least one of s_G / s_D is given, neither is RefDiffSpatial's fused kind (``if_fused``
    says what to do then) and each was computed on ``proposals``."""
    if generative is None and discriminative is None:
        raise InputError("scores: connect generative scores, discriminative scores or both")
    for scores, name in ((generative, "generative"), (discriminative, "discriminative")):
        if scores is not None:
            if scores.kind == "fused":
                raise InputError(f"{name}: these scores {if_fused}")
            if scores.kind == "concept":
                raise InputError(f"{name}: these are SAM 3's instance scores (RefDiff Concept Proposals' scores, "
                                 "shown in its info); connect RefDiffGenerativeScore's or RefDiffCLIPScore's scores "
                                 "of its proposals here")
            scores.check_against(proposals, name)


@dataclass
class SamHandle:
    """REFDIFF_SAM: a loaded SAM model (kept on the offload device while idle)."""

    model: Any
    model_type: str
    path: str


@dataclass
class Sam3Handle:
    """REFDIFF_SAM3: a loaded SAM 3 image model (refdiff.sam3_models; kept on the offload device while idle)."""

    model: Any
    name: str  # "sam3" or "sam3 (custom size)"
    path: str


@dataclass
class ClipHandle:
    """REFDIFF_CLIP: a loaded refdiff.discriminative.ClipScorer (kept on the offload device while idle)."""

    scorer: Any
    path: str


def match_batch(items: list[Any], batch: int, what: str) -> list[Any]:
    """Broadcast one item to ``batch`` images, pass ``batch`` items through, refuse any other count."""
    if batch < 1:
        raise InputError(f"{what}: the image batch is empty")
    if len(items) == 1:
        return list(items) * batch
    if len(items) != batch:
        raise InputError(f"{what}: {len(items)} entries for a batch of {batch} images; give one entry for "
                         f"all images or exactly one per image (one text per line)")
    return list(items)


__all__ = ["ATTENTION", "PARSE", "PROPOSALS", "SCORES", "SAM_MODEL", "CLIP_MODEL", "INJECTION_KEY", "Injection",
           "AttentionBatch", "InternalsAttentionBatch", "JointAttentionBatch", "ParsedItem", "ParsedBatch",
           "ProposalBatch", "ScoreBatch", "check_unfused_scores",
           "SamHandle", "Sam3Handle", "SAM3_MODEL", "BOUNDING_BOX", "ClipHandle", "match_batch"]
