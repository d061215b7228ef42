"""Mask sources: CLIP text masks (random-init tiny model), saliency, COCO ground truth, ops, CLI."""

from __future__ import annotations

import argparse
import io
import socket

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.samples import objects_mask, photo_like_image, write_sample_set
from pipeline.masks import (ClipWeightsError, MaskError, SaliencyModel, TextMasker, build_mask, get_saliency_model,
                            load_coco, match_category, register_saliency_model, saliency_models)
from pipeline.masks.cli import add_mask_source_arguments, mask_from_args, run_mask_command
from pipeline.masks.text import plan_clip_load
from pipeline.masks.ops import (assign_nonroi_value, binarize, combine, from_png, resize, smooth, to_png,
                                to_rgb_array, to_uint8)

from conftest import TINY_CLIP


@pytest.fixture(scope="module")
def masker(clip_config) -> TextMasker:
    return TextMasker("tiny", None, config=clip_config)


@pytest.fixture(scope="module")
def sample_set(tmp_path_factory):
    return write_sample_set(tmp_path_factory.mktemp("samples"), n_images=4, size=(96, 128), seed=3)


@pytest.fixture
def image() -> np.ndarray:
    return photo_like_image(72, 100, seed=5)[0]


# -- text ------------------------------------------------------------------------------------


def test_text_mask_shape_range_and_determinism(masker, clip_config, image):
    mask = masker(image, "a dog")
    assert mask.shape == (72, 100) and mask.dtype == np.float32
    assert 0.0 <= mask.min() and mask.max() <= 1.0 and mask.std() > 0
    same = TextMasker("tiny", None, config=clip_config)  # same seed: same random weights, everywhere
    np.testing.assert_array_equal(same(image, "a dog"), mask)
    other = TextMasker("tiny", None, config=clip_config, seed=1)
    assert not np.allclose(other(image, "a dog"), mask)
    np.testing.assert_array_equal(masker(image, "a dog"), mask)  # cached text embedding: same result


def test_text_mask_several_prompts_and_weights(masker, image):
    probs = masker.prompt_probabilities([image], ["a person", "a dog"])
    assert probs.shape == (1, 2, *masker.grid) and ((probs >= 0) & (probs <= 1)).all()
    union = masker(image, ["a person", "a dog"])
    np.testing.assert_allclose(union, resize(probs[0].max(axis=0), image.shape[:2]), atol=1e-6)
    for single in ("a person", "a dog"):
        assert (union >= masker(image, single) - 1e-6).all()
    np.testing.assert_allclose(masker(image, ["a person", "a dog"], [1.0, 0.0]), masker(image, "a person"), atol=1e-6)
    np.testing.assert_allclose(masker(image, ["a person", "a dog"], [2.0, 1.0]),
                               masker(image, ["a person", "a dog"], [1.0, 0.5]), atol=1e-6)
    # prompts are scored independently: adding another prompt does not change one's map
    np.testing.assert_allclose(masker.prompt_probabilities([image], ["a dog", "sky"])[0, 0], probs[0, 1], atol=1e-6)
    with pytest.raises(MaskError, match="weights"):
        masker(image, ["a person", "a dog"], [1.0])
    with pytest.raises(MaskError, match="prompt"):
        masker(image, ["  "])


def test_text_mask_batch_matches_single_and_input_size(masker, clip_config, image):
    other = photo_like_image(40, 30, seed=9)[0]
    batch = masker.masks([image, other], ["a car"])
    assert [m.shape for m in batch] == [(72, 100), (40, 30)]
    np.testing.assert_allclose(batch[1], masker(other, "a car"), atol=1e-5)
    big = TextMasker("tiny", None, config=clip_config, input_size=96)  # interpolated positional embedding
    assert big.grid == (6, 6) and big(image, "a car").shape == (72, 100)
    with pytest.raises(MaskError, match="multiple of the patch size"):
        TextMasker("tiny", None, config=clip_config, input_size=70)


