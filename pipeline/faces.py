"""Identity gate: turn away bad uploads before any GPU time, and check that headshots look like the person.

Face analysis runs offline on CPU with dlib (``pip install dlib-bin face-recognition-models``):
the HOG frontal face detector, the 5-point landmark model and the 128-d ResNet face embedding. Both
model files are CC0. The 68-point landmark model that ships in the same package is never loaded: its
training data (iBUG 300-W) forbids commercial use.

Upload checks, per photo (:func:`analyse_photo`), in this order:

1. ``no_face``          no detection scoring at least ``detector_min_score`` (scores, not just boxes:
                        dlib also returns weak boxes on clothes and textures, e.g. 0.12 on the astronaut's
                        suit next to 1.16 for her face). When there is no face but the whole photo is very
                        dark or very bright, that is reported instead (``too_dark``/``too_bright``);
2. ``multiple_faces``   a second face with at least ``comparable_face_ratio`` x the largest face's area
                        (0.25: at least half as wide; a small face far in the background is tolerated, and
                        the largest face is "the" face). In the two demo portraits side by side the
                        smaller face has 0.48 x the larger one's area: clearly two people, hence not 0.5;
3. ``face_too_small``   face box side below ``min_face_fraction`` of the photo's shorter side, or below
                        ``min_face_px`` pixels;
4. ``too_dark`` / ``too_bright``  mean luminance of the face box (0-255, gamma-encoded as stored);
5. ``blurry``           :func:`face_sharpness` below ``min_sharpness``. Lighting comes before blur because
                        a dark photo is also noisy, and "use more light" fixes both. A photo so blurred
                        that no face is found is reported as ``blurry`` too (:data:`BLURRED_PHOTO_SHARPNESS`).

Then, for one person's photos (:func:`check_person_photos`): ``duplicate`` (perceptual hash within
``duplicate_hamming`` bits of an earlier accepted photo, mirrored copies included) and
``different_person`` (embedding farther than ``max_identity_distance`` from the medoid of the accepted
photos). A person needs ``min_photos`` accepted photos (:func:`missing_photos`).

Output checks (:func:`score_output`): every generated image gets face found, identity distance to the
medoid of the person's accepted photos, and sharpness. The built-in ``tiny`` model draws noise, so its
outputs are recorded as :data:`NOT_APPLICABLE`.

Thresholds were measured on the demo photos (examples/demo/photos, two public-domain portraits in six
variations each); tests/unit/test_faces.py prints and asserts the figures:

- same person, all 30 pairs: embedding distance 0.08-0.25 (to the person's medoid: at most 0.23);
- the two people, all 36 pairs: 0.61-0.70 -> ``max_identity_distance`` 0.6 (dlib's own threshold);
  drawn cartoon faces, which the HOG detector does find, are 0.63-0.79 from the nearest real photo, so
  the identity check turns them away as ``different_person``;
- :func:`face_sharpness` of the demo photos 143-1154; the same photos blurred by 2 % of the face width
  17 or less -> ``min_sharpness`` 50;
- face luminance of the demo photos 104-184; made 5x darker 20-36, 1.8-2.5x brighter 221-237
  -> ``min_brightness`` 40 / ``max_brightness`` 220;
- perceptual hash (pHash, 64 bits) between different demo photos >= 14 bits (mirror images included);
  a re-encoded, resized or slightly cropped copy 0-4 bits -> ``duplicate_hamming`` 6;
- face box / shorter side of the demo photos 0.21-0.65 -> ``min_face_fraction`` 0.15; ``min_face_px``
  80 is the HOG detector's own window (below it the 150 px embedding chip is mostly upscaling).
"""

from __future__ import annotations

import importlib.util
import io
import math
import threading
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image

from pipeline.ingest import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    FACE_REJECTION_REASONS,
    MIN_SIDE_PX,
    PhotoRejected,
    display_name,
    file_too_large,
    sanitize_upload,
)

INSTALL_COMMAND = "pip install dlib-bin face-recognition-models"
SHAPE_PREDICTOR_FILE = "shape_predictor_5_face_landmarks.dat"
FACE_RECOGNITION_FILE = "dlib_face_recognition_resnet_model_v1.dat"
EMBEDDING_SIZE = 128

# Faces are looked for in a copy whose shorter side is at most this many pixels (bigger photos are
# shrunk first; JPEGs are decoded at reduced size by check_files). dlib's HOG window is 80 px, so at
# 768 px every face of 0.104 x the shorter side or more is found without upsampling: every face large
# enough to pass min_face_fraction 0.15 (a photo without one is searched again upsampled, to tell
# "too small" from "none"). A second face half as wide as a main face of 0.15-0.21 x the shorter side
# is below that size and may be missed on large photos: a cost/speed trade-off (upsampling every
# photo costs 4x). Smaller photos are always searched upsampled once (dlib's image pyramid, x2).
ANALYSIS_MIN_SIDE_PX = 768
# ... and at most this many pixels (768 x 1366, 16:9), so that a sliver-shaped photo (a bit flip in a
# header can make a 176 x 65,756 image) costs no more than an ordinary one.
ANALYSIS_MAX_PIXELS = 1_050_000
# Perceptual hash: 32x32 greyscale, DCT, signs of the 8x8 lowest frequencies against their median.
_PHASH_SIZE = 32
_PHASH_LOW = 8
# face_sharpness resamples the face box to this square and normalises its contrast to this standard
# deviation (grey levels), so that the figure depends on focus, not on face size or lighting.
_SHARPNESS_SIZE_PX = 128
_SHARPNESS_CONTRAST = 50.0
_PHOTO_SHARPNESS_SIDE_PX = 384
_PHOTO_SHARPNESS_MAX_PIXELS = 384 * 683
# Below this photo_sharpness a photo without a detectable face is reported as blurry, not as faceless:
# a strong blur is the usual reason the detector misses a face that is there.
BLURRED_PHOTO_SHARPNESS = 15.0
# Framing of aligned_crop, in units of dlib's face chip (the 5-point similarity fit at padding 0, about
# 1.85 eye distances wide). The detector's face box is about 1.25 chip widths, so a crop 3.1 chip widths
# wide shows the face at ~40 % of the width: head, neck and the top of the shoulders.
CROP_SIDE_IN_CHIP_WIDTHS = 3.1
CROP_EYE_LINE_FROM_TOP = 0.40


