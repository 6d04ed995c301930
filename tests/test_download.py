"""storystudio-download: repos, file selection, target folders, verification, exit codes.

No network here: ``huggingface_hub.snapshot_download`` is replaced by a fake that
records its arguments, and the validators by recorders (plus, where the
checkpoint writers exist, the real validators on a tiny written checkpoint).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub.utils import filter_repo_objects

from storystudio import download
from storystudio.errors import CheckpointError

# File lists of the official repositories (Hub API / repo history), trimmed of
# nothing: every file must be either selected on purpose or left out on purpose.
ZIMAGE_REPO_FILES = [
    ".gitattributes",
    "README.md",
    "assets/showcase.jpg",
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/generation_config.json",
    "text_encoder/model-00001-of-00003.safetensors",
    "text_encoder/model-00002-of-00003.safetensors",
    "text_encoder/model-00003-of-00003.safetensors",
    "text_encoder/model.safetensors.index.json",
    "tokenizer/merges.txt",
    "tokenizer/tokenizer.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "transformer/config.json",
    "transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
    "transformer/diffusion_pytorch_model-00002-of-00003.safetensors",
    "transformer/diffusion_pytorch_model-00003-of-00003.safetensors",
    "transformer/diffusion_pytorch_model.safetensors.index.json",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
]
ZIMAGE_SKIPPED = {".gitattributes", "README.md", "assets/showcase.jpg"}

W2V = "wav2vec2-large-xlsr-53-english"
WAN_REPO_FILES = [
    ".gitattributes",
    "LICENSE.txt",
    "README.md",
    "assets/comp_effic.png",
    "examples/pose.mp4",
    "config.json",
    "configuration.json",
    "diffusion_pytorch_model-00001-of-00004.safetensors",
    "diffusion_pytorch_model-00002-of-00004.safetensors",
    "diffusion_pytorch_model-00003-of-00004.safetensors",
    "diffusion_pytorch_model-00004-of-00004.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "models_t5_umt5-xxl-enc-bf16.pth",
    "Wan2.1_VAE.pth",
    "google/umt5-xxl/special_tokens_map.json",
    "google/umt5-xxl/spiece.model",
    "google/umt5-xxl/tokenizer.json",
    "google/umt5-xxl/tokenizer_config.json",
    f"{W2V}/.msc",
    f"{W2V}/.mv",
    f"{W2V}/README.md",
    f"{W2V}/alphabet.json",
    f"{W2V}/config.json",
    f"{W2V}/configuration.json",
    f"{W2V}/eval.py",
    f"{W2V}/flax_model.msgpack",
    f"{W2V}/full_eval.sh",
    f"{W2V}/language_model/attrs.json",
    f"{W2V}/language_model/lm.binary",
    f"{W2V}/language_model/unigrams.txt",
    f"{W2V}/log_mozilla-foundation_common_voice_6_0_en_test_predictions.txt",
    f"{W2V}/model.safetensors",
    f"{W2V}/preprocessor_config.json",
    f"{W2V}/pytorch_model.bin",
    f"{W2V}/special_tokens_map.json",
    f"{W2V}/vocab.json",
]
WAN_SKIPPED = {
    ".gitattributes",
    "LICENSE.txt",
    "README.md",
    "assets/comp_effic.png",
    "examples/pose.mp4",
    "configuration.json",
    f"{W2V}/.msc",
    f"{W2V}/.mv",
    f"{W2V}/README.md",
    f"{W2V}/eval.py",
    f"{W2V}/flax_model.msgpack",
    f"{W2V}/full_eval.sh",
    f"{W2V}/language_model/lm.binary",
    f"{W2V}/language_model/unigrams.txt",
    f"{W2V}/log_mozilla-foundation_common_voice_6_0_en_test_predictions.txt",
    f"{W2V}/pytorch_model.bin",
}


def selected(spec: download.ModelSpec, files: list[str]) -> set[str]:
    # the same filter snapshot_download applies to the repo listing
    return set(filter_repo_objects(files, allow_patterns=list(spec.allow_patterns)))


@pytest.mark.parametrize(
    ("key", "files", "skipped"),
    [("zimage", ZIMAGE_REPO_FILES, ZIMAGE_SKIPPED), ("wan", WAN_REPO_FILES, WAN_SKIPPED)],
)
def test_allow_patterns_select_exactly_the_loaded_files(key, files, skipped):
    assert selected(download.MODELS[key], files) == set(files) - skipped


def test_wan_selection_has_the_official_config_paths():
    # wan/configs/wan_s2v_14B.py names these relative to the checkpoint dir
    from storystudio.patches.wan22 import import_wan

    import_wan()
    from wan.configs.wan_s2v_14B import s2v_14B

    got = selected(download.MODELS["wan"], WAN_REPO_FILES)
    assert s2v_14B.t5_checkpoint in got
    assert s2v_14B.vae_checkpoint in got
    assert any(f.startswith(s2v_14B.t5_tokenizer + "/") for f in got)
    assert {f"{s2v_14B.wav2vec}/config.json", f"{s2v_14B.wav2vec}/model.safetensors"} <= got


class FakeHub:
    """Stands in for snapshot_download; optionally fails for one repo."""

    def __init__(self, fail_repo: str | None = None, writer=None):
        self.calls: list[dict] = []
        self.fail_repo = fail_repo
        self.writer = writer

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        if kwargs["repo_id"] == self.fail_repo:
            raise OSError("[Errno 28] No space left on device")
        local = Path(kwargs["local_dir"])
        local.mkdir(parents=True, exist_ok=True)
        if self.writer:
            self.writer(kwargs["repo_id"], local)
        return str(local)


class Validators:
    """Records validator calls; raises CheckpointError for the keys in ``bad``."""

    def __init__(self, bad: tuple[str, ...] = ()):
        self.calls: list[tuple[str, Path]] = []
        self.bad = bad

    def load(self, spec):
        def validate(path):
            self.calls.append((spec.key, Path(path)))
            if spec.key in self.bad:
                raise CheckpointError(
                    f"missing file {path}/transformer/diffusion_pytorch_model-00002-of-00003.safetensors",
                    code="checkpoint_missing",
                )

        return validate


@pytest.fixture
def hub(monkeypatch):
    fake = FakeHub()
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    return fake


@pytest.fixture
def validators(monkeypatch):
    v = Validators()
    monkeypatch.setattr(download, "load_validator", v.load)
    return v


def test_downloads_both_official_repos_into_the_layout_then_verifies(tmp_path, hub, validators, capsys):
    rc = download.main(["--models-dir", str(tmp_path)], env={})
    assert rc == 0
    assert [c["repo_id"] for c in hub.calls] == ["Tongyi-MAI/Z-Image-Turbo", "Wan-AI/Wan2.2-S2V-14B"]
    assert [Path(c["local_dir"]) for c in hub.calls] == [tmp_path / "Z-Image-Turbo", tmp_path / "Wan2.2-S2V-14B"]
    for call, key in zip(hub.calls, ("zimage", "wan"), strict=True):
        assert call["allow_patterns"] == list(download.MODELS[key].allow_patterns)
        assert call["token"] is None
    assert validators.calls == [("zimage", tmp_path / "Z-Image-Turbo"), ("wan", tmp_path / "Wan2.2-S2V-14B")]
    assert "ready" in capsys.readouterr().err


def test_only_fetches_one_model(tmp_path, hub, validators):
    assert download.main(["--models-dir", str(tmp_path), "--only", "wan"], env={}) == 0
    assert [c["repo_id"] for c in hub.calls] == ["Wan-AI/Wan2.2-S2V-14B"]
    assert [k for k, _ in validators.calls] == ["wan"]


def test_hf_token_is_passed_on_and_never_printed(tmp_path, hub, validators, capsys, caplog):
    secret = "hf_SecretTokenValue123"
    assert download.main(["--models-dir", str(tmp_path), "--only", "zimage"], env={"HF_TOKEN": secret}) == 0
    assert hub.calls[0]["token"] == secret
    out = capsys.readouterr()
    assert secret not in out.out + out.err + caplog.text


def test_failed_verification_gives_nonzero_exit_naming_the_file(tmp_path, hub, monkeypatch, capsys):
    v = Validators(bad=("zimage",))
    monkeypatch.setattr(download, "load_validator", v.load)
    rc = download.main(["--models-dir", str(tmp_path)], env={})
    assert rc == 1
    err = capsys.readouterr().err
    assert "Tongyi-MAI/Z-Image-Turbo" in err and "checkpoint_missing" in err
    assert "diffusion_pytorch_model-00002-of-00003.safetensors" in err
    # the other model is still fetched and checked
    assert [k for k, _ in v.calls] == ["zimage", "wan"]
    assert "ready" not in err


def test_failed_download_gives_nonzero_exit_and_skips_its_verification(tmp_path, monkeypatch, validators, capsys):
    fake = FakeHub(fail_repo="Wan-AI/Wan2.2-S2V-14B")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    rc = download.main(["--models-dir", str(tmp_path)], env={})
    assert rc == 1
    err = capsys.readouterr().err
    assert "download of Wan-AI/Wan2.2-S2V-14B" in err and "No space left on device" in err
    assert [k for k, _ in validators.calls] == ["zimage"]


def test_verify_only_downloads_nothing(tmp_path, hub, validators):
    (tmp_path / "Z-Image-Turbo").mkdir()
    assert download.main(["--models-dir", str(tmp_path), "--verify-only", "--only", "zimage"], env={}) == 0
    assert hub.calls == []
    assert validators.calls == [("zimage", tmp_path / "Z-Image-Turbo")]


def test_verify_only_on_a_missing_folder_fails(tmp_path, hub, validators, capsys):
    rc = download.main(["--models-dir", str(tmp_path), "--verify-only"], env={})
    assert rc == 1
    err = capsys.readouterr().err
    assert f"folder {tmp_path / 'Z-Image-Turbo'} does not exist" in err
    assert validators.calls == []


def test_refuses_to_download_when_hub_is_offline(tmp_path, hub, validators, capsys):
    rc = download.main(["--models-dir", str(tmp_path)], env={"HF_HUB_OFFLINE": "1"})
    assert rc == 2
    assert hub.calls == []
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err


def test_bad_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        download.main(["--only", "flux"], env={})
    assert exc.value.code == 2


def test_target_folders_follow_the_worker_env(tmp_path):
    z, w = download.MODELS["zimage"], download.MODELS["wan"]
    assert download.target_dir(z, None, {}) == Path("/runpod-volume/models/Z-Image-Turbo")
    env = {"STORYSTUDIO_MODELS_DIR": str(tmp_path), "STORYSTUDIO_WAN_DIR": "/elsewhere/wan"}
    assert download.target_dir(z, None, env) == tmp_path / "Z-Image-Turbo"
    assert download.target_dir(w, None, env) == Path("/elsewhere/wan")
    # an explicit --models-dir wins over every env var
    assert download.target_dir(w, Path("/x"), env) == Path("/x/Wan2.2-S2V-14B")


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"STORYSTUDIO_MODELS_DIR": "/data/m"},
        {"STORYSTUDIO_MODELS_DIR": "/data/m", "STORYSTUDIO_ZIMAGE_DIR": "/z", "STORYSTUDIO_WAN_DIR": "/w"},
    ],
)
def test_target_folders_are_the_first_place_the_worker_looks(env):
    from storystudio.config import WorkerSettings
    from storystudio.models.locate import WAN, ZIMAGE, candidates

    settings = WorkerSettings.from_env({**env, "STORYSTUDIO_DEVICE": "cpu"})
    for key, ref, explicit in (("zimage", ZIMAGE, settings.zimage_dir), ("wan", WAN, settings.wan_dir)):
        first = candidates(ref, explicit, settings.model_search)[0]
        assert first.kind == ("explicit" if explicit else "flat")
        assert download.target_dir(download.MODELS[key], None, env) == first.path
        assert download.MODELS[key].repo_id == ref.repo_id and download.MODELS[key].dir_env == ref.dir_env


def test_validator_names_resolve_to_the_checkpoint_validators():
    zimage = pytest.importorskip("storystudio.models.checkpoints.zimage")
    wan = pytest.importorskip("storystudio.models.checkpoints.wan_s2v")
    assert download.load_validator(download.MODELS["zimage"]) is zimage.validate_zimage
    assert download.load_validator(download.MODELS["wan"]) is wan.validate_wan_s2v


def test_real_validators_accept_a_complete_folder_and_reject_a_broken_one(tmp_path, monkeypatch, capsys):
    synthetic = pytest.importorskip("storystudio.synthetic.zimage")
    written = tmp_path / "written"
    synthetic.write_zimage_checkpoint(written, "tiny")

    def copy_checkpoint(repo_id, local):
        shutil.copytree(written, local, dirs_exist_ok=True)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", FakeHub(writer=copy_checkpoint))
    models = tmp_path / "models"
    assert download.main(["--models-dir", str(models), "--only", "zimage"], env={}) == 0

    victim = next(p for p in sorted((models / "Z-Image-Turbo" / "transformer").iterdir()) if p.suffix == ".safetensors")
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    capsys.readouterr()
    assert download.main(["--models-dir", str(models), "--only", "zimage", "--verify-only"], env={}) == 1
    err = capsys.readouterr().err
    assert victim.name in err and "checkpoint_corrupt" in err


@pytest.mark.parametrize(
    ("key", "module", "writer"),
    [
        ("zimage", "storystudio.synthetic.zimage", "write_zimage_checkpoint"),
        ("wan", "storystudio.synthetic.wan_s2v", "write_wan_s2v_checkpoint"),
    ],
)
def test_allow_patterns_cover_every_file_of_the_official_layout(key, module, writer, tmp_path):
    # the synthetic writers reproduce the official layout the validators demand
    write = getattr(pytest.importorskip(module), writer)
    root = write(tmp_path / key, "tiny") or tmp_path / key
    files = sorted(p.relative_to(root).as_posix() for p in Path(root).rglob("*") if p.is_file())
    assert files
    assert selected(download.MODELS[key], files) == set(files)
