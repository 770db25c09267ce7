"""The photo formats the pipeline reads: Pillow's own, and HEIC/HEIF through pillow-heif.

Importing this module registers pillow-heif's opener with Pillow, so every `Image.open` in
download (identify), src/data/canvas.py (decode) and the reading client reads the HEIC/HEIF photos
phones save (iPhones by default, many Android phones), as well as JPEG, PNG, WebP, GIF, AVIF, TIFF
and BMP. Embedded thumbnails, depth maps and auxiliary images are not loaded: only the image
itself makes a canvas.

A file with several images shows one in a gallery, and that one is the photo (`shown_frame`):
frame 0 of an animated GIF / WebP / APNG or a multipage TIFF (what `BitmapFactory.decode*`
returns), and the primary image of a HEIF file (a burst, a Live Photo's still, an edited
photo kept beside its original), which pillow-heif opens at and Android's HEIF decoder decodes.
"""

from __future__ import annotations

import pillow_heif
from PIL import Image

pillow_heif.register_heif_opener(thumbnails=False, depth_images=False, aux_images=False)

# Stored file extension per Pillow format (download names stored photos `<sha256>.<ext>`).
EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif", "MPO": "jpg",
       "HEIF": "heic", "AVIF": "avif"}


def shown_frame(img: Image.Image) -> int:
    """The index of the image a gallery shows: HEIF's primary image, frame 0 of anything else."""
    if img.format == "HEIF":
        return img.tell()  # pillow-heif opens a file at its primary image
    return 0
