"""``dsreg``: store fine-tuned diffusion checkpoints as compressed deltas against a base."""

from __future__ import annotations

import logging
import os
import sys
from collections import Counter
import time
from datetime import datetime, timezone
from pathlib import Path

import click

from dsreg import Conflict, DsregError, IntegrityError, Registry
from dsreg.config import BUDGET_ENCODING, DEFAULT_ENCODING, DEFAULT_ENERGY, ENCODINGS, parse_duration, redact

from .output import Bars, echo_json, force_option, json_option, ratio, size, table, when


class Context:
    def __init__(self, catalog, store, home, store_options, quiet, debug):
        self.catalog, self.store, self.home, self.quiet, self.debug = catalog, store, home, quiet, debug
        self.store_options = store_options
        self._registry = None

    def registry(self, write: bool = False) -> Registry:
        """The registry; only a command that writes (``write``) creates one that does not exist."""
        if self._registry is None:
            self._registry = Registry.open(self.catalog, self.store, home=self.home, storage_options=self.store_options, create=write)
        return self._registry

    def bars(self) -> Bars:
        return Bars(enabled=not self.quiet)

    def close(self) -> None:
        if self._registry is not None:
            self._registry.close()


class DsregGroup(click.Group):
    """Maps dsreg's errors to one line on stderr and their exit code; tracebacks only with --debug."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except DsregError as exc:
            if ctx.obj is not None and ctx.obj.debug:
                raise
            click.echo(f"error: {redact(str(exc))}", err=True)
            sys.exit(exc.exit_code)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except BrokenPipeError:  # `dsreg ls | head`: click exits quietly, as Unix tools do
            raise
        except KeyboardInterrupt:
            click.echo("interrupted; nothing was committed or written", err=True)
            sys.stdout.flush()
            sys.stderr.flush()
            # Threads still inside a decomposition (a LAPACK call cannot be stopped) would hold the
            # interpreter's exit for seconds: end the process now. What a push uploaded is an orphan
            # whose lease gc ends at once, as the writer's pid is gone.
            os._exit(130)
        except Exception as exc:
            if ctx.obj is not None and ctx.obj.debug:
                raise
            message = str(exc).strip().splitlines()
            click.echo(f"error: {type(exc).__name__}: {redact(message[0] if message else '')} (rerun with --debug for details)", err=True)
            sys.exit(1)
        finally:
            if ctx.obj is not None:
                ctx.obj.close()


@click.group(cls=DsregGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--catalog", envvar="DSREG_CATALOG_URL", metavar="URL", help="SQLAlchemy URL of the catalog [env DSREG_CATALOG_URL].")
@click.option("--store", envvar="DSREG_STORE_URL", metavar="URL", help="fsspec URL of the object store [env DSREG_STORE_URL].")
@click.option("--home", envvar="DSREG_HOME", metavar="DIR", help="Registry folder for the defaults [env DSREG_HOME, default ~/.dsreg].")
@click.option("--store-option", "store_options", multiple=True, metavar="KEY=VALUE", help="fsspec option for the store, e.g. endpoint_url=http://minio:9000 (repeatable).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.version_option(package_name="dsreg")
@click.pass_context
def cli(ctx, catalog, store, home, store_options, quiet, debug):
    """Store fine-tuned diffusion checkpoints as Delta-SVD deltas against a shared base."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    options = {}
    for item in store_options:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--store-option")
        options[key] = value
    ctx.obj = Context(catalog, store, home, options, quiet, debug)


# ---------------------------------------------------------------- bases


@cli.group()
def base():
    """Register and list base models."""


@base.command("add")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--name", required=True, help="Name to refer to this base by.")
@click.pass_obj
def base_add(obj: Context, path, name):
    """Store a base model (safetensors, torch pickle or diffusers folder)."""
    with obj.bars() as bars:
        info, new = obj.registry(write=True).add_base(path, name, progress=bars)
    if new:
        click.echo(f"base {info.name}  {info.n_tensors} tensors  {info.n_params / 1e6:.2f}M params  {size(info.nbytes)}  {info.digest[:12]}")
    else:
        click.echo(f"base {info.name} already holds these weights ({info.digest[:12]}); nothing stored")


