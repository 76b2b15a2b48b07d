"""One resident pipeline rendering for several subjects in turn, switched in place with Registry.apply.

    pip install -e '.[diffusers]' && python examples/serve_subjects.py

A service keeps its base pipeline in memory and serves requests (subject, prompt) from a queue: per
request it writes the asked-for subject's deltas into the UNet and text encoder. No checkpoint file
is written or read, and switching among a working set of subjects reads nothing from the store
once their factors are in the (bounded) factor cache; it prints switches per second and the
cache's hit rate. The pipeline
here is tiny and built offline (dsreg.sd_tiny); with a real one, only the paths change.
"""

from __future__ import annotations

import queue
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
        reg = Registry.open(home=work / "registry", factor_cache="4MB")  # bounded: the least recently used go
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
        references = {name: render(load(work / name)) for name in ("corgi", "tabby", "teapot")}  # the fine-tunes' own

        # The service: requests (subject, prompt) from a queue, one resident pipeline, a bounded factor cache.
        requests: queue.Queue = queue.Queue()
        for name in ["corgi", "tabby", "corgi", "teapot", "tabby"]:
            requests.put((name, f"a photo of sks {name}"))
        requests.put(None)  # the end of the day
        reg.factors.hits = reg.factors.misses = 0
        held, switches, switching = None, 0, 0.0
        while (request := requests.get()) is not None:
            name, prompt = request
            started = time.perf_counter()
            held = reg.apply(pipe, name)  # switches from whatever subject the pipeline holds
            switched = time.perf_counter() - started
            switches, switching = switches + 1, switching + switched
            image = render(pipe)
            print(
                f"{name:>7}: switched in {switched * 1e3:5.1f} ms; image differs from the base's by "
                f"{(image - plain).abs().max():.3f}, from the fine-tune's own by {(image - references[name]).abs().max():.4f}"
            )
        lookups = reg.factors.hits + reg.factors.misses
        print(
            f"served {switches} requests: {switches / switching:.1f} switches/s, factor cache hit rate "
            f"{reg.factors.hits / lookups:.0%} ({reg.factors.nbytes / 1e3:.0f} kB of its {reg.settings.factor_cache / 1e3:.0f} kB)"
        )
        held.restore()  # the base's bits again
        with reg.apply(pipe, "teapot"):  # for one request; leaving the block gives back what the pipeline held
            render(pipe)
        assert torch.equal(render(pipe), plain)
        print("restored: the base renders as before")
        reg.close()


if __name__ == "__main__":
    main()
