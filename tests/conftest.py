"""Shared fixtures: small real fine-tunes saved in every input format, and fresh registries."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dsreg import Registry
from dsreg.demo import finetune, make_base, state_dict

from dsreg.testing import (
    S3_BUCKET, Engine, EngineUnavailable, PostgresServer, create_database, drop_database, postgres_available, seaweedfs,
)

WIDTH = 32


@dataclass(frozen=True)
class Models:
    dir: Path
    base_sd: dict
    ft_sd: dict
    base: Path  # base.safetensors
    ft: Path  # ft.safetensors
    ft_ckpt: Path  # torch pickle with a "state_dict" wrapper
    ft_diffusers: Path  # diffusers folder with sharded weights
    ft_fp16: Path
    ft_bf16: Path
    base2: Path  # an unrelated base of the same architecture


@dataclass(frozen=True)
class Pipelines:
    base: Path
    ft: Path  # UNet and text encoder trained, matrices only (what a LoRA can carry)
    ft_unet: Path  # only the UNet trained, every parameter (a full DreamBooth fine-tune)


@pytest.fixture(scope="session")
def pipelines(tmp_path_factory) -> Pipelines:
    """A tiny diffusers pipeline and two real fine-tunes of it, saved with save_pretrained."""
    from dsreg import sd_tiny

    d = tmp_path_factory.mktemp("pipelines")
    # The same seed builds the same pipeline: the fine-tunes' configs and tokenizer files are the base's.
    sd_tiny.tiny_pipeline(d / "tok").save_pretrained(d / "base")
    ft = sd_tiny.tiny_pipeline(d / "tok")
    sd_tiny.train(ft, text_encoder=True, matrices_only=True)
    ft.save_pretrained(d / "ft")
    ft_unet = sd_tiny.tiny_pipeline(d / "tok")
    sd_tiny.train(ft_unet)
    ft_unet.save_pretrained(d / "ft-unet")
    return Pipelines(d / "base", d / "ft", d / "ft-unet")


def _save_diffusers(sd: dict, folder: Path) -> None:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "TinyUNet", "width": WIDTH}))
    keys = list(sd)
    half = len(keys) // 2
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[:half], "diffusion_pytorch_model-00002-of-00002.safetensors": keys[half:]}
    weight_map = {}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, folder / name)
        weight_map.update({k: name for k in ks})
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> Models:
    d = tmp_path_factory.mktemp("models")
    base = make_base(WIDTH, steps=40)
    ft = finetune(base, subject=1, steps=30)
    base_sd, ft_sd = state_dict(base), state_dict(ft)
    save_file(base_sd, d / "base.safetensors")
    save_file(ft_sd, d / "ft.safetensors", metadata={"trained_by": "tests"})
    torch.save({"state_dict": ft_sd, "global_step": 30}, d / "ft.ckpt")
    _save_diffusers(ft_sd, d / "ft-diffusers")
    save_file({k: v.half() for k, v in ft_sd.items()}, d / "ft-fp16.safetensors")
    save_file({k: v.bfloat16() for k, v in ft_sd.items()}, d / "ft-bf16.safetensors")
    save_file(state_dict(make_base(WIDTH, steps=10, seed=7)), d / "base2.safetensors")
    return Models(
        d, base_sd, ft_sd, d / "base.safetensors", d / "ft.safetensors", d / "ft.ckpt", d / "ft-diffusers",
        d / "ft-fp16.safetensors", d / "ft-bf16.safetensors", d / "base2.safetensors",
    )


def pytest_configure(config):
    # pytest-xdist's workers share the cores, so each gets its share of torch's threads, and so do
    # the processes the tests start (the CLI, crash workers, pools) through OMP_NUM_THREADS. With a
    # thread per core in every worker, torch's thread teams wait on one another's descheduled
    # threads: `dsreg demo` took 56 s beside one busy process with two threads, 30 s with one.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, len(os.sched_getaffinity(0)) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def pytest_collection_modifyitems(items):
    # The long end-to-end tests first: the workers share them out from the start, instead of one
    # worker running the last of them alone while the other has finished.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_terminal_summary(terminalreporter):
    # What tests record with ``report_line``, at the end of the log: under pytest-xdist a worker's
    # own output does not reach it.
    lines = [value for report in terminalreporter.stats.get("passed", []) for name, value in report.user_properties if name == "report line"]
    if lines:
        terminalreporter.section("what the fault tests saw")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture
def report_line(record_property):
    """Records a line for the end of the test log (crash tallies, how an engine failure ended)."""
    return lambda line: record_property("report line", line)


def _unavailable(exc: EngineUnavailable):
    if os.environ.get("CI") == "true":
        pytest.fail(f"{exc} (CI=true: a missing engine is a failure)", pytrace=False)
    pytest.skip(str(exc))


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One SeaweedFS for the session; the AWS variables point every client (and subprocess) at it."""
    try:
        with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
            yield server
    except EngineUnavailable as exc:
        _unavailable(exc)


