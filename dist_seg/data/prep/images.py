"""Reading an image file for the converter and the EDA: decode fully (a truncated file fails here), apply
the EXIF orientation, convert to RGB, check the size against the json, and keep the original bytes when
nothing had to change."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from dist_seg.data.prep.coco import ImageEntry, Problem


@dataclass
class DecodedImage:
    data: bytes  # bytes to store: the original file or a re-encoding
    ext: str  # "jpg" or "png"
    width: int
    height: int
    actions: list[str]


def read_image(path: Path, entry: ImageEntry) -> tuple[DecodedImage | None, Problem | None]:
    """Read and check an image file; keep its original bytes unless EXIF rotation or colour conversion is needed."""
    where = entry.where()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None, Problem("missing_image_file", f"{where}: {path} does not exist")
    except OSError as e:
        return None, Problem("unreadable_image", f"{where}: {path}: {e}")
    try:
        img = Image.open(io.BytesIO(raw))
        fmt = img.format
        img.load()  # decodes fully: a truncated file fails here
        orientation = img.getexif().get(0x0112, 1)
        actions: list[str] = []
        if orientation not in (1, None):
            img = ImageOps.exif_transpose(img)
            actions.append(f"exif_orientation_{orientation}")
        if img.mode != "RGB":
            actions.append(f"converted_{img.mode}_to_RGB")
            img = img.convert("RGB")
    except Exception as e:  # PIL raises many types for corrupt data
        return None, Problem("unreadable_image", f"{where}: {path}: {type(e).__name__}: {e}")
    if img.size != (entry.width, entry.height):
        return None, Problem(
            "size_mismatch",
            f"{where}: file is {img.size[0]}x{img.size[1]}, json says {entry.width}x{entry.height}",
        )
    if fmt in ("JPEG", "PNG") and not actions:
        return DecodedImage(
            raw, "jpg" if fmt == "JPEG" else "png", img.size[0], img.size[1], ["kept_original"]
        ), None
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.save(buf, format="JPEG", quality=95)
        ext = "jpg"
    else:
        img.save(buf, format="PNG")
        ext = "png"
        if fmt != "PNG":
            actions.append(f"reencoded_{fmt}_to_PNG")
    return DecodedImage(buf.getvalue(), ext, img.size[0], img.size[1], actions), None
