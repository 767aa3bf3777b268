"""diffusers backend (capture processors, run_capture on a tiny random UNet) and the Eq. 3 math of refdiff.schedule."""
from __future__ import annotations

import math

import pytest
import torch

from refdiff.capture import LayerSelector
from refdiff.diffusion import (SDComponents, capture_processors, cross_attention_layers, encode_image, encode_latent,
                               encode_prompts, run_capture)
from refdiff.errors import InputError
from refdiff.schedule import (InjectionPlan, alphas_cumprod_of, classifier_free_guidance, ddim_loop, ddim_step,
                              ddim_timesteps, injection_noise, injection_plan, injection_schedule, noise_latent,
                              scaled_linear_alphas_cumprod, sigma_of)
from refdiff.stores import AttentionStore
from refdiff.testing.sd import SD15_UNET_CONFIG, sd_scheduler, tiny_sd, tiny_sd_pipeline, unet_from_config

# tiny_sd: latent 16x16 -> factor-4 grid 4x4; factor-4 layers: down_blocks.2.attentions.0, up_blocks.1.attentions.{0,1}
TINY_FACTOR4 = ["down_blocks.2.attentions.0", "up_blocks.1.attentions.0", "up_blocks.1.attentions.1"]


@pytest.fixture(scope="module")
def sd() -> SDComponents:
    return tiny_sd(seed=0)


def _inputs(sd: SDComponents, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=g)
    ctx = torch.randn(2, 77, 32, generator=g)
    return x, torch.tensor([51, 51]), ctx


def _processors(unet):
    return {layer.name: layer.module.processor for layer in cross_attention_layers(unet)}


def test_capture_does_not_change_unet_output(sd):
    x, t, ctx = _inputs(sd)
    with torch.no_grad():
        plain = sd.unet(x, t, encoder_hidden_states=ctx).sample
        store = AttentionStore(kind="probs")
        with capture_processors(sd.unet, LayerSelector(factor=None), store, cond_or_uncond=[1, 0]) as names:
            captured = sd.unet(x, t, encoder_hidden_states=ctx).sample
    assert len(names) == 10 and len(store) == 10  # every attn2 of the tiny UNet captured
    assert torch.allclose(captured, plain, atol=1e-5)


@pytest.mark.parametrize("kind", ["probs", "logits"])
def test_captured_maps_equal_direct_recomputation(sd, kind):
    layer = next(l for l in cross_attention_layers(sd.unet) if l.name == "up_blocks.1.attentions.1")
    seen: dict[str, torch.Tensor] = {}
    hooks = [layer.module.to_q.register_forward_hook(lambda m, a, o: seen.__setitem__("q", o)),
             layer.module.to_k.register_forward_hook(lambda m, a, o: seen.__setitem__("k", o))]
    x, t, ctx = _inputs(sd, seed=1)
    store = AttentionStore(kind=kind)
    try:
        with torch.no_grad(), capture_processors(sd.unet, LayerSelector(4, ("up",)), store, cond_or_uncond=[1, 0]):
            sd.unet(x, t, encoder_hidden_states=ctx)
    finally:
        for h in hooks:
            h.remove()
    heads = layer.module.heads
    q, k = seen["q"].double(), seen["k"].double()  # [2, 16, C], [2, 77, C]
    dh = q.shape[-1] // heads
    scores = torch.einsum("bqhd,bkhd->bhqk", q.view(2, 16, heads, dh), k.view(2, 77, heads, dh)) / math.sqrt(dh)
    ref = (scores.softmax(-1) if kind == "probs" else scores).mean(1).view(2, 4, 4, 77)
    maps = store.maps()
    assert maps.layers == ("step0/up_blocks.1.attentions.0", "step0/up_blocks.1.attentions.1")
    assert maps.cond.shape == (2, 4, 4, 77)
    assert torch.allclose(maps.cond[1].double(), ref[1], atol=1e-5)  # batch item 1 is the cond chunk
    assert torch.allclose(maps.uncond[1].double(), ref[0], atol=1e-5)
    assert not torch.allclose(ref[0], ref[1], atol=1e-3)  # different contexts: the split matters


