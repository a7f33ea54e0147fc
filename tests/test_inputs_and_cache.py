"""Bad inputs raise ``MMSpecError`` with a message a user understands; the vision cache is reused."""

from __future__ import annotations

import io

import pytest
from PIL import Image

import mmspec
from mmspec import MMSpecError
from tests.tiny import build_tiny_text_drafter, sample_image, WORDS
from vision.cache import EmbeddingCache
from vision.images import load_image


@pytest.fixture(scope="module")
def pipe(tiny_target, tiny_drafter):
    return mmspec.load(str(tiny_target), drafter=str(tiny_drafter))


def png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_second_request_on_same_image_hits_the_cache(pipe):
    img = sample_image(5)
    first = pipe.generate(img, "describe the image .", max_new_tokens=10)
    # same pixels through another object and another input type: still a hit
    second = pipe.generate(png_bytes(img), "what color is the circle ?", max_new_tokens=10)
    third = pipe.generate(img.copy(), "describe the image .", max_new_tokens=10)
    assert not first.stats.vision_cache_hit
    assert second.stats.vision_cache_hit and third.stats.vision_cache_hit
    assert third.token_ids == first.token_ids
    other = pipe.generate(sample_image(6), "describe the image .", max_new_tokens=4)
    assert not other.stats.vision_cache_hit


def test_cache_is_an_lru_bounded_by_bytes():
    import torch

    cache = EmbeddingCache(max_bytes=3 * 400)
    for i in range(3):
        cache.put(str(i), torch.zeros(100))       # 400 bytes each
    assert cache.get("0") is not None             # 0 becomes most recent
    cache.put("3", torch.zeros(100))              # evicts 1, the least recently used
    assert "1" not in cache and {"0", "2", "3"} <= set(cache._items)
    assert cache.nbytes == 1200
    cache.put("big", torch.zeros(1000))           # larger than the whole cache: not stored, nothing evicted
    assert "big" not in cache and len(cache) == 3
    value, hit = cache.get_or_compute("2", lambda: 1 / 0)
    assert hit and value is not None


@pytest.mark.parametrize("bad, message", [
    (b"", "empty"),
    (b"this is not an image at all", "not an image"),
    (png_bytes(sample_image(0))[:60], "corrupt or truncated"),
    ("/nonexistent/picture.png", "not found"),
    (12345, "PIL.Image, a path or bytes"),
])
def test_bad_images(pipe, bad, message):
    with pytest.raises(MMSpecError, match=message):
        pipe.generate(bad, "describe the image .")


def test_huge_image_is_refused_before_decoding(monkeypatch):
    import vision.images as images

    monkeypatch.setattr(images, "MAX_PIXELS", 1000)
    with pytest.raises(MMSpecError, match="too large|limit is"):
        load_image(png_bytes(Image.new("RGB", (100, 100))))


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16", "LA", "1"])
def test_every_image_mode_becomes_rgb(mode):
    src = sample_image(1).convert(mode) if mode != "I;16" else Image.new("I;16", (20, 10), 4000)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    buf = io.BytesIO()
    src.save(buf, fmt)
    img = load_image(buf.getvalue())
    assert img.mode == "RGB" and img.size == src.size


def test_exif_rotation_is_applied():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif)
    assert load_image(buf.getvalue()).size == (20, 40)


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt=""), "prompt is empty"),
    (dict(prompt="   "), "prompt is empty"),
    (dict(max_new_tokens=0), "max_new_tokens must be at least 1"),
    (dict(max_new_tokens=2.5), "max_new_tokens must be an integer"),
    (dict(temperature=-0.1), "temperature must be >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(num_draft_tokens=-1), "num_draft_tokens"),
    (dict(num_draft_tokens=99), "num_draft_tokens"),
])
def test_bad_parameters(pipe, kwargs, message):
    args = dict(image=sample_image(0), prompt="describe the image .")
    args.update(kwargs)
    with pytest.raises(MMSpecError, match=message):
        pipe.generate(**args)


def test_prompt_longer_than_the_context(pipe):
    with pytest.raises(MMSpecError, match="context"):
        pipe.generate(sample_image(0), " ".join(["red"] * 400))


def test_generation_stops_at_the_context_end(tiny_target, tiny_drafter):
    p = mmspec.load(str(tiny_target), drafter=str(tiny_drafter))
    p.target.generation_config.eos_token_id = []  # never stop early
    prompt_len = len(p.adapter.prepare(sample_image(0), p.adapter.format_prompt("describe the image .")).prompt_ids)
    res = p.generate(sample_image(0), "describe the image .", max_new_tokens=1000)
    assert res.stats.stop_reason == "context"
    assert prompt_len + len(res.token_ids) == p.adapter.context_length


def test_raw_prompt_passes_through(pipe):
    formatted = pipe.adapter.format_prompt("describe the image .")
    a = pipe.generate(sample_image(0), formatted, raw_prompt=True, max_new_tokens=8)
    b = pipe.generate(sample_image(0), "describe the image .", max_new_tokens=8)
    assert a.token_ids == b.token_ids
    with pytest.raises(MMSpecError, match="image token"):
        pipe.generate(sample_image(0), "no image token here", raw_prompt=True)


def test_unknown_drafter_kind(tiny_target):
    with pytest.raises(MMSpecError, match="unknown drafter kind 'telepathy'"):
        mmspec.load(str(tiny_target), drafter_kind="telepathy")


def test_missing_models_and_bad_dtype(tiny_target, tmp_path):
    with pytest.raises(MMSpecError, match="target folder .* does not exist"):
        mmspec.load(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MMSpecError, match="cannot load the target"):
        mmspec.load(str(tmp_path / "empty"))
    with pytest.raises(MMSpecError, match="unknown dtype"):
        mmspec.load(str(tiny_target), dtype="float8")
    with pytest.raises(MMSpecError, match="needs a drafter model"):
        mmspec.load(str(tiny_target), drafter=None, drafter_kind="text")


def test_drafter_with_another_tokenizer_is_refused(tiny_target, tmp_path):
    words = list(WORDS)
    words[3], words[4] = words[4], words[3]     # same size, two tokens swapped
    other = build_tiny_text_drafter(tmp_path / "other", words=words)
    with pytest.raises(MMSpecError, match=r"tokenizer differs.*id \d+: drafter '\w+' vs target '\w+'"):
        mmspec.load(str(tiny_target), drafter=str(other))


def test_padded_drafter_vocabulary_is_accepted(tiny_target, tmp_path):
    # The drafter has more embedding rows than tokens (padding), like a target padded to a multiple of 64.
    padded = build_tiny_text_drafter(tmp_path / "padded", vocab_rows=len(WORDS) + 4 + 20)
    pipe = mmspec.load(str(tiny_target), drafter=str(padded))
    res = pipe.generate(sample_image(0), "describe the image .", max_new_tokens=12)
    none = mmspec.load(str(tiny_target), drafter_kind="none")
    assert res.token_ids == none.generate(sample_image(0), "describe the image .", max_new_tokens=12).token_ids
    # padding rows are never drafted
    assert all(t < len(pipe.processor.tokenizer) for r in res.rounds for t in r.draft_ids)
