"""resize256 on every awkward input class, its determinism, and its resume after SIGKILL."""

from __future__ import annotations

import io
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from src.config.contract import Canvas
from src.config.settings import Http
from src.data.canvas import BadImage, android_canvas, canvas_png, decode, to_canvas
from src.data.files import read_jsonl, sha256
from src.data.sources import folder_items
from src.stages import download, resize256
from testkit.photos import png_header_only, tree
from testkit.project import CONTRACT, kill_midway

SPEC = CONTRACT.canvas
CFG = Http(workers=2, timeout_s=5, retries=0, backoff_s=0, max_bytes=10**7, user_agent="t", snapshot="s")


def save(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png16_rgb(rgb: tuple[int, int, int], w: int = 8, h: int = 4) -> bytes:
    """A 16-bit-per-channel RGB PNG (PIL cannot write one), every pixel `rgb`."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    row = b"\0" + struct.pack(">HHH", *rgb) * w
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(row * h)) + chunk(b"IEND", b""))


def half_transparent(mode: str) -> Image.Image:
    """40x20: left half transparent (hiding white), right half opaque red (or grey for LA)."""
    a = np.zeros((20, 40, 4), np.uint8)
    a[:, :20] = (255, 255, 255, 0)
    a[:, 20:] = (255, 0, 0, 255)
    img = Image.fromarray(a, "RGBA")
    return img if mode == "RGBA" else img.convert(mode)


def awkward_inputs() -> dict[str, bytes]:
    p = Image.new("P", (40, 20), 1)
    p.putpalette([255, 255, 255, 255, 0, 0] + [0] * 762)
    p.paste(0, (0, 0, 20, 20))  # palette index 0 (white) is the transparent one
    rgb_key = Image.new("RGB", (40, 20), (255, 0, 0))
    rgb_key.paste((0, 255, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0))]
    grey = save(Image.new("L", (30, 30), 77), "JPEG")
    noisy_jpeg = save(Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)), "JPEG")
    noisy_png = save(Image.fromarray(np.random.default_rng(1).integers(0, 255, (48, 64, 3), dtype=np.uint8)), "PNG")
    mid = len(noisy_png) // 2
    return {
        "rgba.png": save(half_transparent("RGBA"), "PNG"),
        "la.png": save(half_transparent("LA"), "PNG"),
        "p_transparency.png": save(p, "PNG", transparency=0),
        "rgb_colour_key.png": save(rgb_key, "PNG", transparency=(0, 255, 0)),
        "cmyk.tif": save(Image.new("CMYK", (40, 20), (100, 50, 0, 128)), "TIFF"),
        "cmyk.jpg": save(Image.new("CMYK", (40, 20), (100, 50, 0, 128)), "JPEG"),
        "grey16.png": save(Image.fromarray(np.full((20, 40), 0xAB12, np.uint16)), "PNG"),
        "rgb16.png": png16_rgb((0x1234, 0xABCD, 0x7F00)),
        "grey.jpg": grey,
        "zz-copy-of-grey.jpg": grey,
        "exif6.jpg": save(Image.new("RGB", (40, 20), (200, 200, 0)), "JPEG", exif=exif.tobytes()),
        "animated.gif": save(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "animated.png": save(frames[1], "PNG", save_all=True, append_images=frames[:1]),
        "truncated.jpg": noisy_jpeg[: len(noisy_jpeg) // 2],
        "corrupt.png": noisy_png[:mid] + bytes(b ^ 0xFF for b in noisy_png[mid:mid + 64]) + noisy_png[mid + 64:],
        "bomb.png": png_header_only(8000, 6000),
        "sliver.png": save(Image.new("RGB", (1000, 1), (1, 2, 3)), "PNG"),
        "tall-sliver.png": save(Image.new("RGB", (1, 4000), (1, 2, 3)), "PNG"),
    }


def pipeline(tmp: Path, files: dict[str, bytes], spec: Canvas = SPEC, workers: int = 2) -> tuple[dict, dict]:
    """Folder -> download -> resize256; (records by file name, summary)."""
    src = tmp / "photos"
    src.mkdir(exist_ok=True)
    for name, data in files.items():
        (src / name).write_bytes(data)
    dl = tmp / "dl"
    if not (dl / "manifest.jsonl").exists():
        download.run(folder_items(src, False, ()), dl, tmp / "dl.json", CFG, max_failure_rate=1.0)
    out = tmp / f"rs-{spec.exif}-{workers}"
    summary = resize256.run(dl, out, spec, workers)
    names = {r["id"]: r["url"].removeprefix("folder:") for r in read_jsonl(dl / "manifest.jsonl")}
    return {names[r["id"]]: r for r in read_jsonl(out / "records.jsonl")}, {"summary": summary, "out": out}


def canvas(out: Path, rec: dict) -> np.ndarray:
    data = (out / rec["canvas"]).read_bytes()
    assert sha256(data) == rec["canvas_sha256"] and rec["canvas"] == f"canvases/{rec['canvas_sha256']}.png"
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_every_awkward_input_is_drawn_or_rejected_with_its_cause(tmp_path: Path) -> None:
    files = awkward_inputs()
    recs, info = pipeline(tmp_path, files)
    out, summary = info["out"], info["summary"]
    assert set(recs) == set(files)  # one record per input, nothing lost
    assert summary["inputs"] == summary["written"] + summary["rejected"] == len(files)
    rejected = {
        "truncated.jpg": ("truncated or corrupt", r"^truncated or corrupt: JPEG: OSError: image file is truncated"),
        "corrupt.png": ("truncated or corrupt", r"^truncated or corrupt: PNG: OSError: unrecognized data stream"),
        "bomb.png": ("too many pixels", r"^too many pixels: PNG 8000x6000 = 48000000 pixels exceeds max_pixels 40000000$"),
        # the duplicate names the first copy as the user knows it (its name), not by a hash id
        "zz-copy-of-grey.jpg": ("duplicate", rf"^duplicate: same content as {re.escape(recs['grey.jpg']['name'])} "
                                             r"\(sha256 [0-9a-f]{12}\)$"),
        "sliver.png": ("side below one pixel", r"^side below one pixel: aspect ratio 1000x1 scales to 256x0$"),
        "tall-sliver.png": ("side below one pixel", r"^side below one pixel: aspect ratio 1x4000 scales to 0x256$"),
    }
    for name, (cause, pattern) in rejected.items():
        r = recs[name]
        assert r["status"] == "rejected" and r["canvas"] is None and r["cause"] == cause, r
        assert re.search(pattern, r["reason"]), r
    # counted by a fixed cause: every extreme aspect ratio is one cause, not one cause per size
    assert summary["rejected_by"] == {"duplicate": 1, "side below one pixel": 2, "too many pixels": 1,
                                      "truncated or corrupt": 2}
    for name in set(files) - set(rejected):
        assert recs[name]["status"] == "ok" and recs[name]["reason"] is None and recs[name]["cause"] is None, recs[name]
        # The stored canvas is exactly the contract's transform of the original bytes.
        assert (out / recs[name]["canvas"]).read_bytes() == canvas_png(to_canvas(decode(files[name], SPEC), SPEC))
    # Transparency composites over black, whatever colour the transparent pixels hide (40x20 -> 256x128, top 64).
    for name, opaque in (("rgba.png", (255, 0, 0)), ("la.png", (76, 76, 76)), ("p_transparency.png", (255, 0, 0)),
                         ("rgb_colour_key.png", (255, 0, 0))):
        c = canvas(out, recs[name])
        assert tuple(c[128, 40]) == (0, 0, 0) and tuple(c[128, 220]) == opaque, name
        assert tuple(c[10, 128]) == (0, 0, 0)  # letterbox
    assert tuple(canvas(out, recs["cmyk.tif"])[128, 128]) == (77, 102, 127)  # (255-C)(255-K)/255, as Skia without ICC
    assert np.abs(canvas(out, recs["cmyk.jpg"])[128, 128].astype(int) - (77, 102, 127)).max() <= 4
    assert tuple(canvas(out, recs["grey16.png"])[128, 128]) == (0xAB,) * 3  # top byte, not clipped to white
    assert tuple(canvas(out, recs["rgb16.png"])[128, 128]) == (0x12, 0xAB, 0x7F)
    assert tuple(canvas(out, recs["animated.gif"])[128, 128]) == (255, 0, 0)  # the first frame
    assert tuple(canvas(out, recs["animated.png"])[128, 128]) == (0, 255, 0)
    # EXIF ignored (the app's BitmapFactory): landscape, letterboxed top and bottom.
    c = canvas(out, recs["exif6.jpg"])
    assert c[10, 128].max() == 0 and c[128, 10, 0] > 150


def test_exif_apply_rotates_first(tmp_path: Path) -> None:
    recs, info = pipeline(tmp_path, {k: v for k, v in awkward_inputs().items() if k == "exif6.jpg"},
                          spec=SPEC.model_copy(update={"exif": "apply"}))
    c = canvas(info["out"], recs["exif6.jpg"])
    assert c[128, 10].max() == 0 and c[10, 128, 0] > 150  # portrait: pillarboxed left and right


def test_decode_names_the_cause() -> None:
    with pytest.raises(BadImage, match=r"^empty file") as e:
        decode(b"", SPEC)
    assert e.value.cause == "empty file"
    with pytest.raises(BadImage) as e:
        decode(b"<html>not a jpg", SPEC)
    assert e.value.cause == "not an image"
    assert str(e.value) == ("not an image: UnidentifiedImageError: cannot identify image file <bytes>; "
                            "15 bytes starting b'<html>not a jpg'")  # no object address: reproducible
    with pytest.raises(BadImage, match=r"^too many pixels: "):
        decode(png_header_only(30_000, 30_000), SPEC)  # beyond PIL's own hard limit too


def test_outputs_are_bit_identical_across_runs_and_worker_counts(tmp_path: Path) -> None:
    files = awkward_inputs()
    _, a = pipeline(tmp_path, files, workers=1)
    _, b = pipeline(tmp_path, files, workers=2)
    _, c = pipeline(tmp_path, files, workers=2)  # a rerun over a finished output
    assert tree(a["out"]) == tree(b["out"]) == tree(c["out"])
    # Nothing else is left behind (journal, temp files); identical canvases share one file.
    assert set(tree(a["out"])) == {"records.jsonl", "summary.json"} | {
        r["canvas"] for r in read_jsonl(a["out"] / "records.jsonl") if r["canvas"]}


def test_missing_or_altered_input_files_are_rejected_not_fatal(tmp_path: Path) -> None:
    files = {"a.png": save(Image.new("RGB", (9, 9), 1), "PNG"), "b.png": save(Image.new("RGB", (9, 9), 2), "PNG")}
    src = tmp_path / "photos"
    src.mkdir()
    for k, v in files.items():
        (src / k).write_bytes(v)
    download.run(folder_items(src, False, ()), tmp_path / "dl", tmp_path / "dl.json", CFG, 1.0)
    rows = read_jsonl(tmp_path / "dl" / "manifest.jsonl")
    (tmp_path / "dl" / rows[0]["path"]).unlink()
    (tmp_path / "dl" / rows[1]["path"]).write_bytes(b"changed")
    summary = resize256.run(tmp_path / "dl", tmp_path / "rs", SPEC, 1)
    reasons = [r["reason"] for r in read_jsonl(tmp_path / "rs" / "records.jsonl")]
    assert [r["cause"] for r in read_jsonl(tmp_path / "rs" / "records.jsonl")] == ["missing input", "corrupt input"]
    assert summary["rejected"] == 2 and reasons[0].startswith("missing input: cannot read")
    assert reasons[1].startswith("corrupt input: ") and "does not match the manifest's sha256" in reasons[1]


N_KILL = 80
KILL_SCRIPT = """
import sys
from pathlib import Path
from src.stages import resize256
from testkit.project import CONTRACT
resize256.run(Path(sys.argv[1]), Path(sys.argv[2]), CONTRACT.canvas, 1)
"""


def test_two_sigkills_and_a_torn_journal_then_rerun_renders_only_the_rest_and_matches_an_uninterrupted_run(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, dl = tmp_path / "photos", tmp_path / "dl"
    src.mkdir()
    rng = np.random.default_rng(7)
    for i in range(N_KILL):
        small = Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).resize((640, 480))
        (src / f"{i:03d}.jpg").write_bytes(save(small, "JPEG"))
    download.run(folder_items(src, False, ()), dl, tmp_path / "dl.json", CFG, 0.0)
    out = tmp_path / "killed"
    journaled = len(kill_midway(KILL_SCRIPT, [str(dl), str(out)], out / "journal.jsonl", 10, timeout_s=30))
    assert 10 <= journaled < N_KILL and not (out / "records.jsonl").exists()  # it really died midway
    with (out / "journal.jsonl").open("a") as f:  # what a kill in the middle of an append leaves
        f.write('{"sha256": "torn", "sp')
    journaled = len(kill_midway(KILL_SCRIPT, [str(dl), str(out)], out / "journal.jsonl", journaled + 10, timeout_s=30))
    assert journaled < N_KILL and not (out / "records.jsonl").exists()  # killed a second time
    capsys.readouterr()
    resize256.run(dl, out, SPEC, 2)
    assert f"; {journaled} resumed ->" in capsys.readouterr().out  # rendered only what the journal lacked
    resize256.run(dl, tmp_path / "clean", SPEC, 2)
    assert tree(out) == tree(tmp_path / "clean")
    assert not (out / "journal.jsonl").exists() and not list(out.rglob("*.tmp"))


def test_a_rerun_renders_only_new_photos_and_a_new_contract_renders_all(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, dl, out = tmp_path / "photos", tmp_path / "dl", tmp_path / "rs"
    src.mkdir()
    for i in range(6):
        (src / f"{i}.png").write_bytes(save(Image.new("RGB", (30 + i, 20), (i, 2 * i, 3 * i)), "PNG"))
    download.run(folder_items(src, False, ()), dl, tmp_path / "dl.json", CFG, 0.0)
    resize256.run(dl, out, SPEC, 1)
    (src / "new.png").write_bytes(save(Image.new("RGB", (50, 10), 9), "PNG"))
    download.run(folder_items(src, False, ()), dl, tmp_path / "dl.json", CFG, 0.0)
    capsys.readouterr()
    resize256.run(dl, out, SPEC, 1)  # the persisted output of the last run, as DVC leaves it
    assert "; 6 resumed ->" in capsys.readouterr().out
    resize256.run(dl, tmp_path / "clean", SPEC, 1)
    assert tree(out) == tree(tmp_path / "clean")
    resize256.run(dl, out, SPEC.model_copy(update={"size": SPEC.size // 2}), 1)
    assert "; 0 resumed ->" in capsys.readouterr().out


def photo_like(w: int, h: int, seed: int) -> Image.Image:
    """Smooth gradients with a little noise: something a lossy phone codec keeps close, unlike pure noise."""
    y, x = np.mgrid[0:h, 0:w]
    noise = np.random.default_rng(seed).integers(-12, 12, (h, w, 3))
    rgb = np.stack([255 * x / w, 255 * y / h, 128 + 100 * np.sin(x / 9.0 + seed)], -1) + noise
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8), "RGB")


def heif_bytes(frames: list[Image.Image], primary: int = 0) -> bytes:
    """A HEIC file as a phone writes it (HEVC via pillow-heif's libheif and x265), `primary` the shown image."""
    import pillow_heif  # the plugin the pipeline reads HEIC with; it also writes it

    heif = pillow_heif.from_pillow(frames[0])
    for f in frames[1:]:
        heif.add_from_pillow(f)
    buf = io.BytesIO()
    heif.save(buf, quality=90, primary_index=primary)
    return buf.getvalue()


def test_phone_formats_heic_and_multi_frame_files_become_the_app_canvas(tmp_path: Path) -> None:
    """HEIC (one image, and a burst whose primary image is not the first), AVIF, a multipage TIFF and an
    animated WebP go through download and resize256; each canvas is the Skia drawing of the one image a
    gallery shows, and that image is the right one (its own pixels, not another frame's)."""
    import pillow_heif

    shown, other = photo_like(300, 200, 1), photo_like(300, 200, 2).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    files = {
        "IMG_0001.HEIC": heif_bytes([shown]),
        "IMG_0002.HEIC": heif_bytes([other, shown], primary=1),  # a burst: the gallery shows the primary
        "IMG_0003.avif": save(shown, "AVIF", quality=90),
        "scan.tif": save(shown, "TIFF", save_all=True, append_images=[other]),  # lossless: exact
        "clip.webp": save(shown, "WEBP", lossless=True, save_all=True, append_images=[other]),
    }
    recs, info = pipeline(tmp_path, files)
    out = info["out"]
    rows = {r["name"]: r for r in read_jsonl(tmp_path / "dl" / "manifest.jsonl")}
    assert {n: (rows[n]["status"], rows[n]["format"], (rows[n]["path"] or "").rsplit(".", 1)[-1]) for n in files} == {
        "IMG_0001.HEIC": ("ok", "HEIF", "heic"), "IMG_0002.HEIC": ("ok", "HEIF", "heic"),
        "IMG_0003.avif": ("ok", "AVIF", "avif"), "scan.tif": ("ok", "TIFF", "tif"), "clip.webp": ("ok", "WEBP", "webp")}
    assert all(recs[n]["status"] == "ok" for n in files), {n: recs[n]["reason"] for n in files}
    skia_of_shown = np.asarray(android_canvas(shown, SPEC)).astype(int)
    for name in ("scan.tif", "clip.webp"):  # lossless: exactly the app's drawing of the first frame
        np.testing.assert_array_equal(canvas(out, recs[name]), skia_of_shown, err_msg=name)
    heif_primary = pillow_heif.open_heif(io.BytesIO(files["IMG_0002.HEIC"]))
    assert heif_primary.primary_index == 1  # the file really is a burst whose shown image is the second
    for name, decoded in (("IMG_0001.HEIC", pillow_heif.open_heif(io.BytesIO(files["IMG_0001.HEIC"]))[0].to_pillow()),
                          ("IMG_0002.HEIC", heif_primary[heif_primary.primary_index].to_pillow()),
                          ("IMG_0003.avif", Image.open(io.BytesIO(files["IMG_0003.avif"])).convert("RGB"))):
        c = canvas(out, recs[name]).astype(int)
        # the Skia drawing of the decoded image, bit for bit: what the app draws from the same decoder output
        np.testing.assert_array_equal(c, np.asarray(android_canvas(decoded.convert("RGB"), SPEC)), err_msg=name)
        # and that image is the shown one, up to the codec's loss (the other frame is far: ~100 levels off)
        assert np.abs(c - skia_of_shown).mean() < 6, name
        assert np.abs(c - np.asarray(android_canvas(other, SPEC)).astype(int)).mean() > 40, name


@pytest.mark.parametrize("exif", ["ignore", "apply"])
def test_a_heic_rotation_is_part_of_its_image_whatever_canvas_exif_says(exif: str) -> None:
    """A portrait phone photo is landscape pixels plus a HEIF rotation (irot), which the HEIF standard makes part
    of the image: libheif applies it under either `contract.canvas.exif`, which governs EXIF orientation only."""
    exif_tag = Image.Exif()
    exif_tag[0x0112] = 6  # pillow-heif writes this as the file's irot box, as a phone does
    data = save(Image.new("RGB", (40, 20), (200, 200, 0)), "HEIF", exif=exif_tag.tobytes())
    assert decode(data, SPEC.model_copy(update={"exif": exif})).size == (20, 40)


def test_rejected_photos_are_named_on_the_console_with_their_cause(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = {f"junk{i:02d}.jpg": b"<html>%d</html>" % i for i in range(12)}
    files["good.png"] = save(Image.new("RGB", (9, 9), 1), "PNG")
    files["sliver.png"] = save(Image.new("RGB", (1000, 1), (1, 2, 3)), "PNG")
    capsys.readouterr()
    _, info = pipeline(tmp_path, files)
    said = capsys.readouterr().out
    # download refuses what is not an image; resize256 what cannot become a canvas: both by name and cause
    assert f"download: 12 failed (every one with its cause in {tmp_path / 'dl' / 'manifest.jsonl'}):" in said
    assert "\n  junk00.jpg: not an image: 14 bytes starting b'<html>0</html>'" in said
    assert "\n  junk09.jpg: not an image" in said and "junk10.jpg" not in said and "\n  ... and 2 more\n" in said
    assert (f"resize256: 1 rejected (every one with its cause in {info['out'] / 'records.jsonl'}):\n"
            "  sliver.png: side below one pixel: aspect ratio 1000x1 scales to 256x0") in said
