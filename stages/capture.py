"""Video sources for the capture stage: files, RTSP/HTTP streams and USB devices via OpenCV.

:func:`open_source` checks the source before the pipeline relies on it and
raises :class:`SourceError` naming the camera, the source and what to do.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from pipeline.config import CameraConfig


class SourceError(RuntimeError):
    """A source that cannot be opened or read; the message names the camera and the source."""


class VideoSource:
    """Frames of one camera, ``(H, W, 3) uint8 BGR``, from ``cv2.VideoCapture``.

    Attributes:
        camera: the camera's config.
        is_file: True for a local file (ends at end of file).
        fps: frame rate the source reports (0 when unknown).
        frame_count: frames the container says it holds (0 when unknown, e.g. a stream).
    """

    def __init__(self, camera: CameraConfig, open_now: bool = True) -> None:
        self.camera = camera
        self.is_file = camera.resolved_mode() == "file"
        self._cap: cv2.VideoCapture | None = None
        self.fps = 0.0
        self.frame_count = 0
        self.last_error = ""
        if open_now:
            self.open()

    def try_open(self) -> VideoSource:
        """:meth:`open`, keeping the error in ``last_error`` instead of raising (a live camera that is down)."""
        try:
            self.open()
            self.last_error = ""
        except SourceError as err:
            self.last_error = str(err)
        return self

    def _target(self) -> str | int:
        src = self.camera.source
        return int(src) if src.isdigit() else src

    def open(self) -> None:
        """(Re)open the source.

        Raises:
            SourceError: file missing, not a video OpenCV can decode, or a
                stream/device that does not answer.
        """
        self.close()
        src = self.camera.source
        where = f"camera {self.camera.name}: source {src}"
        if self.is_file and "://" not in src and not src.isdigit() and not Path(src).is_file():
            raise SourceError(f"{where} does not exist; check the path (or FACEPRO_ASSETS) in the config or --source")
        cap = cv2.VideoCapture(self._target())
        if not cap.isOpened():
            cap.release()
            what = "is not a video OpenCV can decode" if self.is_file else "cannot be opened (unreachable stream or device)"
            raise SourceError(f"{where} {what}; check the URI, credentials and that the camera is on")
        self._cap = cap
        self.fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        self.frame_count = max(0, int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)) if self.is_file else 0

    def read(self, out: np.ndarray | None = None) -> np.ndarray | None:
        """Next frame, ``(H, W, 3) uint8`` BGR, or None at end of file / on a read failure of a live source.

        Args:
            out: optional ``(H, W, 3) uint8`` buffer (a ring slot). OpenCV
                decodes straight into it when the frame has that shape, and
                ``out`` itself is returned (no copy); otherwise a new array is
                returned and ``out`` is left as OpenCV left it.
        """
        if self._cap is None:
            return None
        ok, frame = self._cap.read() if out is None else self._cap.read(image=out)
        if not ok or frame is None:
            return None
        if frame is out:
            return out
        if frame.ndim == 2:
            frame = cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
        return np.ascontiguousarray(frame)

    def skip(self, frames: int) -> int:
        """Decode and discard the next ``frames`` frames (``grab`` without conversion); returns how many
        there were. Used to resume a file after the last frame a killed capture published: decoding
        is exact where seeking by frame number is not for most codecs."""
        done = 0
        while done < frames and self._cap is not None and self._cap.grab():
            done += 1
        return done

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


def open_source(camera: CameraConfig) -> VideoSource:
    """Open ``camera``'s source and check the first frame can be decoded.

    A live source that does not answer is not an error: it is returned closed
    (``read`` gives None), and the capture loop keeps reopening it with
    backoff while the camera shows as offline; the other cameras go on.

    Raises:
        SourceError: see :meth:`VideoSource.open` (file sources only); also a
            file whose first frame cannot be decoded (broken or empty video).
    """
    if camera.resolved_mode() != "file":
        return VideoSource(camera, open_now=False).try_open()
    src = VideoSource(camera)
    if src.is_file:
        probe = VideoSource(camera)
        first = probe.read()
        probe.close()
        if first is None:
            src.close()
            raise SourceError(f"camera {camera.name}: source {camera.source} has no decodable frame (broken or empty video)")
    return src
