"""Progress bars: silent when quiet or off a terminal, visible (description, count) on a forced one; every long
loop (sampling, animation, decoding, encoding, embedding, index build and search) advances its bar to the total."""

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import echoflow.audit.bounded_ivf
import echoflow.audit.embed
import echoflow.audit.index
import echoflow.progress
import echoflow.stages.data
import echoflow.study.generate
from echoflow.audit.embed import embed_videos
from echoflow.audit.index import build_index
from echoflow.data.sites import SiteData
from echoflow.models.reid import ReidEncoder
from echoflow.models.vae import AdversarialVAE
from echoflow.models.video_flow import LatentVideoFlow
from echoflow.progress import progress_bar
from echoflow.stages.data import encode_sites
from echoflow.study.generate import animate_frames, decode_clips, sample_latent_frames


@pytest.fixture
def terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """stderr counts as a terminal (rich's TTY_COMPATIBLE) and nothing asks for quiet."""
    monkeypatch.delenv("ECHOFLOW_QUIET", raising=False)
    monkeypatch.setenv("TTY_COMPATIBLE", "1")


def run_bar(quiet: bool = False) -> None:
    with progress_bar("embedding frames", total=4, quiet=quiet) as advance:
        advance(1)
        advance(2)


def test_quiet_writes_nothing(terminal: None, monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str]) -> None:
    run_bar(quiet=True)
    assert capsys.readouterr() == ("", "")
    monkeypatch.setenv("ECHOFLOW_QUIET", "1")
    run_bar()
    assert capsys.readouterr() == ("", "")


def test_off_a_terminal_writes_nothing(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("ECHOFLOW_QUIET", "TTY_COMPATIBLE", "FORCE_COLOR"):
        monkeypatch.delenv(name, raising=False)
    run_bar()  # pytest's captured stderr is no TTY, as in CI
    assert capsys.readouterr() == ("", "")


def test_forced_terminal_shows_description_and_count(terminal: None, capsys: pytest.CaptureFixture[str]) -> None:
    out = seen = ""
    with progress_bar("embedding frames", total=4) as advance:
        advance(3)
        deadline = time.monotonic() + 10  # rich redraws 10 times a second
        while "3/4" not in seen and time.monotonic() < deadline:
            time.sleep(0.05)
            captured = capsys.readouterr()
            out, seen = out + captured.out, seen + captured.err
    assert out + capsys.readouterr().out == ""  # bars go to stderr only
    assert "embedding frames" in seen and "0/4" in seen and "3/4" in seen
    assert echoflow.progress._Shared.progress is None  # the display is stopped when the last bar closes


def test_nested_bars_and_bars_from_threads_share_one_display(terminal: None,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    errors: list[BaseException] = []

    def site(name: str) -> None:
        try:
            with progress_bar(f"search {name}", total=2) as advance:
                time.sleep(0.05)
                advance(2)
        except BaseException as error:  # rich raises LiveError for a second live display
            errors.append(error)

    with progress_bar("audit", total=1) as advance:
        with progress_bar("embed", total=1):  # nested in the same thread: one display shows both
            shown = echoflow.progress._Shared.progress
            assert shown is not None and [t.description for t in shown.tasks] == ["audit", "embed"]
        threads = [threading.Thread(target=site, args=(name,)) for name in ("a", "b")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        advance(1)
        assert [t.description for t in shown.tasks] == ["audit"]  # finished bars leave the display
    assert errors == [] and echoflow.progress._Shared.progress is None
    assert "audit" in capsys.readouterr().err


@dataclass
class Bar:
    description: str
    total: int
    quiet: bool
    steps: list[int] = field(default_factory=list)


@pytest.fixture
def bars(monkeypatch: pytest.MonkeyPatch) -> list[Bar]:
    """Every progress bar the long loops open, with each advance."""
    opened: list[Bar] = []

    @contextmanager
    def record(description: str, *, total: int, completed: int = 0, quiet: bool = False) -> Iterator[
            Callable[[int], None]]:
        bar = Bar(description, total, quiet)
        opened.append(bar)
        yield bar.steps.append

    for module in (echoflow.study.generate, echoflow.stages.data, echoflow.audit.embed, echoflow.audit.index,
                   echoflow.audit.bounded_ivf):
        monkeypatch.setattr(module, "progress_bar", record)
    return opened


def finished(bars: list[Bar], prefix: str) -> Bar:
    (bar,) = [b for b in bars if b.description.startswith(prefix)]
    assert sum(bar.steps) == bar.total, bar
    return bar


class Still(nn.Module):
    """A flow network that predicts zero motion/velocity (sampling cost without training)."""

    def forward(self, x: Tensor, t: Tensor, **cond: Tensor) -> Tensor:
        return torch.zeros_like(x)


def test_sampling_animation_and_decoding_advance_to_their_totals(bars: list[Bar]) -> None:
    frames = sample_latent_frames(Still(), 5, shape=(4, 8, 8), steps=3, method="euler", target="velocity",
                                  batch_size=2)
    assert finished(bars, "sample 5 latent frames").steps == [1] * 9  # 3 batches x 3 ODE steps
    video_flow = LatentVideoFlow(channels=(16, 32), heads=2)
    latents = animate_frames(video_flow, frames, torch.full((5,), 50.0), frames=9, window=6, steps=1,
                             method="euler", target="x1", guidance=1.0, batch_size=3)
    # windows of 6 frames overlapping by 4: 6 + 2 + 1 frames, per batch of 3 and of 2 clips
    assert latents.shape[2] == 9 and finished(bars, "animate 5 clips").steps == [18, 6, 3, 12, 4, 2]
    vae = AdversarialVAE(base_channels=8)
    decode_clips(vae, latents[:, :, :2], batch_size=2)
    assert finished(bars, "decode 5 clips").steps == [2, 2, 1]


def test_encoding_embedding_and_indexing_advance_to_their_totals(bars: list[Bar]) -> None:
    rng = np.random.default_rng(0)
    videos = [rng.integers(0, 256, (n, 16, 16), dtype=np.uint8) for n in (3, 2, 4)]
    site = SiteData("s", [], videos, {}, 0, [])  # type: ignore[arg-type]
    vae = AdversarialVAE(base_channels=8)
    encode_sites(vae, [site, site])
    assert finished(bars, "encode videos").steps == [1] * 6
    embed_videos(vae, ReidEncoder(channels=8, dim=16), videos, ["a", "b", "c"], description="embed s TRAIN")
    assert finished(bars, "embed s TRAIN").steps == [1] * 3
    per_video = [b for b in bars if b.description.endswith(" frames")]
    assert [(b.total, b.quiet) for b in per_video] == [(3, True), (2, True), (4, True)]  # inside the videos' bar
    vectors = rng.normal(size=(300, 8)).astype(np.float32)
    ivf = build_index(vectors, kind="bounded_ivf", nlist=8)
    assert finished(bars, "build bounded IVF").steps == [1, 1]  # lists, then the index over them
    for index in (ivf, build_index(vectors, kind="exact")):
        index.search(vectors[:20], threshold=0.9)
    finished(bars, "search bounded IVF index (20 queries)")
    finished(bars, "search exact index (20 queries)")
