"""Hugging Face Spaces: the README front matter against requirements.txt, and each environment (off Spaces,
ZeroGPU, a dedicated GPU Space, a CPU Space) simulated through its variables.

GPU presence is faked in two places only, both for the device read: ``torch.cuda.is_available`` (what the
driver reports) and ``medart_core.spaces._query_gpus`` (the NVML / nvidia-smi read of name and memory)."""
from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import yaml

from medart_core import spaces

ROOT = Path(__file__).resolve().parent.parent
SPACE_VARS = ("SPACE_ID", "SYSTEM", "SPACES_ZERO_GPU", "MEDART_DURABLE_DIR", "SPACE_AUTHOR_NAME")


def front_matter(text: str) -> dict:
    m = re.match(r"\A---\n(.*?)\n---\n", text, re.S)
    assert m, "README.md must open with a YAML front matter block between --- lines"
    return yaml.safe_load(m.group(1))


def pins() -> dict[str, str]:
    out = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            out[re.sub(r"\[.*\]", "", name).strip().lower()] = version.strip()
    return out


@pytest.fixture
def clean_env(monkeypatch):
    for v in SPACE_VARS:
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setattr(spaces, "_pixart_cached", lambda: False)
    return monkeypatch


def fake_cuda(monkeypatch, gpus):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: bool(gpus))
    monkeypatch.setattr(spaces, "_query_gpus", lambda: tuple(gpus))
    monkeypatch.setattr(spaces, "_nvidia_driver_possible", lambda: True)   # a machine with the driver


def test_no_nvidia_driver_means_no_torch_import(clean_env, tmp_path):
    """Without an NVIDIA driver, CUDA cannot be there: environment() answers without asking torch (the studio's
    start does not import it)."""
    import torch

    def asked():
        raise AssertionError("torch.cuda asked although no driver is installed")

    clean_env.setattr(spaces, "_nvidia_driver_possible", lambda: False)
    clean_env.setattr(torch.cuda, "is_available", asked)
    env = spaces.environment(tmp_path)
    assert not env.cuda_available and not env.has_gpu


# ------------------------------------------------------------------------------------------------
# front matter
# ------------------------------------------------------------------------------------------------
def test_front_matter_matches_requirements_and_ci_python():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    fm = front_matter(text)
    assert fm["sdk"] == "gradio"
    assert fm["sdk_version"] == pins()["gradio"]                       # the pinned gradio, exactly
    # .ci/run runs `python -m pytest`: the interpreter running this test is the one CI uses.
    assert str(fm["python_version"]) == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert (ROOT / fm["app_file"]).is_file() and fm["app_file"] == "app.py"
    assert fm["hf_oauth"] is True
    assert fm["pinned"] is False
    for key in ("title", "emoji", "colorFrom", "colorTo", "license", "suggested_hardware",
                "startup_duration_timeout"):
        assert fm.get(key), key
    colours = {"red", "yellow", "green", "blue", "indigo", "purple", "pink", "gray"}
    assert fm["colorFrom"] in colours and fm["colorTo"] in colours
    assert fm["suggested_hardware"] in {"cpu-basic", "cpu-upgrade", "t4-small", "t4-medium", "l4x1", "l4x4",
                                        "l40sx1", "a10g-small", "a10g-large", "a100-large"}
    assert re.fullmatch(r"\d+[mh]", str(fm["startup_duration_timeout"]))
    # preload_from_hub: a list of "repo_id" or "repo_id file1,file2" strings
    preload = fm["preload_from_hub"]
    assert isinstance(preload, list) and all(isinstance(e, str) for e in preload)
    assert spaces.PIXART_BACKBONE in [e.split()[0] for e in preload]
    assert len(fm.get("short_description", "")) <= 60
    # the rest of the README still starts with its title, and the deploy section sits before Architecture
    body = text.split("\n---\n", 1)[1]
    assert body.lstrip().startswith("# Med-Art Studio")
    assert body.index("## Deploy on Hugging Face Spaces") < body.index("## Architecture")


