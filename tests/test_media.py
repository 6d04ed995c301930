"""Tests for storystudio.media: images, audio decode/trim/resample, MP4 encode, probing."""

from __future__ import annotations

import io
import wave

import numpy as np
import pytest
from PIL import Image

from storystudio.errors import InvalidInput, MediaError
from storystudio.media import (
    AudioClip,
    decode_audio,
    decode_video_frames,
    encode_audio,
    encode_mp4,
    encode_png,
    load_image,
    mp4_top_level_boxes,
    probe_media,
    synth_speech,
    to_mono_16k,
)

FORMATS = ["wav", "mp3", "m4a", "flac", "ogg", "opus", "webm"]
LOSSY_RATE = {"opus": 48000, "webm": 48000}  # Opus decoders always return 48 kHz


@pytest.fixture(scope="module")
def speech() -> AudioClip:
    return synth_speech(1.0, sample_rate=24000, seed=1)


@pytest.fixture(scope="module")
def stereo() -> AudioClip:
    mono = synth_speech(0.7, sample_rate=44100, seed=2).samples[0]
    return AudioClip(np.stack([mono, -0.5 * mono]), 44100)


def _media_error(code: str, fn, *args, **kwargs) -> MediaError:
    with pytest.raises(MediaError) as info:
        fn(*args, **kwargs)
    assert info.value.code == code, info.value.message
    return info.value


# ============================================================================ audio


@pytest.mark.parametrize("fmt", FORMATS)
def test_audio_round_trip_every_format(fmt, speech, stereo):
    for clip in (speech, stereo):
        data = encode_audio(clip, fmt)
        got = decode_audio(data)
        assert got.samples.dtype == np.float32 and got.samples.ndim == 2
        assert got.channels == clip.channels
        assert got.sample_rate == LOSSY_RATE.get(fmt, clip.sample_rate)
        assert abs(got.duration_s - clip.duration_s) < 0.030, (fmt, got.duration_s, clip.duration_s)
        assert 0.05 < float(np.abs(got.samples).max()) <= 1.0


def test_wav_and_flac_are_lossless_to_16_bit(speech):
    for fmt in ("wav", "flac"):
        got = decode_audio(encode_audio(speech, fmt))
        assert got.num_samples == speech.num_samples
        assert np.abs(got.samples - speech.samples).max() <= 1 / 32768 + 1e-7


def test_mp3_and_aac_keep_the_waveform(speech):
    """Encoder delay is compensated: lossy decodes line up with the source in time."""
    for fmt in ("mp3", "m4a"):
        got = decode_audio(encode_audio(speech, fmt)).samples[0]
        ref = speech.samples[0][: got.size]
        corr = float(np.dot(got[: ref.size], ref) / (np.linalg.norm(got[: ref.size]) * np.linalg.norm(ref)))
        assert corr > 0.9, (fmt, corr)