@base.command("ls")
@json_option
@click.pass_obj
def base_ls(obj: Context, as_json):
    """List registered bases."""
    bases = obj.registry().bases()
    if as_json:
        return echo_json(bases)
    rows = [[b.name, str(b.n_tensors), f"{b.n_params / 1e6:.2f}M", size(b.nbytes), b.digest[:12], when(b.created_at)] for b in bases]
    click.echo(table(["base", "tensors", "params", "size", "digest", "created"], rows, right={1, 2, 3}))


@base.command("rm")
@click.argument("name")
@click.pass_obj
def base_rm(obj: Context, name):
    """Remove a base that no revision uses (gc frees its bytes)."""
    info = obj.registry(write=True).remove_base(name)
    click.echo(f"removed base {info.name}; run `dsreg gc` to free its {size(info.nbytes)}")


# ---------------------------------------------------------------- push / checkout


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--subject", "-s", help="Subject name (default: the next free subject-N).")
@click.option("--base", "-b", "base_name", help="Base to diff against (default: detected among registered bases).")
@click.option("--energy", "-e", type=float, help=f"Paper's rule: smallest rank whose singular-value share >= TAU, in (0, 1] [default {DEFAULT_ENERGY}].")
@click.option("--max-error", type=float, metavar="EPS", help="Per tensor, the smallest rank whose relative Frobenius error of the delta is <= EPS.")
@click.option("--budget", metavar="SIZE", help="Bytes for the whole revision (e.g. 20MB): ranks shared across layers to keep the most.")
@click.option("--exact", is_flag=True, help="Lossless: checkout gives back the pushed tensors bit for bit.")
@click.option("--encoding", type=click.Choice(ENCODINGS), default=None, help=f"How factors are stored.  [default: {DEFAULT_ENCODING}; {BUDGET_ENCODING} with --budget]")
@click.option("--method", type=click.Choice(["gram", "svd"]), default="gram", show_default=True, help="gram: fast exact spectrum; svd: plain full SVD.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--no-ema", is_flag=True, help="Leave out an LDM checkpoint's EMA copy (model_ema.*); by default it is stored against the weights it mirrors.")
@click.option("--only", multiple=True, type=click.Choice(["unet", "transformer", "text_encoder", "text_encoder_2"]),
              help="Adapters: store only this model's modules (repeatable), e.g. a LoRA with text-encoder modules against a UNet-only base.")
@json_option
@click.pass_obj
def push(obj: Context, path, subject, base_name, energy, max_error, budget, exact, encoding, method, device, no_ema, only, as_json):
    """Compress a fine-tuned checkpoint and store it as a new revision.

    PATH is a checkpoint (a .safetensors/.ckpt file or a diffusers folder) or an adapter: a LoRA,
    LoCon or LyCORIS file in kohya's, diffusers/peft's or XLabs' names, the folder that diffusers'
    save_lora_weights writes, or an SVDiff output folder. An adapter is stored as its base with the
    adapter merged, at its own rank unless a rule is given (docs/adapters.md).
    """
    with obj.bars() as bars:
        rev = obj.registry(write=True).push(
            path, subject, base=base_name, energy=energy, max_error=max_error, budget=budget, exact=exact,
            encoding=encoding, method=method, device=device, ema=not no_ema, only=only or None, progress=bars,
        )
    if as_json:
        return echo_json(rev)
    click.echo(
        f"{rev.subject} rev {rev.number}  base {rev.base}  {size(rev.original_bytes)} -> {size(rev.stored_bytes)} "
        f"({ratio(rev.ratio)})  {_stored_as(rev)}"
    )