def test_only_selected_layers_get_the_processor_and_are_restored(sd):
    before = _processors(sd.unet)
    store = AttentionStore()
    with capture_processors(sd.unet, LayerSelector(4), store) as names:
        during = _processors(sd.unet)
        assert names == TINY_FACTOR4
        for name, proc in during.items():
            if name in TINY_FACTOR4:
                assert type(proc).__name__ == "CaptureAttnProcessor"
            else:
                assert proc is before[name]
        # self-attention (attn1) is never touched
        attn1 = sd.unet.up_blocks[1].attentions[0].transformer_blocks[0].attn1
        assert type(attn1.processor).__name__ == "AttnProcessor2_0"
    assert all(_processors(sd.unet)[n] is p for n, p in before.items())
    with pytest.raises(RuntimeError, match="boom"):
        with capture_processors(sd.unet, LayerSelector(4), store):
            raise RuntimeError("boom")
    assert all(_processors(sd.unet)[n] is p for n, p in before.items())
    assert not sd.unet._forward_pre_hooks  # the size hook is removed too
    with pytest.raises(InputError, match="capture_factor=16"):
        with capture_processors(sd.unet, LayerSelector(16), store):
            pass
    with pytest.raises(InputError, match="kind"):
        with capture_processors(sd.unet, LayerSelector(4), store, kind="probs"):
            pass


def test_sd15_layer_factors_on_meta_device():
    unet = unet_from_config(SD15_UNET_CONFIG, device="meta")
    layers = cross_attention_layers(unet)
    assert len(layers) == 16
    picked = [l.name for l in layers if LayerSelector(4).wants(l.block, l.factor)]
    assert picked == ["down_blocks.2.attentions.0", "down_blocks.2.attentions.1", "up_blocks.1.attentions.0",
                      "up_blocks.1.attentions.1", "up_blocks.1.attentions.2"]
    factors = {l.name: l.factor for l in layers}
    assert factors["down_blocks.0.attentions.0"] == 1 and factors["up_blocks.3.attentions.2"] == 1
    assert factors["down_blocks.1.attentions.1"] == 2 and factors["mid_block.attentions.0"] == 8
    assert all(l.module.heads == 8 for l in layers)
    assert [l.name for l in layers if LayerSelector(4, ("up",)).wants(l.block, l.factor)] == picked[2:]


def test_ddim_timesteps_and_injection_schedule():
    ts = ddim_timesteps(20, 1000)
    assert ts == list(range(1, 1000, 50)) and ts[:3] == [1, 51, 101] and ts[-1] == 951
    assert injection_schedule(0.1, 20, 1000) == (101, [51, 1])
    assert injection_schedule(0.5, 20, 1000) == (501, [451, 401, 351, 301, 251, 201, 151, 101, 51, 1])
    assert injection_schedule(0.3, 10, 1000) == (301, [201, 101, 1])
    with pytest.raises(InputError, match="strength=0.04.*ddim_steps=20"):
        injection_schedule(0.04, 20)
    with pytest.raises(InputError, match="strength"):
        injection_schedule(1.0, 20)
    with pytest.raises(InputError, match="ddim_steps"):
        ddim_timesteps(0)


def test_alpha_bar_matches_sd_betas_and_diffusers():
    ac = scaled_linear_alphas_cumprod()
    assert ac.shape == (1000,)
    assert abs(float(ac[101]) - 0.893) < 1e-3
    assert torch.allclose(ac, sd_scheduler().alphas_cumprod.float(), atol=1e-6)
    # hand-computed: alpha_bar_0 = 1 - beta_0 = 1 - 0.00085
    assert abs(float(ac[0]) - (1 - 0.00085)) < 1e-7


def test_noise_latent_and_ddim_step_hand_computed():
    x0, noise = torch.tensor([2.0]), torch.tensor([1.0])
    assert torch.allclose(noise_latent(x0, 0.64, noise), torch.tensor([0.8 * 2 + 0.6 * 1]))
    x, out = torch.tensor([1.0]), torch.tensor([0.5])
    x_prev, x0_pred = ddim_step(x, out, 0.64, 0.81, "epsilon")
    assert torch.allclose(x0_pred, torch.tensor([(1 - 0.6 * 0.5) / 0.8]))  # 0.875
    assert torch.allclose(x_prev, torch.tensor([0.9 * 0.875 + math.sqrt(0.19) * 0.5]))
    x_prev, x0_pred = ddim_step(x, out, 0.64, 0.81, "v_prediction")
    assert torch.allclose(x0_pred, torch.tensor([0.8 * 1 - 0.6 * 0.5]))  # 0.5
    assert torch.allclose(x_prev, torch.tensor([0.9 * 0.5 + math.sqrt(0.19) * (0.8 * 0.5 + 0.6 * 1)]))
    with pytest.raises(InputError, match="prediction_type"):
        ddim_step(x, out, 0.64, 0.81, "sample")


def test_injection_plan_caps_the_steps():
    plan = injection_plan(0.1, 20, 1000)
    assert plan == InjectionPlan(101, ((51, 1), (1, 0)))
    assert plan.step_timesteps == [51, 1] and plan.prev_timesteps == [1, 0]
    assert injection_plan(0.1, 20, 1000, max_steps=1).steps == ((51, 1),)
    assert injection_plan(0.3, 10, 1000, max_steps=9).steps == ((201, 101), (101, 1), (1, 0))
    with pytest.raises(InputError, match="max_steps"):
        injection_plan(0.1, 20, 1000, max_steps=0)


