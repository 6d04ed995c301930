"""Image, audio and video in and out: decoding inputs, encoding results, probing files.

* Images: Pillow (:func:`load_image`, :func:`encode_png`).
* Audio and video: PyAV (FFmpeg) for every decode and encode, with one exception:
  ``encode_audio(..., "ogg")`` writes Ogg Vorbis with libsndfile (``soundfile``), because
  PyAV wheels ship no libvorbis and FFmpeg's own Vorbis encoder is experimental and
  stereo-only. Decoding Ogg Vorbis uses PyAV like everything else.
* Resampling to 16 kHz for the speech encoder: ``soxr`` in its HQ mode, the resampler
  (and quality) that ``librosa.load(path, sr=16000)`` in the official Wan2.2-S2V code uses,
  after the same channel mean. It is deterministic.

Error codes (:class:`~storystudio.errors.MediaError` unless noted): ``invalid_image``,
``image_too_large``, ``invalid_audio``, ``empty_audio``, ``audio_too_long``,
``invalid_video``, ``encode_failed``, ``invalid_media`` (probe); ``invalid_input``
(:class:`~storystudio.errors.InvalidInput`) for bad trim values.
"""

from __future__ import annotations

import io
import logging
import math
import os
import struct
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Literal

import av
import numpy as np
from av.video.reformatter import ColorPrimaries, ColorRange, Colorspace, ColorTrc
from PIL import Image, ImageOps

from storystudio.errors import InvalidInput, MediaError
from storystudio.limits import SPEECH_SAMPLE_RATE, VIDEO_FPS

log = logging.getLogger(__name__)

AudioFormat = Literal["wav", "mp3", "m4a", "flac", "ogg", "opus", "webm"]

# fmt -> (container format, codec); "ogg" (Vorbis) is written with soundfile, see above.
_AUDIO_ENCODERS: dict[str, tuple[str, str]] = {
    "wav": ("wav", "pcm_s16le"),
    "mp3": ("mp3", "libmp3lame"),
    "m4a": ("ipod", "aac"),
    "flac": ("flac", "flac"),
    "opus": ("ogg", "libopus"),
    "webm": ("webm", "libopus"),
}
_INT_SCALE = {np.dtype(np.int16): 32768.0, np.dtype(np.int32): 2147483648.0,
              np.dtype(np.int64): 9223372036854775808.0}


def _layout(channels: int) -> str:
    """FFmpeg's default layout name for a channel count (1 -> mono, 2 -> stereo, ...)."""
    return av.AudioLayout(f"{channels}c").name


# ============================================================================ images


def load_image(data: bytes, *, max_pixels: int = 40_000_000) -> Image.Image:
    """Decode an image to RGB, refusing non-images and decompression bombs.

    The header is checked (``Image.verify``) and the pixel count compared with
    ``max_pixels`` *before* any pixel is decoded. EXIF orientation is applied (phone
    photos), the first frame of animations is used, and transparency is composited onto
    white rather than dropped to whatever colour the hidden pixels have.
    """
    if not data:
        raise MediaError("image is empty (0 bytes)", code="invalid_image")
    try:
        with warnings.catch_warnings():
            # max_pixels is the limit here; Pillow's own (~89 MP) warning would only be noise.
            # Its hard error (twice that) still applies and is reported as too large.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                fmt = probe.format
                width, height = probe.size
                probe.verify()
            if width * height > max_pixels:
                raise MediaError(f"image is {width}x{height} = {width * height} pixels, over the "
                                 f"limit of {max_pixels}", code="image_too_large")
            img = Image.open(io.BytesIO(data))
            img.load()
    except MediaError:
        raise
    except Image.DecompressionBombError as exc:
        raise MediaError(f"image refused as a decompression bomb: {exc}", code="image_too_large") from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for bad data
        raise MediaError(f"not a readable image ({type(exc).__name__}: {str(exc)[:120]})",
                         code="invalid_image") from None
    try:
        img = ImageOps.exif_transpose(img) or img
    except Exception:  # noqa: BLE001 - a broken EXIF block must not reject the image
        log.warning("ignoring unreadable EXIF orientation of a %s image", fmt)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.new("RGB", rgba.size, (255, 255, 255))
        img.paste(rgba, mask=rgba.getchannel("A"))
    elif img.mode != "RGB":
        img = img.convert("RGB")
    return img


