"""The render backend that runs diffusers pipelines (FLUX and any other text-to-image model).

Importing this module imports torch and diffusers: it and its private helpers (``_device``,
``_loading``; ``_lora`` where it loads adapters) are the one place in imagegen that does.
"""

from __future__ import annotations

import gc
import inspect
import logging
import time
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace

from imagegen.errors import ConfigurationError, DependencyUnavailable
from imagegen.models import EnhancedPrompt
from imagegen.render._errors import INSTALL_HINT, field_error, first_line
from imagegen.render.base import ProgressCallback, RenderOutput
from imagegen.render.png import encode_filtered_png, encode_png
from imagegen.settings import Settings
from imagegen.telemetry import tracer


class RenderExtraMissing(ConfigurationError, ImportError):
    """The render extra (torch, diffusers...) is not installed: every render fails alike until
    it is. A :class:`ConfigurationError` (one line and exit 2 on the command line, 503 at the
    function edge), and an :class:`ImportError`, as a missing optional dependency is to Python
    code that probes for it."""

    def __init__(self, error: ImportError) -> None:
        missing = isinstance(error, ModuleNotFoundError) and error.name
        why = f"{error.name} is not installed" if missing else first_line(error)
        super().__init__(f"rendering needs the render extra ({why}): {INSTALL_HINT}")
        self.name = error.name


# The private modules import torch, diffusers and huggingface_hub too (``_lora`` once it
# loads adapters: what the settings alone decide of LoRAs needs none of them).
try:
    import diffusers
    import numpy as np
    import torch
    from diffusers.image_processor import VaeImageProcessor

    from imagegen.render._device import select_device
    from imagegen.render._device_png import FilteredImage, filtered_images
    from imagegen.render._family import build_offline, call_options, check_text_encoder
    from imagegen.render._fastpath import apply_fast_path
    from imagegen.render._loading import Pipeline, load_pipeline
    from imagegen.render._lora import LoraAdapters, check_lora_support
except ImportError as error:  # an install without the render extra
    raise RenderExtraMissing(error) from error

__all__ = ["DiffusersBackend", "select_device"]

log = logging.getLogger("imagegen.render")


@dataclass(frozen=True)
class _Pixels:
    """What the pipeline made for a batch: PIL images, or rows filtered on the device
    (:class:`FilteredImage`), and the timings so far."""

    images: list[Any]
    timings: dict[str, float]


