"""Data benchmarks: AVI decode throughput of our reader against imageio's PyAV plugin and plain PyAV, one run."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import av
import imageio.v3 as iio
import numpy as np
import torch

from echoflow.data.echonet import load_video, read_avi, write_avi


def _frames_per_second(decode: Callable[[Path], np.ndarray], paths: list[Path], *, repeats: int) -> float:
    frames, start = 0, time.perf_counter()
    for _ in range(repeats):
        for path in paths:
            frames += len(decode(path))
    return frames / (time.perf_counter() - start)


def bench_decode(*, videos: int = 8, frames: int = 64, size: int = 112, repeats: int = 3) -> None:
    """Decode EchoNet-sized FFV1 AVIs (112x112 speckle that moves) with ``read_avi`` and with imageio."""
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for i in range(videos):
            speckle = rng.integers(0, 256, (size * 2, size * 2), dtype=np.uint8)
            clip = np.stack([np.roll(speckle, t, axis=0)[:size, :size] for t in range(frames)])
            paths.append(Path(folder) / f"v{i}.avi")
            write_avi(paths[-1], clip, fps=50)
        def imageio_decode(path: Path) -> np.ndarray:
            return np.asarray(iio.imread(path, plugin="pyav", format="gray"))

        def pyav_decode(path: Path) -> np.ndarray:  # FFmpeg's default threading, RGB as most loaders ask
            with av.open(str(path)) as container:
                return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])

        np.testing.assert_array_equal(read_avi(paths[0]), imageio_decode(paths[0]))  # same pixels, fair race
        read_avi(paths[0])  # warm-up: codec tables, page cache
        ours = _frames_per_second(read_avi, paths, repeats=repeats)
        imageio = _frames_per_second(imageio_decode, paths, repeats=repeats)
        pyav = _frames_per_second(pyav_decode, paths, repeats=repeats)
        resized = _frames_per_second(lambda p: load_video(p, size=64), paths, repeats=repeats)
    print(f"AVI decode, {videos} x {frames} frames {size}x{size} FFV1, frames/s: read_avi {ours:,.0f}; "
          f"imageio pyav {imageio:,.0f} (ratio {ours / imageio:.2f}x); plain PyAV rgb24 {pyav:,.0f} "
          f"(ratio {ours / pyav:.2f}x); load_video(size=64) incl. resize {resized:,.0f}")
    print(f"RESULT AVI decode read_avi vs imageio pyav: {ours / imageio:.2f}x ({ours:,.0f} vs {imageio:,.0f} frames/s)")
    print(f"RESULT AVI decode read_avi vs plain PyAV: {ours / pyav:.2f}x ({ours:,.0f} vs {pyav:,.0f} frames/s)")


def bench_phantom(*, videos: int = 12, frames: int = 32, size: int = 64) -> None:
    """Phantom videos rendered + written (FFV1) per second, against random uint8 frames + the same writer."""
    from echoflow.data.phantom import render_video, sample_patient_ef, sample_visit
    from echoflow.data.phantom_anatomy import sample_anatomy
    from echoflow.data.phantom_look import sample_site_style

    rng = np.random.default_rng(0)
    style, anatomy = sample_site_style(rng), sample_anatomy(rng)
    visits = [sample_visit(rng, patient_ef=sample_patient_ef(rng), frames=frames) for _ in range(videos)]
    with tempfile.TemporaryDirectory() as folder:
        render_video(anatomy, visits[0], style, size=size, frames=frames, rng=rng)  # warm-up
        start = time.perf_counter()
        for i, visit in enumerate(visits):
            video = render_video(anatomy, visit, style, size=size, frames=frames, rng=rng)
            write_avi(Path(folder) / f"p{i}.avi", video.frames, fps=25)
        phantom = videos * frames / (time.perf_counter() - start)
        start = time.perf_counter()
        for i in range(videos):
            write_avi(Path(folder) / f"r{i}.avi", rng.integers(0, 256, (frames, size, size), dtype=np.uint8), fps=25)
        baseline = videos * frames / (time.perf_counter() - start)
    print(f"Phantom generation, {videos} x {frames} frames {size}x{size}, frames/s: render_video + write_avi "
          f"{phantom:,.0f}; numpy random frames + write_avi {baseline:,.0f} (ratio {phantom / baseline:.2f}x)")
    print(f"RESULT phantom render+write vs random frames+write: {phantom / baseline:.2f}x ({phantom:,.0f} vs "
          f"{baseline:,.0f} frames/s)")


if __name__ == "__main__":
    torch.set_num_threads(1)
    bench_decode()
    bench_phantom()
