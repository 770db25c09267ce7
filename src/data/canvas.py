"""Photo -> canvas, as the contract says; and the Android reference to measure it against.

`decode` turns file bytes into an RGB or RGBA image (or raises `BadImage`
with one of a fixed list of causes); `to_canvas` draws it on the square black canvas. The same two
functions serve resize256, the reading client and the tests, so the canvas is
defined once.

`android_canvas` emulates the app with Skia, the library Android draws with:
`Bitmap.createScaledBitmap(src, w, h, filter=true)` (bilinear sampling, no
mipmaps) then `Canvas.drawBitmap` at integer offsets onto a black ARGB_8888
bitmap (premultiplied source-over). eval_parity's canvas rung measures how far
`to_canvas` is from it.
"""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
from PIL import Image, ImageOps

from src.config.contract import Canvas
from src.data.formats import shown_frame  # importing it also lets Pillow read HEIC/HEIF


class BadImage(ValueError):
    """A photo that cannot become a canvas: `cause` is one of CAUSES (records are counted by it),
    `detail` says what exactly; the message is `cause: detail`."""

    def __init__(self, cause: str, detail: str) -> None:
        if cause not in CAUSES:  # a new cause joins CAUSES, so the counts stay a short fixed list
            raise ValueError(f"BadImage: unknown cause {cause!r} (known: {', '.join(CAUSES)})")
        super().__init__(f"{cause}: {detail}")
        self.cause, self.detail = cause, detail


# Every way a photo can fail to become a canvas. Fixed words, never data: resize256 groups rejections by them.
CAUSES = ("empty file", "not an image", "too many pixels", "truncated or corrupt", "bad EXIF", "unsupported mode",
          "side below one pixel")


def fit_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """(scaled_w, scaled_h, left, top) as the app computes them.

    Kotlin does this in Float (float32): `scale = min(size.toFloat()/w, size.toFloat()/h)`,
    then `(w * scale).toInt()` truncates. float64 would round some sizes the other way.
    """
    f = np.float32
    scale = min(f(size) / f(width), f(size) / f(height))
    new_w, new_h = int(f(width) * scale), int(f(height) * scale)
    if new_w < 1 or new_h < 1:
        raise BadImage("side below one pixel", f"aspect ratio {width}x{height} scales to {new_w}x{new_h}")
    return new_w, new_h, (size - new_w) // 2, (size - new_h) // 2


_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def _sixteen_bit_to_8(img: Image.Image) -> Image.Image:
    """16-bit grey (I;16 / I) -> 8-bit L by the top byte, as 16-bit PNGs decode to 8888 on Android.

    PIL's own convert would clip at 255 (nearly all white) instead of scaling.
    A tRNS colour key on the 16-bit image becomes an alpha channel here: the key
    is compared at full depth, before the low byte is dropped.
    """
    arr = np.asarray(img, dtype=np.uint32)
    grey = Image.fromarray((arr >> 8).clip(0, 255).astype(np.uint8), "L")
    key = img.info.get("transparency")
    if isinstance(key, int):
        return Image.merge("LA", (grey, Image.fromarray(np.where(arr == key, 0, 255).astype(np.uint8), "L")))
    return grey


def _head(data: bytes) -> str:
    """The first bytes, for a reason that shows what was served instead of an image."""
    return repr(data[:24])


def _clean(e: BaseException) -> str:
    """An exception's message without object addresses: reasons must be the same on every run."""
    return re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "<bytes>", str(e))


def _has_alpha(img: Image.Image) -> bool:
    # A tRNS colour key (P, L or RGB PNG, GIF) is transparency too: libpng and Skia expand it to alpha.
    return img.mode in _ALPHA_MODES or "transparency" in img.info