def test_text_mask_follows_maskclip_value_path(masker, image):
    """Dense features = ln_post(value-path last block) @ proj; the global path stays CLIP's own."""
    visual = masker.model.visual
    x = masker._pixels([image])
    ref = visual.ln_pre(torch.cat([visual.class_embedding.expand(1, 1, -1),
                                   visual.conv1(x).flatten(2).transpose(1, 2)], 1) + visual.positional_embedding)
    for block in visual.transformer.resblocks[:-1]:
        ref = block(ref)
    last = visual.transformer.resblocks[-1]
    v = torch.nn.functional.linear(last.ln_1(ref), *[t[2 * last.attn.embed_dim:] for t in
                                                   (last.attn.in_proj_weight, last.attn.in_proj_bias)])
    ref = ref + last.attn.out_proj(v)
    ref = ref + last.mlp(last.ln_2(ref))
    ref = torch.nn.functional.normalize(visual.ln_post(ref[:, 1:]) @ visual.proj, dim=-1)
    np.testing.assert_allclose(masker.patch_embeddings([image]).reshape(ref.shape).numpy(), ref.detach().numpy(),
                               atol=1e-5)


def test_text_mask_loads_a_local_checkpoint(masker, clip_config, image, tmp_path):
    ckpt = tmp_path / "tiny.pt"
    torch.save(masker.model.state_dict(), ckpt)
    loaded = TextMasker("tiny", str(ckpt), config=clip_config, seed=123)  # weights from the file, not the seed
    np.testing.assert_allclose(loaded(image, "a dog"), masker(image, "a dog"), atol=1e-6)


@pytest.fixture
def no_network(monkeypatch) -> list:
    """Every connection or name lookup this test tries, refused (the list of what was tried)."""
    tried: list = []

    def refuse(what):  # noqa: ANN001, ANN202
        tried.append(what)
        raise OSError("the test refuses network access")

    monkeypatch.setattr(socket.socket, "connect", lambda self, address: refuse(address))
    monkeypatch.setattr(socket.socket, "connect_ex", lambda self, address: refuse(address))
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *args, **kwargs: refuse(host))
    return tried


def test_the_network_guard_sees_attempts(no_network):
    with pytest.raises(OSError):
        socket.create_connection(("example.org", 443), timeout=1)
    with pytest.raises(OSError), socket.socket() as s:
        s.connect(("127.0.0.1", 9))
    assert no_network == ["example.org", ("127.0.0.1", 9)]


@pytest.mark.parametrize("kwargs, option", [
    ({"model_name": "ViT-B-32", "pretrained": "openai"}, "--clip-pretrained"),  # not cached: no download
    ({"model_name": "ViT-B-32", "pretrained": "no-such-tag"}, "--clip-pretrained"),
    ({"model_name": "ViT-B-32", "pretrained": "/nonexistent/weights.pt"}, "--clip-pretrained"),
    ({"model_name": "No-Such-Model", "pretrained": None}, "--clip-model"),
    ({"model_name": "hf-hub:nobody/nothing-here", "pretrained": None}, "--clip-model"),
    ({"model_name": "local-dir:/nonexistent", "pretrained": None}, "--clip-model"),
])
def test_unloadable_weights_fail_fast_naming_the_option(kwargs, option, no_network):
    with pytest.raises(ClipWeightsError) as info:
        TextMasker(**kwargs)
    assert no_network == [], "must not wait on the network"  # (how long it takes: benchmarks/fail_fast.py)
    assert info.value.option == option and str(info.value).startswith(option)
    assert "\n" not in str(info.value) and isinstance(info.value, ValueError)


def test_cached_pretrained_tag_is_used_offline(tmp_path, monkeypatch):
    """A tag whose weights are in the Hugging Face cache resolves to that file, without network."""
    import huggingface_hub.constants

    snapshot = tmp_path / "models--timm--vit_base_patch32_clip_224.openai" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "open_clip_pytorch_model.bin").write_bytes(b"weights")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    plan = plan_clip_load("ViT-B-32", "openai")
    assert plan.kwargs["pretrained"] == str(snapshot / "open_clip_pytorch_model.bin")
    assert plan.kwargs["force_quick_gelu"] is True  # OpenAI weights were trained with QuickGELU


def test_corrupt_checkpoint_is_one_clear_line(tmp_path):
    bad = tmp_path / "weights.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ClipWeightsError, match="^--clip-pretrained: cannot load tiny: ") as info:
        TextMasker("tiny", str(bad), config=TINY_CLIP)
    assert "\n" not in str(info.value)