# --------------------------------------------------------------------------------------------------
# Configuration and results
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GateConfig:
    """Thresholds of the identity gate. The defaults are justified in the module docstring.

    Attributes:
        min_photos: Accepted photos a person needs before training starts.
        max_identity_distance: Largest euclidean distance between 128-d embeddings that still counts
            as the same person (uploads: to the medoid of the person's photos; outputs: likewise).
        min_face_fraction: Smallest face box side as a fraction of the photo's shorter side.
        min_face_px: Smallest face box side in pixels of the checked image (detail for training). The
            reduced decode of :func:`check_files` keeps a shorter side of at least 768 px, where a face
            passing ``min_face_fraction`` is already 115 px, so reduced decoding never trips this.
        min_sharpness: Smallest :func:`face_sharpness` of an accepted face.
        min_brightness: Face mean luminance (0-255) below which a photo is too dark.
        max_brightness: Face mean luminance (0-255) above which a photo is too bright.
        duplicate_hamming: Perceptual hashes differing in at most this many of 64 bits are duplicates.
        detector_min_score: Smallest HOG detector score that counts as a face.
        comparable_face_ratio: A second face with at least this fraction of the largest face's area
            makes the photo ``multiple_faces``.
    """

    min_photos: int = 4
    max_identity_distance: float = 0.6
    min_face_fraction: float = 0.15
    min_face_px: int = 80
    min_sharpness: float = 50.0
    min_brightness: float = 40.0
    max_brightness: float = 220.0
    duplicate_hamming: int = 6
    detector_min_score: float = 0.3
    comparable_face_ratio: float = 0.25

    def __post_init__(self) -> None:
        _check_int("min_photos", self.min_photos, 1, 1000)
        _check_number("max_identity_distance", self.max_identity_distance, 0.0, 2.0, low_open=True)
        _check_number("min_face_fraction", self.min_face_fraction, 0.0, 1.0)
        _check_int("min_face_px", self.min_face_px, 1, 100_000)
        _check_number("min_sharpness", self.min_sharpness, 0.0, 1e9)
        _check_number("min_brightness", self.min_brightness, 0.0, 255.0)
        _check_number("max_brightness", self.max_brightness, 0.0, 255.0)
        if self.min_brightness >= self.max_brightness:
            raise ValueError(f"GateConfig.min_brightness ({self.min_brightness}) must be below "
                             f"GateConfig.max_brightness ({self.max_brightness})")
        _check_int("duplicate_hamming", self.duplicate_hamming, 0, 32)
        _check_number("detector_min_score", self.detector_min_score, -1.0, 5.0)
        _check_number("comparable_face_ratio", self.comparable_face_ratio, 0.0, 1.0, low_open=True)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> GateConfig:
        """Build from a mapping (a YAML section); unknown keys are an error naming them.

        Raises:
            ValueError: Unknown key or value out of range.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown GateConfig setting(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
        return cls(**dict(values))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"GateConfig.{name} must be an integer from {low} to {high} but is {value!r}")


def _check_number(name: str, value: Any, low: float, high: float, *, low_open: bool = False) -> None:
    ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
          and (low < value if low_open else low <= value) and value <= high)
    if not ok:
        bracket = "(" if low_open else "["
        raise ValueError(f"GateConfig.{name} must be a number in {bracket}{low}, {high}] but is {value!r}")


@dataclass
class FaceObservation:
    """One accepted face, in the coordinates of the image that was analysed.

    Attributes:
        box: Detector box ``(left, top, right, bottom)`` in pixels (may reach outside the image).
        score: HOG detector score (higher = more face-like; real faces 0.8-1.6 on the demo photos).
        landmarks: The 5 landmarks ``(x, y)``: outer/inner corner of the eye on the image's right,
            outer/inner corner of the other eye, base of the nose.
        embedding: The 128-d face embedding (compare with euclidean distance).
        sharpness: :func:`face_sharpness` of the face box.
        brightness: Mean luminance of the face box, 0-255.
        phash: 64-bit perceptual hash of the whole photo.
        phash_mirrored: The same for the photo mirrored left-right (front cameras mirror).
        image_size: ``(width, height)`` of the analysed image; :func:`aligned_crop` scales from it.
        face_fraction: Face box side / shorter image side.
    """

    box: tuple[int, int, int, int]
    score: float
    landmarks: tuple[tuple[float, float], ...]
    embedding: tuple[float, ...] = field(repr=False)
    sharpness: float
    brightness: float
    phash: int
    phash_mirrored: int = 0
    image_size: tuple[int, int] = (0, 0)
    face_fraction: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: hashes as 16 hex digits (a 64-bit integer does not survive JavaScript)."""
        values = asdict(self)
        values["phash"] = f"{self.phash:016x}"
        values["phash_mirrored"] = f"{self.phash_mirrored:016x}"
        return values


