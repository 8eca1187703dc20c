"""A reference image the project did not make, made to look like the prior's own views.

    rgba = read_image("render.png")                      # (H, W, 4) float, alpha 1 without one
    ref = matte_reference(rgba)                           # soft alpha, colour without the background;
                                                          # ref.how says how
    image, mask = prepare_matte(ref, prior_background, 32)  # light normalised, framed as the prior's views
    camera = estimate_reference_camera(prior, image, 2.5, 42.0, 15.0,  # direction searched, distance read
                                       coverage=ref.rgba[..., 3])          # a box's outline read first

Artists' renders and photos differ from the prior's training views in four ways, each handled here:
background (alpha when the image has one; otherwise a smooth background model fitted to the border
-- plain or gradient -- keyed by distance, the mask cleaned by morphology, soft edges unmixed from
the background), framing (recentred and rescaled to the prior's), light (sRGB decoded to the
prior's linear values, shadows lifted to its ambient floor, exposure matched) and camera (the
request's, moved as the framing moved the object: :func:`rig_reference_camera`; otherwise the
distance read from the silhouette, the elevation (and a box's azimuth) a box's or cylinder's outline
shows, and the rest under which the prior finds the image most likely: :func:`estimate_reference_camera`).
"""
from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine_server.cameras import Camera, azimuth_elevation, look_at, orbit_position

logger = logging.getLogger(__name__)

MAX_IMAGE_SIDE = 8192
"""Largest accepted reference image side in pixels."""
MAX_IMAGE_BYTES = 64 * 1024 * 1024
"""Largest accepted reference image file in bytes."""


class BadImageError(ValueError):
    """A reference image that cannot be used; the message names the problem in one line."""


# ------------------------------------------------------------------------------------------ image input