def test_trim_window_exact_on_pcm(speech):
    data = encode_audio(speech, "wav")
    sr = speech.sample_rate
    got = decode_audio(data, start_s=0.25, duration_s=0.5)
    assert got.num_samples == sr // 2
    pcm = np.round(speech.samples * 32767) / 32768  # what 16-bit WAV stores
    assert np.allclose(got.samples, pcm[:, sr // 4: sr // 4 + sr // 2], atol=2 / 32768)
    assert decode_audio(data, start_s=0.75).num_samples == sr // 4
    assert decode_audio(data, duration_s=0.1).num_samples == sr // 10
    # a window running past the end is cut at the end
    assert decode_audio(data, start_s=0.9, duration_s=5).num_samples == sr // 10


def test_trim_on_compressed_formats(speech):
    for fmt in ("mp3", "m4a", "opus"):
        got = decode_audio(encode_audio(speech, fmt), start_s=0.2, duration_s=0.3)
        assert abs(got.duration_s - 0.3) < 1e-3, fmt


def test_empty_audio():
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
    err = _media_error("empty_audio", decode_audio, buf.getvalue())
    assert "no samples" in err.message
    _media_error("empty_audio", decode_audio, b"")
    zero = encode_audio(AudioClip(np.zeros((1, 0), np.float32), 16000), "wav")
    _media_error("empty_audio", decode_audio, zero)


def test_trim_beyond_the_end_is_empty(speech):
    err = _media_error("empty_audio", decode_audio, encode_audio(speech, "wav"), start_s=3.0)
    assert "beyond the end" in err.message and "1.000 s" in err.message


@pytest.mark.parametrize("garbage", [b"definitely not audio" * 50, bytes(range(256)) * 20,
                                     b"RIFF\x00\x00\x00\x00WAVEfmt "])
def test_garbage_is_invalid_audio(garbage):
    _media_error("invalid_audio", decode_audio, garbage)


def test_video_without_audio_is_invalid_audio(tmp_path):
    path = encode_mp4(np.zeros((2, 16, 16, 3), np.uint8), 16, None, tmp_path / "silent.mp4")
    err = _media_error("invalid_audio", decode_audio, path.read_bytes())
    assert "no audio stream" in err.message


@pytest.mark.parametrize("kwargs", [{"start_s": -1}, {"duration_s": -0.5}, {"duration_s": 0},
                                    {"start_s": float("nan")}, {"duration_s": float("inf")}])
def test_bad_trim_values_are_invalid_input(kwargs, speech):
    with pytest.raises(InvalidInput) as info:
        decode_audio(encode_audio(speech, "wav"), **kwargs)
    assert info.value.code == "invalid_input"
    assert "audio_start" in info.value.message or "audio_duration" in info.value.message


def test_max_duration(speech):
    data = encode_audio(speech, "wav")
    err = _media_error("audio_too_long", decode_audio, data, max_duration_s=0.5)
    assert "0.5 s" in err.message
    assert decode_audio(data, start_s=0.6, max_duration_s=0.5).num_samples == int(0.4 * 24000)
    assert decode_audio(data, duration_s=0.5, max_duration_s=0.5).duration_s == 0.5
    assert decode_audio(data, max_duration_s=1.0).duration_s == 1.0
    err = _media_error("audio_too_long", decode_audio, data, duration_s=0.9, max_duration_s=0.5)
    assert "audio_duration is 0.9 s" in err.message


def test_to_mono_16k(stereo):
    out = to_mono_16k(stereo)
    assert out.dtype == np.float32 and out.ndim == 1
    assert out.size == int(np.ceil(stereo.num_samples * 16000 / 44100))
    # a tone keeps its pitch
    tone = AudioClip(np.sin(2 * np.pi * 440 * np.arange(24000) / 24000)[None], 24000)
    res = to_mono_16k(tone)
    assert res.size == 16000
    assert int(np.argmax(np.abs(np.fft.rfft(res)))) == 440  # 1 Hz bins over one second
    same = AudioClip(np.ones((2, 160), np.float32) * [[0.2], [0.4]], 16000)
    assert np.allclose(to_mono_16k(same), 0.3)
    assert np.array_equal(to_mono_16k(stereo), out)  # deterministic


def test_to_mono_16k_matches_the_official_librosa_load_steps(stereo):
    librosa = pytest.importorskip("librosa")
    expected = librosa.resample(librosa.to_mono(stereo.samples), orig_sr=44100, target_sr=16000)
    assert np.array_equal(to_mono_16k(stereo), expected)


def test_synth_speech_is_speech_like_and_deterministic():
    a = synth_speech(3.0, sample_rate=16000, seed=7)
    assert a.sample_rate == 16000 and a.channels == 1 and a.num_samples == 48000
    assert np.array_equal(a.samples, synth_speech(3.0, sample_rate=16000, seed=7).samples)
    assert not np.array_equal(a.samples, synth_speech(3.0, sample_rate=16000, seed=8).samples)
    x = a.samples[0].astype(np.float64)
    assert 0.3 < np.abs(x).max() <= 1.0
    frame_rms = np.sqrt((x[: 47840].reshape(-1, 160) ** 2).mean(axis=1))  # 10 ms frames
    silent = frame_rms < 1e-3
    assert 0.1 < silent.mean() < 0.7  # pauses between words, but mostly talking
    assert np.count_nonzero(np.diff(silent.astype(int)) == 1) >= 3  # several separate pauses
    # rich harmonic spectrum, not a pure sine: many strong bins
    spectrum = np.abs(np.fft.rfft(x))
    assert np.count_nonzero(spectrum > 0.05 * spectrum.max()) > 50


def test_audio_clip_properties():
    clip = AudioClip(np.zeros(480), 48000)  # 1-D becomes [1, n]
    assert clip.samples.shape == (1, 480) and clip.samples.dtype == np.float32
    assert clip.channels == 1 and clip.duration_s == 0.01


# ============================================================================ video


def _gradient_frames(count: int, height: int, width: int) -> np.ndarray:
    frames = np.zeros((count, height, width, 3), np.uint8)
    for i in range(count):
        frames[i, ..., 0] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
        frames[i, ..., 1] = (i * 13) % 256
        frames[i, ..., 2] = 100
    return frames


def test_mp4_round_trip(tmp_path, speech):
    path = encode_mp4(_gradient_frames(16, 48, 64), 16, speech, tmp_path / "out.mp4")
    info = probe_media(path)
    assert info.video is not None and info.audio is not None
    assert info.video.codec == "h264" and info.video.pix_fmt == "yuv420p"
    assert (info.video.width, info.video.height) == (64, 48)
    assert info.video.frame_count == 16 and info.video.fps == 16.0
    assert abs(info.video.duration - 1.0) < 1e-6
    assert info.audio.codec == "aac" and info.audio.sample_rate == 24000 and info.audio.channels == 1
    assert abs(info.audio.duration - info.video.duration) <= 1 / 16
    boxes = mp4_top_level_boxes(path.read_bytes())
    assert boxes.index("moov") < boxes.index("mdat")  # +faststart
    assert info.faststart is True
    # the same from bytes; nothing left behind but the output
    assert probe_media(path.read_bytes()) == info
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]


def test_mp4_audio_cut_to_video_length_only_when_longer_by_more_than_a_frame(tmp_path):
    frames = _gradient_frames(16, 32, 32)
    long = synth_speech(1.5, sample_rate=24000)
    info = probe_media(encode_mp4(frames, 16, long, tmp_path / "a.mp4"))
    assert info.audio.samples == 24000  # cut to exactly 16 / 16 s
    slightly = synth_speech(1.04, sample_rate=24000)  # within one frame (62.5 ms): kept
    info = probe_media(encode_mp4(frames, 16, slightly, tmp_path / "b.mp4"))
    assert info.audio.samples == slightly.num_samples
    short = synth_speech(0.5, sample_rate=24000)
    info = probe_media(encode_mp4(frames, 16, short, tmp_path / "c.mp4"))
    assert info.audio.samples == short.num_samples and info.video.frame_count == 16


def test_mp4_keeps_stereo_and_rate(tmp_path, stereo):
    frames = _gradient_frames(11, 32, 32)  # 0.6875 s at 16 fps; audio 0.7 s
    info = probe_media(encode_mp4(frames, 16, stereo, tmp_path / "s.mp4"))
    assert info.audio.channels == 2 and info.audio.sample_rate == 44100
    assert info.video.frame_count == 11 and abs(info.video.duration - 11 / 16) < 1e-6
    assert abs(info.audio.duration - stereo.duration_s) < 1e-3  # longer by < 1 frame: kept


def test_mp4_odd_size_is_padded_with_the_edge(tmp_path):
    frames = np.zeros((4, 33, 47, 3), np.uint8)
    frames[:, :, -1] = 255  # last column white, padding repeats it
    frames[:, -1, :] = 255
    path = encode_mp4(frames, 16, None, tmp_path / "odd.mp4")
    info = probe_media(path)
    assert (info.video.width, info.video.height) == (48, 34) and info.audio is None
    decoded = decode_video_frames(path.read_bytes(), fps=16)
    assert decoded.shape == (4, 34, 48, 3)
    assert decoded[0, 10, -2:].min() > 200 and decoded[0, -2:, 10].min() > 200
    assert decoded[0, 10, 10].max() < 40


def test_mp4_colours_survive(tmp_path):
    frames = np.zeros((2, 32, 32, 3), np.uint8)
    frames[...] = (200, 30, 40)
    decoded = decode_video_frames(encode_mp4(frames, 16, None, tmp_path / "c.mp4").read_bytes())
    assert np.abs(decoded[0, 16, 16].astype(int) - [200, 30, 40]).max() <= 6


def test_decode_video_frames_resamples_by_timestamp(tmp_path):
    source = np.zeros((30, 16, 16, 3), np.uint8)
    for i in range(30):
        source[i] = i * 8  # brightness tells the source frame
    data = encode_mp4(source, 30, None, tmp_path / "30fps.mp4").read_bytes()
    out = decode_video_frames(data, fps=16)
    assert out.shape == (16, 16, 16, 3) and out.dtype == np.uint8
    shown = np.round(out[:, 8, 8].mean(axis=1) / 8).astype(int)
    expected = [int(np.floor(j * 30 / 16 + 1e-9)) for j in range(16)]  # frame on screen at j/16 s
    assert np.abs(shown - expected).max() <= 0, (shown, expected)
    assert decode_video_frames(data, fps=16, max_frames=5).shape[0] == 5
    assert decode_video_frames(data, fps=60).shape[0] == 60  # upsampling repeats frames


def test_decode_video_frames_errors(speech):
    _media_error("invalid_video", decode_video_frames, b"not a video at all" * 20)
    err = _media_error("invalid_video", decode_video_frames, encode_audio(speech, "m4a"))
    assert "no video stream" in err.message


# ============================================================================ images and probe


def _image_bytes(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def test_load_image_formats_and_modes():
    rgb = Image.new("RGB", (40, 30), (10, 200, 30))
    for fmt in ("PNG", "JPEG", "WEBP"):
        img = load_image(_image_bytes(rgb, fmt))
        assert img.mode == "RGB" and img.size == (40, 30)
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    assert load_image(_image_bytes(rgba, "PNG")).getpixel((3, 3)) == (255, 255, 255)
    gray = Image.new("L", (5, 5), 77)
    assert load_image(_image_bytes(gray, "PNG")).getpixel((0, 0)) == (77, 77, 77)


def test_load_image_applies_exif_orientation():
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    assert load_image(_image_bytes(img, "JPEG", exif=exif)).size == (20, 40)


def test_load_image_rejects_non_images_truncation_and_bombs():
    _media_error("invalid_image", load_image, b"this is not an image\n" * 10)
    _media_error("invalid_image", load_image, b"")
    png = encode_png(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    _media_error("invalid_image", load_image, png[: len(png) // 2])
    err = _media_error("image_too_large", load_image, png, max_pixels=64 * 63)
    assert "64x64" in err.message


def test_encode_png_sizes_and_round_trip():
    arr = np.random.default_rng(1).integers(0, 255, (21, 37, 3), dtype=np.uint8)
    data = encode_png(arr)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = load_image(data)
    assert img.size == (37, 21) and np.array_equal(np.asarray(img), arr)
    assert Image.open(io.BytesIO(encode_png(Image.new("RGB", (1024, 576))))).size == (1024, 576)
    with pytest.raises(ValueError):
        encode_png(np.zeros((4, 4, 3), np.float32))


def test_probe_audio_only_and_garbage(speech):
    info = probe_media(encode_audio(speech, "mp3"))
    assert info.video is None and info.audio.codec == "mp3" and info.audio.samples == 24000
    assert info.faststart is None
    _media_error("invalid_media", probe_media, b"garbage" * 100)