@dataclass
class PhotoVerdict:
    """The decision on one photo.

    Attributes:
        file: The file name or path as given.
        accepted: Whether the photo can be used for training.
        reason: ``None`` when accepted, else a stable code from ``pipeline.ingest.REJECTION_REASONS``.
        message: One or two sentences for a non-technical operator, starting with the file's name.
        scores: JSON-serialisable measurements (face score, sharpness, brightness, distances, ...).
        observation: The face found, for training crops and reference embeddings (not in ``to_dict``).
    """

    file: str
    accepted: bool
    reason: str | None
    message: str
    scores: dict[str, Any] = field(default_factory=dict)
    observation: FaceObservation | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """``{file, accepted, reason, message, scores}``, as ``headshots check --json`` prints it."""
        return {"file": self.file, "accepted": self.accepted, "reason": self.reason, "message": self.message,
                "scores": dict(self.scores)}


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


class FaceModelsUnavailable(RuntimeError):
    """dlib or the face model files are not installed."""


def _import_dlib():
    try:
        import dlib
    except ImportError as error:
        raise FaceModelsUnavailable(f"face analysis needs dlib and the face models: {INSTALL_COMMAND}") from error
    return dlib


def face_models_dir() -> Path:
    """The folder holding the model files of the ``face_recognition_models`` package.

    Its ``__init__`` imports ``pkg_resources`` (absent from modern environments), so the package is
    located without importing it.

    Raises:
        FaceModelsUnavailable: The package is not installed or lacks a model file.
    """
    try:
        spec = importlib.util.find_spec("face_recognition_models")
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        raise FaceModelsUnavailable(f"the face model files are not installed: {INSTALL_COMMAND}")
    folder = Path(spec.origin).resolve().parent / "models"
    for name in (SHAPE_PREDICTOR_FILE, FACE_RECOGNITION_FILE):
        if not (folder / name).is_file():
            raise FaceModelsUnavailable(f"{folder / name} is missing; reinstall the models: {INSTALL_COMMAND}")
    return folder


class FaceModels:
    """The three dlib models, loaded once (about 0.4 s, 30 MB); use :func:`load_face_models`.

    Calls are serialised by a lock, so one instance may be shared by threads. Pickling (e.g. passing
    it to a Ray task) does not copy the models: the receiving process loads its own cached instance.

    Raises:
        FaceModelsUnavailable: dlib or the model files are missing (the message names the pip command).
    """

    def __init__(self, models_dir: Path | None = None) -> None:
        dlib = _import_dlib()
        folder = Path(models_dir) if models_dir is not None else face_models_dir()
        self.models_dir = folder
        self.detector = dlib.get_frontal_face_detector()
        self.shape_predictor = dlib.shape_predictor(str(folder / SHAPE_PREDICTOR_FILE))
        self.recognizer = dlib.face_recognition_model_v1(str(folder / FACE_RECOGNITION_FILE))
        self._lock = threading.Lock()

    def __reduce__(self):
        return (load_face_models, ())

    def detect(self, rgb: np.ndarray, upsample: int) -> list[tuple[tuple[int, int, int, int], float]]:
        """All detections ``((left, top, right, bottom), score)`` with score >= -0.5, best first."""
        with self._lock:
            rects, scores, _ = self.detector.run(rgb, upsample, -0.5)
        found = [((r.left(), r.top(), r.right(), r.bottom()), float(s)) for r, s in zip(rects, scores)]
        return sorted(found, key=lambda item: -item[1])

    def landmarks_and_embedding(self, rgb: np.ndarray, box: tuple[int, int, int, int]
                                ) -> tuple[list[tuple[float, float]], np.ndarray]:
        """The 5 landmarks and the 128-d embedding of the face in ``box``."""
        dlib = _import_dlib()
        with self._lock:
            shape = self.shape_predictor(rgb, dlib.rectangle(*box))
            embedding = np.asarray(self.recognizer.compute_face_descriptor(rgb, shape), dtype=np.float64)
        return [(float(p.x), float(p.y)) for p in shape.parts()], embedding


_MODELS: FaceModels | None = None
_MODELS_LOCK = threading.Lock()


def load_face_models() -> FaceModels:
    """The process's :class:`FaceModels`, loaded on first use and then reused (once per worker)."""
    global _MODELS
    with _MODELS_LOCK:
        if _MODELS is None:
            _MODELS = FaceModels()
        return _MODELS


# --------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------