@pytest.fixture(scope="session")
def postgres():
    try:
        postgres_available()
    except EngineUnavailable as exc:
        _unavailable(exc)


@pytest.fixture
def own_postgres():
    """A PostgreSQL server of this test's own, for a test that restarts it."""
    server = PostgresServer()
    try:
        try:
            server.start()
        except EngineUnavailable as exc:
            _unavailable(exc)
        yield server
    finally:
        server.stop()  # also after a failed start: its folder is removed


@pytest.fixture
def remote_engine(request) -> Engine:
    """Postgres (a fresh database) + SeaweedFS S3 (a fresh prefix)."""
    request.getfixturevalue("postgres")
    request.getfixturevalue("s3_server")
    url = create_database()
    yield Engine("postgres+s3", url, f"s3://{S3_BUCKET}/{uuid.uuid4().hex[:12]}")
    drop_database(url)


@pytest.fixture(params=["local", "postgres+s3"])
def engine(request, tmp_path) -> Engine:
    """Every registry test runs on both engine pairs: (SQLite, local folder) and (Postgres, S3)."""
    if request.param == "local":
        return Engine("local", f"sqlite:///{tmp_path / 'registry' / 'catalog.db'}", str(tmp_path / "registry" / "blobs"))
    return request.getfixturevalue("remote_engine")


@pytest.fixture
def open_registry(engine, tmp_path):
    """Opens a registry on this test's engine; ``home`` holds the local cache."""

    def opener(**kwargs) -> Registry:
        return Registry.open(engine.catalog_url, engine.store_url, home=tmp_path / "registry", **kwargs)

    return opener


@pytest.fixture
def reg(open_registry) -> Registry:
    with open_registry() as r:
        yield r


@pytest.fixture
def reg_base(reg: Registry, models: Models) -> Registry:
    reg.add_base(models.base, "tiny")
    return reg


def snapshot(registry: Registry) -> dict:
    """Every catalog row and every stored object: two equal snapshots mean nothing was written."""
    import sqlalchemy as sa

    from dsreg.tables import Model

    rows = {}
    with registry.catalog.engine.connect() as conn:
        for table in Model.metadata.sorted_tables:
            rows[table.name] = sorted(tuple(map(str, r)) for r in conn.execute(sa.select(table)))
    objects = sorted(b.digest for b in registry.store.list())
    return {"rows": rows, "objects": objects}


