"""The CUDA code paths, run where a GPU is present (skipped in CI, which has none): every sampler with a CPU or
a CUDA generator on CUDA tensors, and bf16 training + sampling of mnist_text_cfg.py end to end on the GPU."""
import json
import os

import pytest
import torch

import common
import mnist_text_cfg
from helpers import run_cli

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

SAMPLER_CASES = [("ddpm", {}), ("ddim", {"eta": 1.0}), ("ddim", {}), ("dpmpp", {}), ("dpmpp-sde", {}),
                 ("dpmpp-3m-sde", {})]


def toy_denoiser(process, mean=0.5, std=0.2):
    """The exact x0_hat of data N(mean, std^2): E[x0 | x_t] in closed form, any device."""
    def denoise(x, t):
        a = process.a.to(x)[t].view(-1, 1)
        b = process.b.to(x)[t].view(-1, 1)
        return mean + a * std**2 / (a**2 * std**2 + b**2) * (x - a * mean)
    return denoise


@pytest.mark.parametrize("name,options", SAMPLER_CASES,
                         ids=["ddpm", "ddim-eta1", "ddim-eta0", "dpmpp", "dpmpp-sde", "dpmpp-3m-sde"])
def test_samplers_on_cuda_with_cpu_or_cuda_generator(name, options):
    process = common.make_process("gaussian", 100, "cosine")
    x_T = process.b[-1].item() * torch.randn(4000, 1, generator=torch.Generator().manual_seed(0))
    sampler = common.SAMPLERS[name]
    on_cpu = sampler(toy_denoiser(process), x_T, process, 20, generator=torch.Generator().manual_seed(1), **options)
    # a CPU generator with CUDA tensors (the crash of issue 8): the same noise, so the same samples as on the CPU
    on_cuda = sampler(toy_denoiser(process), x_T.cuda(), process, 20, generator=torch.Generator().manual_seed(1), **options)
    assert on_cuda.device.type == "cuda"
    torch.testing.assert_close(on_cuda.cpu(), on_cpu, atol=1e-4, rtol=1e-4)
    # a CUDA generator: other noise, the same distribution as the CPU run (20 of 100 steps: not exactly the
    # data's N(0.5, 0.2^2) for every sampler, so the CPU run is the reference)
    cuda_generator = torch.Generator(device="cuda").manual_seed(1)
    samples = sampler(toy_denoiser(process), x_T.cuda(), process, 20, generator=cuda_generator, **options)
    assert abs(samples.mean().item() - on_cpu.mean().item()) < 0.02
    assert abs(samples.std().item() - on_cpu.std().item()) < 0.02


def test_text_cfg_trains_in_bf16_and_samples_on_cuda(tmp_path):
    outdir = tmp_path / "run"
    status = run_cli(mnist_text_cfg.main, [
        "--text-encoder", "class", "--dataset", "mnist5k", "--data-dir", str(tmp_path / "data"), "--outdir", str(outdir),
        "--device", "cuda", "--max-steps", "30", "--max-minutes", "0", "--batch-size", "128", "--eval-every", "0",
        "--final-samples", "100", "--heldout-samples", "60", "--grid-columns", "2", "--no-progress"])
    assert status == 0
    with open(outdir / "results.json") as file:
        results = json.load(file)
    assert results["steps"] == 30 and 0 <= results["prompt_accuracy"] <= 1 and results["fid"] > 0
    records = [json.loads(line) for line in open(outdir / "metrics.jsonl")]
    assert any(r.get("system/gpu_memory_allocated_gb", 0) > 0 for r in records)
    image = tmp_path / "seven.png"
    assert run_cli(mnist_text_cfg.main, ["generate", "--ckpt", str(outdir / "checkpoints" / "final.pt"), "--prompt",
                                         "the digit seven", "--num-samples", "4", "--device", "cuda",
                                         "--output", str(image)]) == 0
    assert os.path.getsize(image) > 0
