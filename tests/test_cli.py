"""The dsreg command: through click's CliRunner, and a few runs of the installed entry point."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

from dsreg.cli.main import cli


@pytest.fixture
def run(tmp_path, engine):
    home = tmp_path / "home"

    def invoke(*args, ok=True):
        result = CliRunner().invoke(cli, ["--home", str(home), *engine.cli_args(), "-q", *map(str, args)], catch_exceptions=False)
        if ok:
            assert result.exit_code == 0, result.output
        return result

    invoke.home = home
    return invoke


def test_the_readme_session(run, models, tmp_path):
    out = run("base", "add", models.base, "--name", "sd15").stdout
    assert out.startswith("base sd15  58 tensors")
    out = run("push", models.ft).stdout
    assert out.startswith("subject-1 rev 1  base sd15  ") and "energy=0.5 fp16" in out and "->" in out
    out = run("push", models.ft, "--subject", "corgi", "--energy", "0.2").stdout
    assert out.startswith("corgi rev 1  base sd15") and "energy=0.2" in out
    listing = run("ls").stdout.splitlines()
    assert listing[0].split() == ["subject", "rev", "base", "original", "stored", "ratio", "created"]
    assert [line.split()[0] for line in listing[1:]] == ["corgi", "subject-1"]
    shown = run("show", "corgi").stdout
    assert "mid_attn" in shown and "conv_in" in shown and "max err" in shown
    out = run("checkout", "subject-1", "-o", tmp_path / "subject-1.safetensors").stdout
    assert out.startswith("subject-1@1 -> ") and "on cpu" in out
    assert set(load_file(tmp_path / "subject-1.safetensors")) == set(models.ft_sd)
    run("checkout", "corgi@1", "-o", tmp_path / "corgi.ckpt")
    assert set(torch.load(tmp_path / "corgi.ckpt", weights_only=True)) == set(models.ft_sd)


def test_json_output_and_stats(run, models):
    run("base", "add", models.base, "--name", "sd15")
    rev = json.loads(run("push", models.ft, "-s", "dog", "--json").stdout)
    assert rev["subject"] == "dog" and rev["number"] == 1 and rev["stored_bytes"] > 0
    subjects = json.loads(run("ls", "--json").stdout)
    assert [s["name"] for s in subjects] == ["dog"]
    stats = json.loads(run("stats", "--json").stdout)
    assert stats["n_subjects"] == 1 and stats["n_revisions"] == 1
    bases = json.loads(run("base", "ls", "--json").stdout)
    assert bases[0]["name"] == "sd15"
    assert "1 subjects" in run("stats").stdout


def test_tag_and_filtered_listing(run, models):
    run("base", "add", models.base, "--name", "sd15")
    run("push", models.ft, "-s", "dog")
    run("push", models.ft, "-s", "cat")
    assert run("tag", "dog@1", "prod").stdout.strip() == "dog@1 tagged prod"
    assert [line.split()[0] for line in run("ls", "--tag", "prod").stdout.splitlines()[1:]] == ["dog"]
    assert [line.split()[0] for line in run("ls", "--name", "ca").stdout.splitlines()[1:]] == ["cat"]
    assert len(run("ls", "--limit", "1").stdout.splitlines()) == 2


def test_ls_by_tag_shows_the_tagged_revision(run, models):
    run("base", "add", models.base, "--name", "sd15")
    run("push", models.ft, "-s", "dog")
    run("push", models.ft, "-s", "dog", "--energy", "0.2")
    run("tag", "dog@1", "prod")
    assert run("ls", "--tag", "prod").stdout.splitlines()[1].split()[:2] == ["dog", "1"]
    assert run("ls").stdout.splitlines()[1].split()[:2] == ["dog", "2"]
    (listed,) = json.loads(run("ls", "--tag", "prod", "--json").stdout)
    assert listed["tagged"]["number"] == 1 and listed["latest"]["number"] == 2


def test_a_tagged_revision_is_removed_only_with_force(run, models):
    run("base", "add", models.base, "--name", "sd15")
    run("push", models.ft, "-s", "dog")
    run("push", models.ft, "-s", "dog")
    run("tag", "dog@1", "prod")
    for ref in ("dog@1", "dog"):
        refused = run("rm", ref, ok=False)
        assert refused.exit_code == 6 and "dog@1 (prod) is tagged" in refused.stderr and "--force" in refused.stderr
    assert [r["number"] for r in json.loads(run("show", "dog", "--json").stdout)["revisions"]] == [1, 2]
    assert "removed dog@2" in run("rm", "dog@2").stdout
    assert "removed dog@1" in run("rm", "dog@1", "--force").stdout


def test_every_json_option_prints_json(run, models, tmp_path):
    run("base", "add", models.base, "--name", "sd15")
    run("push", models.ft, "-s", "dog", "--json")
    run("policy", "set", "keep", "--keep-last", "3")
    commands = [
        ("base", "ls"), ("push", models.ft, "-s", "cat"), ("ls",), ("show", "dog"), ("stats",), ("sweep", models.ft, "--energy", "0.5"),
        ("export-lora", "dog", "-o", tmp_path / "dog-lora.safetensors"), ("gc", "--dry-run"), ("verify",), ("policy", "ls"), ("log",),
    ]
    for args in commands:
        json.loads(run(*args, "--json").stdout)
    # and every command that takes --json is in that list
    from dsreg.cli.reference import commands as all_commands

    reference = (Path(__file__).resolve().parent.parent / "docs" / "cli-reference.md").read_text()
    with_json = [path for path in all_commands()[1:] if "--json" in reference.split(f"## dsreg {' '.join(path)}\n", 1)[1].split("## dsreg", 1)[0]]
    assert sorted(" ".join(p) for p in with_json) == sorted(" ".join(map(str, a[:2] if a[0] in ("base", "policy") else a[:1])) for a in commands)


def test_checkout_and_export_refuse_to_replace_a_file_without_force(run, models, tmp_path):
    run("base", "add", models.base, "--name", "sd15")
    run("push", models.ft, "-s", "dog")
    out = tmp_path / "dog.safetensors"
    out.write_text("mine")
    refused = run("checkout", "dog", "-o", out, ok=False)
    assert refused.exit_code == 6 and "--force" in refused.stderr and out.read_text() == "mine"
    run("checkout", "dog", "-o", out, "--force")
    assert set(load_file(out)) == set(models.ft_sd)
    lora = tmp_path / "dog-lora.safetensors"
    lora.write_text("mine")
    assert run("export-lora", "dog", "-o", lora, ok=False).exit_code == 6 and lora.read_text() == "mine"
    run("export-lora", "dog", "-o", lora, "-f")


def test_a_full_disk_is_one_line_naming_the_path_and_leaves_nothing(run, models, tmp_path):
    full = Path("/dev/full")
    if not full.exists():
        pytest.skip("no /dev/full on this system")
    run("base", "add", models.base, "--name", "sd15")
    run("push", models.ft, "-s", "dog")
    out = tmp_path / "small"
    out.mkdir()
    # A filesystem of 64 kB: the checkpoint does not fit.
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(out)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        failed = run("checkout", "dog", "-o", out / "dog.safetensors", ok=False)
        assert failed.exit_code == 9, failed.output
        (line,) = failed.stderr.strip().splitlines()
        assert str(out / "dog.safetensors") in line and "No space left on device" in line
        assert list(out.iterdir()) == []
    finally:
        subprocess.run(["umount", str(out)], capture_output=True)


def test_an_exact_push_prints_no_encoding(run, models):
    run("base", "add", models.base, "--name", "sd15")
    out = run("push", models.ft, "-s", "dog", "--exact").stdout
    assert out.rstrip().endswith("exact")


@pytest.mark.skipif(shutil.which("dsreg") is None, reason="dsreg is not installed on PATH")
def test_a_closed_pipe_ends_the_command_quietly(tmp_path):
    env = {**os.environ, "DSREG_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen(["dsreg", "--help"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # as `| head -0` would
    _, stderr = proc.communicate(timeout=60)
    assert stderr == b""


def test_listing_and_help_do_not_import_torch(tmp_path):
    """torch's import is most of a second: only commands that touch tensors pay for it."""
    from dsreg import Registry

    Registry.open(home=tmp_path).close()  # reads never create a registry
    script = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from dsreg.cli.main import cli\n"
        f"for args in (['--help'], ['--home', {str(tmp_path)!r}, 'ls'], ['--home', {str(tmp_path)!r}, 'stats'], ['--version']):\n"
        "    result = CliRunner().invoke(cli, args)\n"
        "    assert result.exit_code == 0, result.output\n"
        "print(sorted(m for m in ('torch', 'numpy', 'scipy') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_adding_a_base_twice_says_so(run, models):
    run("base", "add", models.base, "--name", "sd15")
    assert "already holds these weights" in run("base", "add", models.base, "--name", "sd15").stdout