def encode_png(image: Image.Image | np.ndarray) -> bytes:
    """PNG bytes of a PIL image or a uint8 array (``[H,W]``, ``[H,W,3]`` or ``[H,W,4]``)."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (
                image.ndim == 3 and image.shape[2] not in (3, 4)):
            raise ValueError(f"expected a uint8 [H,W], [H,W,3] or [H,W,4] array, got "
                             f"{image.dtype} {image.shape}")
        image = Image.fromarray(np.ascontiguousarray(image))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# ============================================================================ audio


@dataclass
class AudioClip:
    """Decoded audio: float32 ``samples`` of shape ``[channels, n]`` in [-1, 1]."""

    samples: np.ndarray
    sample_rate: int

    def __post_init__(self) -> None:
        samples = np.asarray(self.samples, dtype=np.float32)
        if samples.ndim == 1:
            samples = samples[None, :]
        if samples.ndim != 2 or samples.shape[0] < 1:
            raise ValueError(f"AudioClip.samples must be [channels, n], got shape {samples.shape}")
        if self.sample_rate <= 0:
            raise ValueError(f"AudioClip.sample_rate must be > 0, got {self.sample_rate}")
        self.samples = samples
        self.sample_rate = int(self.sample_rate)

    @property
    def channels(self) -> int:
        return int(self.samples.shape[0])

    @property
    def num_samples(self) -> int:
        return int(self.samples.shape[1])

    @property
    def duration_s(self) -> float:
        return self.num_samples / self.sample_rate


def _open(data: bytes | bytearray | memoryview | str | os.PathLike, what: str, code: str
          ) -> av.container.InputContainer:
    source = io.BytesIO(bytes(data)) if isinstance(data, (bytes, bytearray, memoryview)) else str(data)
    try:
        return av.open(source, mode="r")
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise MediaError(f"not a decodable {what} file ({_ffmpeg_reason(exc)})", code=code) from None


def _ffmpeg_reason(exc: BaseException) -> str:
    return (getattr(exc, "strerror", None) or str(exc) or type(exc).__name__)[:120]


def _frame_to_float(frame: av.AudioFrame, channels: int) -> np.ndarray:
    """``[channels, n]`` float32 from any PCM sample format PyAV hands out."""
    arr = frame.to_ndarray()
    if not frame.format.is_planar:
        arr = arr.reshape(-1, channels).T  # packed: [1, n*channels] interleaved
    if arr.dtype == np.uint8:
        return (arr.astype(np.float32) - 128.0) / 128.0
    if arr.dtype in _INT_SCALE:
        return (arr / _INT_SCALE[arr.dtype]).astype(np.float32)
    return arr.astype(np.float32, copy=False)


def _declared_samples(container: av.container.InputContainer, stream: av.AudioStream,
                      rate: int) -> int | None:
    """Sample count an MP4/MOV track declares (edit list applied), else None.

    FFmpeg's AAC decoder always emits whole 1024-sample frames, so the padding of the last
    frame comes out as extra silence; the MP4 sample table says where the track really
    ends. Other containers either trim themselves (Ogg, MP3 with a LAME header) or only
    *estimate* a duration, which must not be used to cut audio.
    """
    if "mp4" not in container.format.name or stream.duration is None or stream.time_base is None:
        return None
    return int(round(stream.duration * stream.time_base * rate))


def _iter_audio(container: av.container.InputContainer, stream: av.AudioStream
                ) -> Iterator[tuple[np.ndarray, int]]:
    """Yield ``(samples [C, n] float32, sample_rate)`` blocks of one decoded stream.

    Packets that fail to decode are skipped (a damaged frame in a long file should not
    lose the whole file); if nothing at all decodes, the error is raised.
    """
    rate = channels = None
    declared: int | None = None
    emitted = 0
    failures = 0
    last_error: Exception | None = None
    for packet in container.demux(stream):
        try:
            frames = packet.decode()
        except av.FFmpegError as exc:
            failures += 1
            last_error = exc
            continue
        for frame in frames:
            frame_channels = frame.layout.nb_channels
            if rate is None:
                rate, channels = frame.sample_rate, frame_channels
                declared = _declared_samples(container, stream, rate)
            elif (frame.sample_rate, frame_channels) != (rate, channels):
                raise MediaError(
                    f"audio changes format mid-stream ({rate} Hz/{channels} ch -> "
                    f"{frame.sample_rate} Hz/{frame_channels} ch), which is not supported",
                    code="invalid_audio")
            block = _frame_to_float(frame, channels)
            if declared is not None and emitted + block.shape[1] > declared:
                block = block[:, : max(declared - emitted, 0)]
            if block.shape[1]:
                emitted += block.shape[1]
                yield block, rate
    if rate is None and failures:
        raise MediaError(f"audio stream could not be decoded ({_ffmpeg_reason(last_error)})",
                         code="invalid_audio")
    if failures:
        log.warning("skipped %d undecodable audio packet(s)", failures)


def _check_seconds(name: str, value: float | None, *, zero_ok: bool) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidInput(f"{name} must be a finite number of seconds, got {value!r}")
    if value < 0 or (value == 0 and not zero_ok):
        raise InvalidInput(f"{name} must be {'>= 0' if zero_ok else '> 0'} seconds, got {value}")


def decode_audio(data: bytes, *, start_s: float | None = None, duration_s: float | None = None,
                 max_duration_s: float | None = None) -> AudioClip:
    """Decode WAV, MP3, M4A/AAC, FLAC, Ogg Vorbis or Opus (Ogg/WebM) at its own rate and
    channel count, keeping ``[start_s, start_s + duration_s)``.

    A window that runs past the end is cut at the end. Decoding stops as soon as the window
    is complete, or as soon as the kept audio exceeds ``max_duration_s`` (so a very long
    upload is refused without decoding all of it).
    """
    _check_seconds("audio_start", start_s, zero_ok=True)
    _check_seconds("audio_duration", duration_s, zero_ok=False)
    _check_seconds("max_duration_s", max_duration_s, zero_ok=False)
    if not data:
        raise MediaError("audio is empty (0 bytes)", code="empty_audio")
    with _open(data, "audio", "invalid_audio") as container:
        if not container.streams.audio:
            raise MediaError("file has no audio stream", code="invalid_audio")
        stream = container.streams.audio[0]
        stream.thread_type = "AUTO"
        rate = 0
        first = end = limit = None
        position = 0  # samples decoded so far (before trimming)
        kept: list[np.ndarray] = []
        n_kept = 0
        try:
            for block, rate in _iter_audio(container, stream):
                if first is None:
                    first = round((start_s or 0.0) * rate)
                    end = None if duration_s is None else first + round(duration_s * rate)
                    limit = None if max_duration_s is None else round(max_duration_s * rate)
                n = block.shape[1]
                lo = max(first - position, 0)
                hi = n if end is None else min(n, end - position)
                if hi > lo:
                    kept.append(block[:, lo:hi])
                    n_kept += hi - lo
                position += n
                if end is not None and position >= end:
                    break
                if limit is not None and n_kept > limit:
                    hint = ("; pass audio_duration to use a part of it" if duration_s is None
                            else f" (audio_duration is {duration_s:g} s)")
                    raise MediaError(
                        f"audio is longer than the limit of {max_duration_s:g} s"
                        + (" after audio_start" if start_s else "") + hint, code="audio_too_long")
        except av.FFmpegError as exc:
            raise MediaError(f"audio could not be decoded ({_ffmpeg_reason(exc)})",
                             code="invalid_audio") from None
    if n_kept == 0:
        if position == 0:
            raise MediaError("audio has no samples", code="empty_audio")
        total = position / rate
        if start_s and first is not None and first >= position:
            raise MediaError(f"audio_start {start_s:g} s is at or beyond the end of the audio "
                             f"({total:.3f} s)", code="empty_audio")
        raise MediaError(f"audio_duration {duration_s:g} s is shorter than one sample",
                         code="empty_audio")
    samples = np.concatenate(kept, axis=1) if len(kept) > 1 else kept[0]
    clip = AudioClip(np.ascontiguousarray(samples), rate)
    if limit is not None and clip.num_samples > limit:
        raise MediaError(f"audio is {clip.duration_s:.2f} s long after trimming; the limit is "
                         f"{max_duration_s:g} s", code="audio_too_long")
    return clip


def to_mono_16k(clip: AudioClip) -> np.ndarray:
    """Float32 mono at 16 kHz for the wav2vec2 speech encoder.

    The steps of the official ``librosa.load(path, sr=16000)``, without importing librosa:
    channel mean, ``soxr`` HQ resampling, then the length fixed to
    ``ceil(n * 16000 / rate)`` (zero-padded, as ``librosa.resample(fix=True)`` does).
    Deterministic.
    """
    import soxr  # a dependency of librosa, pinned through it

    mono = clip.samples.mean(axis=0) if clip.channels > 1 else clip.samples[0]
    mono = np.ascontiguousarray(mono, dtype=np.float32)
    if clip.sample_rate == SPEECH_SAMPLE_RATE or not mono.size:
        return mono
    out = soxr.resample(mono, clip.sample_rate, SPEECH_SAMPLE_RATE, quality="HQ")
    size = math.ceil(mono.size * (SPEECH_SAMPLE_RATE / clip.sample_rate))  # librosa's exact arithmetic
    if out.size < size:
        out = np.pad(out, (0, size - out.size))
    return np.ascontiguousarray(out[:size], dtype=np.float32)


def _supported_rate(codec: av.Codec, rate: int) -> int:
    rates = sorted(codec.audio_rates or ())
    if not rates or rate in rates:
        return rate
    higher = [r for r in rates if r >= rate]
    return higher[0] if higher else rates[-1]


def _audio_frames(clip: AudioClip, chunk: int = 4096) -> Iterator[av.AudioFrame]:
    layout = _layout(clip.channels)
    for start in range(0, clip.num_samples, chunk):
        block = np.ascontiguousarray(clip.samples[:, start:start + chunk])
        frame = av.AudioFrame.from_ndarray(block, format="fltp", layout=layout)
        frame.sample_rate = clip.sample_rate
        frame.pts = start
        frame.time_base = Fraction(1, clip.sample_rate)
        yield frame


def _add_audio_stream(container: av.container.OutputContainer, codec_name: str, clip: AudioClip
                      ) -> av.AudioStream:
    codec = av.Codec(codec_name, "w")
    stream = container.add_stream(codec_name, rate=_supported_rate(codec, clip.sample_rate))
    stream.layout = _layout(clip.channels)
    if codec_name in ("aac", "libmp3lame", "libopus"):
        stream.bit_rate = min(64_000 * clip.channels, 320_000)
    return stream


def encode_audio(clip: AudioClip, fmt: AudioFormat) -> bytes:
    """Encode a clip as ``wav`` (16-bit PCM), ``mp3``, ``m4a`` (AAC), ``flac``, ``ogg``
    (Vorbis), ``opus`` (Opus in Ogg) or ``webm`` (Opus in WebM).

    The channel count is kept; the rate is kept where the codec supports it, otherwise the
    next supported rate is used (Opus: 8/12/16/24/48 kHz, and decoders always return
    48 kHz). Used to make fixtures and demo inputs.
    """
    if fmt == "ogg":
        import soundfile

        buf = io.BytesIO()
        soundfile.write(buf, np.clip(clip.samples.T, -1.0, 1.0), clip.sample_rate,
                        format="OGG", subtype="VORBIS")
        return buf.getvalue()
    if fmt not in _AUDIO_ENCODERS:
        raise ValueError(f"unknown audio format {fmt!r}; use one of "
                         f"{sorted([*_AUDIO_ENCODERS, 'ogg'])}")
    container_fmt, codec_name = _AUDIO_ENCODERS[fmt]
    # MP4 edit lists are written in the movie timescale (1000 by default): at the sample
    # rate, the declared end of the AAC track is exact to the sample.
    options = {"movie_timescale": str(clip.sample_rate)} if fmt == "m4a" else {}
    buf = io.BytesIO()
    try:
        with av.open(buf, mode="w", format=container_fmt, container_options=options) as container:
            stream = _add_audio_stream(container, codec_name, clip)
            for frame in _audio_frames(clip):
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
    except av.FFmpegError as exc:
        raise MediaError(f"could not encode {fmt} audio ({_ffmpeg_reason(exc)})",
                         code="encode_failed") from None
    return buf.getvalue()


# Vowel formants (F1, F2, F3 in Hz) of an average adult voice: a, e, i, o, u, ae, schwa.
_VOWELS = np.array([[730, 1090, 2440], [530, 1840, 2480], [270, 2290, 3010], [570, 840, 2410],
                    [300, 870, 2240], [660, 1720, 2410], [500, 1500, 2500]], dtype=np.float64)
_BANDWIDTHS = np.array([90.0, 110.0, 170.0])
_FORMANT_GAINS = np.array([1.0, 0.5, 0.25])


def _syllable(rng: np.random.Generator, n: int, sr: int, f0: float) -> np.ndarray:
    """One voiced syllable: a glottal harmonic series shaped by moving formants."""
    t = np.arange(n) / sr
    frac = t / max(t[-1], 1e-9)
    # pitch: a slight fall over the syllable, slow wobble, a little jitter
    pitch = f0 * (1.0 + rng.uniform(-0.12, 0.05) * frac
                  + 0.015 * np.sin(2 * np.pi * rng.uniform(4, 7) * t + rng.uniform(0, 6.3)))
    pitch *= 1.0 + 0.004 * np.cumsum(rng.standard_normal(n)) / np.sqrt(np.arange(1, n + 1))
    phase = 2 * np.pi * np.cumsum(pitch) / sr
    v0, v1 = _VOWELS[rng.integers(len(_VOWELS), size=2)]
    formants = v0[:, None] + (v1 - v0)[:, None] * frac[None, :]  # [3, n] glide
    top = min(5000.0, 0.45 * sr)
    harmonics = np.arange(1, int(top / pitch.min()) + 1)[:, None]  # [K, 1]
    freqs = harmonics * pitch[None, :]  # [K, n]
    gain = np.zeros_like(freqs)
    for i in range(3):
        gain += _FORMANT_GAINS[i] / (1.0 + ((freqs - formants[i]) / (_BANDWIDTHS[i] / 2)) ** 2)
    gain *= (freqs < top) / np.sqrt(harmonics)  # spectral tilt, nothing near Nyquist
    voiced = (gain * np.sin(harmonics * phase[None, :])).sum(axis=0)
    attack, release = int(0.02 * sr), int(0.06 * sr)
    env = np.ones(n)
    env[:attack] = np.sin(np.linspace(0, np.pi / 2, attack)) ** 2
    env[n - release:] = np.cos(np.linspace(0, np.pi / 2, release)) ** 2
    return voiced * env * rng.uniform(0.6, 1.0)


def _fricative(rng: np.random.Generator, n: int) -> np.ndarray:
    """A short burst of high-passed noise (s, f, sh, t)."""
    noise = np.diff(rng.standard_normal(n + 2), n=2)
    return noise * np.hanning(n) * rng.uniform(0.05, 0.12)


def synth_speech(seconds: float, sample_rate: int = 24000, seed: int = 0) -> AudioClip:
    """A deterministic speech-like mono clip: words of 1-3 voiced syllables (harmonic
    series through gliding vowel formants, pitch contour, attack/release), some fricative
    onsets, and pauses between words. No network, no TTS; for demos and tests."""
    if not seconds > 0:
        raise InvalidInput(f"seconds must be > 0, got {seconds}")
    if sample_rate < 8000:
        raise InvalidInput(f"sample_rate must be >= 8000, got {sample_rate}")
    rng = np.random.default_rng(seed)
    total = int(round(seconds * sample_rate))
    out = np.zeros(total)
    f0 = rng.uniform(95, 210)  # the speaker's base pitch
    pos = int(rng.uniform(0.05, 0.15) * sample_rate)
    while pos < total:
        for _ in range(int(rng.integers(1, 4))):  # syllables of one word
            if rng.random() < 0.3:
                n = int(rng.uniform(0.04, 0.09) * sample_rate)
                seg = _fricative(rng, n)[: total - pos]
                out[pos:pos + seg.size] += seg
                pos += n
            if pos >= total:
                break
            n = int(rng.uniform(0.12, 0.28) * sample_rate)
            seg = _syllable(rng, n, sample_rate, f0 * rng.uniform(0.9, 1.15))[: total - pos]
            out[pos:pos + seg.size] += seg
            pos += n + int(rng.uniform(0.0, 0.04) * sample_rate)
            if pos >= total:
                break
        pos += int(rng.uniform(0.15, 0.45) * sample_rate)  # pause between words
    peak = float(np.abs(out).max())
    if peak > 0:
        out *= 0.6 / peak
    return AudioClip(out.astype(np.float32)[None, :], sample_rate)


# ============================================================================ video


def _even_frames(frames: np.ndarray) -> np.ndarray:
    """Pad odd heights/widths by one row/column repeating the edge (yuv420p needs even
    sizes). Padding keeps every generated pixel; the extra line is a copy of its neighbour."""
    _, h, w, _ = frames.shape
    if h % 2 or w % 2:
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    return frames


def encode_mp4(frames: np.ndarray, fps: int, audio: AudioClip | None, out_path: Path | str, *,
               crf: int = 18, preset: str = "fast") -> Path:
    """Write an H.264/yuv420p MP4 (``+faststart``) with the clip muxed as AAC.

    * Video lasts exactly ``T / fps`` seconds. Colours are converted with BT.709 (limited
      range) and tagged as such.
    * Odd sizes are padded by one edge pixel to even (see :func:`_even_frames`).
    * Audio keeps its channels (and rate, unless AAC does not support it). If it is longer
      than the video by more than one frame it is cut to the video length; a shorter clip
      is left as it is (the player shows the last frames silently).
    * The file is written next to ``out_path`` and renamed into place, so a reader never
      sees half a file.
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"frames must be uint8 [T,H,W,3] with T >= 1, got {frames.dtype} {frames.shape}")
    if int(fps) != fps or fps <= 0:
        raise ValueError(f"fps must be a positive integer, got {fps}")
    fps = int(fps)
    frames = _even_frames(frames)
    count, height, width, _ = frames.shape
    video_s = count / fps
    if audio is not None:
        if audio.num_samples == 0:
            raise MediaError("audio clip to mux is empty", code="empty_audio")
        video_samples = round(video_s * audio.sample_rate)
        if audio.num_samples > video_samples + audio.sample_rate / fps:
            audio = AudioClip(audio.samples[:, :video_samples], audio.sample_rate)

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out_path.stem}.", suffix=".mp4", dir=out_path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        # movie timescale: edit lists exact for both the frame rate and the sample rate
        timescale = math.lcm(fps, audio.sample_rate if audio is not None else 1000)
        with av.open(str(tmp), mode="w", format="mp4",
                     container_options={"movflags": "+faststart",
                                        "movie_timescale": str(timescale)}) as container:
            video = container.add_stream("libx264", rate=fps,
                                         options={"crf": str(crf), "preset": preset})
            video.width, video.height, video.pix_fmt = width, height, "yuv420p"
            video.time_base = Fraction(1, fps)
            ctx = video.codec_context
            ctx.colorspace, ctx.color_range = Colorspace.ITU709, ColorRange.MPEG
            ctx.color_primaries, ctx.color_trc = ColorPrimaries.BT709, ColorTrc.BT709
            sound = _add_audio_stream(container, "aac", audio) if audio is not None else None
            pending = _audio_frames(audio) if audio is not None else iter(())
            next_audio = next(pending, None)
            for i in range(count):
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[i]), format="rgb24")
                frame = frame.reformat(format="yuv420p", dst_colorspace=Colorspace.ITU709,
                                       dst_color_range=ColorRange.MPEG)
                frame.pts, frame.time_base, frame.duration = i, Fraction(1, fps), 1
                container.mux(video.encode(frame))
                # interleave: audio up to the end of this video frame
                while next_audio is not None and next_audio.pts < (i + 1) * audio.sample_rate / fps:
                    container.mux(sound.encode(next_audio))
                    next_audio = next(pending, None)
            container.mux(video.encode(None))
            while next_audio is not None:
                container.mux(sound.encode(next_audio))
                next_audio = next(pending, None)
            if sound is not None:
                container.mux(sound.encode(None))
        os.replace(tmp, out_path)
    except av.FFmpegError as exc:
        raise MediaError(f"could not encode the MP4 ({_ffmpeg_reason(exc)})", code="encode_failed") from None
    finally:
        tmp.unlink(missing_ok=True)
    log.info("wrote %s: %d frames %dx%d @ %d fps (%.2f s)%s", out_path, count, width, height, fps,
             video_s, f", AAC {audio.channels} ch {audio.duration_s:.2f} s" if audio is not None else "")
    return out_path


