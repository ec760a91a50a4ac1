"""Identity sample faces (:mod:`stages.sample`): the square around the face box, grey outside the photo, the JPEG;
on synthetic images whose every pixel says where it came from, and on a real enrollment photo."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from stages.sample import FILL, MARGIN, SIZE, sample_crop, sample_jpeg


def coordinate_image(h: int = 300, w: int = 400) -> np.ndarray:
    """``(h, w, 3) uint8``: blue = x // 2, green = y // 2, red = 255 (so a pixel's values say where it lies)."""
    y, x = np.mgrid[0:h, 0:w]
    return np.dstack([x // 2, y // 2, np.full_like(x, 255)]).astype(np.uint8)


def test_the_square_around_the_box_with_its_margin_is_scaled_to_the_sample_size() -> None:
    image = coordinate_image()
    box = np.array([150, 100, 210, 180], np.float32)  # 60 x 80, centre (180, 140): the square has side 80 * 1.6
    crop = sample_crop(image, box, size=64)
    side = 80 * (1 + 2 * MARGIN)
    x1, y1 = round(180 - side / 2), round(140 - side / 2)
    expected = cv2.resize(image[y1:y1 + round(side), x1:x1 + round(side)], (64, 64), interpolation=cv2.INTER_AREA)
    assert crop.shape == (64, 64, 3) and crop.dtype == np.uint8
    assert np.array_equal(crop, expected)
    assert abs(int(crop[32, 32, 0]) - 90) <= 1 and abs(int(crop[32, 32, 1]) - 70) <= 1  # the box centre in the middle


@pytest.mark.parametrize("box, grey", [
    ([0, 0, 40, 40], (slice(0, 10), slice(0, 10))),  # top left corner: the square's top and left are outside
    ([360, 260, 400, 300], (slice(-10, None), slice(-10, None))),  # bottom right
])
def test_parts_outside_the_photo_are_grey_and_the_face_stays_centred(box: list, grey: tuple) -> None:
    image = coordinate_image()
    crop = sample_crop(image, np.array(box, np.float32), size=64)
    assert (crop[grey] == FILL).all()
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    assert abs(int(crop[32, 32, 0]) - cx / 2) <= 2 and abs(int(crop[32, 32, 1]) - cy / 2) <= 2


def test_a_small_face_is_scaled_up() -> None:
    crop = sample_crop(coordinate_image(), np.array([100, 100, 110, 112], np.float32))
    assert crop.shape == (SIZE, SIZE, 3)


@pytest.mark.parametrize("image, box, match", [
    (np.zeros((10, 10), np.uint8), [1, 1, 5, 5], r"\(H, W, 3\) uint8"),
    (np.zeros((10, 10, 3), np.float32), [1, 1, 5, 5], r"\(H, W, 3\) uint8"),
    (np.zeros((10, 10, 3), np.uint8), [5, 1, 1, 5], "x2 > x1"),
    (np.zeros((10, 10, 3), np.uint8), [1, 1, 5], "x2 > x1"),
    (np.zeros((10, 10, 3), np.uint8), [1, np.nan, 5, 5], "x2 > x1"),
    (np.zeros((10, 10, 3), np.uint8), [100, 100, 120, 120], "entirely outside the 10x10 image"),
])
def test_bad_input_is_refused(image: np.ndarray, box: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        sample_crop(image, np.array(box, np.float32))


def test_the_sample_of_a_real_photo_is_a_small_jpeg_of_that_face(faces: Path, analyzer) -> None:
    from stages.gallery import enrollment_face

    image = cv2.imread(str(faces / "obama/obama.jpg"))
    face = enrollment_face(analyzer, image, "obama.jpg").face
    data = sample_jpeg(image, face.xyxy)
    assert data[:3] == b"\xff\xd8\xff" and len(data) < 16_384
    sample = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert sample.shape == (SIZE, SIZE, 3)
    again = analyzer.analyze(sample)  # the face is found again in the sample, in its middle, as the same person
    assert len(again) == 1
    x1, y1, x2, y2 = again[0].xyxy
    assert abs((x1 + x2) / 2 - SIZE / 2) < SIZE / 8 and abs((y1 + y2) / 2 - SIZE / 2) < SIZE / 8
    assert float(again[0].embedding @ face.embedding) > 0.5


@pytest.fixture(scope="module")
def analyzer(models: Path, videos: Path):
    from pipeline.config import parse_config
    from pipeline.services import face_analyzer
    from tests.unit.test_api import tree

    return face_analyzer(parse_config(tree(models, videos)), 2)