# ------------------------------------------------------------------------------------------------
# environments
# ------------------------------------------------------------------------------------------------
def test_off_spaces_everything_is_a_no_op(clean_env, tmp_path):
    fake_cuda(clean_env, [])
    clean_env.setenv("SPACES_ZERO_GPU", "true")        # ignored off Spaces
    env = spaces.environment(tmp_path)
    assert not env.on_spaces and not env.zero_gpu and env.space_id is None and not env.has_gpu
    assert spaces.training_allowed(env)[0] is True

    def f(x):
        return x + 1

    assert spaces.gpu_call(f, 60) is f
    assert spaces.banner_text(env).startswith("Local machine · CPU only")
    assert "durable" not in spaces.banner_text(env)     # no nagging off Spaces
    assert spaces.default_backbone(env) == spaces.offline_backbone()
    assert spaces.offline_backbone() in ("demo", "tiny")


def test_local_gpu_is_named_with_its_memory(clean_env, tmp_path):
    fake_cuda(clean_env, [spaces.GPUInfo("NVIDIA H200", 143771 * 2 ** 20)])
    env = spaces.environment(tmp_path)
    assert env.cuda_available and not env.on_spaces
    assert spaces.banner_text(env) == "Local machine · GPU NVIDIA H200 (140.4 GiB)"
    assert spaces.training_allowed(env) == (True, "")
    assert spaces.default_backbone(env) == spaces.offline_backbone()   # off Spaces: the CLI/app flag decides


def test_zero_gpu_space(clean_env, tmp_path):
    import torch

    clean_env.setenv("SPACE_ID", "medart/studio")
    clean_env.setenv("SYSTEM", "spaces")
    clean_env.setenv("SPACES_ZERO_GPU", "true")

    def no_cuda_here():
        raise AssertionError("torch.cuda must not be touched on ZeroGPU outside a GPU call")

    clean_env.setattr(torch.cuda, "is_available", no_cuda_here)
    clean_env.setattr(spaces, "_query_gpus", no_cuda_here)
    env = spaces.environment(tmp_path)
    assert env.on_spaces and env.zero_gpu and env.space_id == "medart/studio" and env.has_gpu
    ok, why = spaces.training_allowed(env)
    assert ok is False
    assert why == ("ZeroGPU gives a GPU per call, for seconds to minutes; a training run cannot live there: use a "
                   "dedicated-GPU Space or `python app.py` on a GPU machine")
    banner = spaces.banner_text(env)
    assert banner.startswith("Hugging Face Space medart/studio · ZeroGPU") and "fine-tuning is off" in banner
    assert "no durable folder" in banner                # on Spaces a missing durable folder is shown
    # spaces.GPU wraps the function when the `spaces` package is importable
    calls = []

    def GPU(duration=60):
        calls.append(duration)
        return lambda fn: ("wrapped", fn)

    clean_env.setitem(sys.modules, "spaces", types.SimpleNamespace(GPU=GPU))

    def gen():
        return 1

    assert spaces.gpu_call(gen, spaces.GENERATE_GPU_S) == ("wrapped", gen)
    assert calls == [spaces.GENERATE_GPU_S]
    dynamic = lambda *a, **k: 30   # noqa: E731 - ZeroGPU accepts a function of the call's arguments
    spaces.gpu_call(gen, dynamic)
    assert calls[-1] is dynamic
    with pytest.raises(Exception, match="positive duration"):
        spaces.gpu_call(gen, 0)
    # without the package: unchanged (and the banner says GPU calls will run without a GPU)
    clean_env.setitem(sys.modules, "spaces", None)
    assert spaces.gpu_call(gen, 60) is gen
    # the backbone: PixArt when the Hub is reachable or the weights were preloaded, else the offline one
    clean_env.delenv("HF_HUB_OFFLINE", raising=False)
    assert spaces.default_backbone(spaces.environment(tmp_path)) == spaces.PIXART_BACKBONE
    clean_env.setenv("HF_HUB_OFFLINE", "1")
    assert spaces.default_backbone(spaces.environment(tmp_path)) == spaces.offline_backbone()
    clean_env.setattr(spaces, "_pixart_cached", lambda: True)
    assert spaces.default_backbone(spaces.environment(tmp_path)) == spaces.PIXART_BACKBONE