def decode_video_frames(data: bytes, *, fps: int = VIDEO_FPS, max_frames: int | None = None) -> np.ndarray:
    """Decode a video to uint8 ``[T,H,W,3]`` RGB resampled to ``fps`` by timestamps.

    Output frame ``j`` (time ``j / fps`` from the first frame) is the source frame on
    screen at that moment, i.e. the last one whose timestamp is not after it; the output
    covers the source's duration (``round(duration * fps)`` frames, at least one).
    Rotation metadata is not applied.
    """
    if fps <= 0:
        raise InvalidInput(f"fps must be > 0, got {fps}")
    if max_frames is not None and max_frames < 1:
        raise InvalidInput(f"max_frames must be >= 1, got {max_frames}")
    out: list[np.ndarray] = []
    with _open(data, "video", "invalid_video") as container:
        if not container.streams.video:
            raise MediaError("file has no video stream", code="invalid_video")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate or Fraction(fps)
        origin = None
        previous: av.VideoFrame | None = None  # converted to RGB only if it is used
        held: np.ndarray | None = None
        end_s = 0.0
        index = 0
        try:
            for frame in container.decode(stream):
                t = frame.time if frame.time is not None else index / float(rate)
                index += 1
                if origin is None:
                    origin = t
                t -= origin
                # every output instant before this frame shows the previous frame
                while previous is not None and len(out) / fps < t - 1e-6:
                    if held is None:
                        held = previous.to_ndarray(format="rgb24")
                    out.append(held)
                    if max_frames is not None and len(out) >= max_frames:
                        return np.stack(out)
                previous, held = frame, None
                duration = (float(frame.duration * frame.time_base)
                            if frame.duration and frame.time_base else 1.0 / float(rate))
                end_s = t + duration
        except av.FFmpegError as exc:
            if previous is None:
                raise MediaError(f"video could not be decoded ({_ffmpeg_reason(exc)})",
                                 code="invalid_video") from None
            log.warning("video decoding stopped early: %s", _ffmpeg_reason(exc))
    if previous is None:
        raise MediaError("video has no decodable frames", code="invalid_video")
    total = max(1, round(end_s * fps))
    if max_frames is not None:
        total = min(total, max_frames)
    if len(out) < total:
        last = held if held is not None else previous.to_ndarray(format="rgb24")
        out.extend([last] * (total - len(out)))
    return np.stack(out[:total])