def _stored_as(rev) -> str:
    """The rule and encoding a revision was stored under, as a user would read them: SVDiff's
    shifts have neither (they are kept whole, in fp32)."""
    if rev.adapter == "svdiff":
        return "svdiff shifts, kept whole (fp32)"
    return rev.rank_rule + ("" if rev.rank_rule == "exact" else f" {rev.encoding}")


@cli.command()
@click.argument("ref")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Output file or folder (default: SUBJECT-REV with the pushed format's suffix).")
@click.option("--format", "fmt", type=click.Choice(["safetensors", "ckpt", "diffusers"]), help="Output format (default: from -o's suffix, else as pushed).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True, help="Where W + A·B is computed.")
@click.option("--layout", type=click.Choice(["original", "diffusers"]),
              help="Tensor names and cuts: the model family's original release (fused q/k/v) or diffusers' (default: as pushed).")
@click.option("--verify", is_flag=True, help="Check every losslessly stored tensor against the digest recorded at push.")
@force_option
@click.pass_obj
def checkout(obj: Context, ref, output, fmt, layout, device, verify, force):
    """Rebuild the full checkpoint of SUBJECT[@REV]."""
    with obj.bars() as bars:
        result = obj.registry().checkout(ref, output, format=fmt, layout=layout, device=device, verify=verify, overwrite=force, progress=bars)
    click.echo(f"{result.ref} -> {result.path}  {result.format}  {result.n_tensors} tensors  {size(result.nbytes)}  on {result.device}")
    if verify:
        lossy = f"; {result.lossy} stored lossy by design (not bit-identical)" if result.lossy else ""
        click.echo(f"verified {result.verified} tensors bit-identical to the push{lossy}")


@cli.command("export-lora")
@click.argument("ref")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="LoRA file to write (default: SUBJECT-REV-lora.safetensors).")
@click.option("--format", "fmt", type=click.Choice(["kohya", "peft"]),
              help="kohya: lora_unet_* keys in the original release's module names (Flux's fused qkv), with .diff/.diff_b/.w_norm/.b_norm "
                   "for what no LoRA carries (ComfyUI, A1111, LyCORIS); peft: diffusers' unet.* or transformer.* lora_A/B keys "
                   "(diffusers). Default: an adapter subject's own kind, else kohya.")
@click.option("--factors-only", is_flag=True, help="Only the low-rank factors: leave out full-rank modules and the .diff parts "
              "(a kohya file diffusers' SD loaders accept).")
@click.option("--dtype", type=click.Choice(["fp16", "bf16", "fp32"]), default="fp16", show_default=True)
@force_option
@json_option
@click.pass_obj
def export_lora(obj: Context, ref, output, fmt, factors_only, dtype, force, as_json):
    """Write SUBJECT[@REV]'s stored factors as a LoRA file, without rebuilding the checkpoint."""
    with obj.bars() as bars:
        result = obj.registry().export_lora(ref, output, format=fmt, factors_only=factors_only, dtype=dtype, overwrite=force, progress=bars)
    if as_json:
        echo_json(result)
    else:
        click.echo(
            f"{result.ref} -> {result.path}  {result.format} LoRA  {result.n_modules} modules  rank <= {result.max_rank}  "
            f"{result.n_params / 1e6:.3g}M params  {size(result.nbytes)}"
        )
    if result.left_out:
        from dsreg.lora import left_out_kind

        kinds = Counter(left_out_kind(key) for key in result.left_out)
        click.echo(
            f"left out {len(result.left_out)} changed tensors that a LoRA cannot carry: "
            f"{', '.join(f'{n} {kind}' for kind, n in kinds.most_common())} (e.g. {result.left_out[0]!r}); "
            "every name is in the file's dsreg.left_out metadata and in --json",
            err=True,
        )


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--base", "-b", "base_name", help="Base to diff against (default: detected).")
@click.option("--energy", "energies", default="", help="Comma-separated tau values [default 0.06,0.2,0.5,0.8 when no rule is given].")
@click.option("--max-error", "max_errors", default="", help="Comma-separated error bounds.")
@click.option("--budget", "budgets", default="", help="Comma-separated sizes, e.g. 5MB,20MB.")
@click.option("--encoding", "encoding_list", default="fp16,int8", show_default=True, help="Comma-separated encodings.")
@json_option
@click.pass_obj
def sweep(obj: Context, path, base_name, energies, max_errors, budgets, encoding_list, as_json):
    """Estimate stored bytes and error of PATH under several settings, storing nothing."""
    rules = [f"energy={v}" for v in _items(energies)] + [f"max-error={v}" for v in _items(max_errors)] + [f"budget={v}" for v in _items(budgets)]
    if not rules:
        rules = [f"energy={v}" for v in (0.06, 0.2, 0.5, 0.8)]
    with obj.bars() as bars:
        rows = obj.registry().sweep(path, rules, _items(encoding_list), base=base_name, progress=bars)
    if as_json:
        return echo_json(rows)
    body = [
        [r.rule, r.encoding, f"{r.kept_params / 1e6:.3g}M", size(r.stored_bytes), ratio(r.ratio), f"{r.rel_error:.3f}", f"{r.max_error:.3f}"]
        for r in rows
    ]
    click.echo(table(["rule", "encoding", "kept params", "stored", "ratio", "delta err", "max tensor err"], body, right={2, 3, 4, 5, 6}))
    click.echo("stored: at most this under an energy or max-error rule, as planned within a budget; delta err: relative Frobenius error of all changed matrices together: truncation from the spectra, plus the encoding's expected rounding noise")


def _items(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


# ---------------------------------------------------------------- catalog queries


@cli.command("ls")
@click.option("--base", "base_name", help="Only subjects whose latest revision uses this base.")
@click.option("--name", "name_like", help="Name prefix, or a pattern with *.")
@click.option("--tag", help="Only subjects with this tag.")
@click.option("--since", type=click.DateTime(), help="Only subjects pushed to since this date.")
@click.option("--limit", type=click.IntRange(min=1), default=None)
@click.option("--offset", type=click.IntRange(min=0), default=0)
@click.option("--after", metavar="NAME", help="Start after this subject name (fast paging: pass the last name shown).")
@json_option
@click.pass_obj
def ls(obj: Context, base_name, name_like, tag, since, limit, offset, after, as_json):
    """List subjects with their latest revision (with --tag, the tagged one)."""
    if since is not None and since.tzinfo is None:
        since = since.astimezone(timezone.utc)
    subjects = obj.registry().subjects(base=base_name, name_like=name_like, tag=tag, since=since, limit=limit, offset=offset, after=after)
    if as_json:
        return echo_json(subjects)
    rows = [
        [s.name, str(s.shown.number), s.shown.base, size(s.shown.original_bytes), size(s.shown.stored_bytes), ratio(s.shown.ratio), when(s.shown.created_at)]
        for s in subjects
    ]
    click.echo(table(["subject", "rev", "base", "original", "stored", "ratio", "created"], rows, right={1, 3, 4, 5}))


@cli.command()
@click.argument("ref")
@click.option("--tensors", is_flag=True, help="One row per tensor instead of per layer group.")
@click.option("--report", "report_dir", type=click.Path(path_type=Path), help="Also write a report (tables and PNG plots) into this folder.")
@json_option
@click.pass_obj
def show(obj: Context, ref, tensors, report_dir, as_json):
    """Revisions of a subject, and per-layer-group ranks and errors of one revision."""
    reg = obj.registry()
    detail = reg.show(ref)
    if report_dir is not None:
        from dsreg.report import write_report

        for written in write_report(detail, report_dir):
            click.echo(f"wrote {written}", err=True)
    revisions = reg.revisions(detail.revision.subject)
    if as_json:
        return echo_json({"revisions": revisions, "detail": detail})
    rev_rows = [
        [str(r.number), r.base, r.rank_rule, r.encoding, size(r.original_bytes), size(r.stored_bytes), ratio(r.ratio), ",".join(r.tags), when(r.created_at)]
        for r in revisions
    ]
    click.echo(table(["rev", "base", "ranks", "encoding", "original", "stored", "ratio", "tags", "created"], rev_rows, right={4, 5, 6}))
    r = detail.revision
    click.echo(f"\n{r.ref}: {r.n_changed}/{r.n_tensors} tensors changed, {r.kept_params / 1e6:.3g}M params kept, source {r.source_format} {r.source_digest[:12]}")
    if tensors:
        rows = [
            [t.key, t.kind, t.encoding or "-", "x".join(map(str, t.shape)), f"{t.rank}/{t.full_rank}" if t.kind == "lowrank" else "-", size(t.stored_bytes), f"{t.rel_error:.2e}"]
            for t in detail.tensors
        ]
        click.echo(table(["tensor", "kind", "encoding", "shape", "rank", "stored", "error"], rows, right={5, 6}))
        return
    rows = [
        [g.group, f"{g.n_changed}/{g.n_tensors}", f"{g.rank}/{g.full_rank}", f"{g.kept_params / 1e6:.3g}M", size(g.stored_bytes), f"{g.mean_error:.2e}", f"{g.max_error:.2e}"]
        for g in detail.groups
    ]
    click.echo(table(["group", "changed", "rank", "kept", "stored", "mean err", "max err"], rows, right={1, 2, 3, 4, 5, 6}))


@cli.command()
@click.argument("ref")
@click.argument("name")
@click.pass_obj
def tag(obj: Context, ref, name):
    """Give SUBJECT@REV a tag NAME (moving the tag if the subject had it elsewhere)."""
    rev = obj.registry(write=True).tag(ref, name)
    click.echo(f"{rev.ref} tagged {name}")


@cli.command()
@click.argument("subject")
@click.argument("name")
@click.pass_obj
def untag(obj: Context, subject, name):
    """Remove the tag NAME from SUBJECT."""
    rev = obj.registry(write=True).untag(subject, name)
    click.echo(f"{rev.ref} untagged {name}")


@cli.command("log")
@click.argument("subject", required=False)
@click.option("--since", type=click.DateTime(), help="Only changes at or after this time.")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--action", help="Only this action (push, rm, tag, untag, expire, base.add, base.rm, policy.set, policy.rm, gc, repair, ...).")
@click.option("--base", "base_name", help="Only changes to this base.")
@json_option
@click.pass_obj
def log_command(obj: Context, subject, since, limit, action, base_name, as_json):
    """The audit log, newest first: who changed what, and when (of SUBJECT only, if given)."""
    if since is not None and since.tzinfo is None:
        since = since.astimezone(timezone.utc)
    events = obj.registry().events(subject, since=since, limit=limit, action=action, base=base_name)
    if as_json:
        return echo_json(events)
    rows = [
        [e.at.astimezone().strftime("%Y-%m-%d %H:%M:%S"), e.actor, e.action, e.ref or e.base or "-",
         " ".join(f"{k}={v}" for k, v in e.details.items() if v not in (None, [], ""))]
        for e in events
    ]
    click.echo(table(["time", "actor", "action", "what", "details"], rows))


@cli.command()
@json_option
@click.pass_obj
def stats(obj: Context, as_json):
    """Totals: subjects, revisions, original and stored bytes."""
    s = obj.registry().stats()
    if as_json:
        return echo_json(s)
    click.echo(
        f"{s.n_bases} bases ({size(s.base_bytes)})  {s.n_subjects} subjects  {s.n_revisions} revisions  "
        f"{size(s.original_bytes)} -> {size(s.stored_bytes)} ({ratio(s.ratio)})"
    )


@cli.command()
@click.option("--workdir", type=click.Path(path_type=Path), help="Where the demo's checkpoints go (default: a temporary folder).")
@click.pass_obj
def demo(obj: Context, workdir):
    """Make a small base and a real fine-tune of it, push at several tau, check out and measure."""
    from dsreg.demo import run_demo

    reg = obj.registry(write=True)
    click.echo(f"registry: catalog {redact(reg.settings.catalog_url)}, store {redact(reg.settings.store_url)}")
    click.echo("training a small UNet-shaped base, then fine-tuning it on one subject (real Adam steps)...")
    rows = run_demo(reg, workdir)
    body = [
        [f"{r.energy:g}", r.ref, size(r.original_bytes), size(r.stored_bytes), ratio(r.original_bytes / r.stored_bytes), f"{r.kept_params / 1e3:.1f}k", f"{r.max_tensor_error:.3f}", f"{r.functional_error:.4f}"]
        for r in rows
    ]
    click.echo(table(["tau", "revision", "original", "stored", "ratio", "kept params", "max tensor err", "output err"], body, right={2, 3, 4, 5, 6, 7}))
    click.echo("output err: |f_rebuilt - f_finetuned| / |f_base - f_finetuned| on fixed inputs (0 = the fine-tune exactly)")


# ---------------------------------------------------------------- removal, retention, gc, verify


@cli.command()
@click.argument("ref")
@click.option("--force", "-f", is_flag=True, help="Remove tagged revisions too.")
@click.pass_obj
def rm(obj: Context, ref, force):
    """Remove SUBJECT@REV, or every revision of SUBJECT, from the catalog (gc frees the bytes)."""
    reg = obj.registry(write=True)
    removed = reg.rm(ref, force=force)
    click.echo(f"removed {', '.join(r.ref for r in removed)}; run `dsreg gc` to free the space")
    subject = removed[0].subject
    if not reg.revisions(subject):
        click.echo(f"{subject} has no revisions now; its numbers are never given out again (a push continues after them)")


@cli.group()
def policy():
    """Retention policies that gc applies."""


@policy.command("set")
@click.argument("name")
@click.option("--subjects", "pattern", default="*", show_default=True, help="Subjects it applies to: a name, or a pattern with *.")
@click.option("--keep-last", type=int, help="Keep the newest N revisions of each subject.")
@click.option("--max-age", help="Expire revisions older than this (e.g. 30d, 12h).")
@click.pass_obj
def policy_set(obj: Context, name, pattern, keep_last, max_age):
    """Create or replace a retention policy. Tagged revisions are never expired."""
    p = obj.registry(write=True).set_policy(name, pattern, keep_last, parse_duration(max_age) if max_age else None)
    click.echo(f"policy {p.name}: subjects {p.pattern}" + (f", keep last {p.keep_last}" if p.keep_last else "") + (f", max age {max_age}" if max_age else ""))


@policy.command("ls")
@json_option
@click.pass_obj
def policy_ls(obj: Context, as_json):
    """List retention policies."""
    policies = obj.registry().policies()
    if as_json:
        return echo_json(policies)
    rows = [[p.name, p.pattern, str(p.keep_last or "-"), f"{p.max_age_seconds}s" if p.max_age_seconds is not None else "-"] for p in policies]
    click.echo(table(["policy", "subjects", "keep last", "max age"], rows))


@policy.command("rm")
@click.argument("name")
@click.pass_obj
def policy_rm(obj: Context, name):
    """Remove a retention policy."""
    obj.registry(write=True).remove_policy(name)
    click.echo(f"removed policy {name}")


@cli.command("gc")
@click.option("--dry-run", is_flag=True, help="Report what would be removed; remove nothing.")
@click.option("--grace", default="1h", show_default=True, help="Never delete objects younger than this (e.g. 0, 30m, 1h).")
@click.option("--every", metavar="DURATION", help="Run in the foreground, once per DURATION (e.g. 6h), until stopped.")
@json_option
@click.pass_obj
def gc_command(obj: Context, dry_run, grace, every, as_json):
    """Apply retention policies and delete unreferenced objects; safe while pushes run."""
    grace_s = parse_duration(grace)
    interval = parse_duration(every) if every else None
    if interval is not None and interval <= 0:
        raise click.BadParameter("must be positive", param_hint="--every")
    rounds = 0
    while True:
        try:
            report = obj.registry(write=True).gc(grace_s, dry_run)
        except Conflict as exc:
            if interval is None:
                raise
            click.echo(f"{datetime.now().isoformat(timespec='seconds')} skipped: {exc}")
        except KeyboardInterrupt:
            # Each of gc's batches commits on its own: say what stands rather than "nothing".
            click.echo(
                f"interrupted during a gc round; {rounds} earlier rounds and the batches of this one that finished are "
                "committed (`dsreg log --action gc`), the rest is left for the next round",
                err=True,
            )
            sys.exit(130)
        else:
            rounds += 1
            if as_json:
                echo_json(report)
            else:
                verb = "would remove" if report.dry_run else "removed"
                stamp = f"{datetime.now().isoformat(timespec='seconds')} " if interval else ""
                click.echo(
                    f"{stamp}{verb} {report.removed_objects} objects ({size(report.removed_bytes)}); "
                    f"{len(report.expired)} revisions expired by policy; kept {report.leased_objects} claimed by writes in progress "
                    f"and {report.young_objects} younger than {grace}"
                )
                for ref in report.expired:
                    click.echo(f"  expired {ref}")
                for path in report.removed_temporaries:
                    click.echo(f"  removed {path}, left by a killed checkout")
        if interval is None:
            return
        try:
            time.sleep(interval)
        except KeyboardInterrupt:
            click.echo(f"stopped between rounds; the {rounds} rounds that ran are committed", err=True)
            sys.exit(130)


@cli.command()
@click.option("--full", is_flag=True, help="Also download every object and check that its bytes hash to its name.")
@click.option("--repair", "repair_from", multiple=True, type=click.Path(path_type=Path), metavar="FILE",
              help="Write again each missing or corrupt blob that FILE rebuilds bit for bit: a base's weights, or the "
                   "file a revision was pushed from (repeatable; implies --full).")
@json_option
@click.pass_obj
def verify(obj: Context, full, repair_from, as_json):
    """Check that every catalog reference resolves to a stored object; exit 7 on any problem."""
    if repair_from:
        with obj.bars() as bars:
            fixed = obj.registry(write=True).repair(list(repair_from), progress=bars)
        if as_json:
            echo_json(fixed)
        else:
            for digest, what in fixed.fixed:
                click.echo(f"repaired {digest}  {what}")
            for digest, why in fixed.lost:
                click.echo(f"lost     {digest}  {why}")
            click.echo(f"{'ok' if fixed.ok else 'PROBLEMS'}: {fixed.checked} objects hashed, {len(fixed.fixed)} repaired, {len(fixed.lost)} still lost")
        if not fixed.ok:
            sys.exit(IntegrityError.exit_code)
        return
    with obj.bars() as bars:
        report = obj.registry().verify(full, progress=bars)
    if as_json:
        echo_json(report)
    else:
        for digest, who in report.missing:
            click.echo(f"missing  {digest}  {who}")
        for digest, problem in report.corrupt:
            click.echo(f"corrupt  {digest}  {problem}")
        for digest in report.orphans:
            click.echo(f"orphan   {digest}")
        status = "ok" if report.ok else "PROBLEMS"
        click.echo(
            f"{status}: {report.checked} objects {'hashed' if full else 'listed'}, {len(report.missing)} missing, "
            f"{len(report.corrupt)} corrupt, {len(report.orphans)} orphans (gc collects orphans)"
        )
    if not report.ok:
        sys.exit(IntegrityError.exit_code)


def main() -> None:
    cli(prog_name="dsreg")


if __name__ == "__main__":
    main()