class DiffusersBackend:
    """Renders with diffusers pipelines, loaded once and kept in memory.

    ``load`` and ``render`` block; call them from one worker thread, one at a time.

    Args:
        settings: Reads ``device``, ``model_cache_dir`` and ``hf_token``.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._pipelines: dict[str, Pipeline] = {}
        # Each model's family arguments (call_options), decided at its first call, not at every
        # one: a local directory's family is read from its files.
        self._call_options: dict[str, dict[str, Any]] = {}
        self._adapters = LoraAdapters(settings)
        self._target: tuple[torch.device, torch.dtype] | None = None
        self._png_level = settings.png_compress_level
        self._png_strategy = settings.png_compress_strategy
        self._png_threads = settings.png_encode_threads
        self.filter_on_device: bool | None = None
        """Whether PNG rows are filtered on the device (None: on CUDA with the encoder in
        parts, ``png_encode_threads`` above 1; ``_device_png``)."""
        self.fast_path: dict[str, list[str]] = {}
        """The CUDA fast-path options applied to each loaded model."""

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """The device pipelines run on (resolved on first use)."""
        return self._resolve()[0]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype pipelines run in."""
        return self._resolve()[1]

    def load(self, model: str) -> float:
        """Load ``model`` (hub id, local directory, ``tiny`` or ``tiny-klein``) unless loaded.

        Returns the seconds it took (0 when already loaded).

        Raises:
            InvalidRequest: ``model`` names no text-to-image pipeline (field ``model``).
            DependencyUnavailable: The device is missing, or the model is neither cached nor
                downloadable (offline, Hub unreachable, gated without a token).
        """
        if model in self._pipelines:
            return 0.0
        device, dtype = self._resolve()
        started = time.perf_counter()
        pipe = build_offline(model)
        if pipe is None:
            pipe = load_pipeline(model, dtype, self._settings)
            check_text_encoder(pipe, model)
        elif dtype != torch.float32:
            pipe.to(dtype=dtype)
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        self.fast_path[model] = apply_fast_path(pipe, self._settings, device)
        self._pipelines[model] = pipe
        return time.perf_counter() - started

    def is_loaded(self, model: str) -> bool:
        """Whether ``model`` is loaded."""
        return model in self._pipelines

    def close(self) -> None:
        """Drop every pipeline and give the accelerator memory back."""
        self._pipelines.clear()
        self._call_options.clear()
        self._adapters.clear()
        gc.collect()
        if self._target is not None and self._target[0].type == "cuda":
            torch.cuda.empty_cache()
        elif self._target is not None and self._target[0].type == "mps":
            torch.mps.empty_cache()

    def describe(self) -> dict[str, str]:
        """What ``imagegen doctor`` prints: versions, the device chosen, what is available."""
        cuda = "not available"
        if torch.cuda.is_available():
            names = {torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())}
            count = torch.cuda.device_count()
            cuda = f"{count} x {', '.join(sorted(names))} (CUDA {torch.version.cuda})"
        elif torch.version.cuda is None:
            cuda = "not available (CPU-only torch build)"
        info = {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "device_setting": self._settings.device,
            "cuda": cuda,
            "mps": "available" if torch.backends.mps.is_available() else "not available",
            "loaded": ", ".join(self._pipelines) or "none",
        }
        try:
            device, dtype = self._resolve()
        except DependencyUnavailable as error:
            info["device"] = f"unavailable: {error.message}"
        else:
            info["device"] = str(device)
            info["dtype"] = str(dtype).removeprefix("torch.")
        return info

    # -- rendering ---------------------------------------------------------------------------

    def render(
        self, job: EnhancedPrompt, *, progress: ProgressCallback | None = None
    ) -> RenderOutput:
        """Render ``job`` into a PNG; the same job gives the same bytes on the same machine.

        Timings (seconds): ``denoise`` (prompt encoding and the denoising loop), ``decode``
        (VAE and conversion to pixels), ``encode`` (PNG), ``lora`` (when the job has any) and
        ``total``.

        ``progress`` is called at each step's end, in the pipeline's loop: what it raises ends
        the call there, with nothing decoded (how the render stage interrupts a call).

        Raises:
            InvalidRequest: ``job.model`` is not loaded, or a LoRA is not configured here or
                cannot be used (``loras``).
            DependencyUnavailable: A LoRA from the Hub cannot be fetched.
        """
        return self.render_batch([job], progress=progress)[0]

    def render_batch(
        self, jobs: list[EnhancedPrompt], *, progress: ProgressCallback | None = None
    ) -> list[RenderOutput]:
        """Render compatible ``jobs`` (see :func:`batch_key`) as one pipeline call.

        Each image has its own generator seeded from its job. A batch of one is exactly
        :meth:`render`; a larger batch gives each image within float noise of rendering it
        alone (docs/rendering.md). Timings are the batch's, shared by its images.
        """
        return self.encode_batch(jobs, self.denoise_batch(jobs, progress=progress))

    def denoise_batch(
        self, jobs: list[EnhancedPrompt], *, progress: ProgressCallback | None = None
    ) -> _Pixels:
        """The pipeline's part of :meth:`render_batch`: LoRAs, denoising, VAE decoding."""
        job = jobs[0]
        pipe = self._pipelines.get(job.model)
        if pipe is None:
            raise field_error("model", f"model {job.model!r} is not loaded")
        timings: dict[str, float] = {}
        started = time.perf_counter()

        adapters_on = False
        try:
            out_of_memory = False
            try:
                # 1. Activate the job's LoRA adapters (loaded once, then cached by name); their
                # weights take device memory as the call's activations do.
                if job.loras:
                    with tracer().start_as_current_span("imagegen.render.lora") as span:
                        span.set_attribute("imagegen.loras", [lora.name for lora in job.loras])
                        check_lora_support(job.model, pipe)
                        adapters_on = True  # before loading: a model's first adapter comes enabled
                        self._adapters.activate(job.model, pipe, job.loras)
                    timings["lora"] = time.perf_counter() - started

                # 2. Denoise, then 3. decode with the VAE
                images, denoise, decode = self._denoise_and_decode(pipe, jobs, progress)
            except torch.OutOfMemoryError:
                out_of_memory = True
            if out_of_memory:
                # Out of the handler: the error's traceback, and the latents and activations
                # its frames hold, are gone before the cache is given back, and the refusal
                # (which the stage holds while it runs a batch's jobs alone) holds none of it.
                raise self._out_of_memory(jobs)
        finally:
            # The next job starts from the bare model.
            if adapters_on:
                pipe.disable_lora()
        timings["denoise"] = denoise
        timings["decode"] = decode
        return _Pixels(images, timings)

    def encode_batch(self, jobs: list[EnhancedPrompt], pixels: _Pixels) -> list[RenderOutput]:
        """The CPU's part of :meth:`render_batch`: each image as a PNG with its text chunks."""
        # 4. Encode as PNG, with what is needed to reproduce the image
        timings = dict(pixels.timings)
        encode_started = time.perf_counter()
        pngs = []
        for image, each in zip(pixels.images, jobs, strict=True):
            with tracer().start_as_current_span("imagegen.render.png_encode") as span:
                text = self._png_text(each)
                options: dict[str, Any] = {
                    "text": text,
                    "level": self._png_level,
                    "strategy": self._png_strategy,
                    "threads": self._png_threads,
                }
                if isinstance(image, FilteredImage):
                    png = encode_filtered_png(image.rows, mode=image.mode, **options)
                else:
                    png = encode_png(image, **options)
                pngs.append(png)
                span.set_attribute("imagegen.png.size", len(pngs[-1]))
        timings["encode"] = time.perf_counter() - encode_started
        timings["total"] = sum(timings.values())  # the render's own time, waits excluded
        return [
            RenderOutput(png=png, width=image.width, height=image.height, timings=dict(timings))
            for png, image in zip(pngs, pixels.images, strict=True)
        ]

    def _out_of_memory(self, jobs: list[EnhancedPrompt]) -> DependencyUnavailable:
        """What a call that ran out of accelerator memory is answered: the cache it left
        given back, and a retryable refusal. A batch's jobs are then run one at a time by the
        stage (each in a fraction of the memory, as any failed batch's are); one image alone
        may fit another time, or on another replica (the memory may be another process's)."""
        self._empty_cache()
        job = jobs[0]
        what = f"{job.width}x{job.height} {job.model}"
        count = f"a batch of {len(jobs)}" if len(jobs) > 1 else "one image"
        log.warning(
            "out of memory for %s at %s",
            count,
            what,
            extra={"generation_ids": [each.generation_id for each in jobs]},
        )
        return DependencyUnavailable(
            f"out of {self.device.type} memory rendering {count} at {what}", retry_after=30
        )

    def _empty_cache(self) -> None:
        """Give what an out-of-memory call left in the allocator's cache back to the device."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _denoise_and_decode(
        self, pipe: Pipeline, jobs: list[EnhancedPrompt], progress: ProgressCallback | None
    ) -> tuple[list[Any], float, float]:
        """Run ``pipe`` for ``jobs``; return the PIL images and the denoise and decode seconds."""
        parameters = inspect.signature(pipe.__call__).parameters
        device = self.device
        job = jobs[0]
        # CUDA draws its own noise on the GPU; MPS noise is drawn on the CPU, as diffusers advises.
        generators = [
            torch.Generator(device="cuda" if device.type == "cuda" else "cpu").manual_seed(j.seed)
            for j in jobs
        ]
        kwargs: dict[str, Any] = {
            # One job runs exactly as it always has: a prompt and a generator, not lists of one.
            "prompt": job.prompt if len(jobs) == 1 else [j.prompt for j in jobs],
            "width": job.width,
            "height": job.height,
            "num_inference_steps": job.steps,
            "generator": generators[0] if len(jobs) == 1 else generators,
        }
        if "guidance_scale" in parameters:
            kwargs["guidance_scale"] = job.guidance
        options = self._call_options.get(job.model)
        if options is None:
            options = self._call_options[job.model] = call_options(pipe, job.model)
        kwargs.update(options)

        last_step_at: float | None = None

        def on_step_end(
            pipeline: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]
        ) -> dict[str, Any]:
            nonlocal last_step_at
            steps = getattr(pipeline, "num_timesteps", None) or job.steps
            if step + 1 >= steps:
                self._synchronize()  # the loop's last GPU work ends before the decode starts
            last_step_at = time.perf_counter()
            if progress is not None:
                progress(step + 1, steps)
            return callback_kwargs

        if "callback_on_step_end" in parameters:
            kwargs["callback_on_step_end"] = on_step_end
        on_device = self._filters_on_device() and "output_type" in parameters
        if on_device:
            kwargs["output_type"] = "pt"  # quantised and filtered below, on the device
        elif "output_type" in parameters:
            # The floats "pil" quantises (diffusers' VaeImageProcessor.postprocess: pt_to_numpy,
            # then numpy_to_pil), checked before they are: a NaN would quantise to black.
            kwargs["output_type"] = "np"

        loop_attributes: dict[str, str | int] = {
            "imagegen.steps": job.steps,
            "imagegen.width": job.width,
            "imagegen.height": job.height,
            "imagegen.device": device.type,
            "imagegen.batch_size": len(jobs),
        }
        # The pipeline denoises and decodes in one call; the last step's end splits the two
        # phases, and their spans are written afterwards with those times.
        started = time.perf_counter()
        loop_span = tracer().start_span("imagegen.render.denoise_loop", attributes=loop_attributes)
        try:
            with trace.use_span(loop_span, end_on_exit=False):  # records an error on the span
                output = pipe(**kwargs).images
                if on_device:
                    pixels = _batched(output)
                    # One reduction and one sync, before the rows' own copy to the host.
                    self._check_finite(jobs, torch.isfinite(pixels).flatten(1).all(1).tolist())
                    images = self._host_images(pixels)
                elif kwargs.get("output_type") == "np":
                    floats = np.asarray(output)
                    floats = floats if floats.ndim == 4 else floats[None]
                    self._check_finite(jobs, np.isfinite(floats).reshape(len(floats), -1).all(1))
                    images = list(VaeImageProcessor.numpy_to_pil(floats))
                else:
                    images = list(output)
        except BaseException:
            loop_span.end()
            raise
        ended, ended_ns = time.perf_counter(), time.time_ns()
        denoised = last_step_at if last_step_at is not None else ended
        denoised_ns = ended_ns - int((ended - denoised) * 1e9)
        loop_span.end(end_time=denoised_ns)
        tracer().start_span("imagegen.render.vae_decode", start_time=denoised_ns).end(ended_ns)
        return images, denoised - started, ended - denoised

    def _check_finite(self, jobs: list[EnhancedPrompt], finite: Any) -> None:
        """Refuse a call any of whose images has a pixel that is not a number.

        diffusers clamps the decoded pixels to [0, 1], which keeps a NaN, and quantising makes
        it 0: the image would be stored black, and the job said to succeed. In float16 (GPUs
        before Ampere, ``_device``) FLUX.2 [klein]'s Qwen3 text encoder overflows: transformers'
        models/qwen3/modeling_qwen3.py has none of the float16 clamps of t5/modeling_t5.py.

        A :class:`ConfigurationError`, retryable: the request is fine, and this replica would
        fail it again, but another, on a GPU with bfloat16, need not; the cause is the
        deployment's device (logged as an error for its operator). The stage runs a failed
        batch's jobs alone, so only those whose own pixels are not finite fail.
        """
        failed = [job.generation_id for job, ok in zip(jobs, finite, strict=True) if not ok]
        if not failed:
            return
        job = jobs[0]
        dtype = str(self.dtype).removeprefix("torch.")
        where = f"{dtype} on {self.device.type}"
        if self.dtype == torch.float16:
            remedy = (
                "serve this model from a GPU with bfloat16 (Ampere or newer), "
                "or set IMAGEGEN_DEVICE=cpu"
            )
        else:
            remedy = "check the model's weights, or set IMAGEGEN_DEVICE to another device"
        count = f"{len(failed)} of {len(jobs)} images" if len(jobs) > 1 else "the image"
        message = f"{job.model} made non-finite pixels (NaN) in {count}, in {where}: {remedy}"
        log.error("%s; nothing stored", message, extra={"generation_ids": failed})
        raise ConfigurationError(
            message,
            errors=[{"field": "IMAGEGEN_DEVICE", "message": f"{job.model} fails in {where}"}],
        )

    def _filters_on_device(self) -> bool:
        if self.filter_on_device is None:
            self.filter_on_device = self.device.type == "cuda" and self._png_threads > 1
        return self.filter_on_device

    def _host_images(self, output: torch.Tensor | list[torch.Tensor]) -> list[Any]:
        """A ``"pt"`` output on the host: rows filtered on the device, or PIL images of the
        same values for channel counts the encoder in parts does not take.

        Filtering on the device only saves host time: if the device refuses it (out of
        memory, a kernel it lacks), the images go to the host as the pipeline's ``"pil"``
        output would have, which the encoder in parts makes into the same files, and the
        device is not asked again in this process.
        """
        output = _batched(output)
        try:
            filtered = filtered_images(output)
        except RuntimeError as exc:  # torch's device errors, NotImplementedError included
            self.filter_on_device = False
            log.warning(
                "PNG rows filtered on the host from now on: the device could not (%s: %s)",
                type(exc).__name__,
                exc,
            )
            filtered = None
        if filtered is not None:
            return list(filtered)
        # What the pipeline's own "pil" output would have been.
        return list(VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(output)))

    @staticmethod
    def _png_text(job: EnhancedPrompt) -> dict[str, str]:
        # Render parameters only, no generation id: a replay of the job (a new id) is then the
        # same file, byte for byte; the id is in the key and the metadata record.
        text = {
            "prompt": job.prompt,
            "seed": str(job.seed),
            "model": job.model,
            "steps": str(job.steps),
            "guidance": f"{job.guidance:g}",
        }
        if job.loras:
            text["loras"] = ", ".join(f"{lora.name}:{lora.weight:g}" for lora in job.loras)
        text["Software"] = "imagegen"
        return text

    # -- device ------------------------------------------------------------------------------

    def _resolve(self) -> tuple[torch.device, torch.dtype]:
        if self._target is None:
            self._target = select_device(self._settings.device)
        return self._target

    def _synchronize(self) -> None:
        """Wait for queued GPU work, so a timestamp marks its end."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def _batched(output: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """A ``"pt"`` output as one ``(B, C, H, W)`` tensor."""
    if not isinstance(output, torch.Tensor):  # a pipeline that lists its images
        output = torch.stack(list(output))
    return output if output.ndim == 4 else output[None]  # one image, unbatched
