"""One resident pipeline rendering for several subjects in turn, switched in place with Registry.apply.

    pip install -e '.[diffusers]' && python examples/serve_subjects.py

A service keeps its base pipeline in memory and, per request, writes the asked-for subject's deltas
into its UNet and text encoder: no checkpoint file is written or read, and switching among a
working set of subjects reads nothing from the store once their factors are cached. The pipeline
here is tiny and built offline (dsreg.sd_tiny); with a real one, only the paths change.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import diffusers
import torch
import transformers
from diffusers import StableDiffusionPipeline

from dsreg import Registry, sd_tiny


def load(folder: Path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render(pipe: StableDiffusionPipeline) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.from_numpy(pipe("a photo of sks dog", num_inference_steps=3, generator=generator, output_type="np").images)


def main() -> None:
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="dsreg-serve-") as tmp:
        work = Path(tmp)
        reg = Registry.open(home=work / "registry")
        sd_tiny.tiny_pipeline(work / "tok").save_pretrained(work / "base")
        reg.add_base(work / "base", "sd-tiny")
        for i, name in enumerate(["corgi", "tabby", "teapot"]):  # three DreamBooth-style fine-tunes
            ft = sd_tiny.tiny_pipeline(work / "tok")
            sd_tiny.train(ft, steps=6, text_encoder=True, seed=10 + i)
            ft.save_pretrained(work / name)
            rev = reg.push(work / name, name, energy=0.8)
            print(f"pushed {rev.ref}: {rev.original_bytes / 1e6:.1f} MB stored as {rev.stored_bytes / 1e3:.0f} kB")

        pipe = load(work / "base")  # the one resident pipeline
        plain = render(pipe)
        for name in ["corgi", "tabby", "corgi", "teapot", "tabby"]:
            started = time.perf_counter()
            held = reg.apply(pipe, name)  # switches from whatever subject the pipeline holds
            switched = time.perf_counter() - started
            image = render(pipe)
            reference = render(load(work / name))  # what the fine-tune itself renders
            print(
                f"{name:>7}: switched in {switched * 1e3:5.1f} ms; image differs from the base's by "
                f"{(image - plain).abs().max():.3f}, from the fine-tune's own by {(image - reference).abs().max():.4f}"
            )
        held.restore()  # the base's bits again
        with reg.apply(pipe, "teapot"):  # for one request; leaving the block gives back what the pipeline held
            render(pipe)
        assert torch.equal(render(pipe), plain)
        print(f"restored: the base renders as before; factor cache {reg.factors.nbytes / 1e3:.0f} kB "
              f"({reg.factors.hits} hits, {reg.factors.misses} misses)")
        reg.close()


if __name__ == "__main__":
    main()
