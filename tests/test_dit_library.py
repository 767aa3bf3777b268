"""The library's Flux backend (refdiff.dit) on tiny random diffusers Flux models: the capture leaves the
transformer unchanged, records the attention the model computes, and places words at their T5 pieces."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from refdiff import dit
from refdiff.capture import token_map
from refdiff.stores import AttentionStore
from refdiff.testing.flux import tiny_flux, tiny_t5_tokenizer
from refdiff.text import word_token_positions

COMFY_T5 = Path("/work/comfyui/comfy/text_encoders/t5_tokenizer")


@pytest.fixture(scope="module")
def flux() -> dit.FluxComponents:
    return tiny_flux(seed=0)


def _inputs(flux: dit.FluxComponents, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    grid = (3, 4)
    return dict(hidden_states=torch.randn(1, 12, 64, generator=g),
                encoder_hidden_states=torch.randn(1, 7, 32, generator=g),
                pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.25]),
                img_ids=dit.image_ids(grid), txt_ids=torch.zeros(7, 3), guidance=torch.tensor([3.5]),
                return_dict=False)


def test_capture_leaves_the_output_bit_identical_and_restores_processors(flux):
    tr = flux.transformer
    before = [b.attn.processor for b in tr.transformer_blocks]
    with torch.no_grad():
        plain = tr(**_inputs(flux))[0]
        store = AttentionStore(kind="probs")
        with dit.capture_joint_attention(tr, [0, 1], store, (3, 4)):
            captured = tr(**_inputs(flux))[0]
    assert torch.equal(plain, captured)
    assert [b.attn.processor for b in tr.transformer_blocks] == before
    maps = store.maps()
    assert maps.cond.shape == (2, 3, 4, 7)
    assert maps.layers == ("step0/double_blocks.0", "step0/double_blocks.1")


def test_recorded_probs_are_the_softmax_the_model_attends_with(flux, monkeypatch):
    """q and k as the model's attention call receives them (diffusers' dispatch), softmax computed by hand."""
    import diffusers.models.transformers.transformer_flux as tf

    seen = []
    original = tf.dispatch_attention_fn

    def spy(query, key, value, **kw):
        seen.append((query.clone(), key.clone()))
        return original(query, key, value, **kw)

    monkeypatch.setattr(tf, "dispatch_attention_fn", spy)
    store = AttentionStore(kind="probs")
    with torch.no_grad(), dit.capture_joint_attention(flux.transformer, [1], store, (3, 4)):
        flux.transformer(**_inputs(flux, seed=1))
    q, k = seen[1]  # block 1's joint attention, [B, L, heads, dh] with the 7 text tokens first
    scores = torch.einsum("blhd,bmhd->bhlm", q.double(), k.double()) / math.sqrt(q.shape[-1])
    expected = scores.softmax(-1)[:, :, 7:, :7].mean(1)  # image rows, text columns, heads averaged
    got = store.maps().cond[0].reshape(12, 7)
    assert torch.allclose(got.double(), expected[0], atol=1e-5)


def test_planted_joint_attention_gives_its_mask():
    """A block whose q/k projections are the identity: image tokens of the top row carry the pattern of text
    token 0, the bottom row that of text token 1. After QK-norm each head's score is 4 for equal patterns and
    0 otherwise, so an image token gives e^4 / (3 e^4 + 3) to its own text token and 1 / (3 e^4 + 3) to the
    other (3 matching keys of 6)."""
    tr = tiny_flux(seed=3).transformer
    attn = tr.transformer_blocks[0].attn
    with torch.no_grad():
        for lin in (attn.to_q, attn.to_k, attn.add_q_proj, attn.add_k_proj):
            lin.weight.copy_(torch.eye(32))
            lin.bias.zero_()
    a = torch.zeros(32)
    a[[0, 16]] = 5.0  # the pattern in both heads
    b = torch.zeros(32)
    b[[1, 17]] = 5.0
    img = torch.stack([a, a, b, b])[None]  # grid 2 x 2: top row a, bottom row b
    txt = torch.stack([a, b])[None]
    store = AttentionStore(kind="probs")
    with torch.no_grad(), dit.capture_joint_attention(tr, [0], store, (2, 2)):
        attn(hidden_states=img, encoder_hidden_states=txt)
    probs = store.maps().cond[0]  # [2, 2, 2]
    hi, lo = math.exp(4) / (3 * math.exp(4) + 3), 1 / (3 * math.exp(4) + 3)
    expected = torch.tensor([[[hi, lo], [hi, lo]], [[lo, hi], [lo, hi]]])
    assert torch.allclose(probs, expected, atol=1e-4)
    mask = token_map(probs[None], 0) > 0.5
    assert mask.tolist() == [[True, True], [False, False]]


def test_a_word_cut_into_t5_pieces_keeps_all_of_them():
    tok = tiny_t5_tokenizer()
    prompt = "the dog beside the snowboarder, "
    start = prompt.index("snowboarder")
    pieces = word_token_positions(prompt, (start, start + len("snowboarder")), tok)
    ids = tok(prompt)["input_ids"]
    assert pieces == [4, 5, 6]
    assert tok.convert_ids_to_tokens([ids[p] for p in pieces]) == ["▁snow", "board", "er"]
    assert word_token_positions(prompt, (4, 7), tok) == [1]  # "dog": one piece; position 0 is "the"


@pytest.mark.skipif(not COMFY_T5.is_dir(), reason="T5's real tokenizer (ComfyUI's copy) is not here")
def test_real_t5_tokenizer_pieces_spell_the_word():
    from transformers import T5TokenizerFast

    tok = T5TokenizerFast.from_pretrained(str(COMFY_T5), local_files_only=True)
    prompt = "the skateboarder beside a dog, "
    start = prompt.index("skateboarder")
    pieces = word_token_positions(prompt, (start, start + len("skateboarder")), tok)
    ids = tok(prompt)["input_ids"]
    assert pieces[0] == 1 and len(pieces) >= 2
    assert "".join(tok.convert_ids_to_tokens([ids[p] for p in pieces])).lstrip("▁") == "skateboarder"


def test_run_flux_capture_maps_over_the_t5_context(flux):
    latent = dit.encode_image(flux, torch.rand(1, 3, 64, 64) * 2 - 1, seed=0)
    assert latent.shape == (1, 16, 8, 8)
    maps = dit.run_flux_capture(flux, latent, "the dog beside the snowboarder, ", seed=0)
    assert maps.cond.shape == (2, 4, 4, dit.FLUX_T5_TOKENS)  # last 4 of 2 blocks: both; grid latent / 2
    rows = maps.cond.sum(-1)
    assert torch.all(rows > 0) and torch.all(rows < 1)  # text shares of softmaxes over text and image keys
    again = dit.run_flux_capture(flux, latent, "the dog beside the snowboarder, ", seed=0)
    other = dit.run_flux_capture(flux, latent, "the dog beside the snowboarder, ", seed=1)
    assert torch.equal(maps.cond, again.cond) and not torch.equal(maps.cond, other.cond)


def test_odd_latents_are_padded_to_whole_patches(flux):
    latent = torch.randn(1, 16, 5, 7)
    maps = dit.run_flux_capture(flux, latent, "a dog, ", blocks=[1])
    assert maps.cond.shape[1:3] == (3, 4)
    x = torch.randn(2, 16, 6, 8)
    assert torch.equal(dit.unpack_latents(dit.pack_latents(x), (6, 8)), x)


# ---------------------------------------------------------------------------------------------- loading
@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory) -> Path:
    from refdiff.testing.flux import tiny_flux_pipeline

    folder = tmp_path_factory.mktemp("flux") / "tiny-flux"
    tiny_flux_pipeline(seed=0).save_pretrained(str(folder))
    return folder


def test_a_saved_flux_folder_loads_back_offline_with_the_same_weights(flux_folder, flux):
    from refdiff.sd import load_sd

    loaded = load_sd(flux_folder, device="cpu", dtype=torch.float32)
    assert isinstance(loaded, dit.FluxComponents) and loaded.has_guidance
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        ours, theirs = getattr(flux, name).state_dict(), getattr(loaded, name).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name
    assert loaded.scaling_factor == pytest.approx(0.3611) and loaded.shift_factor == pytest.approx(0.1159)
    prompt = "the dog beside the snowboarder, "
    assert loaded.tokenizer_2(prompt)["input_ids"] == flux.tokenizer_2(prompt)["input_ids"]
    latent = dit.encode_image(flux, torch.rand(1, 3, 64, 64) * 2 - 1, latent_from="mean")
    a = dit.run_flux_capture(flux, latent, prompt, seed=2)
    b = dit.run_flux_capture(loaded, latent, prompt, seed=2)
    assert torch.equal(a.cond, b.cond)


def test_a_flux_folder_missing_a_weight_is_refused(flux_folder, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from refdiff.errors import ModelLoadError
    from refdiff.sd import load_sd

    broken = tmp_path / "broken"
    shutil.copytree(flux_folder, broken)
    weights = broken / "text_encoder_2" / "model.safetensors"
    state = load_file(str(weights))
    state.pop(next(k for k in state if "layer.1" in k))
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="text_encoder_2/"):
        load_sd(broken, device="cpu")


def test_other_transformer_folders_are_refused_by_name(flux_folder, tmp_path):
    import json
    import shutil

    from refdiff.errors import ModelLoadError
    from refdiff.sd import load_sd

    other = tmp_path / "pixart"
    shutil.copytree(flux_folder, other)
    index = json.loads((other / "model_index.json").read_text())
    index["_class_name"] = "PixArtAlphaPipeline"
    (other / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match=r"PixArtAlphaPipeline.*diffusers Flux\.1 folder"):
        load_sd(other, device="cpu")
    with pytest.raises(Exception, match="leave vae unset"):
        load_sd(flux_folder, device="cpu", vae=str(flux_folder / "vae"))


# ---------------------------------------------------------------------------------------------- pipeline
@pytest.fixture()
def tiny_sam_and_clip(monkeypatch):
    from refdiff.testing.clip import tiny_clip
    from refdiff.testing.sam import tiny_sam

    import refdiff.clip
    import refdiff.sam2_models

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(refdiff.sam2_models, "load_any_sam", lambda *a, **k: tiny_sam())
    monkeypatch.setattr(refdiff.clip, "load_clip", lambda *a, **k: tiny_clip())


SAM_LOOSE = {"sam_points_per_side": 4, "sam_pred_iou_thresh": 0.0, "sam_stability_score_thresh": 0.0,
             "sam_min_area": 0}


def test_refdiff_full_variant_on_a_flux_folder(flux_folder, tiny_sam_and_clip, monkeypatch):
    """RefDiff.from_pretrained(sd=<Flux folder>): c comes from the joint attention at the root word's last T5
    piece, then SAM, CLIP and the fusion as for SD."""
    from refdiff import dit as dit_module
    from refdiff.pipeline import RefDiff
    from tiny_runs import two_box_image

    seen = {}
    real = dit_module.run_flux_capture

    def spy(flux, latent, prompt, **kw):
        seen.update(prompt=prompt, latent=tuple(latent.shape), tokenizer=flux.tokenizer_2, **kw)
        out = real(flux, latent, prompt, **kw)
        seen["maps"] = out
        return out

    monkeypatch.setattr(dit_module, "run_flux_capture", spy)
    model = RefDiff.from_pretrained(sd=str(flux_folder), device="cpu", dtype="float32", image_size=64, **SAM_LOOSE)
    image = two_box_image()
    result = model(image, "the snowboarder beside the dog", variant="full", seed=0)
    assert result.mask.shape == image.shape[:2]
    c = result.attention
    assert c.shape == image.shape[:2] and torch.isfinite(torch.as_tensor(c)).all()
    assert seen["latent"] == (1, 16, 8, 8) and seen["prompt"] == "the snowboarder beside the dog, "
    assert seen["maps"].cond.shape[-1] == dit.FLUX_T5_TOKENS
    assert result.root_token == "snowboarder" and result.root_position == 3  # "▁snow" "board" "er": the last


def test_refdiff_refuses_sd_only_parts_on_flux(flux_folder, tiny_sam_and_clip):
    from refdiff.errors import InputError
    from refdiff.pipeline import RefDiff
    from tiny_runs import two_box_image

    model = RefDiff.from_pretrained(sd=str(flux_folder), device="cpu", dtype="float32", image_size=64, **SAM_LOOSE)
    with pytest.raises(InputError, match="refined map"):
        model(two_box_image(), "the dog", variant="g-refine")


def test_cli_segment_with_a_flux_folder(flux_folder, tiny_sam_and_clip, tmp_path, capsys):
    import json

    import numpy as np
    from PIL import Image

    from refdiff import cli
    from tiny_runs import two_box_image

    image = tmp_path / "scene.png"
    Image.fromarray(two_box_image()).save(image)
    argv = ["segment", str(image), "the red car", "-o", str(tmp_path / "m.png"), "--json", str(tmp_path / "s.json"),
            "--sd", str(flux_folder), "--image-size", "64", "--quiet",
            *[a for k, v in SAM_LOOSE.items() for a in ("--set", f"{k}={v}")]]
    assert cli.main(argv) == 0, capsys.readouterr().err
    mask = np.asarray(Image.open(tmp_path / "m.png"))
    assert mask.shape == two_box_image().shape[:2] and set(np.unique(mask)) <= {0, 255}
    assert json.loads((tmp_path / "s.json").read_text())["root_token"] == "car"


def test_offload_moves_the_flux_transformer_and_keeps_the_result(flux_folder, tiny_sam_and_clip):
    from refdiff import offload
    from refdiff.pipeline import RefDiff
    from tiny_runs import two_box_image

    plain = RefDiff.from_pretrained(sd=str(flux_folder), device="cpu", dtype="float32", image_size=64, **SAM_LOOSE)
    parked = RefDiff.from_pretrained(sd=str(flux_folder), device="cpu", dtype="float32", image_size=64,
                                     offload=True, **SAM_LOOSE)
    a = plain(two_box_image(), "the dog", variant="GS", seed=0)
    b = parked(two_box_image(), "the dog", variant="GS", seed=0)
    assert offload.sd_part(parked.sd, "unet") is parked.sd.transformer
    assert np.array_equal(a.attention, b.attention)


# ---------------------------------------------------------------------------------------------- SD 3
@pytest.fixture(scope="module")
def sd3():
    from refdiff.testing.flux import tiny_sd3

    return tiny_sd3(seed=0)


def _sd3_inputs(seed: int = 0, batch: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 16, 6, 8, generator=g),
                encoder_hidden_states=torch.randn(batch, 9, 64, generator=g),
                pooled_projections=torch.randn(batch, 64, generator=g), timestep=torch.tensor([250.0] * batch),
                return_dict=False)


def test_sd3_capture_is_bit_identical_and_records_the_conditional_rows(sd3, monkeypatch):
    """Batch [uncond, cond]: the output is unchanged, and the map is the cond row's softmax (image tokens
    first, then the 9 text tokens) over the q / k the model's SDPA call receives."""
    import torch.nn.functional as F

    tr = sd3.transformer
    before = [b.attn.processor for b in tr.transformer_blocks]
    with torch.no_grad():
        plain = tr(**_sd3_inputs())[0]
    seen = []
    original = F.scaled_dot_product_attention

    def spy(q, k, v, *a, **kw):
        seen.append((q.clone(), k.clone()))
        return original(q, k, v, *a, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    store = AttentionStore(kind="probs")
    with torch.no_grad(), dit.capture_joint_attention(tr, [1], store, (3, 4), "SD3", slice(1, 2)):
        captured = tr(**_sd3_inputs())[0]
    assert torch.equal(plain, captured)
    assert [b.attn.processor for b in tr.transformer_blocks] == before
    q, k = [s for s in seen if s[0].shape[2] == 12 + 9][1]  # block 1's joint attention [B, heads, 21, dh]
    scores = torch.einsum("bhld,bhmd->bhlm", q.double(), k.double()) / math.sqrt(q.shape[-1])
    expected = scores.softmax(-1)[1, :, :12, 12:].mean(0)  # cond row; image queries on the text keys
    maps = store.maps()
    assert maps.uncond is None and maps.cond.shape == (1, 3, 4, 9)
    assert torch.allclose(maps.cond[0].reshape(12, 9).double(), expected, atol=1e-5)


def test_sd3_word_positions_are_clip_l_then_77_plus_t5(sd3):
    prompt = "the snowboarder beside the dog, "
    start = prompt.index("snowboarder")
    span = (start, start + len("snowboarder"))
    clip = word_token_positions(prompt, span, sd3.tokenizer)
    assert clip and clip[0] == 2  # CLIP: start token 0, "the" 1
    assert dit.word_positions(sd3, prompt, span) == clip + [77 + 1, 77 + 2, 77 + 3]


def test_refdiff_on_an_sd3_folder(tmp_path, tiny_sam_and_clip):
    from refdiff.pipeline import RefDiff
    from refdiff.sd import load_sd
    from refdiff.testing.flux import tiny_sd3_pipeline
    from tiny_runs import two_box_image

    folder = tmp_path / "tiny-sd3"
    tiny_sd3_pipeline(seed=0).save_pretrained(str(folder))
    assert isinstance(load_sd(folder, device="cpu"), dit.SD3Components)
    model = RefDiff.from_pretrained(sd=str(folder), device="cpu", dtype="float32", image_size=64, **SAM_LOOSE)
    image = two_box_image()
    result = model(image, "the snowboarder beside the dog", variant="full", seed=0)
    assert result.mask.shape == image.shape[:2] and np.isfinite(result.attention).all()
    assert result.root_position == 77 + 3  # the last T5 piece of "snowboarder"
    import json
    import shutil

    from refdiff.errors import ModelLoadError

    no_t5 = tmp_path / "no-t5"
    shutil.copytree(folder, no_t5)
    index = json.loads((no_t5 / "model_index.json").read_text())
    index["text_encoder_3"] = [None, None]
    (no_t5 / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match=r"lacks the components \['text_encoder_3'\]"):
        load_sd(no_t5, device="cpu")