def test_dedicated_gpu_space_trains_locally(clean_env, tmp_path):
    clean_env.setenv("SPACE_ID", "medart/studio-a10g")
    clean_env.setenv("SYSTEM", "spaces")
    clean_env.setenv("MEDART_DURABLE_DIR", str(tmp_path / "bucket"))
    clean_env.setenv("HF_HUB_OFFLINE", "1")
    fake_cuda(clean_env, [spaces.GPUInfo("NVIDIA A10G", 23028 * 2 ** 20)])
    clean_env.setattr(spaces, "_pixart_cached", lambda: True)          # preload_from_hub filled the cache
    env = spaces.environment(tmp_path)
    assert env.on_spaces and not env.zero_gpu and env.cuda_available
    assert spaces.training_allowed(env) == (True, "")
    assert spaces.banner_text(env) == (f"Hugging Face Space medart/studio-a10g · GPU NVIDIA A10G (22.5 GiB) · "
                                       f"durable copy in {tmp_path / 'bucket'}")

    def f():
        return 2

    assert spaces.gpu_call(f, 60) is f                     # a dedicated GPU needs no per-call wrapper
    assert spaces.default_backbone(env) == spaces.PIXART_BACKBONE
    assert env.to_dict()["gpus"] == [{"name": "NVIDIA A10G", "memory_bytes": 23028 * 2 ** 20}]


def test_cpu_space_and_variables_that_do_not_make_a_space(clean_env, tmp_path):
    fake_cuda(clean_env, [])
    clean_env.setenv("SPACE_ID", "medart/cpu")
    assert not spaces.environment(tmp_path).on_spaces       # SYSTEM=spaces is required too
    clean_env.setenv("SYSTEM", "spaces")
    env = spaces.environment(tmp_path)
    assert env.on_spaces and not env.has_gpu
    ok, why = spaces.training_allowed(env)
    assert ok and "cpu-smoke" in why
    assert spaces.default_backbone(env) == spaces.offline_backbone()
    assert spaces.banner_text(env).startswith("Hugging Face Space medart/cpu · CPU only · ⚠ no durable folder")


def test_gpu_names_come_from_nvidia_smi_without_cuda(monkeypatch):
    out = "NVIDIA H200, 143771\nNVIDIA A10G, 23028\n"
    gpus = spaces._parse_nvidia_smi(out)
    assert gpus == (spaces.GPUInfo("NVIDIA H200", 143771 * 2 ** 20), spaces.GPUInfo("NVIDIA A10G", 23028 * 2 ** 20))
    assert spaces._parse_nvidia_smi("Weird, GPU, [N/A]\n") == (spaces.GPUInfo("Weird, GPU, [N/A]"),)
    import torch

    # torch is asked for names only when this process has a CUDA context already
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert spaces._torch_gpus(torch) == ()


def test_environment_does_not_initialise_cuda(clean_env, tmp_path):
    import torch

    spaces.environment(tmp_path)
    assert not torch.cuda.is_initialized()


def test_network_filesystem_workspace_is_warned(clean_env, tmp_path):
    fake_cuda(clean_env, [])
    clean_env.setattr(spaces, "_fs_type", lambda p: "fuse.mountpoint-s3")
    env = spaces.environment(tmp_path)
    assert env.workspace_on_network_fs
    assert "network filesystem (fuse.mountpoint-s3)" in spaces.banner_text(env)
    clean_env.setattr(spaces, "_fs_type", lambda p: "ext4")
    assert not spaces.environment(tmp_path).workspace_on_network_fs
    assert spaces._fs_type(tmp_path)                       # this machine's /proc/mounts is readable
