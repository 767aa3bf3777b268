"""Ratios measured in the same run as the stages, which carry from machine to machine better than seconds:

(a) overhead: RefDiff end to end (cold caches) / the sum of the model forwards it cannot avoid, with the
    forwards measured alone and, through hooks, inside the very same end-to-end runs;
(b) capture: UNet step with capture / without, and peak memory of our capture vs a naive fp32 capture;
(c) CLIP scoring of N proposals relative to one, masked branch (one pass) and crop branch (batched);
(d) K sentences on one image with one RefDiff / K separate cold runs;
(e) SAM automatic masks at the preset's settings vs faster settings, with the number of proposals;
(f) one batch of SAM's automatic mask generation, segment_anything's generator vs refdiff.amg's, time and memory;
(g) the UNet stage at the preset's settings vs the speed options use_cfg=False and max_steps=1.
"""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from functools import partial
from typing import Any, Callable, Iterator

import numpy as np
import torch

from refdiff import proposals as refdiff_proposals
from refdiff.capture import LayerSelector
from refdiff.config import sam_generator_kwargs
from refdiff.diffusion import capture_processors, run_capture
from refdiff.discriminative import (as_float_image, crop_inputs, mask_attention_bias, masks_to_grid,
                                   pad_square_resize)
from refdiff.pipeline import RefDiff
from refdiff.proposals import make_mask_generator
from refdiff.schedule import injection_noise, injection_plan, noise_latent
from refdiff.stores import AttentionStore

from .harness import Measurement, Timer, synchronize
from .memory import available_memory_bytes
from .naive_capture import NaiveStore, naive_capture, naive_peak_estimate_bytes
from .stages import Shared, SizeInputs, capture_kwargs, reuse_prompt_states, sam_and_filter
from .workload import SEED, SENTENCES, ModeSettings, Models, synthetic_image, synthetic_proposals

NAIVE_MEMORY_FRACTION = 0.7  # run the naive capture only when its estimated peak fits in this share of free memory


class ForwardClock:
    """Sums the wall time spent inside chosen modules' forward calls (via hooks), per label, so that the time
    of the model forwards inside an end-to-end run is known for that very run."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.totals: dict[str, float] = {}
        self._started: dict[int, float] = {}
        self._handles: list[Any] = []

    def add(self, label: str, seconds: float) -> None:
        """Count ``seconds`` under ``label``."""
        self.totals[label] = self.totals.get(label, 0.0) + seconds

    def watch(self, label: str, module: torch.nn.Module) -> None:
        """Time every forward call of ``module`` (device synchronised at entry and exit) under ``label``."""
        def before(mod: Any, args: Any) -> None:
            synchronize(self.device)
            self._started[id(mod)] = time.perf_counter()

        def after(mod: Any, args: Any, output: Any) -> None:
            synchronize(self.device)
            self.add(label, time.perf_counter() - self._started.pop(id(mod)))

        self._handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]

    def take(self) -> dict[str, float]:
        """The totals so far, then start again from zero."""
        totals, self.totals = self.totals, {}
        return totals

    def close(self) -> None:
        """Remove every hook."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def watch_forwards(clock: ForwardClock, models: Models) -> None:
    """Hook the model forwards the method cannot avoid: VAE encoder, SD text encoder, UNet, CLIP towers."""
    sd, clip = models.sd, models.clip
    clock.watch("vae_encode", sd.vae.encoder)
    if getattr(sd.vae, "quant_conv", None) is not None:
        clock.watch("vae_encode", sd.vae.quant_conv)
    clock.watch("text_encode", sd.text_encoder)
    clock.watch("unet_forwards", sd.unet)
    if getattr(clip.model, "transformer", None) is not None:
        clock.watch("clip_text", clip.model.transformer)
    clock.watch("clip_image", clip.visual.conv1)
    for block in clip.visual.transformer.resblocks:
        clock.watch("clip_image", block)


@contextmanager
def fixed_sam_proposals(proposals: torch.Tensor, clock: ForwardClock | None = None) -> Iterator[list[int]]:
    """While active, ``refdiff.proposals.sam_proposals`` runs SAM's automatic mask generator in full (timed
    on ``clock`` as "sam"), then returns the benchmark's fixed proposals, so that every end-to-end run scores
    the same masks (random-weight SAM masks are meaningless). Yields a list that grows by one entry per SAM
    run."""
    original = refdiff_proposals.sam_proposals
    calls: list[int] = []

    def run_sam_then_fix(generator: Any, image: Any) -> torch.Tensor:
        start = time.perf_counter()
        masks = original(generator, image)
        if clock is not None:
            synchronize(clock.device)
            clock.add("sam", time.perf_counter() - start)
        calls.append(int(masks.shape[0]))
        return proposals.clone()

    refdiff_proposals.sam_proposals = run_sam_then_fix  # type: ignore[assignment]
    try:
        yield calls
    finally:
        refdiff_proposals.sam_proposals = original  # type: ignore[assignment]