def face_sharpness(gray: Image.Image) -> float:
    """Variance of the Laplacian of a face region, normalised for size and contrast.

    The region is resampled to 128x128 px and its grey levels scaled to a standard deviation of 50,
    so the figure measures focus, not how large or how brightly lit the face is. Demo photos score
    143-1154; the same photos blurred by 2 % of the face width (a missed focus) 17 or less.

    Args:
        gray: The face region (any mode; converted to greyscale).

    Returns:
        The sharpness; 0.0 for a uniform region.
    """
    square = gray.convert("L").resize((_SHARPNESS_SIZE_PX, _SHARPNESS_SIZE_PX), Image.Resampling.BILINEAR)
    return _normalised_laplacian_variance(np.asarray(square, dtype=np.float64))


def _normalised_laplacian_variance(values: np.ndarray) -> float:
    spread = values.std()
    if spread < 1e-6:
        return 0.0
    values = (values - values.mean()) * (_SHARPNESS_CONTRAST / spread)
    laplacian = (values[:-2, 1:-1] + values[2:, 1:-1] + values[1:-1, :-2] + values[1:-1, 2:]
                 - 4.0 * values[1:-1, 1:-1])
    return float(laplacian.var())


def photo_sharpness(image: Image.Image) -> float:
    """:func:`face_sharpness` of a whole photo, measured at a shorter side of 384 px.

    Used where no face is found (a strong blur hides the face from the detector) and for outputs
    without a face. Demo photos score 56-624, other sharp photos (scikit-image samples) 230-2700; the
    demo photos blurred by 2 % of the face width or more, 11 or less.
    """
    gray = image.convert("L")
    scale = min(_PHOTO_SHARPNESS_SIDE_PX / min(gray.size),
                math.sqrt(_PHOTO_SHARPNESS_MAX_PIXELS / (gray.width * gray.height)))
    gray = gray.resize((max(3, round(gray.width * scale)), max(3, round(gray.height * scale))),
                       Image.Resampling.BILINEAR)
    return _normalised_laplacian_variance(np.asarray(gray, dtype=np.float64))


_DCT = np.cos(np.pi * (2 * np.arange(_PHASH_SIZE)[None, :] + 1) * np.arange(_PHASH_SIZE)[:, None]
              / (2 * _PHASH_SIZE))


def perceptual_hash(image: Image.Image) -> tuple[int, int]:
    """64-bit pHash of an image and of its mirror image.

    Returns:
        ``(hash, hash of the mirrored image)``; compare with :func:`hamming`.
    """
    small = np.asarray(image.convert("L").resize((_PHASH_SIZE, _PHASH_SIZE), Image.Resampling.LANCZOS),
                       dtype=np.float64)
    return _phash_bits(small), _phash_bits(small[:, ::-1])


def _phash_bits(small: np.ndarray) -> int:
    low = (_DCT @ small @ _DCT.T)[:_PHASH_LOW, :_PHASH_LOW].ravel()
    bits = low > np.median(low[1:])  # the DC term would skew the median
    return int("".join("1" if bit else "0" for bit in bits), 2)


def hamming(a: int, b: int) -> int:
    """Number of differing bits of two hashes."""
    return bin(a ^ b).count("1")


def embedding_distance(a: Sequence[float], b: Sequence[float]) -> float:
    """Euclidean distance of two face embeddings."""
    return float(np.linalg.norm(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)))


def medoid_index(embeddings: Sequence[Sequence[float]]) -> int:
    """Index of the embedding with the smallest summed distance to all others (first on ties)."""
    matrix = np.asarray(embeddings, dtype=np.float64)
    distances = np.linalg.norm(matrix[:, None, :] - matrix[None, :, :], axis=-1)
    return int(np.argmin(distances.sum(axis=1)))


# --------------------------------------------------------------------------------------------------
# Per-photo checks
# --------------------------------------------------------------------------------------------------


@dataclass
class _Analysis:
    """Where faces were looked for: a shrunk RGB copy and how it maps to the caller's image."""

    work: Image.Image
    rgb: np.ndarray
    scale: float  # caller's pixels per work pixel
    upsample: int


def _prepare(image: Image.Image) -> _Analysis:
    if image.mode != "RGB":
        image = image.convert("RGB")
    width, height = image.size
    shorter = min(width, height)
    scale = max(1.0, shorter / ANALYSIS_MIN_SIDE_PX, math.sqrt(width * height / ANALYSIS_MAX_PIXELS))
    work = image
    if scale > 1.0:
        size = (max(1, round(width / scale)), max(1, round(height / scale)))
        work = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    upsample = 1 if min(work.size) < ANALYSIS_MIN_SIDE_PX else 0
    return _Analysis(work=work, rgb=np.ascontiguousarray(np.asarray(work)), scale=scale, upsample=upsample)


def _detect(models: FaceModels, analysis: _Analysis, config: GateConfig
            ) -> list[tuple[tuple[int, int, int, int], float]]:
    """Faces scoring at least detector_min_score, largest first.

    A large photo is searched without upsampling first; if that finds nothing it is searched once more
    upsampled, so that a face too small to use is reported as ``face_too_small`` rather than ``no_face``.
    """
    upsamples = (analysis.upsample,) if analysis.upsample else (0, 1)
    faces: list[tuple[tuple[int, int, int, int], float]] = []
    for upsample in upsamples:
        faces = [item for item in models.detect(analysis.rgb, upsample) if item[1] >= config.detector_min_score]
        if faces:
            break
    return sorted(faces, key=lambda item: -_area(item[0]))


def _area(box: tuple[int, int, int, int]) -> int:
    return max(0, box[2] - box[0]) * max(0, box[3] - box[1])