def test_show_tensors(run, models):
    run("base", "add", models.base, "--name", "sd15")
    run("push", models.ft, "-s", "dog")
    out = run("show", "dog", "--tensors").stdout
    assert "conv_in.weight" in out and "lowrank" in out and "base" in out


def test_environment_points_at_catalog_and_store(tmp_path, models):
    env = {"DSREG_CATALOG_URL": f"sqlite:///{tmp_path / 'elsewhere.db'}", "DSREG_STORE_URL": str(tmp_path / "objects")}
    result = CliRunner().invoke(cli, ["-q", "base", "add", str(models.base), "--name", "b"], env=env)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "elsewhere.db").exists() and (tmp_path / "objects" / "sha256").is_dir()


@pytest.mark.slow
def test_demo_runs(tmp_path):
    result = CliRunner().invoke(cli, ["--home", str(tmp_path / "h"), "demo", "--workdir", str(tmp_path / "w")])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("tau"))
    rows = [line.split() for line in lines[header + 1 : header + 5]]
    assert [r[0] for r in rows] == ["0.2", "0.5", "0.8", "1"]
    output_errors = [float(r[-1]) for r in rows]
    assert output_errors == sorted(output_errors, reverse=True) and output_errors[-1] < 0.01


@pytest.mark.skipif(shutil.which("dsreg") is None, reason="dsreg is not installed on PATH")
@pytest.mark.slow
def test_installed_entry_point(tmp_path, models):
    env = {**os.environ, "DSREG_HOME": str(tmp_path / "home")}

    def dsreg(*args):
        return subprocess.run(["dsreg", "-q", *map(str, args)], env=env, capture_output=True, text=True, timeout=300)

    assert dsreg("--version").returncode == 0
    assert dsreg("base", "add", models.base, "--name", "sd15").returncode == 0
    pushed = dsreg("push", models.ft_ckpt, "--subject", "corgi")
    assert pushed.returncode == 0 and pushed.stdout.startswith("corgi rev 1"), pushed.stderr
    out = tmp_path / "corgi.safetensors"
    assert dsreg("checkout", "corgi", "-o", out).returncode == 0
    assert set(load_file(out)) == set(models.ft_sd)
    missing = dsreg("checkout", "nobody", "-o", tmp_path / "x.safetensors")
    assert missing.returncode == 3 and missing.stderr.startswith("error: no subject named 'nobody'")
    assert "Traceback" not in missing.stderr