def read_image(source: str | Path | bytes | np.ndarray) -> np.ndarray:
    """A reference image as (H, W, 4) float32 RGBA in [0, 1] (alpha 1 when the image has none).

    source: a file path, encoded bytes (PNG / JPEG / ...), or an (H, W, 3|4) uint8 / float array.
    Raises :class:`BadImageError` for a missing, empty, unreadable or too large image.
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, np.ndarray):
        arr = source
        if arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.shape[0] == 0 or arr.shape[1] == 0:
            raise BadImageError(f"reference image array must be (H, W, 3|4), got shape {arr.shape}")
        arr = arr.astype(np.float32) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float32)
        if not np.isfinite(arr).all():
            raise BadImageError("reference image array holds non-finite values")
        arr = np.clip(arr, 0.0, 1.0)
    else:
        name = "image bytes"
        if isinstance(source, (bytes, bytearray)):
            data = bytes(source)
        else:
            path = Path(source)
            name = str(path)
            if not path.is_file():
                raise BadImageError(f"reference image {name} does not exist")
            size = path.stat().st_size
            if size > MAX_IMAGE_BYTES:
                raise BadImageError(f"reference image {name} is too large: {size} bytes (limit {MAX_IMAGE_BYTES})")
            data = path.read_bytes()
        if len(data) == 0:
            raise BadImageError(f"reference image {name} is empty (0 bytes)")
        if len(data) > MAX_IMAGE_BYTES:
            raise BadImageError(f"reference image {name} is too large: {len(data)} bytes (limit {MAX_IMAGE_BYTES})")
        try:
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if w == 0 or h == 0:
                    raise BadImageError(f"reference image {name} is empty ({w}x{h} pixels)")
                if max(w, h) > MAX_IMAGE_SIDE:
                    raise BadImageError(f"reference image {name} is too large: {w}x{h} pixels "
                                        f"(limit {MAX_IMAGE_SIDE} per side)")
                im.load()
                arr = np.asarray(im.convert("RGBA"), dtype=np.float32) / 255.0
        except BadImageError:
            raise
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise BadImageError(f"cannot read reference image {name}: not a readable image file ({exc})") from None
    if max(arr.shape[:2]) > MAX_IMAGE_SIDE:
        raise BadImageError(f"reference image is too large: {arr.shape[1]}x{arr.shape[0]} pixels "
                            f"(limit {MAX_IMAGE_SIDE} per side)")
    if arr.shape[2] == 3:
        arr = np.concatenate([arr, np.ones_like(arr[..., :1])], axis=2)
    return np.ascontiguousarray(arr)


# ------------------------------------------------------------------------------------------ matte


BORDER = 4
"""Width in pixels of the image border the background model is fitted to."""
KEY_THRESHOLD = 0.12
"""Foreground: RGB distance to the background model above this (or above 5 sigma of the border's noise)."""
PLAIN_FRACTION = 0.85
"""The background model must explain at least this fraction of the border pixels."""
MAX_NOISE = 0.04
"""Largest noise (robust sigma, RGB distance) of the border around the background model: a backdrop, not a scene."""


@dataclass
class Matte:
    """A reference with its foreground found: what the rest of the pipeline reads."""

    rgba: np.ndarray
    """(H, W, 4) float32: RGB of the object (background unmixed at soft edges), alpha its coverage."""
    mask: np.ndarray
    """(H, W) bool foreground (alpha > 0.5, cleaned)."""
    how: str
    """"alpha" (the image's own transparency) or "colour" (a plain or gradient background keyed out)."""


def _background_model(rgb: np.ndarray, degree: int = 2) -> tuple[np.ndarray, float, float]:
    """Fit a per-channel polynomial in (x, y) of ``degree`` to the border pixels, robustly.

    Returns the modelled background (H, W, 3), the border noise (robust sigma) and the fraction of
    border pixels the model explains. Border pixels on the object (touching the frame) are dropped
    by two rounds of refitting without the worst outliers.
    """
    h, w, _ = rgb.shape
    yy, xx = np.mgrid[0:h, 0:w]
    x, y = 2 * xx / max(w - 1, 1) - 1, 2 * yy / max(h - 1, 1) - 1
    terms = [x ** i * y ** j for i in range(degree + 1) for j in range(degree + 1 - i)]
    basis = np.stack(terms, -1).reshape(-1, len(terms))
    border = np.zeros((h, w), bool)
    b = min(BORDER, h // 4, w // 4) or 1
    border[:b], border[-b:], border[:, :b], border[:, -b:] = True, True, True, True
    idx = np.flatnonzero(border.ravel())
    pix = rgb.reshape(-1, 3)
    keep = np.ones(len(idx), bool)
    for _ in range(3):
        coef, *_ = np.linalg.lstsq(basis[idx[keep]], pix[idx[keep]], rcond=None)
        resid = np.linalg.norm(basis[idx] @ coef - pix[idx], axis=1)
        sigma = 1.4826 * float(np.median(resid[keep])) + 1e-3
        keep = resid <= max(4 * sigma, 0.03)
    model = (basis @ coef).reshape(h, w, 3)
    explained = float((resid <= max(KEY_THRESHOLD, 5 * sigma)).mean())
    return model, sigma, explained


def _clean(mask: np.ndarray, dist: np.ndarray | None = None, threshold: float = 0.0) -> np.ndarray:
    """Opened (specks gone), the large components only (>= 10% of the largest), false holes filled.

    A hole is false (object pixels that happen to look like the background) when it is tiny or its
    mean distance to the background model ``dist`` is over half ``threshold``; a real hole (a torus's)
    shows the background itself and stays. Without ``dist`` (an alpha matte) holes are real.
    """
    from scipy import ndimage

    opened = ndimage.binary_opening(mask, structure=np.ones((3, 3), bool))
    if opened.sum() >= 0.5 * mask.sum():  # a thin object (a stick) is not opened away
        mask = opened
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = ndimage.sum(mask, labels, index=np.arange(1, n + 1))
        mask = np.isin(labels, 1 + np.flatnonzero(sizes >= 0.1 * sizes.max()))
    if dist is None:
        return mask
    holes, n = ndimage.label(ndimage.binary_fill_holes(mask) & ~mask)
    for k in range(1, n + 1):
        hole = holes == k
        if hole.sum() < 4 or dist[hole].mean() > 0.5 * threshold:
            mask = mask | hole
    return mask


def matte_reference(rgba: np.ndarray) -> Matte:
    """The object of an RGBA reference (see :func:`read_image`) and its coverage.

    With transparency, alpha decides. Otherwise the background is modelled from the image border as
    a smooth (quadratic) colour field, so plain and gradient backdrops both key out; foreground is
    what lies further than :data:`KEY_THRESHOLD` from it, cleaned by :func:`_clean`; the edge pixels
    get a soft alpha from the distance, and their colour is unmixed from the background.
    Raises :class:`BadImageError` when no smooth background explains the border or nothing stands out.
    """
    alpha = rgba[..., 3]
    if (alpha < 0.99).mean() > 0.001:
        mask = _clean(alpha > 0.5)
        out = rgba.copy()
        out[..., 3] = np.where(mask, np.maximum(alpha, 0.5), np.minimum(alpha, 0.5) * _grow(mask))  # specks gone
        how = "alpha"
    else:
        rgb = rgba[..., :3]
        model, sigma, explained = _background_model(rgb)
        if explained < PLAIN_FRACTION or sigma > MAX_NOISE:
            raise BadImageError(
                "reference image has no transparency and no plain background (or smooth gradient) to remove "
                f"(a smooth background explains {explained:.0%} of its border, noise {sigma:.2f}); "
                "use a PNG with an alpha channel")
        dist = np.linalg.norm(rgb - model, axis=2)
        threshold = max(KEY_THRESHOLD, 5 * sigma)
        mask = _clean(dist > threshold, dist, threshold)
        out = np.concatenate([rgb, mask[..., None].astype(np.float32)], axis=2)
        _soften_edges(out, mask, model)
        how = "colour"
    fraction = float(mask.mean())
    if mask.sum() < 4 or fraction < 0.002:
        raise BadImageError(f"reference image has no foreground: nothing stands out from the background "
                            f"({how} mask covers {fraction:.2%})")
    if fraction > 0.95:
        raise BadImageError(f"reference image has no background: the foreground covers {fraction:.0%} of it")
    return Matte(np.ascontiguousarray(out, dtype=np.float32), mask, how)


def _soften_edges(rgba: np.ndarray, mask: np.ndarray, background: np.ndarray) -> None:
    """Soft alpha and unmixed colour on the mask's rim, in place (observed = a F + (1 - a) B).

    F, the object's colour there, is taken from the object's inside nearby (a blur of the interior
    pixels), so a is the observed colour's projection on the line from B to F: exact for a thin
    mixed edge whatever the background's brightness. Inside the mask a >= 0.5, outside <= 0.5.
    """
    from scipy import ndimage

    inside = ndimage.binary_erosion(mask, structure=np.ones((3, 3), bool))
    if not inside.any():
        return
    rgb = rgba[..., :3]
    weight = ndimage.gaussian_filter(inside.astype(np.float32), 2.0)
    fg = np.stack([ndimage.gaussian_filter(rgb[..., c] * inside, 2.0) for c in range(3)], -1)
    fg = fg / np.maximum(weight[..., None], 1e-6)
    band = (_grow(mask) > 0) & ~inside & (weight > 1e-3)
    d = fg[band] - background[band]
    a = ((rgb[band] - background[band]) * d).sum(1) / np.maximum((d * d).sum(1), 1e-6)
    a = np.clip(a, 0.0, 1.0)
    a = np.where(mask[band], np.maximum(a, 0.5), np.minimum(a, 0.5))
    rgba[..., 3][band] = a
    rgba[..., :3][band] = np.clip(fg[band], 0.0, 1.0)


def _grow(mask: np.ndarray) -> np.ndarray:
    """``mask`` grown by one pixel (3x3), as float32 0/1."""
    from scipy import ndimage

    return ndimage.binary_dilation(mask, structure=np.ones((3, 3), bool)).astype(np.float32)


def foreground_mask(rgba: np.ndarray) -> tuple[np.ndarray, str]:
    """Foreground (H, W) bool of an RGBA image and how it was found ("alpha" or "colour"); see :func:`matte_reference`."""
    m = matte_reference(rgba)
    return m.mask, m.how


# ------------------------------------------------------------------------------------------ light


AMBIENT_FLOOR = 0.38
"""Darkest shade of the bundled prior's training light (its ambient term) relative to the lit side."""
LIT_LEVEL = 0.9
"""Brightest channel of the lit side of the prior's objects (its colours' largest channel is 0.7-0.95)."""
DARK_OBJECT = 0.12
"""A lit side darker than this (linear) is a dark object (black in the vocabulary): exposure is left alone."""


def srgb_to_linear(c: np.ndarray) -> np.ndarray:
    """sRGB-encoded values in [0, 1] -> linear (the IEC 61966-2-1 curve)."""
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def normalise_light(rgba: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The object's colours moved toward how the prior saw its objects; returns a new (H, W, 4).

    An image file holds sRGB values, the prior's views hold linear albedo x shade: decode. The
    prior's light never leaves a side darker than its ambient floor, an artist's sun does: lift
    every pixel toward the object's lit colour by that floor (shade s -> floor + (1 - floor) s).
    An under- or over-exposed render: scale so the lit side's brightest channel is :data:`LIT_LEVEL`,
    unless the object is dark.
    """
    out = rgba.copy()
    lin = srgb_to_linear(rgba[..., :3])
    fg = lin[mask]
    lum = fg @ np.array([0.2126, 0.7152, 0.0722])
    lit = fg[lum >= np.quantile(lum, 0.8)]
    lit_colour = np.median(lit, axis=0)
    lifted = (1 - AMBIENT_FLOOR) * lin + AMBIENT_FLOOR * lit_colour
    top = float(np.quantile(lifted[mask].max(axis=1), 0.95))
    if lit_colour.max() >= DARK_OBJECT and top > 0:
        lifted = lifted * (LIT_LEVEL / top)
    out[..., :3] = np.clip(lifted, 0.0, 1.0)
    return out


# ------------------------------------------------------------------------------------------ framing


def prepare_matte(matte: Matte, background_rgb, resolution: int,
                  recenter: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """A matted reference as the prior's views show an object: light normalised (:func:`normalise_light`),
    framed and composited (:func:`prepare_reference`). Image (3, R, R), mask (R, R) bool.

    The one way every job (``generate --image``, ``multiview --image``, the server's image jobs) prepares it.
    """
    return prepare_reference(normalise_light(matte.rgba, matte.mask), matte.mask, background_rgb, resolution,
                             recenter=recenter)


def framing(mask: np.ndarray, recenter: bool = True, target_fraction: float = 0.6) -> tuple[float, float, int]:
    """The square :func:`prepare_reference` cuts from an image with foreground ``mask`` (H, W): centre row,
    centre column and side, in the image's pixels (the whole image padded to a square, or a recentred cut)."""
    h, w = mask.shape
    rows, cols = np.nonzero(mask)
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    side = max(h, w)
    cy, cx = 0.5 * h, 0.5 * w
    if recenter:
        extent = max(r1 - r0, c1 - c0)
        off = max(abs(0.5 * (r0 + r1) - cy), abs(0.5 * (c0 + c1) - cx)) / side
        # Only an image framed as the prior's already is kept: a cube covering 0.41 of Blender's default
        # frame, kept as it was, read to the prior as a small cube seen from 50 degrees instead of 40.
        if off > 0.05 or abs(extent / side - target_fraction) > 0.1:
            side = int(math.ceil(extent / target_fraction))
            cy, cx = 0.5 * (r0 + r1), 0.5 * (c0 + c1)
    return float(cy), float(cx), int(side)


def prepare_reference(rgba: np.ndarray, mask: np.ndarray, background_rgb, resolution: int,
                      recenter: bool = True, target_fraction: float = 0.6) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference composited on ``background_rgb`` at ``resolution``: image (3, R, R) in [0, 1], mask (R, R) bool.

    With ``recenter`` an object that is off-centre or too small / large is moved to the centre and
    scaled so its larger bounding-box side covers ``target_fraction`` of the frame (as the prior's
    training objects do at its default camera); otherwise the image is only padded to a square.
    """
    from PIL import Image

    bg = np.asarray(background_rgb, dtype=np.float32).reshape(1, 1, 3)
    has_alpha = bool((rgba[..., 3] < 0.99).any())
    a = rgba[..., 3:4] if has_alpha else mask[..., None].astype(np.float32)  # soft edges from alpha
    rgb = rgba[..., :3] * a + bg * (1 - a)
    h, w = mask.shape
    cy, cx, side = framing(mask, recenter, target_fraction)
    # Square canvas of `side` pixels centred at (cy, cx), background outside the image.
    top, left = int(round(cy - side / 2)), int(round(cx - side / 2))
    canvas = np.broadcast_to(bg, (side, side, 3)).copy()
    canvas_mask = np.zeros((side, side), dtype=np.float32)
    sr0, sc0 = max(top, 0), max(left, 0)
    sr1, sc1 = min(top + side, h), min(left + side, w)
    canvas[sr0 - top:sr1 - top, sc0 - left:sc1 - left] = rgb[sr0:sr1, sc0:sc1]
    canvas_mask[sr0 - top:sr1 - top, sc0 - left:sc1 - left] = mask[sr0:sr1, sc0:sc1]
    img = Image.fromarray((canvas * 255).round().astype(np.uint8)).resize((resolution, resolution), Image.BOX)
    m = Image.fromarray((canvas_mask * 255).astype(np.uint8)).resize((resolution, resolution), Image.BOX)
    image = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
    small_mask = torch.from_numpy(np.asarray(m, dtype=np.float32) / 255.0) > 0.5
    if not small_mask.any():
        raise BadImageError(f"reference image has no foreground left at {resolution}x{resolution} pixels "
                            "(the object is too small)")
    return image, small_mask


# ------------------------------------------------------------------------------------------ camera


ELEVATIONS = tuple(range(-5, 51, 5))
"""Candidate reference elevations, degrees: inside the bundled prior's training range (-10..60), whose
edges its camera-only branch scores too well (a cube seen from 20 degrees came out at 60)."""
AZIMUTHS = (0.0, 22.5, 45.0, 67.5)
"""Candidate reference azimuths, degrees: the vocabulary's shapes repeat every 90 degrees about Z."""
FLAT = 0.02
"""Relative spread of the scores under which the prior cannot tell cameras apart (the default is kept)."""
OBJECT_WIDTH = 1.0
"""Width across the view, in the unit box, assumed for the object when its distance is read from its silhouette:
exact for a round object (sphere, cylinder, cone, torus) from any side; a box seen on its corner is up to sqrt(2)
wider, and its distance comes out up to 30% short."""
DISTANCE_RANGE = (0.7, 1.5)
"""The distance read from the silhouette is kept within these multiples of the prior's default distance."""


def silhouette_distance(mask: torch.Tensor, fov_y_deg: float, default_distance: float,
                        object_width: float = OBJECT_WIDTH) -> float:
    """Distance at which a ball ``object_width`` wide fills the width of ``mask`` (R, R) bool's silhouette
    in a square frame of vertical FOV ``fov_y_deg``, kept within :data:`DISTANCE_RANGE` of ``default_distance``."""
    cols = torch.nonzero(mask.any(0)).flatten()
    width = float(cols.max() - cols.min() + 1) / mask.shape[1]
    half = math.atan(width * math.tan(math.radians(fov_y_deg) / 2))  # the silhouette's half angle
    distance = 0.5 * object_width / math.sin(half)  # a near ball looks wider than its diameter over its distance
    lo, hi = DISTANCE_RANGE
    return float(min(max(distance, lo * default_distance), hi * default_distance))


PRISM_SIDE = 0.38
"""A silhouette is a prism's (box, cylinder) when its sides hold straight, near-vertical runs this share of its
height long on average: a sphere's outline stays within a pixel of a line over at most ~0.3 of its height, a cone's
is slanted; a box's vertical edges cover 0.44-0.48 of its silhouette at 40 degrees, 0.37 at 50 (read by the prior)."""
PRISM_SLOPE = 0.15
"""Most columns per row of a "vertical" side: Blender's default perspective tilts a box's edges by < 0.1."""
PRISM_ROWS = 256
"""The silhouette is measured with its height at most this many rows (longer ones are shrunk first)."""
PRISM_MIN_ROWS = 40
"""Silhouettes fewer rows tall are not read: on a small aliased disc (28 rows) the pixel steps pass for straight
sides; Blender's default camera shows its 2 m cube 50 rows tall at 256 px even with a 35 mm lens."""


@dataclass
class PrismView:
    """What a prism's silhouette tells of the camera: read by :func:`prism_view`."""

    elevation_deg: float
    """Camera elevation (a prism's top shows ``width * sin(elevation)`` above and below its vertical sides)."""
    azimuth_deg: float | None
    """Azimuth modulo 90 degrees of a box whose sides face the axes (0: face on), from how far its top face's left
    and right corners lie below its far corner; None when the top face is too thin to tell."""
    width: float
    """Width of the object across the view in unit-box units (its largest side 1, taken to be its height):
    up to sqrt(2) for a cube seen on its corner."""


def _row_edges(alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sub-pixel left and right silhouette edges (columns) of each row of a coverage (H, W), every row covered:
    the coverage summed either side of the centre column, so a soft rim gives a fractional edge."""
    cols = np.flatnonzero(alpha.max(0) > 0.5)
    mid = int(0.5 * (cols.min() + cols.max() + 1))
    return mid - alpha[:, :mid].sum(1), mid + alpha[:, mid:].sum(1)


def _vertical_run(x: np.ndarray, tol: float) -> tuple[int, int, np.ndarray]:
    """(start, length, line) of the longest run of ``x`` (rows' edge columns) within ``tol`` of a line of slope at
    most :data:`PRISM_SLOPE` columns per row; line: (slope, offset) of that fit, in rows from 0."""
    best, start, line = 0, 0, np.zeros(2)
    rows = np.arange(len(x), dtype=np.float64)
    for i in range(len(x)):
        j = i + best + 1
        while j <= len(x):
            a = np.stack([rows[i:j], np.ones(j - i)], 1)
            coef = np.linalg.lstsq(a, x[i:j], rcond=None)[0]
            if abs(coef[0]) > PRISM_SLOPE or np.abs(a @ coef - x[i:j]).max() > tol:
                break
            best, start, line = j - i, i, coef
            j += 1
    return start, best, line


def _first_on_line(x: np.ndarray, line: np.ndarray, tol: float) -> int:
    """The first row whose ``x`` lies within ``tol`` of ``line`` (slope, offset): where a side's edge begins, even
    when a jagged pixel broke its run below."""
    near = np.abs(x - (line[0] * np.arange(len(x)) + line[1])) <= tol
    return int(np.argmax(near))


def prism_view(coverage: np.ndarray) -> PrismView | None:
    """The camera a box's or cylinder's silhouette shows, or None for another shape (see :data:`PRISM_SIDE`).

    coverage: (H, W) foreground coverage in [0, 1] (a matte's alpha) of one object standing upright. Seen from
    elevation e, a prism of height h and footprint width w across the view (a square's depth across the view equals
    its width, whatever its turn) has vertical sides h cos(e) long and a silhouette h cos(e) + w sin(e) tall, so
    sin(e) = (height - side) / width. Turned a from face on (the orbit's azimuth), a box's top corners left and
    right lie in proportion cos(a) : sin(a) below its far corner. Orthographic: Blender's default camera
    (11 m from a 2 m object) moves the elevation a few degrees up (5 at 0).
    """
    from PIL import Image

    rows = np.flatnonzero(coverage.max(1) > 0.5)
    cols = np.flatnonzero(coverage.max(0) > 0.5)
    if len(rows) == 0 or rows[-1] + 1 - rows[0] < PRISM_MIN_ROWS or len(cols) < 8:
        return None
    alpha = np.asarray(coverage[rows[0]:rows[-1] + 1, max(cols[0] - 1, 0):cols[-1] + 2], dtype=np.float32)
    if alpha.shape[0] > PRISM_ROWS:  # the run search's cost grows with the rows; 256 resolve a degree
        scale = PRISM_ROWS / alpha.shape[0]
        size = (max(int(round(alpha.shape[1] * scale)), 8), PRISM_ROWS)
        alpha = np.asarray(Image.fromarray(alpha, mode="F").resize(size, Image.BOX))
    alpha = alpha[alpha.max(1) > 0.5]
    height = float(len(alpha))
    left, right = _row_edges(alpha)
    width = float((right - left).max())
    tol = max(0.6, 0.006 * height)  # anti-aliasing and the render's own stair steps
    (_, ln, l_line), (_, rn, r_line) = _vertical_run(left, tol), _vertical_run(-right, tol)
    if ln + rn < 2 * PRISM_SIDE * height:  # the mean: one side's run can break early on a jagged edge
        return None
    # A cylinder's caps leave its sides tangentially, so its straight runs reach sqrt(tol)-far into them; the runs
    # at 4 tol reach twice as far, and 2 L(tol) - L(4 tol) is the sides' own length (a box's corners: ~L(tol)).
    (_, ln4, _), (_, rn4, _) = _vertical_run(left, 4 * tol), _vertical_run(-right, 4 * tol)
    side = min(ln + rn - 0.5 * (ln4 + rn4), 0.5 * (ln + rn))
    elevation = math.degrees(math.asin(min(max((height - side) / width, 0.0), 1.0)))
    # Top face: its left and right corners start the vertical sides; the far corner is the silhouette's top row.
    drop_left = float(_first_on_line(left, l_line, tol))
    drop_right = float(_first_on_line(-right, r_line, tol))
    azimuth = math.degrees(math.atan2(drop_right, drop_left)) if min(drop_left, drop_right) >= 2 else None
    tall = 0.5 * (ln + rn) / max(math.cos(math.radians(elevation)), 1e-6)  # the sides' length in 3D, about
    return PrismView(elevation, azimuth, float(min(max(width / tall, 0.3), math.sqrt(2.0))))


@dataclass
class ReferenceCamera:
    """Where the reference was seen from, and how that was decided."""

    c2w: torch.Tensor
    """(4, 4) camera-to-world."""
    fov_y_deg: float
    """Vertical field of view, degrees."""
    source: str
    """"rig" (the request's camera), "estimated" (searched with the prior) or "default" (the prior's front view)."""
    elevation_deg: float
    """Orbit elevation, degrees."""
    azimuth_deg: float
    """Orbit azimuth, degrees."""
    scores: dict | None = None
    """For an estimate: {"elevation": [...], "azimuth": [...], "loss": [...]} of every candidate (no loss when a
    prism's outline fixed the direction) and "outline": "prism" when the outline (:func:`prism_view`) was read."""

    @property
    def distance(self) -> float:
        """Distance from the object's centre (the placement), in the unit box's units."""
        return float(self.c2w[:3, 3].norm())

    def record(self) -> dict:
        """What the sidecar / result says about it."""
        return {"source": self.source, "elevation_deg": round(self.elevation_deg, 2),
                "azimuth_deg": round(self.azimuth_deg, 2), "distance": round(self.distance, 3),
                "fov_y_deg": round(self.fov_y_deg, 2)}


def rig_reference_camera(camera: Camera, mask: np.ndarray | None, recenter: bool = True) -> ReferenceCamera:
    """The request's camera of the reference (a rig's first), for the reference as :func:`prepare_matte` frames
    the image with foreground ``mask`` (H, W) (None: no image, the camera as it is).

    The image is padded to a square, whose FOV is the frame's larger one, and, with ``recenter``, cut around the
    object (:func:`framing`): the camera keeps its view direction and that FOV and moves toward the object's
    centre (the unit box's origin) in proportion to the cut. A scene camera 5.6 units from the object, which
    fills 0.4 of its frame, comes 3.7 units close: near the distances the prior was trained at.
    """
    c2w = camera.c2w.float()
    az, el = (float(a) for a in azimuth_elevation(c2w))
    if mask is None:
        return ReferenceCamera(c2w, float(camera.fov_y_deg), "rig", el, az)
    h, w = mask.shape
    square = max(h, w)
    fov = math.degrees(2 * math.atan(math.tan(math.radians(camera.fov_y_deg) / 2) * square / h))
    _, _, side = framing(mask, recenter)
    distance = float(c2w[:3, 3].norm()) * side / square
    return ReferenceCamera(look_at(orbit_position(az, el, distance)), fov, "rig", el, az)


@torch.no_grad()
def estimate_reference_camera(prior, image: torch.Tensor, distance: float, fov_y_deg: float,
                              default_elevation: float, samples: int = 8, seed: int = 0,
                              coverage: np.ndarray | None = None) -> ReferenceCamera:
    """The orbit camera under which the prior finds ``image`` (3, R, R) most likely, or that a prism's outline shows.

    ``coverage`` (H, W), the reference's foreground at its own resolution (a matte's alpha), is read first: a box's or
    cylinder's outline gives its elevation, a box's its azimuth too, and its width across the view
    (:func:`prism_view`; the prior's camera branch put cubes 20-30 degrees off). The distance is read from the
    silhouette (:func:`silhouette_distance`, around the prior's default ``distance``, the object taken as a ball one
    unit wide unless its outline says otherwise): the prior's camera branch scores distances no better than chance
    on a 32 px image, and searching the direction at the distance the image shows keeps the candidates'
    perspective the image's. The FOV stays ``fov_y_deg``: the camera branch takes none, and the silhouette gives
    distance x FOV only. For each candidate direction not fixed by the outline (:data:`ELEVATIONS` x
    :data:`AZIMUTHS`) the image is noised at ``samples`` fixed timesteps and noises (the same for every candidate)
    and denoised by the prior conditioned on that camera alone (no prompt, no reference: its unconditional branch);
    the candidate with the smallest clean-image error wins. A prior whose unconditional branch ignores the camera
    (scores within :data:`FLAT` of each other) keeps the default front view (or the outline's elevation), and
    ``source="default"`` when the outline gave nothing either.
    """
    from engine_server.guidance import Conditioning
    from engine_server.multiview.rig import background_mask

    prism = prism_view(coverage) if coverage is not None else None
    elevations, azimuths = ELEVATIONS, AZIMUTHS
    if prism is not None:
        elevations = (min(max(prism.elevation_deg, float(ELEVATIONS[0])), float(ELEVATIONS[-1])),)
        azimuths = AZIMUTHS if prism.azimuth_deg is None else (prism.azimuth_deg,)
    background = getattr(prior, "background_rgb", None) or (1.0, 1.0, 1.0)
    mask = background_mask(image[None].float(), background)[0]
    width = prism.width if prism is not None else OBJECT_WIDTH
    distance = silhouette_distance(mask, fov_y_deg, distance, width) if mask.any() else distance
    cands = [(float(el), float(az)) for el in elevations for az in azimuths]
    if len(cands) == 1:
        el, az = cands[0]
        logger.info("reference camera read from a prism's outline: elevation %.1f, azimuth %.1f, distance %.2f",
                    el, az, distance)
        return ReferenceCamera(look_at(orbit_position(az, el, distance)), fov_y_deg, "estimated", el, az,
                               {"elevation": [el], "azimuth": [az], "loss": [], "outline": "prism"})
    dev = prior.device
    x0 = prior.encode_images(image[None].to(dev))
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((samples, *x0.shape[1:]), generator=gen).to(dev, x0.dtype)
    t_max = int(prior.num_train_timesteps)
    t = torch.linspace(0.15 * t_max, 0.8 * t_max, samples).long().to(dev)  # where shape is decided, not detail
    acp = prior.alphas_cumprod[t].to(x0.dtype).view(-1, 1, 1, 1)
    x_t = acp.sqrt() * x0 + (1 - acp).sqrt() * noise
    losses = []
    for el, az in cands:
        c2w = look_at(orbit_position(az, el, distance)).to(dev)
        cams = c2w[None].expand(samples, 4, 4)
        inputs = prior.prepare_conditioning(
            Conditioning(reference_image=image.float(), reference_c2w=c2w.cpu(), fov_y_deg=fov_y_deg), cams)
        eps = prior.predict_noise(x_t, t, inputs.uncond, cams)
        x0_hat = (x_t - (1 - acp).sqrt() * eps) / acp.sqrt()
        losses.append(float(((x0_hat - x0) ** 2).mean()))
    loss = np.asarray(losses)
    scores = {"elevation": [c[0] for c in cands], "azimuth": [c[1] for c in cands], "loss": loss.round(6).tolist(),
              "outline": "prism" if prism is not None else None}
    if (loss.max() - loss.min()) / max(loss.min(), 1e-12) < FLAT:
        if prism is not None:
            el = elevations[0]
            return ReferenceCamera(look_at(orbit_position(0.0, el, distance)), fov_y_deg, "estimated", el, 0.0,
                                   scores)
        return ReferenceCamera(look_at(orbit_position(0.0, default_elevation, distance)), fov_y_deg, "default",
                               default_elevation, 0.0, scores)
    el, az = cands[int(loss.argmin())]
    logger.info("reference camera estimated at elevation %.0f, azimuth %.1f, distance %.2f (denoising loss %.4f, "
                "worst %.4f)", el, az, distance, loss.min(), loss.max())
    return ReferenceCamera(look_at(orbit_position(az, el, distance)), fov_y_deg, "estimated", float(el), float(az),
                           scores)