def fresh_refdiff(models: Models, settings: ModeSettings, size: int) -> RefDiff:
    """A new RefDiff (empty caches) on the shared models with the official preset at S."""
    return RefDiff(sd=models.sd, sam=models.sams[settings.sam_type], clip=models.clip, preset=settings.preset(size))


# ------------------------------------------------------------------------------------------------ (b)
def _step_inputs(models: Models, shared: Shared, inputs: SizeInputs) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The first UNet call of run_capture: noised latent (CFG batch), timestep, number of steps."""
    sd, p = models.sd, inputs.preset
    plan = injection_plan(p.strength, p.ddim_steps, p.num_train_timesteps)
    noise = injection_noise(inputs.latent.shape, SEED)
    x = noise_latent(inputs.latent.float().cpu(), float(sd.alphas_cumprod[plan.noise_timestep]), noise)
    x_in = torch.cat([x, x]) if p.use_cfg else x
    return x_in.to(device=sd.device, dtype=sd.dtype), torch.full((x_in.shape[0],), plan.steps[0][0],
                                                                 dtype=torch.long, device=sd.device), len(plan.steps)


def _processor_census(unet: Any) -> dict[str, int]:
    """How many attention modules use which processor class right now."""
    census: dict[str, int] = {}
    for name, module in unet.named_modules():
        if name.endswith("attn1") or name.endswith("attn2"):
            kind = type(module.processor).__name__
            census[kind] = census.get(kind, 0) + 1
    return census


def capture_cost(timer: Timer, models: Models, shared: Shared, inputs: SizeInputs,
                 log: Callable[[str], None]) -> dict[str, Any]:
    """(b) one UNet call (CFG batch) without capture, with our capture, and with the naive fp32 capture."""
    sd, p = models.sd, inputs.preset
    x_in, t_in, steps = _step_inputs(models, shared, inputs)
    context = shared.context.to(device=sd.device, dtype=sd.dtype)
    selector = LayerSelector(p.capture_factor, tuple(p.capture_blocks))
    layout = [1, 0] if p.use_cfg else [0]

    def call() -> torch.Tensor:
        with torch.no_grad():
            return sd.unet(x_in, t_in, encoder_hidden_states=context).sample

    census: dict[str, int] = {}

    def ours() -> torch.Tensor:
        store = AttentionStore(kind=p.capture_kind)
        with capture_processors(sd.unet, selector, store, p.capture_kind, layout):
            census.update(_processor_census(sd.unet))
            return call()

    latent_hw = (int(x_in.shape[-2]), int(x_in.shape[-1]))
    estimate = naive_peak_estimate_bytes(sd.unet, latent_hw, int(x_in.shape[0]))
    available = available_memory_bytes(sd.device)
    kept: list[int] = []

    def naive() -> None:
        store = NaiveStore()
        with naive_capture(sd.unet, store):
            call()
        kept.append(store.nbytes())

    fns: dict[str, Callable[[], Any]] = {"unet_step_plain": call, "unet_step_capture": ours}
    skipped = estimate > NAIVE_MEMORY_FRACTION * available
    if not skipped:
        fns["unet_step_naive_capture"] = naive
    runs, _ = timer.measure_interleaved(fns)
    plain, captured = runs["unet_step_plain"], runs["unet_step_capture"]
    out: dict[str, Any] = {"steps": steps, "plain": plain, "capture": captured,
                           "time_ratio": captured.median / plain.median, "processors_during_capture": census,
                           "processors_default": _processor_census(sd.unet), "naive_estimate_mb": estimate / 2 ** 20}
    if skipped:
        out["naive"] = None
        out["naive_skipped"] = (f"needs at least {estimate / 2 ** 30:.1f} GiB, "
                                f"{available / 2 ** 30:.1f} GiB available")
        log(f"  naive capture skipped: {out['naive_skipped']}")
    else:
        naive_m = runs["unet_step_naive_capture"]
        naive_m.extra["kept_maps_mb"] = kept[-1] / 2 ** 20
        out["naive"] = naive_m
    return out


# ------------------------------------------------------------------------------------------------ (a)
@torch.inference_mode()
def _crop_forward(clip: Any, pixels: torch.Tensor, layer: str) -> torch.Tensor:
    """The CLIP forward of the crop branch alone (crops already cut and resized)."""
    tokens = clip._blocks(clip._embed(clip._normalise(pixels)), None, layer)
    return clip._project(tokens[:, 0])


@torch.inference_mode()
def _masked_forward(clip: Any, pixels: torch.Tensor, grid: torch.Tensor, layer: str) -> torch.Tensor:
    """The CLIP forward of the masked branch alone (one pass with one mask token per proposal)."""
    base = clip._embed(clip._normalise(pixels))
    tokens = torch.cat([base, base[:, :1].expand(1, grid.shape[0], -1)], dim=1)
    x = clip._blocks(tokens, mask_attention_bias(grid, dtype=clip.dtype), layer)
    return clip._project(x[0, base.shape[1]:])


def clip_forwards(timer: Timer, models: Models, settings: ModeSettings, shared: Shared) -> dict[str, Measurement]:
    """CLIP image forwards without their preprocessing, on the fixed proposals (for the overhead ratio)."""
    clip, p = models.clip, settings.preset(settings.sizes[0])
    image = as_float_image(torch.from_numpy(shared.rgb)).to(clip.device)
    masks = shared.proposals.to(clip.device)
    bias = shared.bias.to(clip.device) if shared.bias is not None else None
    crops, _ = crop_inputs(image, masks, bias, clip.image_size)
    whole = pad_square_resize(image, clip.image_size)[None]
    grid = masks_to_grid(masks, clip.grid_size)
    crop_m, _ = timer.measure("clip_crop_forward", lambda: _crop_forward(clip, crops, p.clip_layer))
    masked_m, _ = timer.measure("clip_masked_forward", lambda: _masked_forward(clip, whole, grid, p.clip_layer))
    return {"clip_crop_forward": crop_m, "clip_masked_forward": masked_m}


def overhead(timer: Timer, models: Models, settings: ModeSettings, shared: Shared, inputs: SizeInputs,
             stages_once: dict[str, Measurement], stages_size: dict[str, Measurement], plain_step: Measurement,
             steps: int, clip_fw: dict[str, Measurement]) -> dict[str, Any]:
    """(a) RefDiff end to end with cold caches vs the sum of its unavoidable model forwards."""
    size = inputs.size
    clock = ForwardClock(timer.device)
    per_run: list[dict[str, float]] = []

    def end_to_end(model: RefDiff) -> Any:
        clock.take()
        result = model(shared.rgb, shared.text, variant="full", seed=SEED)
        per_run.append(clock.take())
        return result

    watch_forwards(clock, models)
    try:
        with fixed_sam_proposals(shared.proposals, clock) as sam_runs:
            e2e, result = timer.measure("end_to_end", end_to_end,
                                        setup=lambda: fresh_refdiff(models, settings, size), slow=True)
    finally:
        clock.close()
    measured = per_run[len(e2e.warmup_times):]
    in_run = {k: statistics.median(run.get(k, 0.0) for run in measured) for k in sorted(set().union(*measured))}
    in_run_ratio = statistics.median(t / sum(run.values()) for t, run in zip(e2e.times, measured))
    e2e.extra["sam_runs"] = len(sam_runs)
    e2e.extra["pipeline_timings_s"] = {k: float(v) for k, v in result.timings.items()}
    e2e.extra["proposals"] = int(result.proposals.shape[0])
    forwards = {
        "vae_encode": stages_size["vae_encode"].median,
        "text_encode": stages_once["text_encode"].median,
        "unet_forwards": steps * plain_step.median,
        f"sam_{settings.sam_type}": stages_once[f"sam_{settings.sam_type}"].median,
        "clip_text": stages_once["clip_text"].median,
        "clip_crop_forward": clip_fw["clip_crop_forward"].median,
        "clip_masked_forward": clip_fw["clip_masked_forward"].median,
    }
    total = sum(forwards.values())
    return {"end_to_end": e2e, "forwards_s": forwards, "forwards_total_s": total, "ratio": e2e.median / total,
            "in_run_forwards_s": in_run, "in_run_forwards_total_s": sum(in_run.values()),
            "in_run_ratio": in_run_ratio}


# ------------------------------------------------------------------------------------------------ (c)
def clip_scaling(timer: Timer, models: Models, settings: ModeSettings, shared: Shared) -> dict[str, Any]:
    """(c) CLIP crop and masked branches on N = 1, 10, 50, 100 proposals, relative to N = 1."""
    clip, p = models.clip, settings.preset(settings.sizes[0])
    h, w = shared.rgb.shape[:2]
    image = torch.from_numpy(shared.rgb)
    fns: dict[str, Callable[[], Any]] = {}
    for n in settings.clip_counts:
        masks = synthetic_proposals(h, w, n)
        fns[f"clip_crop_N{n}"] = lambda m=masks: clip.crop_features(image, m, shared.bias, layer=p.clip_layer)
        fns[f"clip_masked_N{n}"] = lambda m=masks: clip.masked_features(image, m, None, layer=p.clip_layer)
    runs, _ = timer.measure_interleaved(fns)
    rows = {n: {"crop": runs[f"clip_crop_N{n}"], "masked": runs[f"clip_masked_N{n}"]} for n in settings.clip_counts}
    base = settings.clip_counts[0]
    ratios = {n: {branch: rows[n][branch].median / rows[base][branch].median for branch in ("crop", "masked")}
              for n in settings.clip_counts}
    return {"rows": rows, "ratios": ratios, "base": base}


# ------------------------------------------------------------------------------------------------ (d)
def sentences_reuse(timer: Timer, models: Models, settings: ModeSettings, shared: Shared, size: int,
                    cold: Measurement | None = None) -> dict[str, Any]:
    """(d) K sentences on one image: one RefDiff for all K vs K cold runs.

    One RefDiff runs the K_max sentences in turn; the time after the first K of them is the K-sentence time
    (so the K = 1, 3, 7 rows come from the same runs). A cold run is one sentence on a fresh RefDiff: ``cold``
    (the end-to-end measurement of the overhead ratio at this S) or, without it, measured here; K separate
    runs take K times as long."""
    k_max = max(settings.sentence_counts)
    sentences = SENTENCES[:k_max]
    marks: list[list[float]] = []

    def run_all(model: RefDiff) -> None:
        start, times = time.perf_counter(), []
        for s in sentences:
            model(shared.rgb, s, variant="full", seed=SEED)
            synchronize(timer.device)
            times.append(time.perf_counter() - start)
        marks.append(times)

    with fixed_sam_proposals(shared.proposals) as sam_runs:
        if cold is None:
            cold, _ = timer.measure("cold_run", lambda model: model(shared.rgb, sentences[0], variant="full", seed=SEED),
                                    setup=lambda: fresh_refdiff(models, settings, size), slow=True)
        before = len(sam_runs)
        together, _ = timer.measure(f"one_refdiff_{k_max}_sentences", run_all,
                                    setup=lambda: fresh_refdiff(models, settings, size), warmup=0, slow=True)
        together.extra["sam_runs"] = len(sam_runs) - before  # one per measured run when the SAM cache works
    measured = marks[-len(together.times):]
    rows = {}
    for k in settings.sentence_counts:
        first_k = statistics.median(run[k - 1] for run in measured)
        rows[k] = {"together_s": first_k, "cold_sum_s": k * cold.median, "ratio": first_k / (k * cold.median),
                   "sam_runs": together.extra["sam_runs"] / len(measured)}
    return {"size": size, "sentences": list(sentences), "cold": cold, "together": together,
            "per_sentence_s": [statistics.median(run[i] - (run[i - 1] if i else 0.0) for run in measured)
                               for i in range(k_max)], "rows": rows}


# ------------------------------------------------------------------------------------------------ (e)
def sam_settings(timer: Timer, models: Models, settings: ModeSettings, shared: Shared) -> dict[str, Any]:
    """(e) SAM automatic masks at the preset's settings and faster ones, with raw and kept proposal counts."""
    p = settings.preset(settings.sizes[0])
    sam = models.sams[settings.sam_type]
    fns: dict[str, Callable[[], Any]] = {}
    labels: dict[str, tuple[str, dict[str, int]]] = {}
    for label, overrides in settings.sam_settings():
        generator = make_mask_generator(sam, **{**sam_generator_kwargs(p), **overrides})

        def amg(generator: Any = generator) -> tuple[int, int]:
            raw, kept = sam_and_filter(generator, shared.rgb, p)
            return int(raw.shape[0]), int(kept.shape[0])

        name = f"sam_{overrides['points_per_side']}_{overrides['points_per_batch']}"
        fns[name], labels[name] = amg, (label, overrides)
    runs, counts = timer.measure_interleaved(fns, slow=True)
    rows = [{"label": labels[name][0], "settings": labels[name][1], "measurement": runs[name],
             "raw": counts[name][0], "kept": counts[name][1]} for name in fns]
    base = rows[0]["measurement"].median
    for row in rows:
        row["ratio"] = row["measurement"].median / base
    return {"sam_type": settings.sam_type, "rows": rows}