def test_rank_rules_encodings_verify_sweep_and_report(run, models, tmp_path):
    run("base", "add", models.base, "--name", "sd15")
    out = run("push", models.ft, "-s", "b", "--budget", "60kB", "--encoding", "mixed").stdout
    assert "budget=60000 mixed" in out
    assert run("push", models.ft, "-s", "m", "--max-error", "0.1").stdout.count("max-error=0.1 fp16") == 1
    assert run("push", models.ft, "-s", "x", "--exact").stdout.rstrip().endswith("  exact")
    out = run("checkout", "x", "-o", tmp_path / "x.safetensors", "--verify").stdout
    assert "verified 58 tensors bit-identical to the push" in out
    out = run("checkout", "m", "-o", tmp_path / "m.safetensors", "--verify").stdout
    assert "stored lossy by design" in out
    # Two rules at once: a usage error, exit 2, one line.
    bad = run("push", models.ft, "--energy", "0.5", "--budget", "1MB", ok=False)
    assert bad.exit_code == 2 and "give only one" in bad.output and len(bad.output.strip().splitlines()) == 1
    out = run("sweep", models.ft, "--energy", "0.2,0.8", "--budget", "60kB", "--encoding", "fp16,mixed").stdout
    lines = out.strip().splitlines()
    assert lines[0].split()[:2] == ["rule", "encoding"] and len(lines) == 1 + 6 + 1
    assert any(line.startswith("budget=60000") and "mixed" in line for line in lines)
    rows = json.loads(run("sweep", models.ft, "--budget", "60kB", "--encoding", "int8", "--json").stdout)
    assert rows[0]["rule"] == "budget=60000" and rows[0]["stored_bytes"] <= 60000
    result = run("show", "b", "--report", tmp_path / "report")
    assert "wrote" in result.output and (tmp_path / "report" / "types.png").exists()
    assert "budget=60000" in run("show", "b").stdout