def _clipped(box: tuple[int, int, int, int], size: tuple[int, int]) -> tuple[int, int, int, int]:
    left, top, right, bottom = box
    width, height = size
    left, top = min(max(left, 0), width - 1), min(max(top, 0), height - 1)
    return left, top, max(min(right, width), left + 1), max(min(bottom, height), top + 1)


def _lighting_problem(mean_luminance: float, config: GateConfig) -> str | None:
    if mean_luminance < config.min_brightness:
        return "too_dark"
    if mean_luminance > config.max_brightness:
        return "too_bright"
    return None


def _luminance(image: Image.Image) -> float:
    return float(np.asarray(image.convert("L"), dtype=np.float64).mean())


def analyse_photo(image: Image.Image, models: FaceModels, config: GateConfig | None = None, *,
                  filename: str = "photo") -> FaceObservation | PhotoVerdict:
    """Run the per-photo checks (no_face, multiple_faces, face_too_small, too_dark, too_bright, blurry).

    Args:
        image: The photo, upright (as :func:`pipeline.ingest.sanitize_upload` stores it), any mode.
        models: From :func:`load_face_models`.
        config: Thresholds; the defaults when ``None``.
        filename: Name for the verdict's message.

    Returns:
        The face found, in ``image``'s coordinates, or a rejecting :class:`PhotoVerdict`.
    """
    config = config or GateConfig()
    analysis = _prepare(image)
    faces = _detect(models, analysis, config)
    gray = analysis.work.convert("L")
    scores: dict[str, Any] = {"faces": len(faces)}

    if not faces:
        overall = _luminance(gray)
        scores["image_brightness"] = round(overall, 1)
        if reason := _lighting_problem(overall, config):
            return _reject(filename, reason, scores)
        overall_sharpness = photo_sharpness(gray)
        scores["image_sharpness"] = round(overall_sharpness, 1)
        if overall_sharpness < BLURRED_PHOTO_SHARPNESS:
            return _reject(filename, "blurry", scores)
        return _reject(filename, "no_face", scores)

    box, score = faces[0]
    scores["face_score"] = round(score, 3)
    if len(faces) > 1:
        ratio = _area(faces[1][0]) / max(1, _area(box))
        scores["second_face_ratio"] = round(ratio, 3)
        if ratio >= config.comparable_face_ratio:
            return _reject(filename, "multiple_faces", scores)

    side_work = math.sqrt(_area(box))
    side_px = side_work * analysis.scale
    fraction = side_work / min(analysis.work.size)
    scores["face_px"] = round(side_px, 1)
    scores["face_fraction"] = round(fraction, 4)
    if fraction < config.min_face_fraction:
        return _reject(filename, "face_too_small", scores)
    if side_px < config.min_face_px:
        return _reject(filename, "face_too_small", scores, face_px=side_px)

    face_region = gray.crop(_clipped(box, analysis.work.size))
    brightness = _luminance(face_region)
    scores["brightness"] = round(brightness, 1)
    if reason := _lighting_problem(brightness, config):
        return _reject(filename, reason, scores)
    sharpness = face_sharpness(face_region)
    scores["sharpness"] = round(sharpness, 1)
    if sharpness < config.min_sharpness:
        return _reject(filename, "blurry", scores)

    landmarks, embedding = models.landmarks_and_embedding(analysis.rgb, box)
    phash, phash_mirrored = perceptual_hash(gray)
    s = analysis.scale
    return FaceObservation(
        box=tuple(int(round(v * s)) for v in box),
        score=float(score),
        landmarks=tuple((x * s, y * s) for x, y in landmarks),
        embedding=tuple(float(v) for v in embedding),
        sharpness=sharpness,
        brightness=brightness,
        phash=phash,
        phash_mirrored=phash_mirrored,
        image_size=image.size,
        face_fraction=fraction,
    )


# --------------------------------------------------------------------------------------------------
# One person's photos
# --------------------------------------------------------------------------------------------------