# ============================================================================ probing


@dataclass(frozen=True)
class VideoStreamInfo:
    codec: str  # codec id name (h264, aac, mp3, opus ...), not the decoder name
    width: int
    height: int
    frame_count: int  # decoded, not the header's claim
    fps: float
    pix_fmt: str | None
    duration: float  # seconds, from the decoded timestamps


@dataclass(frozen=True)
class AudioStreamInfo:
    codec: str  # codec id name (h264, aac, mp3, opus ...), not the decoder name
    sample_rate: int
    channels: int
    samples: int  # decoded
    duration: float  # seconds, decoded samples / rate


@dataclass(frozen=True)
class MediaInfo:
    format: str
    duration: float | None  # container duration in seconds
    video: VideoStreamInfo | None
    audio: AudioStreamInfo | None
    top_level_boxes: tuple[str, ...] = ()  # MP4/MOV only

    @property
    def faststart(self) -> bool | None:
        """True when ``moov`` precedes ``mdat`` (progressive playback); None if not MP4."""
        if "moov" not in self.top_level_boxes or "mdat" not in self.top_level_boxes:
            return None
        return self.top_level_boxes.index("moov") < self.top_level_boxes.index("mdat")


def mp4_top_level_boxes(data: bytes) -> list[str]:
    """Types of the top-level ISO-BMFF boxes in file order (``ftyp``, ``moov``, ``mdat`` ...)."""
    boxes: list[str] = []
    pos = 0
    while pos + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if size == 1:
            if pos + 16 > len(data):
                break
            size = struct.unpack(">Q", data[pos + 8:pos + 16])[0]
        elif size == 0:
            size = len(data) - pos
        if size < 8:
            break
        boxes.append(kind.decode("latin-1"))
        pos += size
    return boxes


