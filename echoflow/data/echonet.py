"""The EchoNet-Dynamic layout: ``Videos/*.avi`` + ``FileList.csv`` (+ ``VolumeTracings.csv``).

Videos are grayscale AVIs. We write them losslessly (FFV1, 8-bit gray) so a write/read round trip is
byte-identical; we read anything FFmpeg decodes (EchoNet's own MJPEG/XVID files included).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from echoflow.errors import EchoFlowError

SPLITS = ("TRAIN", "VAL", "TEST")


@dataclass(frozen=True)
class VideoRecord:
    """One row of ``FileList.csv``.

    Attributes:
        file_name: video stem as written in FileList (EchoNet omits the ``.avi``).
        path: the video file.
        ef: ejection fraction, percent 0-100; ``edv``/``esv``: end-diastolic/-systolic volume, mL.
        fps: frames per second; ``num_frames``, ``height``, ``width``: as declared in FileList.
        split: ``TRAIN`` | ``VAL`` | ``TEST``, by patient (no patient in two splits).
        patient_id: stable patient key (a salted hash for ingested DICOM); ``site``: the hospital site name.
    """

    file_name: str
    path: Path
    ef: float
    esv: float
    edv: float
    fps: float
    num_frames: int
    height: int
    width: int
    split: str
    patient_id: str
    site: str


def write_avi(path: Path, frames: np.ndarray, fps: float) -> None:
    """Write ``frames`` (T, H, W) uint8 as a lossless grayscale AVI (FFV1) at ``fps``."""
    if frames.ndim != 3 or frames.dtype != np.uint8:
        raise EchoFlowError(f"{path}: expected (T, H, W) uint8 frames, got {frames.shape} {frames.dtype}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", format="avi") as container:
        stream = container.add_stream("ffv1", rate=round(fps))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "gray"
        stream.thread_count = 1
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="gray")))
        container.mux(stream.encode(None))


def read_avi(path: Path) -> np.ndarray:
    """Decode a video to (T, H, W) uint8 grayscale; raise ``EchoFlowError`` naming the file if unreadable."""
    if not path.is_file():
        raise EchoFlowError(f"{path}: video file is missing")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise EchoFlowError(f"{path}: no video stream")
            stream = container.streams.video[0]
            stream.thread_count = 1
            frames = [frame.to_ndarray(format="gray") for frame in container.decode(stream)]
    except EchoFlowError:
        raise
    except (av.FFmpegError, ValueError, OSError) as err:
        raise EchoFlowError(f"{path}: unreadable video ({type(err).__name__})") from err
    if not frames:
        raise EchoFlowError(f"{path}: video has no frames")
    return np.stack(frames)