def test_ddim_loop_hand_computed():
    """Planted schedule: alpha_bar = 0.81, 0.64, 0.36 at t = 0, 1, 2; a constant epsilon prediction of 0.5."""
    ac = torch.tensor([0.81, 0.64, 0.36])
    latent, noise = torch.tensor([[2.0]]), torch.tensor([[1.0]])
    seen, order = [], []

    def predict(x, t, i):
        seen.append((round(float(x), 6), t, i))
        return torch.full_like(x, 0.5)

    x, pred_x0 = ddim_loop(latent, noise, ac, InjectionPlan(2, ((1, 0),)), predict,
                           before_step=lambda i: order.append(("before", i)),
                           after_step=lambda i: order.append(("after", i)))
    x_t = 0.6 * 2.0 + 0.8 * 1.0  # Eq. 3 at alpha_bar 0.36: 2.0
    assert seen == [(round(x_t, 6), 1, 0)] and order == [("before", 0), ("after", 0)]
    x0 = (x_t - 0.6 * 0.5) / 0.8  # DDIM at alpha_bar 0.64 with eps 0.5
    assert torch.allclose(pred_x0, torch.tensor([[x0]]))
    assert torch.allclose(x, torch.tensor([[0.9 * x0 + math.sqrt(0.19) * 0.5]]))
    x, pred_x0 = ddim_loop(latent, noise, ac, InjectionPlan(1, ()), predict)  # no step: x_T itself
    assert torch.allclose(x, torch.tensor([[0.8 * 2.0 + 0.6 * 1.0]])) and torch.equal(x, pred_x0)
    with pytest.raises(InputError, match="timestep 5"):
        ddim_loop(latent, noise, ac, InjectionPlan(5, ()), predict)


def test_guidance_and_sigma_conversions():
    u, c = torch.tensor([1.0, -1.0]), torch.tensor([2.0, 0.0])
    assert torch.equal(classifier_free_guidance(u, c, 9.0), torch.tensor([10.0, 8.0]))
    assert sigma_of(0.8) == pytest.approx(0.5)  # sqrt(0.2 / 0.8)
    ac = scaled_linear_alphas_cumprod()
    sigmas = torch.tensor([sigma_of(float(a)) for a in ac])
    assert torch.allclose(alphas_cumprod_of(sigmas), ac.double(), atol=1e-7)
    assert torch.equal(injection_noise((1, 4, 2, 2), 5), injection_noise((1, 4, 2, 2), 5))


def test_ddim_step_matches_diffusers_ddim_scheduler():
    sched = sd_scheduler()
    sched.set_timesteps(20)
    ac = sched.alphas_cumprod
    g = torch.Generator().manual_seed(3)
    x, eps = torch.randn(1, 4, 3, 3, generator=g), torch.randn(1, 4, 3, 3, generator=g)
    for t, t_prev in [(51, 1), (1, 0)]:  # the last step goes to alphas_cumprod[0] (set_alpha_to_one=False)
        ours, _ = ddim_step(x, eps, float(ac[t]), float(ac[t_prev]))
        theirs = sched.step(eps, t, x, eta=0.0).prev_sample
        assert torch.allclose(ours, theirs, atol=1e-5)


def test_encode_latent_and_image(sd):
    pixels = torch.rand(1, 3, 128, 128) * 2 - 1
    mean = encode_latent(sd.vae, pixels, "mean", scaling_factor=sd.scaling_factor)
    assert mean.shape == (1, 4, 16, 16) and mean.dtype == torch.float32
    unscaled = encode_latent(sd.vae, pixels, "mean", scaling_factor=1.0)
    assert torch.allclose(mean, unscaled * 0.18215)
    a = encode_image(sd, pixels, "sample", seed=5)
    b = encode_image(sd, pixels, "sample", seed=5)
    c = encode_image(sd, pixels, "sample", seed=6)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert not torch.allclose(a, mean)
    # the sample is mean + std * N(0,1) drawn from the CPU generator seeded with seed + 1
    dist = sd.vae.encode(pixels).latent_dist
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(6))
    assert torch.allclose(a, (dist.mean + dist.std * eps) * 0.18215, atol=1e-5)
    with pytest.raises(InputError, match="latent_from"):
        encode_latent(sd.vae, pixels, "mode")


def test_encode_prompts(sd):
    both = encode_prompts(sd, "a red car, ", use_cfg=True)
    assert both.shape == (2, 77, 32)
    empty = encode_prompts(sd, "", use_cfg=False)
    cond = encode_prompts(sd, "a red car, ", use_cfg=False)
    assert torch.allclose(both[0], empty[0], atol=1e-6) and torch.allclose(both[1], cond[0], atol=1e-6)
    assert not torch.allclose(both[0], both[1])