# ------------------------------------------------------------------------------------------------ (f)
def amg_batch(timer: Timer, models: Models, settings: ModeSettings, shared: Shared) -> dict[str, Any]:
    """(f) One batch of automatic mask generation (mask decoder + post-processing of points_per_batch points x 3
    candidates), segment_anything's SamAutomaticMaskGenerator vs refdiff.amg.MemoryBoundedMaskGenerator, on the
    benchmark image and a photo-sized one, at the preset's IoU threshold and with no filter (every candidate
    upsampled: the worst case). The image embedding is computed before, untimed (it is the same code in both)."""
    from segment_anything import SamAutomaticMaskGenerator

    from refdiff.amg import DEFAULT_CHUNK_MB, MemoryBoundedMaskGenerator

    p = settings.preset(settings.sizes[0])
    sam_type = settings.sam_types[0]
    sam = models.sams[sam_type]
    batch = p.sam_points_per_batch
    images = {"benchmark image": shared.rgb, "photo": synthetic_image(*settings.photo_hw)}
    rows = []
    for image_label, rgb in images.items():
        h, w = rgb.shape[:2]
        grid_owner = SamAutomaticMaskGenerator(sam, points_per_batch=batch)
        predictor = grid_owner.predictor
        predictor.set_image(rgb)
        synchronize(timer.device)
        points = grid_owner.point_grids[0][:batch] * np.array([w, h])[None]
        fns: dict[str, Callable[[], Any]] = {}
        for filt, iou in (("preset IoU filter", p.sam_pred_iou_thresh), ("no IoU filter", 0.0)):
            for impl, make in (("segment_anything", SamAutomaticMaskGenerator),
                               ("refdiff.amg", partial(MemoryBoundedMaskGenerator, chunk_mb=DEFAULT_CHUNK_MB))):
                gen = make(sam, points_per_batch=batch)
                gen.predictor = predictor  # one image embedding for all four
                gen.pred_iou_thresh, gen.stability_score_thresh = iou, (p.sam_stability_score_thresh if iou else 0.0)

                def one_batch(gen: Any = gen) -> int:
                    data = gen._process_batch(points, (h, w), [0, 0, w, h], (h, w))
                    return len(data["rles"]) if "rles" in data._stats else 0

                fns[f"{impl} | {filt}"] = one_batch
        runs, kept = timer.measure_interleaved(fns)
        for filt in ("preset IoU filter", "no IoU filter"):
            a, b = runs[f"segment_anything | {filt}"], runs[f"refdiff.amg | {filt}"]
            rows.append({"image": f"{image_label} {w} x {h}", "filter": filt, "stock": a, "ours": b,
                         "kept_stock": kept[f"segment_anything | {filt}"], "kept_ours": kept[f"refdiff.amg | {filt}"],
                         "time_ratio": b.median / a.median})
        del grid_owner, predictor, fns
    return {"sam_type": sam_type, "points": batch, "candidates": 3 * batch, "chunk_mb": DEFAULT_CHUNK_MB,
            "rows": rows}


