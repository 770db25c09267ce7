"""The canvas transform: the app's geometry, alpha over black, and its distance to the Skia emulation."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from src.data.canvas import BadImage, android_canvas, canvas_png, fit_box, to_canvas
from testkit.project import CONTRACT

SPEC = CONTRACT.canvas
# PIL's own bilinear path, compared with the Skia drawing (the contract's default is the Skia drawing itself)
PIL_SPEC = SPEC.model_copy(update={"resample": "bilinear"})


def smooth(w: int, h: int, alpha: bool = False) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([255 * x / w, 255 * y / h, 128 + 0 * x], -1).astype(np.uint8)
    if not alpha:
        return Image.fromarray(rgb, "RGB")
    a = np.where((x > w // 4) & (x < 3 * w // 4), 255, 0).astype(np.uint8)
    rgb[a == 0] = 255  # hidden colour of transparent pixels: white
    return Image.fromarray(np.dstack([rgb, a]), "RGBA")


def test_fit_box_truncates_in_float32_like_kotlin() -> None:
    # Search sizes where float64 and float32 disagree after truncation; the app computes in Float.
    disagree = []
    size = SPEC.size
    for w in range(size + 1, 4000):
        h = size - 1
        s32 = min(np.float32(size) / np.float32(w), np.float32(size) / np.float32(h))
        s64 = min(size / w, size / h)
        if int(np.float32(w) * s32) != int(w * s64) or int(np.float32(h) * s32) != int(h * s64):
            disagree.append((w, h, int(np.float32(w) * s32), int(np.float32(h) * s32)))
    assert disagree, "no float32/float64 disagreement in range: widen the search"
    for w, h, w32, h32 in disagree:
        assert fit_box(w, h, size)[:2] == (w32, h32)


@pytest.mark.parametrize("w,h", [(2 * SPEC.size, SPEC.size), (SPEC.size, 2 * SPEC.size), (300, 301), (1000, 37),
                                 (SPEC.size, SPEC.size)])
def test_canvas_is_square_rgb_and_centred_on_black(w: int, h: int) -> None:
    c = np.asarray(to_canvas(smooth(w, h), SPEC))
    nw, nh, left, top = fit_box(w, h, SPEC.size)
    assert c.shape == (SPEC.size, SPEC.size, 3)
    assert left == (SPEC.size - nw) // 2 and top == (SPEC.size - nh) // 2
    assert c[:top].max(initial=0) == 0 and c[top + nh:].max(initial=0) == 0
    assert c[:, :left].max(initial=0) == 0 and c[:, left + nw:].max(initial=0) == 0


def test_a_side_below_one_pixel_is_refused() -> None:
    with pytest.raises(BadImage, match="below one pixel"):
        fit_box(10000, 5, SPEC.size)


def test_transparent_pixels_composite_to_black_not_their_hidden_colour() -> None:
    img = smooth(SPEC.size, SPEC.size, alpha=True)  # no scaling: the alpha rule alone decides
    for spec in (SPEC, PIL_SPEC):
        comp = np.asarray(to_canvas(img, spec))
        dropped = np.asarray(to_canvas(img, spec.model_copy(update={"alpha": "drop"})))
        assert comp[:, :60].max() == 0  # transparent border, composited over black
        assert dropped[:, :60].min() == 255  # 'drop' keeps the hidden white, as PIL convert("RGB") would
    np.testing.assert_array_equal(np.asarray(to_canvas(img, PIL_SPEC)), np.asarray(android_canvas(img, SPEC)))


def test_training_canvas_is_close_to_android_and_bit_stable() -> None:
    img = smooth(640, 480)
    a, b = np.asarray(to_canvas(img, PIL_SPEC)).astype(float), np.asarray(android_canvas(img, SPEC)).astype(float)
    # On smooth content the two bilinear filters agree; on fine texture they do not (eval_parity measures it).
    assert np.mean((a - b) ** 2) < 255**2 / 10**4  # PSNR above 40 dB
    assert canvas_png(to_canvas(img, SPEC)) == canvas_png(to_canvas(img.copy(), SPEC))


def bilinear_reference(img: Image.Image, size: int) -> np.ndarray:
    """The app's canvas computed without Skia: each output pixel centre mapped back onto the photo
    ((x + 0.5) * scale - 0.5, clamped at the edges) and sampled bilinearly from its four neighbours, in float64,
    placed at fit_box's offsets on black. This is what Skia's kLinear sampling without mipmaps computes."""
    a = np.asarray(img.convert("RGB"), dtype=np.float64)
    nw, nh, left, top = fit_box(img.width, img.height, size)

    def taps(n: int, src: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        u = np.clip((np.arange(n) + 0.5) * (src / n) - 0.5, 0, src - 1)
        lo = np.floor(u).astype(int)
        return lo, np.minimum(lo + 1, src - 1), u - lo

    x0, x1, fx = taps(nw, img.width)
    y0, y1, fy = taps(nh, img.height)
    rows = a[y0] * (1 - fy)[:, None, None] + a[y1] * fy[:, None, None]
    out = np.zeros((size, size, 3))
    out[top:top + nh, left:left + nw] = rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]
    return out


@pytest.mark.parametrize("w,h", [(900, 300), (300, 900), (640, 480), (1000, 37)])
def test_skia_resample_is_bilinear_sampling_on_black(w: int, h: int) -> None:
    """`skia_bilinear` (the contract's resample) against a reference that shares no code with it. Random
    texture: nearest-neighbour, mipmapped or box sampling, or an offset by a pixel, are off by tens of levels
    there; Skia's fixed-point weights stay within one level of the float reference."""
    img = Image.fromarray(np.random.default_rng(w * h).integers(0, 255, (h, w, 3), dtype=np.uint8, endpoint=True), "RGB")
    spec = SPEC.model_copy(update={"resample": "skia_bilinear"})
    got = np.asarray(to_canvas(img, spec)).astype(np.float64)
    assert np.abs(got - bilinear_reference(img, SPEC.size)).max() <= 1