def test_run_capture_end_to_end(sd):
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    calls: list[tuple[int, int]] = []
    inputs: list[tuple[torch.Tensor, torch.Tensor]] = []
    hook = sd.unet.register_forward_pre_hook(
        lambda m, args, kwargs: inputs.append((args[0].clone(), args[1].clone())), with_kwargs=True)
    try:
        maps = run_capture(sd, latent, "a red car, ", seed=7, progress=lambda i, n: calls.append((i, n)))
    finally:
        hook.remove()
    assert maps.cond.shape == (6, 4, 4, 77) and maps.uncond.shape == (6, 4, 4, 77)  # 3 layers x 2 steps
    assert maps.kind == "logits"
    assert maps.layers == tuple(f"step{s}/{n}" for s in (0, 1) for n in TINY_FACTOR4)
    assert calls == [(1, 2), (2, 2)]
    assert [int(t[0]) for _, t in inputs] == [51, 1]
    # first UNet input: the latent noised to t = 101 with the seeded CPU noise, twice (CFG batch)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(7))
    expected = noise_latent(latent, float(sd.alphas_cumprod[101]), noise)
    assert inputs[0][0].shape == (2, 4, 16, 16)
    assert torch.allclose(inputs[0][0][0], expected[0], atol=1e-5)
    assert torch.allclose(inputs[0][0][1], expected[0], atol=1e-5)
    assert all(type(p).__name__ == "AttnProcessor2_0" for p in _processors(sd.unet).values())


def test_run_capture_is_seeded(sd):
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    kw = dict(capture_kind="probs", max_steps=1)
    a = run_capture(sd, latent, "a dog, ", seed=1, **kw)
    b = run_capture(sd, latent, "a dog, ", seed=1, **kw)
    c = run_capture(sd, latent, "a dog, ", seed=2, **kw)
    assert a.cond.shape == (3, 4, 4, 77) and a.kind == "probs"  # max_steps=1: one step's layers
    assert torch.equal(a.cond, b.cond) and torch.equal(a.uncond, b.uncond)
    assert not torch.allclose(a.cond, c.cond, atol=1e-6)


def test_run_capture_conditional_only_and_interrupt(sd):
    latent = torch.zeros(1, 4, 16, 16)
    maps = run_capture(sd, latent, "a dog, ", use_cfg=False, capture_factor=2, capture_blocks=("up",))
    assert maps.uncond is None and maps.cond.shape == (4, 8, 8, 77)  # up_blocks.2 has 2 layers, x 2 steps
    assert maps.layers[0] == "step0/up_blocks.2.attentions.0"

    class Stop(Exception):
        pass

    count = {"n": 0}

    def stop_second() -> None:
        count["n"] += 1
        if count["n"] == 2:
            raise Stop

    with pytest.raises(Stop):
        run_capture(sd, latent, "a dog, ", should_stop=stop_second)
    assert all(type(p).__name__ == "AttnProcessor2_0" for p in _processors(sd.unet).values())
    with pytest.raises(InputError, match="latent"):
        run_capture(sd, torch.zeros(2, 4, 16, 16), "a dog, ")
    with pytest.raises(InputError, match="strength"):
        run_capture(sd, latent, "a dog, ", strength=0.01)


def test_from_pipeline():
    pipe = tiny_sd_pipeline(seed=0)
    parts = SDComponents.from_pipeline(pipe)
    assert parts.unet is pipe.unet and parts.tokenizer is pipe.tokenizer
    assert parts.scaling_factor == pytest.approx(0.18215)
    assert parts.prediction_type == "epsilon" and parts.dtype == torch.float32
    assert parts.device.type == "cpu"
    assert torch.allclose(parts.alphas_cumprod, scaled_linear_alphas_cumprod(), atol=1e-6)


def test_run_capture_reduced_precision_model_gives_fp32_maps(sd):
    low = tiny_sd(seed=0, dtype=torch.bfloat16)
    pixels = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(2)) * 2 - 1
    latent = encode_image(sd, pixels, "mean")
    low_latent = encode_image(low, pixels, "mean")
    assert low_latent.dtype == torch.float32
    ref = run_capture(sd, latent, "a cat, ")
    got = run_capture(low, latent, "a cat, ")
    assert got.cond.dtype == torch.float32 and got.cond.shape == ref.cond.shape
    assert torch.isfinite(got.cond).all()
    assert (got.cond - ref.cond).abs().max() < 0.15 * ref.cond.abs().max()  # same weights, bf16 rounding only