# ------------------------------------------------------------------------------------------------ (g)
def speed_options(timer: Timer, models: Models, settings: ModeSettings, shared: Shared,
                  inputs: SizeInputs) -> dict[str, Any]:
    """(g) The UNet stage (steps with capture, text states reused) at the preset's settings and with the speed
    options: use_cfg=False (conditional branch only), max_steps=1 (one DDIM step), both."""
    options = {"preset (2 guided steps, CFG batch 2)": {}, "use_cfg=False": {"use_cfg": False},
               "max_steps=1": {"max_steps": 1}, "use_cfg=False, max_steps=1": {"use_cfg": False, "max_steps": 1}}
    fns: dict[str, Callable[[], Any]] = {}
    for label, overrides in options.items():
        kwargs = {**capture_kwargs(inputs.preset), **overrides}

        def unet(kwargs: dict[str, Any] = kwargs) -> int:
            with reuse_prompt_states(shared.context):
                return len(run_capture(models.sd, inputs.latent, inputs.prompt, **kwargs).layers)

        fns[label] = unet
    runs, _ = timer.measure_interleaved(fns)
    base = runs[next(iter(options))].median
    return {"size": inputs.size, "rows": [{"label": label, "measurement": runs[label],
                                           "ratio": runs[label].median / base} for label in options]}


__all__ = ["ForwardClock", "watch_forwards", "fixed_sam_proposals", "fresh_refdiff", "capture_cost", "clip_forwards", "overhead",
           "clip_scaling", "sentences_reuse", "sam_settings", "amg_batch", "speed_options"]