def probe_media(path_or_bytes: bytes | bytearray | memoryview | str | os.PathLike) -> MediaInfo:
    """Describe a media file by decoding it: codecs, sizes, decoded frame/sample counts,
    fps, pixel format, durations, and (MP4) the top-level box order. For tests and checks."""
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        raw = bytes(path_or_bytes)
    else:
        raw = Path(path_or_bytes).read_bytes()
    video_info = audio_info = None
    with _open(raw, "media", "invalid_media") as container:
        fmt = container.format.name
        duration = container.duration / 1_000_000 if container.duration is not None else None
        has_audio = bool(container.streams.audio)
        try:
            if container.streams.video:
                vs = container.streams.video[0]
                count, first, end, pix_fmt = 0, None, 0.0, None
                for frame in container.decode(vs):
                    t = frame.time or 0.0
                    first = t if first is None else first
                    step = float(frame.duration * frame.time_base) if frame.duration else 0.0
                    end = max(end, t + step)
                    pix_fmt = frame.format.name
                    count += 1
                rate = vs.average_rate or vs.guessed_rate
                fps = float(rate) if rate else 0.0
                span = end - (first or 0.0) if count else 0.0
                if not span and fps:
                    span = count / fps
                video_info = VideoStreamInfo(vs.codec_context.codec.canonical_name, vs.codec_context.width,
                                             vs.codec_context.height, count, fps,
                                             pix_fmt or vs.codec_context.pix_fmt, span)
        except av.FFmpegError as exc:
            raise MediaError(f"video could not be decoded ({_ffmpeg_reason(exc)})",
                             code="invalid_media") from None
    if has_audio:  # a second pass of its own: no seeking, the demuxer starts clean
        with _open(raw, "media", "invalid_media") as container:
            st = container.streams.audio[0]
            samples, rate, channels = 0, st.codec_context.sample_rate, st.codec_context.channels
            try:
                for block, rate in _iter_audio(container, st):
                    samples += block.shape[1]
                    channels = block.shape[0]
            except av.FFmpegError as exc:
                raise MediaError(f"audio could not be decoded ({_ffmpeg_reason(exc)})",
                                 code="invalid_media") from None
            audio_info = AudioStreamInfo(st.codec_context.codec.canonical_name, rate, channels, samples,
                                         samples / rate if rate else 0.0)
    boxes = tuple(mp4_top_level_boxes(raw)) if "mp4" in fmt else ()
    return MediaInfo(fmt, duration, video_info, audio_info, boxes)