def decode(data: bytes, spec: Canvas) -> Image.Image:
    """File bytes -> RGB, or RGBA when the photo carries transparency; else `BadImage(cause, detail)`.

    What the app's BitmapFactory does, step by step: identify by content (never
    by extension), refuse more than `spec.max_pixels` before decoding any pixel,
    decode only the image a gallery shows (frame 0 of an animated GIF / WebP / APNG or a
    multipage TIFF, the primary image of a HEIF file: `src.data.formats.shown_frame`), rotate
    by EXIF only if `spec.exif == "apply"`, bring CMYK, 16-bit and grey to 8-bit RGB(A).
    Every refusal carries its cause, one of CAUSES, so records can be counted by cause.
    """
    if not data:
        raise BadImage("empty file", "0 bytes")
    try:
        with warnings.catch_warnings():
            # We enforce spec.max_pixels ourselves, below, with a precise reason.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:  # past PIL's hard limit (2 x MAX_IMAGE_PIXELS)
        raise BadImage("too many pixels", f"{e} (max_pixels {spec.max_pixels})") from None
    except Exception as e:  # PIL raises several types for "not an image"
        raise BadImage("not an image", f"{type(e).__name__}: {_clean(e)}; {len(data)} bytes starting {_head(data)}") from None
    fmt = img.format or "image"
    if img.width * img.height > spec.max_pixels:
        raise BadImage("too many pixels", f"{fmt} {img.width}x{img.height} = {img.width * img.height} pixels "
                       f"exceeds max_pixels {spec.max_pixels}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.seek(shown_frame(img))  # several images: the one BitmapFactory decodes
            img.load()
    except Exception as e:
        raise BadImage("truncated or corrupt", f"{fmt}: {type(e).__name__}: {e}") from None
    # HEIF's own rotation and mirroring (irot/imir boxes) are part of the image in the HEIF standard:
    # libheif always applies them and pillow-heif resets the EXIF tag to 1, so `apply` cannot rotate twice.
    if spec.exif == "apply":
        try:
            img = ImageOps.exif_transpose(img)
        except Exception as e:
            raise BadImage("bad EXIF", f"orientation in {fmt}: {type(e).__name__}: {e}") from None
    if img.mode in _SIXTEEN_BIT:
        img = _sixteen_bit_to_8(img)
    # CMYK -> RGB is PIL's (255-C)(255-K)/255, the same naive formula Skia uses without an ICC profile.
    target = "RGBA" if _has_alpha(img) else "RGB"
    try:
        return img.convert(target)
    except Exception as e:  # e.g. LAB, HSV: modes PIL cannot bring to RGB
        raise BadImage("unsupported mode", f"{fmt} in mode {img.mode} cannot become {target}: {e}") from None


_PIL_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "lanczos": Image.Resampling.LANCZOS}


def to_canvas(img: Image.Image, spec: Canvas) -> Image.Image:
    """The training canvas: scaled, centred on black, RGB, `spec.size` square."""
    if spec.resample == "skia_bilinear":
        return android_canvas(img, spec)
    new_w, new_h, left, top = fit_box(img.width, img.height, spec.size)
    canvas = Image.new("RGB", (spec.size, spec.size), (0, 0, 0))
    if img.mode == "RGBA" and spec.alpha == "composite_black":
        # Resample premultiplied (as Skia does); premultiplied RGB *is* the colour over black.
        scaled = img.convert("RGBa").resize((new_w, new_h), _PIL_FILTERS[spec.resample])
        canvas.paste(Image.fromarray(np.ascontiguousarray(np.asarray(scaled)[..., :3]), "RGB"), (left, top))
    else:
        canvas.paste(img.convert("RGB").resize((new_w, new_h), _PIL_FILTERS[spec.resample]), (left, top))
    return canvas


def android_canvas(img: Image.Image, spec: Canvas) -> Image.Image:
    """What the app draws, emulated with Skia (see the module docstring)."""
    import skia  # only the reference and `skia_bilinear` need it

    new_w, new_h, left, top = fit_box(img.width, img.height, spec.size)
    rgba = np.array(img.convert("RGBA"))  # a writable copy: `drop` sets the alpha channel in place
    if spec.alpha == "drop":
        rgba[..., 3] = 255
    src = skia.Image.fromarray(rgba, colorType=skia.kRGBA_8888_ColorType, alphaType=skia.kUnpremul_AlphaType)
    info = skia.ImageInfo.Make(new_w, new_h, skia.kRGBA_8888_ColorType, skia.kPremul_AlphaType)
    scaled = skia.Surface.MakeRaster(info)
    scaled.getCanvas().clear(skia.ColorTRANSPARENT)
    scaled.getCanvas().drawImageRect(src, skia.Rect.MakeWH(new_w, new_h), skia.SamplingOptions(skia.FilterMode.kLinear))
    board = skia.Surface.MakeRaster(skia.ImageInfo.Make(spec.size, spec.size, skia.kRGBA_8888_ColorType, skia.kPremul_AlphaType))
    board.getCanvas().clear(skia.ColorBLACK)
    board.getCanvas().drawImage(scaled.makeImageSnapshot(), left, top)
    out = board.makeImageSnapshot().toarray(colorType=skia.kRGBA_8888_ColorType, alphaType=skia.kPremul_AlphaType)
    return Image.fromarray(np.ascontiguousarray(out[..., :3]), "RGB")


def canvas_png(canvas: Image.Image) -> bytes:
    """Lossless, deterministic PNG bytes (no timestamps or text chunks)."""
    buf = io.BytesIO()
    canvas.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def render_png(data: bytes, spec: Canvas) -> bytes:
    """Photo bytes -> canvas PNG bytes, as resize256 stores them (raises BadImage)."""
    return canvas_png(to_canvas(decode(data, spec), spec))