def worker_pool(processes: int):
    """A pool of separate processes for the many-writer tests, each forked from a server that
    imported torch and the registry once, where a spawned worker would spend seconds of CPU
    importing them again (the server runs no torch op, so no thread pool is forked). The workers
    take this process's environment as it is now: the server keeps the one it started with, from
    before a fixture pointed the AWS variables at this session's S3."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "dsreg", "dsreg.demo"])
    return ctx.Pool(processes, initializer=_adopt_environment, initargs=(dict(os.environ),))


def _adopt_environment(env: dict) -> None:
    os.environ.clear()
    os.environ.update(env)


@dataclass(frozen=True)
class AdapterFiles:
    peft: Path  # diffusers' save_lora_weights of a peft LoRA trained on the UNet and text encoder
    peft_outputs: tuple  # sd_tiny.outputs of the trained model, adapters active
    locon: Path  # lycoris-lora's extract_diff of pipelines.ft_unet (LoCon, Tucker convs, alphas)
    locon_outputs: tuple  # sd_tiny.outputs of the base with the LoCon merged by lycoris itself
    svdiff: Path  # a folder with spectral_shifts.safetensors and spectral_shifts_te.safetensors
    svdiff_outputs: tuple  # sd_tiny.outputs of the SVDiff-trained model


@pytest.fixture(scope="session")
def adapter_files(pipelines, tmp_path_factory) -> AdapterFiles:
    """Adapter files written by the real tools, and what those tools make of them."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from lycoris.utils import extract_diff, merge
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    from dsreg import sd_tiny

    d = tmp_path_factory.mktemp("adapters")
    load = lambda p: StableDiffusionPipeline.from_pretrained(p, safety_checker=None, requires_safety_checker=False)  # noqa: E731

    # DreamBooth-LoRA as diffusers' training script does it: peft adapters on the UNet (attention,
    # proj_in and the resnets' convs) and the text encoder, Adam steps, save_lora_weights.
    pipe = load(pipelines.base)
    torch.manual_seed(0)  # peft's gaussian init of lora_A
    unet_config = LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0", "proj_in", "conv1", "conv2"])
    text_config = LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
    pipe.unet.add_adapter(unet_config)
    inject_adapter_in_model(text_config, pipe.text_encoder)  # transformers' add_adapter wants a newer peft
    sd_tiny.train(pipe, steps=6, text_encoder=True, only="lora_", lr=1e-2)
    StableDiffusionPipeline.save_lora_weights(
        d / "peft",
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.text_encoder)),
        unet_lora_adapter_metadata=unet_config.to_dict(), text_encoder_lora_adapter_metadata=text_config.to_dict(),
    )
    peft_outputs = sd_tiny.outputs(pipe)

    base, ft = load(pipelines.base), load(pipelines.ft_unet)
    locon = extract_diff([base.text_encoder], [ft.text_encoder], base.unet, ft.unet, mode="fixed", linear_mode_param=4, conv_mode_param=4)
    save_file(locon, d / "locon.safetensors")
    merge([base.text_encoder], base.unet, dict(locon))

    svdiff, svdiff_outputs = _svdiff(load(pipelines.base), d / "svdiff")
    return AdapterFiles(
        d / "peft" / "pytorch_lora_weights.safetensors", peft_outputs, d / "locon.safetensors", sd_tiny.outputs(base), svdiff, svdiff_outputs,
    )


class SpectralShift(torch.nn.Module):
    """SVDiff's parametrization of a weight: W = U·diag(ReLU(σ + δ))·Vᵀ from the pretrained weight's
    SVD (conv kernels as out x in·kh·kw, a norm's weight as 1 x n), with only δ trained."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.shape = weight.shape
        matrix = weight.detach().reshape(weight.shape[0], -1) if weight.dim() > 1 else weight.detach().reshape(1, -1)
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        self.register_buffer("u", u)
        self.register_buffer("s", s)
        self.register_buffer("vh", vh)
        self.shift = torch.nn.Parameter(torch.zeros_like(s))

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        return ((self.u * torch.relu(self.s + self.shift)) @ self.vh).reshape(self.shape)


def _svdiff(pipe, folder: Path):
    """Train SVDiff's shifts of every conv, linear and norm weight of the UNet and text encoder, and
    save them as svdiff-pytorch does: <module>.delta, one file per model."""
    from torch.nn.utils import parametrize

    from dsreg import sd_tiny

    for model in (pipe.unet, pipe.text_encoder):
        for name, module in list(model.named_modules()):
            weight = getattr(module, "weight", None)
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm)) and weight is not None:
                parametrize.register_parametrization(module, "weight", SpectralShift(weight))
    sd_tiny.train(pipe, steps=6, text_encoder=True, only=".shift", lr=5e-3)
    folder.mkdir()
    for model, file in ((pipe.unet, "spectral_shifts.safetensors"), (pipe.text_encoder, "spectral_shifts_te.safetensors")):
        shifts = {n.split(".parametrizations.")[0] + ".delta": p.detach().clone() for n, p in model.named_parameters() if n.endswith(".shift")}
        save_file(shifts, folder / file)
    return folder, sd_tiny.outputs(pipe)