def test_export_lora(run, models, tmp_path):
    run("base", "add", models.base, "--name", "tiny")
    run("push", models.ft, "-s", "dog")
    # kohya by default: the norms and biases that the demo fine-tune changed too, as .w_norm/.b_norm/.diff_b.
    whole = run("export-lora", "dog", "-o", tmp_path / "whole.safetensors")
    assert "kohya LoRA" in whole.stdout and whole.stderr == ""
    assert "lora_unet_down_norm1.w_norm" in load_file(tmp_path / "whole.safetensors")
    result = run("export-lora", "dog", "-o", tmp_path / "dog.safetensors", "--factors-only")
    assert "kohya LoRA" in result.stdout and (tmp_path / "dog.safetensors").exists()
    # Left out: counted by kind on one line of stderr, named in the file.
    assert result.stderr.startswith("left out ") and len(result.stderr.strip().splitlines()) == 1
    assert " norm" in result.stderr and " bias" in result.stderr
    left_out = json.loads(safe_open(tmp_path / "dog.safetensors", "pt").metadata()["dsreg.left_out"])
    assert "down.norm1.weight" in left_out and f"left out {len(left_out)} " in result.stderr
    lora = load_file(tmp_path / "dog.safetensors")
    assert "lora_unet_down_conv1.lora_down.weight" in lora and "lora_unet_down_conv1.lora_up.weight" in lora
    info = json.loads(run("export-lora", "dog@1", "-o", tmp_path / "peft.safetensors", "--format", "peft", "--json").stdout)
    assert info["format"] == "peft" and info["n_modules"] > 0 and sorted(info["left_out"]) == sorted(left_out)
    # peft's one lora_bias switch: this model's attention projections have no bias, so no layer gets one.
    assert not any(k.endswith("lora_B.bias") for k in load_file(tmp_path / "peft.safetensors"))
    # Errors: one line, an exit code, and no file.
    run("push", models.ft, "-s", "exact", "--exact")
    assert run("export-lora", "exact", "-o", tmp_path / "exact.safetensors").exit_code == 0  # full-rank modules
    bad = run("export-lora", "exact", "-o", tmp_path / "x.safetensors", "--factors-only", ok=False)
    assert bad.exit_code == 2 and "no change that a LoRA can carry" in bad.output and not (tmp_path / "x.safetensors").exists()
    assert run("export-lora", "nobody", ok=False).exit_code == 3


_SLOW_PUSH = """
import sys, time
from dsreg import deltas

READY = sys.argv[1]

def slow(*args, **kwargs):  # as a long decomposition: a thread that cannot be interrupted
    open(READY, "w").write("compressing")
    time.sleep(60)

deltas.compress = slow
from dsreg.cli.main import main
sys.argv = ["dsreg", "-q", "push", sys.argv[2], "-s", "dog", "--base", "sd15"]
main()
"""


@pytest.mark.slow
def test_ctrl_c_stops_a_push_at_once_and_commits_nothing(tmp_path, models):
    env = {**os.environ, "DSREG_HOME": str(tmp_path / "home")}
    assert CliRunner().invoke(cli, ["--home", str(tmp_path / "home"), "-q", "base", "add", str(models.base), "--name", "sd15"]).exit_code == 0
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_PUSH, str(ready), str(models.ft)], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.05)
    interrupted = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    # Without the fix the process waits for the 60 s decomposition; a loaded machine still ends it in seconds.
    assert time.monotonic() - interrupted < 20
    assert proc.returncode == 130 and stderr.strip().startswith("interrupted"), stderr
    listing = CliRunner().invoke(cli, ["--home", str(tmp_path / "home"), "ls", "--json"])
    assert json.loads(listing.stdout) == []