def check_person_photos(photos: list[tuple[str, Image.Image]], models: FaceModels,
                        config: GateConfig | None = None) -> list[PhotoVerdict]:
    """Check all of one person's photos: per-photo checks, then duplicates, then identity.

    Duplicates: in the given order, a photo whose perceptual hash (or its mirror's) is within
    ``duplicate_hamming`` bits of an earlier accepted photo is the duplicate.

    Identity: the medoid of the accepted embeddings stands for the person; photos farther than
    ``max_identity_distance`` from it are ``different_person``. A medoid needs three faces to mean
    anything, so with exactly two the pair is compared directly and, if they differ, both are turned
    away (there is no telling which one is the person; the operator decides). A single photo has
    nothing to be compared with and is accepted (the person will still lack ``min_photos``).

    Args:
        photos: ``(file name, upright image)`` pairs.
        models: From :func:`load_face_models`.
        config: Thresholds; the defaults when ``None``.

    Returns:
        One verdict per photo, in input order. Accepted verdicts carry their ``observation``.
    """
    config = config or GateConfig()
    verdicts: list[PhotoVerdict] = []
    for file, image in photos:
        result = analyse_photo(image, models, config, filename=file)
        if isinstance(result, PhotoVerdict):
            result.file = file
            verdicts.append(result)
        else:
            verdicts.append(PhotoVerdict(file=file, accepted=True, reason=None, message=_message(file, None),
                                         scores=_observation_scores(result), observation=result))

    kept: list[PhotoVerdict] = []
    for verdict in verdicts:
        if not verdict.accepted:
            continue
        observation = verdict.observation
        for earlier in kept:
            bits = min(hamming(earlier.observation.phash, observation.phash),
                       hamming(earlier.observation.phash, observation.phash_mirrored))
            if bits <= config.duplicate_hamming:
                _turn_away(verdict, "duplicate", other=earlier.file, hamming_bits=bits)
                verdict.scores["duplicate_of"] = display_name(earlier.file)
                break
        else:
            kept.append(verdict)

    if len(kept) == 2:
        distance = embedding_distance(kept[0].observation.embedding, kept[1].observation.embedding)
        for verdict, other in ((kept[0], kept[1]), (kept[1], kept[0])):
            verdict.scores["identity_distance"] = round(distance, 4)
            if distance > config.max_identity_distance:
                _turn_away(verdict, "different_person", other=other.file, pair=True)
    elif len(kept) >= 3:
        embeddings = [v.observation.embedding for v in kept]
        center = embeddings[medoid_index(embeddings)]
        for verdict in kept:
            distance = embedding_distance(verdict.observation.embedding, center)
            verdict.scores["identity_distance"] = round(distance, 4)
            if distance > config.max_identity_distance:
                _turn_away(verdict, "different_person")
    return verdicts


def missing_photos(verdicts: Iterable[PhotoVerdict], config: GateConfig | None = None) -> int:
    """How many more accepted photos the person needs (0 when they have ``min_photos``)."""
    config = config or GateConfig()
    return max(0, config.min_photos - sum(1 for v in verdicts if v.accepted))


def reference_embeddings(verdicts: Iterable[PhotoVerdict]) -> list[list[float]]:
    """The accepted photos' embeddings, as :func:`score_output` takes them (JSON-serialisable)."""
    return [list(v.observation.embedding) for v in verdicts if v.accepted and v.observation is not None]


def _observation_scores(observation: FaceObservation) -> dict[str, Any]:
    return {"faces": 1, "face_score": round(observation.score, 3), "face_fraction": round(observation.face_fraction, 4),
            "face_px": round(math.sqrt(_area(observation.box)), 1), "brightness": round(observation.brightness, 1),
            "sharpness": round(observation.sharpness, 1), "phash": f"{observation.phash:016x}"}


def _turn_away(verdict: PhotoVerdict, reason: str, *, other: str | None = None, pair: bool = False,
               hamming_bits: int | None = None) -> None:
    verdict.accepted = False
    verdict.reason = reason
    verdict.message = _message(verdict.file, reason, other=other, pair=pair)
    if hamming_bits is not None:
        verdict.scores["hamming_bits"] = hamming_bits


# --------------------------------------------------------------------------------------------------
# Files (the `headshots check` command)
# --------------------------------------------------------------------------------------------------


def check_files(paths: list[Path], models: FaceModels, config: GateConfig | None = None, *,
                max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_BYTES,
                min_side: int = MIN_SIDE_PX) -> list[PhotoVerdict]:
    """Check photo files as one person's uploads: sanitising first, then the face checks.

    Each file goes through :func:`pipeline.ingest.sanitize_upload` (its rejection reasons come through
    unchanged); the face checks then run on the sanitised photo, exactly what would be stored. JPEGs
    are decoded at reduced size (``draft``, 1/2 to 1/8 scale) down to a shorter side of at least
    :data:`ANALYSIS_MIN_SIDE_PX`, which is all the face checks look at.

    Args:
        paths: The files, in upload order (it decides which of two duplicates is turned away).
        models: From :func:`load_face_models`.
        config: Thresholds; the defaults when ``None``.
        max_pixels: As for ``sanitize_upload``.
        max_bytes: As for ``sanitize_upload``; larger files are not read at all.
        min_side: As for ``sanitize_upload``.

    Returns:
        One verdict per path, in order.
    """
    config = config or GateConfig()
    verdicts: list[PhotoVerdict | None] = []
    readable: list[tuple[int, str, Image.Image]] = []
    for path in paths:
        file = str(path)
        try:
            verdicts.append(None)
            size = Path(path).stat().st_size
            if size > max_bytes:
                raise file_too_large(file, size_bytes=size, max_bytes=max_bytes)
            data = Path(path).read_bytes()
            photo = sanitize_upload(data, filename=file, max_pixels=max_pixels, max_bytes=max_bytes,
                                    min_side=min_side)
            readable.append((len(verdicts) - 1, file, decode_for_analysis(photo.data)))
        except PhotoRejected as rejected:
            verdicts[-1] = PhotoVerdict(file=file, accepted=False, reason=rejected.reason,
                                        message=rejected.message, scores={})
        except OSError as error:
            verdicts[-1] = PhotoVerdict(
                file=file, accepted=False, reason="decode_failed", scores={"error": type(error).__name__},
                message=f"{display_name(file)}: we could not open this file; check that it exists and that it is "
                        f"a photo you can open yourself")
    checked = check_person_photos([(file, image) for _, file, image in readable], models, config)
    for (index, _, _), verdict in zip(readable, checked):
        verdicts[index] = verdict
    return [v for v in verdicts if v is not None]