def test_bad_clip_configs(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"vision_cfg": {}}')
    with pytest.raises(ClipWeightsError, match="--clip-config.*missing embed_dim"):
        TextMasker("x", None, config=bad)
    with pytest.raises(ClipWeightsError, match="--clip-config"):
        TextMasker("x", None, config=tmp_path / "missing.json")
    with pytest.raises(ClipWeightsError, match="--clip-pretrained.*does not exist"):
        TextMasker("x", "missing.pt", config=TINY_CLIP)
    resnet = {**TINY_CLIP, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16}}
    with pytest.raises(ClipWeightsError, match="--clip-model.*ViT"):
        TextMasker("tiny-rn", None, config=resnet)


# -- saliency --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["spectral_residual", "frequency_tuned"])
def test_saliency_models_find_the_objects(name):
    model = get_saliency_model(name)
    assert isinstance(model, SaliencyModel)
    for seed in range(6):
        img, objects = photo_like_image(96, 128, seed)
        sal = model(img)
        assert sal.shape == (96, 128) and sal.dtype == np.float32
        assert sal.min() >= 0 and 0.9 < sal.max() <= 1
        gt = objects_mask(objects, 96, 128) > 0
        assert sal[gt].mean() > sal[~gt].mean() + 0.05
    np.testing.assert_array_equal(model(np.full((20, 30, 3), 90, np.uint8)), np.zeros((20, 30), np.float32))
    np.testing.assert_array_equal(model(img), sal)


