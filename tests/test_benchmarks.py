"""The benchmark harness computes ratios the way its rows say, and interleaves its rounds."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
from _harness import Comparison, interleave


def test_rounds_alternate_which_side_goes_first() -> None:
    calls: list[str] = []

    def side(name: str) -> float:
        calls.append(name)
        return float(len(calls))

    baseline, project = interleave(3, lambda: side("b"), lambda: side("p"))
    assert calls == ["b", "p", "p", "b", "b", "p"]
    assert baseline == [1.0, 4.0, 5.0] and project == [2.0, 3.0, 6.0]


def test_a_speed_up_is_the_baseline_time_over_ours() -> None:
    row = Comparison("x", "s", "higher", 1.8, baseline=[6.0, 7.0], project=[3.0, 4.0])
    assert row.ratio() == pytest.approx(2.0) and row.met()


def test_a_time_ratio_is_ours_over_the_baseline() -> None:
    row = Comparison("x", "s", "lower", 1.1, baseline=[1.0, 2.0], project=[1.2, 1.3])
    assert row.ratio() == pytest.approx(1.2) and not row.met()
    median = Comparison("x", "s", "lower", 1.2, [1.0, 1.0, 9.0], [1.1, 1.1, 0.1], "median")
    assert median.ratio() == pytest.approx(1.1) and median.met()
    assert (row.label(), median.label()) == ("min", "median")


def test_a_rate_ratio_is_our_highest_rate_over_the_baseline_highest() -> None:
    row = Comparison("x", "req/s", "higher", 0.23, baseline=[1000.0, 1200.0], project=[300.0])
    assert row.ratio() == pytest.approx(0.25) and row.met()
    assert row.label() == "max"
    median = Comparison(
        "x", "req/s", "higher", 0.2, [1000.0, 1100.0, 1200.0], [100.0, 200.0, 900.0], "median"
    )
    assert median.ratio() == pytest.approx(200 / 1100) and not median.met()
    assert median.label() == "median"


def test_the_printed_row_names_the_figure_its_ratio_compares(
    capsys: pytest.CaptureFixture[str],
) -> None:
    Comparison("rate", "req/s", "higher", 0.1, [50.0, 40.0], [10.0, 12.0]).print()
    Comparison("time", "s", "lower", 1.3, [1.0, 2.0], [1.5, 1.2]).print()
    rate, time = capsys.readouterr().out.split("time\n")
    assert "max   50.0000" in rate and "ratio   0.24x (max against max); target >=" in rate
    assert "min    1.2000" in time and "ratio   1.20x (min against min); target <=" in time


def test_a_row_without_a_target_informs_and_is_neither_met_nor_missed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    row = Comparison("ceiling", "s", "higher", None, baseline=[2.4], project=[2.0])
    assert row.ratio() == pytest.approx(1.2) and not row.has_target
    row.print()
    assert "ratio   1.20x (min against min); no target" in capsys.readouterr().out
    assert row.markdown().endswith("| 1.20x (min) | no target |")
    with pytest.raises(ValueError, match="no target"):
        row.met()


def test_the_summary_line_gives_both_figures_the_ratio_and_the_verdict() -> None:
    row = Comparison("rate: x", "req/s", "higher", 0.15, [100.0, 80.0, 90.0], [10.0, 12.0, 11.0])
    assert row.markdown() == (
        "| rate: x | 100 / 90 req/s | 12 / 11 req/s | 0.12x (max) | ≥ 0.15x **not met** |"
    )


def test_the_tables_best_column_is_the_best_round_whatever_the_ratio_compares() -> None:
    row = Comparison("x", "s", "lower", 1.2, [3.0, 1.0, 2.0], [0.5, 0.4, 0.6], "median")
    assert row.markdown().startswith("| x | 1 / 2 s | 0.4 / 0.5 s | 0.25x (median) |")
    rate = Comparison("r", "req/s", "higher", None, [9.0, 7.0, 8.0], [2.0, 1.0, 3.0], "median")
    assert rate.markdown().startswith("| r | 9 / 8 req/s | 3 / 2 req/s |")


def test_a_target_is_met_as_given_and_rounded_only_where_printed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # 3 x 89/1160 is 0.23017...: a ratio of 0.2301 misses it, though both print as 0.23.
    row = Comparison("x", "req/s", "higher", 3 * 89 / 1160, [1000.0], [230.1])
    assert not row.met()
    assert row.markdown().endswith("| 0.23x (max) | ≥ 0.23x **not met** |")
    row.print()
    assert "target >= 0.23x  NOT MET" in capsys.readouterr().out


def test_the_ollama_down_rows_give_the_median_mean_and_95th_percentile() -> None:
    from _ollama_down import _rows

    baseline = [[0.01] * 7, [0.02] * 7]
    project = [[1.5, 1.5, 1.5, *[0.001] * 4], [1.7, 1.5, 1.3, *[0.001] * 4]]
    rows = _rows("down: {statistic}", baseline, project, target=1.2, first=3)
    assert [row.name for row in rows] == ["down: p50", "down: mean", "down: p95"]
    assert [row.target for row in rows] == [1.2, None, None]
    assert rows[0].note == "(the first 3: 1.60, 1.50, 1.40 s; then the circuit is open)"
    assert rows[0].project == [0.001, 0.001] and rows[0].met()
    assert rows[1].project == pytest.approx([4.5 / 7 + 0.004 / 7, 4.5 / 7 + 0.004 / 7])
    assert rows[2].project == pytest.approx([1.5, 1.64])  # 1.5 + 0.7 of the way to 1.7


def test_the_hanging_ollama_accepts_connections_and_never_answers() -> None:
    import socket
    from urllib.parse import urlsplit

    from _ollama_down import hanging_server

    with hanging_server() as url:
        address = urlsplit(url)
        with socket.create_connection((address.hostname, address.port), timeout=5) as sock:
            sock.sendall(b"GET /api/tags HTTP/1.1\r\nHost: ollama\r\n\r\n")
            sock.settimeout(0.2)
            with pytest.raises(TimeoutError):
                sock.recv(1)
    with (
        pytest.raises(ConnectionRefusedError),
        socket.create_connection((address.hostname, address.port), timeout=5),
    ):
        pass


def test_the_cpu_time_of_a_served_process_counts_threads_that_have_ended() -> None:
    import subprocess

    from _rate import _ticks

    # A thread that spins for 0.3 s of CPU, then ends; the process then waits for its stdin.
    script = (
        "import sys, threading, time\n"
        "def spin():\n"
        "    end = time.thread_time() + 0.3\n"
        "    while time.thread_time() < end: pass\n"
        "t = threading.Thread(target=spin); t.start(); t.join()\n"
        "print('done', flush=True); sys.stdin.read()\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None and process.stdout.readline() == "done\n"
        assert _ticks(process.pid) / os.sysconf("SC_CLK_TCK") >= 0.3
    finally:
        process.communicate("")


def test_the_cli_start_up_rounds_rotate_which_command_goes_first(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import cli_startup

    commands = {"python -c pass (baseline)": ["a"], "imagegen --help": ["b"], "other": ["c"]}
    ran: list[str] = []
    monkeypatch.setattr(cli_startup, "_commands", lambda: commands)
    monkeypatch.setattr(cli_startup, "_time", lambda command: ran.append(command[0]) or 0.1)
    monkeypatch.setattr(sys, "argv", ["cli_startup.py", "--rounds", "4"])
    assert cli_startup.main() == 0
    assert "".join(ran) == "abc" + "abc" + "bca" + "cab" + "abc"  # the warm-ups, then 4 rounds
    assert "imagegen --help" in capsys.readouterr().out


def test_each_options_compile_starts_from_fresh_caches(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    import gpu

    monkeypatch.setenv("TRITON_CACHE_DIR", "/somewhere/warm")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    seen = []
    for _ in range(2):
        with gpu.fresh_compile_state():
            seen.append({name: os.environ[name] for name in gpu.COMPILE_CACHES})
            assert all(Path(path).parent.is_dir() for path in seen[-1].values())
    assert seen[0] != seen[1] and "/somewhere/warm" not in seen[0].values()
    assert os.environ["TRITON_CACHE_DIR"] == "/somewhere/warm"
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ


def test_the_gpu_script_refuses_to_run_without_cuda(capsys: pytest.CaptureFixture[str]) -> None:
    import gpu

    if gpu_available():
        pytest.skip("CUDA is present: the script would run")
    assert gpu.main(["--parts", "overhead"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_the_gpu_script_says_once_that_the_model_cannot_be_loaded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not in the model cache, the Hub out of reach (HF_HUB_OFFLINE, as the tests run): one
    line naming the model and the ways on, exit 2, before any part is tried."""
    import gpu

    monkeypatch.setenv("IMAGEGEN_MODEL_CACHE_DIR", str(tmp_path))  # nothing in it
    argv = ["--device", "cpu", "--model", "example-org/absent-model", "--rounds", "1"]
    assert gpu.main(argv) == 2
    captured = capsys.readouterr()
    [line] = captured.err.splitlines()
    assert "example-org/absent-model is not in the local cache" in line
    assert "imagegen models pull example-org/absent-model" in line
    assert "--random-weights DIR" in line
    assert "bf16" not in captured.out  # no part started