def decode_for_analysis(photo_bytes: bytes, min_side: int = ANALYSIS_MIN_SIDE_PX) -> Image.Image:
    """Decode a sanitised JPEG/PNG as RGB; JPEGs at the smallest DCT scale keeping ``min_side``.

    Args:
        photo_bytes: Bytes from ``sanitize_upload`` (JPEG or PNG).
        min_side: Shorter side the decoded image keeps at least (unless the photo is smaller).

    Returns:
        A loaded RGB image without ``info``.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(photo_bytes), formats=("JPEG", "PNG")) as image:
            width, height = image.size
            if image.format == "JPEG" and min(width, height) > 2 * min_side:
                factor = min(width, height) / min_side
                image.draft("RGB", (math.ceil(width / factor), math.ceil(height / factor)))
            image.load()
            rgb = image.convert("RGB")
    rgb.info = {}
    return rgb


# --------------------------------------------------------------------------------------------------
# Training crops
# --------------------------------------------------------------------------------------------------


def aligned_crop(image: Image.Image, observation: FaceObservation, resolution: int) -> Image.Image:
    """A square head-and-shoulders crop with the eyes level, at ``resolution`` x ``resolution``.

    The face is fitted from its 5 landmarks (dlib's face-chip similarity fit), rotated so the eyes are
    level, and framed so the face is about 40 % of the width with the eye line 40 % from the top.
    Where the frame leaves the photo, the photo's edge pixels are repeated outwards.

    Args:
        image: The photo the observation was made on, or the same photo at another size (e.g. the
            full-size photo when the observation came from a reduced decode).
        observation: From :func:`analyse_photo`.
        resolution: Output side in pixels.

    Returns:
        An RGB image of ``resolution`` x ``resolution``.

    Raises:
        ValueError: ``resolution`` is not a positive integer, or ``image`` has another aspect ratio than
            the analysed one.
    """
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution <= 0:
        raise ValueError(f"resolution must be a positive integer number of pixels but is {resolution!r}")
    if image.mode != "RGB":
        image = image.convert("RGB")
    width, height = image.size
    seen_width, seen_height = observation.image_size
    sx, sy = width / seen_width, height / seen_height
    if abs(sx - sy) > 0.02 * max(sx, sy):
        raise ValueError(f"the face was found on a {seen_width}x{seen_height} image; a {width}x{height} image "
                         f"has another aspect ratio, so it is not the same photo")
    points = np.array([(x * sx, y * sy) for x, y in observation.landmarks], dtype=np.float64)

    dlib = _import_dlib()
    left, top, right, bottom = (observation.box[0] * sx, observation.box[1] * sy,
                                observation.box[2] * sx, observation.box[3] * sy)
    shape = dlib.full_object_detection(
        dlib.rectangle(int(left), int(top), int(right), int(bottom)),
        dlib.points([dlib.point(int(round(x)), int(round(y))) for x, y in points]))
    chip = dlib.get_face_chip_details(shape, 150, 0.0)
    chip_width = chip.rect.width()
    chip_center = np.array([chip.rect.center().x, chip.rect.center().y], dtype=np.float64)
    axis_x = np.array([math.cos(chip.angle), math.sin(chip.angle)])
    axis_y = np.array([-math.sin(chip.angle), math.cos(chip.angle)])

    side = CROP_SIDE_IN_CHIP_WIDTHS * chip_width
    eye_mid = points[:4].mean(axis=0)
    # Centred on the face fit (eyes and nose) across, with the eye line at a fixed height.
    across = float(np.dot(chip_center - eye_mid, axis_x))
    origin = eye_mid + (across - side / 2) * axis_x - CROP_EYE_LINE_FROM_TOP * side * axis_y
    corners = np.array([origin + a * side * axis_x + b * side * axis_y for a in (0, 1) for b in (0, 1)])
    x0, y0 = np.floor(corners.min(axis=0)).astype(int) - 2
    x1, y1 = np.ceil(corners.max(axis=0)).astype(int) + 2

    # Shrink by an integer factor first, so the final resampling scales by less than 2 (no aliasing),
    # and pad only after shrinking, so a frame far outside a big photo costs little memory.
    factor = max(1, int(side // resolution))
    inside = (max(x0, 0), max(y0, 0), min(x1, width), min(y1, height))
    if inside[0] >= inside[2] or inside[1] >= inside[3]:  # cannot happen for a face inside the photo
        inside = (0, 0, width, height)
    region = image.crop(inside)
    if factor > 1:
        region = region.reduce(factor)
    pad_left = max(0, math.ceil((inside[0] - x0) / factor))
    pad_top = max(0, math.ceil((inside[1] - y0) / factor))
    pad_right = max(0, math.ceil((x1 - inside[2]) / factor))
    pad_bottom = max(0, math.ceil((y1 - inside[3]) / factor))
    pixels = np.pad(np.asarray(region), ((pad_top, pad_bottom), (pad_left, pad_right), (0, 0)), mode="edge")
    region_origin = np.array([inside[0] - pad_left * factor, inside[1] - pad_top * factor], dtype=np.float64)

    step = side / resolution / factor
    offset = (origin - region_origin) / factor
    data = (axis_x[0] * step, axis_y[0] * step, offset[0], axis_x[1] * step, axis_y[1] * step, offset[1])
    return Image.fromarray(pixels, "RGB").transform((resolution, resolution), Image.Transform.AFFINE, data,
                                                    resample=Image.Resampling.BICUBIC)


# --------------------------------------------------------------------------------------------------
# Output checks
# --------------------------------------------------------------------------------------------------

NOT_APPLICABLE: dict[str, Any] = {
    "status": "not_applicable",
    "face_found": None,
    "identity_distance": None,
    "sharpness": None,
    "reason": "the built-in tiny model draws noise, not faces; output checks need a real model",
}


def not_applicable() -> dict[str, Any]:
    """A fresh copy of :data:`NOT_APPLICABLE` (safe to extend per image)."""
    return dict(NOT_APPLICABLE)


def score_output(image: Image.Image, models: FaceModels, reference_embeddings: Sequence[Sequence[float]],
                 config: GateConfig | None = None) -> dict[str, Any]:
    """Check one generated headshot: a face, the right person, in focus.

    Identity is the distance to the medoid of the person's accepted photos' embeddings (the same
    reference the upload gate used, robust to one unusual photo, unlike the minimum over references,
    which any single lookalike photo would satisfy).

    Args:
        image: The generated image.
        models: From :func:`load_face_models` (loaded once per worker, not per image).
        reference_embeddings: The accepted photos' embeddings (:func:`reference_embeddings`).
        config: Thresholds (``max_identity_distance``, ``min_sharpness``, detector settings).

    Returns:
        ``{"status": "pass"|"fail", "reason": None|"no_face"|"multiple_faces"|"different_person"|
        "blurry", "face_found", "identity_distance", "sharpness", "face_score", "faces"}``, JSON-ready.
        Without a face, ``sharpness`` is measured on the whole image.

    Raises:
        ValueError: No reference embeddings, or one that is not 128 numbers.
    """
    config = config or GateConfig()
    references = [list(map(float, e)) for e in reference_embeddings]
    if not references:
        raise ValueError("reference_embeddings is empty: the person has no accepted photos to compare with")
    bad = [len(e) for e in references if len(e) != EMBEDDING_SIZE]
    if bad:
        raise ValueError(f"reference embeddings must have {EMBEDDING_SIZE} numbers each, but one has {bad[0]}")
    center = references[medoid_index(references)]

    analysis = _prepare(image)
    faces = _detect(models, analysis, config)
    gray = analysis.work.convert("L")
    result: dict[str, Any] = {"status": "fail", "reason": None, "face_found": bool(faces), "faces": len(faces),
                              "identity_distance": None, "face_score": None}
    if not faces:
        result.update(reason="no_face", sharpness=round(face_sharpness(gray), 1))
        return result
    box, score = faces[0]
    face_region = gray.crop(_clipped(box, analysis.work.size))
    sharpness = face_sharpness(face_region)
    _, embedding = models.landmarks_and_embedding(analysis.rgb, box)
    distance = embedding_distance(embedding, center)
    result.update(face_score=round(score, 3), sharpness=round(sharpness, 1), identity_distance=round(distance, 4))
    if len(faces) > 1 and _area(faces[1][0]) >= config.comparable_face_ratio * _area(box):
        result["reason"] = "multiple_faces"
    elif distance > config.max_identity_distance:
        result["reason"] = "different_person"
    elif sharpness < config.min_sharpness:
        result["reason"] = "blurry"
    else:
        result["status"] = "pass"
    return result


# --------------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------------

_MESSAGES = {
    None: "looks good.",
    "no_face": "we could not find a face. Use a photo where your face is clearly visible and facing the camera.",
    "multiple_faces": "there is more than one face in this photo. Use a photo of just you, or crop the others out.",
    "face_too_small": "your face is too small in this photo. Use a closer photo where your head and shoulders "
                      "fill most of the picture.",
    "too_dark": "the photo is too dark to see your face well. Use a photo taken in brighter light, facing the light.",
    "too_bright": "the photo is too bright and your face is washed out. Use a photo without strong sun or flash "
                  "on your face.",
    "blurry": "the photo is blurry. Use a sharp photo: hold the camera still and make sure your face is in focus.",
    "duplicate": "this photo is almost the same as {other}. Use a different photo instead (another day, angle or "
                 "outfit), so the model learns more about you.",
    "different_person": "this photo does not seem to show the same person as the other photos. Use only photos of "
                        "yourself.",
}
_PAIR_MESSAGE = ("this photo and {other} do not seem to show the same person, and with only two photos we cannot "
                 "tell which one is right. Use only photos of yourself, and add more of them.")
assert set(_MESSAGES) - {None} == set(FACE_REJECTION_REASONS)


def _message(file: str, reason: str | None, *, other: str | None = None, pair: bool = False) -> str:
    template = _PAIR_MESSAGE if pair else _MESSAGES[reason]
    return f"{display_name(file)}: " + template.format(other=display_name(other or ""))


def _reject(file: str, reason: str, scores: dict[str, Any], *, face_px: float | None = None) -> PhotoVerdict:
    message = _message(file, reason)
    if face_px is not None:  # a large face in a tiny photo: the photo, not the framing, is the problem
        message = (f"{display_name(file)}: your face is only {face_px:.0f} pixels wide in this photo, too little "
                   f"detail. Use a larger photo, taken closer, where your face is clearly visible.")
    return PhotoVerdict(file=file, accepted=False, reason=reason, message=message, scores=scores)