def test_saliency_registry():
    assert {"spectral_residual", "frequency_tuned"} <= set(saliency_models())
    with pytest.raises(MaskError, match="unknown saliency model"):
        get_saliency_model("deep_gaze")
    with pytest.raises(MaskError, match="uint8 HxWx3"):
        get_saliency_model()(np.zeros((4, 4), np.float32))

    @register_saliency_model("test_centre")
    class Centre:
        def __call__(self, image: np.ndarray) -> np.ndarray:
            out = np.zeros(image.shape[:2], np.float32)
            out[image.shape[0] // 2, image.shape[1] // 2] = 1
            return out

    assert "test_centre" in saliency_models()
    out = build_mask(Image.new("RGB", (9, 7)), saliency=True, saliency_model="test_centre")
    assert out[3, 4] == 1 and out.sum() == 1


# -- COCO ------------------------------------------------------------------------------------


@pytest.mark.parametrize("word, category", [
    ("person", "person"), ("people", "person"), ("a person", "person"), ("Faces", "person"), ("man", "person"),
    ("the women", "person"), ("automobile", "car"), ("cars", "car"), ("license plate", "car"),
    ("a red car", "car"), ("puppy", "dog"), ("puppies", "dog"), ("television", "tv"), ("hot dogs", "hot dog"),
    ("buses", "bus"), ("knives", "knife"), ("sofa", "couch"), ("skis", "skis"), ("wine glasses", "wine glass"),
    ("a photo of a dog", "dog"), ("xyzzy", None),
])
def test_match_category(word, category):
    assert match_category(word) == category


def test_coco_masks_match_the_drawn_objects(sample_set):
    coco = load_coco(sample_set.annotations)
    assert load_coco(sample_set.annotations) is coco  # cached
    for (cid, name), path in zip(coco.images(), sample_set.image_files):
        assert name == path.name
        arr = np.asarray(Image.open(path))
        gt = objects_mask(photo_like_image(96, 128, 3 * 100_003 + cid - 1)[1], 96, 128)
        mask = coco.mask(cid)
        assert mask.shape == (96, 128) and set(np.unique(mask)) <= {0.0, 1.0}
        assert (mask * gt).sum() / max(np.maximum(mask, gt).sum(), 1) > 0.75  # IoU (rasterisers differ at edges)
        assert arr.shape[:2] == mask.shape
        for category in coco.categories_in(cid):
            sub = coco.mask(cid, [category])
            assert sub.sum() > 0 and (sub <= mask).all()
    cid = coco.images()[0][0]
    np.testing.assert_array_equal(coco.mask(cid, ["people", "cars", "puppy"]), coco.mask(cid))
    assert coco.mask(cid, size=(48, 64)).shape == (48, 64)
    with pytest.raises(MaskError, match="zebra.*does not have"):
        coco.resolve_category("zebras")
    with pytest.raises(MaskError, match="unknown category 'xyzzy'"):
        coco.mask(cid, ["xyzzy"])
    with pytest.raises(MaskError, match="not in annotations.json"):
        coco.image_id("other.png")
    assert coco.image_id("/somewhere/else/" + coco.images()[1][1]) == coco.images()[1][0]


def test_coco_bad_files(tmp_path):
    with pytest.raises(MaskError, match="not found"):
        load_coco(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(MaskError, match="not a COCO annotation file"):
        load_coco(bad)


# -- build_mask ------------------------------------------------------------------------------


def test_build_mask_sources_and_union(masker, sample_set):
    path = sample_set.image_files[0]
    image = Image.open(path)
    rgb = to_rgb_array(image)
    text = build_mask(image, prompts=["a dog"], text_masker=masker)
    np.testing.assert_array_equal(text, masker(rgb, ["a dog"]))
    sal = build_mask(image, saliency=True)
    np.testing.assert_array_equal(sal, get_saliency_model()(rgb))
    gt = build_mask(image, coco_annotations=sample_set.annotations, categories=["dogs", "people", "cars"])
    np.testing.assert_array_equal(gt, load_coco(sample_set.annotations).mask(1))
    both = build_mask(image, prompts=["a dog"], text_masker=masker, saliency=True,
                      coco_annotations=sample_set.annotations)
    np.testing.assert_allclose(both, np.maximum(np.maximum(text, sal), gt))
    assert both.dtype == np.float32 and both.shape == (96, 128)
    named = build_mask(Image.fromarray(rgb), coco_annotations=sample_set.annotations, image_name=path.name)
    np.testing.assert_array_equal(named, gt)


@pytest.mark.parametrize("kwargs, message", [
    ({}, "no mask source"),
    ({"categories": ["dog"]}, "annotation file"),
    ({"prompts": ["a dog"], "prompt_weights": [1, 2]}, "2 prompt weights for 1"),
    ({"prompts": [""]}, "empty"),
    ({"prompts": ["a dog"], "clip_model": "ViT-B-32", "clip_pretrained": "laion2b_s34b_b79k"}, "--clip-pretrained"),
    ({"coco_annotations": "missing.json"}, "not found"),
])
def test_build_mask_errors(kwargs, message):
    with pytest.raises(MaskError, match=message):
        build_mask(Image.new("RGB", (16, 16)), **kwargs)


def test_build_mask_coco_needs_a_known_image(sample_set):
    with pytest.raises(MaskError, match="file name"):
        build_mask(Image.new("RGB", (16, 16)), coco_annotations=sample_set.annotations)
    with pytest.raises(MaskError, match="'x.png' is not in"):
        build_mask(Image.new("RGB", (16, 16)), coco_annotations=sample_set.annotations, image_name="x.png")


# -- ops -------------------------------------------------------------------------------------


def test_ops_smooth_binarize_resize():
    mask = np.zeros((20, 30), np.float32)
    mask[5:15, 10:20] = 1
    smoothed = smooth(mask, 5)
    assert smoothed.shape == mask.shape and smoothed.dtype == np.float32
    assert 0 < smoothed[5, 10] < 1 and smoothed[10, 15] == 1 and smoothed[0, 0] == 0
    np.testing.assert_allclose(smooth(np.full((7, 9), 0.3, np.float32), 3), 0.3, atol=1e-6)  # borders too
    with pytest.raises(MaskError, match="odd"):
        smooth(mask, 4)
    np.testing.assert_array_equal(binarize(smoothed, 0.5), (smoothed >= 0.5).astype(np.float32))
    small = resize(mask, (10, 15))
    assert small.shape == (10, 15) and 0 <= small.min() and small.max() <= 1
    assert resize(mask, (40, 60)).shape == (40, 60)


def test_ops_combine():
    a = np.array([[0.2, 1.0]], np.float32)
    b = np.array([[0.6, 0.0]], np.float32)
    np.testing.assert_allclose(combine([a, b]), [[0.6, 1.0]])
    np.testing.assert_allclose(combine([a, b], [1, 0.5]), [[0.3, 1.0]])
    np.testing.assert_allclose(combine([a, b], [4, 2]), [[0.3, 1.0]])
    np.testing.assert_allclose(combine([a, b], [1, 3], mode="mean"), [[0.5, 0.25]])
    for bad in ([1], [-1, 1], [0, 0]):
        with pytest.raises(MaskError):
            combine([a, b], bad)
    with pytest.raises(MaskError, match="differ in size"):
        combine([a, np.zeros((2, 2))])
    with pytest.raises(MaskError, match="mode"):
        combine([a], mode="min")


def test_ops_png_round_trip_and_nonroi_value():
    mask = np.random.default_rng(0).random((13, 17)).astype(np.float32)
    data = to_png(mask)
    assert Image.open(io.BytesIO(data)).mode == "L"
    back = from_png(data)
    assert back.dtype == np.float32 and np.abs(back - mask).max() <= 0.5 / 255 + 1e-6
    np.testing.assert_array_equal(to_uint8(back), to_uint8(mask))
    wide = io.BytesIO()
    Image.fromarray(np.full((3, 4), 65535, np.uint16)).save(wide, format="PNG")
    np.testing.assert_array_equal(from_png(wide.getvalue()), 1.0)
    with pytest.raises(MaskError, match="cannot decode"):
        from_png(b"not a png")
    np.testing.assert_allclose(assign_nonroi_value(np.array([0.0, 1.0, 0.5]), 0.25), [0.25, 1.0, 0.625])


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F"])
def test_to_rgb_array_modes(mode):
    out = to_rgb_array(Image.new(mode, (5, 4)))
    assert out.shape == (4, 5, 3) and out.dtype == np.uint8
    sixteen = Image.fromarray(np.full((2, 2), 257 * 200, np.uint16))
    assert (to_rgb_array(sixteen) == 200).all()  # scaled, not clipped to 255


# -- CLI -------------------------------------------------------------------------------------


@pytest.fixture
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("image")
    p.add_argument("-o", "--output")
    add_mask_source_arguments(p)
    return p


def test_cli_mask_command(parser, sample_set, clip_config, tmp_path):
    path = sample_set.image_files[1]
    out = tmp_path / "m" / "mask.png"
    args = parser.parse_args([str(path), "--prompt", "faces", "hands", "--prompt", "a car", "--prompt-weight",
                              "1", "0.5", "1", "--saliency", "--coco", str(sample_set.annotations), "--category",
                              "cars", "--clip-model", "tiny", "--clip-pretrained", "none", "--clip-config",
                              str(clip_config), "-o", str(out)])
    assert args.prompts == ["faces", "hands", "a car"] and args.prompt_weights == [1, 0.5, 1]
    assert run_mask_command(args) == 0
    written = Image.open(out)
    assert written.mode == "L" and written.size == (128, 96)
    expected = build_mask(Image.open(path), prompts=args.prompts, prompt_weights=args.prompt_weights,
                          saliency=True, coco_annotations=sample_set.annotations, categories=["cars"],
                          clip_model="tiny", clip_pretrained="none", clip_config=str(clip_config))
    np.testing.assert_array_equal(np.asarray(written), to_uint8(expected))


def test_cli_errors(parser, tmp_path):
    args = parser.parse_args([str(tmp_path / "x.png"), "-o", str(tmp_path / "m.png")])
    assert mask_from_args(args, Image.new("RGB", (4, 4))) is None
    with pytest.raises(MaskError, match="cannot read image"):
        run_mask_command(parser.parse_args([str(tmp_path / "x.png"), "--saliency", "-o", str(tmp_path / "m.png")]))
    not_image = tmp_path / "notes.txt"
    not_image.write_text("hello")
    with pytest.raises(MaskError, match="cannot read image"):
        run_mask_command(parser.parse_args([str(not_image), "--saliency", "-o", str(tmp_path / "m.png")]))
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    with pytest.raises(MaskError, match="no mask source"):
        run_mask_command(parser.parse_args([str(tmp_path / "ok.png"), "-o", str(tmp_path / "m.png")]))
    with pytest.raises(MaskError, match="--clip-pretrained"):
        run_mask_command(parser.parse_args([str(tmp_path / "ok.png"), "--prompt", "a dog", "--clip-pretrained",
                                            "openai", "-o", str(tmp_path / "m.png")]))