def test_the_gpu_script_smoke_runs_its_parts_on_the_cpu(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import gpu

    from imagegen.render.batching import BATCHED_MAX_ABS_DIFF, BATCHED_MIN_PSNR

    # The option table's renders are the ones below; here, that fp8 is skipped without CUDA.
    monkeypatch.setattr(gpu, "OPTIONS", {"+fp8": gpu.OPTIONS["+fp8"]})
    common = ["--device", "cpu", "--model", "tiny", "--sizes", "256", "--rounds", "1"]
    parts = ["--parts", "options", "overhead", "tolerance", "--batch-sizes", "2"]
    assert gpu.main([*common, *parts]) == 0
    out = capsys.readouterr().out
    assert "+fp8                 (skipped: fp8 needs CUDA compute capability 8.9+)" in out
    ratio = re.search(r"overhead at 256²: .* ratio ([\d.]+)x", out)
    assert ratio is not None and float(ratio.group(1)) > 0
    split = re.search(r"render's best, by phase: (.*)", out)
    assert split is not None, out
    seconds = dict(re.findall(r"(\w[a-z ]*?) ([\d.]+) s", split.group(1)))
    assert set(seconds) == {"text encoder", "denoising", "decode", "png"}, split.group(1)
    # The denoising is what the render's denoise phase leaves once the encoder, timed alone,
    # is taken out: on the tiny model two steps, which a loaded machine's encoder run can
    # outlast (then none, never less).
    assert float(seconds.pop("denoising")) >= 0
    assert all(float(v) > 0 for v in seconds.values()), seconds
    png = re.search(r"PNG at 256²: (.*)", out)
    assert png is not None, out
    costs = dict(re.findall(r"(\w+ x\d+) \d+ ms (\d+) KiB", png.group(1)))
    assert set(costs) == {"default x1", "default x4", "rle x1", "rle x4"}, png.group(1)
    assert all(int(kib) > 0 for kib in costs.values())
    # Rows filtered by torch (render's way on CUDA) make the host's files in parts, byte for byte
    filtered = re.search(r"PNG at 256², rows filtered on cpu: (.*)", out)
    assert filtered is not None, out
    on_device = dict(re.findall(r"(\w+ x\d+) \d+ ms (\d+) KiB", filtered.group(1)))
    assert on_device == {"default x4": costs["default x4"], "rle x4": costs["rle x4"]}
    found = re.search(r"batch of 2 vs alone at 256²: max abs (\d+), min PSNR ([\d.]+|inf)", out)
    assert found is not None
    assert int(found.group(1)) <= BATCHED_MAX_ABS_DIFF
    assert float(found.group(2)) >= BATCHED_MIN_PSNR


def test_the_gpu_script_times_a_random_weight_klein_written_where_it_is_told(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import gpu
    from _random_klein import build_random_klein

    from imagegen.modelspec import FLUX2_KLEIN, family_for
    from imagegen.render._tiny import TRANSFORMER_SHAPE, VAE_SHAPE

    # The published architecture, shrunk: the real text encoder's depth (the pipeline stacks
    # its layers 9, 18 and 27), the rest a few channels wide.
    directory = tmp_path / "klein-random"
    build_random_klein(
        directory,
        device="cpu",
        transformer={**TRANSFORMER_SHAPE, "joint_attention_dim": 48, "axes_dims_rope": (4,) * 4},
        text_encoder={
            "vocab_size": 300,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "num_hidden_layers": 27,
        },
        vae=VAE_SHAPE,
    )
    index = json.loads((directory / "model_index.json").read_text())
    assert index["_class_name"] == "Flux2KleinPipeline" and index["is_distilled"] is True
    assert family_for(str(directory)) is FLUX2_KLEIN

    # A directory already written is timed as it is, with the family's own steps
    common = ["--device", "cpu", "--random-weights", str(directory), "--rounds", "1"]
    assert gpu.main([*common, "--parts", "overhead", "--sizes", "256"]) == 0
    out = capsys.readouterr().out
    assert f"{directory}, {FLUX2_KLEIN.default_steps} steps" in out
    assert re.search(r"overhead at 256²: pipeline [\d.]+ s, render [\d.]+ s", out), out

    # A part that fails is reported in its own line; the others still run; the exit says so
    assert gpu.main([*common, "--parts", "overhead", "options", "--sizes", "64"]) == 1
    out = capsys.readouterr().out
    assert "overhead: failed: ValidationError: 2 validation errors for EnhancedPrompt" in out
    assert "bf16: failed: ValidationError" in out and "+fused qkv: failed" in out
    # fp8 alone is skipped without CUDA; the other options together still get their row.
    assert "+fp8                 (skipped" in out
    assert out.rstrip().endswith(
        "failed: overhead, bf16, +fused qkv, +regional compile, all but fp8"
    )


def test_an_option_past_its_limit_is_stopped_and_the_next_runs(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import gpu

    ran: list[str] = []

    def rows(args: object, name: str, *rest: object) -> None:
        ran.append(name)
        if name == "bf16":
            time.sleep(30)  # a compile that does not end

    monkeypatch.setattr(gpu, "option_rows", rows)
    monkeypatch.setattr(gpu, "OPTIONS", {"bf16": {}, "+fused qkv": {"render_fuse_qkv": True}})
    started = time.perf_counter()
    argv = ["--device", "cpu", "--model", "tiny", "--parts", "options", "--option-limit", "0.5"]
    assert gpu.main(argv) == 1
    assert time.perf_counter() - started < 10
    assert ran == ["bf16", "+fused qkv"]
    out = capsys.readouterr().out
    assert "bf16: failed: PartTimeout: past its 0.5 s limit" in out
    assert out.rstrip().endswith("failed: bf16")

    # A part started within the budget is stopped a grace period past it, whatever its limit
    monkeypatch.setattr(gpu, "GRACE", 0.5)
    ran.clear()
    started = time.perf_counter()
    argv = ["--device", "cpu", "--model", "tiny", "--parts", "options", "--budget", "0.3"]
    assert gpu.main(argv) == 1
    assert time.perf_counter() - started < 10
    assert ran == ["bf16"]
    out = capsys.readouterr().out
    assert "bf16: failed: PartTimeout: past its" in out
    assert "(skipped: +fused qkv; past the 0.3 s budget)" in out


def test_the_gpu_budget_counts_from_the_run_s_start(capsys: pytest.CaptureFixture[str]) -> None:
    # Run as a script, the clock starts at its import, before torch's: a run whose import took
    # past its budget starts no part, and its total counts the import.
    import gpu

    argv = ["--device", "cpu", "--model", "tiny", "--parts", "startup", "--budget", "50"]
    assert gpu.main(argv, started=time.perf_counter() - 100) == 0
    out = capsys.readouterr().out
    assert "(skipped: start-up; past the 50 s budget)" in out
    assert re.search(r"^total 10\d s$", out, re.MULTILINE), out


def gpu_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def test_the_png_rows_time_both_strategies_on_a_photo_like_image() -> None:
    from _png import png

    rows = png(rounds=1)
    assert [row.name.split(" in parts")[0] for row in rows] == [
        "png: 1024² default",
        "png: 1024² rle",
    ]
    for row in rows:
        assert not row.has_target and len(row.baseline) == len(row.project) == 1
        files = re.fullmatch(r"\(files: Pillow (\d+) KiB, in parts (\d+) KiB\)", row.note)
        assert files is not None, row.note
        pillow, parts = int(files[1]), int(files[2])
        assert pillow > 1000 and abs(parts - pillow) <= pillow * 0.02  # a photograph's size


def test_only_a_rate_counts_its_maximum_as_its_best() -> None:
    # A time in any unit, like CPU milliseconds per request, is best at its minimum.
    cpu = Comparison("cpu", "ms", "lower", None, baseline=[1.4, 1.2], project=[11.5, 11.2])
    assert not cpu.is_rate and cpu.label() == "min"
    assert cpu.ratio() == pytest.approx(11.2 / 1.2)
    assert Comparison("r", "req/s", "higher", None, [1.0], [2.0]).is_rate


def test_the_images_the_persist_rows_send_are_what_persist_accepts(tmp_path: Path) -> None:
    """The rate and start-up rows persist copies of one render: each must pass persist's
    check against what render stored with the PNG, or the rows measure 400s."""
    import asyncio

    from _rate import _stored_images

    from imagegen import ImageGenService, Settings
    from imagegen.models import RenderedImage

    images = _stored_images(tmp_path, 2)

    async def persist() -> list[str]:
        async with ImageGenService(Settings(storage_url=str(tmp_path))) as service:
            return [
                (await service.persist(RenderedImage.model_validate(image))).sha256
                for image in images
            ]

    assert asyncio.run(persist()) == [image["sha256"] for image in images]


@pytest.mark.slow  # two processes of functions-framework's own
@pytest.mark.parametrize(("name", "answer"), [("hello", "ok"), ("hello_settings", "from-env")])
def test_the_start_up_rows_hellos_serve_and_turn_ready(
    name: str, answer: str, tmp_path: Path
) -> None:
    """The bare hello and the floor hello (its one setting read by pydantic-settings from the
    environment, as a stage's are) are served as the stages are, and answer ``/readyz``."""
    import os

    import httpx
    from _harness import Served

    env = {**os.environ, "IMAGEGEN_MODEL": "from-env"}
    server = Served(name, env, log_dir=tmp_path, threads=1)
    try:
        assert 0 < server.ready_after(timeout=60) < 60
        assert httpx.post(server.url, json={}).text == answer
    finally:
        server.stop()


def test_a_rotation_starts_each_round_one_arm_further_on() -> None:
    from _harness import rotated

    assert [rotated(["a", "b", "c"], i) for i in range(4)] == [
        ["a", "b", "c"],
        ["b", "c", "a"],
        ["c", "a", "b"],
        ["a", "b", "c"],
    ]
    assert rotated([], 3) == []


def test_an_absolute_target_says_met_or_not_met_beside_its_figure() -> None:
    from _harness import absolute_verdict

    assert absolute_verdict(4.9, 5.0, at_most=True, unit="ms") == "target <= 5 ms  met"
    assert absolute_verdict(5.1, 5.0, at_most=True, unit="ms") == "target <= 5 ms  NOT MET"
    assert absolute_verdict(499.0, 500, at_most=False, unit="events/s") == (
        "target >= 500 events/s  NOT MET"
    )


def test_the_remote_context_baseline_runs_the_same_plugins_less_remote_context(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import asyncio

    import remote_context

    from imagegen.plugins import PluginSet
    from tests.plugins.conftest import JsonEndpoint

    ran: list[list[str]] = []
    run = PluginSet.run

    async def spy(self: PluginSet, **kwargs: Any) -> Any:
        contributions = await run(self, **kwargs)
        ran.append(list(self.names))
        assert [c.plugin for c in contributions] == list(self.names)  # each one contributed
        return contributions

    monkeypatch.setattr(PluginSet, "run", spy)
    with JsonEndpoint() as endpoint:
        asyncio.run(remote_context.measure(1, 1, endpoint.at("/context")))
    three = ["time_of_day", "holiday", "art_style"]
    # The warm-up call of each variant, then one round of one request each.
    assert ran[:3] == [three, [*three, "remote_context"], [*three, "remote_context"]]


def test_the_otlp_rounds_rotate_the_variants_and_print_min_median_and_ratios(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import otlp_overhead

    calls: list[str] = []
    mean = {"baseline": [2.0, 4.0, 3.0], "disabled": [2.0, 2.0, 2.0]}

    def fake(variant: str, requests: int, warmup: int, blackhole: str) -> dict[str, float]:
        calls.append(variant)
        value = mean.get(variant, [3.0, 3.0, 3.0])[calls.count(variant) - 1]
        return {"mean_ms": value, "p50_ms": 1.0, "p95_ms": 5.0, "process_s": 1.0}

    monkeypatch.setattr(otlp_overhead, "run_variant", fake)
    monkeypatch.setattr(sys, "argv", ["otlp_overhead.py", "--rounds", "3"])
    otlp_overhead.main()
    assert calls == [
        *("baseline", "disabled", "refused", "blackhole"),
        *("disabled", "refused", "blackhole", "baseline"),
        *("refused", "blackhole", "baseline", "disabled"),
    ]
    out = capsys.readouterr().out
    # The baseline's rounds are 2, 4, 3 ms: min 2, median 3; disabled is 2 every round.
    assert re.search(r"baseline +2\.00 +3\.00 .* 1\.00x /  1\.00x", out)
    assert re.search(r"disabled +2\.00 +2\.00 .* 1\.00x /  0\.67x", out)
    assert "min against min, median against median; no target" in out


def test_the_otlp_benchmark_stops_at_an_answer_that_is_no_enhanced_prompt() -> None:
    """enhance answers an event it refuses for the request's own reasons 200 too, with a
    generation.failed event, faster than it enhances a prompt: timed, it would pass for a fast
    request. The run stops there, in one line saying what came back."""
    import otlp_overhead

    from imagegen.events import GENERATION_FAILED, PROMPT_ENHANCED

    otlp_overhead.check_answer(4, 200, PROMPT_ENHANCED, '{"prompt": "a lighthouse"}')
    error = {"code": "invalid_request", "message": "width: must be a multiple of 16"}
    failed = json.dumps({"stage": "enhance", "error": error}, indent=2)
    with pytest.raises(SystemExit) as exited:
        otlp_overhead.check_answer(4, 200, GENERATION_FAILED, failed)
    said = exited.value.code
    assert isinstance(said, str) and "\n" not in said
    assert said.startswith(f"request 4 answered 200 {GENERATION_FAILED}, not 200 {PROMPT_ENHANCED}")
    assert said.endswith('"message": "width: must be a multiple of 16" } }')
    with pytest.raises(SystemExit, match=r"^request 5 answered 503 with no event, not 200 "):
        otlp_overhead.check_answer(5, 503, None, '{"error": "dependency_unavailable"}')


def test_the_cpu_figure_of_a_round_reads_at_least_a_hundred_ticks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import _rate

    clock = {"ticks": 0, "sent": 0}

    def serve(url: str, bodies: list[dict[str, Any]], concurrency: int) -> float:
        clock["sent"] += len(bodies)
        clock["ticks"] += len(bodies) // 10  # a hello: a tick every ten requests
        return 500.0 if clock["sent"] == len(bodies) else 1.0  # only the first batch's rate

    monkeypatch.setattr(_rate, "_rate", serve)
    monkeypatch.setattr(_rate, "_ticks", lambda pid: clock["ticks"])
    monkeypatch.setattr(_rate, "_sample", lambda: (0, 0, 0))
    bodies = [{"n": i} for i in range(100)]
    measured = _rate._measured("u", 1, lambda: bodies, 8)
    assert measured == _rate._Round(500.0, 100, 1000)
    assert measured.cpu_ms == pytest.approx(100 * 1000 / os.sysconf("SC_CLK_TCK") / 1000)

    # A pool that runs dry is refused, not a round of fewer ticks than it needs.
    pool = iter([bodies, bodies])
    clock.update(ticks=0, sent=0)
    with pytest.raises(ValueError, match="no more requests after 200: the round read 20 ticks"):
        _rate._measured("u", 1, lambda: next(pool, []), 8)
    with pytest.raises(ValueError, match="no request for the round's timed batch"):
        _rate._measured("u", 1, list, 8)


def test_the_cpu_row_gives_its_resolution_and_refuses_a_round_of_no_tick() -> None:
    from _rate import _cpu_row, _Round

    tick_ms = 1000 / os.sysconf("SC_CLK_TCK")
    hello = [_Round(500.0, 120, 1000), _Round(480.0, 104, 1000)]
    ours = [_Round(80.0, 130, 100), _Round(90.0, 125, 100)]
    row = _cpu_row("enhance", 8, hello, ours)
    assert row.baseline == pytest.approx([120 * tick_ms / 1000, 104 * tick_ms / 1000])
    assert row.project == pytest.approx([130 * tick_ms / 100, 125 * tick_ms / 100])
    assert row.note == (
        f"(clock ticks of {tick_ms:g} ms, the fewest in a round: hello 104, enhance 125;"
        " a round's figure within 1.0%)"
    )
    with pytest.raises(ValueError, match="no clock tick"):
        _cpu_row("enhance", 8, [_Round(500.0, 0, 16)], ours)


def test_the_ledger_prints_each_target_with_its_verdict() -> None:
    bench = _ledger_bench()
    get_report, ingest_report = bench.get_report, bench.ingest_report

    ingest = ingest_report(
        {"bare insert": [1000.0, 1100.0], "transaction": [400.0, 500.0], "ledger": [480.0, 510]}
    )
    assert ingest[-1].endswith("ledger median 495/s: target >= 500 events/s  NOT MET")
    p50 = {"SELECT 1": [0.1, 0.2], "Ledger.get": [0.5, 0.7], "GET /generations/{id}": [4, 7.0]}
    p95 = {name: [1.0, 1.0] for name in p50}
    get = get_report(p50, p95, 100)
    assert "target" not in get[1]
    assert get[2].endswith("p50 median target <= 5 ms  met")
    assert get[3].endswith("p50 median target <= 5 ms  NOT MET")


def test_the_cli_start_up_judges_its_own_time_over_the_interpreters_start(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import cli_startup

    # A slow interpreter: imagegen --help takes 0.35 s, 0.15 s of it its own.
    commands = {"python -c pass (baseline)": ["0.20"], "imagegen --help": ["0.35"]}
    monkeypatch.setattr(cli_startup, "_commands", lambda: commands)
    monkeypatch.setattr(cli_startup, "_time", lambda command: float(command[0]))
    monkeypatch.setattr(sys, "argv", ["cli_startup.py", "--rounds", "3", "--check"])
    assert cli_startup.main() == 0
    assert "own time (less python -c pass of the same round) min 0.150s median 0.150s" in (
        capsys.readouterr().out
    )
    commands["imagegen --help"] = ["0.46"]
    assert cli_startup.main() == 1
    assert "target <= 0.22 s  NOT MET" in capsys.readouterr().out


def test_only_needs_at_least_one_row(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import run

    def ran(threads: int) -> None:  # past the arguments: every row would run
        raise AssertionError("--only with no names was accepted")

    monkeypatch.setattr(run, "set_torch_threads", ran)
    monkeypatch.setattr(sys, "argv", ["run.py", "--only"])
    with pytest.raises(SystemExit) as exited:
        run.main()
    assert exited.value.code == 2 and "--only" in capsys.readouterr().err


def test_the_overhead_rows_take_min_and_median_over_every_call_of_every_round(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import contextlib
    import statistics
    from collections.abc import Iterator
    from types import SimpleNamespace

    import run

    import imagegen.render.tiny

    # Seconds each side's call takes, by its place in the round: the first is the fastest.
    took = {"direct": [1.0, 3.0, 3.0], "default": [2.0, 4.0, 4.0], "prod": [1.5, 2.5, 2.5]}
    clock = [0.0]

    def spend(side: str, prompt: str) -> None:
        clock[0] += took[side][int(prompt.rsplit(" ", 1)[1])]

    class Pipe:
        def set_progress_bar_config(self, **kwargs: Any) -> None:
            pass

        def __call__(self, *, prompt: str, **kwargs: Any) -> SimpleNamespace:
            spend("direct", prompt)
            return SimpleNamespace(images=[None])

    @contextlib.contextmanager
    def served(stage: str, env: dict[str, str], **kwargs: Any) -> Iterator[SimpleNamespace]:
        yield SimpleNamespace(url="prod" if "IMAGEGEN_PNG_COMPRESS_STRATEGY" in env else "default")

    class Client:
        def __enter__(self) -> Client:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def post(self, url: str, *, json: dict[str, Any], timeout: float) -> SimpleNamespace:
            spend(url, json["prompt"])
            return SimpleNamespace(raise_for_status=lambda: None)

    monkeypatch.setattr(imagegen.render.tiny, "build_tiny_flux_pipeline", Pipe)
    monkeypatch.setattr(run, "served", served)
    monkeypatch.setattr(run, "httpx", SimpleNamespace(Client=Client))
    monkeypatch.setattr(run, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    default, prod = run.overhead(2, tmp_path, per_round=3)
    assert default.baseline == prod.baseline == took["direct"] * 2
    assert (default.project, prod.project) == (took["default"] * 2, took["prod"] * 2)
    # The median call, not the median of each round's fastest (1.0, 2.0 and 1.5 s).
    assert [statistics.median(row.project) for row in (default, prod)] == [4.0, 2.5]
    assert statistics.median(default.baseline) == 3.0
    assert default.ratio() == 2.0  # min against min, as before


def test_a_held_target_says_why_and_is_neither_met_nor_counted(
    capsys: pytest.CaptureFixture[str],
) -> None:
    row = Comparison("rate: x", "req/s", "higher", 0.23, [300.0], [92.0], held="load 7")
    assert row.ratio() == pytest.approx(92 / 300) and not row.has_target
    with pytest.raises(ValueError, match="not judged: load 7"):
        row.met()
    assert row.markdown().endswith("| 0.31x (max) | ≥ 0.23x not judged (load 7) |")
    row.print()
    assert "ratio   0.31x (max against max); target >= 0.23x  not judged: load 7" in (
        capsys.readouterr().out
    )


def test_the_rate_target_is_judged_only_where_other_processes_left_the_machine_alone() -> None:
    from _rate import QUIET, _rate_row, _Round

    # A loaded host: the hello falls from 1,160 to 300 req/s, enhance stays at 92 (89 before):
    # a share of 0.31, over the 0.23 of 3x, though the stage serves no more than before.
    hello = [_Round(300.0, 100, 1000, others=0.05), _Round(280.0, 100, 1000, others=0.40)]
    ours = [_Round(92.0, 100, 200, others=0.02), _Round(90.0, 100, 200, others=0.03)]
    loaded = _rate_row("enhance", 8, hello, ours, load=7.25)
    assert loaded.ratio() == pytest.approx(92 / 300) and not loaded.has_target
    assert loaded.held == (
        f"other processes took 40% of the {os.cpu_count()} CPUs in a round, over 10%;"
        " load average 7.2"
    )
    assert loaded.note == (
        "(target: 3x the rate before, as a share of the hello's: enhance 89 against 1,160"
        " req/s then, 92 against 300 req/s here)"
    )
    # The same rounds with the machine to themselves are judged against 3 x 89/1160.
    quiet = [_Round(r.per_second, r.ticks, r.requests, others=QUIET) for r in hello]
    judged = _rate_row("enhance", 8, quiet, ours, load=1.0)
    assert judged.has_target and judged.target == pytest.approx(3 * 89 / 1160)
    assert judged.met() and judged.verdict() == "target >= 0.23x  met"
    persist = _rate_row("persist", 8, quiet, [_Round(40.0, 100, 20)], load=1.0)
    assert persist.target == pytest.approx(3 * 59 / 1160) and not persist.met()


def test_the_share_of_the_machine_others_took_leaves_out_this_process_and_its_own() -> None:
    from _rate import _machine_ticks, _others_share

    # 200 ticks of the CPUs' time passed, 150 of them busy, 70 of those ours: others took 80.
    assert _others_share((100, 1000, 50), (250, 1200, 120)) == pytest.approx(0.4)
    assert _others_share((100, 1000, 50), (120, 1200, 120)) == 0.0  # never below nothing
    assert _others_share((100, 1000, 50), (100, 1000, 50)) == 0.0  # no tick passed
    busy, every = _machine_ticks()
    assert 0 < busy < every


def test_a_rounds_share_of_others_is_measured_over_the_whole_round(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import _rate

    samples = iter([(0, 0, 0), (150, 200, 70)])
    clock = {"ticks": 0}

    def serve(url: str, bodies: list[dict[str, Any]], concurrency: int) -> float:
        clock["ticks"] += len(bodies)
        return 100.0

    monkeypatch.setattr(_rate, "_rate", serve)
    monkeypatch.setattr(_rate, "_ticks", lambda pid: clock["ticks"])
    monkeypatch.setattr(_rate, "_sample", lambda: next(samples))
    assert _rate._measured("u", 1, lambda: [{}] * 100, 8).others == pytest.approx(0.4)


def test_the_cpu_time_of_a_served_process_counts_its_workers_children_too() -> None:
    """The share of others leaves out this process and everything it started: gunicorn's
    workers are the children of the served processes, themselves children of this one."""
    import subprocess

    from _rate import _ticks

    spin = (
        "import sys, time\n"
        "end = time.process_time() + 0.3\n"
        "while time.process_time() < end: pass\n"
        "print('done', flush=True); sys.stdin.read()\n"
    )

    def starting(script: str) -> str:
        return (
            "import subprocess, sys\n"
            f"child = subprocess.Popen([sys.executable, '-c', {script!r}], stdout=sys.stdout)\n"
            "child.communicate()\n"
        )

    # This process -> the served process -> gunicorn's arbiter -> its worker, which spins.
    process = subprocess.Popen(
        [sys.executable, "-c", starting(starting(spin))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None and process.stdout.readline() == "done\n"
        assert _ticks(process.pid) / os.sysconf("SC_CLK_TCK") >= 0.3
    finally:
        process.communicate("")


def test_every_persist_round_gets_a_full_timed_batch_and_its_ticks_however_cheap_persist_is(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import _rate

    made: list[int] = []

    def stored(storage: Path, count: int) -> list[dict[str, Any]]:
        made.append(count)
        start = sum(made) - count
        return [{"generation_id": f"p-{start + i}"} for i in range(count)]

    sent: list[dict[str, Any]] = []
    batches: list[int] = []

    def serve(url: str, bodies: list[dict[str, Any]], concurrency: int) -> float:
        sent.extend(bodies)
        batches.append(len(bodies))
        return 400.0

    monkeypatch.setattr(_rate, "_stored_images", stored)
    monkeypatch.setattr(_rate, "_rate", serve)
    # Persist at 2 ms of CPU a request (100 ticks a second): 500 requests to read 100 ticks.
    monkeypatch.setattr(_rate, "_ticks", lambda pid: len(sent) // 5)
    monkeypatch.setattr(_rate, "_sample", lambda: (0, 0, 0))
    rounds, requests = 3, 100
    images = _rate._ImagePool(tmp_path, rounds * max(3 * requests, 300))  # as rate() stocks it
    measured = [_rate._measured("u", 1, lambda: images.take(requests), 8) for _ in range(rounds)]
    assert [r.per_second for r in measured] == [400.0] * rounds
    assert all(r.ticks >= _rate.MIN_TICKS and r.requests == 500 for r in measured)
    assert set(batches) == {requests} and len(sent) == rounds * 500
    assert len({body["generation_id"] for body in sent}) == len(sent)  # each image once
    assert made == [900, 300, 300]  # the stock, then 300 more each time it ran short


def test_the_rate_row_warms_every_side_up_with_one_untimed_batch(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import contextlib
    from collections.abc import Iterator
    from types import SimpleNamespace

    import _rate

    events: list[tuple[str, str]] = []

    @contextlib.contextmanager
    def served(stage: str, env: dict[str, str], **kwargs: Any) -> Iterator[SimpleNamespace]:
        yield SimpleNamespace(url=stage, pid=0)

    def measured(url: str, pid: int, batch: Any, concurrency: int) -> _rate._Round:
        events.append(("timed", url))
        assert batch()
        return _rate._Round(100.0, 100, 100)

    monkeypatch.setattr(_rate, "served", served)
    monkeypatch.setattr(_rate, "_measured", measured)
    monkeypatch.setattr(_rate, "_rate", lambda url, bodies, c: events.append(("warm", url)))
    monkeypatch.setattr(_rate, "_stored_images", lambda storage, count: [{}] * count)
    rows = _rate.rate(2, tmp_path, requests=4)
    assert [row.name.split(" at ")[0] for row in rows] == [
        "rate: enhance",
        "CPU per request: enhance vs a hello, both",
        "rate: persist",
        "CPU per request: persist vs a hello, both",
    ]
    for side in ("hello", "enhance", "persist"):
        kinds = [kind for kind, url in events if url == side]
        assert kinds[:1] == ["warm"] and kinds.count("warm") == 1, events
    assert events[:3] == [("warm", "hello"), ("warm", "enhance"), ("warm", "persist")]


def test_the_start_up_rows_start_every_side_once_untimed_first(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import _startup

    started: list[str] = []

    def replies(
        stage: str, env: dict[str, str], tmp: Path, bodies: Any, pause: float
    ) -> tuple[float, float, float]:
        started.append(stage + (" paused" if pause else ""))
        next(bodies), next(bodies)  # as each start sends: two requests
        return 0.1, 0.2, 0.05

    monkeypatch.setattr(_startup, "_replies", replies)
    monkeypatch.setattr(
        _startup, "_stored_images", lambda storage, count: [{"n": i} for i in range(count)]
    )
    _startup.startup(2, tmp_path)
    assert started == [
        *("hello", "hello_settings"),  # untimed
        *("hello", "hello_settings", "hello_settings", "hello"),
        "enhance",  # untimed
        *("hello", "enhance", "enhance", "hello"),
        *("enhance paused", "enhance paused"),
        "persist",  # untimed
        *("hello", "persist", "persist", "hello"),
        *("persist paused", "persist paused"),
    ]


def test_each_gpu_row_runs_the_fast_path_it_names_whatever_the_environment_sets(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import argparse
    from unittest import mock

    import gpu

    from imagegen.settings import Settings

    for name, value in {
        "IMAGEGEN_RENDER_COMPILE": "regional",
        "IMAGEGEN_RENDER_FUSE_QKV": "true",
        "IMAGEGEN_RENDER_FP8": "true",
        "IMAGEGEN_RENDER_COMPILE_CACHE_DIR": str(tmp_path / "cache"),
        "IMAGEGEN_LORAS": "somewhere.safetensors",
        "IMAGEGEN_LORA_DIR": str(tmp_path / "loras"),
    }.items():
        monkeypatch.setenv(name, value)
    args = argparse.Namespace(model="tiny", device="cpu")
    off = {
        "render_fuse_qkv": False,
        "render_compile": "off",
        "render_fp8": False,
        "render_compile_cache_dir": None,
        "loras": [],
        "lora_dir": None,
    }
    for row, options in gpu.OPTIONS.items():
        settings = gpu._settings(args, **options)
        assert {name: getattr(settings, name) for name in off} == {**off, **options}, row
    backend = gpu._backend(args, "bf16 backend")  # overhead and tolerance: bf16 alone
    assert {name: getattr(backend._settings, name) for name in off} == off
    assert capsys.readouterr().out == (
        "bf16 backend: render_fuse_qkv=False render_compile='off' render_fp8=False"
        " render_compile_cache_dir=None loras=[] lora_dir=None\n"
    )
    # The start-up part: regional compile and the warm-up, nothing else of the fast path.
    env = gpu.startup_env(args, tmp_path)
    with mock.patch.dict(os.environ, env, clear=True):
        served = Settings()
    assert (served.render_compile, served.render_fuse_qkv, served.render_fp8) == (
        "regional",
        False,
        False,
    )
    assert (served.loras, served.lora_dir, served.render_warmup) == ([], None, True)


def _ledger_bench() -> Any:
    """benchmarks/ledger.py, loaded by its path: ``ledger`` is the ledger function to the
    tests that serve it in this process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark_ledger", ROOT / "benchmarks/ledger.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def _group(pgid: int) -> list[int]:
    """The live processes (zombies left out) of process group ``pgid``."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # After the command's parenthesised name: state, ppid, pgrp, ...
            state, _, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError):
            continue  # ended meanwhile
        if int(pgrp) == pgid and state != "Z":
            members.append(int(stat.parent.name))
    return members


def _working_in(folder: Path) -> list[int]:
    """The live processes whose working directory is in ``folder``."""
    found = []
    for cwd in Path("/proc").glob("[0-9]*/cwd"):
        try:
            if Path(os.readlink(cwd)).is_relative_to(folder):
                found.append(int(cwd.parent.name))
        except OSError:
            continue
    return found


@pytest.mark.slow  # a stage's process of its own
def test_a_served_function_whose_start_up_failed_is_said_at_once_with_its_log(
    tmp_path: Path,
) -> None:
    from _harness import Served
    from _workload import served_env

    # A setting no stage accepts: /readyz answers 503 "start-up failed", and would until the
    # process is restarted with another.
    env = {**os.environ, **served_env(tmp_path / "storage", IMAGEGEN_PNG_ENCODE_THREADS="0")}
    server = Served("enhance", env, log_dir=tmp_path, threads=1)
    started = time.perf_counter()
    try:
        with pytest.raises(RuntimeError, match=r"^enhance start-up failed:\n") as failed:
            server.ready_after(timeout=45)
    finally:
        server.stop()
    assert time.perf_counter() - started < 30
    assert "IMAGEGEN_PNG_ENCODE_THREADS (Input should be greater than or equal to 1)" in str(
        failed.value
    )


@pytest.mark.slow  # functions-framework's own process
def test_a_benchmark_given_sigterm_stops_its_servers_and_removes_its_directory(
    tmp_path: Path,
) -> None:
    import signal
    import subprocess

    # As a script runs one: the hello served from a temporary directory, until a SIGTERM.
    script = (
        "import sys, tempfile, time\n"
        "from pathlib import Path\n"
        "from _cli import exit_on_sigterm\n"
        "from _harness import served\n"
        "exit_on_sigterm()\n"
        "with tempfile.TemporaryDirectory() as directory:\n"
        "    with served('hello', {}, log_dir=Path(directory), threads=1) as hello:\n"
        "        print(hello.pid, directory, flush=True)\n"
        "        time.sleep(60)\n"
    )
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    env = {**os.environ, "TMPDIR": str(temporary), "PYTHONPATH": str(ROOT / "benchmarks")}
    process = subprocess.Popen(
        [sys.executable, "-c", script], env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    hello = 0
    try:
        assert process.stdout is not None
        pid, directory = process.stdout.readline().split()
        hello = int(pid)
        assert _group(hello) and Path(directory).is_dir()
        process.send_signal(signal.SIGTERM)
        status = process.wait(timeout=30)
        assert _group(hello) == [] and list(temporary.iterdir()) == []
        assert status == 143  # an exit, as a SIGTERM's
    finally:
        process.kill()
        process.wait()
        for left in _group(hello) if hello else []:
            os.kill(left, signal.SIGKILL)


def test_a_sigterm_as_a_child_starts_kills_the_child(monkeypatch: pytest.MonkeyPatch) -> None:
    """A SIGTERM while ``Popen`` starts the child (after the fork, before it returns): held,
    then delivered once the child is held, which is killed and reaped. Raised where it came,
    nothing would hold the child, which would run on."""
    import signal
    import subprocess

    import _cli

    started: list[subprocess.Popen[str]] = []
    popen = subprocess.Popen

    def signalled_as_it_starts(*args: Any, **kwargs: Any) -> subprocess.Popen[str]:
        child = popen(*args, **kwargs)
        started.append(child)
        os.kill(os.getpid(), signal.SIGTERM)  # as the benchmark's timeout does, just then
        return child

    def terminated(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)  # as exit_on_sigterm's handler

    monkeypatch.setattr(_cli.subprocess, "Popen", signalled_as_it_starts)
    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        with pytest.raises(SystemExit) as stopped:
            _cli.run_child([sys.executable, "-c", "import time; time.sleep(60)"])
        assert signal.getsignal(signal.SIGTERM) is terminated  # given back
        [child] = started
        assert child.returncode == -signal.SIGKILL  # killed, and reaped, by run_child
    finally:
        signal.signal(signal.SIGTERM, previous)
        for left in started:  # a child run_child left running
            if left.poll() is None:
                left.kill()
                left.wait()
    assert stopped.value.code == 143


def test_a_sigterm_as_a_served_function_starts_leaves_it_to_be_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server, in a session of its own that no signal to the benchmark's group reaches, is
    kept as the Served's process before the SIGTERM's exit unwinds, so stop() ends it."""
    import signal
    import subprocess

    import _harness

    started: list[subprocess.Popen[bytes]] = []
    popen = subprocess.Popen

    def signalled_as_it_starts(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        child = popen([sys.executable, "-c", "import time; time.sleep(60)"], **kwargs)
        started.append(child)
        os.kill(os.getpid(), signal.SIGTERM)
        return child

    def terminated(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    monkeypatch.setattr(_harness.subprocess, "Popen", signalled_as_it_starts)
    server = _harness.Served("hello", dict(os.environ), log_dir=tmp_path, threads=1)
    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        with pytest.raises(SystemExit):
            server.start(wait=False)
        [child] = started
        assert server.process is child  # what stop() ends
    finally:
        signal.signal(signal.SIGTERM, previous)
        for left in started:
            if left.poll() is None:
                left.kill()
                left.wait()


@pytest.mark.slow  # the benchmark's process and its child's
def test_the_otlp_benchmark_given_sigterm_ends_its_child_and_removes_its_directory(
    tmp_path: Path,
) -> None:
    import signal
    import subprocess

    temporary = tmp_path / "tmp"
    temporary.mkdir()
    command = [sys.executable, str(ROOT / "benchmarks" / "otlp_overhead.py")]
    command += ["--rounds", "1", "--requests", "1000000", "--warmup", "0"]
    process = subprocess.Popen(
        command,
        env={**os.environ, "TMPDIR": str(temporary)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not _working_in(temporary):  # a variant's child is timing its requests
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        status = process.wait(timeout=30)
        assert _working_in(temporary) == [] and list(temporary.iterdir()) == []
        assert status == 143
    finally:
        process.kill()
        process.wait()
        for left in _working_in(temporary):
            os.kill(left, signal.SIGKILL)


def test_a_child_that_fails_ends_the_ledger_benchmark_with_one_line_saying_why(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    bench = _ledger_bench()
    script = tmp_path / ".ci" / "postgres"
    script.parent.mkdir()
    script.write_text(
        "#!/bin/sh\n"
        "echo 'starting' >&2\n"
        "echo 'PostgreSQL 15 is not installed (/x/initdb); apt-get install postgresql-15' >&2\n"
        "exit 1\n"
    )
    script.chmod(0o755)
    monkeypatch.setattr(bench, "ROOT", tmp_path)
    monkeypatch.setattr(sys, "argv", ["ledger.py"])
    with pytest.raises(SystemExit) as exited:
        bench.main()
    assert exited.value.code == (
        ".ci/postgres start failed (exit status 1): starting | PostgreSQL 15 is not installed"
        " (/x/initdb); apt-get install postgresql-15"
    )


def test_a_child_that_fails_ends_the_first_image_row_with_one_line_saying_why(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import run

    # A setting the row's child cannot read: its traceback ends with pydantic's message.
    monkeypatch.setenv("IMAGEGEN_PNG_ENCODE_THREADS", "0")
    with pytest.raises(SystemExit) as exited:
        run.first_image(1, tmp_path)
    said = exited.value.code
    assert isinstance(said, str) and "\n" not in said
    assert said.startswith("first image, sequential failed (exit status 1): ")
    assert "png_encode_threads | Input should be greater than or equal to 1" in said


@pytest.mark.parametrize(
    ("script", "argv", "option"),
    [
        ("run", ["--only", "png", "--rounds", "0"], "--rounds"),
        ("run", ["--only", "png", "--torch-threads", "0"], "--torch-threads"),
        ("cli_startup", ["--rounds", "0"], "--rounds"),
        ("remote_context", ["--rounds", "0"], "--rounds"),
        ("remote_context", ["--requests", "0"], "--requests"),
        ("otlp_overhead", ["--rounds", "0"], "--rounds"),
        ("ledger", ["--generations", "1"], "--generations"),
        ("ledger", ["--events", "3"], "--events"),
        ("ledger", ["--rounds", "0"], "--rounds"),
        (
            "gpu",
            ["--device", "cpu", "--model", "tiny", "--parts", "overhead", "--rounds", "0"],
            "--rounds",
        ),
    ],
)
def test_a_count_of_nothing_is_a_usage_error_before_anything_runs(
    script: str,
    argv: list[str],
    option: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    import importlib

    if script == "ledger":
        bench = _ledger_bench()
        monkeypatch.setattr(bench, "ROOT", tmp_path)  # no .ci/postgres: no server starts
    else:
        bench = importlib.import_module(script)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *argv])
    with pytest.raises(SystemExit) as exited:
        bench.main(argv) if script == "gpu" else bench.main()
    assert exited.value.code == 2
    assert re.search(f"argument {option}: must be at least \\d, not \\d", capsys.readouterr().err)


def test_the_ledger_reads_every_generation_where_fewer_than_its_sample_are_stored(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import contextlib
    from types import SimpleNamespace

    bench = _ledger_bench()
    ids = [f"bench-{n}" for n in range(100)]
    read: list[str] = []
    timeline = {"timeline": [{}] * 4}

    def get(path: str) -> Any:
        read.append(path.rsplit("/", 1)[1])
        return SimpleNamespace(status_code=200, json=lambda: timeline)

    db = SimpleNamespace(query=lambda sql, params: [{"one": 1}])
    ledger = SimpleNamespace(
        statement=lambda: contextlib.nullcontext(db),
        get=lambda gid: SimpleNamespace(timeline=[{}] * 4),
    )
    monkeypatch.setattr(bench, "_served", lambda url: SimpleNamespace(get=get))
    bench.bench_get(ledger, "postgresql://unused", ids, rounds=1)
    assert sorted(read) == sorted(ids)  # each of the 100 once, not 2,000 of them
    assert capsys.readouterr().out.startswith("get ms, 100 generations stored")


def test_the_gpu_scripts_png_lines_use_renders_compression_level() -> None:
    import torch
    from _png import filtered_png_costs, photo_like, pipeline_output, png_costs

    from imagegen.render.png import encode_png

    image = photo_like(256)
    pixels = pipeline_output(image, "cpu", torch.float32)
    for level in (1, 9):
        costs = png_costs(image, 256, 1, level=level)
        filtered = filtered_png_costs(pixels, 256, 1, level=level)
        for strategy, threads in (("default", 1), ("rle", 4)):
            made = encode_png(image, text={}, level=level, strategy=strategy, threads=threads)
            assert costs[f"{strategy} x{threads}"][1] == len(made), (level, strategy)
        for strategy in ("default", "rle"):  # the same files, the rows filtered by torch
            made = encode_png(image, text={}, level=level, strategy=strategy, threads=4)
            assert filtered[f"{strategy} x4"][1] == len(made), (level, strategy)
    assert len(encode_png(image, text={}, level=1)) != len(encode_png(image, text={}, level=9))


def test_the_gpu_script_names_renders_png_level_and_says_it_runs_offline(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import gpu

    monkeypatch.setenv("IMAGEGEN_MODEL_CACHE_DIR", str(tmp_path))  # nothing in it
    monkeypatch.setenv("IMAGEGEN_PNG_COMPRESS_LEVEL", "3")
    argv = ["--device", "cpu", "--model", "black-forest-labs/FLUX.2-klein-4B"]
    assert gpu.main([*argv, "--parts", "overhead", "--rounds", "1"]) == 2
    captured = capsys.readouterr()
    out = captured.out
    assert "; render's PNG: default, level 3, 1 thread(s)\n" in out.splitlines(keepends=True)[0]
    # The model is not there: the tests' helpers the script imports set HF_HUB_OFFLINE, which
    # its user need not have set.
    assert "is not in the local cache and the benchmark runs offline: pull it first" in captured.err
    assert "HF_HUB_OFFLINE" not in captured.out + captured.err


def test_the_gpu_script_names_its_own_flag_for_a_model_directory_it_cannot_load(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import gpu

    empty = tmp_path / "no-pipeline"
    empty.mkdir()
    assert gpu.main(["--device", "cpu", "--model", str(empty), "--parts", "overhead"]) == 2
    err = capsys.readouterr().err
    assert f"--model {empty} is no diffusers pipeline directory" in err
    assert "point --model at one" in err.lower()
    assert "IMAGEGEN_MODEL" not in err
    # The model's own path is said as it is, whatever it holds.
    named = tmp_path / "IMAGEGEN_MODEL_dir"
    named.mkdir()
    assert gpu.main(["--device", "cpu", "--model", str(named), "--parts", "overhead"]) == 2
    assert f"--model {named} is no diffusers pipeline directory" in capsys.readouterr().err
